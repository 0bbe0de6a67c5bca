//! A VT-d driver written only against dmar's raw Control calls, for the acceptance tests of
//! client-driven units: the register offsets and bit positions it needs (from the VT-d
//! specification, each with its section), encoders for the root, context, page-table and
//! interrupt-remapping entries and the invalidation descriptors, and [`RawUnit`], a claimed
//! unit programmed through ReadRegister, WriteRegister, ReadMemory and WriteMemory as a
//! kernel programs MMIO and RAM (the sequences of Linux `drivers/iommu/intel/`).
//!
//! Deliberately independent of `dmar_vtd`'s own register map and codecs: the point is to
//! check the server against the specification, not against itself.
//!
//! Every wait is bounded by [`WAIT`], so a broken server fails a test instead of hanging it.

use std::time::Duration;

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::{
    ClaimUnitRequest, ReadMemoryRequest, ReadRegisterRequest, ReleaseUnitRequest, UnitLease, WriteMemoryRequest,
    WriteRegisterRequest,
};
use tonic::transport::Channel;

/// How long any one thing the tests wait for may take.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// Size of a unit's register window (VT-d 10.4: one 4 KiB page).
pub(crate) const WINDOW: u64 = 0x1000;

/// Register offsets (VT-d 10.4).
pub(crate) mod reg {
    /// VER_REG, 32 bits (10.4.1).
    pub(crate) const VER: u64 = 0x00;
    /// CAP_REG, 64 bits (10.4.2).
    pub(crate) const CAP: u64 = 0x08;
    /// ECAP_REG, 64 bits (10.4.3).
    pub(crate) const ECAP: u64 = 0x10;
    /// GCMD_REG, 32 bits, write-only (10.4.4).
    pub(crate) const GCMD: u64 = 0x18;
    /// GSTS_REG, 32 bits, read-only (10.4.5).
    pub(crate) const GSTS: u64 = 0x1c;
    /// RTADDR_REG, 64 bits (10.4.6).
    pub(crate) const RTADDR: u64 = 0x20;
    /// FSTS_REG, 32 bits (10.4.9).
    pub(crate) const FSTS: u64 = 0x34;
    /// FECTL_REG (10.4.10).
    pub(crate) const FECTL: u64 = 0x38;
    /// FEDATA_REG (10.4.11).
    pub(crate) const FEDATA: u64 = 0x3c;
    /// FEADDR_REG (10.4.12).
    pub(crate) const FEADDR: u64 = 0x40;
    /// FEUADDR_REG (10.4.13).
    pub(crate) const FEUADDR: u64 = 0x44;
    /// PMEN_REG, 32 bits (10.4.16): protected memory enable.
    pub(crate) const PMEN: u64 = 0x64;
    /// PLMBASE_REG, 32 bits (10.4.17).
    pub(crate) const PLMBASE: u64 = 0x68;
    /// PLMLIMIT_REG, 32 bits (10.4.18).
    pub(crate) const PLMLIMIT: u64 = 0x6c;
    /// PHMLIMIT_REG, 64 bits (10.4.20): the last protected-memory register.
    pub(crate) const PHMLIMIT: u64 = 0x78;
    /// IQH_REG, 64 bits (10.4.21).
    pub(crate) const IQH: u64 = 0x80;
    /// IQT_REG, 64 bits (10.4.22).
    pub(crate) const IQT: u64 = 0x88;
    /// IQA_REG, 64 bits (10.4.23).
    pub(crate) const IQA: u64 = 0x90;
    /// ICS_REG, 32 bits (10.4.24).
    pub(crate) const ICS: u64 = 0x9c;
    /// IECTL_REG (10.4.25).
    pub(crate) const IECTL: u64 = 0xa0;
    /// IEDATA_REG (10.4.26).
    pub(crate) const IEDATA: u64 = 0xa4;
    /// IEADDR_REG (10.4.27).
    pub(crate) const IEADDR: u64 = 0xa8;
    /// IEUADDR_REG (10.4.28).
    pub(crate) const IEUADDR: u64 = 0xac;
    /// IQERCD_REG, 64 bits (10.4.29).
    pub(crate) const IQERCD: u64 = 0xb0;
    /// IRTA_REG, 64 bits (10.4.30).
    pub(crate) const IRTA: u64 = 0xb8;
    /// PECTL_REG (10.4.35).
    pub(crate) const PECTL: u64 = 0xe0;
}

/// CAP_REG fields (VT-d 10.4.2).
pub(crate) mod cap {
    /// PLMR, bit 5: the protected low-memory region is supported.
    pub(crate) const PLMR: u64 = 1 << 5;
    /// SAGAW bit 2 (bits 12:8): 48-bit AGAW, 4-level tables.
    pub(crate) const SAGAW_48: u64 = 1 << 10;
    /// FRO, bits 33:24: fault recording registers at FRO × 16.
    pub(crate) const fn fault_records_offset(cap: u64) -> u64 {
        ((cap >> 24) & 0x3ff) * 16
    }
    /// NFR, bits 47:40: the number of fault recording registers, minus one.
    pub(crate) const fn fault_records(cap: u64) -> u64 {
        ((cap >> 40) & 0xff) + 1
    }
}

/// ECAP_REG fields (VT-d 10.4.3).
pub(crate) mod ecap {
    /// QI: queued invalidation.
    pub(crate) const QI: u64 = 1 << 1;
    /// DT: device-TLBs (ATS).
    pub(crate) const DT: u64 = 1 << 2;
    /// IR: interrupt remapping.
    pub(crate) const IR: u64 = 1 << 3;
}

/// GCMD command bits and the GSTS status bits at the same positions (VT-d 10.4.4, 10.4.5).
pub(crate) mod gcmd {
    /// TE / TES: translation enable.
    pub(crate) const TE: u32 = 1 << 31;
    /// SRTP / RTPS: set root table pointer.
    pub(crate) const SRTP: u32 = 1 << 30;
    /// QIE / QIES: queued invalidation enable.
    pub(crate) const QIE: u32 = 1 << 26;
    /// IRE / IRES: interrupt remapping enable.
    pub(crate) const IRE: u32 = 1 << 25;
    /// SIRTP / IRTPS: set interrupt remapping table pointer.
    pub(crate) const SIRTP: u32 = 1 << 24;
    /// The GSTS bits that are persistent state; the others report one-shot commands and
    /// must not be written back (10.4.4: "Status & 0x96FFFFFF"; Linux keeps `iommu->gcmd`).
    pub(crate) const PERSISTENT: u32 = 0x96ff_ffff;
}

/// FSTS_REG bits (VT-d 10.4.9).
pub(crate) mod fsts {
    /// PFO: primary fault overflow (write 1 to clear).
    pub(crate) const PFO: u32 = 1 << 0;
    /// PPF: primary pending fault (read-only: some FRCD has F set).
    pub(crate) const PPF: u32 = 1 << 1;
    /// IQE: invalidation queue error (write 1 to clear).
    pub(crate) const IQE: u32 = 1 << 4;
    /// FRI, bits 15:8: the fault record index of the first pending fault.
    pub(crate) const fn fault_record_index(fsts: u32) -> u64 {
        ((fsts >> 8) & 0xff) as u64
    }
}

/// PMEN_REG bits (VT-d 10.4.16).
pub(crate) mod pmen {
    /// EPM: enable protected memory (both regions).
    pub(crate) const EPM: u32 = 1 << 31;
    /// PRS: protected region status (read-only): the regions are enforced.
    pub(crate) const PRS: u32 = 1 << 0;
}

/// The protected low-memory region's granularity (VT-d 10.4.17, 10.4.18: PLMBASE and
/// PLMLIMIT implement address bits 31:N, N at least 21).
pub(crate) const PMR_GRANULE: u64 = 2 << 20;

/// Event control registers, FECTL, IECTL and PECTL (VT-d 10.4.10, 10.4.25, 10.4.35).
pub(crate) mod ectl {
    /// IM: interrupt mask (set at reset).
    pub(crate) const IM: u32 = 1 << 31;
    /// IP: interrupt pending (read-only).
    pub(crate) const IP: u32 = 1 << 30;
}

/// ICS_REG (VT-d 10.4.24): IWC, an invalidation wait with IF completed (write 1 to clear).
pub(crate) const ICS_IWC: u32 = 1 << 0;

/// A fault recording register's high quadword (VT-d 10.4.14; bits 127:64 of the register).
pub(crate) mod frcd {
    /// SID, bits 79:64.
    pub(crate) const fn sid(hi: u64) -> u16 {
        hi as u16
    }
    /// FR, bits 103:96: the fault reason.
    pub(crate) const fn reason(hi: u64) -> u8 {
        (hi >> 32) as u8
    }
    /// T, bit 126: 1 for a read, 0 for a write.
    pub(crate) const T: u64 = 1 << 62;
    /// F, bit 127: the record is valid; write 1 to clear.
    pub(crate) const F: u64 = 1 << 63;
    /// The top doubleword of the register, holding F: Linux clears F with one 32-bit write
    /// of `DMA_FRCD_F` there (`dmar_fault`).
    pub(crate) const F_DWORD: u64 = 12;
    /// F within that doubleword.
    pub(crate) const F_IN_DWORD: u32 = 1 << 31;
}

/// Fault reasons (VT-d 7.1.3, table "Unrecoverable fault conditions").
pub(crate) mod reason {
    /// The root entry for the request's bus is not present.
    pub(crate) const ROOT_ENTRY_NOT_PRESENT: u8 = 0x01;
    /// A write through a second-stage entry without W (a not-present entry included).
    pub(crate) const NO_WRITE: u8 = 0x05;
    /// A read through a second-stage entry without R.
    pub(crate) const NO_READ: u8 = 0x06;
}

/// The bytes of `qwords`, little-endian, as memory holds them.
pub(crate) fn le(qwords: &[u64]) -> Vec<u8> {
    qwords.iter().flat_map(|q| q.to_le_bytes()).collect()
}

/// A legacy-mode root entry (VT-d 9.1): P and the context-table pointer; the high quadword
/// is reserved.
pub(crate) fn root_entry(context_table: u64) -> [u64; 2] {
    [context_table | 1, 0]
}

/// A legacy-mode context entry (VT-d 9.3): lo = P, TT[3:2], SLPTPTR[63:12]; hi = AW[2:0]
/// (2: 48-bit, 4 levels), DID[23:8]. TT is 01b with `device_tlb` (untranslated requests
/// through the second-stage tables, plus ATS translation requests and translated
/// requests), else 00b (untranslated requests only).
pub(crate) fn context_entry(slptptr: u64, domain: u16, aw: u64, device_tlb: bool) -> [u64; 2] {
    [slptptr | (u64::from(device_tlb) << 2) | 1, aw | (u64::from(domain) << 8)]
}

/// A second-stage paging entry (VT-d 9.8): R bit 0, W bit 1, the address in 51:12. Non-leaf
/// entries carry R and W too: a walk needs them at every level.
pub(crate) fn ss_entry(addr: u64, read: bool, write: bool) -> u64 {
    addr | u64::from(read) | (u64::from(write) << 1)
}

/// The index of `iova` in a table at `level` (1 = the last level; VT-d 3.7: 9 bits a level).
pub(crate) fn ss_index(iova: u64, level: u32) -> u64 {
    (iova >> (12 + 9 * (level - 1))) & 0x1ff
}

/// A remapped-format interrupt remapping table entry (VT-d 9.10) for a fixed, edge,
/// physical-destination interrupt: P bit 0, V[23:16], DST[63:32] with the xAPIC id in
/// DST[15:8]; hi: SID[79:64], SQ[81:80] = 0, SVT[83:82] = 01b (verify the whole requester
/// id) when `verify` names one.
pub(crate) fn irte(vector: u8, xapic_destination: u8, verify: Option<u16>) -> [u64; 2] {
    let lo = 1 | (u64::from(vector) << 16) | (u64::from(xapic_destination) << 40);
    let hi = verify.map_or(0, |sid| u64::from(sid) | (1 << 18));
    [lo, hi]
}

/// A remappable-format MSI address (VT-d 5.1.2.2): 0xFEE in 31:20, HANDLE[14:0] in 19:5,
/// interrupt format (bit 4) = 1, SHV (bit 3), HANDLE[15] in bit 2.
pub(crate) fn remappable_msi_address(handle: u16, shv: bool) -> u64 {
    0xfee0_0000 | (u64::from(handle & 0x7fff) << 5) | (1 << 4) | (u64::from(shv) << 3) | (u64::from(handle >> 15) << 2)
}

/// 128-bit invalidation descriptors (VT-d 6.5.2); `[qw0, qw1]`.
pub(crate) mod desc {
    /// Context-cache invalidation, global (6.5.2.1: type 1, G[5:4] = 01b).
    pub(crate) const fn context_global() -> [u64; 2] {
        [0x1 | (1 << 4), 0]
    }

    /// IOTLB invalidation, global, draining reads and writes (6.5.2.3: type 2, G[5:4] = 01b,
    /// DW bit 6, DR bit 7; Linux sets the drains when CAP.DWD/DRD say so).
    pub(crate) const fn iotlb_global() -> [u64; 2] {
        [0x2 | (1 << 4) | (1 << 6) | (1 << 7), 0]
    }

    /// Device-TLB invalidation of one 4 KiB page (6.5.2.5: type 3, MIP/QDEP[20:16],
    /// SID[47:32]; qw1: ADDR[63:12], S bit 0 = 0).
    pub(crate) const fn device_tlb_page(sid: u16, queue_depth: u8, addr: u64) -> [u64; 2] {
        [0x3 | (((queue_depth & 0x1f) as u64) << 16) | ((sid as u64) << 32), addr & !0xfff]
    }

    /// Interrupt-entry-cache invalidation, global (6.5.2.7: type 4, G bit 4 = 0).
    pub(crate) const fn iec_global() -> [u64; 2] {
        [0x4, 0]
    }

    /// Interrupt-entry-cache invalidation of one entry (6.5.2.7: G = 1, IM[31:27] = 0,
    /// IIDX[47:32]).
    pub(crate) const fn iec_entry(index: u16) -> [u64; 2] {
        [0x4 | (1 << 4) | ((index as u64) << 32), 0]
    }

    /// Invalidation wait (6.5.2.8: type 5, IF bit 4, SW bit 5, FN bit 6, STATUS_DATA[63:32];
    /// qw1: STATUS_ADDR[63:2]).
    pub(crate) const fn wait(status: Option<(u64, u32)>, interrupt: bool) -> [u64; 2] {
        let (sw, addr, data) = match status {
            Some((addr, data)) => (1u64, addr, data),
            None => (0, 0, 0),
        };
        [0x5 | ((interrupt as u64) << 4) | (sw << 5) | (1 << 6) | ((data as u64) << 32), addr]
    }
}

/// The status `call` fails with (within [`WAIT`]); it must fail.
pub(crate) async fn refused<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> tonic::Status {
    match within(what, call).await {
        Ok(v) => panic!("{what}: expected a refusal, got {v:?}"),
        Err(s) => s,
    }
}

/// `fut`, which must finish within [`WAIT`].
pub(crate) async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// The next message of a server stream, which must come within [`WAIT`].
pub(crate) async fn next<T>(stream: &mut tonic::Streaming<T>, what: &str) -> T {
    within(what, stream.message())
        .await
        .unwrap_or_else(|s| panic!("{what}: stream failed: {s}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

/// Reads a register of `unit` (anyone may: no lease needed).
pub(crate) async fn read_register(c: &mut ControlClient<Channel>, unit: u32, offset: u64, width: u32) -> u64 {
    let r = ReadRegisterRequest { offset, width, unit };
    within("ReadRegister", c.read_register(r))
        .await
        .unwrap_or_else(|s| panic!("read of unit {unit}'s register {offset:#x}: {s}"))
        .into_inner()
        .value
}

/// Every 32-bit register of `unit`'s window, offset 0 to 0xffc, in order.
pub(crate) async fn read_window(c: &mut ControlClient<Channel>, unit: u32) -> Vec<u32> {
    let mut all = Vec::with_capacity((WINDOW / 4) as usize);
    for offset in (0..WINDOW).step_by(4) {
        all.push(read_register(c, unit, offset, 4).await as u32);
    }
    all
}

/// A bump allocator of 4 KiB frames in a client unit's region, remembering what it handed
/// out (to check later that a release zeroed it).
#[derive(Debug)]
pub(crate) struct Frames {
    next: u64,
    end: u64,
    /// Every frame handed out, in order.
    pub(crate) taken: Vec<u64>,
}

impl Frames {
    /// Frames from `[base, base + size)`.
    pub(crate) fn new(base: u64, size: u64) -> Self {
        Self { next: base, end: base + size, taken: Vec::new() }
    }

    /// The next free frame (zero: the region starts zeroed and frames are never reused).
    pub(crate) fn frame(&mut self) -> u64 {
        assert!(self.next + 0x1000 <= self.end, "the region is full");
        let f = self.next;
        self.next += 0x1000;
        self.taken.push(f);
        f
    }
}

/// The invalidation queue as its driver tracks it (VT-d 6.5.2).
#[derive(Debug, Clone, Copy)]
struct Queue {
    base: u64,
    entries: u64,
    tail: u64,
    /// Where wait descriptors write their status.
    status: u64,
    /// The last status value used (each wait writes a new one).
    token: u32,
}

/// A claimed client-driven unit, programmed as a driver programs hardware.
#[derive(Debug)]
pub(crate) struct RawUnit {
    c: ControlClient<Channel>,
    /// The unit's number.
    pub(crate) unit: u32,
    /// The lease presented on every write.
    pub(crate) lease: String,
    /// The claim stream: the lease lasts while it is open.
    claim: tonic::Streaming<UnitLease>,
    queue: Option<Queue>,
}

impl RawUnit {
    /// Claims `unit` over `c`'s connection; the server's refusal is the error.
    pub(crate) async fn claim(mut c: ControlClient<Channel>, unit: u32) -> Result<Self, tonic::Status> {
        let mut claim = within("ClaimUnit", c.claim_unit(ClaimUnitRequest { unit })).await?.into_inner();
        let first = next(&mut claim, "the lease").await;
        assert_eq!(first.unit, unit, "the lease names the unit claimed");
        assert!(!first.lease.is_empty(), "a lease is a secret, not nothing");
        Ok(Self { c, unit, lease: first.lease, claim, queue: None })
    }

    /// The Control client the unit is driven over.
    pub(crate) fn control(&mut self) -> &mut ControlClient<Channel> {
        &mut self.c
    }

    /// Releases the lease and checks that the claim stream then ends.
    pub(crate) async fn release(mut self) {
        let r = ReleaseUnitRequest { unit: self.unit, lease: self.lease.clone() };
        within("ReleaseUnit", self.c.release_unit(r)).await.expect("release");
        let end = within("the claim stream's end", self.claim.message()).await;
        assert!(matches!(end, Ok(None)), "the claim stream ends when the lease is released: {end:?}");
    }

    async fn read(&mut self, offset: u64, width: u32) -> u64 {
        read_register(&mut self.c, self.unit, offset, width).await
    }

    async fn write(&mut self, offset: u64, width: u32, value: u64) {
        let r = WriteRegisterRequest { offset, width, value, unit: self.unit, lease: self.lease.clone() };
        within("WriteRegister", self.c.write_register(r))
            .await
            .unwrap_or_else(|s| panic!("write of {value:#x} to register {offset:#x}: {s}"));
    }

    /// A 32-bit register read.
    pub(crate) async fn read32(&mut self, offset: u64) -> u32 {
        self.read(offset, 4).await as u32
    }

    /// A 64-bit register read.
    pub(crate) async fn read64(&mut self, offset: u64) -> u64 {
        self.read(offset, 8).await
    }

    /// A 32-bit register write with the lease.
    pub(crate) async fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, 4, u64::from(value)).await
    }

    /// A 64-bit register write with the lease.
    pub(crate) async fn write64(&mut self, offset: u64, value: u64) {
        self.write(offset, 8, value).await
    }

    /// Every 32-bit register of the window, offset 0 to 0xffc.
    pub(crate) async fn window(&mut self) -> Vec<u32> {
        read_window(&mut self.c, self.unit).await
    }

    /// Writes host memory with the lease.
    pub(crate) async fn write_mem(&mut self, address: u64, data: Vec<u8>) {
        let r = WriteMemoryRequest { address, data, lease: self.lease.clone() };
        within("WriteMemory", self.c.write_memory(r)).await.unwrap_or_else(|s| panic!("write at {address:#x}: {s}"));
    }

    /// Writes the 64-bit words `qwords` at `address`.
    pub(crate) async fn write_qwords(&mut self, address: u64, qwords: &[u64]) {
        self.write_mem(address, le(qwords)).await
    }

    /// Reads host memory.
    pub(crate) async fn read_mem(&mut self, address: u64, length: u32) -> Vec<u8> {
        let r = ReadMemoryRequest { address, length };
        within("ReadMemory", self.c.read_memory(r))
            .await
            .unwrap_or_else(|s| panic!("read at {address:#x}: {s}"))
            .into_inner()
            .data
    }

    /// Reads a little-endian 32-bit word of memory.
    pub(crate) async fn read_mem32(&mut self, address: u64) -> u32 {
        let b = self.read_mem(address, 4).await;
        u32::from_le_bytes(b.try_into().expect("4 bytes"))
    }

    /// Turns the protected memory regions off (Linux `iommu_disable_protect_mem_regions`):
    /// EPM cleared, then PMEN.PRS polled until clear.
    pub(crate) async fn disable_protected_memory(&mut self) {
        let pmen = self.read32(reg::PMEN).await;
        self.write32(reg::PMEN, pmen & !pmen::EPM).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let pmen = self.read32(reg::PMEN).await;
            if pmen & pmen::PRS == 0 {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "PMEN {pmen:#010x}: PRS never cleared");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Polls GSTS until `bits` are all set (`set`) or all clear.
    pub(crate) async fn wait_gsts(&mut self, bits: u32, set: bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let gsts = self.read32(reg::GSTS).await;
            let shown = if set { gsts & bits == bits } else { gsts & bits == 0 };
            if shown {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "GSTS {gsts:#010x} never showed {bits:#x} = {set}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Issues one GCMD command and waits for its status (VT-d 10.4.4: software writes the
    /// persistent GSTS bits back with the one command bit it adds, then polls GSTS).
    pub(crate) async fn gcmd(&mut self, command: u32) {
        let status = self.read32(reg::GSTS).await & gcmd::PERSISTENT;
        self.write32(reg::GCMD, status | command).await;
        self.wait_gsts(command, true).await;
    }

    /// Sets up the invalidation queue (VT-d 6.5.2; Linux `dmar_enable_qi`): 256 128-bit
    /// descriptors at `base` (IQA.QS = 0, IQA.DW = 0), wait descriptors writing their status
    /// at `status`; IQT back to 0, then GCMD.QIE and GSTS.QIES.
    pub(crate) async fn enable_queue(&mut self, base: u64, status: u64) {
        assert_eq!(base & 0xfff, 0, "the queue base is 4 KiB aligned");
        self.write64(reg::IQT, 0).await;
        self.write64(reg::IQA, base).await;
        self.gcmd(gcmd::QIE).await;
        self.queue = Some(Queue { base, entries: 256, tail: 0, status, token: 0 });
    }

    /// Writes `descriptors` into the queue at its tail and moves IQT past them.
    pub(crate) async fn submit(&mut self, descriptors: &[[u64; 2]]) {
        let mut q = self.queue.expect("the invalidation queue is enabled");
        for d in descriptors {
            self.write_qwords(q.base + q.tail * 16, d).await;
            q.tail = (q.tail + 1) % q.entries;
        }
        self.write64(reg::IQT, q.tail << 4).await;
        self.queue = Some(q);
    }

    /// A fresh status value and the address wait descriptors write it to.
    pub(crate) fn next_status(&mut self) -> (u64, u32) {
        let q = self.queue.as_mut().expect("the invalidation queue is enabled");
        q.token += 1;
        (q.status, 0x5a00_0000 | q.token)
    }

    /// Polls the status word until it holds `token`; an invalidation queue error fails the
    /// wait at once, with IQERCD.
    pub(crate) async fn wait_status(&mut self, (address, token): (u64, u32)) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.read_mem32(address).await == token {
                return;
            }
            let fsts = self.read32(reg::FSTS).await;
            if fsts & fsts::IQE != 0 {
                let iqercd = self.read64(reg::IQERCD).await;
                panic!("the invalidation queue stopped: FSTS {fsts:#x}, IQERCD {iqercd:#x}");
            }
            assert!(tokio::time::Instant::now() < deadline, "status {token:#x} never written at {address:#x}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Submits `descriptors` followed by a wait descriptor with a status write, and waits
    /// for the status (Linux `qi_submit_sync`).
    pub(crate) async fn invalidate(&mut self, descriptors: &[[u64; 2]]) {
        let status = self.next_status();
        let mut all = descriptors.to_vec();
        all.push(desc::wait(Some(status), false));
        self.submit(&all).await;
        self.wait_status(status).await;
    }
}
