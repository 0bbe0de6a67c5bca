//! The invalidation and demand-paging scenarios.
//!
//! - Invalidate: devices run the ATS workload while the load generator unmaps and remaps
//!   pages of their footprints, first with strict then with deferred flushing. It reports
//!   unmaps/s and unmap latency percentiles, and the devices' own check that no access
//!   used a translation after its invalidation completed. With a stalled device
//!   (`crate::stalled`) a function of the load generator's own, behind another unit
//!   (or, for comparison, the same one), keeps an invalidation of that unit waiting for
//!   the device-TLB time-out throughout, and the report counts the unmaps that waited
//!   behind it.
//! - Demand paging: devices start with nothing mapped; every access faults into a page
//!   request, which the load generator answers by mapping the page and responding
//!   (PRI), after which the device retries.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dmar_proto::v1::*;
use hdrhistogram::Histogram;
use tokio_stream::StreamExt;

use crate::args::Common;
use crate::cluster::Cluster;
use crate::platform::{Placement, PlatformView, plan_stall};
use crate::report::{DemandReport, InvalidatePhase, InvalidateReport, Latency, StalledReport};
use crate::run::{run, workload};
use crate::scenario::{self, HPA_BASE, IOVA_BASE};
use crate::security::{ClientSecurity, Peer};
use crate::stalled::StalledDevice;
use dmar_vtd::{PAGE_SIZE, SourceId};

/// Unmapped pages are mapped again this many unmaps later.
pub(crate) const REMAP_LAG: usize = 512;

async fn remap(
    control: &mut dmar_proto::v1::control_client::ControlClient<tonic::transport::Channel>,
    domain: u32,
    iova: u64,
) -> anyhow::Result<()> {
    let perms = Some(Permissions { read: true, write: true });
    let hpa = HPA_BASE + PAGE_SIZE + (iova - IOVA_BASE);
    control
        .map(MapRequest {
            domain_id: domain,
            ranges: vec![MapRange { iova, hpa, length: PAGE_SIZE, permissions: perms }],
        })
        .await
        .context("Map")?;
    Ok(())
}

/// One strict unmap in this many is followed by a check through the owning device.
pub(crate) const CHECK_EVERY: u64 = 8;

/// The stalled device of an invalidate run (`--stalled-device`).
#[derive(Debug, Clone)]
pub(crate) struct Stall {
    /// How its link reaches the server: a device identity under TLS.
    pub(crate) link_security: ClientSecurity,
    /// The server's address.
    pub(crate) server: String,
    /// Behind the tenants' unit or another one.
    pub(crate) placement: Placement,
    /// The units' device-TLB invalidation time-out, when the load generator set it
    /// (embedded comparison).
    pub(crate) timeout: Option<Duration>,
}

/// Runs the invalidate scenario with `devices` devices, on `view`'s platform, with a
/// stalled device if `stall` says so.
pub(crate) async fn invalidate(
    cluster: &Cluster,
    common: &Common,
    devices: usize,
    view: &PlatformView,
    stall: Option<&Stall>,
) -> anyhow::Result<InvalidateReport> {
    let all = cluster.devices();
    if devices == 0 || all.len() < devices {
        bail!("the invalidate scenario needs {devices} devices but the agents host {} ATS functions", all.len());
    }
    let mut control = cluster.control.clone();
    let (chosen, mut stalled) = match stall {
        None => (all[..devices].to_vec(), None),
        Some(stall) => {
            let plan = plan_stall(view, &cluster.device_sids(), devices, stall.placement)?;
            let chosen: Vec<_> = plan.tenants.iter().map(|&i| all[i]).collect();
            let channel = stall
                .link_security
                .endpoint(&stall.server, Peer::Server)?
                .connect()
                .await
                .with_context(|| format!("cannot reach {} for the stalled device's link", stall.server))?;
            let device = StalledDevice::attach(channel, control.clone(), plan.sid).await?;
            let mut tenant_units: Vec<String> =
                chosen.iter().filter_map(|d| view.unit_of(SourceId(d.sid as u16))).map(|u| view.name(u)).collect();
            tenant_units.sort();
            tenant_units.dedup();
            let report = StalledReport {
                source_id: plan.sid.to_string(),
                unit: u32::from(plan.unit.0),
                unit_name: view.name(plan.unit),
                tenant_units,
                device_tlb_timeout_ms: stall.timeout.map(|t| t.as_secs_f64() * 1e3),
                ..StalledReport::default()
            };
            (chosen, Some((device, report)))
        }
    };
    let sids: Vec<u32> = chosen.iter().map(|d| d.sid).collect();
    let prepared = match scenario::prepare(
        &mut control,
        &sids,
        common.footprint,
        crate::args::PageMix::Small,
        common.check_translated,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            if let Some((device, _)) = stalled {
                let _ = device.stop().await;
            }
            return Err(e);
        }
    };
    if let Some((device, _)) = stalled.as_mut() {
        device.start();
    }
    let mut report = InvalidateReport::default();
    let mut histograms = Vec::new();
    let pages = common.footprint / PAGE_SIZE;
    let result: anyhow::Result<()> = async {
        for (name, policy) in [("strict", FlushPolicy::Strict), ("deferred", FlushPolicy::Deferred)] {
            let request = workload(common, WorkloadMode::Ats);
            let cluster2 = cluster.clone();
            let chosen2 = chosen.clone();
            let work = tokio::spawn(async move { run(&cluster2, &chosen2, &request).await });
            // Unmap while the devices measure: start after the warm-up, stop at its end.
            tokio::time::sleep(common.warmup).await;
            let end = Instant::now() + common.duration;
            let mut lat = Histogram::<u64>::new(3).context("histogram")?;
            let mut n = 0u64;
            let (mut checked, mut violations) = (0u64, 0u64);
            let mut x = common.seed | 1;
            let start = Instant::now();
            // Pages come back REMAP_LAG unmaps later: long enough that a deferred unmap's
            // range has been flushed (so a remap does not force an early flush), short
            // enough that the devices keep running into holes.
            let mut holes: std::collections::VecDeque<(u32, u64)> = std::collections::VecDeque::new();
            while Instant::now() < end {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = prepared[(x as usize) % prepared.len()];
                let page = (x >> 8) % pages;
                let iova = IOVA_BASE + page * PAGE_SIZE;
                if holes.iter().any(|h| *h == (p.domain, iova)) {
                    continue;
                }
                let t = Instant::now();
                control
                    .unmap(UnmapRequest {
                        domain_id: p.domain,
                        ranges: vec![UnmapRange { iova, length: PAGE_SIZE }],
                        policy: policy as i32,
                    })
                    .await
                    .context("Unmap")?;
                let _ = lat.record(t.elapsed().as_nanos() as u64);
                if policy == FlushPolicy::Strict && n.is_multiple_of(CHECK_EVERY) {
                    let device = chosen.iter().find(|d| d.sid == p.sid).map_or(0, |d| d.agent);
                    let r = cluster.agents[device]
                        .client
                        .clone()
                        .access(AccessRequest { source_id: p.sid, iova, write: false, translate_only: true, length: 4 })
                        .await
                        .context("Access")?
                        .into_inner();
                    checked += 1;
                    if r.result == AccessResult::Ok as i32 {
                        violations += 1;
                    }
                }
                holes.push_back((p.domain, iova));
                if holes.len() > REMAP_LAG
                    && let Some((domain, back)) = holes.pop_front()
                {
                    remap(&mut control, domain, back).await?;
                }
                n += 1;
            }
            for (domain, back) in holes.drain(..) {
                remap(&mut control, domain, back).await?;
            }
            let elapsed = start.elapsed().as_secs_f64();
            control.flush(FlushRequest {}).await.context("Flush")?;
            let (devices, reports) = work.await.context("workload task")??;
            let stale_completions = reports.iter().filter_map(|r| r.totals).map(|t| t.stale_completions).sum();
            report.phases.push(InvalidatePhase {
                policy: name.to_owned(),
                unmaps: n,
                unmaps_per_s: n as f64 / elapsed.max(1e-9),
                unmap_latency: Latency::of(&lat),
                devices,
                checked,
                use_after_invalidation: violations,
                stale_completions,
                slow_unmaps: None,
            });
            histograms.push(lat);
        }
        Ok(())
    }
    .await;
    let stall_result = match stalled {
        Some((device, mut r)) => match device.stop().await {
            Ok(counts) => {
                r.unmaps = counts.unmaps;
                r.timed_out = counts.timed_out;
                r.invalidations_ignored = counts.ignored;
                r.unmap_latency = counts.latency;
                Ok(Some(r))
            }
            Err(e) => Err(e),
        },
        None => Ok(None),
    };
    scenario::teardown(&mut control, &prepared).await;
    result?;
    report.stalled = stall_result?;
    if let Some(s) = &report.stalled {
        // Half the time-out: the configured one, else what the stalled device's unmaps
        // took (each lasts one time-out).
        let timeout_ns = s.device_tlb_timeout_ms.map_or(s.unmap_latency.p50_ns, |ms| (ms * 1e6) as u64);
        let half = timeout_ns / 2;
        for (phase, h) in report.phases.iter_mut().zip(&histograms) {
            phase.slow_unmaps = (half > 0 && !h.is_empty()).then(|| h.count_between(half, h.max().max(half)));
        }
    }
    Ok(report)
}

/// Runs the demand-paging scenario on the first device of each agent.
pub(crate) async fn demand_paging(cluster: &Cluster, common: &Common) -> anyhow::Result<DemandReport> {
    let chosen: Vec<_> = cluster.devices().into_iter().take(cluster.agents.len().max(1)).collect();
    if chosen.is_empty() {
        bail!("no ATS functions to run demand paging on");
    }
    let mut control = cluster.control.clone();
    let mut prepared = Vec::new();
    for d in &chosen {
        prepared.push(scenario::attach(&mut control, d.sid, common.check_translated).await?);
    }
    let mut watch = control.watch_page_requests(WatchRequest {}).await.context("WatchPageRequests")?.into_inner();
    let stop = tokio_util::sync::CancellationToken::new();
    let handler = {
        let mut control = control.clone();
        let prepared = prepared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut lat = Histogram::<u64>::new(3).ok();
            let mut mapped = 0u64;
            loop {
                let req = tokio::select! {
                    () = stop.cancelled() => break,
                    next = watch.next() => match next {
                        Some(Ok(req)) => req,
                        _ => break,
                    },
                };
                let t = Instant::now();
                let Some(p) = prepared.iter().find(|p| p.sid == req.source_id) else { continue };
                let page = (req.address - IOVA_BASE.min(req.address)) / PAGE_SIZE;
                let perms = Some(Permissions { read: true, write: true });
                let map = MapRequest {
                    domain_id: p.domain,
                    ranges: vec![MapRange {
                        iova: req.address & !(PAGE_SIZE - 1),
                        hpa: HPA_BASE + PAGE_SIZE + page * PAGE_SIZE,
                        length: PAGE_SIZE,
                        permissions: perms,
                    }],
                };
                // Already mapped (a concurrent request for the same page) is fine.
                if control.map(map).await.is_ok() {
                    mapped += 1;
                }
                if req.last {
                    let _ = control
                        .respond_page_request(RespondPageRequestRequest {
                            source_id: req.source_id,
                            group_index: req.group_index,
                            code: PageResponseCode::Success as i32,
                        })
                        .await;
                }
                if let Some(h) = lat.as_mut() {
                    let _ = h.record(t.elapsed().as_nanos() as u64);
                }
            }
            (mapped, lat)
        })
    };
    // No warm-up: the interesting part is the first touch of every page.
    let mut request = workload(common, WorkloadMode::Ats);
    request.warmup_ms = 0;
    let summary = run(cluster, &chosen, &request).await;
    stop.cancel();
    let (mapped, lat) = match tokio::time::timeout(Duration::from_secs(5), handler).await {
        Ok(Ok(v)) => v,
        _ => (0, None),
    };
    scenario::teardown(&mut control, &prepared).await;
    let (devices, _) = summary?;
    Ok(DemandReport {
        pages_mapped: mapped.max(devices.counts.page_requests.saturating_sub(devices.counts.page_request_failures)),
        service_latency: lat.as_ref().map_or_else(Latency::default, Latency::of),
        devices,
        platform: None,
    })
}
