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
//! A lease is a 128-bit random secret; the holder presents it on every write. It is
//! compared in constant time and never logged.
//!
//! Not here: the units' behaviour (`dmar_vtd::unit`), the platform description and its
//! validation (`dmar_vtd::platform`), the table encoding (`dmar_vtd::acpi`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dmar_vtd::ids::{Hpa, SourceId, UnitId};
use dmar_vtd::platform::{PlatformSpec, Region, Routing, UnitDriver, UnitSpec};
use dmar_vtd::unit::{HostMemory, Unit};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// One unit of the platform.
#[derive(Debug)]
pub(crate) struct UnitSlot {
    pub(crate) id: UnitId,
    pub(crate) spec: UnitSpec,
    pub(crate) unit: Arc<Unit>,
    lease: Mutex<Option<Lease>>,
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
        self.lease.lock().is_some()
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
    /// The platform `spec` over `memory`, with `units` built in spec order.
    pub(crate) fn new(spec: PlatformSpec, memory: Arc<HostMemory>, units: Vec<Arc<Unit>>) -> Self {
        let routing = Routing::new(&spec);
        let dmar = dmar_vtd::acpi::dmar_table(&spec);
        let slots = spec
            .units
            .iter()
            .zip(units)
            .enumerate()
            .map(|(i, (s, unit))| UnitSlot { id: UnitId(i as u16), spec: s.clone(), unit, lease: Mutex::new(None) })
            .collect();
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
        let mut lease = slot.lease.lock();
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

    /// Checks that `secret` is unit `raw`'s lease.
    pub(crate) fn check_lease(&self, raw: u32, secret: &str) -> Result<&UnitSlot, Status> {
        let (slot, _) = self.client(raw)?;
        match &*slot.lease.lock() {
            Some(l) if same_secret(&l.secret, secret) => Ok(slot),
            Some(_) => Err(Status::permission_denied(format!("unit {} is claimed by another client", slot.id))),
            None => Err(Status::permission_denied(format!(
                "unit {} ({}) is not claimed: ClaimUnit first",
                slot.id, slot.spec.name
            ))),
        }
    }

    /// Ends unit `raw`'s lease if `secret` is it (`None`: whichever lease is held, for a
    /// claim stream that closed), then resets the unit and zeroes its region. Returns
    /// whether a lease ended.
    pub(crate) fn release(&self, raw: u32, secret: Option<&str>) -> Result<bool, Status> {
        let (slot, region) = self.client(raw)?;
        let ended = {
            let mut lease = slot.lease.lock();
            match (&*lease, secret) {
                (Some(l), Some(s)) if !same_secret(&l.secret, s) => {
                    return Err(Status::permission_denied(format!("unit {} is claimed by another client", slot.id)));
                }
                (None, Some(_)) => {
                    return Err(Status::failed_precondition(format!("unit {} is not claimed", slot.id)));
                }
                (None, None) => return Ok(false),
                _ => lease.take(),
            }
        };
        slot.unit.reset();
        // The region is inside memory (validated), so zeroing cannot fail.
        let _ = self.memory.zero(region.base, region.size);
        if let Some(l) = ended {
            l.ended.cancel();
        }
        Ok(true)
    }

    /// Ends lease `serial` of unit `id` if it is still the one held (a claim stream that
    /// closed after an explicit release finds another lease or none, and does nothing).
    pub(crate) fn release_stream(&self, id: UnitId, serial: u64) -> bool {
        let Some(slot) = self.slots.get(id.index()) else { return false };
        let held = slot.lease.lock().as_ref().map(|l| l.serial) == Some(serial);
        held && self.release(u32::from(id.0), None).unwrap_or(false)
    }

    /// Whether the built-in driver may map `len` bytes at `hpa` for a device: never into a
    /// client-driven unit's region, which holds its owner's tables and queues (the driver
    /// itself refuses its own region).
    pub(crate) fn check_map_target(&self, hpa: Hpa, len: u64) -> Result<(), Status> {
        let target = Region { base: hpa, size: len.max(1) };
        match self.slots.iter().find(|s| s.client_region().is_some_and(|r| r.overlaps(&target))) {
            Some(slot) => Err(Status::invalid_argument(format!(
                "host address {hpa} (+{len} bytes) is in unit {}'s region, which only its owner uses",
                slot.id
            ))),
            None => Ok(()),
        }
    }

    /// Whether a write of `len` bytes at `addr` may proceed with `secret`: never into the
    /// built-in driver's region, and into a client-driven unit's region only with that
    /// unit's lease.
    pub(crate) fn check_memory_write(&self, addr: Hpa, len: u64, secret: &str) -> Result<(), Status> {
        let touched = Region { base: addr, size: len.max(1) };
        if self.slots.iter().any(UnitSlot::is_builtin) && touched.overlaps(&self.spec.builtin_region) {
            return Err(Status::permission_denied(format!(
                "host address {addr} (+{len} bytes) is in the built-in driver's region: its tables are its own"
            )));
        }
        for slot in &self.slots {
            if let Some(region) = slot.client_region()
                && touched.overlaps(&region)
            {
                self.check_lease(u32::from(slot.id.0), secret)?;
                if !region.contains(addr, len) {
                    return Err(Status::permission_denied(format!(
                        "host address {addr} (+{len} bytes) crosses the edge of unit {}'s region",
                        slot.id
                    )));
                }
            }
        }
        Ok(())
    }
}
