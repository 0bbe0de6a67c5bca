//! DMAR table tests: golden bytes written out by hand, the round trip through the decoder,
//! and the decoder's refusals and robustness on arbitrary input.

use proptest::prelude::*;

use super::*;
use crate::Hpa;
use crate::platform::{
    AtsRootPorts, DEFAULT_REGISTER_BASE, PlatformSpec, Region, ReservedMemory, Satc, ScopeEntry, UnitDriver, UnitScope,
    UnitSpec,
};
use crate::unit::UnitConfig;

const MIB: u64 = 1 << 20;

fn sid(bus: u8, dev: u8, func: u8) -> SourceId {
    SourceId::new(bus, dev, func)
}

/// Unit 0 "dmar0" at 0xfed90000 lists 00:02.0 and the bridge 00:1c.0 (buses 0x10-0x1f);
/// unit 1 "dmar1" at 0xfed91000 is INCLUDE_PCI_ALL; every root port supports ATS.
fn two_units() -> PlatformSpec {
    let unit = |name: &str, base, scope| UnitSpec {
        name: name.to_owned(),
        register_base: base,
        scope,
        config: UnitConfig::default(),
        driver: UnitDriver::BuiltIn,
    };
    let mut spec = PlatformSpec::single(64 * MIB, UnitConfig::default());
    let listed =
        vec![ScopeEntry::Endpoint(sid(0, 2, 0)), ScopeEntry::Bridge { bridge: sid(0, 0x1c, 0), buses: 0x10..=0x1f }];
    spec.units = vec![
        unit("dmar0", DEFAULT_REGISTER_BASE, UnitScope::Devices(listed)),
        unit("dmar1", DEFAULT_REGISTER_BASE + 0x1000, UnitScope::All),
    ];
    spec
}

#[rustfmt::skip]
const GOLDEN: [u8; 104] = [
    // ACPI header (36 bytes)
    b'D', b'M', b'A', b'R',                         // signature
    0x68, 0x00, 0x00, 0x00,                         // length: 104
    0x01,                                           // revision 1
    0x3b,                                           // checksum: the bytes sum to 0 mod 256
    b'D', b'M', b'A', b'R', b' ', b' ',             // OEM id
    b'D', b'M', b'A', b'R', b'P', b'L', b'A', b'T', // OEM table id
    0x01, 0x00, 0x00, 0x00,                         // OEM revision 1
    b'D', b'M', b'A', b'R',                         // creator id
    0x01, 0x00, 0x00, 0x00,                         // creator revision 1
    // DMAR fields
    45,                                             // host address width 46, as N-1
    0x01,                                           // flags: INTR_REMAP
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                   // reserved
    // DRHD of unit 0 (offset 48)
    0x00, 0x00,                                     // type 0: DRHD
    0x20, 0x00,                                     // length 32: 16 + two scope entries
    0x00,                                           // flags: listed scope
    0x00,                                           // size: 2^0 register pages
    0x00, 0x00,                                     // segment 0
    0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, // register base 0xfed90000
    0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, // endpoint, len 8, -, -, enum 0, bus 0, path 02.0
    0x02, 0x08, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x00, // sub-hierarchy, len 8, bus 0, path 1c.0
    // DRHD of unit 1 (offset 80)
    0x00, 0x00,                                     // type 0: DRHD
    0x10, 0x00,                                     // length 16: no scope entries
    0x01,                                           // flags: INCLUDE_PCI_ALL
    0x00,                                           // size: one page
    0x00, 0x00,                                     // segment 0
    0x00, 0x10, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, // register base 0xfed91000
    // ATSR (offset 96)
    0x02, 0x00,                                     // type 2: ATSR
    0x08, 0x00,                                     // length 8
    0x01,                                           // flags: ALL_PORTS
    0x00,                                           // reserved
    0x00, 0x00,                                     // segment 0
];

#[test]
fn the_two_unit_table_matches_the_hand_written_bytes() {
    assert_eq!(dmar_table(&two_units()), GOLDEN);
    assert_eq!(GOLDEN.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0, "the golden table's own checksum");
}

/// The spec's scope as the table carries it: endpoints and bridges by requester id.
fn listed(scope: &UnitScope) -> Vec<(ScopeKind, SourceId)> {
    match scope {
        UnitScope::All => Vec::new(),
        UnitScope::Devices(entries) => entries
            .iter()
            .map(|e| match e {
                ScopeEntry::Endpoint(s) => (ScopeKind::Endpoint, *s),
                ScopeEntry::Bridge { bridge, .. } => (ScopeKind::Bridge, *bridge),
            })
            .collect(),
    }
}

fn parsed(scope: &[DeviceScope]) -> Vec<(ScopeKind, SourceId)> {
    scope
        .iter()
        .map(|s| {
            assert_eq!((s.enumeration_id, s.path.len()), (0, 1));
            (s.kind, s.source_id().expect("one hop"))
        })
        .collect()
}

fn assert_round_trip(spec: &PlatformSpec) {
    let bytes = dmar_table(spec);
    assert_eq!(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0, "checksum");
    let t = parse_dmar(&bytes).expect("our own table parses");
    assert_eq!(t.header.length as usize, bytes.len());
    assert_eq!(t.header.revision, REVISION);
    assert_eq!(t.host_address_width, 46);
    assert_eq!(t.flags, flags::INTR_REMAP);
    assert_eq!(t.drhds.len(), spec.units.len());
    for (d, u) in t.drhds.iter().zip(&spec.units) {
        assert_eq!(d.include_pci_all, u.scope == UnitScope::All);
        assert_eq!((d.size, d.segment, d.register_base), (0, spec.segment, u.register_base));
        assert_eq!(parsed(&d.scope), listed(&u.scope));
    }
    assert_eq!(t.rmrrs.len(), spec.reserved.len());
    for (r, m) in t.rmrrs.iter().zip(&spec.reserved) {
        assert_eq!((r.base, r.limit), (m.region.base.0, m.region.end() - 1));
        let devices: Vec<_> = m.devices.iter().map(|&s| (ScopeKind::Endpoint, s)).collect();
        assert_eq!(parsed(&r.scope), devices);
    }
    match &spec.ats_root_ports {
        None => assert!(t.atsrs.is_empty()),
        Some(AtsRootPorts::All) => assert!(t.atsrs.len() == 1 && t.atsrs[0].all_ports && t.atsrs[0].scope.is_empty()),
        Some(AtsRootPorts::Ports(p)) => {
            assert!(t.atsrs.len() == 1 && !t.atsrs[0].all_ports);
            assert_eq!(parsed(&t.atsrs[0].scope), p.iter().map(|&s| (ScopeKind::Bridge, s)).collect::<Vec<_>>());
        }
    }
    assert_eq!(t.satcs.len(), spec.satc.len());
    for (s, c) in t.satcs.iter().zip(&spec.satc) {
        assert_eq!(s.atc_required, c.atc_required);
        assert_eq!(parsed(&s.scope), c.devices.iter().map(|&d| (ScopeKind::Endpoint, d)).collect::<Vec<_>>());
    }
    assert!(t.skipped.is_empty());
}

#[test]
fn every_structure_round_trips() {
    let mut spec = two_units();
    spec.reserved =
        vec![ReservedMemory { region: Region { base: Hpa(0x10_0000), size: 0x3000 }, devices: vec![sid(0, 2, 0)] }];
    spec.ats_root_ports = Some(AtsRootPorts::Ports(vec![sid(0, 0x1c, 0), sid(0, 0x1d, 0)]));
    spec.satc = vec![
        Satc { atc_required: true, devices: vec![sid(0x12, 0, 0), sid(0, 2, 0)] },
        Satc { atc_required: false, devices: vec![sid(0x13, 1, 0)] },
    ];
    spec.validate().unwrap();
    assert_round_trip(&spec);
    spec.ats_root_ports = None;
    assert_round_trip(&spec);
    assert_round_trip(&PlatformSpec::single(4 << 30, UnitConfig::default()));
}

fn with_checksum(mut t: Vec<u8>) -> Vec<u8> {
    t[9] = 0;
    let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

#[test]
fn the_decoder_refuses_broken_tables() {
    let good = GOLDEN.to_vec();
    assert_eq!(parse_dmar(&good[..47]), Err(AcpiError::TooShort { len: 47 }));
    let mut t = good.clone();
    t[0] = b'X';
    assert_eq!(parse_dmar(&t), Err(AcpiError::Signature));
    let mut t = good.clone();
    t[4] = 0x69;
    assert_eq!(parse_dmar(&t), Err(AcpiError::Length { declared: 0x69, available: 104 }));
    t[4] = 0x2f;
    assert_eq!(parse_dmar(&t), Err(AcpiError::Length { declared: 0x2f, available: 104 }));
    let mut t = good.clone();
    t[60] ^= 1;
    assert!(matches!(parse_dmar(&t), Err(AcpiError::Checksum { .. })));
    // A DRHD longer than the table; one shorter than its fixed part; an empty structure.
    let mut t = good.clone();
    t[82] = 0x20;
    assert_eq!(parse_dmar(&with_checksum(t)), Err(AcpiError::Truncated { offset: 80 }));
    let mut t = good.clone();
    t[82] = 0x0c;
    assert_eq!(parse_dmar(&with_checksum(t)), Err(AcpiError::BadLength { offset: 80, length: 12 }));
    let mut t = good.clone();
    t[98] = 0;
    assert_eq!(parse_dmar(&with_checksum(t)), Err(AcpiError::BadLength { offset: 96, length: 0 }));
    // A scope entry with an odd length, one running past its DRHD, a bad path hop.
    let mut t = good.clone();
    t[65] = 7;
    assert_eq!(parse_dmar(&with_checksum(t)), Err(AcpiError::BadLength { offset: 64, length: 7 }));
    let mut t = good.clone();
    t[73] = 10;
    assert_eq!(parse_dmar(&with_checksum(t)), Err(AcpiError::Truncated { offset: 72 }));
    let mut t = good.clone();
    t[78] = 0x20;
    assert_eq!(parse_dmar(&with_checksum(t)), Err(AcpiError::BadPath { offset: 72 }));
}

#[test]
fn the_decoder_skips_unknown_structures_and_trailing_bytes() {
    let mut t = GOLDEN.to_vec();
    t.extend_from_slice(&[3, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // RHSA
    t[4] = t.len() as u8;
    let mut t = with_checksum(t);
    t.extend_from_slice(b"trailing");
    let parsed = parse_dmar(&t).unwrap();
    assert_eq!(parsed.skipped, vec![structure::RHSA]);
    assert_eq!(parsed.drhds.len(), 2);
}

proptest! {
    #[test]
    fn random_valid_platforms_round_trip(spec in crate::platform::tests::arb_spec()) {
        assert_round_trip(&spec);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), dmar in any::<bool>()) {
        let mut bytes = bytes;
        if dmar && bytes.len() >= DMAR_HEADER_LEN {
            bytes[..4].copy_from_slice(&SIGNATURE);
            let len = bytes.len() as u32;
            bytes[4..8].copy_from_slice(&len.to_le_bytes());
            bytes = with_checksum(bytes);
        }
        let _ = parse_dmar(&bytes);
    }

    #[test]
    fn mutated_tables_never_panic(
        spec in crate::platform::tests::arb_spec(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        fix in any::<bool>(),
    ) {
        let mut t = dmar_table(&spec);
        for (at, value) in edits {
            let i = at.index(t.len());
            t[i] = value;
        }
        if fix {
            t = with_checksum(t);
        } else {
            t.truncate(cut.index(t.len() + 1));
        }
        let _ = parse_dmar(&t);
    }
}
