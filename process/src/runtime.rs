//! The process's async runtime and its exit code: what every binary's `main` does after
//! parsing its flags and before its own `run`.
//!
//! Exit codes: 0 when the run returns `Ok`, 1 when it fails or the runtime cannot start
//! (the reason on one stderr line, `NAME: <error chain>`), 2 for a bad argument (see
//! [`crate::parse_args`]).

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// Runs `future` to completion on a new multi-threaded runtime (all drivers enabled) and
/// turns its result into the exit code with [`exit_code`].
pub fn block_on<E: Display>(name: &str, future: impl Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    exit_code(name, runtime.block_on(future))
}

/// Success, or failure with `NAME: <error>` on stderr. The error is printed with `{:#}`,
/// which for `anyhow::Error` is the whole context chain on one line.
pub fn exit_code<E: Display>(name: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_exit_codes() {
        assert_eq!(exit_code::<String>("test", Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit_code("test", Err("bad")), ExitCode::FAILURE);
        assert_eq!(block_on::<String>("test", async { Ok(()) }), ExitCode::SUCCESS);
        assert_eq!(block_on("test", async { Err(std::io::Error::other("refused")) }), ExitCode::FAILURE);
    }
}
