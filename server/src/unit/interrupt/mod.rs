//! Being written: wired in by the next change.
