//! Page requests, in the state machine (PCIe 10.4: Page Request Interface).
//!
//! A function that gets R=W=0 back for an access, and may use PRI, asks for the page
//! with a one-request group (PRG index, last = true) and retries the translation once the
//! page group response says Success (a retry that is refused again is a fault: one page
//! request per access). Accesses to the same page for the same access share one group.
//! At most `page_request_capacity` groups are outstanding (10.5.2.4: Outstanding Page
//! Request Capacity); further accesses wait in a backlog. A Response Failure stops the
//! function's page requests until its link is reset (10.4.2); a group with no response by
//! its deadline counts as failed (the server's page request queue may have overflowed and
//! dropped it): the deadline is checked when time comes in ([`Machine::tick`]).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use dmar_vtd::ats::PRG_INDEX_BITS;

use super::machine::{Effect, Machine, MissKey};
use super::messages::{PageGroupResponse, PageRequest, PageResponseCode, Up};
use super::ops::{OpId, Stage};
use super::{DmaError, DmaResult, PageRequestFailure};

/// Number of PRG indexes.
const PRG_INDEXES: u16 = 1 << PRG_INDEX_BITS;

#[derive(Debug)]
struct Group {
    key: MissKey,
    waiters: Vec<OpId>,
    deadline: Instant,
}

/// The outstanding groups of one function.
#[derive(Debug, Default)]
pub(super) struct Pri {
    groups: HashMap<u16, Group>,
    by_key: HashMap<MissKey, u16>,
    backlog: VecDeque<OpId>,
    next: u16,
    /// A Response Failure was received: no more page requests on this connection.
    stopped: bool,
}

impl Pri {
    /// Groups outstanding.
    pub(super) fn outstanding(&self) -> usize {
        self.groups.len()
    }

    /// Adds `op` to the group already asking for `key`; false if there is none.
    fn join(&mut self, key: MissKey, op: OpId) -> bool {
        match self.by_key.get(&key).and_then(|g| self.groups.get_mut(g)) {
            Some(g) => {
                g.waiters.push(op);
                true
            }
            None => false,
        }
    }

    /// Opens a group for `key`; returns its PRG index. Indexes go round robin, so one is
    /// reused only after every other one (a late response cannot meet a new group soon).
    fn open(&mut self, key: MissKey, op: OpId, deadline: Instant) -> u16 {
        let mut prgi = self.next;
        while self.groups.contains_key(&prgi) {
            prgi = (prgi + 1) % PRG_INDEXES;
        }
        self.next = (prgi + 1) % PRG_INDEXES;
        self.groups.insert(prgi, Group { key, waiters: vec![op], deadline });
        self.by_key.insert(key, prgi);
        prgi
    }

    /// Takes the group a response answers.
    fn answer(&mut self, prgi: u32) -> Option<Group> {
        let g = self.groups.remove(&u16::try_from(prgi).ok()?)?;
        self.by_key.remove(&g.key);
        Some(g)
    }

    /// Takes the groups whose deadline has passed.
    fn expired(&mut self, now: Instant) -> Vec<Group> {
        let due: Vec<u16> = self.groups.iter().filter(|(_, g)| g.deadline <= now).map(|(k, _)| *k).collect();
        due.into_iter().filter_map(|k| self.answer(u32::from(k))).collect()
    }

    /// Forgets everything (link reset).
    pub(super) fn clear(&mut self) {
        self.groups.clear();
        self.by_key.clear();
        self.backlog.clear();
        self.stopped = false;
    }
}

impl<T> Machine<T> {
    /// The translation granted nothing usable for the access.
    pub(super) fn no_access(&mut self, id: OpId) {
        let Some(op) = self.ops.get(id) else { return };
        if self.cfg.pri() && !self.pri.stopped && !op.pri_done {
            self.page_request(id);
        } else {
            self.finish(id, DmaResult::Fault(DmaError::NoAccess));
        }
    }

    fn page_request(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.stage = Stage::PageRequest;
        op.page_requested = true;
        let key = MissKey { page: op.iova >> 12, write: op.write };
        if self.pri.join(key, id) {
            return;
        }
        if self.pri.outstanding() >= usize::from(self.cfg.page_request_capacity) {
            self.pri.backlog.push_back(id);
            return;
        }
        if self.generation.is_none() {
            return self.finish(id, DmaResult::LinkDown);
        }
        let prgi = self.pri.open(key, id, self.now + self.page_request_timeout);
        let req = PageRequest { address: key.page << 12, read: true, write: key.write, group_index: prgi, last: true };
        self.counters.page_requests += 1;
        self.effects.push_back(Effect::Send(Up::Page(req)));
    }

    fn drain_pri_backlog(&mut self) {
        while self.pri.outstanding() < usize::from(self.cfg.page_request_capacity) {
            let Some(id) = self.pri.backlog.pop_front() else { break };
            if self.pri.stopped {
                self.finish(id, DmaResult::Fault(DmaError::NoAccess));
            } else {
                self.page_request(id);
            }
        }
        if self.pri.stopped {
            let rest: Vec<OpId> = self.pri.backlog.drain(..).collect();
            self.fail_all(rest, DmaResult::Fault(DmaError::NoAccess));
        }
    }

    pub(super) fn on_page_response(&mut self, r: PageGroupResponse) {
        let Some(group) = self.pri.answer(r.group_index) else {
            tracing::debug!(prgi = r.group_index, "page group response for no outstanding group");
            return;
        };
        let failure = match r.code {
            PageResponseCode::Success => {
                for id in group.waiters {
                    let Some(op) = self.ops.get_mut(id) else { continue };
                    op.pri_done = true;
                    self.lookup(id, false);
                }
                return self.drain_pri_backlog();
            }
            PageResponseCode::Invalid => PageRequestFailure::Invalid,
            PageResponseCode::Failure => {
                self.pri.stopped = true;
                tracing::warn!(sid = %self.cfg.sid, "page request response failure: PRI stopped until the link resets");
                PageRequestFailure::Failure
            }
            PageResponseCode::Other(code) => PageRequestFailure::Other(code),
        };
        self.counters.page_request_failures += 1;
        self.fail_all(group.waiters, DmaResult::Fault(DmaError::PageRequest(failure)));
        self.drain_pri_backlog();
    }

    /// Fails the groups whose deadline has passed, then fills the freed slots.
    pub(super) fn expire_page_requests(&mut self) {
        for group in self.pri.expired(self.now) {
            self.counters.page_request_failures += 1;
            self.fail_all(group.waiters, DmaResult::Fault(DmaError::PageRequest(PageRequestFailure::Timeout)));
        }
        self.drain_pri_backlog();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn groups_are_shared_answered_and_expire() {
        let now = Instant::now();
        let mut pri = Pri::default();
        let k = MissKey { page: 5, write: true };
        assert!(!pri.join(k, 1));
        let g = pri.open(k, 1, now + Duration::from_secs(1));
        assert!(pri.join(k, 2));
        assert!(!pri.join(MissKey { page: 5, write: false }, 3), "a read is another group");
        let other = pri.open(MissKey { page: 6, write: false }, 4, now);
        assert_ne!(g, other);
        assert_eq!(pri.outstanding(), 2);
        let expired = pri.expired(now);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].waiters, [4]);
        let answered = pri.answer(u32::from(g)).expect("group");
        assert_eq!(answered.waiters, [1, 2]);
        assert!(pri.answer(u32::from(g)).is_none());
        assert!(pri.answer(70_000).is_none());
        assert_eq!(pri.outstanding(), 0);
    }

    #[test]
    fn indexes_go_round_robin_and_skip_busy_ones() {
        let now = Instant::now();
        let mut pri = Pri::default();
        let first = pri.open(MissKey { page: 0, write: false }, 0, now);
        pri.answer(u32::from(first));
        let mut seen = std::collections::HashSet::new();
        for page in 1..=511u64 {
            let prgi = pri.open(MissKey { page, write: false }, 0, now);
            assert!(prgi < 512 && seen.insert(prgi));
        }
        // 511 outstanding, 0 free again: it is the only one left.
        assert_eq!(pri.open(MissKey { page: 999, write: false }, 0, now), first);
    }
}
