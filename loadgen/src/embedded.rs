//! Embedded mode: a dmar-server and dmar-agents started in this process on loopback
//! (127.0.0.1:0), so that `dmar-loadgen` with no arguments measures the whole system
//! with nothing else running. They are driven over real gRPC exactly like remote ones.
//!
//! Plaintext by default (loopback only, nothing to set up). With `tls` every link and
//! control channel uses mutual TLS from a development CA made in memory ([`DevPki`]): the
//! server with its policy, each agent with its own certificate and requester-id range, the
//! load generator as the operator. Same sweep, so the two runs show what TLS costs. The
//! development CA also issues a device identity ([`STALLED_DEVICE`]) for the function the
//! load generator binds itself in the invalidate scenario's `--stalled-device` mode: every
//! requester id outside the agents' buses.
//!
//! The server runs on the platform it is given (`--platform`, or the comparison's
//! platforms), else on today's default: one unit for every device.

use std::time::Duration;

use anyhow::Context as _;
use dmar_agent::{AgentConfig, AgentSecurity, AgentTls, FunctionConfig, Identity, Listeners as AgentListeners};
use dmar_auth::{AgentSpec, DevPki, DevPkiSpec, Policy, RequesterIdRange, RequesterIdSet, Role};
use dmar_server::service::{Listeners, Security, ServerConfig};
use dmar_vtd::SourceId;
use dmar_vtd::platform::PlatformSpec;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::security::{ClientSecurity, ClientTls};

/// The embedded server's certificate name.
const SERVER_NAME: &str = "dmar-server";
/// The SAN every embedded agent certificate carries (as under compose).
const AGENT_SAN: &str = "agent";
/// The load generator's certificate name (the operator role).
const OPERATOR: &str = "operator";
/// The device identity of the function the load generator binds itself (the stalled
/// device of the invalidate scenario).
const STALLED_DEVICE: &str = "loadgen-stalled-device";
/// Host memory of the embedded server when no platform says otherwise.
pub(crate) const MEMORY_SIZE: u64 = 2 << 30;
/// The most embedded agents (`--embedded-agents`): their buses are 0x10..=0x1f.
const MAX_AGENTS: u8 = 16;

/// A running embedded system.
#[derive(Debug)]
pub(crate) struct Embedded {
    /// Server gRPC address.
    pub(crate) server: String,
    /// Agent control addresses.
    pub(crate) agents: Vec<String>,
    /// How the load generator reaches them.
    pub(crate) security: ClientSecurity,
    /// How a function the load generator binds itself opens its ATS link: a device
    /// identity under TLS.
    pub(crate) device_security: ClientSecurity,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Requester id of function `f` of agent `a`: bus 0x10 + a, device f, function 0.
pub(crate) fn embedded_sid(agent: u32, function: u32) -> SourceId {
    SourceId::new(0x10 + agent as u8, (function % 32) as u8, 0)
}

/// Agent `a`'s name, which is also its certificate's identity under TLS.
fn agent_name(agent: u32) -> String {
    format!("embedded-agent-{agent}")
}

/// A development CA for `agents` agents: each may bind its own bus only (bus 0x10 + a).
fn dev_pki(agents: u32) -> anyhow::Result<DevPki> {
    let id = |s: &str| Identity::new(s).with_context(|| format!("certificate name {s:?}"));
    let mut agents = (0..agents)
        .map(|a| {
            let bus = RequesterIdRange::new(embedded_sid(a, 0), SourceId::new(0x10 + a as u8, 0x1f, 7))?;
            Ok(AgentSpec { name: id(&agent_name(a))?, requester_ids: RequesterIdSet::from_ranges([bus]) })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The stalled device's identity: every requester id off the agents' buses, so that
    // whichever id the scenario picks from the platform can be bound.
    let below = RequesterIdRange::new(SourceId(0), SourceId::new(0x0f, 0x1f, 7))?;
    let above = RequesterIdRange::new(SourceId::new(0x10 + MAX_AGENTS, 0, 0), SourceId(u16::MAX))?;
    agents.push(AgentSpec { name: id(STALLED_DEVICE)?, requester_ids: RequesterIdSet::from_ranges([below, above]) });
    let spec = DevPkiSpec {
        server: id(SERVER_NAME)?,
        server_sans: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        agents,
        agent_sans: vec![AGENT_SAN.to_owned()],
        operators: vec![id(OPERATOR)?],
        observers: Vec::new(),
        validity_days: 1,
    };
    let mut pki = DevPki::generate(&spec).context("embedded development CA")?;
    // The baseline's unary Control.Translate goes from each agent under its own
    // certificate, and the server's table reserves Translate for operators: the embedded
    // agents hold the operator role too, so that the sweep can measure the baseline over
    // TLS with the default `--baseline unary`. (The compose deployment does not grant it
    // and runs `--baseline link`, which the device role suffices for; docs/DEPLOY.md.)
    // The stalled device stays a device only.
    let grants = pki.policy.iter().map(|(name, grant)| {
        let mut grant = grant.clone();
        if grant.has(Role::Device) && name.as_str() != STALLED_DEVICE {
            grant.roles.insert(Role::Operator);
        }
        (name.clone(), grant)
    });
    pki.policy = Policy::new(grants.collect::<Vec<_>>()).context("embedded policy")?;
    Ok(pki)
}

impl Embedded {
    /// Starts a server on `platform` (`None`: one unit for every device) and `agents`
    /// agents with `functions_per_agent` ATS functions each. `pri` gives every function a
    /// page request capacity (demand paging needs it; other scenarios leave it off so that
    /// a not-present translation faults at once).
    pub(crate) async fn start(
        agents: u32,
        functions_per_agent: u32,
        atc_capacity: usize,
        pri: bool,
        tls: bool,
        platform: Option<PlatformSpec>,
    ) -> anyhow::Result<Embedded> {
        anyhow::ensure!(agents <= u32::from(MAX_AGENTS), "at most {MAX_AGENTS} embedded agents");
        let pki = if tls { Some(dev_pki(agents)?) } else { None };
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let grpc = TcpListener::bind("127.0.0.1:0").await.context("bind the embedded server")?;
        let scheme = if tls { "https" } else { "http" };
        let server = format!("{scheme}://{}", grpc.local_addr()?);
        let s = shutdown.clone();
        let mut config = ServerConfig { memory_size: MEMORY_SIZE, platform, ..ServerConfig::default() };
        if let Some(pki) = &pki {
            secure_server(&mut config, pki)?;
        }
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dmar_server::service::serve(config, Listeners { grpc, metrics: None }, s).await {
                tracing::error!(error = %e, "embedded server failed");
            }
        }));
        let mut agent_addrs = Vec::new();
        for a in 0..agents {
            let functions = (0..functions_per_agent)
                .map(|f| {
                    let mut fc = FunctionConfig::new(embedded_sid(a, f));
                    fc.atc_capacity = atc_capacity;
                    fc.page_request_capacity = if pri { 16 } else { 0 };
                    fc
                })
                .collect();
            let mut config = AgentConfig::new(server.clone(), functions);
            config.name = agent_name(a);
            if let Some(pki) = &pki {
                let material = pki.tls_material(&config.name)?;
                config.security = AgentSecurity::mutual_tls(AgentTls::new(material, SERVER_NAME)?);
            }
            let control = TcpListener::bind("127.0.0.1:0").await.context("bind an embedded agent")?;
            agent_addrs.push(control.local_addr()?.to_string());
            let s = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let listeners = AgentListeners { control: Some(control), metrics: None };
                if let Err(e) = dmar_agent::run(config, listeners, s).await {
                    tracing::error!(error = %e, "embedded agent failed");
                }
            }));
        }
        let client = |name: &str| -> anyhow::Result<ClientSecurity> {
            Ok(match &pki {
                Some(pki) => ClientSecurity::MutualTls(std::sync::Arc::new(ClientTls {
                    material: pki.tls_material(name)?,
                    server_name: SERVER_NAME.to_owned(),
                    agent_server_name: AGENT_SAN.to_owned(),
                })),
                None => ClientSecurity::Plaintext,
            })
        };
        let (security, device_security) = (client(OPERATOR)?, client(STALLED_DEVICE)?);
        Ok(Embedded { server, agents: agent_addrs, security, device_security, shutdown, tasks })
    }

    /// Stops everything and waits (bounded) for it to finish.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// The embedded server's mutual TLS: its certificate and the development policy.
fn secure_server(config: &mut ServerConfig, pki: &DevPki) -> anyhow::Result<()> {
    config.security = Security::mutual_tls(pki.tls_material(SERVER_NAME)?, pki.policy.clone());
    Ok(())
}
