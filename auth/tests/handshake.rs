//! Mutual TLS handshakes in-process over `tokio::io::duplex`, with the configurations
//! `TlsMaterial` builds and certificates `DevPki` issues: who gets in, and what identity the
//! server reads.

use std::sync::Arc;

use anyhow::Result;
use dmar_auth::rustls::pki_types::ServerName;
use dmar_auth::rustls::{self, RootCertStore};
use dmar_auth::tls::{ALPN_H2, crypto_provider};
use dmar_auth::tokio_rustls::{TlsAcceptor, TlsConnector};
use dmar_auth::{CertKind, ClientAuth, DevPki, DevPkiSpec, Identity, IdentityError, TlsMaterial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the server side saw.
#[derive(Debug)]
enum Outcome {
    /// Handshake completed; the identity read from the peer's certificates.
    Accepted(Result<Identity, IdentityError>),
    /// Handshake refused.
    Refused,
}

fn client_without_certificate(ca: &TlsMaterial) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in ca.ca_certificates() {
        roots.add(c.clone())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Runs one handshake and a one-byte exchange; returns what the server saw and whether the
/// client could use the connection.
async fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> Result<(Outcome, bool)> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    let server_side = async move {
        match acceptor.accept(s).await {
            Ok(mut tls) => {
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
                let certs = tls.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
                let mut byte = [0u8; 1];
                if tls.read_exact(&mut byte).await.is_ok() {
                    let _ = tls.write_all(&byte).await;
                    let _ = tls.flush().await;
                }
                Outcome::Accepted(Identity::from_peer_certs(certs))
            }
            Err(_) => Outcome::Refused,
        }
    };
    let client_side = async move {
        let Ok(mut tls) = connector.connect(ServerName::try_from("localhost").expect("a dns name"), c).await else {
            return false;
        };
        // With TLS 1.3 the client finishes before the server has checked its certificate, so
        // only an echo proves the server accepted it.
        if tls.write_all(b"x").await.is_err() || tls.flush().await.is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.is_ok() && &byte == b"x"
    };
    let (outcome, usable) = tokio::join!(server_side, client_side);
    Ok((outcome, usable))
}

fn new_pki() -> Result<DevPki> {
    Ok(DevPki::generate(&DevPkiSpec::default())?)
}

#[tokio::test]
async fn a_client_with_a_ca_signed_certificate_is_accepted_and_identified() -> Result<()> {
    let pki = new_pki()?;
    let server = pki.tls_material("dmar-server")?;
    for (name, mode) in [("operator", ClientAuth::Required), ("agent-0", ClientAuth::Optional)] {
        let client = pki.tls_material(name)?;
        let (outcome, usable) = handshake(server.rustls_server_config(mode)?, client.rustls_client_config()?).await?;
        match outcome {
            Outcome::Accepted(Ok(id)) => assert_eq!(id.as_str(), name),
            other => panic!("{name} in {mode:?}: {other:?}"),
        }
        assert!(usable);
    }
    Ok(())
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_when_required() -> Result<()> {
    let pki = new_pki()?;
    let server = pki.tls_material("dmar-server")?;
    let client = client_without_certificate(&server)?;
    let (outcome, usable) = handshake(server.rustls_server_config(ClientAuth::Required)?, client).await?;
    assert!(matches!(outcome, Outcome::Refused), "{outcome:?}");
    assert!(!usable);
    Ok(())
}

#[tokio::test]
async fn a_client_without_a_certificate_has_no_identity_when_optional() -> Result<()> {
    let pki = new_pki()?;
    let server = pki.tls_material("dmar-server")?;
    let client = client_without_certificate(&server)?;
    let (outcome, usable) = handshake(server.rustls_server_config(ClientAuth::Optional)?, client).await?;
    assert!(matches!(outcome, Outcome::Accepted(Err(IdentityError::NoCertificate))), "{outcome:?}");
    assert!(usable);
    Ok(())
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_in_both_modes() -> Result<()> {
    let pki = new_pki()?;
    let other = new_pki()?;
    let server = pki.tls_material("dmar-server")?;
    // The stranger trusts the right CA (so it accepts the server) but its own certificate
    // comes from another one.
    let stranger = other.cert("operator").expect("issued");
    let stranger =
        TlsMaterial::from_pem(pki.ca_cert_pem.as_bytes(), stranger.cert_pem.as_bytes(), stranger.key_pem.as_bytes())?;
    for mode in [ClientAuth::Required, ClientAuth::Optional] {
        let (outcome, usable) = handshake(server.rustls_server_config(mode)?, stranger.rustls_client_config()?).await?;
        assert!(matches!(outcome, Outcome::Refused), "{mode:?}: {outcome:?}");
        assert!(!usable);
    }
    Ok(())
}

#[tokio::test]
async fn a_client_refuses_a_server_from_another_ca() -> Result<()> {
    let pki = new_pki()?;
    let other = new_pki()?;
    let (outcome, usable) = handshake(
        other.tls_material("dmar-server")?.rustls_server_config(ClientAuth::Optional)?,
        pki.tls_material("operator")?.rustls_client_config()?,
    )
    .await?;
    assert!(matches!(outcome, Outcome::Refused), "{outcome:?}");
    assert!(!usable);
    Ok(())
}

#[tokio::test]
async fn a_client_only_certificate_cannot_serve() -> Result<()> {
    // A clientAuth-only certificate, even one naming localhost, must not pass as a server's.
    let pki = new_pki()?;
    let client_only = pki.issue(&Identity::new("client-only")?, CertKind::Client, &["localhost".to_owned()])?;
    let client_only = TlsMaterial::from_pem(
        pki.ca_cert_pem.as_bytes(),
        client_only.cert_pem.as_bytes(),
        client_only.key_pem.as_bytes(),
    )?;
    let (outcome, usable) = handshake(
        client_only.rustls_server_config(ClientAuth::Optional)?,
        pki.tls_material("observer")?.rustls_client_config()?,
    )
    .await?;
    assert!(matches!(outcome, Outcome::Refused), "{outcome:?}");
    assert!(!usable);
    // An agent's certificate serves its control port.
    let agent_as_server = pki.tls_material("agent-0")?;
    let (outcome, usable) = handshake(
        agent_as_server.rustls_server_config(ClientAuth::Required)?,
        pki.tls_material("operator")?.rustls_client_config()?,
    )
    .await?;
    assert!(matches!(outcome, Outcome::Accepted(Ok(_))), "{outcome:?}");
    assert!(usable);
    Ok(())
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused_at_load() -> Result<()> {
    let pki = new_pki()?;
    let cert = pki.cert("operator").expect("issued");
    let wrong_key = &pki.cert("observer").expect("issued").key_pem;
    let err = TlsMaterial::from_pem(pki.ca_cert_pem.as_bytes(), cert.cert_pem.as_bytes(), wrong_key.as_bytes())
        .expect_err("mismatched key");
    assert!(matches!(err, dmar_auth::TlsError::Rustls(_)), "{err}");
    // A certificate from the same CA under a name the policy does not know still loads: the
    // policy, not the TLS layer, refuses it.
    let extra = pki.issue(&Identity::new("mallory")?, CertKind::Client, &[])?;
    TlsMaterial::from_pem(pki.ca_cert_pem.as_bytes(), extra.cert_pem.as_bytes(), extra.key_pem.as_bytes())?;
    Ok(())
}
