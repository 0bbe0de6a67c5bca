//! The page requests each bound function has outstanding, by page request group: the
//! record that enforces a function's declared page request capacity on the link and lets
//! the Control service answer only outstanding groups. It does not queue requests (the
//! unit's page request queue does) or deliver responses (the device ports do).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use dmar_vtd::ids::SourceId;

/// The page requests each bound function has outstanding, by page request group (PCIe
/// 10.4.1: a request is outstanding until its group's response; a function may not have
/// more outstanding than its allocation, here the `page_request_capacity` of its bind).
///
/// Links admit requests and learn of responses (through their device ports); the Control
/// service checks that a response answers an outstanding group. A function's record
/// lives while its link does.
#[derive(Debug, Default)]
pub(crate) struct PageGroups {
    functions: Mutex<HashMap<SourceId, Outstanding>>,
}

/// One function's outstanding page requests.
#[derive(Debug, Default)]
struct Outstanding {
    capacity: u32,
    requests: u32,
    /// Requests outstanding per group index (at most 512 groups).
    groups: HashMap<u16, u32>,
}

impl PageGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SourceId, Outstanding>> {
        self.functions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts tracking bound function `sid`, allowed `capacity` outstanding requests.
    pub(crate) fn bind(&self, sid: SourceId, capacity: u32) {
        self.lock().insert(sid, Outstanding { capacity, ..Outstanding::default() });
    }

    /// Forgets `sid`: its link is gone, and with it the function's requests.
    pub(crate) fn unbind(&self, sid: SourceId) {
        self.lock().remove(&sid);
    }

    /// Counts one page request of group `prgi` from `sid`; false (nothing counted) if the
    /// function has its capacity outstanding already or is not bound.
    pub(crate) fn admit(&self, sid: SourceId, prgi: u16) -> bool {
        let mut functions = self.lock();
        let Some(f) = functions.get_mut(&sid) else { return false };
        if f.requests >= f.capacity {
            return false;
        }
        f.requests += 1;
        *f.groups.entry(prgi).or_default() += 1;
        true
    }

    /// Group `prgi` of `sid` was answered: its requests are no longer outstanding. Returns
    /// whether it was outstanding.
    pub(crate) fn answered(&self, sid: SourceId, prgi: u16) -> bool {
        let mut functions = self.lock();
        let Some(f) = functions.get_mut(&sid) else { return false };
        match f.groups.remove(&prgi) {
            Some(n) => {
                f.requests -= n;
                true
            }
            None => false,
        }
    }

    /// Whether group `prgi` of `sid` has requests waiting for a response.
    pub(crate) fn is_outstanding(&self, sid: SourceId, prgi: u16) -> bool {
        self.lock().get(&sid).is_some_and(|f| f.groups.contains_key(&prgi))
    }
}
