//! What the crate's unit tests share.

use std::sync::Arc;

use crate::driver::{Driver, DriverConfig};
use crate::unit::{HostMemory, Unit, UnitConfig, UnitEvents};

/// Compiles only when `T` may be sent to and shared between threads: the server serves one
/// unit, its driver and its remapper from every runtime worker at once.
pub(crate) fn assert_send_sync<T: Send + Sync>() {}

/// A driver that has taken over a fresh unit (default configuration, `memory` bytes of host
/// memory, notifications to `events`), with the driver configuration for that memory.
pub(crate) fn driver(memory: u64, events: Arc<dyn UnitEvents>) -> Driver {
    let memory_map = Arc::new(HostMemory::new(memory).expect("memory size"));
    let unit = Arc::new(Unit::with_events(UnitConfig::default(), memory_map, events));
    Driver::new(unit, DriverConfig::for_memory(memory)).expect("driver")
}
