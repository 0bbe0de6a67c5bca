//! The sweep: for each device count, the ATS workload and then the baseline (device
//! TLBs off: one unary Translate call, or one link translation request, per access) on
//! the same devices, so every step carries a ratio measured in the same run.

use anyhow::bail;
use dmar_proto::v1::WorkloadMode;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{BaselineKind, Common};
use crate::cluster::Cluster;
use crate::report::{Step, SweepReport};
use crate::run::{run, workload};
use crate::scenario;

/// The workload mode of a baseline kind.
pub(crate) fn baseline_mode(kind: BaselineKind) -> WorkloadMode {
    match kind {
        BaselineKind::Unary => WorkloadMode::Baseline,
        BaselineKind::Link => WorkloadMode::LinkBaseline,
    }
}

/// Runs the sweep over an already connected cluster.
pub(crate) async fn sweep(
    cluster: &Cluster,
    common: &Common,
    with_ats: bool,
    with_baseline: bool,
) -> anyhow::Result<SweepReport> {
    let devices = cluster.devices();
    let steps = &common.steps.0;
    let largest = steps.last().copied().unwrap_or(1);
    if devices.len() < largest {
        bail!("the sweep needs {largest} devices but the agents host {} ATS functions", devices.len());
    }
    let sids: Vec<u32> = devices[..largest].iter().map(|d| d.sid).collect();
    let mut control = cluster.control.clone();
    let prepared =
        scenario::prepare(&mut control, &sids, common.footprint, common.page_mix, common.check_translated).await?;
    let runs = steps.len() as u64 * (u64::from(with_ats) + u64::from(with_baseline));
    let bar = ProgressBar::new(runs);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut report = SweepReport::default();
    let result: anyhow::Result<()> = async {
        for &n in steps {
            let chosen = &devices[..n];
            let mut step = Step { devices: n, ..Step::default() };
            if with_ats {
                bar.set_message(format!("{n} devices, ATS"));
                step.ats = run(cluster, chosen, &workload(common, WorkloadMode::Ats)).await?.0;
                bar.inc(1);
            }
            if with_baseline {
                bar.set_message(format!("{n} devices, {} baseline", common.baseline.label()));
                let b = run(cluster, chosen, &workload(common, baseline_mode(common.baseline))).await?.0;
                if b.counts.accesses > 0 && b.counts.aborted == b.counts.accesses {
                    bail!(
                        "every access of the {} baseline was abandoned without a translation ({}); {}",
                        common.baseline.label(),
                        b.counts.aborted,
                        match common.baseline {
                            BaselineKind::Unary => {
                                "its Control.Translate calls need the operator role for the agents' identities: \
                                 try --baseline link"
                            }
                            BaselineKind::Link => "the agents' links are down",
                        }
                    );
                }
                if with_ats && b.device_translations_per_s > 0.0 {
                    step.ats_over_baseline = Some(step.ats.device_translations_per_s / b.device_translations_per_s);
                }
                step.baseline = Some(b);
                bar.inc(1);
            }
            report.steps.push(step);
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    scenario::teardown(&mut control, &prepared).await;
    result?;
    Ok(report)
}
