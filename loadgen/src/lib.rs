//! dmar-loadgen: sets up scenarios through the server's Control service, drives device
//! agents through their AgentControl services, and reports how translation throughput and
//! latency scale with concurrent devices, against a no-device-TLB baseline measured in the
//! same run.
//!
//! Layout: [`args`] (the command line), [`cluster`] (the server and agents under test),
//! [`embedded`] (an in-process server and agents on loopback, the default),
//! [`scenario`] (domains and mappings), [`run`] (one workload across agents), [`sweep`],
//! [`scenarios`] (invalidate, demand paging), [`report`], [`output`] and [`plot`].

pub mod args;
pub mod cluster;
pub mod embedded;
pub mod output;
pub mod plot;
pub mod report;
pub mod run;
pub mod scenario;
pub mod scenarios;
pub mod sweep;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dmar_proto::v1::GetAgentInfoRequest;

use crate::args::{Cli, Command, Format};
use crate::cluster::Cluster;
use crate::embedded::Embedded;
use crate::report::{Settings, SweepReport};

/// What a scenario produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A sweep (or baseline-only) report.
    Sweep(SweepReport),
    /// The invalidate scenario.
    Invalidate(scenarios::InvalidateReport),
    /// The demand-paging scenario.
    DemandPaging(scenarios::DemandReport),
}

impl Outcome {
    /// Renders the outcome in `format`.
    pub fn render(&self, format: Format) -> anyhow::Result<String> {
        match (self, format) {
            (Outcome::Sweep(r), Format::Text) => Ok(output::text(r)),
            (Outcome::Sweep(r), Format::Json) => output::json(r),
            (Outcome::Sweep(r), Format::Csv) => Ok(output::csv(r)),
            (Outcome::Invalidate(r), Format::Csv) => Ok(invalidate_csv(r)),
            (Outcome::Invalidate(r), _) if format == Format::Json => Ok(serde_json::to_string_pretty(r)? + "\n"),
            (Outcome::Invalidate(r), _) => Ok(invalidate_text(r)),
            (Outcome::DemandPaging(r), Format::Text) => Ok(format!(
                "demand paging: {} pages mapped on request; service p50 {} ns p99 {} ns; {} accesses, {} page requests, {} failed, {} faults\n",
                r.pages_mapped,
                r.service_latency.p50_ns,
                r.service_latency.p99_ns,
                r.devices.counts.accesses,
                r.devices.counts.page_requests,
                r.devices.counts.page_request_failures,
                r.devices.counts.faults
            )),
            (Outcome::DemandPaging(r), Format::Json) => Ok(serde_json::to_string_pretty(r)? + "\n"),
            (Outcome::DemandPaging(r), Format::Csv) => Ok(format!(
                "pages_mapped,service_p50_ns,service_p99_ns,accesses,page_requests,page_request_failures,faults\n{},{},{},{},{},{},{}\n",
                r.pages_mapped,
                r.service_latency.p50_ns,
                r.service_latency.p99_ns,
                r.devices.counts.accesses,
                r.devices.counts.page_requests,
                r.devices.counts.page_request_failures,
                r.devices.counts.faults
            )),
        }
    }
}

fn invalidate_text(r: &scenarios::InvalidateReport) -> String {
    use output::ns;
    let mut out = format!(
        "{:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>8} {:>10} {:>7}\n",
        "policy", "unmaps/s", "p50", "p90", "p99", "p99.9", "max", "device tr/s", "checked", "stale use", "re-asks"
    );
    for p in &r.phases {
        let l = &p.unmap_latency;
        let (checked, stale) = if p.policy == "strict" {
            (p.checked.to_string(), p.use_after_invalidation.to_string())
        } else {
            ("-".to_owned(), "-".to_owned())
        };
        out += &format!(
            "{:<9} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12.0} {:>8} {:>10} {:>7}\n",
            p.policy,
            p.unmaps_per_s,
            ns(l.p50_ns),
            ns(l.p90_ns),
            ns(l.p99_ns),
            ns(l.p999_ns),
            ns(l.max_ns),
            p.devices.device_translations_per_s,
            checked,
            stale,
            p.stale_completions
        );
    }
    out
}

fn invalidate_csv(r: &scenarios::InvalidateReport) -> String {
    let mut out = String::from(
        "policy,unmaps,unmaps_per_s,p50_ns,p90_ns,p99_ns,p999_ns,max_ns,device_translations_per_s,checked,use_after_invalidation,stale_completions\n",
    );
    for p in &r.phases {
        let l = &p.unmap_latency;
        out += &format!(
            "{},{},{:.1},{},{},{},{},{},{:.1},{},{},{}\n",
            p.policy,
            p.unmaps,
            p.unmaps_per_s,
            l.p50_ns,
            l.p90_ns,
            l.p99_ns,
            l.p999_ns,
            l.max_ns,
            p.devices.device_translations_per_s,
            p.checked,
            p.use_after_invalidation,
            p.stale_completions
        );
    }
    out
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
    let (system, server, agents) = if embedded {
        let largest = match &cli.command {
            Some(Command::Invalidate(i)) => i.devices,
            _ => c.steps.0.last().copied().unwrap_or(1),
        };
        let per_agent = largest.div_ceil(c.embedded_agents as usize).max(1) as u32;
        let pri = matches!(cli.command, Some(Command::DemandPaging));
        let e = Embedded::start(c.embedded_agents, per_agent, c.atc_capacity, pri).await?;
        let (s, a) = (e.server.clone(), e.agents.clone());
        (Some(e), s, a)
    } else {
        let Some(server) = c.server.clone() else { bail!("--agents needs --server too") };
        if c.agents.is_empty() {
            bail!("--server needs --agents too (agent control endpoints)");
        }
        (None, server, c.agents.clone())
    };
    let result = async {
        let cluster = Cluster::connect(&server, &agents).await?;
        wait_connected(&cluster, Duration::from_secs(20)).await?;
        let settings = Settings {
            embedded,
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
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
        };
        match &cli.command {
            None | Some(Command::Sweep) => {
                let mut r = sweep::sweep(&cluster, c, true, !c.no_baseline).await?;
                r.settings = settings;
                Ok(Outcome::Sweep(r))
            }
            Some(Command::Baseline) => {
                let mut r = sweep::sweep(&cluster, c, false, true).await?;
                for s in &mut r.steps {
                    if let Some(b) = s.baseline.take() {
                        s.ats = b;
                    }
                }
                r.settings = settings;
                Ok(Outcome::Sweep(r))
            }
            Some(Command::Invalidate(i)) => {
                Ok(Outcome::Invalidate(scenarios::invalidate(&cluster, c, i.devices).await?))
            }
            Some(Command::DemandPaging) => Ok(Outcome::DemandPaging(scenarios::demand_paging(&cluster, c).await?)),
        }
    }
    .await;
    if let Some(e) = system {
        e.stop().await;
    }
    result
}
