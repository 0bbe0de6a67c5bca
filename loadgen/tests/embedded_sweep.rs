//! A tiny embedded sweep (server and agents in process on loopback), checked for internal
//! consistency rather than speed.

use clap::Parser;
use dmar_loadgen::args::Cli;
use dmar_loadgen::{Outcome, execute};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_embedded_sweep_is_consistent() {
    let cli = Cli::try_parse_from([
        "dmar-loadgen",
        "--steps",
        "1,2",
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
        "--footprint",
        "4M",
    ])
    .expect("arguments");
    let Outcome::Sweep(report) = execute(&cli).await.expect("sweep") else { panic!("not a sweep") };
    assert!(report.settings.embedded);
    assert_eq!(report.steps.iter().map(|s| s.devices).collect::<Vec<_>>(), vec![1, 2]);
    for step in &report.steps {
        let c = &step.ats.counts;
        assert!(c.accesses > 0, "step {}: no accesses", step.devices);
        // Every access looks the device TLB up once when it starts (lookups = hits +
        // misses) and is counted as an access when it completes. The two differ only by
        // accesses in flight across the window's edges: at most the concurrency (8) per
        // device.
        let lookups = c.atc_hits + c.atc_misses;
        assert!(
            lookups.abs_diff(c.accesses) <= 8 * step.devices as u64,
            "step {}: {lookups} lookups vs {} accesses",
            step.devices,
            c.accesses
        );
        // Every miss either joined an outstanding request or sent one (no PRI, no
        // invalidations here, so there are no retries).
        assert_eq!(
            c.translations_requested,
            c.atc_misses - c.coalesced_misses,
            "step {}: served = misses - coalesced",
            step.devices
        );
        assert_eq!(c.faults, 0);
        let baseline = step.baseline.as_ref().expect("baseline measured in the same run");
        assert!(baseline.counts.baseline_calls > 0);
        let ratio = step.ats_over_baseline.expect("ratio");
        assert!(ratio > 0.0 && ratio.is_finite());
        assert!(step.ats.miss_latency.count > 0 && step.ats.miss_latency.p50_ns <= step.ats.miss_latency.p99_ns);
    }
    // Every rendering works.
    let outcome = Outcome::Sweep(report);
    for format in [dmar_loadgen::args::Format::Text, dmar_loadgen::args::Format::Json, dmar_loadgen::args::Format::Csv]
    {
        assert!(!outcome.render(format).expect("render").is_empty());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("sweep.svg");
    let Outcome::Sweep(r) = &outcome else { unreachable!() };
    dmar_loadgen::plot::plot(r, &svg).expect("plot");
    assert!(std::fs::read_to_string(&svg).expect("svg").contains("<svg"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_addresses_are_an_error() {
    let cli =
        Cli::try_parse_from(["dmar-loadgen", "--server", "127.0.0.1:1", "--agents", "127.0.0.1:1"]).expect("arguments");
    let err = execute(&cli).await.expect_err("unreachable");
    assert!(format!("{err:#}").contains("cannot reach"), "{err:#}");
}

/// A short embedded sweep of one step of two devices, with `extra` arguments.
fn two_device_sweep(extra: &[&str]) -> Cli {
    let args = ["--steps", "2", "--duration", "200ms", "--warmup", "50ms", "--footprint", "1M"];
    Cli::try_parse_from(["dmar-loadgen"].iter().chain(extra).chain(&args)).expect("arguments")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sweep_over_mutual_tls() {
    let cli = two_device_sweep(&["--tls"]);
    let Outcome::Sweep(report) = execute(&cli).await.expect("sweep over tls") else { panic!("not a sweep") };
    assert!(report.settings.embedded && report.settings.tls);
    assert!(report.steps[0].ats.counts.accesses > 0);
    assert!(report.steps[0].baseline.as_ref().is_some_and(|b| b.counts.baseline_calls > 0), "baseline over tls");
    assert!(Outcome::Sweep(report).render(dmar_loadgen::args::Format::Text).expect("text").contains("mutual TLS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_for_the_embedded_system_only() {
    let cli = Cli::try_parse_from(["dmar-loadgen", "--tls", "--server", "127.0.0.1:1", "--agents", "127.0.0.1:1"])
        .expect("arguments");
    let err = execute(&cli).await.expect_err("--tls with --server");
    assert!(format!("{err:#}").contains("--tls-dir"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_baseline_is_labelled_in_every_rendering() {
    let cli = two_device_sweep(&["--baseline", "link"]);
    let Outcome::Sweep(report) = execute(&cli).await.expect("sweep") else { panic!("not a sweep") };
    assert_eq!(report.settings.baseline, Some(dmar_loadgen::args::BaselineKind::Link));
    let b = report.steps[0].baseline.as_ref().expect("baseline measured");
    let c = &b.counts;
    assert!(c.baseline_calls > 0 && c.faults == 0, "{c:?}");
    // One link request per access, the device TLB untouched; the server served them.
    assert_eq!(c.translations_requested, c.baseline_calls);
    assert_eq!((c.atc_hits, c.atc_misses), (0, 0));
    assert!(b.server_cpu_ns_per_translation.is_some(), "link translations served");
    let outcome = Outcome::Sweep(report);
    let render = |f| outcome.render(f).expect("render");
    assert!(render(dmar_loadgen::args::Format::Text).contains("baseline (link): one ATS translation request"));
    assert!(render(dmar_loadgen::args::Format::Json).contains("\"baseline\": \"link\""));
    let csv = render(dmar_loadgen::args::Format::Csv);
    let column = |name: &str| csv.lines().next().and_then(|h| h.split(',').position(|c| c == name));
    let cell = |name: &str| csv.lines().nth(1).and_then(|row| row.split(',').nth(column(name)?)).map(str::to_owned);
    assert_eq!(cell("baseline_kind").as_deref(), Some("link"), "{csv}");
    assert_eq!(cell("platform").as_deref(), Some("dmar0:2"), "one unit, both devices: {csv}");
    assert!(render(dmar_loadgen::args::Format::Text).contains("platform: 1 unit (dmar0: 2 devices)"));
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("sweep.svg");
    let Outcome::Sweep(r) = &outcome else { unreachable!() };
    dmar_loadgen::plot::plot(r, &svg).expect("plot");
    assert!(std::fs::read_to_string(&svg).expect("svg").contains("baseline (link requests, no device TLB)"));
}
