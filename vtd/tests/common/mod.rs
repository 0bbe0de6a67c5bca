//! A hand-rolled table builder for unit tests: writes raw root, context and page-table
//! entries into host memory, independently of the driver model, so that malformed tables
//! can be built and the driver's own encoding is checked by a second implementation.

#![allow(dead_code, unreachable_pub, clippy::too_many_arguments)]

use std::collections::HashMap;
use std::sync::Arc;

use dmar_vtd::clock::{Clock, SystemClock};
use dmar_vtd::unit::regs::{self, ccmd, gcmd, iotlb};
use dmar_vtd::unit::tables::{AddressWidth, ContextEntry, RootEntry, SlPte, TranslationType, level_index};
use dmar_vtd::unit::{HostMemory, Unit, UnitConfig};
use dmar_vtd::{DomainId, Hpa, Iova, SourceId};

pub const MEMORY: u64 = 4 << 30;

pub struct Rig {
    pub unit: Arc<Unit>,
    pub mem: Arc<HostMemory>,
    pub root: Hpa,
    next_frame: u64,
    context_tables: HashMap<u8, Hpa>,
}

impl Rig {
    /// A unit over 4 GiB with a root table installed and translation enabled.
    pub fn new() -> Self {
        Self::with_config(UnitConfig::default())
    }

    pub fn with_config(config: UnitConfig) -> Self {
        Self::with_events(config, Arc::new(dmar_vtd::unit::NoEvents))
    }

    pub fn with_events(config: UnitConfig, events: Arc<dyn dmar_vtd::unit::UnitEvents>) -> Self {
        Self::with_parts(config, events, Arc::new(SystemClock))
    }

    /// A unit that reads time from `clock`.
    pub fn with_clock(config: UnitConfig, clock: Arc<dyn Clock>) -> Self {
        Self::with_parts(config, Arc::new(dmar_vtd::unit::NoEvents), clock)
    }

    pub fn with_parts(config: UnitConfig, events: Arc<dyn dmar_vtd::unit::UnitEvents>, clock: Arc<dyn Clock>) -> Self {
        let mem = Arc::new(HostMemory::new(MEMORY).expect("memory"));
        let unit = Arc::new(Unit::builder(config, mem.clone()).events(events).clock(clock).build());
        let mut rig = Self { unit, mem, root: Hpa(0), next_frame: 0x100_0000, context_tables: HashMap::new() };
        rig.root = rig.alloc();
        rig.unit.write64(regs::RTADDR, rig.root.0).expect("rtaddr");
        rig.unit.write32(regs::GCMD, gcmd::SRTP).expect("srtp");
        assert_ne!(rig.unit.read32(regs::GSTS).expect("gsts") & gcmd::SRTP, 0, "RTPS");
        rig.unit.write32(regs::GCMD, gcmd::TE).expect("te");
        assert_ne!(rig.unit.read32(regs::GSTS).expect("gsts") & gcmd::TE, 0, "TES");
        rig
    }

    /// A zeroed 4 KiB frame.
    pub fn alloc(&mut self) -> Hpa {
        let f = Hpa(self.next_frame);
        self.next_frame += 4096;
        f
    }

    pub fn set_root(&self, bus: u8, entry: RootEntry) {
        let a = self.root.0 + u64::from(bus) * 16;
        self.mem.write_u64(Hpa(a), entry.lo).expect("root lo");
        self.mem.write_u64(Hpa(a + 8), entry.hi).expect("root hi");
    }

    fn context_table(&mut self, bus: u8) -> Hpa {
        if let Some(t) = self.context_tables.get(&bus) {
            return *t;
        }
        let t = self.alloc();
        self.set_root(bus, RootEntry::new(t));
        self.context_tables.insert(bus, t);
        t
    }

    pub fn context_addr(&mut self, sid: SourceId) -> Hpa {
        Hpa(self.context_table(sid.bus()).0 + u64::from(sid.devfn()) * 16)
    }

    pub fn set_context(&mut self, sid: SourceId, entry: ContextEntry) {
        let a = self.context_addr(sid);
        self.mem.write_u64(a, entry.lo).expect("ctx lo");
        self.mem.write_u64(Hpa(a.0 + 8), entry.hi).expect("ctx hi");
    }

    /// Attaches `sid` to a fresh page-table of `aw`; returns the top table.
    pub fn attach(&mut self, sid: SourceId, did: u16, tt: TranslationType, aw: AddressWidth) -> Hpa {
        let top = self.alloc();
        self.set_context(sid, ContextEntry::new(DomainId(did), tt, aw, top, false));
        top
    }

    /// The address of the entry for `iova` at `level`, creating tables above it.
    pub fn entry_addr(&mut self, top: Hpa, aw: AddressWidth, iova: Iova, level: u32) -> Hpa {
        let mut table = top;
        let mut l = aw.levels();
        while l > level {
            let a = Hpa(table.0 + level_index(iova, l) * 8);
            let pte = SlPte::from_bits(self.mem.read_u64(a).expect("pte"));
            table = if pte.present() {
                pte.addr()
            } else {
                let t = self.alloc();
                self.mem.write_u64(a, SlPte::table(t).to_bits()).expect("pte");
                t
            };
            l -= 1;
        }
        Hpa(table.0 + level_index(iova, level) * 8)
    }

    /// Maps one page of the size `level` gives (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    pub fn map(
        &mut self,
        top: Hpa,
        aw: AddressWidth,
        iova: Iova,
        hpa: Hpa,
        level: u32,
        read: bool,
        write: bool,
    ) -> Hpa {
        let a = self.entry_addr(top, aw, iova, level);
        self.mem.write_u64(a, SlPte::leaf(hpa, read, write, level > 1).to_bits()).expect("leaf");
        a
    }

    /// Global context-cache and IOTLB invalidation through the registers.
    pub fn invalidate_all(&self) {
        self.unit.write64(regs::CCMD, ccmd::ICC | (ccmd::GLOBAL << ccmd::CIRG_SHIFT)).expect("ccmd");
        self.unit.write64(regs::IOTLB, iotlb::IVT | (iotlb::GLOBAL << iotlb::IIRG_SHIFT)).expect("iotlb");
    }

    /// Sets up a 256-entry invalidation queue and enables queued invalidation (keeping TE).
    pub fn enable_queue(&mut self) -> Hpa {
        let q = self.alloc();
        self.unit.write64(regs::IQA, q.0).expect("iqa");
        // GCMD holds the full command state: keep what is enabled (Linux `iommu->gcmd`).
        let state = self.unit.read32(regs::GSTS).expect("gsts") & (gcmd::TE | gcmd::IRE | gcmd::CFI);
        self.unit.write32(regs::GCMD, state | gcmd::QIE).expect("qie");
        assert_ne!(self.unit.read32(regs::GSTS).expect("gsts") & gcmd::QIE, 0, "QIES");
        q
    }

    /// Writes descriptors at the tail and moves IQT past them (32-bit write, as Linux).
    pub fn submit(&self, descs: &[(u64, u64)]) {
        let iqa = self.unit.read64(regs::IQA).expect("iqa");
        let base = iqa & !0xfff;
        let entries = 1u64 << (8 + (iqa & 7));
        let mut tail = self.unit.read64(regs::IQT).expect("iqt") >> 4;
        for (qw0, qw1) in descs {
            self.mem.write_u64(Hpa(base + tail * 16), *qw0).expect("qw0");
            self.mem.write_u64(Hpa(base + tail * 16 + 8), *qw1).expect("qw1");
            tail = (tail + 1) % entries;
        }
        self.unit.write32(regs::IQT, (tail << 4) as u32).expect("iqt");
    }

    /// Page-selective IOTLB invalidation of one 4 KiB page through the registers.
    pub fn invalidate_page(&self, did: u16, iova: Iova) {
        self.unit.write64(regs::IVA, iova.0 & !0xfff).expect("iva");
        self.unit
            .write64(
                regs::IOTLB,
                iotlb::IVT | (iotlb::PAGE << iotlb::IIRG_SHIFT) | (u64::from(did) << iotlb::DID_SHIFT),
            )
            .expect("iotlb");
    }
}

/// Every interrupt message a unit sends, with the event that sent it.
#[derive(Debug, Default)]
pub struct Messages(pub parking_lot::Mutex<Vec<(dmar_vtd::unit::EventSource, u64, u32)>>);

impl dmar_vtd::unit::UnitEvents for Messages {
    fn interrupt_message(&self, source: dmar_vtd::unit::EventSource, addr: u64, data: u32) {
        self.0.lock().push((source, addr, data));
    }
}

impl Messages {
    /// The messages sent since the last call.
    pub fn take(&self) -> Vec<(dmar_vtd::unit::EventSource, u64, u32)> {
        std::mem::take(&mut *self.0.lock())
    }

    /// How many messages were sent.
    pub fn count(&self) -> usize {
        self.0.lock().len()
    }
}

/// Counts rings of the invalidation doorbell.
#[derive(Debug, Default)]
pub struct Bell(pub std::sync::atomic::AtomicUsize);

impl dmar_vtd::unit::InvalidationDoorbell for Bell {
    fn ring(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}
