//! The plaintext rule at the command line: a remote server without `--tls-dir` is refused
//! before anything is dialled (one line, status 2), unless `--insecure`.

use std::process::Command;

fn loadgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dmar-loadgen"))
        .args(args)
        .env_remove("DMAR_TLS_DIR")
        .env_remove("DMAR_INSECURE")
        .output()
        .expect("dmar-loadgen runs")
}

#[test]
fn plaintext_to_a_remote_server_is_refused_without_insecure() {
    let out = loadgen(&["--server", "dmar-server.example:50051", "--agents", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("dmar-loadgen: refusing plaintext to dmar-server.example:50051: give --tls-dir DIR"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_remote_agent_is_refused_too_and_insecure_lets_both_through() {
    let out = loadgen(&["--server", "127.0.0.1:1", "--agents", "10.1.2.3:50061"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing plaintext to 10.1.2.3:50061"));
    // With --insecure the rule lets it through: the run then fails dialling the closed
    // loopback port (status 1), not on the rule.
    let out = loadgen(&["--server", "127.0.0.1:1", "--agents", "127.0.0.1:1", "--insecure"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("refusing plaintext"));
}

#[test]
fn tls_files_that_do_not_exist_are_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path().to_str().expect("utf-8 path");
    let out = loadgen(&["--server", "dmar-server:50051", "--agents", "agent:50061", "--tls-dir", dir]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot read ca file"), "{stderr}");
}
