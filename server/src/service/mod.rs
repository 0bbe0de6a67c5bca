//! The network faces of dmar-server: the Control service (software side), the ATS link
//! service (PCIe side), health, reflection and Prometheus metrics.
//!
//! No VT-d logic lives here: each call decodes ([`wire`]), calls the driver or the unit,
//! encodes, and maps errors ([`status`]). This module owns the process-level wiring:
//! building the unit and its driver from a [`ServerConfig`], starting the background
//! tasks ([`background`]: the ticker that lets time pass for the unit and runs due
//! deferred flushes, the page request pump, the fault pump), and graceful shutdown.
//!
//! Security ([`auth`]): with mutual TLS every request but health passes the one
//! authorisation table before a service sees it, and the link and domain calls consult the
//! per-identity ledger; without TLS every caller holds every role.
//!
//! Threads: a driver call can wait for devices (up to the device-TLB invalidation
//! time-out), and the devices' answers arrive over links that the runtime's workers
//! serve. So every driver call made while serving runs on the blocking pool
//! ([`blocking`]), never on a runtime worker; unit calls (translation, DMA, registers,
//! completions) never wait and run in place.

mod auth;
mod background;
mod control;
mod events;
mod link;
pub mod metrics;
mod page_groups;
mod platform;
mod status;
mod wire;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dmar_proto::v1::ats_link_server::AtsLinkServer;
use dmar_proto::v1::control_server::ControlServer;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use self::auth::{Access, Gate};
pub use self::auth::{Security, Transport};
use self::events::{EventHub, UnitHub};
use self::metrics::Metrics;
use self::platform::Units;
use dmar_vtd::driver::{Driver, DriverConfig, DriverError, FlushPolicy};
use dmar_vtd::ids::UnitId;
use dmar_vtd::platform::{PlatformError, PlatformSpec, Routing, UnitDriver};
use dmar_vtd::unit::memory::{DEFAULT_MEMORY_SIZE, InvalidMemorySize};
use dmar_vtd::unit::{HostMemory, Unit, UnitConfig, UnitStats};

/// How the server is built.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Emulated host memory size in bytes (a multiple of 2 MiB).
    pub memory_size: u64,
    /// Unit cache geometries, stale detection and the device-TLB invalidation time-out.
    pub unit: UnitConfig,
    /// Flush policy for unmaps that do not choose one.
    pub default_flush: FlushPolicy,
    /// The deferred policy's bounds (used when a call asks for deferred flushing).
    pub deferred: FlushPolicy,
    /// Plaintext (the default: every caller holds every role) or mutual TLS with a policy.
    pub security: Security,
    /// The units and their scopes (`--platform`). `None`: one unit for every device, with
    /// `memory_size` and `unit`, driven by the built-in driver. When set, its own memory
    /// size and unit configurations apply, and `memory_size` and `unit` are ignored.
    pub platform: Option<PlatformSpec>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            memory_size: DEFAULT_MEMORY_SIZE,
            unit: UnitConfig::default(),
            default_flush: FlushPolicy::Strict,
            deferred: FlushPolicy::Deferred { max_entries: 256, max_delay: Duration::from_millis(10) },
            security: Security::default(),
            platform: None,
        }
    }
}

/// The sockets the server serves on.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (Control, ATS link, health, reflection).
    pub grpc: TcpListener,
    /// Prometheus `/metrics`, if wanted.
    pub metrics: Option<TcpListener>,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The memory size is unusable.
    #[error(transparent)]
    Memory(#[from] InvalidMemorySize),
    /// The platform description breaks a rule.
    #[error("platform: {0}")]
    Platform(#[from] PlatformError),
    /// The driver could not initialise the unit.
    #[error("driver initialisation failed: {0}")]
    Driver(#[from] DriverError),
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The TLS configuration could not be built from the certificate and key.
    #[error("tls: {0}")]
    Tls(#[from] dmar_auth::TlsError),
    /// Reflection could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Shared by every service and task of one server.
#[derive(Debug)]
pub(crate) struct State {
    /// The units, their routing, leases and DMAR table.
    pub(crate) units: Units,
    /// The built-in driver, over the built-in units (`None` when every unit is
    /// client-driven).
    pub(crate) driver: Option<Arc<Driver>>,
    pub(crate) hub: Arc<EventHub>,
    pub(crate) metrics: Metrics,
    pub(crate) default_flush: FlushPolicy,
    pub(crate) deferred: FlushPolicy,
    pub(crate) links: AtomicU64,
    pub(crate) bound_functions: AtomicU64,
    pub(crate) link_translations: AtomicU64,
    pub(crate) access: Arc<Access>,
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
}

impl State {
    /// The built-in driver, for a call that needs it.
    pub(crate) fn driver(&self) -> Result<Arc<Driver>, Status> {
        self.driver
            .clone()
            .ok_or_else(|| Status::failed_precondition("no unit of this platform is driven by the built-in driver"))
    }

    /// Every unit's counters added up.
    pub(crate) fn total_stats(&self) -> UnitStats {
        let mut total = UnitStats::default();
        for slot in self.units.iter() {
            total += slot.unit.stats();
        }
        total
    }
}

/// Builds the platform's units over one memory, each delivering its events to `hub` under
/// its own id, and the built-in driver over the built-in ones (Linux `init_dmars`, one
/// `intel_iommu` per DRHD).
fn build_platform(
    spec: PlatformSpec,
    hub: &Arc<EventHub>,
    flush: FlushPolicy,
) -> Result<(Units, Option<Arc<Driver>>), ServeError> {
    spec.validate()?;
    let memory = Arc::new(HostMemory::new(spec.memory_size)?);
    let units: Vec<Arc<Unit>> = spec
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let events = Arc::new(UnitHub::new(UnitId(i as u16), u.driver == UnitDriver::BuiltIn, hub.clone()));
            Arc::new(Unit::builder(u.config, memory.clone()).events(events).build())
        })
        .collect();
    let builtin: Vec<(UnitId, Arc<Unit>)> = spec
        .units
        .iter()
        .zip(&units)
        .enumerate()
        .filter(|(_, (u, _))| u.driver == UnitDriver::BuiltIn)
        .map(|(i, (_, unit))| (UnitId(i as u16), unit.clone()))
        .collect();
    let driver = if builtin.is_empty() {
        None
    } else {
        let region = spec.builtin_region;
        let config =
            DriverConfig { table_region: (region.base, region.size), ..DriverConfig::for_memory(spec.memory_size) }
                .with_flush(flush);
        // Before any link is open no device can be waited for: these calls run in place.
        let driver = Arc::new(Driver::for_units(builtin, Routing::new(&spec), config)?);
        driver.enable_interrupt_remapping()?;
        driver.enable_page_requests(events::PAGE_REQUEST_VECTOR)?;
        driver.enable_fault_events(events::FAULT_VECTOR)?;
        Some(driver)
    };
    Ok((Units::new(spec, memory, units), driver))
}

/// The process-wide Prometheus recorder, installed on first use (several servers in one
/// process, as in tests, share it).
fn prometheus() -> Result<PrometheusHandle, ServeError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE.get_or_init(|| metrics::install().map_err(|e| e.to_string())).clone().map_err(ServeError::Metrics)
}

/// Runs a driver call on the blocking pool and returns its result (see the module doc).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(status::join)?
}

/// Serves until `shutdown` is cancelled, then drains: links are closed, background tasks
/// stop, and the call returns.
pub async fn serve(config: ServerConfig, listeners: Listeners, shutdown: CancellationToken) -> Result<(), ServeError> {
    serve_with_health(config, listeners, None, shutdown).await
}

/// [`serve`], plus a plaintext port `health` answering only `grpc.health.v1`, for probes
/// that cannot present a certificate (the gRPC port answers health without one too, but
/// over TLS).
pub async fn serve_with_health(
    config: ServerConfig,
    listeners: Listeners,
    health_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let handle = match listeners.metrics {
        Some(_) => Some(prometheus()?),
        None => None,
    };
    let metrics = Metrics::new();
    let access = Arc::new(Access::new(&config.security));
    let page_requests = Arc::new(Notify::new());
    let faults = Arc::new(Notify::new());
    let hub = Arc::new(EventHub::new(metrics.clone(), page_requests.clone(), faults.clone()));
    let spec = config.platform.clone().unwrap_or_else(|| PlatformSpec::single(config.memory_size, config.unit));
    let (units, driver) = build_platform(spec, &hub, config.default_flush)?;
    tracing::info!(
        units = units.iter().count(),
        builtin = units.iter().filter(|u| u.is_builtin()).count(),
        memory = units.spec.memory_size,
        "platform built"
    );
    let tasks = TaskTracker::new();
    let state = Arc::new(State {
        units,
        driver,
        hub,
        metrics,
        default_flush: config.default_flush,
        deferred: config.deferred,
        links: AtomicU64::new(0),
        bound_functions: AtomicU64::new(0),
        link_translations: AtomicU64::new(0),
        access: access.clone(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    });

    tasks.spawn(background::ticker(state.clone(), background::tick_period(&[config.default_flush, config.deferred])));
    tasks.spawn(background::page_request_pump(state.clone(), page_requests));
    tasks.spawn(background::fault_pump(state.clone(), faults));
    if let (Some(listener), Some(handle)) = (listeners.metrics, handle) {
        let s = state.clone();
        let render: dmar_process::Render = Arc::new(move || {
            s.metrics.refresh(&s.total_stats());
            handle.render()
        });
        tasks.spawn(dmar_process::serve_metrics(listener, "dmar-server", render, shutdown.clone()));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dmar_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dmar_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    health.set_serving::<ControlServer<control::ControlService>>().await;
    health.set_serving::<AtsLinkServer<link::LinkService>>().await;
    let accept = config.security.accept;
    if let Some(listener) = health_listener {
        let refusals = dmar_auth::ConnectionRefusals::global();
        let stop = shutdown.clone().cancelled_owned();
        tasks.spawn(dmar_auth::serve_health_only(listener, health_service.clone(), accept, refusals, stop));
    }
    let addr = listeners.grpc.local_addr().ok();

    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(Gate::new(reflection_v1, access.clone()))
        .add_service(Gate::new(reflection_v1alpha, access.clone()))
        .add_service(Gate::new(
            ControlServer::new(control::ControlService { state: state.clone() })
                .max_decoding_message_size(wire::MAX_CONTROL_MESSAGE_BYTES)
                .max_encoding_message_size(wire::MAX_CONTROL_MESSAGE_BYTES),
            access.clone(),
        ))
        .add_service(Gate::new(
            // Encode and decode limits match, and match what a default client accepts.
            AtsLinkServer::new(link::LinkService { state: state.clone() })
                .max_decoding_message_size(wire::MAX_LINK_MESSAGE_BYTES)
                .max_encoding_message_size(wire::MAX_LINK_MESSAGE_BYTES),
            access,
        ));
    let result = match &config.security.transport {
        Transport::Plaintext => {
            if addr.is_some_and(|a| a.ip().is_loopback()) {
                tracing::info!(?addr, "dmar-server serving plaintext on loopback: every caller holds every role");
            } else {
                tracing::warn!(?addr, "dmar-server serving plaintext: every caller holds every role (insecure mode)");
            }
            router
                .serve_with_incoming_shutdown(dmar_auth::plaintext(listeners.grpc, accept), shutdown.cancelled())
                .await
        }
        Transport::MutualTls { material, policy } => {
            let tls = material.rustls_server_config(dmar_auth::ClientAuth::Optional)?;
            let limiter =
                dmar_auth::ConnectionLimiter::new(policy.clone(), dmar_auth::ConnectionLimiter::DEFAULT_UNLISTED_MAX);
            tracing::info!(?addr, identities = policy.len(), "dmar-server serving mutual TLS");
            router
                .serve_with_incoming_shutdown(
                    dmar_auth::incoming(listeners.grpc, tls, Some(limiter), accept),
                    shutdown.cancelled(),
                )
                .await
        }
    };
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within 5 s");
    }
    tracing::info!("dmar-server stopped");
    result.map_err(ServeError::from)
}
