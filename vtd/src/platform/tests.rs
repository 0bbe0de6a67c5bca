//! Tests of the platform description: one per validation rule, and routing against a
//! reference model over random valid platforms.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;

fn sid(bus: u8, dev: u8, func: u8) -> SourceId {
    SourceId::new(bus, dev, func)
}

fn unit(name: &str, index: u64, scope: UnitScope) -> UnitSpec {
    UnitSpec {
        name: name.to_owned(),
        register_base: DEFAULT_REGISTER_BASE + 0x1000 * index,
        scope,
        config: UnitConfig::default(),
        driver: UnitDriver::BuiltIn,
    }
}

fn bridge(b: SourceId, lo: u8, hi: u8) -> ScopeEntry {
    ScopeEntry::Bridge { bridge: b, buses: lo..=hi }
}

/// Unit 0 lists 00:02.0 and the bridge 00:1c.0 over buses 0x10-0x1f; unit 1 is
/// INCLUDE_PCI_ALL; both built in; 64 MiB with the top 8 MiB for the built-in driver.
fn two_units() -> PlatformSpec {
    let mut spec = PlatformSpec::single(64 * MIB, UnitConfig::default());
    spec.units = vec![
        unit(
            "dmar0",
            0,
            UnitScope::Devices(vec![ScopeEntry::Endpoint(sid(0, 2, 0)), bridge(sid(0, 0x1c, 0), 0x10, 0x1f)]),
        ),
        unit("dmar1", 1, UnitScope::All),
    ];
    spec
}

fn err(spec: &PlatformSpec) -> PlatformError {
    spec.validate().expect_err("the spec should be refused")
}

fn r(index: usize, name: &str) -> UnitRef {
    UnitRef { index, name: name.to_owned() }
}

#[test]
fn the_defaults_and_the_two_unit_platform_are_valid() {
    PlatformSpec::single(crate::unit::memory::DEFAULT_MEMORY_SIZE, UnitConfig::default()).validate().unwrap();
    two_units().validate().unwrap();
}

#[test]
fn unit_count_segment_and_memory_size_are_checked() {
    let mut s = two_units();
    s.units.clear();
    assert_eq!(err(&s), PlatformError::NoUnits);
    let mut s = two_units();
    s.units = (0..65)
        .map(|i| unit(&format!("u{i}"), i, UnitScope::Devices(vec![ScopeEntry::Endpoint(sid(1, 0, 0))])))
        .collect();
    assert_eq!(err(&s), PlatformError::TooManyUnits { count: 65 });
    let mut s = two_units();
    s.segment = 1;
    assert_eq!(err(&s), PlatformError::Segment { segment: 1 });
    let mut s = two_units();
    s.memory_size = 64 * MIB + 4096;
    assert_eq!(err(&s), PlatformError::MemorySize { size: 64 * MIB + 4096 });
}

#[test]
fn names_must_be_well_formed_and_unique() {
    for bad in ["", "Dmar0", "dmar 0", "d.0", &"x".repeat(33)] {
        let mut s = two_units();
        s.units[1].name = bad.to_owned();
        assert_eq!(err(&s), PlatformError::BadName { index: 1 }, "{bad:?}");
    }
    let mut s = two_units();
    s.units[1].name = "dmar0".to_owned();
    let e = err(&s);
    assert_eq!(e, PlatformError::DuplicateName { unit: r(1, "dmar0"), first: 0 });
    assert_eq!(e.to_string(), "unit 1 \"dmar0\": the name is already used by unit 0");
    assert_eq!(e.redact_names().to_string(), "unit 1: the name is already used by unit 0");
}

#[test]
fn register_bases_are_aligned_and_distinct() {
    let mut s = two_units();
    s.units[1].register_base = 0xfed9_0800;
    assert_eq!(err(&s), PlatformError::RegisterBaseMisaligned { unit: r(1, "dmar1"), base: 0xfed9_0800 });
    s.units[1].register_base = s.units[0].register_base;
    assert_eq!(
        err(&s),
        PlatformError::RegisterBaseShared { unit: r(1, "dmar1"), other: r(0, "dmar0"), base: DEFAULT_REGISTER_BASE }
    );
}

#[test]
fn include_all_is_single_and_last() {
    let mut s = two_units();
    s.units[0].scope = UnitScope::All;
    assert_eq!(err(&s), PlatformError::SecondIncludeAll { unit: r(1, "dmar1"), first: r(0, "dmar0") });
    let mut s = two_units();
    s.units.swap(0, 1);
    s.units[0].register_base = DEFAULT_REGISTER_BASE + 0x1000;
    s.units[1].register_base = DEFAULT_REGISTER_BASE;
    assert_eq!(err(&s), PlatformError::IncludeAllNotLast { unit: r(0, "dmar1") });
}

#[test]
fn scopes_are_bounded() {
    let mut s = two_units();
    let many = (0..=MAX_SCOPE_ENTRIES as u16).map(|i| ScopeEntry::Endpoint(SourceId(0x8000 + i))).collect();
    s.units[0].scope = UnitScope::Devices(many);
    let e = err(&s);
    assert_eq!(
        e,
        PlatformError::TooManyScopeEntries { structure: "unit 0".to_owned(), entries: MAX_SCOPE_ENTRIES + 1 }
    );
}

#[test]
fn a_listed_scope_is_not_empty() {
    let mut s = two_units();
    s.units[0].scope = UnitScope::Devices(Vec::new());
    assert_eq!(err(&s), PlatformError::EmptyScope { unit: r(0, "dmar0") });
}

#[test]
fn bridge_bus_ranges_are_well_formed() {
    let mut s = two_units();
    s.units[0].scope = UnitScope::Devices(vec![bridge(sid(0, 0x1c, 0), 0x12, 0x11)]);
    assert_eq!(
        err(&s),
        PlatformError::BridgeBusesBackwards {
            unit: r(0, "dmar0"),
            bridge: sid(0, 0x1c, 0),
            secondary: 0x12,
            subordinate: 0x11
        }
    );
    s.units[0].scope = UnitScope::Devices(vec![bridge(sid(0x12, 0, 0), 0x12, 0x13)]);
    assert_eq!(
        err(&s),
        PlatformError::BridgeBelowItsBuses { unit: r(0, "dmar0"), bridge: sid(0x12, 0, 0), secondary: 0x12 }
    );
}

#[test]
fn two_units_never_list_one_requester_id() {
    let listed = |entries| UnitScope::Devices(entries);
    let cases = [
        // endpoint vs endpoint
        (vec![ScopeEntry::Endpoint(sid(0, 2, 0))], vec![ScopeEntry::Endpoint(sid(0, 2, 0))], sid(0, 2, 0)),
        // endpoint inside the other unit's bridge range, and the bridge itself
        (vec![bridge(sid(0, 0x1c, 0), 0x10, 0x1f)], vec![ScopeEntry::Endpoint(sid(0x14, 3, 1))], sid(0x14, 3, 1)),
        (vec![ScopeEntry::Endpoint(sid(0, 0x1c, 0))], vec![bridge(sid(0, 0x1c, 0), 0x10, 0x1f)], sid(0, 0x1c, 0)),
        // overlapping bus ranges
        (vec![bridge(sid(0, 0x1c, 0), 0x10, 0x1f)], vec![bridge(sid(0, 0x1d, 0), 0x18, 0x20)], sid(0x18, 0, 0)),
        // a bridge of one unit behind a bridge of the other
        (vec![bridge(sid(0, 0x1c, 0), 0x10, 0x1f)], vec![bridge(sid(0x10, 0, 0), 0x30, 0x31)], sid(0x10, 0, 0)),
    ];
    for (a, b, shared) in cases {
        let mut s = two_units();
        s.units[1] = unit("dmar1", 1, listed(b));
        s.units[0].scope = listed(a);
        assert_eq!(err(&s), PlatformError::ScopeOverlap { unit: r(1, "dmar1"), other: r(0, "dmar0"), sid: shared });
    }
    // Inside one unit, overlap is harmless.
    let mut s = two_units();
    s.units[0].scope = listed(vec![
        bridge(sid(0, 0x1c, 0), 0x10, 0x1f),
        ScopeEntry::Endpoint(sid(0x11, 0, 0)),
        bridge(sid(0x10, 0, 0), 0x11, 0x12),
    ]);
    s.validate().unwrap();
}

#[test]
fn driver_regions_are_aligned_inside_memory_and_disjoint() {
    let client = |base: u64, size: u64| UnitDriver::Client { region: Region { base: Hpa(base), size } };
    let mut s = two_units();
    s.units[1].driver = client(0x1000, 0x800);
    let c1 = RegionOwner::Client(r(1, "dmar1"));
    assert_eq!(err(&s), PlatformError::RegionMisaligned { owner: c1.clone() });
    s.units[1].driver = client(0x1000, 0);
    assert_eq!(err(&s), PlatformError::RegionEmpty { owner: c1.clone() });
    s.units[1].driver = client(60 * MIB, 8 * MIB);
    assert_eq!(err(&s), PlatformError::RegionOutsideMemory { owner: c1.clone(), memory_size: 64 * MIB });
    s.units[1].driver = client(!0xfff, 0x1000);
    assert_eq!(err(&s), PlatformError::RegionOutsideMemory { owner: c1.clone(), memory_size: 64 * MIB });
    s.units[1].driver = client(56 * MIB - 0x1000, 0x2000);
    let e = err(&s);
    assert_eq!(e, PlatformError::RegionsOverlap { owner: c1.clone(), other: RegionOwner::BuiltIn });
    assert_eq!(e.redact_names().to_string(), "unit 1's client region overlaps the built-in driver's region");
    s.units[1].driver = client(0, 16 * MIB);
    s.validate().unwrap();
    s.units[0].driver = client(8 * MIB, 16 * MIB);
    assert_eq!(
        err(&s),
        PlatformError::RegionsOverlap { owner: c1, other: RegionOwner::Client(r(0, "dmar0")) },
        "client regions are disjoint"
    );
}

#[test]
fn the_builtin_region_matters_only_with_a_builtin_unit() {
    let mut s = two_units();
    s.builtin_region.size = MIN_BUILTIN_REGION - 0x1000;
    assert_eq!(
        err(&s),
        PlatformError::BuiltinRegionTooSmall { unit: r(0, "dmar0"), size: MIN_BUILTIN_REGION - 0x1000 }
    );
    for (i, u) in s.units.iter_mut().enumerate() {
        u.driver = UnitDriver::Client { region: Region { base: Hpa(i as u64 * 16 * MIB), size: 16 * MIB } };
    }
    s.validate().unwrap();
    s.builtin_region = Region { base: Hpa(0), size: 0 };
    s.validate().unwrap();
}

#[test]
fn reserved_regions_and_satc_devices_are_checked() {
    let mut s = two_units();
    s.units[1].scope = UnitScope::Devices(vec![ScopeEntry::Endpoint(sid(0, 3, 0))]);
    let rmrr = |base, size, devices| ReservedMemory { region: Region { base: Hpa(base), size }, devices };
    s.reserved = vec![rmrr(0x10_0000, 0x1000, vec![sid(0x12, 0, 0)]), rmrr(0x10_0000, 0x2000, vec![sid(0, 3, 0)])];
    s.validate().unwrap();
    s.reserved[1].region.size = 0x1800;
    assert_eq!(err(&s), PlatformError::RegionMisaligned { owner: RegionOwner::Reserved(1) });
    s.reserved[1].region = Region { base: Hpa(57 * MIB), size: 0x1000 };
    assert_eq!(err(&s), PlatformError::RegionsOverlap { owner: RegionOwner::Reserved(1), other: RegionOwner::BuiltIn });
    s.reserved[1].region = Region { base: Hpa(64 * MIB), size: 0x1000 };
    assert_eq!(err(&s), PlatformError::RegionOutsideMemory { owner: RegionOwner::Reserved(1), memory_size: 64 * MIB });
    s.reserved[1].region = Region { base: Hpa(0x20_0000), size: 0x1000 };
    s.reserved[1].devices = vec![sid(0x40, 0, 0)];
    assert_eq!(err(&s), PlatformError::ReservedDeviceUncovered { index: 1, sid: sid(0x40, 0, 0) });
    s.reserved[1].devices.clear();
    assert_eq!(err(&s), PlatformError::ReservedWithoutDevices { index: 1 });
    s.reserved.pop();
    s.satc = vec![Satc { atc_required: true, devices: vec![sid(0, 2, 0), sid(0, 4, 0)] }];
    assert_eq!(err(&s), PlatformError::SatcDeviceUncovered { index: 0, sid: sid(0, 4, 0) });
}

#[test]
fn routing_follows_endpoint_then_narrowest_bridge_then_include_all() {
    let mut s = two_units();
    s.units[0].scope =
        UnitScope::Devices(vec![bridge(sid(0, 0x1c, 0), 0x10, 0x1f), bridge(sid(0x10, 0, 0), 0x11, 0x11)]);
    let routing = Routing::new(&s);
    assert_eq!(routing.unit_for(sid(0x11, 5, 0)), Some(UnitId(0)));
    assert_eq!(routing.unit_for(sid(0, 0x1c, 0)), Some(UnitId(0)));
    assert_eq!(routing.unit_for(sid(0x20, 0, 0)), Some(UnitId(1)));
    s.units.pop();
    assert_eq!(Routing::new(&s).unit_for(sid(0x20, 0, 0)), None, "no unit covers it: refused");
}

/// A random valid platform: buses 1..=255 cut into ranges, some given to a listed unit as
/// a bridge on bus 0 (plus, sometimes, a nested bridge of the same unit), endpoints on
/// bus 0 and behind a unit's own bridges, and maybe an INCLUDE_PCI_ALL unit last.
pub(crate) fn arb_spec() -> impl Strategy<Value = PlatformSpec> {
    let cuts = proptest::collection::btree_set(2u8..=255, 0..12);
    let owners = proptest::collection::vec(proptest::option::of(0usize..4), 13);
    let endpoints = proptest::collection::vec((0u8..=0x1f, 0u8..8, 0usize..4), 0..16);
    (1usize..=4, cuts, owners, endpoints, any::<bool>(), any::<bool>()).prop_map(
        |(listed, cuts, owners, endpoints, include_all, nested)| {
            let mut scopes: Vec<Vec<ScopeEntry>> = vec![Vec::new(); listed];
            let mut starts: Vec<u8> = std::iter::once(1).chain(cuts).collect();
            starts.dedup();
            let mut used_devfn = std::collections::HashSet::new();
            for (k, &lo) in starts.iter().enumerate() {
                let hi = starts.get(k + 1).map_or(255, |n| n - 1);
                let Some(owner) = owners[k] else { continue };
                let owner = owner % listed;
                // bridges on bus 0 at device 0x10 + k (distinct from each other)
                let b = sid(0, 0x10 + k as u8, 0);
                used_devfn.insert(b);
                scopes[owner].push(bridge(b, lo, hi));
                if nested && hi > lo {
                    scopes[owner].push(bridge(sid(lo, 0, 0), lo + 1, hi));
                    scopes[owner].push(ScopeEntry::Endpoint(sid(hi, 1, 2)));
                }
            }
            for (dev, func, owner) in endpoints {
                let e = sid(0, dev & 0x0f, func);
                if used_devfn.insert(e) {
                    scopes[owner % listed].push(ScopeEntry::Endpoint(e));
                }
            }
            let mut spec = PlatformSpec::single(64 * MIB, UnitConfig::default());
            spec.units = scopes
                .into_iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(i, s)| unit(&format!("u{i}"), i as u64, UnitScope::Devices(s)))
                .collect();
            if include_all || spec.units.is_empty() {
                spec.units.push(unit("all", 8, UnitScope::All));
            }
            spec
        },
    )
}

/// The reference: a table of every listed requester id and bus, then INCLUDE_PCI_ALL.
fn reference(spec: &PlatformSpec, sid: SourceId) -> Option<UnitId> {
    let mut ids: HashMap<SourceId, UnitId> = HashMap::new();
    let mut buses: HashMap<u8, UnitId> = HashMap::new();
    let mut all = None;
    for (i, u) in spec.units.iter().enumerate() {
        let id = UnitId(i as u16);
        match &u.scope {
            UnitScope::All => all = Some(id),
            UnitScope::Devices(entries) => {
                for e in entries {
                    match e {
                        ScopeEntry::Endpoint(s) => {
                            ids.insert(*s, id);
                        }
                        ScopeEntry::Bridge { bridge, buses: range } => {
                            ids.insert(*bridge, id);
                            buses.extend(range.clone().map(|b| (b, id)));
                        }
                    }
                }
            }
        }
    }
    ids.get(&sid).or_else(|| buses.get(&sid.bus())).copied().or(all)
}

proptest! {
    #[test]
    fn routing_matches_the_reference(spec in arb_spec(), probes in proptest::collection::vec(any::<u16>(), 64)) {
        prop_assert_eq!(spec.validate(), Ok(()));
        let routing = Routing::new(&spec);
        let bus0 = (0..=255u16).map(SourceId);
        let per_bus = (0..=255u16).map(|b| SourceId(b << 8 | (b & 0xff)));
        for sid in bus0.chain(per_bus).chain(probes.into_iter().map(SourceId)) {
            prop_assert_eq!(routing.unit_for(sid), reference(&spec, sid), "{}", sid);
        }
    }
}
