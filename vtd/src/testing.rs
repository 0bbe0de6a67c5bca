//! What the crate's unit tests share.

/// Compiles only when `T` may be sent to and shared between threads: the server serves one
/// unit, its driver and its remapper from every runtime worker at once.
pub(crate) fn assert_send_sync<T: Send + Sync>() {}
