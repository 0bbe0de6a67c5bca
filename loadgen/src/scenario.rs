//! Scenario setup through the Control service: one paging domain per device, the device
//! attached with ATS, and its footprint mapped with the chosen page-size mix.
//!
//! Every device maps the same IOVA window onto the same host frames: memory use does not
//! grow with the device count, while each device still has its own domain, page tables
//! and cache entries.

use anyhow::Context as _;
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use tonic::transport::Channel;

use crate::args::PageMix;
use dmar_vtd::PAGE_SIZE;

/// First IOVA of every device's footprint.
pub(crate) const IOVA_BASE: u64 = 0x1_0000_0000;
/// First host address backing the footprints (2 MiB aligned).
pub(crate) const HPA_BASE: u64 = 0x1000_0000;

/// A device ready for a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prepared {
    /// Requester id.
    pub(crate) sid: u32,
    /// Its domain.
    pub(crate) domain: u32,
}

/// The map ranges for a footprint: 2 MiB-aligned host frames give superpages; a 4 KiB
/// offset forces 4 KiB pages.
pub(crate) fn ranges(footprint: u64, mix: PageMix) -> Vec<MapRange> {
    let perms = Some(Permissions { read: true, write: true });
    let range = |iova: u64, hpa: u64, length: u64| MapRange { iova, hpa, length, permissions: perms };
    match mix {
        PageMix::Small => vec![range(IOVA_BASE, HPA_BASE + PAGE_SIZE, footprint)],
        PageMix::Large => vec![range(IOVA_BASE, HPA_BASE, footprint)],
        PageMix::Mixed => {
            let half = (footprint / 2) & !0x1f_ffff;
            if half == 0 {
                return vec![range(IOVA_BASE, HPA_BASE + PAGE_SIZE, footprint)];
            }
            vec![
                range(IOVA_BASE, HPA_BASE, half),
                range(IOVA_BASE + half, HPA_BASE + half + PAGE_SIZE, footprint - half),
            ]
        }
    }
}

/// Creates a 48-bit paging domain for `sid` and attaches it with ATS, and with
/// translated-request checking if `check_translated`; nothing is mapped.
pub(crate) async fn attach(
    control: &mut ControlClient<Channel>,
    sid: u32,
    check_translated: bool,
) -> anyhow::Result<Prepared> {
    let domain = control
        .create_domain(CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 })
        .await
        .context("CreateDomain")?
        .into_inner()
        .domain_id;
    control
        .attach(AttachRequest { source_id: sid, domain_id: domain, ats: true, check_translated })
        .await
        .context("Attach")?;
    Ok(Prepared { sid, domain })
}

/// Creates a domain per device, attaches it with ATS (and translated-request checking if
/// `check_translated`) and maps its footprint.
pub(crate) async fn prepare(
    control: &mut ControlClient<Channel>,
    sids: &[u32],
    footprint: u64,
    mix: PageMix,
    check_translated: bool,
) -> anyhow::Result<Vec<Prepared>> {
    let mut out = Vec::with_capacity(sids.len());
    for &sid in sids {
        let Prepared { domain, .. } = attach(control, sid, check_translated).await?;
        control
            .map(MapRequest { domain_id: domain, ranges: ranges(footprint, mix) })
            .await
            .with_context(|| format!("mapping {footprint:#x} bytes for requester id {sid:#06x}"))?;
        out.push(Prepared { sid, domain });
    }
    Ok(out)
}

/// Detaches the devices and destroys their domains (best effort: a remote server is left
/// as it was found).
pub(crate) async fn teardown(control: &mut ControlClient<Channel>, prepared: &[Prepared]) {
    for p in prepared {
        let _ = control.detach(DetachRequest { source_id: p.sid }).await;
        let _ = control.destroy_domain(DestroyDomainRequest { domain_id: p.domain }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_mixes_cover_the_footprint() {
        for mix in [PageMix::Small, PageMix::Large, PageMix::Mixed] {
            let r = ranges(16 << 20, mix);
            assert_eq!(r.iter().map(|r| r.length).sum::<u64>(), 16 << 20, "{mix:?}");
            assert_eq!(r[0].iova, IOVA_BASE);
        }
        let mixed = ranges(16 << 20, PageMix::Mixed);
        assert_eq!(mixed[0].hpa % (2 << 20), 0, "superpage half");
        assert_ne!(mixed[1].hpa % (2 << 20), 0, "4 KiB half");
    }
}
