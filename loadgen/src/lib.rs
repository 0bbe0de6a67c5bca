//! dmar-loadgen: scenario setup and translation-scaling measurements.
//!
//! This first version drives the remapping unit in process: it builds a scenario with the
//! driver model (one paging domain, a mapped footprint, N devices attached with ATS), then
//! steps over the number of concurrent devices, each a thread issuing translation requests
//! over its footprint, and reports throughput and cache behaviour per step. The networked
//! sweep (server, agents, device TLBs, baseline) replaces the device threads once those
//! services exist; the scenario and report types stay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dmar_server::driver::{DomainKind, Driver, DriverConfig, Perm};
use dmar_server::unit::tables::AddressWidth;
use dmar_server::unit::{Access, HostMemory, Unit, UnitConfig};
use dmar_server::{Hpa, Iova, SourceId};

/// What to run.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Concurrent device counts, one step each.
    pub steps: Vec<usize>,
    /// Measured time per step.
    pub duration: Duration,
    /// Bytes mapped per device.
    pub footprint: u64,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self { steps: vec![1, 2, 4, 8], duration: Duration::from_millis(500), footprint: 8 << 20 }
    }
}

/// The measurements of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Concurrent devices.
    pub devices: usize,
    /// Translations performed.
    pub translations: u64,
    /// Translations per second over the step.
    pub per_second: f64,
    /// IOTLB hits / (hits + misses) over the step.
    pub iotlb_hit_ratio: f64,
    /// Faults recorded during the step (must be 0).
    pub faults: u64,
}

/// Parses a step list such as `1,2,4,8`.
pub fn parse_steps(s: &str) -> anyhow::Result<Vec<usize>> {
    let steps = s
        .split(',')
        .map(|p| p.trim().parse::<usize>().with_context(|| format!("step {p:?} is not a device count")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if steps.is_empty() || steps.iter().any(|&n| n == 0 || n > 256) {
        bail!("steps must be device counts between 1 and 256, got {s:?}");
    }
    Ok(steps)
}

/// Runs the in-process sweep.
pub fn run_sweep(config: &SweepConfig, mut progress: impl FnMut(&StepReport)) -> anyhow::Result<Vec<StepReport>> {
    if config.duration.is_zero() {
        bail!("duration must be greater than zero");
    }
    if config.footprint == 0 || !config.footprint.is_multiple_of(4096) {
        bail!("footprint must be a positive multiple of 4 KiB");
    }
    let max = config.steps.iter().copied().max().unwrap_or(1);
    let memory_size = 8u64 << 30;
    let mem = Arc::new(HostMemory::new(memory_size)?);
    let unit = Arc::new(Unit::new(UnitConfig::default(), mem));
    let driver = Driver::new(unit.clone(), DriverConfig::for_memory(memory_size))?;
    let did = driver.create_domain(DomainKind::Paging, AddressWidth::Aw48)?;
    // Device i owns [i * footprint, (i + 1) * footprint) of IOVA space, backed by frames
    // from the bottom of memory. The frames are deliberately not 2 MiB aligned, so the
    // footprint is mapped with 4 KiB pages and a large footprint overflows the IOTLB.
    let sids: Vec<SourceId> = (0..max).map(|i| SourceId::new(1 + (i / 32) as u8, (i % 32) as u8, 0)).collect();
    for (i, sid) in sids.iter().enumerate() {
        driver.attach(*sid, did, true)?;
        let base = i as u64 * config.footprint;
        driver.map(did, Iova(0x1_0000_0000 + base), Hpa(0x100_1000 + base), config.footprint, Perm::RW)?;
    }
    let mut reports = Vec::new();
    for &devices in &config.steps {
        let before = unit.stats();
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let workers: Vec<_> = sids[..devices]
            .iter()
            .enumerate()
            .map(|(i, &sid)| {
                let unit = unit.clone();
                let stop = stop.clone();
                let base = 0x1_0000_0000 + i as u64 * config.footprint;
                let pages = config.footprint / 4096;
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..256 {
                            // xorshift: uniform over the footprint.
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let iova = Iova(base + (x % pages) * 4096);
                            let _ = std::hint::black_box(unit.translate(sid, iova, Access::Read));
                        }
                        n += 256;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(config.duration);
        stop.store(true, Ordering::Relaxed);
        let mut translations = 0;
        for w in workers {
            translations += w.join().map_err(|_| anyhow::anyhow!("a device thread panicked"))?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let after = unit.stats();
        let hits = after.iotlb_hits - before.iotlb_hits;
        let misses = after.iotlb_misses - before.iotlb_misses;
        let report = StepReport {
            devices,
            translations,
            per_second: translations as f64 / elapsed,
            iotlb_hit_ratio: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            faults: after.faults_recorded - before.faults_recorded,
        };
        progress(&report);
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lists_are_validated() {
        assert_eq!(parse_steps("1, 2,4").unwrap(), vec![1, 2, 4]);
        assert!(parse_steps("1,x").is_err());
        assert!(parse_steps("0").is_err());
        assert!(parse_steps("").is_err());
    }

    #[test]
    fn a_tiny_sweep_is_consistent() {
        let config = SweepConfig { steps: vec![1, 2], duration: Duration::from_millis(50), footprint: 1 << 20 };
        let mut seen = 0;
        let reports = run_sweep(&config, |_| seen += 1).unwrap();
        assert_eq!(seen, 2);
        for r in &reports {
            assert!(r.translations > 0);
            assert_eq!(r.faults, 0, "every translated page is mapped");
            assert!(r.iotlb_hit_ratio > 0.0 && r.iotlb_hit_ratio <= 1.0);
        }
        assert!(run_sweep(&SweepConfig { duration: Duration::ZERO, ..config }, |_| ()).is_err());
    }
}
