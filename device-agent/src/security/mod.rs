//! How an agent keeps the IOMMU's promise on the wire: mutual TLS on the ATS link and on
//! the control port, who may drive the control port, when plaintext is allowed, and what
//! the agent's name may contain.
//!
//! Owns the settings ([`AgentSecurity`], [`AgentTls`]), the plaintext rule
//! ([`check_plaintext`]), the control port's gate (`gate`: which verified identities may
//! call AgentControl and reflection; health stays open to probes), the refusal counters
//! and their rate-limited log (`refusals`), and the agent name's sanitising (`name`).
//! Not here: reading certificates and accepting TLS connections (`dmar_auth`), serving
//! (`agent`), which trace files may be read (`workload::trace_files`).
//!
//! Without TLS the control port has no identities to check: anyone who reaches it can
//! start workloads and DMA as the device. So plaintext is allowed only where nobody else
//! can reach either end (loopback), or when the operator says so (`--insecure`).

mod gate;
mod name;
mod refusals;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use dmar_auth::rustls::pki_types::ServerName;
use dmar_auth::{Identity, IdentityError, TlsError, TlsFiles, TlsMaterial};

pub(crate) use self::gate::ControlGate;
pub use self::name::{MAX_NAME_CHARS, printable_name};
pub(crate) use self::refusals::{Refusal, Refusals, Refused};

/// The identity the control port trusts unless told otherwise: the load generator's and
/// the operator's certificate (`dmar-certs --operator operator`).
pub const DEFAULT_TRUSTED_CLIENT: &str = "operator";

/// The name the server's certificate must carry unless told otherwise (what `dmar-certs`
/// issues the server).
pub const DEFAULT_SERVER_NAME: &str = "dmar-server";

/// The certificate an agent uses unless told otherwise (what `dmar-certs` issues the
/// first agent).
pub const DEFAULT_TLS_NAME: &str = "agent-0";

/// How an agent protects its ATS link and its control port.
///
/// The default is plaintext, for agents embedded in a process beside their server and
/// load generator on loopback; [`check_plaintext`] refuses it anywhere else unless
/// `insecure` is set.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSecurity {
    /// Mutual TLS for the link (the agent presents its certificate, the server's must
    /// chain to the CA and carry the expected name) and for the control port (clients
    /// must present a certificate from the same CA); `None` is plaintext.
    pub tls: Option<AgentTls>,
    /// The identities (certificate common names) the control port serves under TLS; any
    /// other verified identity gets PERMISSION_DENIED. Health is open to everyone.
    pub trusted_clients: Vec<Identity>,
    /// Allows plaintext beyond loopback (`--insecure`): anyone on the path then reads DMA
    /// payloads and anyone who reaches the control port drives the device. No effect with
    /// TLS.
    pub insecure: bool,
}

impl Default for AgentSecurity {
    /// Plaintext, loopback only, trusting `operator` (which matters once TLS is set).
    fn default() -> Self {
        Self {
            tls: None,
            trusted_clients: vec![Identity::new(DEFAULT_TRUSTED_CLIENT).expect("a valid name")],
            insecure: false,
        }
    }
}

impl AgentSecurity {
    /// Mutual TLS with `tls`, trusting `operator` on the control port.
    pub fn mutual_tls(tls: AgentTls) -> Self {
        Self { tls: Some(tls), ..Self::default() }
    }

    /// True when the link and the control port use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// An agent's TLS material and the name its server's certificate must carry; built by
/// [`AgentTls::new`] or [`AgentTls::from_dir`], which check the name.
#[derive(Clone, Debug)]
pub struct AgentTls {
    material: TlsMaterial,
    server_name: String,
}

/// Why an agent's TLS settings cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate name is not an identity (it also names files, so it is checked).
    #[error("tls name: {0}")]
    Name(#[from] IdentityError),
    /// The server name is neither a DNS name nor an IP address.
    #[error("server name {0:?} is not a dns name or ip address")]
    ServerName(String),
    /// The files cannot be read or do not make usable TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl AgentTls {
    /// TLS with `material`, expecting the server's certificate to carry `server_name`.
    pub fn new(material: TlsMaterial, server_name: &str) -> Result<Self, TlsSetupError> {
        if ServerName::try_from(server_name).is_err() {
            return Err(TlsSetupError::ServerName(printable_name(server_name)));
        }
        Ok(Self { material, server_name: server_name.to_owned() })
    }

    /// Loads `DIR/ca.pem`, `DIR/NAME.pem` and `DIR/NAME.key` (the layout `dmar-certs`
    /// writes); `name` must be an identity, so it cannot name a file outside `dir`.
    pub fn from_dir(dir: impl AsRef<Path>, name: &str, server_name: &str) -> Result<Self, TlsSetupError> {
        let name = Identity::new(name)?;
        let material = TlsFiles::from_dir(dir, name.as_str()).load()?;
        Self::new(material, server_name)
    }

    /// The CA to trust (for the server and for control clients), and the agent's own
    /// certificate and key (presented on the link, served on the control port).
    pub fn material(&self) -> &TlsMaterial {
        &self.material
    }

    /// The DNS name or IP address the server's certificate must carry, whatever host the
    /// URL dials.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// tonic's client configuration for the link (and the baseline's unary calls).
    pub(crate) fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        self.material.tonic_client_config(&self.server_name)
    }
}

impl PartialEq for AgentTls {
    /// The same CA, the same certificate chain and the same server name (the key belongs
    /// to the chain: loading checks it).
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.material.ca_certificates() == other.material.ca_certificates()
            && self.material.cert_chain() == other.material.cert_chain()
    }
}

/// Plaintext where it is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaintextRefused {
    /// The server is not on loopback.
    #[error("refusing plaintext to {0}: give --tls-dir DIR (docs/SECURITY.md) or --insecure")]
    Link(String),
    /// The control port listens beyond loopback.
    #[error("refusing plaintext on the control port {0}: give --tls-dir DIR (docs/SECURITY.md) or --insecure")]
    Control(SocketAddr),
}

/// The plaintext rule, in one place: with TLS, or with `insecure`, anything goes; without
/// either, plaintext is allowed only when the server URL's host and the control port's
/// listen address (`None`: no control port) are both loopback. A host name counts as
/// loopback only if it is `localhost`: other names are not resolved, because what they
/// resolve to can change.
pub fn check_plaintext(
    security: &AgentSecurity,
    server_url: &str,
    control: Option<SocketAddr>,
) -> Result<(), PlaintextRefused> {
    if security.is_tls() || security.insecure {
        return Ok(());
    }
    let uri = server_url.parse::<tonic::transport::Uri>().ok();
    let host = uri.as_ref().and_then(|u| u.host()).unwrap_or("");
    if !is_loopback_host(host) {
        let shown = uri.as_ref().and_then(|u| u.authority()).map_or_else(|| server_url.to_owned(), |a| a.to_string());
        return Err(PlaintextRefused::Link(printable_name(&shown)));
    }
    match control {
        Some(addr) if !addr.ip().to_canonical().is_loopback() => Err(PlaintextRefused::Control(addr)),
        _ => Ok(()),
    }
}

/// `localhost`, or a loopback IP address (`127.0.0.0/8`, `::1`, bracketed or not).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

impl fmt::Display for AgentSecurity {
    /// For the start-up log: `mutual tls`, `plaintext (loopback)` or `plaintext (insecure)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.tls, self.insecure) {
            (Some(_), _) => f.write_str("mutual tls"),
            (None, false) => f.write_str("plaintext (loopback)"),
            (None, true) => f.write_str("plaintext (insecure)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("a socket address"))
    }

    #[test]
    fn plaintext_is_allowed_on_loopback_only() {
        let plain = AgentSecurity::default();
        for (server, control) in [
            ("http://127.0.0.1:50051", addr("127.0.0.1:50061")),
            ("http://localhost:50051", addr("[::1]:50061")),
            ("http://[::1]:50051", None),
            ("http://127.8.9.10:50051", addr("127.0.0.1:0")),
            ("http://[::ffff:127.0.0.1]:1", addr("[::ffff:127.0.0.1]:1")),
        ] {
            assert_eq!(check_plaintext(&plain, server, control), Ok(()), "{server} {control:?}");
        }
        assert_eq!(
            check_plaintext(&plain, "http://dmar-server:50051", addr("127.0.0.1:50061")),
            Err(PlaintextRefused::Link("dmar-server:50051".into()))
        );
        assert_eq!(
            check_plaintext(&plain, "http://10.0.0.7:50051", None),
            Err(PlaintextRefused::Link("10.0.0.7:50051".into()))
        );
        assert!(check_plaintext(&plain, "http://localhost.example.com:1", None).is_err());
        assert!(check_plaintext(&plain, "not a url", None).is_err());
        assert_eq!(
            check_plaintext(&plain, "http://127.0.0.1:50051", addr("0.0.0.0:50061")),
            Err(PlaintextRefused::Control("0.0.0.0:50061".parse().expect("addr")))
        );
        assert!(check_plaintext(&plain, "http://127.0.0.1:50051", addr("[::]:50061")).is_err());
        assert_eq!(
            PlaintextRefused::Link("dmar-server:50051".into()).to_string(),
            "refusing plaintext to dmar-server:50051: give --tls-dir DIR (docs/SECURITY.md) or --insecure"
        );

        // --insecure allows it anywhere.
        let insecure = AgentSecurity { insecure: true, ..AgentSecurity::default() };
        assert_eq!(check_plaintext(&insecure, "http://dmar-server:50051", addr("0.0.0.0:50061")), Ok(()));
    }

    #[test]
    fn tls_allows_any_address() -> Result<(), Box<dyn std::error::Error>> {
        let pki = dmar_auth::DevPki::generate(&dmar_auth::DevPkiSpec::default())?;
        let tls = AgentTls::new(pki.tls_material("agent-0")?, DEFAULT_SERVER_NAME)?;
        let secure = AgentSecurity::mutual_tls(tls.clone());
        assert_eq!(check_plaintext(&secure, "https://dmar-server:50051", addr("0.0.0.0:50061")), Ok(()));
        assert_eq!(secure.trusted_clients, [Identity::new("operator")?]);
        assert_eq!(secure, AgentSecurity::mutual_tls(tls));
        assert!(matches!(AgentTls::new(pki.tls_material("agent-0")?, "not a name"), Err(TlsSetupError::ServerName(_))));
        // A certificate name that would leave the directory is not a name.
        let dir = tempfile::tempdir()?;
        assert!(matches!(
            AgentTls::from_dir(dir.path(), "../agent-0", DEFAULT_SERVER_NAME),
            Err(TlsSetupError::Name(_))
        ));
        pki.write_to(dir.path(), false)?;
        let loaded = AgentTls::from_dir(dir.path(), "agent-0", DEFAULT_SERVER_NAME)?;
        assert_eq!(loaded.material().identity().map(Identity::as_str), Some("agent-0"));
        Ok(())
    }
}
