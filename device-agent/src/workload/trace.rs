//! Recorded access traces: the text format, parsing and writing.
//!
//! Format: one access per line, a hexadecimal IOVA (with or without `0x`) and `r` or `w`
//! (also `read`/`write`, any case), separated by white space. Blank lines and lines whose
//! first non-blank character is `#` are ignored. Example:
//!
//! ```text
//! # nic rx ring
//! 0x100000 w
//! 100800   r
//! ```

use std::path::Path;

/// Most accesses a trace may hold.
pub(crate) const MAX_TRACE_ACCESSES: usize = 1 << 24;

/// One recorded access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceAccess {
    /// The untranslated address.
    pub iova: u64,
    /// A write (else a read).
    pub write: bool,
}

/// A recorded sequence of accesses, replayed in a loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    accesses: Vec<TraceAccess>,
}

/// Why a trace cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file cannot be read.
    #[error("cannot read trace {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("trace line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No access at all.
    #[error("the trace has no accesses")]
    Empty,
    /// Too many accesses.
    #[error("the trace has more than {MAX_TRACE_ACCESSES} accesses")]
    TooLong,
}

impl Trace {
    /// A trace of `accesses` (at least one).
    pub fn new(accesses: Vec<TraceAccess>) -> Result<Self, TraceError> {
        if accesses.is_empty() {
            return Err(TraceError::Empty);
        }
        if accesses.len() > MAX_TRACE_ACCESSES {
            return Err(TraceError::TooLong);
        }
        Ok(Self { accesses })
    }

    /// Parses the text format.
    pub fn parse(text: &str) -> Result<Self, TraceError> {
        let mut accesses = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| TraceError::Line { line: n + 1, reason };
            let mut parts = line.split_whitespace();
            let (Some(addr), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(format!("expected `ADDRESS r|w`, got {line:?}")));
            };
            let digits = addr.strip_prefix("0x").or_else(|| addr.strip_prefix("0X")).unwrap_or(addr);
            let iova = u64::from_str_radix(digits, 16).map_err(|_| bad(format!("{addr:?} is not a hex address")))?;
            let write = match kind.to_ascii_lowercase().as_str() {
                "r" | "read" => false,
                "w" | "write" => true,
                _ => return Err(bad(format!("{kind:?} is neither r nor w"))),
            };
            if accesses.len() == MAX_TRACE_ACCESSES {
                return Err(TraceError::TooLong);
            }
            accesses.push(TraceAccess { iova, write });
        }
        Self::new(accesses)
    }

    /// Reads and parses a trace file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| TraceError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// The accesses, in order.
    pub fn accesses(&self) -> &[TraceAccess] {
        &self.accesses
    }

    /// Number of accesses (never 0).
    pub fn len(&self) -> usize {
        self.accesses.len()
    }

    /// Always false: a trace has at least one access.
    pub fn is_empty(&self) -> bool {
        self.accesses.is_empty()
    }

    /// Writes the text format (what [`Trace::parse`] reads back).
    #[cfg(test)]
    fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(self.accesses.len() * 16);
        for a in &self.accesses {
            let _ = writeln!(s, "{:#x} {}", a.iova, if a.write { 'w' } else { 'r' });
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_format_reads_as_documented() {
        let t = Trace::parse("# nic rx ring\n0x100000 w\n\n  100800   r\n0XFF READ\n").expect("trace");
        assert_eq!(
            t.accesses(),
            [
                TraceAccess { iova: 0x10_0000, write: true },
                TraceAccess { iova: 0x10_0800, write: false },
                TraceAccess { iova: 0xff, write: false }
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line) in [("0x1000 r\nzz r\n", 2), ("0x1000\n", 1), ("0x1000 x\n", 1), ("1 r w\n", 1)] {
            match Trace::parse(text) {
                Err(TraceError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(Trace::parse("# nothing\n"), Err(TraceError::Empty)));
        assert!(matches!(Trace::load("/nonexistent/trace"), Err(TraceError::Io { .. })));
    }

    proptest! {
        #[test]
        fn text_round_trips(accesses in prop::collection::vec((any::<u64>(), any::<bool>()), 1..50)) {
            let t = Trace::new(accesses.into_iter().map(|(iova, write)| TraceAccess { iova, write }).collect())
                .expect("trace");
            prop_assert_eq!(Trace::parse(&t.to_text()).expect("parse"), t);
        }
    }
}
