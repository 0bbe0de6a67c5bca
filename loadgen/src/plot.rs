//! The SVG chart: device-side translations/s (ATS and baseline, its kind in the legend;
//! left axis, log scale) and p99 miss latency (right axis) against the number of devices.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::args::BaselineKind;
use crate::report::SweepReport;

/// Draws `report` to `path`.
pub fn plot(report: &SweepReport, path: &Path) -> anyhow::Result<()> {
    let steps = &report.steps;
    if steps.is_empty() {
        return Err(anyhow!("nothing to plot"));
    }
    let max_dev = steps.iter().map(|s| s.devices).max().unwrap_or(1) as f64;
    let rates: Vec<f64> = steps
        .iter()
        .flat_map(|s| [Some(s.ats.device_translations_per_s), s.baseline.as_ref().map(|b| b.device_translations_per_s)])
        .flatten()
        .filter(|v| *v > 0.0)
        .collect();
    let (lo, hi) = rates.iter().fold((f64::MAX, 1.0f64), |(l, h), v| (l.min(*v), h.max(*v)));
    let lo = if lo == f64::MAX { 1.0 } else { (lo / 2.0).max(1.0) };
    let p99_max = steps.iter().map(|s| s.ats.miss_latency.p99_ns).max().unwrap_or(1).max(1) as f64 / 1e3 * 1.2;

    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("dmar: translation throughput and p99 miss latency vs devices", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0.5f64..(max_dev + 0.5), (lo..hi * 2.0).log_scale())
        .map_err(draw)?
        .set_secondary_coord(0.5f64..(max_dev + 0.5), 0.0f64..p99_max);
    chart
        .configure_mesh()
        .x_desc("concurrent devices")
        .y_desc("device-side translations/s")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(draw)?;
    chart.configure_secondary_axes().y_desc("p99 miss latency (µs)").draw().map_err(draw)?;

    let ats: Vec<(f64, f64)> =
        steps.iter().map(|s| (s.devices as f64, s.ats.device_translations_per_s.max(lo))).collect();
    chart
        .draw_series(LineSeries::new(ats.clone(), BLUE.stroke_width(2)))
        .map_err(draw)?
        .label("ATS path (device TLBs)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.draw_series(ats.iter().map(|p| Circle::new(*p, 4, BLUE.filled()))).map_err(draw)?;
    let base: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|s| s.baseline.as_ref().map(|b| (s.devices as f64, b.device_translations_per_s.max(lo))))
        .collect();
    if !base.is_empty() {
        chart
            .draw_series(LineSeries::new(base.clone(), RED.stroke_width(2)))
            .map_err(draw)?
            .label(match report.settings.baseline.unwrap_or_default() {
                BaselineKind::Unary => "baseline (unary Translate, no device TLB)",
                BaselineKind::Link => "baseline (link requests, no device TLB)",
            })
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart.draw_series(base.iter().map(|p| Circle::new(*p, 4, RED.filled()))).map_err(draw)?;
    }
    let p99: Vec<(f64, f64)> =
        steps.iter().map(|s| (s.devices as f64, s.ats.miss_latency.p99_ns as f64 / 1e3)).collect();
    chart
        .draw_secondary_series(LineSeries::new(p99.clone(), GREEN.stroke_width(2)))
        .map_err(draw)?
        .label("p99 miss latency (right axis)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart.draw_secondary_series(p99.iter().map(|p| TriangleMarker::new(*p, 5, GREEN.filled()))).map_err(draw)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}
