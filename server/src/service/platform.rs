//! The server's platform: the remapping units it serves over one host memory, the routing
//! of a requester id to its unit, the DMAR table, and who may program a client-driven unit
//! (its lease).
//!
//! A built-in-driver unit is programmed by the server's driver only: its registers and the
//! built-in driver's region of memory are read-only to clients. A client-driven unit starts
//! at its VT-d reset values and is programmed by whichever Control client holds its lease
//! ([`Units::claim`]): one holder at a time, released explicitly, when its claim stream
//! closes, or when the server stops. A release resets the unit and zeroes its region, so
//! the next holder starts from reset and reads nothing the last one left.
//!
//! Firmware's part: before a client-driven unit is handed over (at start, and after each
//! release) the server does what platform firmware with pre-boot DMA protection does. It
//! programs the unit's protected memory regions over all of host memory and enables them
//! (VT-d 10.4.16-10.4.20; `Unit::reset_protected` enables them before translation goes
//! off, so there is no unprotected moment), so the devices behind the unit reach no memory
//! until its owner has enabled translation and cleared PMEN.EPM, as Linux does after
//! `iommu_enable_translation`. Every other register is at its reset value. `ResetUnit` is a
//! hardware reset: it clears the regions too, by the owner's choice.
//!
//! What the region rules are not: a boundary between operators. An operator is trusted
//! like root on the host (docs/SECURITY.md): the tables of a unit it owns, an identity
//! domain or an ATS attach on a built-in unit can give its devices any host address. The
//! rules keep clients from overwriting each other's and the built-in driver's tables and
//! queues through the calls that name memory (`WriteMemory`, `Map`, `SubmitInvalidations`
//! wait descriptors).
//!
//! A lease is a 128-bit random secret; the holder presents it on every write. It is
//! compared in constant time and never logged.
//!
//! Ordering: each unit's lease sits behind a read-write lock. A write on the owner's behalf
//! (register, region, reset) holds it for reading from the lease check to the end of the
//! write; a claim and a release hold it for writing, a release from taking the lease to
//! the end of the reset and the zeroing. So no write of the old owner lands after its
//! lease ended, and the next owner finds the unit reset, protected and its region zeroed.
//! (A DMA a device began through the old owner's tables before the reset may still finish
//! after it, as on a bus.)
//!
//! Not here: the units' behaviour (`dmar_vtd::unit`), the platform description and its
//! validation (`dmar_vtd::platform`), the table encoding (`dmar_vtd::acpi`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dmar_vtd::ids::{Hpa, SourceId, UnitId};
use dmar_vtd::platform::{PlatformSpec, Region, Routing, UnitDriver, UnitSpec};
use dmar_vtd::unit::{HostMemory, Unit};
use parking_lot::{RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// One unit of the platform.
#[derive(Debug)]
pub(crate) struct UnitSlot {
    pub(crate) id: UnitId,
    pub(crate) spec: UnitSpec,
    pub(crate) unit: Arc<Unit>,
    /// The lease, if held; the gate every write on the owner's behalf holds (module docs).
    lease: RwLock<Option<Lease>>,
}

/// A held lease: its secret and the signal that ends its claim stream.
#[derive(Debug)]
struct Lease {
    secret: String,
    /// Which claim this is, so a stream that ends late cannot end a newer lease.
    serial: u64,
    ended: CancellationToken,
}

/// A granted claim.
#[derive(Debug)]
pub(crate) struct Claim {
    pub(crate) unit: UnitId,
    pub(crate) secret: String,
    pub(crate) serial: u64,
    /// Cancelled when the lease ends by [`Units::release`].
    pub(crate) ended: CancellationToken,
}

/// Which lease a release ends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Holder<'a> {
    /// The caller's, proved by its secret (`ReleaseUnit`).
    Secret(&'a str),
    /// Claim `serial`'s, if it still holds the unit (its stream closed).
    Serial(u64),
}

impl UnitSlot {
    /// Whether the built-in driver drives the unit.
    pub(crate) fn is_builtin(&self) -> bool {
        self.spec.driver == UnitDriver::BuiltIn
    }

    /// The client-driven unit's region, `None` for a built-in one.
    pub(crate) fn client_region(&self) -> Option<Region> {
        match self.spec.driver {
            UnitDriver::Client { region } => Some(region),
            UnitDriver::BuiltIn => None,
        }
    }

    /// Whether a client holds the lease now.
    pub(crate) fn claimed(&self) -> bool {
        self.lease.read().is_some()
    }

    /// The lease gate, read-held, if `secret` is the lease; a refusal otherwise.
    fn leased(&self, secret: &str) -> Result<RwLockReadGuard<'_, Option<Lease>>, Status> {
        let lease = self.lease.read();
        match &*lease {
            Some(l) if same_secret(&l.secret, secret) => Ok(lease),
            Some(_) => Err(Status::permission_denied(format!("unit {} is claimed by another client", self.id))),
            None => Err(Status::permission_denied(format!(
                "unit {} ({}) is not claimed: ClaimUnit first",
                self.id, self.spec.name
            ))),
        }
    }
}

/// The units, their routing and the DMAR table.
#[derive(Debug)]
pub(crate) struct Units {
    pub(crate) spec: PlatformSpec,
    routing: Routing,
    pub(crate) memory: Arc<HostMemory>,
    slots: Vec<UnitSlot>,
    dmar: Vec<u8>,
    /// Claims granted so far (the next lease's serial).
    claims: AtomicU64,
}

/// A fresh lease secret: 128 bits from the operating system's generator, in hex.
fn new_secret() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Units {
    /// The platform `spec` over `memory`, with `units` built in spec order; the client-driven
    /// ones are handed over with firmware's DMA protection.
    pub(crate) fn new(spec: PlatformSpec, memory: Arc<HostMemory>, units: Vec<Arc<Unit>>) -> Self {
        let routing = Routing::new(&spec);
        let dmar = dmar_vtd::acpi::dmar_table(&spec);
        let slots: Vec<UnitSlot> = spec
            .units
            .iter()
            .zip(units)
            .enumerate()
            .map(|(i, (s, unit))| UnitSlot { id: UnitId(i as u16), spec: s.clone(), unit, lease: RwLock::new(None) })
            .collect();
        for slot in slots.iter().filter(|s| !s.is_builtin()) {
            slot.unit.reset_protected();
        }
        Self { spec, routing, memory, slots, dmar, claims: AtomicU64::new(0) }
    }

    /// Every unit, in DRHD order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &UnitSlot> {
        self.slots.iter()
    }

    /// The unit numbered `raw` on the wire.
    pub(crate) fn get(&self, raw: u32) -> Result<&UnitSlot, Status> {
        u16::try_from(raw)
            .ok()
            .and_then(|i| self.slots.get(usize::from(i)))
            .ok_or_else(|| Status::not_found(format!("no remapping unit {raw}: the platform has {}", self.slots.len())))
    }

    /// The unit whose scope holds `sid`.
    pub(crate) fn route(&self, sid: SourceId) -> Result<&UnitSlot, Status> {
        self.routing
            .unit_for(sid)
            .and_then(|id| self.slots.get(id.index()))
            .ok_or_else(|| Status::failed_precondition(format!("requester id {sid} is in no remapping unit's scope")))
    }

    /// The ACPI DMAR table.
    pub(crate) fn dmar_table(&self) -> &[u8] {
        &self.dmar
    }

    /// A client-driven unit, for a call that needs one.
    fn client(&self, raw: u32) -> Result<(&UnitSlot, Region), Status> {
        let slot = self.get(raw)?;
        match slot.client_region() {
            Some(region) => Ok((slot, region)),
            None => Err(Status::failed_precondition(format!(
                "unit {} ({}) is driven by the built-in driver: its registers are the driver's",
                slot.id, slot.spec.name
            ))),
        }
    }

    /// Claims client-driven unit `raw`: its secret, and the token cancelled when the lease
    /// ends. FAILED_PRECONDITION if it is held or built-in.
    pub(crate) fn claim(&self, raw: u32) -> Result<Claim, Status> {
        let (slot, _) = self.client(raw)?;
        let mut lease = slot.lease.write();
        if lease.is_some() {
            return Err(Status::failed_precondition(format!(
                "unit {} ({}) is claimed by another client",
                slot.id, slot.spec.name
            )));
        }
        let secret = new_secret();
        let ended = CancellationToken::new();
        let serial = self.claims.fetch_add(1, Ordering::Relaxed);
        *lease = Some(Lease { secret: secret.clone(), serial, ended: ended.clone() });
        Ok(Claim { unit: slot.id, secret, serial, ended })
    }

    /// Runs `write` on unit `raw` on behalf of the holder of `secret`, with the lease held
    /// until it returns (so a release waits for it, and it cannot follow a release).
    pub(crate) fn as_owner<T>(&self, raw: u32, secret: &str, write: impl FnOnce(&Unit) -> T) -> Result<T, Status> {
        let (slot, _) = self.client(raw)?;
        let _lease = slot.leased(secret)?;
        Ok(write(&slot.unit))
    }

    /// Ends unit `raw`'s lease held by `holder`, then (under the same lock) resets the unit
    /// with firmware's protection and zeroes its region. Returns whether a lease ended:
    /// `Holder::Serial` of a lease no longer held ends nothing.
    pub(crate) fn release(&self, raw: u32, holder: Holder<'_>) -> Result<bool, Status> {
        let (slot, region) = self.client(raw)?;
        let mut lease = slot.lease.write();
        match (&*lease, holder) {
            (Some(l), Holder::Secret(s)) if !same_secret(&l.secret, s) => {
                return Err(Status::permission_denied(format!("unit {} is claimed by another client", slot.id)));
            }
            (None, Holder::Secret(_)) => {
                return Err(Status::failed_precondition(format!("unit {} is not claimed", slot.id)));
            }
            (Some(l), Holder::Serial(serial)) if l.serial != serial => return Ok(false),
            (None, Holder::Serial(_)) => return Ok(false),
            _ => {}
        }
        let ended = lease.take();
        slot.unit.reset_protected();
        // The region is inside memory (validated): zeroing cannot fail.
        let _ = self.memory.zero(region.base, region.size);
        drop(lease);
        if let Some(l) = ended {
            l.ended.cancel();
        }
        Ok(true)
    }

    /// Whether the bytes `[addr, addr + len)` touch the built-in driver's region (when some
    /// unit has the built-in driver).
    fn in_builtin_region(&self, addr: Hpa, len: u64) -> bool {
        self.slots.iter().any(UnitSlot::is_builtin) && touched(addr, len).overlaps(&self.spec.builtin_region)
    }

    /// The client-driven unit whose region the bytes `[addr, addr + len)` touch, with the
    /// region (regions are disjoint, validated: at most one).
    fn client_touched(&self, addr: Hpa, len: u64) -> Option<(&UnitSlot, Region)> {
        let t = touched(addr, len);
        self.slots.iter().find_map(|s| s.client_region().filter(|r| t.overlaps(r)).map(|r| (s, r)))
    }

    /// Whether the built-in driver may map `len` bytes at `hpa` for a device: never into a
    /// client-driven unit's region, which holds its owner's tables and queues (the driver
    /// itself refuses its own region).
    pub(crate) fn check_map_target(&self, hpa: Hpa, len: u64) -> Result<(), Status> {
        match self.client_touched(hpa, len) {
            Some((slot, _)) => Err(Status::invalid_argument(format!(
                "host address {hpa} (+{len} bytes) is in unit {}'s region, which only its owner uses",
                slot.id
            ))),
            None => Ok(()),
        }
    }

    /// Whether software outside the driver may have the hardware write `len` bytes at
    /// `addr` (a wait descriptor's status write): not into any driver's region.
    pub(crate) fn check_status_target(&self, addr: Hpa, len: u64) -> Result<(), Status> {
        if self.in_builtin_region(addr, len) {
            return Err(Status::permission_denied(format!(
                "status address {addr} is in the built-in driver's region: its tables are its own"
            )));
        }
        self.check_map_target(addr, len).map_err(|s| Status::permission_denied(s.message().to_owned()))
    }

    /// Writes `data` at `addr` for a client: never into the built-in driver's region, and
    /// into a client-driven unit's region only with that unit's lease, held across the
    /// write.
    pub(crate) fn write_memory(&self, addr: Hpa, data: &[u8], secret: &str) -> Result<(), Status> {
        let len = data.len() as u64;
        if self.in_builtin_region(addr, len) {
            return Err(Status::permission_denied(format!(
                "host address {addr} (+{len} bytes) is in the built-in driver's region: its tables are its own"
            )));
        }
        let _lease = match self.client_touched(addr, len) {
            Some((slot, region)) => {
                let lease = slot.leased(secret)?;
                if !region.contains(addr, len) {
                    return Err(Status::permission_denied(format!(
                        "host address {addr} (+{len} bytes) crosses the edge of unit {}'s region",
                        slot.id
                    )));
                }
                Some(lease)
            }
            None => None,
        };
        self.memory.write(addr, data).map_err(super::status::memory)
    }
}

/// The bytes `[addr, addr + len)` as a region; an empty access as its first byte.
fn touched(addr: Hpa, len: u64) -> Region {
    Region { base: addr, size: len.max(1) }
}
