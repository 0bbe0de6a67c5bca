//! Tracing setup: the `RUST_LOG` filter with a per-binary default, stderr, ANSI colours
//! only on a terminal, and plain or JSON lines (`--log-format`).
//!
//! It installs the global subscriber once per process; what is logged, and at which
//! level, is each crate's business.

/// How log lines are written (`--log-format plain|json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the tracing subscriber with the `info` default: the servers' setting.
/// Shorthand for [`init_tracing_with`]`("info", ..)`.
pub fn init_tracing(json: bool) {
    init_tracing_with("info", if json { LogFormat::Json } else { LogFormat::Plain });
}

/// Installs the tracing subscriber: `RUST_LOG` when set, else `default_filter` (an
/// `EnvFilter` directive such as `info` or `warn`); stderr, so that standard output stays
/// free for a program's report; ANSI colours only on a terminal.
pub fn init_tracing_with(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
}

/// Installs a plain-text subscriber with filter `filter` (`RUST_LOG` is ignored) that
/// writes each line through a writer from `make_writer`: for tests that check what a
/// process logs (how much, and that client text cannot forge lines). Returns false if a
/// global subscriber was already installed.
pub fn init_tracing_to<W>(filter: &str, make_writer: impl Fn() -> W + Send + Sync + 'static) -> bool
where
    W: std::io::Write + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(make_writer)
        .try_init()
        .is_ok()
}
