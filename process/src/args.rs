//! Command-line parsing the binaries share: how a bad argument is reported (one line and
//! exit status 2), and the "address or off" form of listen flags.
//!
//! The flags themselves belong to each binary (clap derive, every flag also read from
//! `DMAR_<FLAG>`); this module only gives them one way to fail and one way to say "off".

use std::net::SocketAddr;

/// Parses the command line; a bad argument exits with status 2 and one line on stderr
/// (`NAME: <what is wrong>`), while `--help` and `--version` print as usual. One line
/// because container logs and compose output show the first line only.
pub fn parse_args<T: clap::Parser>(name: &str) -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            eprintln!("{name}: {}", first_line(&e.to_string()));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

/// The first non-blank line of clap's error text, without its `error: ` prefix.
fn first_line(text: &str) -> &str {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
    line.trim_start_matches("error: ")
}

/// A listen flag's value: `host:port`, or `None` for `off` (or empty), so that an optional
/// listener (metrics, an agent's control service) is switched off the same way everywhere.
pub fn listen_address(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "" | "off" => Ok(None),
        addr => addr.parse().map(Some).map_err(|_| format!("{addr:?} is not host:port (or \"off\")")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_or_switch_off() {
        assert_eq!(listen_address("127.0.0.1:9464"), Ok(Some(SocketAddr::from(([127, 0, 0, 1], 9464)))));
        assert_eq!(listen_address(" 0.0.0.0:1 "), Ok(Some(SocketAddr::from(([0, 0, 0, 0], 1)))));
        assert_eq!(listen_address("off"), Ok(None));
        assert_eq!(listen_address(""), Ok(None));
        assert!(listen_address("localhost").is_err());
    }

    #[test]
    fn errors_are_one_line_without_the_prefix() {
        assert_eq!(
            first_line("error: invalid value 'x' for '--memory'\n\nFor more information"),
            "invalid value 'x' for '--memory'"
        );
        assert_eq!(first_line("\n\n"), "invalid arguments");
    }
}
