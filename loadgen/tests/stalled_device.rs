//! The invalidate scenario with a stalled device, embedded: the same run on a one-unit and
//! on a two-unit platform. Checked for what a stalled device causes, not for speed: with
//! one unit some tenant strict unmap waited behind the stalled device's invalidation
//! (about a time-out); with two units none did.

use std::time::Duration;

use clap::Parser;
use dmar_loadgen::args::{Cli, Format};
use dmar_loadgen::report::{InvalidatePhase, InvalidateReport};
use dmar_loadgen::{Outcome, execute};

/// The units' device-TLB invalidation time-out in this test: long against a tenant unmap
/// (tens of microseconds), short enough that the run stays a few seconds.
const TIMEOUT: Duration = Duration::from_millis(400);

fn strict(r: &InvalidateReport) -> &InvalidatePhase {
    r.phases.iter().find(|p| p.policy == "strict").expect("a strict phase")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_device_delays_only_the_strict_unmaps_of_its_own_unit() {
    let cli = Cli::try_parse_from([
        "dmar-loadgen",
        "invalidate",
        "--stalled-device",
        "--devices",
        "2",
        "--device-tlb-timeout",
        "400ms",
        "--duration",
        "1s",
        "--warmup",
        "100ms",
        "--footprint",
        "4M",
        "--concurrency",
        "2",
    ])
    .expect("arguments");
    let Outcome::StalledComparison(r) = execute(&cli).await.expect("the comparison runs") else {
        panic!("not the stalled-device comparison")
    };
    assert_eq!(r.device_tlb_timeout_ms, 400.0);
    let (one, two) = (&r.one_unit, &r.two_units);

    // Where everything went.
    let units = |x: &InvalidateReport| x.platform.as_ref().expect("platform").units.len();
    assert_eq!((units(one), units(two)), (1, 2));
    let s1 = one.stalled.as_ref().expect("stalled device, one unit");
    let s2 = two.stalled.as_ref().expect("stalled device, two units");
    assert_eq!(s1.tenant_units, vec![s1.unit_name.clone()], "one unit: the tenants' unit");
    assert_eq!((s2.unit_name.as_str(), s2.tenant_units.clone()), ("dmar0", vec!["dmar1".to_owned()]));
    assert_eq!(
        two.platform.as_ref().expect("platform").line(),
        "platform: 2 units (dmar0: 0 devices, dmar1: 2 devices)"
    );

    // The stalled device never answered: every unmap of its page ended at the time-out.
    for s in [s1, s2] {
        assert!(s.unmaps >= 1, "{s:?}");
        assert_eq!(s.timed_out, s.unmaps, "every unmap of the stalled device's page times out: {s:?}");
        assert!(s.invalidations_ignored >= s.timed_out, "{s:?}");
        assert!(s.unmap_latency.p50_ns >= TIMEOUT.as_nanos() as u64 / 2, "{s:?}");
    }

    // The tenants ran and stayed correct on both platforms.
    for x in [one, two] {
        let p = strict(x);
        assert!(p.unmaps > 0 && p.devices.counts.accesses > 0, "{p:?}");
        assert_eq!(p.use_after_invalidation, 0);
    }

    // The cause: one unit, a tenant unmap queued behind the stalled invalidation and
    // waited for (most of) its time-out; two units, none waited a time-out.
    let (p1, p2) = (strict(one), strict(two));
    assert!(
        p1.slow_unmaps.expect("counted") >= 1,
        "one unit: no tenant unmap waited behind the stalled device: {p1:?}"
    );
    assert!(
        p2.unmap_latency.max_ns < TIMEOUT.as_nanos() as u64,
        "two units: a tenant unmap took a whole time-out: {:?}",
        p2.unmap_latency
    );

    let outcome = Outcome::StalledComparison(r);
    let text = outcome.render(Format::Text).expect("text");
    assert!(text.contains("time-out 400 ms") && text.contains("one/two"), "{text}");
    assert!(outcome.render(Format::Json).expect("json").contains("\"strict_p99_ratio\""));
    let csv = outcome.render(Format::Csv).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 4, "a header and two phases per platform: {csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_unit_platform_cannot_hold_a_stalled_device_on_another_unit() {
    // A platform file with one unit, embedded: no other unit to put the stalled device on.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("one.toml");
    std::fs::write(
        &file,
        "memory = \"2GiB\"\n\n[[unit]]\nname = \"dmar0\"\ninclude_all = true\ndriver = \"builtin\"\n",
    )
    .expect("platform file");
    let cli = Cli::try_parse_from([
        "dmar-loadgen",
        "invalidate",
        "--stalled-device",
        "--devices",
        "1",
        "--platform",
        file.to_str().expect("utf-8"),
        "--duration",
        "200ms",
        "--warmup",
        "50ms",
        "--footprint",
        "1M",
    ])
    .expect("arguments");
    let err = format!("{:#}", execute(&cli).await.expect_err("one unit"));
    assert!(err.contains("one remapping unit"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_device_flags_are_checked_before_anything_starts() {
    let remote_tls = Cli::try_parse_from([
        "dmar-loadgen",
        "--server",
        "127.0.0.1:1",
        "--agents",
        "127.0.0.1:1",
        "--tls-dir",
        "/nonexistent",
        "invalidate",
        "--stalled-device",
    ])
    .expect("arguments");
    let err = format!("{:#}", execute(&remote_tls).await.expect_err("no device identity"));
    assert!(err.contains("--stalled-device-identity"), "{err}");
    let remote_platform = Cli::try_parse_from([
        "dmar-loadgen",
        "--server",
        "127.0.0.1:1",
        "--agents",
        "127.0.0.1:1",
        "--platform",
        "x.toml",
    ])
    .expect("arguments");
    let err = format!("{:#}", execute(&remote_platform).await.expect_err("platform is embedded only"));
    assert!(err.contains("--platform"), "{err}");
}
