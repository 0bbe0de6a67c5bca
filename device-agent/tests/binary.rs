//! The `dmar-agent` binary: configurations that must not run stop with one line and exit
//! status 2; with `--tls-dir` it serves its control port (health to a probe without a
//! certificate, AgentControl to the operator) while the server is unreachable.

use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dmar_auth::{DevPki, DevPkiSpec};
use dmar_proto::v1::GetAgentInfoRequest;
use dmar_proto::v1::agent_control_client::AgentControlClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The binary with no `DMAR_*` variable from the test's environment.
fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dmar-agent"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DMAR_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn run(args: &[&str]) -> Result<Output> {
    Ok(agent().args(args).stdin(Stdio::null()).output()?)
}

#[test]
fn plaintext_beyond_loopback_is_one_line_and_exit_2() -> Result<()> {
    for (args, line) in [
        (
            vec!["--server", "dmar-server:50051"],
            "dmar-agent: refusing plaintext to dmar-server:50051: give --tls-dir DIR (docs/SECURITY.md) or --insecure",
        ),
        (
            vec!["--server", "http://10.1.2.3:50051", "--control-listen", "127.0.0.1:0"],
            "dmar-agent: refusing plaintext to 10.1.2.3:50051: give --tls-dir DIR (docs/SECURITY.md) or --insecure",
        ),
        (
            vec!["--control-listen", "0.0.0.0:50061"],
            "dmar-agent: refusing plaintext on the control port 0.0.0.0:50061: give --tls-dir DIR (docs/SECURITY.md) or --insecure",
        ),
    ] {
        let out = run(&args)?;
        let stderr = String::from_utf8(out.stderr)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), line, "{args:?}");
    }
    Ok(())
}

#[test]
fn unusable_tls_settings_are_one_line_and_exit_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    DevPki::generate(&DevPkiSpec::default())?.write_to(dir.path(), false)?;
    let tls_dir = dir.path().to_str().context("utf-8 temp path")?;
    for args in [
        vec!["--tls-dir", tls_dir, "--server", "http://127.0.0.1:50051"],
        vec!["--tls-dir", tls_dir, "--tls-name", "nobody"],
        vec!["--tls-dir", tls_dir, "--name", "not a cert name"],
        vec!["--tls-dir", tls_dir, "--server-name", "not a name"],
        vec!["--server", "https://127.0.0.1:50051"],
        vec!["--trust-client", "bad name"],
    ] {
        let out = run(&args)?;
        let stderr = String::from_utf8(out.stderr)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("dmar-agent: "), "{stderr}");
    }
    Ok(())
}

/// Kills the agent it holds (by its own handle) when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_the_control_port_serves_while_the_server_is_unreachable() -> Result<()> {
    dmar_auth::tls::install_default_crypto_provider();
    let pki = DevPki::generate(&DevPkiSpec::default())?;
    let dir = tempfile::tempdir()?;
    pki.write_to(dir.path(), false)?;
    let control = free_port()?;
    let server = free_port()?;
    let _agent = Running(
        agent()
            .args(["--tls-dir", dir.path().to_str().context("utf-8 temp path")?])
            .args(["--server", &server.to_string(), "--control-listen", &control.to_string()])
            .args(["--metrics-listen", "off", "--reconnect-initial-ms", "50"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let url = format!("https://{control}");
    let probe = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_cert_pem)).domain_name("localhost");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut health = loop {
        if let Ok(ch) = Endpoint::from_shared(url.clone())?.tls_config(probe.clone())?.connect().await {
            break HealthClient::new(ch);
        }
        anyhow::ensure!(Instant::now() < deadline, "the agent's control port never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    health.check(HealthCheckRequest { service: String::new() }).await?;

    let operator = pki.tls_material("operator")?.tonic_client_config("localhost");
    let channel = Endpoint::from_shared(url.clone())?.tls_config(operator)?.connect().await?;
    let info = AgentControlClient::new(channel).get_agent_info(GetAgentInfoRequest {}).await?.into_inner();
    assert_eq!(info.server, format!("https://{server}"));
    assert!(!info.connected);

    let anonymous = Endpoint::from_shared(url)?.tls_config(probe)?.connect().await?;
    let refused = AgentControlClient::new(anonymous).get_agent_info(GetAgentInfoRequest {}).await;
    assert_eq!(refused.expect_err("no certificate").code(), tonic::Code::Unauthenticated);
    Ok(())
}
