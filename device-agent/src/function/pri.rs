//! Page request groups a function has outstanding (PCIe PRI).
//!
//! A function that gets R=W=0 back for an access, and may use PRI, asks for the page
//! with a one-request group (PRG index, last = true) and retries the translation once the
//! page group response says Success. Accesses to the same page for the same access share
//! one group. At most `capacity` groups are outstanding (the Outstanding Page Request
//! Capacity); further accesses wait in a backlog. A Response Failure stops the function's
//! page requests until its link is reset; a group with no response in time counts as
//! failed (the server's page request queue may have overflowed and dropped it).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::ops::OpId;
use super::task::MissKey;

/// PRG indexes are 9 bits.
const PRG_INDEXES: u16 = 512;

#[derive(Debug)]
pub(super) struct Group {
    pub(super) key: MissKey,
    pub(super) waiters: Vec<OpId>,
    pub(super) deadline: Instant,
}

/// The outstanding groups of one function.
#[derive(Debug, Default)]
pub(super) struct Pri {
    groups: HashMap<u16, Group>,
    by_key: HashMap<MissKey, u16>,
    pub(super) backlog: VecDeque<OpId>,
    next: u16,
    /// A Response Failure was received: no more page requests on this connection.
    pub(super) stopped: bool,
}

impl Pri {
    /// Groups outstanding.
    pub(super) fn outstanding(&self) -> usize {
        self.groups.len()
    }

    /// Adds `op` to the group already asking for `key`; false if there is none.
    pub(super) fn join(&mut self, key: MissKey, op: OpId) -> bool {
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
    pub(super) fn open(&mut self, key: MissKey, op: OpId, deadline: Instant) -> u16 {
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
    pub(super) fn answer(&mut self, prgi: u32) -> Option<Group> {
        let g = self.groups.remove(&u16::try_from(prgi).ok()?)?;
        self.by_key.remove(&g.key);
        Some(g)
    }

    /// Takes the groups whose deadline has passed.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Group> {
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
