//! Who a peer is: the subject common name of the certificate it presented, validated into
//! an [`Identity`].
//!
//! This module owns the name's syntax and its extraction from X.509 DER. It does not verify
//! certificates (rustls does that against the CA during the handshake, see [`crate::tls`]) and
//! does not decide what an identity may do (that is [`crate::policy`]). An identity read here
//! is only as trustworthy as the handshake that produced the certificate: call
//! [`Identity::from_certificate`] on certificates a verifier has accepted, never on bytes a
//! client sent in a message.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest identity name, in bytes (every allowed character is one byte).
pub const MAX_IDENTITY_LEN: usize = 64;

/// The name the permissive (insecure) policy grants everything to: what a peer is called
/// when there is no TLS and therefore no certificate.
pub const INSECURE_IDENTITY: &str = "insecure";

/// A peer's name, as the common name (CN) of its certificate subject.
///
/// Names are 1 to 64 characters of `A-Z a-z 0-9 . _ -`, so they are safe in file names
/// (`NAME.pem`), log fields and error messages without quoting or escaping. Cloning is cheap
/// (a shared string), because the acceptor attaches the identity to every request of a
/// connection.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(Arc<str>);

/// Why a certificate or a string does not give an [`Identity`].
///
/// Messages never repeat the certificate's bytes or the rejected name: a peer controls both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The peer completed the handshake without a client certificate.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The bytes are not one DER-encoded X.509 certificate.
    #[error("the certificate is not valid x.509 der")]
    Malformed,
    /// The subject has no common name attribute.
    #[error("the certificate subject has no common name")]
    NoCommonName,
    /// The subject has more than one common name, so the identity would be ambiguous.
    #[error("the certificate subject has more than one common name")]
    AmbiguousCommonName,
    /// The common name is not a printable, UTF-8 or IA5 string.
    #[error("the certificate common name is not a text string")]
    CommonNameNotText,
    /// The name is empty, too long or has a character outside `A-Z a-z 0-9 . _ -`.
    #[error("an identity must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'")]
    InvalidName,
}

impl Identity {
    /// Validates `name` as an identity; the single place the syntax is checked, so every
    /// identity in a policy, a certificate or a flag obeys the same rule.
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        if name.is_empty()
            || name.len() > MAX_IDENTITY_LEN
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(IdentityError::InvalidName);
        }
        Ok(Self(Arc::from(name)))
    }

    /// The identity every peer has under [`crate::Policy::permissive`]: insecure mode has no
    /// certificates to read a name from.
    pub fn insecure() -> Self {
        Self(Arc::from(INSECURE_IDENTITY))
    }

    /// The name, for logs, lookups and file names.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads the identity from one DER certificate: its subject's only common name.
    ///
    /// Rejects trailing bytes after the certificate, a missing or repeated common name and
    /// a name outside the identity syntax.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Malformed)?;
        if !rest.is_empty() {
            return Err(IdentityError::Malformed);
        }
        let mut names = cert.subject().iter_common_name();
        let first = names.next().ok_or(IdentityError::NoCommonName)?;
        if names.next().is_some() {
            return Err(IdentityError::AmbiguousCommonName);
        }
        let text = first.as_str().map_err(|_| IdentityError::CommonNameNotText)?;
        Self::new(text)
    }

    /// Reads the identity of a connection's peer from its certificate chain, in the shape
    /// `tonic::Request::peer_certs()` returns; the first certificate is the peer's own
    /// (the leaf), the rest are intermediates.
    ///
    /// `None` or an empty chain is [`IdentityError::NoCertificate`]: in the "optional" client
    /// authentication mode a peer may connect without one, and every RPC but health must
    /// then be refused.
    pub fn from_peer_certs(certs: Option<Arc<Vec<CertificateDer<'static>>>>) -> Result<Self, IdentityError> {
        let certs = certs.ok_or(IdentityError::NoCertificate)?;
        let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
        Self::from_certificate(leaf.as_ref())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.0)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for Identity {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(crate::de::TextVisitor::new("an identity name", |s| {
            Identity::new(s).map_err(|e| e.to_string())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for good in ["a", "agent-0", "dmar.server_1", "A-Z.0_9", &"x".repeat(64)] {
            assert_eq!(Identity::new(good).map(|i| i.to_string()), Ok(good.to_owned()), "{good}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", " ", "a b", "a/b", "é", "a\n", "a:b", "a@b", "a*", &"x".repeat(65)] {
            assert_eq!(Identity::new(bad), Err(IdentityError::InvalidName), "{bad:?}");
        }
    }

    #[test]
    fn missing_certificates_are_no_identity() {
        assert_eq!(Identity::from_peer_certs(None), Err(IdentityError::NoCertificate));
        assert_eq!(Identity::from_peer_certs(Some(Arc::new(Vec::new()))), Err(IdentityError::NoCertificate));
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(Identity::from_certificate(b"not a certificate"), Err(IdentityError::Malformed));
        assert_eq!(Identity::from_certificate(&[]), Err(IdentityError::Malformed));
    }

    fn cert_with_subject(cns: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (i, cn) in cns.iter().enumerate() {
            // rcgen keeps one value per attribute type; spelling the CN's OID as a custom
            // type is the way to get a second CN into a subject.
            let ty = if i == 0 { rcgen::DnType::CommonName } else { rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]) };
            params.distinguished_name.push(ty, *cn);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().to_vec()
    }

    #[test]
    fn reads_the_common_name_of_an_rcgen_certificate() {
        let der = cert_with_subject(&["agent-7"]);
        assert_eq!(Identity::from_certificate(&der), Identity::new("agent-7"));
        let chain = Arc::new(vec![CertificateDer::from(der)]);
        assert_eq!(Identity::from_peer_certs(Some(chain)), Identity::new("agent-7"));
    }

    #[test]
    fn subjects_without_exactly_one_valid_name_are_refused() {
        assert_eq!(Identity::from_certificate(&cert_with_subject(&[])), Err(IdentityError::NoCommonName));
        assert_eq!(
            Identity::from_certificate(&cert_with_subject(&["a", "b"])),
            Err(IdentityError::AmbiguousCommonName)
        );
        assert_eq!(Identity::from_certificate(&cert_with_subject(&["bad name"])), Err(IdentityError::InvalidName));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut der = cert_with_subject(&["a"]);
        der.push(0);
        assert_eq!(Identity::from_certificate(&der), Err(IdentityError::Malformed));
    }
}
