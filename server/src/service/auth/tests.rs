//! Unit tests of the authorisation table and the per-identity bookkeeping.

use super::*;

#[test]
fn the_table_lists_every_rpc_the_server_serves() {
    let proto = include_str!("../../../../proto/dmar/v1/dmar.proto");
    let mut service = "";
    let mut listed = 0;
    for line in proto.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.split_whitespace().next().unwrap_or_default();
        } else if let Some(rest) = line.strip_prefix("rpc ")
            && matches!(service, "Control" | "AtsLink")
        {
            // AgentControl is the agent's service, served by the agent.
            let method = rest.split('(').next().unwrap_or_default();
            let path = format!("/dmar.v1.{service}/{method}");
            assert!(need(&path).is_some(), "{path} is not in RPC_TABLE");
            listed += 1;
        }
    }
    let ours = RPC_TABLE.iter().filter(|(p, _)| p.starts_with("/dmar.v1.")).count();
    assert_eq!(listed, ours, "RPC_TABLE lists a method the proto does not have");
    assert_eq!(need("/dmar.v1.Control/Nope"), None);
}

#[test]
fn devices_get_nothing_from_control_and_observers_only_reads() {
    for (path, need) in RPC_TABLE {
        if path.starts_with("/dmar.v1.Control/") {
            assert!(matches!(need, Need::Role(Role::Operator | Role::Observer)), "{path}");
            if let Need::Role(r) = need {
                assert!(!Role::Device.permits(*r), "{path}");
            }
        }
    }
    let observer: Vec<&str> = RPC_TABLE
        .iter()
        .filter(|(_, n)| *n == Need::Role(Role::Observer))
        .map(|(p, _)| p.rsplit('/').next().unwrap_or_default())
        .collect();
    assert_eq!(
        observer,
        [
            "WatchFaults",
            "WatchInterrupts",
            "WatchPageRequests",
            "GetStats",
            "GetPlatform",
            "ReadAcpiTable",
            "WatchUnitInterrupts"
        ]
    );
}

fn tls_access(policy: &str) -> Arc<Access> {
    let pki = dmar_auth::DevPki::generate(&dmar_auth::DevPkiSpec::default()).expect("pki");
    let material = pki.tls_material("dmar-server").expect("material");
    let policy = Policy::from_toml_str(policy).expect("policy");
    Arc::new(Access::new(&Security::mutual_tls(material, policy)))
}

fn as_caller(access: &Access, name: &str) -> Caller {
    let identity = Identity::new(name).expect("name");
    let grant = access.grants.get(&identity).expect("granted").clone();
    Caller { identity, grant }
}

#[test]
fn the_ledger_keeps_ownership_until_released_and_counts_domains() {
    let access = tls_access(
        "[[identity]]\nname = \"a\"\nroles = [\"device\"]\nrequester_ids = [\"00:01.0-00:01.7\"]\nmax_links = 1\n\
         [[identity]]\nname = \"b\"\nroles = [\"device\"]\nrequester_ids = [\"00:01.0-00:01.7\"]\n\
         [[identity]]\nname = \"op\"\nroles = [\"operator\"]\nmax_domains = 1\n",
    );
    let (a, b, op) = (as_caller(&access, "a"), as_caller(&access, "b"), as_caller(&access, "op"));
    let sid = SourceId::new(0, 1, 0);
    let claim = access.claim_link(&a, [sid]).expect("a binds");
    assert_eq!(
        access.claim_link(&a, [SourceId::new(0, 1, 1)]).expect_err("quota").code(),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(access.release(&[sid], false).expect_err("live").code(), tonic::Code::FailedPrecondition);
    drop(claim);
    let err = access.claim_link(&b, [sid]).expect_err("owned");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("belongs to a"), "{}", err.message());
    assert_eq!(access.release(&[sid], false).expect("released"), 1);
    drop(access.claim_link(&b, [sid]).expect("b binds after release"));
    let err = access.claim_link(&b, [SourceId::new(0, 2, 0)]).expect_err("range");
    assert!(err.message().contains("00:02.0"), "{}", err.message());

    let slot = access.reserve_domain(&op).expect("first");
    access.create_domain(slot, || Ok(DomainId(7))).expect("created");
    assert_eq!(access.reserve_domain(&op).expect_err("quota").code(), tonic::Code::ResourceExhausted);
    access.check_domain_owner(&op, DomainId(7)).expect("own domain");
    assert!(access.check_domain_owner(&a, DomainId(7)).is_err());
    let refused = access.destroy_domain(DomainId(7), || Err(tonic::Status::unavailable("driver busy")));
    assert!(refused.is_err());
    access.check_domain_owner(&a, DomainId(7)).expect_err("a failed destroy keeps the owner");
    access.destroy_domain(DomainId(7), || Ok(())).expect("destroyed");
    drop(access.reserve_domain(&op).expect("slot back after destroy"));
    access.reserve_domain(&op).expect("and after an uncommitted slot");
}
