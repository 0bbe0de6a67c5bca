//! `dmar-certs`: makes a development CA, a certificate and key for the server, each agent,
//! operator and observer, and the matching `policy.toml`, in one directory.
//!
//! Every flag also reads `DMAR_CERTS_<FLAG>`; with no flags it writes `./certs` for a local
//! run (server `dmar-server` on localhost, `agent-0` for bus 0, `operator`, `observer`).
//! A bad argument prints one line and exits 2; a failure to write exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dmar_auth::{AgentSpec, DevPki, DevPkiSpec, Identity, PkiError};

/// Make a development CA, certificates and a matching policy for dmar.
#[derive(Debug, Parser)]
#[command(name = "dmar-certs", version)]
struct Args {
    /// Directory to write into (created if missing).
    #[arg(long, env = "DMAR_CERTS_OUT", default_value = "certs")]
    out: PathBuf,

    /// The server's name: its certificate CN and file name.
    #[arg(long, env = "DMAR_CERTS_SERVER", default_value = "dmar-server")]
    server: Identity,

    /// The server's DNS names and IP addresses, comma-separated (its name is added).
    #[arg(long, env = "DMAR_CERTS_SERVER_SAN", value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
    server_san: Vec<String>,

    /// An agent and the requester ids it may bind: NAME=RANGE[,RANGE...], like
    /// agent-0=00:01.0-00:1f.7. Repeat for more agents (space-separated in the environment).
    #[arg(long, env = "DMAR_CERTS_AGENT", value_delimiter = ' ', default_value = "agent-0=00:00.0-00:1f.7")]
    agent: Vec<AgentSpec>,

    /// Extra SANs for every agent certificate, comma-separated (localhost, 127.0.0.1 and
    /// the agent's name are always there).
    #[arg(long, env = "DMAR_CERTS_AGENT_SAN", value_delimiter = ',')]
    agent_san: Vec<String>,

    /// Identities granted the operator role, comma-separated or repeated.
    #[arg(long, env = "DMAR_CERTS_OPERATOR", value_delimiter = ',', default_value = "operator")]
    operator: Vec<Identity>,

    /// Identities granted the observer role, comma-separated or repeated.
    #[arg(long, env = "DMAR_CERTS_OBSERVER", value_delimiter = ',', default_value = "observer")]
    observer: Vec<Identity>,

    /// How long the certificates are valid, in days.
    #[arg(long, env = "DMAR_CERTS_VALIDITY_DAYS", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(dmar_auth::pki::MAX_VALIDITY_DAYS)))]
    validity_days: u32,

    /// Replace existing files, including a CA others may already trust.
    #[arg(long, env = "DMAR_CERTS_FORCE")]
    force: bool,
}

fn main() -> ExitCode {
    let args = parse_args();
    let spec = DevPkiSpec {
        server: args.server,
        server_sans: args.server_san.into_iter().filter(|s| !s.is_empty()).collect(),
        agents: args.agent,
        agent_sans: args.agent_san.into_iter().filter(|s| !s.is_empty()).collect(),
        operators: args.operator,
        observers: args.observer,
        validity_days: args.validity_days,
    };
    let pki = match DevPki::generate(&spec) {
        Ok(pki) => pki,
        // Everything generate refuses comes from the arguments.
        Err(e) => return fail(&e, 2),
    };
    match pki.write_to(&args.out, args.force) {
        Ok(paths) => {
            for path in paths {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e @ PkiError::Exists(_)) => {
            eprintln!("dmar-certs: {e}; pass --force to replace the CA and every certificate");
            ExitCode::from(1)
        }
        Err(e) => fail(&e, 1),
    }
}

/// One line on stderr: the error and its causes.
fn fail(e: &dyn std::error::Error, code: u8) -> ExitCode {
    eprintln!("dmar-certs: {}", dmar_process::error_chain(e));
    ExitCode::from(code)
}

/// Parses the command line; a bad argument prints one line (`dmar-certs: <what is wrong>`)
/// and exits 2, while `--help` and `--version` print as usual. (The same rule as
/// `dmar_process::parse_args`, repeated here so this crate stays a leaf of the graph.)
fn parse_args() -> Args {
    match Args::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
            eprintln!("dmar-certs: {}", line.trim_start_matches("error: "));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}
