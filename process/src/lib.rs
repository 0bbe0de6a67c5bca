//! Process plumbing shared by dmar's binaries (server, agent, load generator): argument
//! errors, tracing setup, the runtime and exit code, waiting for SIGINT/SIGTERM, a
//! minimal HTTP/1.1 endpoint for Prometheus `/metrics`, and the log hygiene every
//! network face needs (rate-limited warnings, capped and escaped client text).
//!
//! It owns what every `main.rs` would otherwise repeat, and nothing about VT-d, ATS or
//! gRPC: the binaries' own crates decide what runs inside the runtime.
//!
//! A binary's `main` is three lines:
//!
//! ```no_run
//! # #[derive(clap::Parser)] struct Args { #[arg(long, value_enum, default_value_t = dmar_process::LogFormat::Plain)] log_format: dmar_process::LogFormat }
//! # async fn run(_: Args) -> Result<(), std::io::Error> { Ok(()) }
//! fn main() -> std::process::ExitCode {
//!     let args: Args = dmar_process::parse_args("dmar-example");
//!     dmar_process::init_tracing_with("info", args.log_format);
//!     dmar_process::block_on("dmar-example", run(args))
//! }
//! ```

mod args;
mod error;
mod location;
mod logging;
pub mod metric_doc;
mod metrics_http;
mod ratelimit;
mod runtime;
mod signal;
mod text;

pub use self::args::{listen_address, parse_args};
pub use self::error::error_chain;
pub use self::location::Location;
pub use self::logging::{LogFormat, init_tracing, init_tracing_to, init_tracing_with};
pub use self::metrics_http::{Render, serve_metrics};
pub use self::ratelimit::RateLimit;
pub use self::runtime::{block_on, exit_code};
pub use self::signal::{cancel_on_signal, shutdown_signal};
pub use self::text::{CLIENT_TEXT_CHARS, ClientText, client_text};
