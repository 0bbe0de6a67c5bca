//! Device ports: how device-TLB invalidations leave the unit and how their completions come
//! back (PCIe ATS invalidation request / completion; VT-d 6.5.2.5), with the per-function
//! ITag accounting and the invalidation time-out (ITE, VT-d 6.5.2.10).
//!
//! Owns the binding of a function to its [`DevicePort`], its invalidate queue depth, which
//! of its ITags are outstanding or abandoned, when each was sent and what each revokes from
//! the translated-request grants when it ends, and the rules:
//! - a function takes at most the lesser of its queue depth and the descriptor's MIP
//!   (1..=[`MAX_QUEUE_DEPTH`]) ITags; a function with none free stalls the queue;
//! - an ITag outstanding longer than the configured time-out sets ITE with the function's
//!   SID in IQERCD.ITESID (the oldest, if several expired), abandons every outstanding
//!   device-TLB invalidation and aborts a wait the queue was stalled on;
//! - a completion for an ITag that is not outstanding sets ICE with ICESID; a late one for an
//!   abandoned ITag is ignored;
//! - translated-request checking (`unit::grants`): the range of a device-TLB invalidation is
//!   revoked from the grants recorded before the descriptor was processed when the
//!   invalidation ends, at the function's Invalidation Completion for its ITag or at the
//!   time-out that abandons it, not before. PCIe 10.3 (Invalidate Request, Invalidate
//!   Completion and the completion semantics) lets the function use its translations
//!   until it has processed the Invalidate Request, and it completes it only once no
//!   request using them is outstanding; software reuses the memory only after the wait
//!   descriptor that follows, which waits for the completion (VT-d 6.5.2.8). Revoking
//!   earlier would refuse DMA a correct device issued in that window;
//! - unbinding a port completes its outstanding invalidations: a function that comes back
//!   starts with an empty device TLB (and no translated-request grants, `unit::grants`).
//!
//! Not here: fetching descriptors and the FSTS/IQERCD registers (`queue`). The network
//! layer implements [`DevicePort`] for each bound function; tests implement it in process.
//! Ports must not block: they hand the request to a queue or a channel and the device
//! answers later through [`Unit::device_tlb_completed`].

use std::sync::Arc;
use std::time::Instant;

use super::queue::QueueError;
use super::{Effect, Effects};
use crate::ats::MAX_QUEUE_DEPTH;
use crate::ats::range as srange;
use crate::ids::{ITag, Iova, SourceId};
use crate::unit::Unit;
use crate::unit::grants::{GrantTable, PendingRevocation};
use crate::unit::prq::PageGroupResponse;

/// An ATS invalidation request for one function's device TLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInvalidation {
    /// The function.
    pub sid: SourceId,
    /// The tag the completion must carry.
    pub itag: ITag,
    /// Untranslated address with the S-bit range encoding in bit 0.
    pub addr_s: u64,
}

impl DeviceInvalidation {
    /// The invalidated range: first address and size in bytes.
    pub fn range(&self) -> (Iova, u64) {
        srange::decode(self.addr_s)
    }
}

/// Where a function's device-side traffic from the unit goes.
pub trait DevicePort: Send + Sync + std::fmt::Debug {
    /// Delivers an invalidation request. Must not block.
    fn invalidate(&self, request: DeviceInvalidation);
    /// Delivers a page group response. Must not block.
    fn page_response(&self, _response: PageGroupResponse) {}
}

/// A port could not be bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Another port already serves this function.
    #[error("requester id {0} is already bound to a device port")]
    AlreadyBound(SourceId),
    /// The invalidate queue depth is outside 1..=[`MAX_QUEUE_DEPTH`].
    #[error("invalidate queue depth {0} is outside 1..={max}", max = MAX_QUEUE_DEPTH)]
    InvalidDepth(u8),
}

/// A completion the unit did not expect (it also sets ICE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalidation completion from {sid} for ITag {} that is not outstanding", itag.0)]
pub struct UnexpectedCompletion {
    /// The function.
    pub sid: SourceId,
    /// The tag it carried.
    pub itag: ITag,
}

/// Per-function bookkeeping of outstanding ITags.
#[derive(Debug)]
pub(crate) struct PortState {
    pub(crate) port: Arc<dyn DevicePort>,
    /// Invalidate queue depth the function advertised (1..=[`MAX_QUEUE_DEPTH`]).
    depth: u8,
    /// Bit i: ITag i is outstanding.
    in_use: u32,
    /// Bit i: ITag i was abandoned by a time-out; a late completion for it is ignored.
    abandoned: u32,
    /// When each outstanding ITag was sent.
    sent_at: [Option<Instant>; MAX_QUEUE_DEPTH as usize],
    /// What each outstanding ITag revokes from the function's grants when it ends.
    revocations: [Option<PendingRevocation>; MAX_QUEUE_DEPTH as usize],
}

impl PortState {
    fn new(port: Arc<dyn DevicePort>, depth: u8) -> Self {
        Self {
            port,
            depth: depth.clamp(1, MAX_QUEUE_DEPTH),
            in_use: 0,
            abandoned: 0,
            sent_at: [None; MAX_QUEUE_DEPTH as usize],
            revocations: [None; MAX_QUEUE_DEPTH as usize],
        }
    }

    /// The unit was reset: every outstanding ITag is abandoned as at a time-out, so the
    /// device's late completions for them are ignored instead of setting ICE in the reset
    /// unit, and no wait waits for them. Their revocations are dropped without running: the
    /// reset empties the translated-request grants wholesale. Nothing is counted as a
    /// time-out.
    pub(crate) fn reset(&mut self) {
        self.abandoned |= self.in_use;
        self.in_use = 0;
        self.sent_at = [None; MAX_QUEUE_DEPTH as usize];
        self.revocations = [None; MAX_QUEUE_DEPTH as usize];
    }

    /// Remembers what the invalidation just sent with `itag` revokes when it ends.
    pub(crate) fn revoke_at_end(&mut self, itag: ITag, revocation: Option<PendingRevocation>) {
        self.revocations[usize::from(itag.0)] = revocation;
    }

    /// Takes the lowest free ITag, if fewer than `mip` (the descriptor's queue depth, 0
    /// meaning [`MAX_QUEUE_DEPTH`]) and the function's depth are outstanding.
    pub(crate) fn take(&mut self, mip: u8, now: Instant) -> Option<ITag> {
        let mip = if mip == 0 { MAX_QUEUE_DEPTH } else { mip };
        let limit = mip.min(self.depth);
        if self.in_use.count_ones() >= u32::from(limit) {
            return None;
        }
        let tag = (!self.in_use).trailing_zeros();
        if tag >= u32::from(MAX_QUEUE_DEPTH) {
            return None;
        }
        self.in_use |= 1 << tag;
        self.abandoned &= !(1 << tag);
        self.sent_at[tag as usize] = Some(now);
        Some(ITag(tag as u8))
    }

    pub(crate) fn outstanding(&self) -> u32 {
        self.in_use.count_ones()
    }

    /// When the oldest outstanding ITag was sent.
    fn oldest(&self) -> Option<Instant> {
        self.sent_at.iter().flatten().min().copied()
    }

    /// A time-out abandons every outstanding ITag; returns how many, and ends their
    /// revocations in `grants`, adding the grants evicted to `evicted`.
    fn abandon_all(&mut self, grants: &GrantTable, evicted: &mut usize) -> u32 {
        let n = self.in_use.count_ones();
        self.abandoned |= self.in_use;
        self.in_use = 0;
        self.sent_at = [None; MAX_QUEUE_DEPTH as usize];
        for r in self.revocations.iter_mut().filter_map(Option::take) {
            *evicted += grants.end_revocation(r);
        }
        n
    }
}

impl Unit {
    /// Binds the device port for `sid`, a function with an ATS invalidate queue of `depth`
    /// (1..=[`MAX_QUEUE_DEPTH`]) entries.
    pub fn bind_device_port(&self, sid: SourceId, port: Arc<dyn DevicePort>, depth: u8) -> Result<(), PortError> {
        if !(1..=MAX_QUEUE_DEPTH).contains(&depth) {
            return Err(PortError::InvalidDepth(depth));
        }
        let mut q = self.queue.lock();
        if q.ports.contains_key(&sid) {
            return Err(PortError::AlreadyBound(sid));
        }
        q.ports.insert(sid, PortState::new(port, depth));
        Ok(())
    }

    /// Unbinds the port for `sid`; its outstanding invalidations count as completed (the
    /// function's device TLB is gone, so are its translated-request grants). Returns
    /// whether a port was bound.
    pub fn unbind_device_port(&self, sid: SourceId) -> bool {
        let mut effects = Effects::default();
        let found = {
            let mut q = self.queue.lock();
            let found = q.ports.remove(&sid).is_some();
            self.grants.clear(sid);
            self.process(&mut q, self.clock.now(), &mut effects);
            found
        };
        self.apply(effects);
        found
    }

    /// The port bound for `sid`, for what the unit sends a function outside the queue (a
    /// page group response the hardware owes after dropping a page request).
    pub(crate) fn device_port(&self, sid: SourceId) -> Option<Arc<dyn DevicePort>> {
        self.queue.lock().ports.get(&sid).map(|p| p.port.clone())
    }

    /// A device answered the invalidation tagged `itag`.
    pub fn device_tlb_completed(&self, sid: SourceId, itag: ITag) -> Result<(), UnexpectedCompletion> {
        let mut effects = Effects::default();
        let now = self.clock.now();
        let result = {
            let mut q = self.queue.lock();
            let bit = 1u32.checked_shl(u32::from(itag.0)).unwrap_or(0);
            let outcome = match q.ports.get_mut(&sid) {
                Some(p) if bit != 0 && p.in_use & bit != 0 => {
                    p.in_use &= !bit;
                    if let Some(r) = p.revocations[usize::from(itag.0)].take() {
                        let evicted = self.grants.end_revocation(r);
                        self.counters.translated_check_evictions.add(evicted as u64);
                    }
                    if let Some(sent) = p.sent_at[usize::from(itag.0)].take() {
                        let latency = now.saturating_duration_since(sent);
                        self.counters.device_tlb_latency_ns.add(latency.as_nanos() as u64);
                        effects.push(Effect::Completed(latency));
                    }
                    self.counters.device_tlb_completions.inc();
                    Ok(())
                }
                Some(p) if bit != 0 && p.abandoned & bit != 0 => {
                    p.abandoned &= !bit; // late answer after a time-out: ignored
                    Ok(())
                }
                _ => {
                    self.stop_queue(&mut q, QueueError::UnexpectedCompletion(sid), &mut effects);
                    Err(UnexpectedCompletion { sid, itag })
                }
            };
            self.process(&mut q, now, &mut effects);
            outcome
        };
        self.apply(effects);
        result
    }

    /// Lets time pass: at `now`, expires device-TLB invalidations older than the configured
    /// time-out (ITE, VT-d 6.5.2.10). The embedder calls this periodically; register reads
    /// of FSTS, IQH and ICS call it too, so software that polls sees time-outs.
    pub fn poll(&self, now: Instant) {
        let timeout = self.config.device_tlb_timeout;
        let mut effects = Effects::default();
        {
            let mut q = self.queue.lock();
            // The function whose oldest ITag expired first is the one reported.
            let expired = q
                .ports
                .iter()
                .filter_map(|(sid, p)| p.oldest().map(|t| (t, *sid)))
                .filter(|(t, _)| now.saturating_duration_since(*t) >= timeout)
                .min();
            let Some((_, sid)) = expired else { return };
            self.stop_queue(&mut q, QueueError::TimedOut(sid), &mut effects);
            let mut evicted = 0;
            let abandoned: u32 = q.ports.values_mut().map(|p| p.abandon_all(&self.grants, &mut evicted)).sum();
            self.counters.device_tlb_timeouts.add(u64::from(abandoned));
            self.counters.translated_check_evictions.add(evicted as u64);
            // A wait the queue is stalled on is aborted: it will never write its status.
            if self.stalled_on_wait(&q) {
                q.skip_head();
            }
            tracing::warn!(%sid, abandoned, timeout = ?timeout, "device-TLB invalidation timed out (ITE)");
        }
        self.apply(effects);
    }
}
