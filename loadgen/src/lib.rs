//! dmar-loadgen: sets up scenarios through the server's Control service, drives device
//! agents through their AgentControl services, and reports how translation throughput and
//! latency scale with concurrent devices, against a no-device-TLB baseline measured in the
//! same run (unary Control.Translate calls, or link requests that bypass the device TLB).
//!
//! A library with a thin `main.rs`: [`execute`] runs what the command line ([`args`]) asks
//! for and returns an [`Outcome`] holding a [`report`], which [`Outcome::render`] formats
//! and [`plot`] draws. Those are the public surface; the rest is internal: `cluster` (the
//! server and agents under test), `embedded` (an in-process server and agents on
//! loopback, the default), `scenario` (domains and mappings), `run` (one workload across
//! agents), `sweep`, `scenarios` (invalidate, demand paging), `stalled` (the invalidate
//! scenario's stalled device), [`platform`] (the server's units, from `GetPlatform`) and
//! `output` (text, JSON, CSV).

pub mod args;
mod cluster;
mod embedded;
mod output;
pub mod platform;
pub mod plot;
pub mod report;
mod run;
mod scenario;
mod scenarios;
pub mod security;
mod stalled;
mod sweep;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dmar_proto::v1::GetAgentInfoRequest;

use crate::args::{Cli, Command, Format, InvalidateArgs};
use crate::cluster::Cluster;
use crate::embedded::Embedded;
use crate::platform::{Placement, PlatformView};
use crate::report::{DemandReport, InvalidateReport, Settings, StalledComparison, SweepReport};
use crate::scenarios::Stall;
use crate::security::ClientSecurity;

/// What a scenario produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A sweep (or baseline-only) report.
    Sweep(SweepReport),
    /// The invalidate scenario.
    Invalidate(InvalidateReport),
    /// The demand-paging scenario.
    DemandPaging(DemandReport),
    /// The invalidate scenario with a stalled device, embedded: one unit against two.
    StalledComparison(StalledComparison),
}

impl Outcome {
    /// Renders the outcome in `format`.
    pub fn render(&self, format: Format) -> anyhow::Result<String> {
        match (self, format) {
            (Outcome::Sweep(r), Format::Text) => Ok(output::text(r)),
            (Outcome::Sweep(r), Format::Json) => output::json(r),
            (Outcome::Sweep(r), Format::Csv) => Ok(output::csv(r)),
            (Outcome::Invalidate(r), Format::Text) => Ok(output::invalidate_text(r)),
            (Outcome::Invalidate(r), Format::Json) => output::json(r),
            (Outcome::Invalidate(r), Format::Csv) => Ok(output::invalidate_csv(r)),
            (Outcome::DemandPaging(r), Format::Text) => Ok(output::demand_text(r)),
            (Outcome::DemandPaging(r), Format::Json) => output::json(r),
            (Outcome::DemandPaging(r), Format::Csv) => Ok(output::demand_csv(r)),
            (Outcome::StalledComparison(r), Format::Text) => Ok(output::comparison_text(r)),
            (Outcome::StalledComparison(r), Format::Json) => output::json(r),
            (Outcome::StalledComparison(r), Format::Csv) => Ok(output::comparison_csv(r)),
        }
    }
}

/// Waits until every agent's link to the server is up.
async fn wait_connected(cluster: &Cluster, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for a in &cluster.agents {
        loop {
            let info =
                a.client.clone().get_agent_info(GetAgentInfoRequest {}).await.context("GetAgentInfo")?.into_inner();
            if info.connected {
                break;
            }
            if Instant::now() >= deadline {
                bail!("agent {} has no link to the server after {timeout:?}", a.endpoint);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Where a run's system comes from.
enum Target {
    /// Started in process, on this platform (`None`: one unit for every device).
    Embedded(Option<dmar_vtd::platform::PlatformSpec>),
    /// The server and agents the command line names.
    Remote,
}

/// Runs what `cli` asks for: embedded when neither a server nor agents are given.
pub async fn execute(cli: &Cli) -> anyhow::Result<Outcome> {
    let c = &cli.common;
    if !(0.0..=1.0).contains(&c.write_fraction) {
        bail!("write fraction {} is outside 0..=1", c.write_fraction);
    }
    if !(c.rate >= 0.0 && c.rate.is_finite()) {
        bail!("rate {} must be zero (closed loop) or positive", c.rate);
    }
    let embedded = c.server.is_none() && c.agents.is_empty();
    if c.tls && !embedded {
        bail!("--tls runs the embedded system with tls; against --server use --tls-dir DIR");
    }
    if c.platform.is_some() && !embedded {
        bail!(
            "--platform describes the embedded server's units; a remote server runs on its own (dmar-server --platform)"
        );
    }
    let stall = match &cli.command {
        Some(Command::Invalidate(i)) if i.stalled_device => Some(i),
        _ => None,
    };
    if let Some(i) = stall {
        match (&c.tls_dir, &i.stalled_device_identity) {
            (Some(_), None) => bail!(
                "--stalled-device over --tls-dir needs --stalled-device-identity NAME: a certificate in that folder with the device role (the operator's is not a device)"
            ),
            (None, Some(_)) => bail!("--stalled-device-identity names a certificate in --tls-dir, which is not given"),
            _ => {}
        }
    }
    security::check_common(c)?;
    if c.tls || c.tls_dir.is_some() {
        dmar_auth::tls::install_default_crypto_provider();
    }
    if let Some(i) = stall
        && embedded
        && c.platform.is_none()
    {
        // The comparison: the same run on one unit and on two.
        let t = i.device_tlb_timeout;
        let one = platform::one_unit(embedded::MEMORY_SIZE, t);
        let two = platform::two_units(embedded::MEMORY_SIZE, t);
        let one = run_on(cli, Target::Embedded(Some(one)), Placement::SameUnit, Some(t)).await?;
        let two = run_on(cli, Target::Embedded(Some(two)), Placement::OtherUnit, Some(t)).await?;
        let (Outcome::Invalidate(one), Outcome::Invalidate(two)) = (one, two) else {
            bail!("the invalidate scenario produced another report");
        };
        return Ok(Outcome::StalledComparison(StalledComparison::new(t.as_secs_f64() * 1e3, one, two)));
    }
    let target = if embedded {
        let spec = match &c.platform {
            // The error names the file.
            Some(path) => Some(dmar_server::platform_file::load(path)?),
            None => None,
        };
        Target::Embedded(spec)
    } else {
        Target::Remote
    };
    run_on(cli, target, Placement::OtherUnit, None).await
}

/// Runs the scenario once on `target`; a stalled device (if asked for) goes behind the
/// tenants' unit or another one as `placement` says, and `timeout` is the units'
/// device-TLB invalidation time-out when the load generator chose it.
async fn run_on(cli: &Cli, target: Target, placement: Placement, timeout: Option<Duration>) -> anyhow::Result<Outcome> {
    let c = &cli.common;
    let (system, server, agents, security, device_security) = match target {
        Target::Embedded(spec) => {
            let largest = match &cli.command {
                Some(Command::Invalidate(i)) => i.devices,
                _ => c.steps.0.last().copied().unwrap_or(1),
            };
            let per_agent = largest.div_ceil(c.embedded_agents as usize).max(1) as u32;
            let pri = matches!(cli.command, Some(Command::DemandPaging));
            let e = Embedded::start(c.embedded_agents, per_agent, c.atc_capacity, pri, c.tls, spec).await?;
            let (s, a) = (e.server.clone(), e.agents.clone());
            let (security, device_security) = (e.security.clone(), e.device_security.clone());
            (Some(e), s, a, security, device_security)
        }
        Target::Remote => {
            let Some(server) = c.server.clone() else { bail!("--agents needs --server too") };
            if c.agents.is_empty() {
                bail!("--server needs --agents too (agent control endpoints)");
            }
            let from_dir = |dir: &std::path::Path, name: &str| {
                ClientSecurity::from_dir(dir, name, &c.server_name, &c.agent_server_name)
                    .with_context(|| format!("tls files in {}", dir.display()))
            };
            let (security, device_security) = match &c.tls_dir {
                Some(dir) => {
                    let device = match &cli.command {
                        Some(Command::Invalidate(InvalidateArgs { stalled_device_identity: Some(name), .. })) => {
                            from_dir(dir, name)?
                        }
                        _ => ClientSecurity::Plaintext,
                    };
                    (from_dir(dir, &c.tls_name)?, device)
                }
                None => (ClientSecurity::Plaintext, ClientSecurity::Plaintext),
            };
            (None, server, c.agents.clone(), security, device_security)
        }
    };
    let embedded = system.is_some();
    let result = async {
        let cluster = Cluster::connect(&security, &server, &agents).await?;
        wait_connected(&cluster, Duration::from_secs(20)).await?;
        let view = PlatformView::from_wire(&cluster.platform().await?);
        let mut summary = view.summary(&cluster.device_sids());
        let before = cluster.stats().await?;
        let settings = Settings {
            embedded,
            tls: security.is_tls(),
            agents: cluster.agents.len(),
            duration_s: c.duration.as_secs_f64(),
            warmup_s: c.warmup.as_secs_f64(),
            concurrency: c.concurrency,
            rate_per_device: c.rate,
            footprint: c.footprint,
            page_mix: format!("{:?}", c.page_mix).to_lowercase(),
            pattern: format!("{:?}", c.pattern).to_lowercase(),
            write_fraction: c.write_fraction,
            translate_only: !c.dma,
            baseline: match &cli.command {
                None | Some(Command::Sweep) if c.no_baseline => None,
                _ => Some(c.baseline),
            },
            check_translated: c.check_translated,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            platform: None,
        };
        let mut outcome = match &cli.command {
            None | Some(Command::Sweep) => {
                let mut r = sweep::sweep(&cluster, c, true, !c.no_baseline).await?;
                r.settings = settings;
                Outcome::Sweep(r)
            }
            Some(Command::Baseline) => {
                let mut r = sweep::sweep(&cluster, c, false, true).await?;
                for s in &mut r.steps {
                    if let Some(b) = s.baseline.take() {
                        s.ats = b;
                    }
                }
                r.settings = settings;
                Outcome::Sweep(r)
            }
            Some(Command::Invalidate(i)) => {
                let stall = i.stalled_device.then(|| Stall {
                    link_security: device_security.clone(),
                    server: server.clone(),
                    placement,
                    timeout,
                });
                Outcome::Invalidate(scenarios::invalidate(&cluster, c, i.devices, &view, stall.as_ref()).await?)
            }
            Some(Command::DemandPaging) => Outcome::DemandPaging(scenarios::demand_paging(&cluster, c).await?),
        };
        summary.count(&before, &cluster.stats().await?);
        match &mut outcome {
            Outcome::Sweep(r) => r.settings.platform = Some(summary),
            Outcome::Invalidate(r) => r.platform = Some(summary),
            Outcome::DemandPaging(r) => r.platform = Some(summary),
            Outcome::StalledComparison(_) => {}
        }
        Ok(outcome)
    }
    .await;
    if let Some(e) = system {
        e.stop().await;
    }
    result
}
