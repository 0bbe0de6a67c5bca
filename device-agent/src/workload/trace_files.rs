//! Which trace files a client may name, and reading them under a size bound.
//!
//! A `StartWorkload` request may name a trace file by path. The agent reads it with its own
//! rights, so the path is confined to one directory the operator chose (`--trace-dir`):
//! only relative paths without `..`, resolved with every symbolic link followed
//! (canonicalised) and then checked to be still inside the directory, and only regular
//! files (a FIFO would block, a device never ends). The size is checked from the
//! metadata before reading and enforced again while reading, because a file may grow or
//! lie about its size (`/proc`). Without a directory no trace file is read at all.
//!
//! Not here: the text format (`trace`), and how a refusal is reported (`control`).
//!
//! Limits: the check and the open are two steps, so someone who can rename things inside
//! the trace directory between them could swap a path component for a link. The threat
//! this guards against is a remote client naming paths; whoever can write the directory
//! is trusted by the operator who chose it.

use std::fs::File;
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};

use super::trace::{Trace, TraceError};

/// The default bound on a trace file's size: 64 MiB.
pub const DEFAULT_MAX_TRACE_BYTES: u64 = 64 << 20;

/// Where trace files may be read from and how large they may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceFiles {
    dir: Option<PathBuf>,
    max_bytes: u64,
}

/// Why a named trace file is not read. Messages never repeat the path or the file's
/// content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceFileError {
    /// The agent has no trace directory.
    #[error("this agent reads no trace files (start it with --trace-dir DIR), send the trace inline instead")]
    Disabled,
    /// The path is absolute, empty, or has a `..` (or another non-name) component.
    #[error("trace_path must be a relative path inside the agent's trace directory, without ..")]
    NotRelative,
    /// The path resolves (through a symbolic link) to somewhere outside the directory.
    #[error("trace_path leads outside the agent's trace directory")]
    Outside,
    /// The path is a directory, a device, a FIFO or a socket.
    #[error("trace_path is not a regular file")]
    NotAFile,
    /// The trace directory itself cannot be resolved (the operator's mistake).
    #[error("the agent's trace directory is unavailable ({0})")]
    Directory(std::io::ErrorKind),
    /// The file is missing, unreadable, too large or malformed.
    #[error(transparent)]
    Trace(#[from] TraceError),
}

impl TraceFiles {
    /// Trace files from `dir` (none when `None`), at most `max_bytes` each.
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> Self {
        Self { dir, max_bytes }
    }

    /// The largest file read, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The file `requested` names inside the directory, canonical, checked to be a
    /// regular file inside it.
    pub fn resolve(&self, requested: &str) -> Result<PathBuf, TraceFileError> {
        let dir = self.dir.as_ref().ok_or(TraceFileError::Disabled)?;
        let relative = Path::new(requested);
        if requested.is_empty()
            || requested.contains('\0')
            || !relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(TraceFileError::NotRelative);
        }
        let root = dir.canonicalize().map_err(|e| TraceFileError::Directory(e.kind()))?;
        let path = root.join(relative).canonicalize().map_err(|e| TraceError::Io(e.kind()))?;
        if !path.starts_with(&root) {
            return Err(TraceFileError::Outside);
        }
        let meta = std::fs::metadata(&path).map_err(|e| TraceError::Io(e.kind()))?;
        if !meta.is_file() {
            return Err(TraceFileError::NotAFile);
        }
        Ok(path)
    }

    /// Reads and parses the trace file `requested` names (blocking).
    pub fn load(&self, requested: &str) -> Result<Trace, TraceFileError> {
        let path = self.resolve(requested)?;
        let too_large = TraceError::TooLarge { limit: self.max_bytes };
        let file = File::open(&path).map_err(|e| TraceError::Io(e.kind()))?;
        // Checked again on the open file: the path may have changed since it was resolved.
        let meta = file.metadata().map_err(|e| TraceError::Io(e.kind()))?;
        if !meta.is_file() {
            return Err(TraceFileError::NotAFile);
        }
        if meta.len() > self.max_bytes {
            return Err(too_large.into());
        }
        Ok(Trace::read(BufReader::new(file), self.max_bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    struct Dirs {
        _tmp: tempfile::TempDir,
        traces: PathBuf,
        outside: PathBuf,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().expect("temp dir");
        let traces = tmp.path().join("traces");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(traces.join("sub")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(traces.join("ok.trace"), "0x1000 r\n0x2000 w\n").expect("write");
        std::fs::write(traces.join("sub/deep.trace"), "0x3000 r\n").expect("write");
        std::fs::write(outside.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").expect("write");
        Dirs { _tmp: tmp, traces, outside }
    }

    #[test]
    fn files_inside_the_directory_load() {
        let d = dirs();
        let files = TraceFiles::new(Some(d.traces.clone()), DEFAULT_MAX_TRACE_BYTES);
        assert_eq!(files.load("ok.trace").expect("trace").len(), 2);
        assert_eq!(files.load("./sub/deep.trace").expect("trace").len(), 1);
        // A link that stays inside is followed.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.traces.join("ok.trace"), d.traces.join("alias.trace")).expect("link");
            assert_eq!(files.load("alias.trace").expect("trace").len(), 2);
        }
    }

    #[test]
    fn no_directory_reads_nothing() {
        let d = dirs();
        let files = TraceFiles::new(None, DEFAULT_MAX_TRACE_BYTES);
        assert_eq!(files.load("ok.trace"), Err(TraceFileError::Disabled));
        assert_eq!(files.load(d.traces.join("ok.trace").to_str().expect("utf-8")), Err(TraceFileError::Disabled));
    }

    #[test]
    fn paths_that_leave_the_directory_are_refused_without_their_content() {
        let d = dirs();
        let files = TraceFiles::new(Some(d.traces.clone()), DEFAULT_MAX_TRACE_BYTES);
        let absolute = d.outside.join("passwd");
        for (path, want) in [
            ("/etc/passwd", TraceFileError::NotRelative),
            ("/proc/self/environ", TraceFileError::NotRelative),
            (absolute.to_str().expect("utf-8"), TraceFileError::NotRelative),
            ("../outside/passwd", TraceFileError::NotRelative),
            ("sub/../../outside/passwd", TraceFileError::NotRelative),
            ("sub/..", TraceFileError::NotRelative),
            ("", TraceFileError::NotRelative),
            ("a\0b", TraceFileError::NotRelative),
            ("sub", TraceFileError::NotAFile),
            (".", TraceFileError::NotAFile),
        ] {
            let e = files.load(path).expect_err(path);
            assert_eq!(e, want, "{path:?}");
            assert!(!e.to_string().contains("root"), "{e}");
        }
        #[cfg(unix)]
        {
            let link = |target: &Path, name: &str| {
                std::os::unix::fs::symlink(target, d.traces.join(name)).expect("link");
            };
            link(&d.outside.join("passwd"), "passwd");
            link(&d.outside, "escape");
            link(Path::new("/dev/zero"), "zero");
            for path in ["passwd", "escape/passwd", "zero"] {
                let e = files.load(path).expect_err(path);
                assert_eq!(e, TraceFileError::Outside, "{path:?}");
                assert!(!e.to_string().contains("root"), "{e}");
            }
        }
    }

    #[test]
    fn oversize_files_are_refused_before_and_while_reading() {
        let d = dirs();
        let big = d.traces.join("big.trace");
        let mut f = File::create(&big).expect("create");
        for i in 0..1000u64 {
            writeln!(f, "{:#x} r", i * 64).expect("write");
        }
        drop(f);
        let size = std::fs::metadata(&big).expect("metadata").len();
        let files = TraceFiles::new(Some(d.traces.clone()), size - 1);
        assert_eq!(files.load("big.trace"), Err(TraceFileError::Trace(TraceError::TooLarge { limit: size - 1 })));
        assert_eq!(TraceFiles::new(Some(d.traces.clone()), size).load("big.trace").expect("trace").len(), 1000);
    }

    #[test]
    fn a_bad_line_gives_its_number_not_its_text() {
        let d = dirs();
        std::fs::write(d.traces.join("bad.trace"), "0x1000 r\nSECRET=hunter2 w\n").expect("write");
        let files = TraceFiles::new(Some(d.traces.clone()), DEFAULT_MAX_TRACE_BYTES);
        let e = files.load("bad.trace").expect_err("malformed");
        assert!(matches!(e, TraceFileError::Trace(TraceError::Line { line: 2, .. })), "{e:?}");
        let shown = e.to_string();
        assert!(shown.contains("line 2") && !shown.contains("SECRET") && !shown.contains("hunter2"), "{shown}");
        assert_eq!(
            files.load("missing.trace"),
            Err(TraceFileError::Trace(TraceError::Io(std::io::ErrorKind::NotFound)))
        );
    }

    #[cfg(unix)]
    #[test]
    fn special_files_inside_the_directory_are_refused_before_opening() {
        let d = dirs();
        let files = TraceFiles::new(Some(d.traces.clone()), DEFAULT_MAX_TRACE_BYTES);
        // A FIFO would block the open until a writer came; it must be refused first.
        let fifo = d.traces.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            assert_eq!(files.load("fifo"), Err(TraceFileError::NotAFile));
        }
    }
}
