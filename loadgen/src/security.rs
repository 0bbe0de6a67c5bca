//! How the load generator reaches the server and the agents: mutual TLS with one client
//! certificate (the operator's) for both, or plaintext, which is allowed on loopback only
//! unless `--insecure`.
//!
//! Owns the client side of dmar's secure links for this binary: loading the client's TLS
//! material, the names the server's and the agents' certificates must carry, the plaintext
//! rule and turning an address into a connectable endpoint. It does not issue certificates
//! (`dmar-certs`, [`dmar_auth::DevPki`]) or decide what the operator may do (the server's
//! policy, the agents' trusted clients).
//!
//! The operator's certificate carries the most powerful role dmar has: whoever holds it
//! creates domains, maps memory and drives every agent's DMA. Without TLS, anyone who
//! reaches the ports can do the same, so plaintext beyond loopback needs `--insecure`.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dmar_auth::{Identity, TlsFiles, TlsMaterial};
use tonic::transport::{Endpoint, Uri};

use crate::args::Common;

/// How the control channels are protected.
#[derive(Clone, Debug)]
pub(crate) enum ClientSecurity {
    /// No TLS: loopback only, unless the operator said `--insecure`.
    Plaintext,
    /// Mutual TLS: the client presents its certificate to the server and the agents.
    MutualTls(Arc<ClientTls>),
}

/// The client's TLS material and the names its peers' certificates must carry.
#[derive(Debug)]
pub(crate) struct ClientTls {
    /// The CA to trust and the client's own certificate and key.
    pub(crate) material: TlsMaterial,
    /// What the server's certificate must name.
    pub(crate) server_name: String,
    /// What every agent's certificate must name.
    pub(crate) agent_server_name: String,
}

/// Whom a channel goes to, which decides the name its certificate must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    /// The server's Control service.
    Server,
    /// An agent's AgentControl service.
    Agent,
}

/// Plaintext (no `--tls-dir`) to an address beyond loopback without `--insecure`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing plaintext to {0}: give --tls-dir DIR (docs/DEPLOY.md) or --insecure")]
pub struct PlaintextRefused(pub String);

impl ClientSecurity {
    /// Mutual TLS from `dir` with the certificate `name`.
    pub(crate) fn from_dir(dir: &Path, name: &str, server_name: &str, agent_server_name: &str) -> anyhow::Result<Self> {
        // The name also names files: an identity cannot climb out of `dir`.
        let name = Identity::new(name).with_context(|| format!("tls name {name:?}"))?;
        let material = TlsFiles::from_dir(dir, name.as_str()).load()?;
        Ok(Self::MutualTls(Arc::new(ClientTls {
            material,
            server_name: server_name.to_owned(),
            agent_server_name: agent_server_name.to_owned(),
        })))
    }

    /// True with TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Self::MutualTls(_))
    }

    /// The full URL for `addr` (`host:port` gets `https://` with TLS, `http://` without);
    /// a scheme that contradicts the security is an error rather than a silent downgrade.
    pub(crate) fn url(&self, addr: &str) -> anyhow::Result<String> {
        let (scheme, bare) = match addr.split_once("://") {
            Some((scheme, bare)) => (Some(scheme), bare),
            None => (None, addr),
        };
        match (scheme, self.is_tls()) {
            (None, true) | (Some("https"), true) => Ok(format!("https://{bare}")),
            (None, false) | (Some("http"), false) => Ok(format!("http://{bare}")),
            (Some("http"), true) => anyhow::bail!("{addr:?} is plaintext (http://) but --tls-dir asks for tls"),
            (Some("https"), false) => anyhow::bail!("{addr:?} asks for tls (https://): give --tls-dir DIR"),
            (Some(other), _) => anyhow::bail!("{addr:?}: unknown scheme {other:?} (use host:port)"),
        }
    }

    /// A tonic endpoint for `addr`, with the client's certificate under TLS.
    pub(crate) fn endpoint(&self, addr: &str, peer: Peer) -> anyhow::Result<Endpoint> {
        let url = self.url(addr)?;
        let endpoint = Endpoint::from_shared(url)
            .with_context(|| format!("{addr:?} is not a usable address"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(600));
        match self {
            Self::Plaintext => Ok(endpoint),
            Self::MutualTls(tls) => {
                let name = match peer {
                    Peer::Server => &tls.server_name,
                    Peer::Agent => &tls.agent_server_name,
                };
                endpoint.tls_config(tls.material.tonic_client_config(name)).context("tls configuration")
            }
        }
    }
}

/// The plaintext rule: with TLS, or with `insecure`, anything goes; otherwise every address
/// must be loopback (`127.0.0.0/8`, `::1`, `localhost`). Other names are not resolved:
/// what they resolve to can change.
pub fn check_plaintext<'a>(
    tls: bool,
    insecure: bool,
    addrs: impl IntoIterator<Item = &'a str>,
) -> Result<(), PlaintextRefused> {
    if tls || insecure {
        return Ok(());
    }
    for addr in addrs {
        let with_scheme = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
        let host = with_scheme.parse::<Uri>().ok().and_then(|u| u.host().map(str::to_owned)).unwrap_or_default();
        if !is_loopback_host(&host) {
            return Err(PlaintextRefused(printable(addr)));
        }
    }
    Ok(())
}

/// [`check_plaintext`] for a command line: the server and agent addresses it names.
pub fn check_common(common: &Common) -> Result<(), PlaintextRefused> {
    let addrs = common.server.iter().chain(&common.agents).map(String::as_str);
    check_plaintext(common.tls_dir.is_some(), common.insecure, addrs)
}

/// `localhost`, or a loopback IP address (bracketed or not).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// An address as given, cut to printable ASCII and 100 characters for the one-line error.
fn printable(s: &str) -> String {
    s.chars().take(100).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_loopback_only_unless_insecure() {
        for ok in ["127.0.0.1:50051", "http://localhost:1", "[::1]:50061", "http://127.3.2.1:9"] {
            assert_eq!(check_plaintext(false, false, [ok]), Ok(()), "{ok}");
        }
        for remote in ["server:50051", "http://10.0.0.1:50051", "agent:50061", "0.0.0.0:1", ""] {
            assert_eq!(check_plaintext(false, false, [remote]), Err(PlaintextRefused(remote.to_owned())), "{remote}");
            assert_eq!(check_plaintext(false, true, [remote]), Ok(()), "{remote} with insecure");
            assert_eq!(check_plaintext(true, false, [remote]), Ok(()), "{remote} with tls");
        }
        // One remote address among loopback ones is enough to refuse.
        assert!(check_plaintext(false, false, ["127.0.0.1:1", "agent:50061"]).is_err());
        assert_eq!(
            PlaintextRefused("server:50051".into()).to_string(),
            "refusing plaintext to server:50051: give --tls-dir DIR (docs/DEPLOY.md) or --insecure"
        );
    }

    #[test]
    fn urls_follow_the_security_and_refuse_contradictions() {
        let plain = ClientSecurity::Plaintext;
        assert_eq!(plain.url("127.0.0.1:1").unwrap(), "http://127.0.0.1:1");
        assert_eq!(plain.url("http://h:1").unwrap(), "http://h:1");
        assert!(plain.url("https://h:1").is_err());
        assert!(plain.url("ftp://h:1").is_err());
    }
}
