//! The Control service: the software side of the unit over gRPC.
//!
//! Thin by design: each call checks its arguments, calls the driver or the unit, and maps
//! errors through [`super::status`]. Calls that may wait for devices (anything that
//! invalidates: attach, detach, unmap, flush, raw descriptor submission) run on the
//! blocking pool, so a waiting invalidation never occupies a runtime thread that a link
//! needs to deliver the device's answer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dmar_proto::v1::control_server::Control;
use dmar_proto::v1::*;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::State;
use super::status;
use dmar_vtd::driver::{DomainKind as DrvKind, FlushPolicy as DrvFlush, Perm};
use dmar_vtd::ids::{DomainId, Hpa, Iova};
use dmar_vtd::unit::Direction;
use dmar_vtd::unit::tables::AddressWidth;

/// Most ranges per map or unmap request.
pub const MAX_RANGES: usize = 4096;
/// Most bytes per memory read or write.
pub const MAX_MEMORY_BYTES: usize = 1 << 20;
/// Most descriptors per submission.
pub const MAX_DESCRIPTORS: usize = 128;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC face of the driver and the unit.
#[derive(Debug, Clone)]
pub(crate) struct ControlService {
    pub(crate) state: Arc<State>,
}

fn domain_id(raw: u32) -> Result<DomainId, Status> {
    u16::try_from(raw)
        .ok()
        .filter(|d| *d != 0)
        .map(DomainId)
        .ok_or_else(|| Status::invalid_argument(format!("domain id {raw} is outside 1..=65535")))
}

/// A watcher's stream of the events `sender` broadcasts; a watcher that falls behind loses
/// the oldest events (logged), it never slows the unit down.
fn watch<T: Clone + Send + 'static>(sender: &broadcast::Sender<T>, what: &'static str) -> EventStream<T> {
    Box::pin(BroadcastStream::new(sender.subscribe()).filter_map(move |e| match e {
        Ok(event) => Some(Ok(event)),
        Err(lagged) => {
            tracing::warn!(%lagged, "{what} watcher fell behind");
            None
        }
    }))
}

/// Runs a driver call that may wait for devices on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("driver task failed: {e}")))?
}

impl ControlService {
    fn policy(&self, p: i32) -> Result<DrvFlush, Status> {
        match FlushPolicy::try_from(p) {
            Ok(FlushPolicy::Unspecified) => Ok(self.state.default_flush),
            Ok(FlushPolicy::Strict) => Ok(DrvFlush::Strict),
            Ok(FlushPolicy::Deferred) => Ok(self.state.deferred),
            Err(_) => Err(Status::invalid_argument(format!("unknown flush policy {p}"))),
        }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn create_domain(&self, r: Request<CreateDomainRequest>) -> Result<Response<CreateDomainResponse>, Status> {
        let r = r.into_inner();
        let kind = match DomainKind::try_from(r.kind) {
            Ok(DomainKind::Blocked) => DrvKind::Blocked,
            Ok(DomainKind::Identity) => DrvKind::Identity,
            Ok(DomainKind::Paging) => DrvKind::Paging,
            _ => return Err(Status::invalid_argument("domain kind must be blocked, identity or paging")),
        };
        let aw = match r.address_width {
            0 | 48 => AddressWidth::Aw48,
            39 => AddressWidth::Aw39,
            57 => AddressWidth::Aw57,
            other => return Err(Status::invalid_argument(format!("address width {other} is not 39, 48 or 57"))),
        };
        let did = self.state.driver.create_domain(kind, aw).map_err(status::driver)?;
        Ok(Response::new(CreateDomainResponse { domain_id: u32::from(did.0) }))
    }

    async fn destroy_domain(
        &self,
        r: Request<DestroyDomainRequest>,
    ) -> Result<Response<DestroyDomainResponse>, Status> {
        let did = domain_id(r.into_inner().domain_id)?;
        let driver = self.state.driver.clone();
        blocking(move || driver.destroy_domain(did).map_err(status::driver)).await?;
        Ok(Response::new(DestroyDomainResponse {}))
    }

    async fn attach(&self, r: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        let r = r.into_inner();
        let (sid, did) = (status::source_id(r.source_id)?, domain_id(r.domain_id)?);
        let driver = self.state.driver.clone();
        blocking(move || driver.attach(sid, did, r.ats).map_err(status::driver)).await?;
        tracing::info!(%sid, domain = did.0, ats = r.ats, "device attached");
        Ok(Response::new(AttachResponse {}))
    }

    async fn detach(&self, r: Request<DetachRequest>) -> Result<Response<DetachResponse>, Status> {
        let sid = status::source_id(r.into_inner().source_id)?;
        let driver = self.state.driver.clone();
        let prev = blocking(move || driver.detach(sid).map_err(status::driver)).await?;
        Ok(Response::new(DetachResponse { previous_domain_id: prev.map_or(0, |d| u32::from(d.0)) }))
    }

    async fn map(&self, r: Request<MapRequest>) -> Result<Response<MapResponse>, Status> {
        let r = r.into_inner();
        let did = domain_id(r.domain_id)?;
        if r.ranges.len() > MAX_RANGES {
            return Err(Status::resource_exhausted(format!(
                "{} ranges in one map; at most {MAX_RANGES}",
                r.ranges.len()
            )));
        }
        let driver = self.state.driver.clone();
        let mapped = blocking(move || {
            let mut done: Vec<(Iova, u64)> = Vec::with_capacity(r.ranges.len());
            for (i, m) in r.ranges.iter().enumerate() {
                let perm = m.permissions.map_or(Perm::default(), |p| Perm { read: p.read, write: p.write });
                if let Err(e) = driver.map(did, Iova(m.iova), Hpa(m.hpa), m.length, perm) {
                    // All or nothing: undo this request's earlier ranges.
                    for (iova, len) in done {
                        let _ = driver.unmap_with(did, iova, len, DrvFlush::Strict);
                    }
                    let s = status::driver(e);
                    return Err(Status::new(s.code(), format!("range {i}: {}", s.message())));
                }
                done.push((Iova(m.iova), m.length));
            }
            Ok(done.iter().map(|(_, l)| l).sum::<u64>())
        })
        .await?;
        Ok(Response::new(MapResponse { mapped_bytes: mapped }))
    }

    async fn unmap(&self, r: Request<UnmapRequest>) -> Result<Response<UnmapResponse>, Status> {
        let r = r.into_inner();
        let did = domain_id(r.domain_id)?;
        if r.ranges.len() > MAX_RANGES {
            return Err(Status::resource_exhausted(format!(
                "{} ranges in one unmap; at most {MAX_RANGES}",
                r.ranges.len()
            )));
        }
        let policy = self.policy(r.policy)?;
        let driver = self.state.driver.clone();
        let bytes = blocking(move || {
            let mut total = 0;
            for (i, u) in r.ranges.iter().enumerate() {
                total += driver.unmap_with(did, Iova(u.iova), u.length, policy).map_err(|e| {
                    let s = status::driver(e);
                    Status::new(s.code(), format!("range {i}: {}", s.message()))
                })?;
            }
            Ok(total)
        })
        .await?;
        Ok(Response::new(UnmapResponse { unmapped_bytes: bytes }))
    }

    async fn flush(&self, _r: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        let driver = self.state.driver.clone();
        blocking(move || driver.flush_deferred().map_err(status::driver)).await?;
        Ok(Response::new(FlushResponse {}))
    }

    async fn translate(&self, r: Request<TranslateRequest>) -> Result<Response<TranslateResponse>, Status> {
        let r = r.into_inner();
        let sid = status::source_id(r.source_id)?;
        let access = match AccessKind::try_from(r.access) {
            Ok(AccessKind::Read) => Direction::Read,
            Ok(AccessKind::Write) => Direction::Write,
            _ => return Err(Status::invalid_argument("access must be read or write")),
        };
        let reply = match self.state.unit.translate(sid, Iova(r.iova), access) {
            Ok(t) => TranslateResponse { ok: true, hpa: t.hpa.0, page_shift: t.page_shift, fault_reason: 0 },
            Err(b) => TranslateResponse {
                ok: false,
                hpa: 0,
                page_shift: 0,
                fault_reason: b.reason.map_or(0, |r| u32::from(r.code())),
            },
        };
        Ok(Response::new(reply))
    }

    async fn read_register(&self, r: Request<ReadRegisterRequest>) -> Result<Response<ReadRegisterResponse>, Status> {
        let r = r.into_inner();
        let unit = &self.state.unit;
        let value = match r.width {
            4 => u64::from(unit.read32(r.offset).map_err(status::mmio)?),
            8 => unit.read64(r.offset).map_err(status::mmio)?,
            w => return Err(Status::invalid_argument(format!("register width {w} is not 4 or 8"))),
        };
        Ok(Response::new(ReadRegisterResponse { value }))
    }

    async fn write_register(
        &self,
        r: Request<WriteRegisterRequest>,
    ) -> Result<Response<WriteRegisterResponse>, Status> {
        let r = r.into_inner();
        let unit = &self.state.unit;
        match r.width {
            4 => {
                let v = u32::try_from(r.value)
                    .map_err(|_| Status::invalid_argument(format!("value {:#x} does not fit 4 bytes", r.value)))?;
                unit.write32(r.offset, v).map_err(status::mmio)?;
            }
            8 => unit.write64(r.offset, r.value).map_err(status::mmio)?,
            w => return Err(Status::invalid_argument(format!("register width {w} is not 4 or 8"))),
        }
        Ok(Response::new(WriteRegisterResponse {}))
    }

    async fn read_memory(&self, r: Request<ReadMemoryRequest>) -> Result<Response<ReadMemoryResponse>, Status> {
        let r = r.into_inner();
        if r.length as usize > MAX_MEMORY_BYTES {
            return Err(Status::invalid_argument(format!("read of {} bytes; at most {MAX_MEMORY_BYTES}", r.length)));
        }
        let mut data = vec![0u8; r.length as usize];
        self.state.unit.memory().read(Hpa(r.address), &mut data).map_err(status::memory)?;
        Ok(Response::new(ReadMemoryResponse { data }))
    }

    async fn write_memory(&self, r: Request<WriteMemoryRequest>) -> Result<Response<WriteMemoryResponse>, Status> {
        let r = r.into_inner();
        if r.data.len() > MAX_MEMORY_BYTES {
            return Err(Status::invalid_argument(format!(
                "write of {} bytes; at most {MAX_MEMORY_BYTES}",
                r.data.len()
            )));
        }
        self.state.unit.memory().write(Hpa(r.address), &r.data).map_err(status::memory)?;
        Ok(Response::new(WriteMemoryResponse {}))
    }

    async fn submit_invalidations(
        &self,
        r: Request<SubmitInvalidationsRequest>,
    ) -> Result<Response<SubmitInvalidationsResponse>, Status> {
        let descs: Vec<(u64, u64)> = r.into_inner().descriptors.iter().map(|d| (d.qw0, d.qw1)).collect();
        if descs.is_empty() || descs.len() > MAX_DESCRIPTORS {
            return Err(Status::invalid_argument(format!("1 to {MAX_DESCRIPTORS} descriptors, got {}", descs.len())));
        }
        let driver = self.state.driver.clone();
        blocking(move || driver.submit_descriptors(&descs).map_err(status::driver)).await?;
        Ok(Response::new(SubmitInvalidationsResponse {}))
    }

    async fn set_interrupt_entry(
        &self,
        r: Request<SetInterruptEntryRequest>,
    ) -> Result<Response<SetInterruptEntryResponse>, Status> {
        let r = r.into_inner();
        let index = u16::try_from(r.index)
            .map_err(|_| Status::invalid_argument(format!("interrupt index {} does not fit 16 bits", r.index)))?;
        let driver = self.state.driver.clone();
        blocking(move || driver.set_interrupt_entry(index, r.lo, r.hi).map_err(status::driver)).await?;
        Ok(Response::new(SetInterruptEntryResponse {}))
    }

    type WatchFaultsStream = EventStream<FaultEvent>;

    async fn watch_faults(&self, _r: Request<WatchRequest>) -> Result<Response<Self::WatchFaultsStream>, Status> {
        Ok(Response::new(watch(&self.state.hub.faults, "fault")))
    }

    type WatchInterruptsStream = EventStream<InterruptEvent>;

    async fn watch_interrupts(
        &self,
        _r: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchInterruptsStream>, Status> {
        Ok(Response::new(watch(&self.state.hub.interrupts, "interrupt")))
    }

    type WatchPageRequestsStream = EventStream<PageRequestEvent>;

    async fn watch_page_requests(
        &self,
        _r: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchPageRequestsStream>, Status> {
        Ok(Response::new(watch(&self.state.hub.page_requests, "page request")))
    }

    async fn respond_page_request(
        &self,
        r: Request<RespondPageRequestRequest>,
    ) -> Result<Response<RespondPageRequestResponse>, Status> {
        let r = r.into_inner();
        let sid = status::source_id(r.source_id)?;
        let prgi = status::group_index(r.group_index)?;
        let code = match PageResponseCode::try_from(r.code) {
            Ok(PageResponseCode::Success) => dmar_vtd::unit::prq::ResponseCode::Success,
            Ok(PageResponseCode::Invalid) => dmar_vtd::unit::prq::ResponseCode::Invalid,
            Ok(PageResponseCode::Failure) => dmar_vtd::unit::prq::ResponseCode::Failure,
            Err(_) => return Err(Status::invalid_argument(format!("unknown page response code {}", r.code))),
        };
        let driver = self.state.driver.clone();
        blocking(move || driver.respond_page_request(sid, prgi, code).map_err(status::driver)).await?;
        Ok(Response::new(RespondPageRequestResponse {}))
    }

    async fn get_stats(&self, _r: Request<GetStatsRequest>) -> Result<Response<Stats>, Status> {
        let s = self.state.unit.stats();
        Ok(Response::new(Stats {
            unit: super::stats_map(&s),
            live_links: self.state.links.load(Ordering::Relaxed),
            bound_functions: self.state.bound_functions.load(Ordering::Relaxed),
            link_translations: self.state.link_translations.load(Ordering::Relaxed),
            cpu_time_ns: super::metrics::process_cpu_time().map_or(0, |d| d.as_nanos() as u64),
        }))
    }
}
