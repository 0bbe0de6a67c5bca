//! The hardware model: one Intel VT-d DMA-remapping unit.
//!
//! A [`Unit`] owns everything the spec puts in a remapping hardware unit, a file or folder
//! per idea:
//! - the register file: offsets and fields ([`regs`]), access decoding (`mmio`), and the
//!   event control block every interrupt-generating event shares (`event`);
//! - the requests it answers (`request`): untranslated, ATS translation and translated
//!   requests and MSI writes, through the context lookup and page walk (`walk`) and the
//!   caches (`cache`);
//! - invalidation, register-based and queued, with the device ports that carry device-TLB
//!   invalidations ([`invalidation`]);
//! - fault recording and the fault event (`fault`, with the reasons in `fault_reason`);
//! - interrupt remapping ([`interrupt`]) and the page request queue ([`prq`]);
//! - the DMA protected memory regions firmware fences memory off with before the OS
//!   enables remapping (`pmr`);
//! - translated-request checking, a dmar extension hardware does not have: the ranges
//!   each checked function was granted by translation completions (`grants`);
//! - its counters (`stats`);
//! - a platform reset of all of the above but the counters and the wiring (`reset`).
//!
//! Tables live in [`HostMemory`] ([`memory`]), in the binary formats of [`tables`]; the unit
//! only ever reads them, one 64-bit word at a time.
//!
//! The unit is a value, not a global: it is `Send + Sync`, every method takes `&self`, and
//! requests from many threads proceed in parallel (the caches lock per set, the fault ring
//! and the register file have their own locks). Nothing here does I/O or awaits. Time is an
//! input: [`Unit::poll`] takes the current instant, and what needs the time inside another
//! operation reads the [`Clock`] the unit was built with ([`UnitBuilder::clock`]).
//!
//! What software must do, it must do: table changes are invisible to the caches until
//! invalidated (VT-d 6.5), so a stale translation keeps being served exactly as on hardware.
//! With [`UnitConfig::with_stale_detection`] the unit re-reads the source entry on each cache
//! hit and counts such stale uses.
//!
//! # Protected memory regions: the firmware sequence
//!
//! A unit starts at its reset values, translation disabled (GSTS.TES = 0), so every
//! device behind it reaches host memory untranslated until a driver enables remapping.
//! Firmware closes that window with the protected memory regions (CAP.PLMR, CAP.PHMR;
//! VT-d 10.4.16-10.4.20), through the same registers software uses, nothing else:
//!
//! 1. write PLMBASE and PLMLIMIT (32-bit, 0x68 and 0x6C) with the first and last 2 MiB
//!    block of the region below 4 GiB, and PHMBASE and PHMLIMIT (64-bit, 0x70 and 0x78)
//!    with those of the region above (a limit below its base leaves that region off);
//!    reading a register back shows the implemented bits (bits 20:0 read 0, VT-d 10.4.17);
//! 2. set PMEN.EPM (bit 31 of the 32-bit register at 0x64);
//! 3. poll PMEN.PRS (bit 0) until it reads 1; from then on the regions are enforced.
//!
//! While PRS is set, DMA that touches a region is blocked without a fault record when
//! translation is disabled, when the context entry says pass-through (TT = 10b), and for
//! translated requests (AT = 10b); requests the page tables remap are not checked (the
//! rules and their sources are in `request`). The OS then takes over the Linux way: it
//! builds its tables, enables translation, and only then clears EPM and polls PRS back to
//! 0 (`iommu_disable_protect_mem_regions` after `iommu_enable_translation`), so no DMA is
//! ever unprotected. [`Unit::reset`] clears all five registers.

mod cache;
mod event;
mod fault;
mod fault_reason;
mod field;
mod grants;
pub mod interrupt;
pub mod invalidation;
pub mod memory;
mod mmio;
mod pmr;
pub mod prq;
pub mod regs;
mod request;
mod reset;
mod stats;
pub mod tables;
mod walk;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::{Clock, SystemClock};

pub use cache::{CacheGeometry, InvalidGeometry};
pub use event::EventSource;
pub use fault::{Direction, FaultRecord, FrcdError, NoEvents, RequestKind, UnitEvents, WALK_SAMPLE_PERIOD};
pub use fault_reason::FaultReason;
pub use grants::DEFAULT_GRANTS_PER_FUNCTION;
pub use invalidation::{
    ContextInvalidation, DeviceInvalidation, DevicePort, InvalidationDoorbell, IotlbInvalidation, PortError,
    UnexpectedCompletion,
};
pub use memory::{HostMemory, MemoryError};
pub use mmio::MmioError;
pub use prq::{PageRequestError, PageRequestOutcome};
pub(crate) use request::INTERRUPT_RANGE_BASE;
pub use request::{AtsCompletion, AtsEntry, Blocked, DmaError, Translation};
pub use stats::UnitStats;

use cache::context::ContextCache;
use cache::iotlb::Iotlb;
use cache::paging::PagingCache;
use fault::FaultRecorder;
use grants::GrantTable;
use stats::Counters;

/// Construction-time parameters of a unit: cache sizes and diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    iotlb: CacheGeometry,
    context_cache: CacheGeometry,
    paging_cache: CacheGeometry,
    interrupt_cache: CacheGeometry,
    stale_detection: bool,
    device_tlb_timeout: Duration,
    translated_grants: usize,
}

impl Default for UnitConfig {
    /// IOTLB 256×8, context cache 64×4, paging-structure cache 128×4, stale detection on,
    /// device-TLB invalidation time-out 1 s, [`DEFAULT_GRANTS_PER_FUNCTION`] grants per
    /// function for translated-request checking.
    fn default() -> Self {
        Self {
            iotlb: CacheGeometry::new(256, 8),
            context_cache: CacheGeometry::new(64, 4),
            paging_cache: CacheGeometry::new(128, 4),
            interrupt_cache: interrupt::DEFAULT_IEC_GEOMETRY,
            stale_detection: true,
            device_tlb_timeout: Duration::from_secs(1),
            translated_grants: DEFAULT_GRANTS_PER_FUNCTION,
        }
    }
}

impl UnitConfig {
    /// Sets the IOTLB geometry.
    pub fn with_iotlb(mut self, geometry: CacheGeometry) -> Result<Self, InvalidGeometry> {
        geometry.validate()?;
        self.iotlb = geometry;
        Ok(self)
    }

    /// Sets the context-cache geometry.
    pub fn with_context_cache(mut self, geometry: CacheGeometry) -> Result<Self, InvalidGeometry> {
        geometry.validate()?;
        self.context_cache = geometry;
        Ok(self)
    }

    /// Sets the paging-structure cache geometry.
    pub fn with_paging_cache(mut self, geometry: CacheGeometry) -> Result<Self, InvalidGeometry> {
        geometry.validate()?;
        self.paging_cache = geometry;
        Ok(self)
    }

    /// Turns stale-use detection on or off. On, every cache hit costs one extra memory
    /// load (two for the context cache).
    pub fn with_stale_detection(mut self, on: bool) -> Self {
        self.stale_detection = on;
        self
    }

    /// Sets the time after which an unanswered device-TLB invalidation sets ITE.
    pub fn with_device_tlb_timeout(mut self, timeout: Duration) -> Self {
        self.device_tlb_timeout = timeout;
        self
    }

    /// Sets how many grants (merged ranges) one function may hold when translated-request
    /// checking is on for it (at least 1); past it the oldest is evicted, and counted in
    /// [`UnitStats::translated_check_evictions`]. The bound keeps what a device can make
    /// the unit remember finite: about 150 bytes per grant.
    pub fn with_translated_grants(mut self, per_function: usize) -> Self {
        self.translated_grants = per_function.max(1);
        self
    }
}

/// Entries currently held by each cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheOccupancy {
    /// Context cache.
    pub context: usize,
    /// Paging-structure cache.
    pub paging: usize,
    /// IOTLB.
    pub iotlb: usize,
}

/// One emulated VT-d remapping hardware unit.
pub struct Unit {
    config: UnitConfig,
    memory: Arc<HostMemory>,
    events: Arc<dyn UnitEvents>,
    /// Register state that is not on the request path.
    regs: Mutex<mmio::RegisterFile>,
    /// GSTS.TES, mirrored for the request path.
    translation_enabled: AtomicBool,
    /// The root table address latched by the last SRTP.
    root_table: AtomicU64,
    /// Bumped by every invalidation before it drops entries; a walk that started in an
    /// older epoch does not fill the caches (so no fill can outlive an invalidation that
    /// completed after the walk read the tables).
    epoch: AtomicU64,
    context_cache: ContextCache,
    paging_cache: PagingCache,
    iotlb: Iotlb,
    faults: FaultRecorder,
    queue: Mutex<invalidation::QueueState>,
    /// Subscribers to invalidation progress (`invalidation::doorbell`).
    doorbells: Mutex<Vec<std::sync::Weak<dyn invalidation::InvalidationDoorbell>>>,
    prq: prq::PageRequestQueue,
    /// PMEN, PLMBASE, PLMLIMIT, PHMBASE, PHMLIMIT, with EPM mirrored for the request path.
    pmr: pmr::ProtectedMemory,
    interrupts: interrupt::InterruptRemapper,
    /// Translated-request checking: the switch per function and what each was granted.
    grants: GrantTable,
    counters: Counters,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit")
            .field("config", &self.config)
            .field("translation_enabled", &self.translation_enabled.load(Ordering::Relaxed))
            .field("root_table", &Hpa(self.root_table.load(Ordering::Relaxed)))
            .finish_non_exhaustive()
    }
}

use crate::ids::Hpa;

/// Builds a [`Unit`] with what it is wired to besides its memory: who hears its events and
/// which clock it reads.
#[derive(Debug)]
#[must_use]
pub struct UnitBuilder {
    config: UnitConfig,
    memory: Arc<HostMemory>,
    events: Arc<dyn UnitEvents>,
    clock: Arc<dyn Clock>,
}

impl UnitBuilder {
    /// Delivers the unit's notifications to `events` (default: [`NoEvents`]).
    pub fn events(mut self, events: Arc<dyn UnitEvents>) -> Self {
        self.events = events;
        self
    }

    /// Reads time from `clock` (default: [`SystemClock`]); tests pass a
    /// [`crate::clock::ManualClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The unit, in its reset state.
    pub fn build(self) -> Unit {
        Unit::build(self)
    }
}

impl Unit {
    /// A unit in its reset state (translation disabled, no root table) over `memory`.
    pub fn new(config: UnitConfig, memory: Arc<HostMemory>) -> Self {
        Self::builder(config, memory).build()
    }

    /// As [`Unit::new`], delivering notifications to `events`.
    pub fn with_events(config: UnitConfig, memory: Arc<HostMemory>, events: Arc<dyn UnitEvents>) -> Self {
        Self::builder(config, memory).events(events).build()
    }

    /// A builder for a unit over `memory`, with no event subscriber and the system clock
    /// until told otherwise.
    pub fn builder(config: UnitConfig, memory: Arc<HostMemory>) -> UnitBuilder {
        UnitBuilder { config, memory, events: Arc::new(NoEvents), clock: Arc::new(SystemClock) }
    }

    fn build(UnitBuilder { config, memory, events, clock }: UnitBuilder) -> Self {
        Self {
            config,
            memory,
            events,
            regs: Mutex::new(mmio::RegisterFile::default()),
            translation_enabled: AtomicBool::new(false),
            root_table: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            context_cache: ContextCache::new(config.context_cache),
            paging_cache: PagingCache::new(config.paging_cache),
            iotlb: Iotlb::new(config.iotlb),
            faults: FaultRecorder::new(),
            queue: Mutex::new(invalidation::QueueState::default()),
            doorbells: Mutex::new(Vec::new()),
            prq: prq::PageRequestQueue::new(),
            pmr: pmr::ProtectedMemory::default(),
            interrupts: interrupt::InterruptRemapper::new(config.interrupt_cache)
                .unwrap_or_default()
                .with_stale_detection(config.stale_detection),
            grants: GrantTable::new(config.translated_grants),
            counters: Counters::default(),
            clock,
        }
    }

    /// The clock the unit reads (the driver on it reads the same one).
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The host memory the unit translates into.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.memory
    }

    /// Whether GSTS.TES is set.
    pub fn translation_enabled(&self) -> bool {
        self.translation_enabled.load(Ordering::Acquire)
    }

    /// The faults currently held in the fault recording registers.
    pub fn fault_records(&self) -> Vec<FaultRecord> {
        self.faults.records()
    }

    /// A snapshot of the unit's counters.
    pub fn stats(&self) -> UnitStats {
        self.counters.snapshot()
    }

    /// Entries held by each cache.
    pub fn cache_occupancy(&self) -> CacheOccupancy {
        CacheOccupancy { context: self.context_cache.len(), paging: self.paging_cache.len(), iotlb: self.iotlb.len() }
    }

    #[inline]
    fn current_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    #[inline]
    fn epoch_is(&self, epoch: u64) -> bool {
        self.epoch.load(Ordering::SeqCst) == epoch
    }

    /// Starts an invalidation: fills from walks begun before this point are refused.
    fn begin_invalidation(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}
