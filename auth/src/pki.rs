//! A development PKI: one CA, a certificate and key for the server, each agent, operator
//! and observer, and the matching policy, all made in memory by rcgen.
//!
//! This module owns what the certificates contain (names, SANs, key usages, validity) and the
//! directory layout `dmar-certs` writes, which [`crate::TlsFiles::from_dir`] reads back. It is
//! for development, tests and demos: keys are generated and written unencrypted, the CA key
//! sits next to the certificates, and nothing here revokes or rotates. Production keys come
//! from the operator's own CA.
//!
//! Certificate contents:
//! - CA: CN `dmar development CA`, CA:true with path length 0, keyCertSign and cRLSign.
//! - server: CN = its name, serverAuth, SANs = the given DNS names and IP addresses plus the
//!   name itself.
//! - agent: CN = its name, serverAuth and clientAuth (an agent dials the server and serves
//!   its own control port), SANs `localhost`, `127.0.0.1`, its name and any extra SANs.
//! - operator, observer: CN = the name, clientAuth, no SANs.
//!
//! All keys are ECDSA P-256; certificates are valid from an hour ago (clock skew between
//! containers) for the requested number of days.

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::ServerName;

use crate::identity::Identity;
use crate::policy::{Grant, Policy, PolicyError, Quotas};
use crate::requester::{RequesterIdRange, RequesterIdSet};
use crate::role::Role;
use crate::tls::{TlsError, TlsMaterial};

/// The CA's subject common name.
pub const CA_COMMON_NAME: &str = "dmar development CA";

/// The longest validity accepted, in days (ten years).
pub const MAX_VALIDITY_DAYS: u32 = 3650;

/// One agent to issue for: its name and the requester ids the policy lets it bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSpec {
    /// The agent's identity (certificate CN and policy name).
    pub name: Identity,
    /// The ranges its policy entry grants.
    pub requester_ids: RequesterIdSet,
}

/// Why an `NAME=RANGES` agent argument does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentSpecError {
    /// There is no `=`.
    #[error("expected NAME=RANGE[,RANGE...], like agent-0=00:01.0-00:01.7")]
    Syntax,
    /// The name is not a valid identity.
    #[error(transparent)]
    Name(#[from] crate::identity::IdentityError),
    /// A range does not parse, or none is given.
    #[error(transparent)]
    Range(#[from] crate::requester::RequesterIdRangeError),
}

impl FromStr for AgentSpec {
    type Err = AgentSpecError;

    /// `agent-0=00:01.0-00:01.7,02:00.0`: the command line's form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, ranges) = s.split_once('=').ok_or(AgentSpecError::Syntax)?;
        let name = Identity::new(name.trim())?;
        let ranges = ranges.split(',').map(str::parse::<RequesterIdRange>).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { name, requester_ids: RequesterIdSet::from_ranges(ranges) })
    }
}

/// What to issue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPkiSpec {
    /// The server's name (CN, and a DNS SAN when it is a valid DNS name).
    pub server: Identity,
    /// The server's DNS names and IP addresses.
    pub server_sans: Vec<String>,
    /// The agents, each with its requester id ranges.
    pub agents: Vec<AgentSpec>,
    /// Extra SANs for every agent certificate (beyond `localhost`, `127.0.0.1` and its name).
    pub agent_sans: Vec<String>,
    /// Identities granted the operator role.
    pub operators: Vec<Identity>,
    /// Identities granted the observer role.
    pub observers: Vec<Identity>,
    /// How long every certificate is valid, in days (1 to [`MAX_VALIDITY_DAYS`]).
    pub validity_days: u32,
}

impl Default for DevPkiSpec {
    /// What a local run needs: server `dmar-server` on `localhost`, `127.0.0.1` and `::1`;
    /// `agent-0` for bus 0 (`00:00.0-00:1f.7`); `operator`; `observer`; one year.
    fn default() -> Self {
        let id = |s: &str| Identity::new(s).expect("a valid built-in name");
        let bus0 = RequesterIdRange::new(dmar_vtd::SourceId::new(0, 0, 0), dmar_vtd::SourceId::new(0, 0x1f, 7))
            .expect("an ordered built-in range");
        Self {
            server: id("dmar-server"),
            server_sans: vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()],
            agents: vec![AgentSpec { name: id("agent-0"), requester_ids: RequesterIdSet::from_ranges([bus0]) }],
            agent_sans: Vec::new(),
            operators: vec![id("operator")],
            observers: vec![id("observer")],
            validity_days: 365,
        }
    }
}

/// What a certificate is for, which decides its extended key usages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertKind {
    /// serverAuth only.
    Server,
    /// serverAuth and clientAuth.
    Agent,
    /// clientAuth only (operators, observers, test clients).
    Client,
}

/// One issued certificate and its private key, PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate's CN.
    pub name: Identity,
    /// What it is for.
    pub kind: CertKind,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert").field("name", &self.name).field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// Why the development PKI could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to make a key or certificate.
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    /// A SAN is neither an IP address nor a valid DNS name.
    #[error("{0:?} is not a valid dns name or ip address")]
    InvalidSan(String),
    /// Two certificates would have the same name (and the same files).
    #[error("the name {0} is used more than once")]
    DuplicateName(Identity),
    /// `ca` would overwrite the CA's own files.
    #[error("the name ca is reserved for the ca's own files")]
    ReservedName,
    /// The validity is zero or longer than [`MAX_VALIDITY_DAYS`].
    #[error("validity must be 1 to {MAX_VALIDITY_DAYS} days")]
    Validity,
    /// The grants do not make a valid policy (an agent without ranges, say).
    #[error("the policy for these names is invalid")]
    Policy(#[from] PolicyError),
    /// A file exists and overwriting was not requested.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// A file or the directory could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// No certificate of that name was issued.
    #[error("no certificate named {0}")]
    UnknownName(String),
    /// Issued material failed to load as TLS material.
    #[error("issued material does not load")]
    Tls(#[from] TlsError),
}

/// A generated CA, its certificates and the matching policy, in memory.
pub struct DevPki {
    /// The CA certificate, PEM: every process trusts it.
    pub ca_cert_pem: String,
    /// The CA private key, PEM: only `dmar-certs` needs it, to issue more.
    pub ca_key_pem: String,
    /// The issued certificates: the server first, then agents, operators, observers.
    pub certs: Vec<IssuedCert>,
    /// The policy granting the agents, operators and observers their roles.
    pub policy: Policy,
    ca_params: CertificateParams,
    validity_days: u32,
}

impl fmt::Debug for DevPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevPki").field("certs", &self.certs).field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl DevPki {
    /// Makes a CA and issues every certificate `spec` asks for, with the matching policy.
    pub fn generate(spec: &DevPkiSpec) -> Result<Self, PkiError> {
        if spec.validity_days == 0 || spec.validity_days > MAX_VALIDITY_DAYS {
            return Err(PkiError::Validity);
        }
        let mut seen = HashSet::new();
        let names = std::iter::once(&spec.server)
            .chain(spec.agents.iter().map(|a| &a.name))
            .chain(&spec.operators)
            .chain(&spec.observers);
        for name in names {
            if name.as_str() == "ca" {
                return Err(PkiError::ReservedName);
            }
            if !seen.insert(name) {
                return Err(PkiError::DuplicateName(name.clone()));
            }
        }
        let policy = Policy::new(
            spec.agents
                .iter()
                .map(|a| (a.name.clone(), grant(Role::Device, a.requester_ids.clone())))
                .chain(spec.operators.iter().map(|n| (n.clone(), grant(Role::Operator, RequesterIdSet::empty()))))
                .chain(spec.observers.iter().map(|n| (n.clone(), grant(Role::Observer, RequesterIdSet::empty())))),
        )?;

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = common_name(CA_COMMON_NAME);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut ca_params, spec.validity_days);
        let ca_cert = ca_params.self_signed(&ca_key)?;

        let mut pki = Self {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            certs: Vec::new(),
            policy,
            ca_params,
            validity_days: spec.validity_days,
        };
        let issuer = pki.issuer()?;
        let mut certs = vec![issue(&issuer, &spec.server, CertKind::Server, &spec.server_sans, spec.validity_days)?];
        let agent_sans: Vec<String> =
            ["localhost", "127.0.0.1"].iter().map(|s| (*s).to_owned()).chain(spec.agent_sans.iter().cloned()).collect();
        for agent in &spec.agents {
            certs.push(issue(&issuer, &agent.name, CertKind::Agent, &agent_sans, spec.validity_days)?);
        }
        for name in spec.operators.iter().chain(&spec.observers) {
            certs.push(issue(&issuer, name, CertKind::Client, &[], spec.validity_days)?);
        }
        pki.certs = certs;
        Ok(pki)
    }

    /// Issues one more certificate from this CA, not added to [`DevPki::certs`] or the
    /// policy: for tests that need a peer the policy does not name, or a second name.
    pub fn issue(&self, name: &Identity, kind: CertKind, sans: &[String]) -> Result<IssuedCert, PkiError> {
        issue(&self.issuer()?, name, kind, sans, self.validity_days)
    }

    /// The certificate issued for `name`.
    pub fn cert(&self, name: &str) -> Option<&IssuedCert> {
        self.certs.iter().find(|c| c.name.as_str() == name)
    }

    /// The TLS material for `name`, trusting this CA: what a process started with
    /// `TlsFiles::from_dir(dir, name)` would load, without touching disk.
    pub fn tls_material(&self, name: &str) -> Result<TlsMaterial, PkiError> {
        let cert = self.cert(name).ok_or_else(|| PkiError::UnknownName(name.to_owned()))?;
        Ok(TlsMaterial::from_pem(self.ca_cert_pem.as_bytes(), cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())?)
    }

    /// Writes `ca.pem`, `ca.key`, `NAME.pem` and `NAME.key` for each certificate, and
    /// `policy.toml`, into `dir` (created if missing). Keys are mode 0600 from the moment
    /// they exist. Unless `overwrite`, refuses before writing anything if any of the files
    /// exists, so a CA others already trust is never replaced by accident. Returns the paths
    /// written.
    pub fn write_to(&self, dir: impl AsRef<Path>, overwrite: bool) -> Result<Vec<PathBuf>, PkiError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })?;
        let mut files: Vec<(PathBuf, &str, bool)> =
            vec![(dir.join("ca.pem"), &self.ca_cert_pem, false), (dir.join("ca.key"), &self.ca_key_pem, true)];
        for c in &self.certs {
            files.push((dir.join(format!("{}.pem", c.name)), &c.cert_pem, false));
            files.push((dir.join(format!("{}.key", c.name)), &c.key_pem, true));
        }
        let policy = self.policy.to_toml_string();
        files.push((dir.join("policy.toml"), &policy, false));
        if !overwrite && let Some((path, _, _)) = files.iter().find(|(p, _, _)| p.exists()) {
            return Err(PkiError::Exists(path.clone()));
        }
        let mut written = Vec::with_capacity(files.len());
        for (path, contents, secret) in files {
            write_file(&path, contents.as_bytes(), secret)?;
            written.push(path);
        }
        Ok(written)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        Ok(Issuer::new(self.ca_params.clone(), KeyPair::from_pem(&self.ca_key_pem)?))
    }
}

fn grant(role: Role, requester_ids: RequesterIdSet) -> Grant {
    Grant { roles: [role].into_iter().collect(), requester_ids, quotas: Quotas::DEFAULT }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    name: &Identity,
    kind: CertKind,
    sans: &[String],
    days: u32,
) -> Result<IssuedCert, PkiError> {
    let mut all_sans: Vec<String> = Vec::new();
    for san in sans {
        if ServerName::try_from(san.as_str()).is_err() {
            return Err(PkiError::InvalidSan(san.clone()));
        }
        if !all_sans.contains(san) {
            all_sans.push(san.clone());
        }
    }
    // A host reaches a server or an agent by its name (compose service names), so the name
    // is a SAN too when it is a valid DNS name.
    if kind != CertKind::Client
        && ServerName::try_from(name.as_str()).is_ok()
        && !all_sans.iter().any(|s| s == name.as_str())
    {
        all_sans.push(name.as_str().to_owned());
    }
    let mut params = CertificateParams::new(all_sans)?;
    params.distinguished_name = common_name(name.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match kind {
        CertKind::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        CertKind::Agent => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        CertKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(IssuedCert { name: name.clone(), kind, cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Writes through a temporary file in the same directory and renames it into place, so a
/// reader never sees half a file and a replaced key never passes through wider permissions.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    let write_err = |source| PkiError::Write { path: path.to_owned(), source };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(write_err)?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(write_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_arguments_parse() {
        let a: AgentSpec = "agent-1=01:00.0-01:1f.7,02:00.0".parse().unwrap();
        assert_eq!(a.name.as_str(), "agent-1");
        assert_eq!(a.requester_ids.len(), 257);
        assert_eq!("agent-1".parse::<AgentSpec>(), Err(AgentSpecError::Syntax));
        assert!(matches!("a b=00:00.0".parse::<AgentSpec>(), Err(AgentSpecError::Name(_))));
        assert!(matches!("a=".parse::<AgentSpec>(), Err(AgentSpecError::Range(_))));
        assert!(matches!("a=00:01.7-00:01.0".parse::<AgentSpec>(), Err(AgentSpecError::Range(_))));
    }

    #[test]
    fn default_spec_issues_every_certificate_with_its_identity() {
        let pki = DevPki::generate(&DevPkiSpec::default()).unwrap();
        let names: Vec<&str> = pki.certs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["dmar-server", "agent-0", "operator", "observer"]);
        for c in &pki.certs {
            let material = pki.tls_material(c.name.as_str()).unwrap();
            assert_eq!(material.identity(), Some(&c.name));
            assert_eq!(material.ca_certificates().len(), 1);
        }
        let g = pki.policy.grant(&Identity::new("agent-0").unwrap()).unwrap();
        assert!(g.may_bind(dmar_vtd::SourceId::new(0, 0x1f, 7)) && !g.may_bind(dmar_vtd::SourceId::new(1, 0, 0)));
        assert!(pki.policy.grant(&Identity::new("dmar-server").unwrap()).is_none());
        assert!(matches!(pki.tls_material("nobody"), Err(PkiError::UnknownName(_))));
        assert!(!format!("{pki:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn certificates_carry_the_documented_extensions() {
        use x509_parser::prelude::*;
        let spec = DevPkiSpec { agent_sans: vec!["agent-0.example".to_owned()], ..DevPkiSpec::default() };
        let pki = DevPki::generate(&spec).unwrap();
        let parse = |pem: &str| {
            let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
            let der: rustls::pki_types::CertificateDer<'static> = der;
            der.to_vec()
        };
        let eku_and_sans = |name: &str| {
            let der = parse(&pki.cert(name).unwrap().cert_pem);
            let (_, cert) = parse_x509_certificate(&der).unwrap();
            let eku = cert.extended_key_usage().unwrap().map(|e| (e.value.server_auth, e.value.client_auth));
            let sans: Vec<String> = cert
                .subject_alternative_name()
                .unwrap()
                .map(|s| {
                    s.value
                        .general_names
                        .iter()
                        .map(|n| match n {
                            GeneralName::DNSName(d) => format!("dns:{d}"),
                            GeneralName::IPAddress(b) => match b.len() {
                                4 => format!("ip:{}", std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap())),
                                _ => format!("ip:{}", std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap())),
                            },
                            other => format!("{other:?}"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            assert!(!cert.is_ca());
            (eku, sans)
        };
        let (eku, sans) = eku_and_sans("dmar-server");
        assert_eq!(eku, Some((true, false)));
        assert_eq!(sans, ["dns:localhost", "ip:127.0.0.1", "ip:::1", "dns:dmar-server"]);
        let (eku, sans) = eku_and_sans("agent-0");
        assert_eq!(eku, Some((true, true)));
        assert_eq!(sans, ["dns:localhost", "ip:127.0.0.1", "dns:agent-0.example", "dns:agent-0"]);
        let (eku, sans) = eku_and_sans("operator");
        assert_eq!(eku, Some((false, true)));
        assert!(sans.is_empty());

        let ca = parse(&pki.ca_cert_pem);
        let (_, ca) = parse_x509_certificate(&ca).unwrap();
        assert!(ca.is_ca());
        assert_eq!(ca.subject().iter_common_name().next().unwrap().as_str().unwrap(), CA_COMMON_NAME);
    }

    #[test]
    fn bad_specs_are_refused() {
        let id = |s: &str| Identity::new(s).unwrap();
        let d = DevPkiSpec::default;
        let dup = DevPkiSpec { observers: vec![id("operator")], ..d() };
        assert!(matches!(DevPki::generate(&dup), Err(PkiError::DuplicateName(n)) if n.as_str() == "operator"));
        let ca = DevPkiSpec { operators: vec![id("ca")], ..d() };
        assert!(matches!(DevPki::generate(&ca), Err(PkiError::ReservedName)));
        let san = DevPkiSpec { server_sans: vec!["not a host".to_owned()], ..d() };
        assert!(matches!(DevPki::generate(&san), Err(PkiError::InvalidSan(_))));
        let days = DevPkiSpec { validity_days: 0, ..d() };
        assert!(matches!(DevPki::generate(&days), Err(PkiError::Validity)));
        let empty =
            DevPkiSpec { agents: vec![AgentSpec { name: id("a"), requester_ids: RequesterIdSet::empty() }], ..d() };
        assert!(matches!(DevPki::generate(&empty), Err(PkiError::Policy(_))));
    }

    #[test]
    fn write_to_refuses_to_overwrite_unless_asked_and_protects_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::generate(&DevPkiSpec::default()).unwrap();
        let written = pki.write_to(dir.path(), false).unwrap();
        assert_eq!(written.len(), 2 + 2 * 4 + 1);
        let again = DevPki::generate(&DevPkiSpec::default()).unwrap();
        assert!(matches!(again.write_to(dir.path(), false), Err(PkiError::Exists(_))));
        // Nothing was replaced by the refused attempt.
        assert_eq!(std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(), pki.ca_cert_pem);
        again.write_to(dir.path(), true).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(), again.ca_cert_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |n: &str| std::fs::metadata(dir.path().join(n)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode("ca.key"), 0o600);
            assert_eq!(mode("agent-0.key"), 0o600);
            // Certificates are readable, never writable by others nor executable.
            assert_eq!(mode("ca.pem") & 0o133, 0);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn issue_makes_extra_certificates_from_the_same_ca() {
        let pki = DevPki::generate(&DevPkiSpec::default()).unwrap();
        let extra = pki.issue(&Identity::new("mallory").unwrap(), CertKind::Client, &[]).unwrap();
        let material =
            TlsMaterial::from_pem(pki.ca_cert_pem.as_bytes(), extra.cert_pem.as_bytes(), extra.key_pem.as_bytes())
                .unwrap();
        assert_eq!(material.identity().map(Identity::as_str), Some("mallory"));
        assert!(pki.policy.grant(&Identity::new("mallory").unwrap()).is_none());
    }
}
