//! The agent: its functions, its link, its workload runs, and the way to run it all.
//!
//! Owns wiring and lifecycle: building one task per function and the link task from an
//! [`AgentConfig`], the registry the control service and embedders use to reach the
//! functions, starting runs (one at a time) and keeping their reports, and serving the
//! control, health and metrics ports until shutdown ([`run`], [`run_with_health`]), the
//! control port in plaintext or mutual TLS as the security settings say, the health port
//! (`grpc.health.v1` only) in plaintext for probes. What a function does is `function`'s; how the
//! link works is `link`'s; who may call the control port is `security`'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use dmar_auth::accept::{AcceptConfig, ConnectionLimiter};
use dmar_auth::{ClientAuth, Grant, Identity, Policy, PolicyError, Quotas, RequesterIdSet, Role, TlsError};
use dmar_proto::v1::agent_control_server::AgentControlServer;
use dmar_proto::v1::control_client::ControlClient;
use dmar_vtd::SourceId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

use crate::config::{AgentConfig, ConfigError, FunctionConfig};
use crate::function::{Command, FunctionHandle, FunctionSnapshot, FunctionTask, Stopped, TaskParts};
use crate::link::{Link, LinkState};
use crate::security::{ControlGate, PlaintextRefused, Refusals, check_plaintext, printable_name};
use crate::workload::engine::Engine;
use crate::workload::{Run, WorkloadError, WorkloadSpec, coordinate};
use crate::{control, link, metrics, metrics_http};

/// Commands buffered per function before a handle waits.
const COMMAND_DEPTH: usize = 256;
/// Finished runs kept for `GetReport`.
const KEPT_RUNS: usize = 32;
/// Longest wait for the tasks to stop after shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The sockets an agent serves on.
#[derive(Debug, Default)]
pub struct Listeners {
    /// gRPC: AgentControl, health, reflection.
    pub control: Option<TcpListener>,
    /// Prometheus `/metrics`.
    pub metrics: Option<TcpListener>,
}

/// Why an agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The server URL is not usable by the transport.
    #[error("server URL: {0}")]
    Url(String),
    /// Plaintext where the plaintext rule does not allow it.
    #[error(transparent)]
    Plaintext(#[from] PlaintextRefused),
    /// The control port's TLS configuration could not be built.
    #[error("control port tls: {0}")]
    Tls(#[from] TlsError),
    /// The trusted identities do not make a connection policy.
    #[error("trusted clients: {0}")]
    Trust(#[from] PolicyError),
    /// Reflection could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The control port's transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[derive(Debug)]
struct Inner {
    config: Arc<AgentConfig>,
    configs: HashMap<SourceId, FunctionConfig>,
    functions: DashMap<SourceId, FunctionHandle>,
    order: Vec<SourceId>,
    link: watch::Receiver<LinkState>,
    runs: DashMap<u64, Arc<Run>>,
    next_run: AtomicU64,
    running: Mutex<Option<u64>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// A running agent: functions with device TLBs on one ATS link. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    /// Starts the functions and the link (which connects in the background, retrying
    /// with back-off) on the current Tokio runtime. Everything stops when `shutdown` is
    /// cancelled; [`Agent::stopped`] waits for it.
    ///
    /// Refuses a plaintext link to a server beyond loopback unless the security settings
    /// say `insecure` ([`crate::check_plaintext`]). The name is cut to printable ASCII and
    /// [`crate::MAX_NAME_CHARS`] before it is logged or sent.
    pub fn start(mut config: AgentConfig, shutdown: CancellationToken) -> Result<Agent, AgentError> {
        config.validate()?;
        check_plaintext(&config.security, &config.server_url(), None)?;
        let name = printable_name(&config.name);
        if name != config.name {
            tracing::warn!(agent = %name, "agent name cut to printable ascii and its length bound");
            config.name = name;
        }
        if config.security.is_tls() {
            dmar_auth::tls::install_default_crypto_provider();
        }
        let config = Arc::new(config);
        let metrics = metrics::handles();
        let tasks = TaskTracker::new();
        let endpoint = link::endpoint(&config).map_err(|e| AgentError::Url(e.to_string()))?;
        let control = ControlClient::new(endpoint.connect_lazy());
        let mut inboxes = Vec::with_capacity(config.functions.len());
        let mut receivers = Vec::with_capacity(config.functions.len());
        for _ in &config.functions {
            let (tx, rx) = mpsc::unbounded_channel();
            inboxes.push(tx);
            receivers.push(rx);
        }
        let (link, link_tx, link_state) = Link::new(config.clone(), inboxes.clone(), metrics.clone());
        let functions = DashMap::new();
        for ((f, inbox), inbound) in config.functions.iter().zip(inboxes).zip(receivers) {
            let (commands_tx, commands) = mpsc::channel(COMMAND_DEPTH);
            let cfg = Arc::new(f.clone());
            let task = FunctionTask::new(TaskParts {
                config: cfg.clone(),
                link: link_tx.clone(),
                control: control.clone(),
                inbox,
                tasks: tasks.clone(),
                metrics: metrics.clone(),
                page_request_timeout: config.page_request_timeout,
            });
            tasks.spawn(task.run(inbound, commands, shutdown.child_token()));
            functions.insert(f.sid, FunctionHandle::new(cfg, commands_tx));
        }
        drop(link_tx);
        tasks.spawn(link.run(shutdown.child_token()));
        metrics.functions.increment(config.functions.len() as f64);
        let n = config.functions.len();
        {
            let metrics = metrics.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                shutdown.cancelled().await;
                metrics.functions.decrement(n as f64);
            });
        }
        let mut order: Vec<SourceId> = config.functions.iter().map(|f| f.sid).collect();
        order.sort_unstable();
        let configs = config.functions.iter().map(|f| (f.sid, f.clone())).collect();
        tracing::info!(
            agent = %config.name,
            server = %config.server_url(),
            functions = n,
            security = %config.security,
            "dmar-agent started"
        );
        if config.security.insecure && !config.security.is_tls() {
            tracing::warn!("plaintext by request (insecure): the link's DMA payloads and the control port are open");
        }
        Ok(Agent {
            inner: Arc::new(Inner {
                config,
                configs,
                functions,
                order,
                link: link_state,
                runs: DashMap::new(),
                next_run: AtomicU64::new(0),
                running: Mutex::new(None),
                tasks,
                shutdown,
            }),
        })
    }

    /// The configuration it runs.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    /// Its functions' requester ids, in order.
    pub fn source_ids(&self) -> &[SourceId] {
        &self.inner.order
    }

    /// A handle on one function.
    pub fn function(&self, sid: SourceId) -> Option<FunctionHandle> {
        self.inner.functions.get(&sid).map(|h| h.clone())
    }

    /// Handles on every function, in requester-id order.
    pub fn functions(&self) -> Vec<FunctionHandle> {
        self.inner.order.iter().filter_map(|sid| self.function(*sid)).collect()
    }

    /// The link now.
    pub fn link_state(&self) -> LinkState {
        *self.inner.link.borrow()
    }

    /// Waits until the link state satisfies `pred` (e.g. connected with a generation
    /// above the last one seen, after a server restart).
    pub async fn wait_for_link(&self, pred: impl FnMut(&LinkState) -> bool) -> Result<LinkState, Stopped> {
        let mut rx = self.inner.link.clone();
        rx.wait_for(pred).await.map(|s| *s).map_err(|_| Stopped)
    }

    /// Snapshots of every function, in requester-id order.
    pub async fn snapshots(&self) -> Result<Vec<FunctionSnapshot>, Stopped> {
        let mut out = Vec::with_capacity(self.inner.order.len());
        for f in self.functions() {
            out.push(f.snapshot().await?);
        }
        Ok(out)
    }

    /// Starts a workload run; one runs at a time.
    pub async fn start_workload(&self, spec: WorkloadSpec) -> Result<Arc<Run>, WorkloadError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(WorkloadError::ShuttingDown);
        }
        spec.validate(&self.inner.configs)?;
        let run = {
            let mut running = self.inner.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(id) = *running
                && self.inner.runs.get(&id).is_some_and(|r| !r.is_done())
            {
                return Err(WorkloadError::Busy(id));
            }
            let id = self.inner.next_run.fetch_add(1, Ordering::Relaxed) + 1;
            let run = Run::new(id, &spec, Instant::now());
            self.inner.runs.insert(id, run.clone());
            *running = Some(id);
            run
        };
        self.prune_runs();
        let seed = if spec.seed != 0 {
            spec.seed
        } else {
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        };
        let drain = self.inner.config.drain_timeout;
        let mut receivers = Vec::with_capacity(spec.streams.len());
        for (slot, (sid, stream)) in spec.streams.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            let engine = Engine::new(run.clone(), slot, *sid, &spec, stream, seed, drain, tx);
            if let Some(f) = self.function(*sid) {
                // A function that stopped drops the engine, and with it the report's sender.
                let _ = f.send(Command::Start { engine: Box::new(engine) }).await;
            }
            receivers.push((*sid, rx));
        }
        let deadline = run.end + drain + Duration::from_secs(5);
        let inner = self.inner.clone();
        let r = run.clone();
        self.inner.tasks.spawn(async move {
            coordinate(r.clone(), receivers, deadline, inner.shutdown.clone()).await;
            let mut running = inner.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if *running == Some(r.id) {
                *running = None;
            }
        });
        tracing::info!(run = run.id, functions = spec.streams.len(), mode = ?spec.mode, "workload run started");
        Ok(run)
    }

    fn prune_runs(&self) {
        let latest = self.inner.next_run.load(Ordering::Relaxed);
        if self.inner.runs.len() > KEPT_RUNS {
            self.inner.runs.retain(|id, r| *id + KEPT_RUNS as u64 > latest || !r.is_done());
        }
    }

    /// A workload run by id; 0 means the latest.
    pub fn workload_run(&self, id: u64) -> Result<Arc<Run>, WorkloadError> {
        let id = if id == 0 { self.inner.next_run.load(Ordering::Relaxed) } else { id };
        self.inner.runs.get(&id).map(|r| r.clone()).ok_or(WorkloadError::NoSuchRun(id))
    }

    /// The run in progress, if any.
    pub fn running(&self) -> Option<Arc<Run>> {
        let id = (*self.inner.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner))?;
        self.inner.runs.get(&id).map(|r| r.clone()).filter(|r| !r.is_done())
    }

    /// Stops a run (0: the one in progress); returns its id.
    pub fn stop_workload(&self, id: u64) -> Result<u64, WorkloadError> {
        let run = if id == 0 { self.running().ok_or(WorkloadError::NoSuchRun(0))? } else { self.workload_run(id)? };
        run.stop();
        Ok(run.id)
    }

    /// The token that stops the agent.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Waits (at most 5 s) for every task to stop; call after cancelling the shutdown token.
    pub async fn stopped(&self) {
        self.inner.tasks.close();
        if tokio::time::timeout(STOP_TIMEOUT, self.inner.tasks.wait()).await.is_err() {
            tracing::warn!("agent tasks did not stop within {STOP_TIMEOUT:?}");
        }
    }
}

/// Starts an agent and serves its control and metrics ports until `shutdown`; the
/// library entry point the binary, the tests and the load generator share.
///
/// Refuses plaintext beyond loopback (the server's host or the control port's address)
/// unless `config.security.insecure` ([`crate::check_plaintext`]). With TLS the control
/// port requires TLS and serves AgentControl and reflection only to
/// `config.security.trusted_clients`; health answers anyone who completes the handshake.
pub async fn run(config: AgentConfig, listeners: Listeners, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_with_health(config, listeners, None, shutdown).await
}

/// [`run`], plus a plaintext port `health` answering only `grpc.health.v1`, for container
/// probes that cannot present a certificate or do TLS (the control port answers health
/// without a certificate too, but over TLS). It carries the control port's statuses:
/// `dmar.v1.AgentControl` is SERVING while the ATS link is bound (the agent is ready for
/// workloads), NOT_SERVING before and while it reconnects; the overall status (`""`) is
/// SERVING while the process runs. The port serves nothing else, so it needs no
/// certificate and falls under no plaintext rule.
pub async fn run_with_health(
    config: AgentConfig,
    listeners: Listeners,
    health: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let control = listeners.control.as_ref().and_then(|l| l.local_addr().ok());
    check_plaintext(&config.security, &config.server_url(), control)?;
    let agent = Agent::start(config, shutdown.clone())?;
    serve(agent, listeners, health, shutdown).await
}

/// Serves an already started agent's control, health and metrics ports until `shutdown`,
/// then waits for its tasks to stop.
async fn serve(
    agent: Agent,
    listeners: Listeners,
    health_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    if let Some(l) = listeners.metrics {
        tracing::info!(addr = ?l.local_addr().ok(), "metrics serving");
        agent.inner.tasks.spawn(metrics_http::serve(l, shutdown.clone()));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    agent.inner.tasks.spawn(report_link(agent.clone(), health, shutdown.clone()));
    if let Some(l) = health_listener {
        let refusals = metrics::handles().connection_refusals;
        let stop = shutdown.clone().cancelled_owned();
        let probes = dmar_auth::serve_health_only(l, health_service.clone(), AcceptConfig::default(), refusals, stop);
        agent.inner.tasks.spawn(probes);
    }
    let result = match listeners.control {
        Some(l) => serve_control(&agent, l, health_service, &shutdown).await,
        None => {
            shutdown.cancelled().await;
            Ok(())
        }
    };
    shutdown.cancel();
    agent.stopped().await;
    tracing::info!("dmar-agent stopped");
    result
}

/// Keeps `dmar.v1.AgentControl` SERVING in `health` while the ATS link is bound: ready to
/// run workloads.
async fn report_link(agent: Agent, health: HealthReporter, stop: CancellationToken) {
    let mut state = agent.inner.link.clone();
    loop {
        if state.borrow_and_update().connected {
            health.set_serving::<AgentControlServer<control::AgentControlService>>().await;
        } else {
            health.set_not_serving::<AgentControlServer<control::AgentControlService>>().await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

/// Serves AgentControl, `health` and reflection on `l` until `shutdown`.
async fn serve_control(
    agent: &Agent,
    l: TcpListener,
    health_service: HealthServer<impl Health>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let security = &agent.config().security;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dmar_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AgentError::Reflection(e.to_string()))?;
    // Built before anything is served, so a TLS mistake stops the agent at once.
    let tls = match &security.tls {
        Some(tls) => {
            let config = tls.material().rustls_server_config(ClientAuth::Optional)?;
            let limiter = ConnectionLimiter::new(
                Arc::new(trust_policy(&security.trusted_clients)?),
                ConnectionLimiter::DEFAULT_UNLISTED_MAX,
            );
            Some((config, limiter))
        }
        None => None,
    };
    let refusals = Arc::new(Refusals::new(&metrics::handles()));
    let gate = ControlGate::new(security, refusals.clone());
    let service = control::AgentControlService::new(agent.clone(), refusals);
    // Health stays outside the gate: probes need no certificate.
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, gate.clone()))
        .add_service(InterceptedService::new(AgentControlServer::new(service), gate));
    tracing::info!(addr = ?l.local_addr().ok(), security = %security, "agent control serving");
    match tls {
        Some((config, limiter)) => {
            // dmar-auth's acceptor: handshakes off the accept loop, bounded, TCP_NODELAY,
            // each request carrying its peer's verified identity.
            let refusals = metrics::handles().connection_refusals;
            let incoming = dmar_auth::incoming_with(l, config, Some(limiter), AcceptConfig::default(), refusals);
            router.serve_with_incoming_shutdown(incoming, shutdown.cancelled()).await?;
        }
        None => {
            // Small answers must not wait for delayed ACKs (tonic sets TCP_NODELAY only on
            // sockets it accepts itself).
            let incoming = TcpListenerStream::new(l).map(|s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            });
            router.serve_with_incoming_shutdown(incoming, shutdown.cancelled()).await?;
        }
    }
    Ok(())
}

/// The trusted clients as a connection policy: each may hold the default number of
/// connections, and everyone else (untrusted identities and probes without a
/// certificate) shares one small bucket, so they can learn why they are refused but not
/// hold many sockets.
fn trust_policy(trusted: &[Identity]) -> Result<Policy, PolicyError> {
    let mut seen = std::collections::HashSet::new();
    let grant = Grant {
        roles: [Role::Operator].into_iter().collect(),
        requester_ids: RequesterIdSet::empty(),
        quotas: Quotas::DEFAULT,
    };
    Policy::new(trusted.iter().filter(|id| seen.insert(*id)).map(|id| (id.clone(), grant.clone())))
}
