//! TLS configuration from PEM files: the CA that vouches for peers, this process's
//! certificate chain and its private key, turned into tonic and rustls configurations.
//!
//! This module owns reading the files (bounded, with errors that name the file but never
//! repeat its contents), checking that they parse and that the key matches the certificate,
//! and building the server and client configurations with ALPN `h2` and the ring crypto
//! provider. It does not accept connections ([`crate::accept`] does) and does not decide what
//! an identity may do ([`crate::policy`]).
//!
//! Two ways to serve:
//! - [`TlsMaterial::tonic_server_config`] gives tonic's own TLS; read a caller's identity with
//!   [`crate::Identity::from_peer_certs`]`(request.peer_certs())`.
//! - [`TlsMaterial::rustls_server_config`] gives a `rustls::ServerConfig` for a custom acceptor
//!   ([`crate::accept::incoming`]), which reads the identity once per connection and can
//!   limit connections per identity.
//!
//! [`ClientAuth::Optional`] lets a peer without a certificate finish the handshake (a health
//! probe), so every RPC other than health must then demand an identity; a certificate that is
//! presented is still verified against the CA in both modes.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::identity::Identity;

/// The largest PEM file read: a CA bundle or a chain is a few kilobytes.
pub const MAX_PEM_BYTES: u64 = 256 * 1024;

/// The ALPN protocol both sides offer: gRPC runs over HTTP/2 only.
pub const ALPN_H2: &[u8] = b"h2";

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without a certificate signed by the CA.
    Required,
    /// A peer without a certificate completes the handshake and has no identity (health
    /// probes); a peer that presents one must still present one the CA signed.
    Optional,
}

/// Why TLS material could not be loaded or a configuration built. Messages name the file
/// and what is wrong with it, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be opened or read.
    #[error("cannot read {what} file {}", .path.display())]
    Read {
        /// Which file: `ca`, `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_PEM_BYTES`].
    #[error("{what} file {} is larger than {limit} bytes", .path.display())]
    TooLarge {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The PEM does not hold what it should.
    #[error("{what} {origin}: {problem}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// The file's path, or `pem` when loaded from memory.
        origin: String,
        /// What is wrong, in fixed words.
        problem: &'static str,
    },
    /// The private key does not belong to the certificate, or rustls refused the material.
    #[error("tls configuration refused")]
    Rustls(#[from] rustls::Error),
    /// The CA cannot verify client certificates (for example, it holds no usable root).
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Where a process's TLS files are: the CA certificate(s) to trust, its own certificate
/// chain (leaf first) and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates, PEM; peers must chain to one of them.
    pub ca: PathBuf,
    /// This process's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// This process's private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The layout `dmar-certs` writes: `DIR/ca.pem`, `DIR/NAME.pem`, `DIR/NAME.key`; one
    /// directory flag then configures a process.
    pub fn from_dir(dir: impl AsRef<Path>, name: &str) -> Self {
        let dir = dir.as_ref();
        Self { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }

    /// Reads and checks the three files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca = read_limited("ca", &self.ca)?;
        let cert = read_limited("certificate", &self.cert)?;
        let key = read_limited("key", &self.key)?;
        let origin = |p: &Path| p.display().to_string();
        TlsMaterial::parse((&ca, origin(&self.ca)), (&cert, origin(&self.cert)), (&key, origin(&self.key)))
    }
}

/// Parsed, checked TLS material: what every configuration below is built from.
///
/// Keeps the PEM text too, because tonic's own TLS types take PEM. `Debug` does not print
/// the key.
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    roots: Arc<RootCertStore>,
    ca_certs: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: Option<Identity>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .field("ca_certs", &self.ca_certs.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            roots: self.roots.clone(),
            ca_certs: self.ca_certs.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
        }
    }
}

impl TlsMaterial {
    /// Builds material from PEM in memory (tests, and [`crate::pki::DevPki`]); errors call
    /// the inputs `pem`.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let pem = || "pem".to_owned();
        Self::parse((ca, pem()), (cert, pem()), (key, pem()))
    }

    fn parse(ca: (&[u8], String), cert: (&[u8], String), key: (&[u8], String)) -> Result<Self, TlsError> {
        let ca_certs = certificates("ca", ca.0, &ca.1)?;
        let mut roots = RootCertStore::empty();
        for c in &ca_certs {
            roots.add(c.clone()).map_err(|_| pem_error("ca", &ca.1, "a certificate is not a usable trust anchor"))?;
        }
        let chain = certificates("certificate", cert.0, &cert.1)?;
        let key_der = PrivateKeyDer::from_pem_slice(key.0).map_err(|e| pem_error("key", &key.1, pem_problem(&e)))?;
        // Refuses a key that does not belong to the leaf now, not at the first handshake.
        rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &crypto_provider())?;
        let identity = chain.first().and_then(|leaf| Identity::from_certificate(leaf).ok());
        Ok(Self {
            ca_pem: ca.0.to_vec(),
            cert_pem: cert.0.to_vec(),
            key_pem: key.0.to_vec(),
            roots: Arc::new(roots),
            ca_certs,
            chain,
            key: key_der,
            identity,
        })
    }

    /// The identity of this process's own certificate (its subject common name), if the
    /// name fits the identity syntax: for logs ("serving as dmar-server").
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The trusted CA certificates.
    pub fn ca_certificates(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    /// This process's certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// tonic's built-in server TLS with this certificate, verifying clients against the CA.
    pub fn tonic_server_config(&self, client_auth: ClientAuth) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(client_auth == ClientAuth::Optional)
    }

    /// tonic's client TLS: trust only the CA, present this certificate, and expect the
    /// server's certificate to name `server_name` (a DNS name or IP address in its SANs),
    /// whatever host the URI dials.
    pub fn tonic_client_config(&self, server_name: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
    }

    /// A rustls server configuration for a custom acceptor: this certificate, client
    /// certificates verified against the CA (required or optional), ALPN `h2`, TLS 1.2 and
    /// 1.3 with the ring provider.
    pub fn rustls_server_config(&self, client_auth: ClientAuth) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = crypto_provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone());
        let verifier = match client_auth {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        }
        .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// A rustls client configuration presenting this certificate and trusting only the CA,
    /// ALPN `h2`: for clients that do not go through tonic's channel (probes, tests).
    pub fn rustls_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// The crypto provider every configuration here uses: ring, so the build needs no cmake.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide rustls provider. tonic's built-in server TLS asks rustls for
/// the process default; with one provider compiled in rustls finds it alone, but if another
/// crate in the binary enables aws-lc as well, rustls cannot choose and panics at the first
/// handshake. Binaries call this once at start; a second call (or another crate having
/// installed a provider first) is harmless.
pub fn install_default_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_limited(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read { what, path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge { what, path: path.to_owned(), limit: MAX_PEM_BYTES });
    }
    Ok(bytes)
}

fn certificates(what: &'static str, pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, origin, pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(pem_error(what, origin, "no certificate found"));
    }
    Ok(certs)
}

fn pem_error(what: &'static str, origin: &str, problem: &'static str) -> TlsError {
    TlsError::Pem { what, origin: origin.to_owned(), problem }
}

/// The PEM parser's errors quote the offending line; this keeps only the kind.
fn pem_problem(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a pem section has no end marker",
        pem::Error::IllegalSectionStart { .. } => "a pem section start line is malformed",
        pem::Error::Base64Decode(_) => "a pem section is not valid base64",
        pem::Error::NoItemsFound => "no item of the expected kind found",
        pem::Error::SectionTooLarge => "a pem section is too large",
        _ => "not valid pem",
    }
}
