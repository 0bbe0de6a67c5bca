//! The platform as the load generator sees it: the server's remapping units and their
//! device scopes (`GetPlatform`), which unit each device of the run sits behind, and the
//! per-unit counters of a run (`Stats.units`).
//!
//! Owns the summary the reports print ("platform: 2 units (dmar0: 1 device, dmar1: 4
//! devices)"), the choice of a requester id for the stalled device of the invalidate
//! scenario ([`plan_stall`]), and the two platforms the embedded comparison runs on
//! ([`one_unit`], [`two_units`]). The routing rule itself is `dmar_vtd::platform::Routing`,
//! the server's own: the wire description is turned back into a [`PlatformSpec`] so that
//! the load generator cannot route a requester id differently from the server.

use std::collections::BTreeMap;
use std::time::Duration;

use dmar_proto::v1 as pb;
use dmar_vtd::platform::{
    AtsRootPorts, DEFAULT_REGISTER_BASE, PlatformSpec, Region, Routing, ScopeEntry, UnitDriver, UnitScope, UnitSpec,
};
use dmar_vtd::unit::UnitConfig;
use dmar_vtd::{Hpa, SourceId, UnitId};
use serde::Serialize;

/// The server's units and the routing of requester ids to them.
#[derive(Debug, Clone)]
pub(crate) struct PlatformView {
    spec: PlatformSpec,
    routing: Routing,
}

/// One unit of a run's platform, as reports show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UnitSummary {
    /// The unit's number (the `unit` of the raw calls and of `TranslateResponse`).
    pub unit: u32,
    /// Its name.
    pub name: String,
    /// INCLUDE_PCI_ALL: every device no other unit lists.
    pub include_all: bool,
    /// The built-in driver drives it (else a client's driver).
    pub builtin: bool,
    /// The agents' ATS functions behind it.
    pub devices: usize,
    /// ATS translation requests it completed over the run (`ats_success + ats_no_access +
    /// ats_error` of `Stats.units`).
    pub ats_translations: u64,
    /// Untranslated requests it handled over the run (unary `Control.Translate` calls and
    /// the agents' untranslated DMA).
    pub untranslated: u64,
}

/// The platform a report ran on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlatformSummary {
    /// The units, in DRHD order.
    pub units: Vec<UnitSummary>,
    /// The agents' ATS functions no unit's scope covers (they cannot be attached).
    pub uncovered_devices: usize,
}

impl PlatformSummary {
    /// One line: `platform: 2 units (dmar0: 1 device, dmar1: 4 devices)`.
    pub fn line(&self) -> String {
        let n = self.units.len();
        let units: Vec<String> = self
            .units
            .iter()
            .map(|u| format!("{}: {} device{}", u.name, u.devices, if u.devices == 1 { "" } else { "s" }))
            .collect();
        let uncovered = match self.uncovered_devices {
            0 => String::new(),
            k => format!(", {k} in no unit's scope"),
        };
        format!("platform: {n} unit{} ({}){uncovered}", if n == 1 { "" } else { "s" }, units.join(", "))
    }

    /// The same for a CSV cell: `dmar0:1;dmar1:4` (no commas, no spaces).
    pub fn cell(&self) -> String {
        self.units.iter().map(|u| format!("{}:{}", u.name, u.devices)).collect::<Vec<_>>().join(";")
    }

    /// Adds each unit's translation counts between two `Stats` snapshots.
    pub(crate) fn count(&mut self, before: &pb::Stats, after: &pb::Stats) {
        let counters = |s: &pb::Stats| -> BTreeMap<u32, (u64, u64)> {
            s.units
                .iter()
                .map(|u| {
                    let c = |k: &str| u.counters.get(k).copied().unwrap_or(0);
                    (
                        u.unit,
                        (
                            c("ats_success") + c("ats_no_access") + c("ats_error"),
                            c("untranslated_ok") + c("untranslated_blocked"),
                        ),
                    )
                })
                .collect()
        };
        let (b, a) = (counters(before), counters(after));
        for u in &mut self.units {
            let (b_ats, b_un) = b.get(&u.unit).copied().unwrap_or_default();
            let (a_ats, a_un) = a.get(&u.unit).copied().unwrap_or_default();
            u.ats_translations = a_ats.saturating_sub(b_ats);
            u.untranslated = a_un.saturating_sub(b_un);
        }
    }
}

impl PlatformView {
    /// The platform `GetPlatform` described.
    pub(crate) fn from_wire(p: &pb::Platform) -> PlatformView {
        let region = |r: Option<&pb::MemoryRegion>| {
            r.map_or(Region { base: Hpa(0), size: 0 }, |r| Region { base: Hpa(r.base), size: r.size })
        };
        let entry = |e: &pb::ScopeEntry| {
            let sid = SourceId(e.source_id as u16);
            if e.bridge {
                ScopeEntry::Bridge { bridge: sid, buses: (e.secondary_bus as u8)..=(e.subordinate_bus as u8) }
            } else {
                ScopeEntry::Endpoint(sid)
            }
        };
        let units = p
            .units
            .iter()
            .map(|u| UnitSpec {
                name: u.name.clone(),
                register_base: u.register_base,
                scope: if u.include_all {
                    UnitScope::All
                } else {
                    UnitScope::Devices(u.scope.iter().map(entry).collect())
                },
                config: UnitConfig::default(),
                driver: if u.driver == pb::UnitDriver::Client as i32 {
                    UnitDriver::Client { region: region(u.region.as_ref()) }
                } else {
                    UnitDriver::BuiltIn
                },
            })
            .collect();
        PlatformView::new(PlatformSpec {
            segment: 0,
            memory_size: p.memory_size,
            units,
            builtin_region: region(p.builtin_region.as_ref()),
            reserved: Vec::new(),
            ats_root_ports: Some(AtsRootPorts::All),
            satc: Vec::new(),
        })
    }

    /// A view of `spec` (the embedded platforms, tests).
    pub(crate) fn new(spec: PlatformSpec) -> PlatformView {
        PlatformView { routing: Routing::new(&spec), spec }
    }

    /// The unit whose scope holds `sid`, as the server routes it.
    pub(crate) fn unit_of(&self, sid: SourceId) -> Option<UnitId> {
        self.routing.unit_for(sid)
    }

    /// Unit `id`'s name (`dmar3` for a unit the platform does not have).
    pub(crate) fn name(&self, id: UnitId) -> String {
        self.spec.unit(id).map_or_else(|| format!("dmar{}", id.0), |u| u.name.clone())
    }

    fn builtin(&self, id: UnitId) -> bool {
        self.spec.unit(id).is_some_and(|u| u.driver == UnitDriver::BuiltIn)
    }

    /// The summary of the platform with `devices` (the agents' ATS functions) placed.
    pub(crate) fn summary(&self, devices: &[SourceId]) -> PlatformSummary {
        let mut units: Vec<UnitSummary> = self
            .spec
            .units
            .iter()
            .enumerate()
            .map(|(i, u)| UnitSummary {
                unit: i as u32,
                name: u.name.clone(),
                include_all: u.scope == UnitScope::All,
                builtin: u.driver == UnitDriver::BuiltIn,
                ..UnitSummary::default()
            })
            .collect();
        let mut uncovered_devices = 0;
        for &sid in devices {
            match self.unit_of(sid).and_then(|id| units.get_mut(id.index())) {
                Some(u) => u.devices += 1,
                None => uncovered_devices += 1,
            }
        }
        PlatformSummary { units, uncovered_devices }
    }

    /// A requester id behind unit `id` that none of `taken` uses: an endpoint the scope
    /// lists, else a function on a bus behind a listed bridge, else (INCLUDE_PCI_ALL) any
    /// function the unit ends up with, highest bus first. Highest device and function
    /// first on each bus, away from the low numbers agents usually bind.
    fn free_sid(&self, id: UnitId, taken: &[SourceId]) -> Option<SourceId> {
        let usable = |sid: SourceId| self.unit_of(sid) == Some(id) && !taken.contains(&sid);
        let on_bus = |bus: u8| (0..=0xffu8).rev().map(move |devfn| SourceId((u16::from(bus) << 8) | u16::from(devfn)));
        match &self.spec.unit(id)?.scope {
            UnitScope::Devices(entries) => entries.iter().find_map(|e| match e {
                ScopeEntry::Endpoint(sid) => Some(*sid).filter(|s| usable(*s)),
                ScopeEntry::Bridge { buses, .. } => buses.clone().flat_map(on_bus).find(|s| usable(*s)),
            }),
            UnitScope::All => (0..=0xffu8).rev().flat_map(on_bus).find(|s| usable(*s)),
        }
    }
}

/// Where the stalled device goes relative to the tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Behind a unit none of the tenants is behind: the case the issue is about.
    OtherUnit,
    /// Behind the tenants' unit (the embedded one-unit comparison run).
    SameUnit,
}

/// Where the stalled device and the tenants go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StallPlan {
    /// The stalled device's requester id.
    pub(crate) sid: SourceId,
    /// Its unit.
    pub(crate) unit: UnitId,
    /// The tenants: indices into the hosted devices, in their order.
    pub(crate) tenants: Vec<usize>,
}

/// Why no stalled device can be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StallPlanError {
    /// One unit only: nothing can be behind another unit.
    #[error(
        "the server's platform has one remapping unit ({0}): a stalled device cannot sit behind a unit other than the tenants' (start the server with a platform of several units, e.g. --platform deploy/platforms/two-units.toml)"
    )]
    OneUnit(String),
    /// No unit with a free requester id leaves enough tenants behind other units.
    #[error(
        "no remapping unit can take the stalled device and leave {wanted} tenant devices behind other units (at best {best}); the agents' devices sit behind {units}"
    )]
    TooFewTenants {
        /// Devices asked for.
        wanted: usize,
        /// The most any choice leaves.
        best: usize,
        /// Where the agents' devices are, e.g. `dmar0: 3, dmar1: 3`.
        units: String,
    },
    /// The tenants are not all behind one built-in unit (same-unit placement).
    #[error("the tenant devices are not all behind one unit driven by the built-in driver")]
    TenantsSpread,
    /// Every requester id the unit covers is taken.
    #[error("every requester id behind unit {0} is taken by an agent")]
    NoFreeId(String),
}

/// Chooses the stalled device's requester id and the `wanted` tenants among `hosted` (the
/// agents' ATS functions, in the order the scenario takes them). [`Placement::OtherUnit`]
/// tries every unit the built-in driver drives and keeps the first that leaves the most
/// tenants (up to `wanted`) behind other built-in units.
pub(crate) fn plan_stall(
    view: &PlatformView,
    hosted: &[SourceId],
    wanted: usize,
    placement: Placement,
) -> Result<StallPlan, StallPlanError> {
    let units = view.spec.units.len();
    match placement {
        Placement::SameUnit => {
            let tenants: Vec<usize> = (0..hosted.len().min(wanted)).collect();
            let unit = tenants.first().and_then(|&i| view.unit_of(hosted[i])).ok_or(StallPlanError::TenantsSpread)?;
            if !view.builtin(unit) || tenants.iter().any(|&i| view.unit_of(hosted[i]) != Some(unit)) {
                return Err(StallPlanError::TenantsSpread);
            }
            let sid = view.free_sid(unit, hosted).ok_or_else(|| StallPlanError::NoFreeId(view.name(unit)))?;
            Ok(StallPlan { sid, unit, tenants })
        }
        Placement::OtherUnit => {
            if units < 2 {
                return Err(StallPlanError::OneUnit(view.name(UnitId(0))));
            }
            let mut best: Option<StallPlan> = None;
            for id in (0..units).map(|i| UnitId(i as u16)).filter(|&id| view.builtin(id)) {
                let Some(sid) = view.free_sid(id, hosted) else { continue };
                let tenants: Vec<usize> = (0..hosted.len())
                    .filter(|&i| view.unit_of(hosted[i]).is_some_and(|u| u != id && view.builtin(u)))
                    .take(wanted)
                    .collect();
                if best.as_ref().is_none_or(|b| tenants.len() > b.tenants.len()) {
                    best = Some(StallPlan { sid, unit: id, tenants });
                }
            }
            match best {
                Some(plan) if plan.tenants.len() >= wanted && wanted > 0 => Ok(plan),
                best => Err(StallPlanError::TooFewTenants {
                    wanted,
                    best: best.map_or(0, |b| b.tenants.len()),
                    units: view
                        .summary(hosted)
                        .units
                        .iter()
                        .map(|u| format!("{}: {}", u.name, u.devices))
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            }
        }
    }
}

/// The embedded comparison's first platform: one unit for every device (today's default),
/// its device-TLB invalidation time-out `timeout`.
pub(crate) fn one_unit(memory_size: u64, timeout: Duration) -> PlatformSpec {
    PlatformSpec::single(memory_size, UnitConfig::default().with_device_tlb_timeout(timeout))
}

/// The bridge of [`two_units`]' first unit, and the buses behind it: low buses, below the
/// embedded agents' (0x10 and up).
pub(crate) const LOW_BRIDGE: SourceId = SourceId::new(0, 0x1c, 0);
/// See [`LOW_BRIDGE`].
pub(crate) const LOW_BUSES: std::ops::RangeInclusive<u8> = 0x01..=0x0f;

/// The embedded comparison's second platform: unit 0 (`dmar0`) covers the buses behind a
/// root port (1..=0x0f), unit 1 (`dmar1`, INCLUDE_PCI_ALL, last as the DMAR table wants
/// it) the rest, the embedded agents included. Both driven by the built-in driver, both
/// with the device-TLB invalidation time-out `timeout`.
pub(crate) fn two_units(memory_size: u64, timeout: Duration) -> PlatformSpec {
    let mut spec = one_unit(memory_size, timeout);
    let config = UnitConfig::default().with_device_tlb_timeout(timeout);
    spec.units = vec![
        UnitSpec {
            name: "dmar0".to_owned(),
            register_base: DEFAULT_REGISTER_BASE,
            scope: UnitScope::Devices(vec![ScopeEntry::Bridge { bridge: LOW_BRIDGE, buses: LOW_BUSES }]),
            config,
            driver: UnitDriver::BuiltIn,
        },
        UnitSpec {
            name: "dmar1".to_owned(),
            register_base: DEFAULT_REGISTER_BASE + 0x1000,
            scope: UnitScope::All,
            config,
            driver: UnitDriver::BuiltIn,
        },
    ];
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 2 << 30;
    const T: Duration = Duration::from_millis(200);

    fn sids(list: &[(u8, u8)]) -> Vec<SourceId> {
        list.iter().map(|&(bus, dev)| SourceId::new(bus, dev, 0)).collect()
    }

    /// Agents' functions as the embedded system and compose bind them: bus 0x10 + agent.
    fn agents(n: u8, per: u8) -> Vec<SourceId> {
        (0..per).flat_map(|f| (0..n).map(move |a| SourceId::new(0x10 + a, f, 0))).collect()
    }

    #[test]
    fn two_units_put_the_stalled_device_on_the_unit_without_tenants() {
        let view = PlatformView::new(two_units(MEM, T));
        let hosted = agents(2, 2);
        let plan = plan_stall(&view, &hosted, 4, Placement::OtherUnit).expect("plan");
        assert_eq!(plan.unit, UnitId(0));
        assert_eq!(plan.sid, SourceId::new(0x01, 0x1f, 7), "first bus behind the bridge, highest devfn");
        assert_eq!(plan.tenants, vec![0, 1, 2, 3]);
        assert!(hosted.iter().all(|&s| view.unit_of(s) == Some(UnitId(1))));
        assert_eq!(view.summary(&hosted).line(), "platform: 2 units (dmar0: 0 devices, dmar1: 4 devices)");
        assert_eq!(view.summary(&hosted).cell(), "dmar0:0;dmar1:4");
    }

    #[test]
    fn one_unit_refuses_other_unit_and_allows_same_unit() {
        let view = PlatformView::new(one_unit(MEM, T));
        let hosted = agents(2, 2);
        let err = plan_stall(&view, &hosted, 2, Placement::OtherUnit).expect_err("one unit");
        assert!(matches!(err, StallPlanError::OneUnit(ref n) if n == "dmar0"), "{err}");
        assert!(!err.to_string().contains('\n'), "one line");
        let plan = plan_stall(&view, &hosted, 2, Placement::SameUnit).expect("same unit");
        assert_eq!((plan.unit, plan.sid, plan.tenants), (UnitId(0), SourceId::new(0xff, 0x1f, 7), vec![0, 1]));
        assert_eq!(view.summary(&hosted).line(), "platform: 1 unit (dmar0: 4 devices)");
    }

    #[test]
    fn tenants_spread_over_units_leave_the_unit_with_fewest() {
        // Compose-like: unit 0 covers bus 0x10 (agent-0), unit 1 everything else.
        let mut spec = two_units(MEM, T);
        spec.units[0].scope =
            UnitScope::Devices(vec![ScopeEntry::Bridge { bridge: SourceId::new(0, 0x1c, 0), buses: 0x10..=0x10 }]);
        let view = PlatformView::new(spec);
        let hosted = agents(3, 2); // 10:00, 11:00, 12:00, 10:01, 11:01, 12:01
        let plan = plan_stall(&view, &hosted, 4, Placement::OtherUnit).expect("plan");
        assert_eq!(plan.unit, UnitId(0));
        assert_eq!(plan.sid, SourceId::new(0x10, 0x1f, 7), "free id on the agent's bus");
        assert_eq!(plan.tenants, vec![1, 2, 4, 5], "agent-0's devices are left out");
        assert_eq!(view.summary(&hosted).line(), "platform: 2 units (dmar0: 2 devices, dmar1: 4 devices)");
        // Five tenants cannot be had: one line naming where the devices are.
        let err = plan_stall(&view, &hosted, 5, Placement::OtherUnit).expect_err("too few");
        assert_eq!(err, StallPlanError::TooFewTenants { wanted: 5, best: 4, units: "dmar0: 2, dmar1: 4".to_owned() });
    }

    #[test]
    fn endpoint_scopes_and_taken_ids() {
        // Unit 0 lists two endpoints, the first of them an agent's own function; unit 1
        // lists a bridge over the agents' buses; no INCLUDE_PCI_ALL unit.
        let mut spec = two_units(MEM, T);
        spec.units[0].scope = UnitScope::Devices(vec![
            ScopeEntry::Endpoint(SourceId::new(0x20, 0, 0)),
            ScopeEntry::Endpoint(SourceId::new(0x20, 1, 0)),
        ]);
        spec.units[1].scope =
            UnitScope::Devices(vec![ScopeEntry::Bridge { bridge: SourceId::new(0, 0x1d, 0), buses: 0x10..=0x11 }]);
        let view = PlatformView::new(spec);
        let mut hosted = agents(2, 2);
        hosted.push(SourceId::new(0x20, 0, 0));
        hosted.push(SourceId::new(0x30, 0, 0)); // in no unit's scope
        let plan = plan_stall(&view, &hosted, 4, Placement::OtherUnit).expect("plan");
        assert_eq!((plan.unit, plan.sid), (UnitId(0), SourceId::new(0x20, 1, 0)), "the endpoint no agent binds");
        assert_eq!(plan.tenants, vec![0, 1, 2, 3]);
        assert_eq!(
            view.summary(&hosted).line(),
            "platform: 2 units (dmar0: 1 device, dmar1: 4 devices), 1 in no unit's scope"
        );
        // Both endpoints taken: unit 0 has no free id; unit 1 leaves one tenant.
        hosted.push(SourceId::new(0x20, 1, 0));
        let err = plan_stall(&view, &hosted, 4, Placement::OtherUnit).expect_err("no free id behind unit 0");
        assert!(matches!(err, StallPlanError::TooFewTenants { best: 2, .. }), "{err}");
    }

    #[test]
    fn a_client_driven_unit_takes_neither_stalled_device_nor_tenants() {
        let mut spec = two_units(MEM, T);
        spec.units[0].driver = UnitDriver::Client { region: Region { base: Hpa(0x4000_0000), size: 1 << 20 } };
        let view = PlatformView::new(spec);
        let err = plan_stall(&view, &agents(2, 2), 2, Placement::OtherUnit).expect_err("only one built-in unit");
        assert!(matches!(err, StallPlanError::TooFewTenants { best: 0, .. }), "{err}");
    }

    #[test]
    fn the_wire_description_routes_like_the_spec() {
        let spec = two_units(MEM, T);
        let wire = pb::Platform {
            memory_size: MEM,
            builtin_region: Some(pb::MemoryRegion { base: spec.builtin_region.base.0, size: spec.builtin_region.size }),
            units: vec![
                pb::PlatformUnit {
                    unit: 0,
                    name: "dmar0".into(),
                    scope: vec![pb::ScopeEntry {
                        source_id: u32::from(LOW_BRIDGE),
                        bridge: true,
                        secondary_bus: 1,
                        subordinate_bus: 0x0f,
                    }],
                    driver: pb::UnitDriver::BuiltIn as i32,
                    ..Default::default()
                },
                pb::PlatformUnit {
                    unit: 1,
                    name: "dmar1".into(),
                    include_all: true,
                    driver: pb::UnitDriver::BuiltIn as i32,
                    ..Default::default()
                },
            ],
        };
        let (a, b) = (PlatformView::from_wire(&wire), PlatformView::new(spec));
        for sid in (0..=0xffffu16).step_by(7).map(SourceId) {
            assert_eq!(a.unit_of(sid), b.unit_of(sid), "{sid}");
        }
        assert_eq!(a.unit_of(sids(&[(0x05, 3)])[0]), Some(UnitId(0)));
        assert_eq!(a.unit_of(LOW_BRIDGE), Some(UnitId(0)), "the bridge itself is in its scope");
    }
}
