//! The `dmar-certs` binary: its output loads through `TlsFiles::from_dir` and
//! `Policy::load`, it refuses to replace a CA without `--force`, and bad arguments are one
//! line and exit code 2.

use std::process::{Command, Output};

use anyhow::Result;
use dmar_auth::{ClientAuth, Identity, Policy, Role, TlsFiles};
use dmar_vtd::SourceId;

fn dmar_certs(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dmar-certs"));
    // The test's own environment must not leak flags in.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DMAR_CERTS_") {
            cmd.env_remove(key);
        }
    }
    Ok(cmd.args(args).output()?)
}

const EXAMPLE: &[&str] = &[
    "--server",
    "dmar-server",
    "--server-san",
    "localhost,127.0.0.1,::1,dmar-server",
    "--agent",
    "agent-0=00:01.0-00:1f.7",
    "--agent",
    "agent-1=01:00.0-01:1f.7",
    "--operator",
    "operator",
    "--observer",
    "observer",
];

#[test]
fn output_loads_as_tls_files_and_policy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("certs");
    let mut args = vec!["--out", out.to_str().expect("utf-8 temp path")];
    args.extend_from_slice(EXAMPLE);
    let run = dmar_certs(&args)?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let listed = String::from_utf8(run.stdout)?;
    assert_eq!(listed.lines().count(), 2 + 2 * 5 + 1, "{listed}");

    for name in ["dmar-server", "agent-0", "agent-1", "operator", "observer"] {
        let material = TlsFiles::from_dir(&out, name).load()?;
        assert_eq!(material.identity().map(Identity::as_str), Some(name));
        material.rustls_server_config(ClientAuth::Required)?;
        material.rustls_client_config()?;
    }

    let policy = Policy::load(out.join("policy.toml"))?;
    let grant = |n: &str| policy.grant(&Identity::new(n).expect("a name")).cloned();
    assert!(grant("operator").expect("operator").has(Role::Operator));
    assert!(grant("observer").expect("observer").has(Role::Observer));
    let agent1 = grant("agent-1").expect("agent-1");
    assert!(agent1.may_bind(SourceId::new(1, 0x1f, 7)) && !agent1.may_bind(SourceId::new(0, 1, 0)));
    let agent0 = grant("agent-0").expect("agent-0");
    assert!(agent0.may_bind(SourceId::new(0, 1, 0)) && !agent0.may_bind(SourceId::new(0, 0, 7)));
    assert!(grant("dmar-server").is_none());

    // A second run refuses to replace the CA; --force replaces it.
    let ca = std::fs::read(out.join("ca.pem"))?;
    let again = dmar_certs(&args)?;
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8(again.stderr)?;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("already exists") && stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(out.join("ca.pem"))?, ca);
    args.push("--force");
    assert!(dmar_certs(&args)?.status.success());
    assert_ne!(std::fs::read(out.join("ca.pem"))?, ca);
    Ok(())
}

#[test]
fn zero_flags_write_a_local_setup() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = Command::new(env!("CARGO_BIN_EXE_dmar-certs")).current_dir(dir.path()).env_clear().output()?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let certs = dir.path().join("certs");
    for name in ["dmar-server", "agent-0", "operator", "observer"] {
        TlsFiles::from_dir(&certs, name).load()?;
    }
    assert_eq!(Policy::load(certs.join("policy.toml"))?.len(), 3);
    Ok(())
}

#[test]
fn environment_variables_set_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = Command::new(env!("CARGO_BIN_EXE_dmar-certs"))
        .env_clear()
        .env("DMAR_CERTS_OUT", dir.path())
        .env("DMAR_CERTS_AGENT", "a-0=00:01.0 a-1=00:02.0-00:02.7,00:03.0")
        .env("DMAR_CERTS_OPERATOR", "op1,op2")
        .output()?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let policy = Policy::load(dir.path().join("policy.toml"))?;
    let names: Vec<&str> = policy.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(names, ["a-0", "a-1", "op1", "op2", "observer"]);
    Ok(())
}

#[test]
fn bad_arguments_are_one_line_and_exit_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().to_str().expect("utf-8 temp path");
    for bad in [
        vec!["--agent", "agent-0"],
        vec!["--agent", "agent-0=00:01.7-00:01.0"],
        vec!["--operator", "bad name"],
        vec!["--server-san", "not a host"],
        vec!["--operator", "x", "--observer", "x"],
        vec!["--operator", "ca"],
        vec!["--validity-days", "0"],
        vec!["--no-such-flag"],
    ] {
        let mut args = vec!["--out", out];
        args.extend_from_slice(&bad);
        let run = dmar_certs(&args)?;
        let stderr = String::from_utf8(run.stderr)?;
        assert_eq!(run.status.code(), Some(2), "{bad:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{bad:?}: {stderr}");
        assert!(stderr.starts_with("dmar-certs: "), "{stderr}");
    }
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "nothing is written on bad arguments");
    Ok(())
}
