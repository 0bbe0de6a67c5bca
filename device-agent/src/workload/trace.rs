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
//!
//! Parsing reads line by line under a byte bound and a line-length bound, so an endless
//! input (`/dev/zero`) stops at the bound instead of filling memory. Errors give the line
//! number and what was expected, never the line's text: a trace may be a file the client
//! did not write, and the error goes back to the client. Which files may be read is
//! `trace_files`' business.

use std::io::{BufRead, Read};

/// Most accesses a trace may hold.
pub(crate) const MAX_TRACE_ACCESSES: usize = 1 << 24;
/// Longest line accepted, in bytes, its newline excluded: an address and a direction fit
/// in far less, and a bound keeps a file without newlines from becoming one huge line.
pub const MAX_LINE_BYTES: usize = 256;

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

/// Why a trace cannot be used. Messages never quote the trace's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// Reading failed (the kind only: the operating system's text may name paths).
    #[error("cannot read the trace ({0})")]
    Io(std::io::ErrorKind),
    /// The input is larger than the bound.
    #[error("the trace is larger than {limit} bytes")]
    TooLarge {
        /// The bound, in bytes.
        limit: u64,
    },
    /// A line is longer than [`MAX_LINE_BYTES`].
    #[error("trace line {line} is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong {
        /// 1-based line number.
        line: usize,
    },
    /// A line is malformed.
    #[error("trace line {line}: expected {expected}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What the line should have held, in fixed words.
        expected: &'static str,
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

    /// Parses the text format (an inline trace; its size is bounded by the message that
    /// carried it).
    pub fn parse(text: &str) -> Result<Self, TraceError> {
        Self::read(text.as_bytes(), u64::MAX)
    }

    /// Parses the text format from `input`, reading at most `max_bytes` (one more byte
    /// makes it [`TraceError::TooLarge`]), one bounded line at a time.
    pub fn read(input: impl BufRead, max_bytes: u64) -> Result<Self, TraceError> {
        let mut input = input.take(max_bytes.saturating_add(1));
        let mut accesses = Vec::new();
        let mut line = Vec::with_capacity(64);
        let mut total = 0u64;
        let mut number = 0usize;
        loop {
            line.clear();
            let got = (&mut input)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| TraceError::Io(e.kind()))?;
            if got == 0 {
                break;
            }
            total += got as u64;
            if total > max_bytes {
                return Err(TraceError::TooLarge { limit: max_bytes });
            }
            number += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
            } else if line.len() > MAX_LINE_BYTES {
                return Err(TraceError::LineTooLong { line: number });
            }
            if let Some(access) = parse_line(&line).map_err(|expected| TraceError::Line { line: number, expected })? {
                if accesses.len() == MAX_TRACE_ACCESSES {
                    return Err(TraceError::TooLong);
                }
                accesses.push(access);
            }
        }
        Self::new(accesses)
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
    pub(crate) fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(self.accesses.len() * 16);
        for a in &self.accesses {
            let _ = writeln!(s, "{:#x} {}", a.iova, if a.write { 'w' } else { 'r' });
        }
        s
    }
}

/// One line (without its newline): an access, nothing (blank or comment), or what was
/// expected instead.
fn parse_line(line: &[u8]) -> Result<Option<TraceAccess>, &'static str> {
    let line = line.trim_ascii();
    if line.is_empty() || line.starts_with(b"#") {
        return Ok(None);
    }
    let mut fields = line.split(u8::is_ascii_whitespace).filter(|f| !f.is_empty());
    let (Some(addr), Some(kind), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err("two fields, `ADDRESS r|w`");
    };
    let digits = addr.strip_prefix(b"0x").or_else(|| addr.strip_prefix(b"0X")).unwrap_or(addr);
    let iova = std::str::from_utf8(digits)
        .ok()
        .filter(|d| !d.starts_with('+'))
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or("a 64-bit hexadecimal address first")?;
    let write = if kind.eq_ignore_ascii_case(b"r") || kind.eq_ignore_ascii_case(b"read") {
        false
    } else if kind.eq_ignore_ascii_case(b"w") || kind.eq_ignore_ascii_case(b"write") {
        true
    } else {
        return Err("r, w, read or write second");
    };
    Ok(Some(TraceAccess { iova, write }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_format_reads_as_documented() {
        let t = Trace::parse("# nic rx ring\n0x100000 w\n\n  100800   r\n0XFF READ\r\n1\twrite").expect("trace");
        assert_eq!(
            t.accesses(),
            [
                TraceAccess { iova: 0x10_0000, write: true },
                TraceAccess { iova: 0x10_0800, write: false },
                TraceAccess { iova: 0xff, write: false },
                TraceAccess { iova: 1, write: true },
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line) in [("0x1000 r\nzz r\n", 2), ("0x1000\n", 1), ("0x1000 x\n", 1), ("1 r w\n", 1), ("+1 r\n", 1)]
        {
            match Trace::parse(text) {
                Err(TraceError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(Trace::parse("# nothing\n"), Err(TraceError::Empty)));
    }

    #[test]
    fn errors_never_quote_the_text() {
        // A line of /etc/passwd, and a line whose second field is someone's secret.
        for text in ["root:x:0:0:root:/root:/bin/bash\n", "0x1000 SECRET-TOKEN\n", "SECRET-TOKEN r\n"] {
            let e = Trace::parse(text).expect_err("malformed");
            let shown = e.to_string();
            assert!(shown.starts_with("trace line 1: expected "), "{shown}");
            assert!(!shown.contains("root") && !shown.contains("SECRET"), "{shown}");
        }
    }

    #[test]
    fn endless_input_stops_at_the_bounds() {
        // Like /dev/zero: no newline ever. The line bound stops it after one line's worth.
        let zeros = std::io::repeat(0).take(u64::MAX);
        assert_eq!(Trace::read(std::io::BufReader::new(zeros), 64 << 20), Err(TraceError::LineTooLong { line: 1 }));
        // Endless well-formed lines stop at the byte bound.
        let lines = std::io::repeat(b'\n');
        assert_eq!(Trace::read(std::io::BufReader::new(lines), 4096), Err(TraceError::TooLarge { limit: 4096 }));
        // Exactly the bound is fine; one byte more is not.
        let text = "0x1000 r\n";
        assert!(Trace::read(text.as_bytes(), text.len() as u64).is_ok());
        assert_eq!(
            Trace::read(text.as_bytes(), text.len() as u64 - 1),
            Err(TraceError::TooLarge { limit: text.len() as u64 - 1 })
        );
        // A line of exactly the longest length, with or without its newline, is fine.
        let longest = format!("0x1000{}r", " ".repeat(MAX_LINE_BYTES - 7));
        assert!(Trace::parse(&longest).is_ok());
        assert!(Trace::parse(&format!("{longest}\n")).is_ok());
        assert_eq!(Trace::parse(&format!("{longest} \n")), Err(TraceError::LineTooLong { line: 1 }));
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
