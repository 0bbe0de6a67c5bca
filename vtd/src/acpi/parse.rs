//! Decoding a DMAR table: header checks, then a bounds-checked walk of the remapping
//! structures and their device scopes (Linux `dmar_walk_remapping_entries` and
//! `dmar_alloc_dev_scope` do the same walk). Every read goes through [`Reader`], which
//! answers `None` past the end, so no input makes the decoder panic.

use super::{
    ACPI_HEADER_LEN, ATSR_ALL_PORTS, AcpiError, AcpiHeader, Atsr, DMAR_HEADER_LEN, DRHD_INCLUDE_PCI_ALL, DeviceScope,
    DmarTable, Drhd, PciPath, Rmrr, SATC_ATC_REQUIRED, SIGNATURE, SatcEntry, ScopeKind, structure,
};

/// Fixed part of each structure this decoder reads, type and length included (VT-d 8.3,
/// 8.4, 8.5, 8.8).
const DRHD_LEN: usize = 16;
const RMRR_LEN: usize = 24;
const ATSR_LEN: usize = 8;
const SATC_LEN: usize = 8;
/// Fixed part of a device scope entry (VT-d 8.3.1); each path hop adds 2.
const SCOPE_LEN: usize = 6;

/// Little-endian reads from a byte slice that fail instead of panicking.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.0.get(at..at.checked_add(N)?)?.try_into().ok()
    }
    fn u8(&self, at: usize) -> Option<u8> {
        self.0.get(at).copied()
    }
    fn u16(&self, at: usize) -> Option<u16> {
        self.bytes(at).map(u16::from_le_bytes)
    }
    fn u32(&self, at: usize) -> Option<u32> {
        self.bytes(at).map(u32::from_le_bytes)
    }
    fn u64(&self, at: usize) -> Option<u64> {
        self.bytes(at).map(u64::from_le_bytes)
    }
}

/// Decodes a DMAR table: checks the signature, the length (bytes past it are ignored, as
/// ACPI tables are read by their length) and the checksum, then every structure.
pub fn parse_dmar(bytes: &[u8]) -> Result<DmarTable, AcpiError> {
    if bytes.len() < DMAR_HEADER_LEN {
        return Err(AcpiError::TooShort { len: bytes.len() });
    }
    let r = Reader(bytes);
    let short = || AcpiError::TooShort { len: bytes.len() };
    if r.bytes::<4>(0).ok_or_else(short)? != SIGNATURE {
        return Err(AcpiError::Signature);
    }
    let declared = r.u32(4).ok_or_else(short)?;
    let len = usize::try_from(declared).unwrap_or(usize::MAX);
    if !(DMAR_HEADER_LEN..=bytes.len()).contains(&len) {
        return Err(AcpiError::Length { declared, available: bytes.len() });
    }
    let table = &bytes[..len];
    let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    if sum != 0 {
        return Err(AcpiError::Checksum { sum });
    }
    let r = Reader(table);
    let header = AcpiHeader {
        length: declared,
        revision: r.u8(8).ok_or_else(short)?,
        checksum: r.u8(9).ok_or_else(short)?,
        oem_id: r.bytes(10).ok_or_else(short)?,
        oem_table_id: r.bytes(16).ok_or_else(short)?,
        oem_revision: r.u32(24).ok_or_else(short)?,
        creator_id: r.bytes(28).ok_or_else(short)?,
        creator_revision: r.u32(32).ok_or_else(short)?,
    };
    let mut out = DmarTable {
        header,
        host_address_width: r.u8(ACPI_HEADER_LEN).ok_or_else(short)?.saturating_add(1),
        flags: r.u8(ACPI_HEADER_LEN + 1).ok_or_else(short)?,
        drhds: Vec::new(),
        rmrrs: Vec::new(),
        atsrs: Vec::new(),
        satcs: Vec::new(),
        skipped: Vec::new(),
    };
    let mut at = DMAR_HEADER_LEN;
    while at < len {
        let truncated = AcpiError::Truncated { offset: at };
        let kind = r.u16(at).ok_or_else(|| truncated.clone())?;
        let length = r.u16(at + 2).ok_or_else(|| truncated.clone())?;
        let end = at + usize::from(length);
        if end > len {
            return Err(truncated);
        }
        let min = match kind {
            structure::DRHD => DRHD_LEN,
            structure::RMRR => RMRR_LEN,
            structure::ATSR => ATSR_LEN,
            structure::SATC => SATC_LEN,
            _ => 4,
        };
        // A length under the fixed part (under 4 would also never advance the walk).
        if usize::from(length) < min {
            return Err(AcpiError::BadLength { offset: at, length });
        }
        let bad = || AcpiError::Truncated { offset: at };
        match kind {
            structure::DRHD => out.drhds.push(Drhd {
                include_pci_all: r.u8(at + 4).ok_or_else(bad)? & DRHD_INCLUDE_PCI_ALL != 0,
                size: r.u8(at + 5).ok_or_else(bad)? & 0xf,
                segment: r.u16(at + 6).ok_or_else(bad)?,
                register_base: r.u64(at + 8).ok_or_else(bad)?,
                scope: scopes(&r, at + DRHD_LEN, end)?,
            }),
            structure::RMRR => out.rmrrs.push(Rmrr {
                segment: r.u16(at + 6).ok_or_else(bad)?,
                base: r.u64(at + 8).ok_or_else(bad)?,
                limit: r.u64(at + 16).ok_or_else(bad)?,
                scope: scopes(&r, at + RMRR_LEN, end)?,
            }),
            structure::ATSR => out.atsrs.push(Atsr {
                all_ports: r.u8(at + 4).ok_or_else(bad)? & ATSR_ALL_PORTS != 0,
                segment: r.u16(at + 6).ok_or_else(bad)?,
                scope: scopes(&r, at + ATSR_LEN, end)?,
            }),
            structure::SATC => out.satcs.push(SatcEntry {
                atc_required: r.u8(at + 4).ok_or_else(bad)? & SATC_ATC_REQUIRED != 0,
                segment: r.u16(at + 6).ok_or_else(bad)?,
                scope: scopes(&r, at + SATC_LEN, end)?,
            }),
            other => out.skipped.push(other),
        }
        at = end;
    }
    Ok(out)
}

/// The device scope entries in `[at, end)`.
fn scopes(r: &Reader<'_>, mut at: usize, end: usize) -> Result<Vec<DeviceScope>, AcpiError> {
    let mut out = Vec::new();
    while at < end {
        let truncated = || AcpiError::Truncated { offset: at };
        let kind = r.u8(at).ok_or_else(truncated)?;
        let length = r.u8(at + 1).ok_or_else(truncated)?;
        let entry_end = at + usize::from(length);
        if usize::from(length) < SCOPE_LEN + 2 || !(usize::from(length) - SCOPE_LEN).is_multiple_of(2) {
            return Err(AcpiError::BadLength { offset: at, length: u16::from(length) });
        }
        if entry_end > end {
            return Err(truncated());
        }
        let mut path = Vec::with_capacity((usize::from(length) - SCOPE_LEN) / 2);
        for hop in (at + SCOPE_LEN..entry_end).step_by(2) {
            let [device, function] = r.bytes::<2>(hop).ok_or_else(truncated)?;
            if device > 0x1f || function > 7 {
                return Err(AcpiError::BadPath { offset: at });
            }
            path.push(PciPath { device, function });
        }
        out.push(DeviceScope {
            kind: ScopeKind::from_code(kind),
            enumeration_id: r.u8(at + 4).ok_or_else(truncated)?,
            start_bus: r.u8(at + 5).ok_or_else(truncated)?,
            path,
        });
        at = entry_end;
    }
    Ok(out)
}
