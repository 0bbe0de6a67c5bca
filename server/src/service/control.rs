//! The Control service: the software side of the unit over gRPC.
//!
//! Thin by design: each call decodes its arguments ([`super::wire`]), calls the driver or
//! the unit, and maps errors through [`super::status`]. Every call that reaches the driver
//! (domains, attach, detach, map, unmap, flush, raw descriptors, interrupt entries, page
//! responses) runs on the blocking pool ([`super::blocking`]): the driver may wait for
//! devices, and a waiting invalidation must never occupy a runtime thread that a link
//! needs to deliver the device's answer. Unit calls (translation, registers, memory)
//! never wait and run in place.
//!
//! Authorisation happens before a call arrives here (the table in [`super::auth`]); the
//! domain calls consult the per-identity ledger for quotas and ownership.
//!
//! Not here: the ATS link ([`super::link`]), the event streams' sources
//! ([`super::events`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dmar_proto::v1::control_server::Control;
use dmar_proto::v1::*;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};

use super::platform::Holder;
use super::wire::{self, MAX_MEMORY_BYTES, MAX_RANGES};
use super::{State, auth, blocking, status};
use dmar_vtd::driver::FlushPolicy as DriverFlush;
use dmar_vtd::ids::{Hpa, Iova, UnitId};
use dmar_vtd::unit::invalidation::descriptor::{self, Descriptor as Decoded};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC face of the driver and the unit.
#[derive(Debug, Clone)]
pub(crate) struct ControlService {
    pub(crate) state: Arc<State>,
}

/// Events queued per watcher between its forwarder and the transport. A slow watcher's
/// backlog builds up in the broadcast channel (`EVENT_BUFFER` events), not here.
const WATCH_DEPTH: usize = 64;

/// A watcher's stream of the events `sender` broadcasts, fed by a forwarder task (tracked,
/// so shutdown waits for it). A watcher that falls behind loses the oldest events (counted
/// in `dropped`, and logged); it never slows the unit down. The stream ends with
/// UNAVAILABLE when the server shuts down, as links do, so a watcher never holds shutdown
/// up.
fn watch<T: Clone + Send + 'static>(
    state: &State,
    sender: &broadcast::Sender<T>,
    what: &'static str,
    dropped: metrics::Counter,
) -> EventStream<T> {
    let mut events = sender.subscribe();
    let (tx, rx) = mpsc::channel(WATCH_DEPTH);
    let shutdown = state.shutdown.clone();
    state.tasks.spawn(async move {
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = tx.try_send(Err(Status::unavailable("server shutting down")));
                    return;
                }
                // The watcher is gone.
                () = tx.closed() => return,
                e = events.recv() => match e {
                    Ok(event) => event,
                    Err(RecvError::Lagged(lost)) => {
                        dropped.increment(lost);
                        tracing::warn!(lost, "{what} watcher fell behind");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                sent = tx.send(Ok(event)) => if sent.is_err() { return },
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

impl ControlService {
    /// `r`, counting a refusal of ownership (`dmar_server_refusals_total{reason="unit_ownership"}`).
    fn owned<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        if r.as_ref().is_err_and(|s| matches!(s.code(), Code::PermissionDenied | Code::FailedPrecondition)) {
            self.state.metrics.refused(super::metrics::Refusal::UnitOwnership);
        }
        r
    }

    /// Unit `raw`, which must be driven by the built-in driver.
    fn builtin_unit(&self, raw: u32) -> Result<UnitId, Status> {
        let slot = self.state.units.get(raw)?;
        if !slot.is_builtin() {
            self.state.metrics.refused(super::metrics::Refusal::UnitOwnership);
            return Err(Status::failed_precondition(format!(
                "unit {} ({}) is client-driven: domains, maps, interrupt entries and the invalidation queue are its \
                 owner's, through its registers and memory",
                slot.id, slot.spec.name
            )));
        }
        Ok(slot.id)
    }
}

/// Refuses a map or unmap request with more than [`MAX_RANGES`] ranges.
fn check_ranges(n: usize, what: &str) -> Result<(), Status> {
    if n > MAX_RANGES {
        return Err(Status::resource_exhausted(format!("{n} ranges in one {what}; at most {MAX_RANGES}")));
    }
    Ok(())
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn create_domain(&self, r: Request<CreateDomainRequest>) -> Result<Response<CreateDomainResponse>, Status> {
        let caller = auth::caller(&r)?;
        let r = r.into_inner();
        let kind = wire::domain_kind(r.kind)?;
        let aw = wire::address_width(r.address_width)?;
        let slot = self.state.access.reserve_domain(&caller)?;
        let driver = self.state.driver()?;
        // A paging domain's top-level table is a frame of the caller's `max_frames`.
        let mut budget = self.state.access.frame_budget(&caller, None, &driver).await;
        if kind == dmar_vtd::driver::DomainKind::Paging {
            budget.reserve_one()?;
        }
        let access = self.state.access.clone();
        let create = move || driver.create_domain(kind, aw).map_err(status::driver);
        let did = blocking(move || access.create_domain(slot, create)).await?;
        drop(budget);
        Ok(Response::new(CreateDomainResponse { domain_id: u32::from(did.0) }))
    }

    async fn destroy_domain(
        &self,
        r: Request<DestroyDomainRequest>,
    ) -> Result<Response<DestroyDomainResponse>, Status> {
        let caller = auth::caller(&r)?;
        let did = wire::domain_id(r.into_inner().domain_id)?;
        self.state.access.check_domain_owner(&caller, did)?;
        let driver = self.state.driver()?;
        let access = self.state.access.clone();
        blocking(move || access.destroy_domain(did, || driver.destroy_domain(did).map_err(status::driver))).await?;
        Ok(Response::new(DestroyDomainResponse {}))
    }

    async fn attach(&self, r: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        let r = r.into_inner();
        let (sid, did) = (wire::source_id(r.source_id)?, wire::domain_id(r.domain_id)?);
        let options = wire::attach_options(&r);
        let driver = self.state.driver()?;
        blocking(move || driver.attach_with(sid, did, options).map_err(status::driver)).await?;
        tracing::info!(%sid, domain = did.0, ats = r.ats, check_translated = r.check_translated, "device attached");
        Ok(Response::new(AttachResponse {}))
    }

    async fn detach(&self, r: Request<DetachRequest>) -> Result<Response<DetachResponse>, Status> {
        let sid = wire::source_id(r.into_inner().source_id)?;
        let driver = self.state.driver()?;
        let prev = blocking(move || driver.detach(sid).map_err(status::driver)).await?;
        Ok(Response::new(DetachResponse { previous_domain_id: prev.map_or(0, |d| u32::from(d.0)) }))
    }

    async fn map(&self, r: Request<MapRequest>) -> Result<Response<MapResponse>, Status> {
        let caller = auth::caller(&r)?;
        let r = r.into_inner();
        let did = wire::domain_id(r.domain_id)?;
        check_ranges(r.ranges.len(), "map")?;
        let driver = self.state.driver()?;
        // The domain owner's `max_frames`: each range maps within what is left of it.
        // No range may reach a client-driven unit's region: checked before anything maps.
        for (i, m) in r.ranges.iter().enumerate() {
            self.owned(self.state.units.check_map_target(Hpa(m.hpa), m.length)).map_err(|s| status::in_range(i, s))?;
        }
        let mut budget = self.state.access.frame_budget(&caller, Some(did), &driver).await;
        let mapped = blocking(move || {
            let mut done: Vec<(Iova, u64)> = Vec::with_capacity(r.ranges.len());
            for (i, m) in r.ranges.iter().enumerate() {
                let perm = wire::permissions(m.permissions);
                if let Err(e) = budget.map(&driver, did, Iova(m.iova), Hpa(m.hpa), m.length, perm) {
                    // All or nothing: undo this request's earlier ranges.
                    for (iova, len) in done {
                        let _ = driver.unmap_with(did, iova, len, DriverFlush::Strict);
                    }
                    return Err(status::in_range(i, budget.status(e)));
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
        let did = wire::domain_id(r.domain_id)?;
        check_ranges(r.ranges.len(), "unmap")?;
        let policy = wire::flush_policy(r.policy, self.state.default_flush, self.state.deferred)?;
        let driver = self.state.driver()?;
        let bytes = blocking(move || {
            let mut total = 0;
            for (i, u) in r.ranges.iter().enumerate() {
                total += driver
                    .unmap_with(did, Iova(u.iova), u.length, policy)
                    .map_err(|e| status::driver_in_range(i, e))?;
            }
            Ok(total)
        })
        .await?;
        Ok(Response::new(UnmapResponse { unmapped_bytes: bytes }))
    }

    async fn flush(&self, _r: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        let driver = self.state.driver()?;
        blocking(move || driver.flush_deferred().map_err(status::driver)).await?;
        Ok(Response::new(FlushResponse {}))
    }

    async fn translate(&self, r: Request<TranslateRequest>) -> Result<Response<TranslateResponse>, Status> {
        let r = r.into_inner();
        let sid = wire::source_id(r.source_id)?;
        let access = wire::access(r.access)?;
        let slot = self.state.units.route(sid)?;
        Ok(Response::new(wire::translate_response(slot.id, slot.unit.translate(sid, Iova(r.iova), access))))
    }

    async fn read_register(&self, r: Request<ReadRegisterRequest>) -> Result<Response<ReadRegisterResponse>, Status> {
        let r = r.into_inner();
        let unit = &self.state.units.get(r.unit)?.unit;
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
        let write = |unit: &dmar_vtd::unit::Unit| match r.width {
            4 => unit.write32(r.offset, wire::register_value32(r.value)?).map_err(status::mmio),
            8 => unit.write64(r.offset, r.value).map_err(status::mmio),
            w => Err(Status::invalid_argument(format!("register width {w} is not 4 or 8"))),
        };
        self.owned(self.state.units.as_owner(r.unit, &r.lease, write))??;
        Ok(Response::new(WriteRegisterResponse {}))
    }

    async fn read_memory(&self, r: Request<ReadMemoryRequest>) -> Result<Response<ReadMemoryResponse>, Status> {
        let r = r.into_inner();
        if r.length as usize > MAX_MEMORY_BYTES {
            return Err(Status::invalid_argument(format!("read of {} bytes; at most {MAX_MEMORY_BYTES}", r.length)));
        }
        let mut data = vec![0u8; r.length as usize];
        self.state.units.memory.read(Hpa(r.address), &mut data).map_err(status::memory)?;
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
        self.owned(self.state.units.write_memory(Hpa(r.address), &r.data, &r.lease))?;
        Ok(Response::new(WriteMemoryResponse {}))
    }

    async fn submit_invalidations(
        &self,
        r: Request<SubmitInvalidationsRequest>,
    ) -> Result<Response<SubmitInvalidationsResponse>, Status> {
        let r = r.into_inner();
        let descs = wire::descriptors(&r.descriptors)?;
        let unit = self.builtin_unit(r.unit)?;
        // A status write is the unit writing memory for the client: not into a driver's
        // region (the built-in driver's tables, a client-driven unit's).
        for (i, (qw0, qw1)) in descs.iter().enumerate() {
            if let Ok(Decoded::Wait(w)) = descriptor::decode(*qw0, *qw1)
                && w.status_write
            {
                self.owned(self.state.units.check_status_target(Hpa(w.status_addr), 4))
                    .map_err(|s| Status::new(s.code(), format!("descriptor {i}: {}", s.message())))?;
            }
        }
        let driver = self.state.driver()?;
        let result = blocking(move || Ok(driver.submit_descriptors_on(unit, &descs))).await?;
        if let Err(e) = result {
            // Refused by the driver's checks or by the unit (IQE): the client's descriptor.
            if matches!(e, dmar_vtd::driver::DriverError::InvalidDescriptor { .. }) {
                self.state.metrics.refused(super::metrics::Refusal::InvalidDescriptor);
            }
            return Err(status::driver(e));
        }
        Ok(Response::new(SubmitInvalidationsResponse {}))
    }

    async fn set_interrupt_entry(
        &self,
        r: Request<SetInterruptEntryRequest>,
    ) -> Result<Response<SetInterruptEntryResponse>, Status> {
        let r = r.into_inner();
        let index = wire::interrupt_index(r.index)?;
        let unit = self.builtin_unit(r.unit)?;
        let driver = self.state.driver()?;
        blocking(move || driver.set_interrupt_entry_on(unit, index, r.lo, r.hi).map_err(status::driver)).await?;
        Ok(Response::new(SetInterruptEntryResponse {}))
    }

    type WatchFaultsStream = EventStream<FaultEvent>;

    async fn watch_faults(&self, _r: Request<WatchRequest>) -> Result<Response<Self::WatchFaultsStream>, Status> {
        let dropped = self.state.metrics.faults_watch_dropped.clone();
        Ok(Response::new(watch(&self.state, &self.state.hub.faults, "fault", dropped)))
    }

    type WatchInterruptsStream = EventStream<InterruptEvent>;

    async fn watch_interrupts(
        &self,
        _r: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchInterruptsStream>, Status> {
        let dropped = self.state.metrics.interrupts_watch_dropped.clone();
        Ok(Response::new(watch(&self.state, &self.state.hub.interrupts, "interrupt", dropped)))
    }

    type WatchPageRequestsStream = EventStream<PageRequestEvent>;

    async fn watch_page_requests(
        &self,
        _r: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchPageRequestsStream>, Status> {
        let dropped = self.state.metrics.page_requests_watch_dropped.clone();
        Ok(Response::new(watch(&self.state, &self.state.hub.page_requests, "page request", dropped)))
    }

    async fn respond_page_request(
        &self,
        r: Request<RespondPageRequestRequest>,
    ) -> Result<Response<RespondPageRequestResponse>, Status> {
        let r = r.into_inner();
        let sid = wire::source_id(r.source_id)?;
        let prgi = wire::group_index(r.group_index)?;
        let code = wire::response_code(r.code)?;
        // PCIe 10.4.2: a response answers a group its function has outstanding. (Two
        // concurrent responses to one group may both pass; the second reaches the function
        // as an unexpected response, as it would on hardware.)
        if !self.state.hub.page_groups.is_outstanding(sid, prgi) {
            self.state.metrics.refused(super::metrics::Refusal::PageGroupNotOutstanding);
            return Err(Status::failed_precondition(format!("page request group {prgi} of {sid} is not outstanding")));
        }
        let driver = self.state.driver()?;
        blocking(move || driver.respond_page_request(sid, prgi, code).map_err(status::driver)).await?;
        Ok(Response::new(RespondPageRequestResponse {}))
    }

    async fn release_requester_ids(
        &self,
        r: Request<ReleaseRequesterIdsRequest>,
    ) -> Result<Response<ReleaseRequesterIdsResponse>, Status> {
        let caller = auth::caller(&r)?;
        let r = r.into_inner();
        let sids = r.source_ids.iter().map(|s| wire::source_id(*s)).collect::<Result<Vec<_>, _>>()?;
        let released = self.state.access.release(&sids, r.all)?;
        tracing::info!(identity = %caller.identity, released, all = r.all, "requester ids released");
        Ok(Response::new(ReleaseRequesterIdsResponse { released }))
    }

    async fn get_stats(&self, _r: Request<GetStatsRequest>) -> Result<Response<Stats>, Status> {
        let s = self.state.total_stats();
        Ok(Response::new(Stats {
            units: self.state.units.iter().map(wire::unit_counters).collect(),
            unit: wire::unit_stats(&s),
            live_links: self.state.links.load(Ordering::Relaxed),
            bound_functions: self.state.bound_functions.load(Ordering::Relaxed),
            link_translations: self.state.link_translations.load(Ordering::Relaxed),
            cpu_time_ns: super::metrics::process_cpu_time().map_or(0, |d| d.as_nanos() as u64),
        }))
    }

    async fn get_platform(&self, _r: Request<GetPlatformRequest>) -> Result<Response<Platform>, Status> {
        Ok(Response::new(wire::platform(&self.state.units)))
    }

    async fn read_acpi_table(&self, r: Request<ReadAcpiTableRequest>) -> Result<Response<AcpiTable>, Status> {
        match r.into_inner().signature.as_str() {
            "DMAR" => Ok(Response::new(AcpiTable { data: self.state.units.dmar_table().to_vec() })),
            // The signature is the client's text: not echoed.
            _ => Err(Status::not_found("the platform has one ACPI table: \"DMAR\"")),
        }
    }

    type ClaimUnitStream = EventStream<UnitLease>;

    async fn claim_unit(&self, r: Request<ClaimUnitRequest>) -> Result<Response<Self::ClaimUnitStream>, Status> {
        let caller = auth::caller(&r)?;
        let claim = self.owned(self.state.units.claim(r.into_inner().unit))?;
        tracing::info!(identity = %caller.identity, unit = %claim.unit, "unit claimed");
        let (tx, rx) = mpsc::channel(1);
        // The channel is new and holds one message: this send cannot fail.
        let _ = tx.try_send(Ok(UnitLease { unit: u32::from(claim.unit.0), lease: claim.secret }));
        let state = self.state.clone();
        let (unit, serial, ended) = (claim.unit, claim.serial, claim.ended);
        self.state.tasks.spawn(async move {
            tokio::select! {
                // Released by ReleaseUnit: the stream ends.
                () = ended.cancelled() => {}
                // The holder closed the stream or lost its connection.
                () = tx.closed() => {}
                () = state.shutdown.cancelled() => {
                    let _ = tx.try_send(Err(Status::unavailable("server shutting down")));
                }
            }
            if state.units.release(u32::from(unit.0), Holder::Serial(serial)).unwrap_or(false) {
                tracing::info!(identity = %caller.identity, %unit, "unit released: its claim stream closed");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn release_unit(&self, r: Request<ReleaseUnitRequest>) -> Result<Response<ReleaseUnitResponse>, Status> {
        let caller = auth::caller(&r)?;
        let r = r.into_inner();
        self.owned(self.state.units.release(r.unit, Holder::Secret(&r.lease)))?;
        tracing::info!(identity = %caller.identity, unit = r.unit, "unit released");
        Ok(Response::new(ReleaseUnitResponse {}))
    }

    async fn reset_unit(&self, r: Request<ResetUnitRequest>) -> Result<Response<ResetUnitResponse>, Status> {
        let r = r.into_inner();
        self.owned(self.state.units.as_owner(r.unit, &r.lease, |unit| unit.reset()))?;
        Ok(Response::new(ResetUnitResponse {}))
    }

    type WatchUnitInterruptsStream = EventStream<UnitInterrupt>;

    async fn watch_unit_interrupts(
        &self,
        r: Request<WatchUnitInterruptsRequest>,
    ) -> Result<Response<Self::WatchUnitInterruptsStream>, Status> {
        let unit = self.state.units.get(r.into_inner().unit)?.id;
        let dropped = self.state.metrics.unit_interrupts_watch_dropped.clone();
        let stream = watch(&self.state, &self.state.hub.unit_interrupts, "unit interrupt", dropped);
        let unit = u32::from(unit.0);
        Ok(Response::new(Box::pin(stream.filter(move |m| m.as_ref().map_or(true, |m| m.unit == unit)))))
    }
}
