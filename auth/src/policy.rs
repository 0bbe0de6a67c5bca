//! The operator-written policy: which identity holds which roles, which requester ids a
//! device identity may bind, and each identity's quotas.
//!
//! This module owns the TOML format (parsing, its rules, its error messages, rendering) and
//! the lookup a service does per call ([`Policy::grant`]). It does not enforce quotas on
//! domains, frames or links (the server counts those) and does not know RPC methods (the
//! services map each method to a [`Role`]). Connection counts are enforced at accept time by
//! [`crate::accept::ConnectionLimiter`].
//!
//! The format, with every optional field shown:
//!
//! ```toml
//! # identities are certificate common names
//! [[identity]]
//! name = "operator"
//! roles = ["operator"]
//! max_domains = 1024        # optional; see Quotas::DEFAULT
//! max_frames = 262144       # page-table frames this identity may hold
//! max_connections = 64
//!
//! [[identity]]
//! name = "agent-0"
//! roles = ["device"]
//! requester_ids = ["00:01.0-00:01.7", "02:00.0"]   # inclusive ranges or single ids
//! max_links = 4
//! max_connections = 8
//!
//! [agent_control]           # optional and empty: an agent's control port trusts the
//!                           # identities named by the agent's own flag, not this file
//! ```
//!
//! Unknown fields, repeated names, an identity without roles, the device role without
//! `requester_ids`, `requester_ids` without the device role and backwards ranges are
//! refused. Error messages name the file, the line and column and, at most, the offending
//! key: never a value, since a mistyped path may point at a private key.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use dmar_vtd::SourceId;
use serde::Deserialize;

use crate::identity::Identity;
use crate::requester::{RequesterIdRange, RequesterIdSet};
use crate::role::{Role, Roles};

/// The largest policy file [`Policy::load`] reads: a policy is a few kilobytes, and a bound
/// keeps a wrong path (a device, a huge log) from being read into memory.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// Limits on what one identity may hold, summed over all its connections.
///
/// Quotas that do not apply to an identity's roles are ignored (an observer's
/// `max_domains` limits nothing, since it cannot create domains).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quotas {
    /// Protection domains the identity may have created and not destroyed.
    pub max_domains: u32,
    /// Page-table frames (4 KiB each) the identity's domains may hold: bounds the host
    /// memory one tenant can make the driver allocate.
    pub max_frames: u64,
    /// Concurrent TLS connections, counted at accept time.
    pub max_connections: u32,
    /// Concurrent ATS link streams (device role).
    pub max_links: u32,
}

impl Quotas {
    /// The defaults for a field a policy entry leaves out, and every quota of the permissive
    /// policy: 1024 domains, 262144 frames (1 GiB of page tables), 64 connections, 4 links.
    /// Generous enough for the load generator, small enough that one identity cannot
    /// exhaust a server's domain ids (65535) or host memory by accident.
    pub const DEFAULT: Quotas = Quotas { max_domains: 1024, max_frames: 262_144, max_connections: 64, max_links: 4 };
}

impl Default for Quotas {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What the policy grants one identity.
///
/// Plain data so that services and tests can build grants directly; [`Policy::new`] checks
/// the rules that tie the fields together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The roles held.
    pub roles: Roles,
    /// The requester ids the identity may bind on the ATS link; empty unless it holds
    /// [`Role::Device`].
    pub requester_ids: RequesterIdSet,
    /// The identity's limits.
    pub quotas: Quotas,
}

impl Grant {
    /// True when `role` itself was granted. Use [`Grant::permits`] to ask whether a call
    /// that requires a role is allowed.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(role)
    }

    /// True when a call that requires `required` is allowed: an operator may also do what
    /// an observer does (see [`Role::permits`]).
    pub fn permits(&self, required: Role) -> bool {
        self.roles.permits(required)
    }

    /// True when the identity may bind `sid` on an ATS link: it holds the device role and
    /// `sid` is in its ranges.
    pub fn may_bind(&self, sid: SourceId) -> bool {
        self.has(Role::Device) && self.requester_ids.contains(sid)
    }
}

pub use dmar_process::Location;

/// Why a policy could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be opened or read.
    #[error("cannot read policy file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_POLICY_BYTES`].
    #[error("policy file {} is larger than {limit} bytes", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The file is not UTF-8 text, so it cannot be TOML.
    #[error("policy file {} is not utf-8 text", .path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// The text is not valid TOML, has an unknown or mistyped field, or breaks a rule.
    #[error("{origin}{}: {message}", .location.map(|l| format!(":{}:{}", l.line, l.column)).unwrap_or_default())]
    Invalid {
        /// The file's path, or `policy` for text or grants given directly.
        origin: String,
        /// Where in the file, when known.
        location: Option<Location>,
        /// What is wrong, naming at most the offending key.
        message: String,
    },
}

/// The identities a service knows and what each may do.
#[derive(Clone, Debug)]
pub struct Policy {
    entries: Vec<(Identity, Grant)>,
    index: HashMap<Identity, usize>,
    permissive: bool,
}

impl Policy {
    /// Builds a policy from grants, checking the same rules as the file: names unique,
    /// roles not empty, device role if and only if requester ids.
    pub fn new(entries: impl IntoIterator<Item = (Identity, Grant)>) -> Result<Self, PolicyError> {
        let entries: Vec<(Identity, Grant)> = entries.into_iter().collect();
        Self::checked(entries).map_err(|(_, message)| PolicyError::Invalid {
            origin: "policy".to_owned(),
            location: None,
            message,
        })
    }

    /// The policy for insecure mode: one implicit identity, [`Identity::insecure`], holding
    /// every role and every requester id with the default quotas. Without TLS there is no
    /// name to check, so this makes "anyone who reaches the port owns everything" explicit
    /// instead of a missing check.
    pub fn permissive() -> Self {
        let grant = Grant { roles: Roles::ALL, requester_ids: RequesterIdSet::all(), quotas: Quotas::DEFAULT };
        let id = Identity::insecure();
        let index = HashMap::from([(id.clone(), 0)]);
        Self { entries: vec![(id, grant)], index, permissive: true }
    }

    /// True for [`Policy::permissive`]: lets a service log loudly that it is insecure.
    pub fn is_permissive(&self) -> bool {
        self.permissive
    }

    /// Parses policy text. Errors are located in the text and name it `policy`.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        Self::parse(text, "policy")
    }

    /// Reads and parses the policy file at `path`, at most [`MAX_POLICY_BYTES`] long.
    /// Errors name the file and a line and column in it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let read_err = |source| PolicyError::Read { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_POLICY_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
        if bytes.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge { path: path.to_owned(), limit: MAX_POLICY_BYTES });
        }
        let text = String::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8 { path: path.to_owned() })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// What `identity` may do, or `None` when the policy does not know it (every call but
    /// health must then be refused).
    pub fn grant(&self, identity: &Identity) -> Option<&Grant> {
        self.index.get(identity).map(|&i| &self.entries[i].1)
    }

    /// The identities and their grants, in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&Identity, &Grant)> {
        self.entries.iter().map(|(id, g)| (id, g))
    }

    /// How many identities the policy names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the policy names no identity (only possible through [`Policy::new`]).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Renders the policy in the file format, quotas written only where they differ from
    /// [`Quotas::DEFAULT`]; [`Policy::from_toml_str`] reads it back to an equal policy.
    pub fn to_toml_string(&self) -> String {
        let d = Quotas::DEFAULT;
        let mut out = String::new();
        out.push_str("# dmar policy: identities are certificate common names.\n");
        let _ = writeln!(
            out,
            "# Default quotas: max_domains = {}, max_frames = {}, max_connections = {}, max_links = {}.",
            d.max_domains, d.max_frames, d.max_connections, d.max_links
        );
        for (id, grant) in &self.entries {
            out.push_str("\n[[identity]]\n");
            let _ = writeln!(out, "name = \"{id}\"");
            let roles: Vec<String> = grant.roles.iter().map(|r| format!("\"{r}\"")).collect();
            let _ = writeln!(out, "roles = [{}]", roles.join(", "));
            if !grant.requester_ids.is_empty() {
                let ranges: Vec<String> = grant.requester_ids.ranges().iter().map(|r| format!("\"{r}\"")).collect();
                let _ = writeln!(out, "requester_ids = [{}]", ranges.join(", "));
            }
            let q = grant.quotas;
            if q.max_domains != d.max_domains {
                let _ = writeln!(out, "max_domains = {}", q.max_domains);
            }
            if q.max_frames != d.max_frames {
                let _ = writeln!(out, "max_frames = {}", q.max_frames);
            }
            if q.max_connections != d.max_connections {
                let _ = writeln!(out, "max_connections = {}", q.max_connections);
            }
            if q.max_links != d.max_links {
                let _ = writeln!(out, "max_links = {}", q.max_links);
            }
        }
        out
    }

    fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let invalid = |offset: Option<usize>, message: String| PolicyError::Invalid {
            origin: origin.to_owned(),
            location: offset.map(|o| Location::of(text, o)),
            message,
        };
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| invalid(e.span().map(|s| s.start), crate::de::scrub(e.message())))?;
        if file.identity.is_empty() {
            return Err(invalid(None, "the policy lists no [[identity]]: it would refuse everyone".to_owned()));
        }
        let spans: Vec<usize> = file.identity.iter().map(|e| e.span().start).collect();
        let entries = file.identity.into_iter().map(|e| e.into_inner().into_grant()).collect();
        Self::checked(entries).map_err(|(i, message)| invalid(spans.get(i).copied(), message))
    }

    /// Applies the rules; on failure returns the offending entry's index and the message.
    fn checked(entries: Vec<(Identity, Grant)>) -> Result<Self, (usize, String)> {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, (id, grant)) in entries.iter().enumerate() {
            if let Some(first) = index.insert(id.clone(), i) {
                return Err((i, format!("identity[{i}]: the name is already used by identity[{first}]")));
            }
            if grant.roles.is_empty() {
                return Err((i, format!("identity[{i}]: roles must not be empty")));
            }
            let device = grant.roles.contains(Role::Device);
            if device && grant.requester_ids.is_empty() {
                return Err((i, format!("identity[{i}]: the device role needs requester_ids")));
            }
            if !device && !grant.requester_ids.is_empty() {
                return Err((i, format!("identity[{i}]: requester_ids are only for the device role")));
            }
        }
        Ok(Self { entries, index, permissive: false })
    }
}

/// The file's top level.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    identity: Vec<toml::Spanned<FileIdentity>>,
    #[serde(default)]
    #[allow(dead_code)] // accepted so the section can be written; see the module docs
    agent_control: Option<FileAgentControl>,
}

/// `[agent_control]`: reserved, and must be empty.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgentControl {}

/// One `[[identity]]` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIdentity {
    name: Identity,
    roles: Vec<Role>,
    #[serde(default)]
    requester_ids: Vec<RequesterIdRange>,
    max_domains: Option<u32>,
    max_frames: Option<u64>,
    max_connections: Option<u32>,
    max_links: Option<u32>,
}

impl FileIdentity {
    fn into_grant(self) -> (Identity, Grant) {
        let d = Quotas::DEFAULT;
        let quotas = Quotas {
            max_domains: self.max_domains.unwrap_or(d.max_domains),
            max_frames: self.max_frames.unwrap_or(d.max_frames),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_links: self.max_links.unwrap_or(d.max_links),
        };
        let grant = Grant {
            roles: self.roles.into_iter().collect(),
            requester_ids: RequesterIdSet::from_ranges(self.requester_ids),
            quotas,
        };
        (self.name, grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
# identities are certificate common names
[[identity]]
name = "operator"
roles = ["operator"]
max_domains = 1024        # quotas, optional, defaults documented
max_frames = 262144       # page-table frames this identity may hold
max_connections = 64
[[identity]]
name = "observer"
roles = ["observer"]
[[identity]]
name = "agent-0"
roles = ["device"]
requester_ids = ["00:01.0-00:01.7", "02:00.0"]   # inclusive ranges or single ids
max_links = 4
max_connections = 8
[agent_control]
"#;

    fn id(s: &str) -> Identity {
        Identity::new(s).unwrap()
    }

    fn err(text: &str) -> String {
        Policy::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example_parses() {
        let p = Policy::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(p.len(), 3);
        assert!(!p.is_permissive());
        let op = p.grant(&id("operator")).unwrap();
        assert!(op.has(Role::Operator) && !op.has(Role::Observer) && op.permits(Role::Observer));
        assert!(!op.may_bind(SourceId::new(0, 1, 0)));
        assert_eq!(op.quotas, Quotas::DEFAULT);
        let obs = p.grant(&id("observer")).unwrap();
        assert!(obs.permits(Role::Observer) && !obs.permits(Role::Operator) && !obs.permits(Role::Device));
        let agent = p.grant(&id("agent-0")).unwrap();
        assert!(agent.may_bind(SourceId::new(0, 1, 0)) && agent.may_bind(SourceId::new(0, 1, 7)));
        assert!(agent.may_bind(SourceId::new(2, 0, 0)));
        assert!(!agent.may_bind(SourceId::new(0, 2, 0)) && !agent.may_bind(SourceId::new(2, 0, 1)));
        assert_eq!(agent.quotas, Quotas { max_connections: 8, ..Quotas::DEFAULT });
        assert!(!agent.permits(Role::Observer));
        assert!(p.grant(&id("stranger")).is_none());
        let names: Vec<&str> = p.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(names, ["operator", "observer", "agent-0"]);
    }

    #[test]
    fn rendering_reads_back_to_the_same_policy() {
        let p = Policy::from_toml_str(EXAMPLE).unwrap();
        let text = p.to_toml_string();
        let q = Policy::from_toml_str(&text).unwrap();
        assert_eq!(p.entries, q.entries, "{text}");
        let permissive = Policy::from_toml_str(&Policy::permissive().to_toml_string()).unwrap();
        assert_eq!(permissive.entries, Policy::permissive().entries);
    }

    #[test]
    fn permissive_grants_the_insecure_identity_everything() {
        let p = Policy::permissive();
        assert!(p.is_permissive());
        let g = p.grant(&Identity::insecure()).unwrap();
        assert!(Role::ALL.iter().all(|r| g.has(*r)));
        assert!(g.may_bind(SourceId(0)) && g.may_bind(SourceId(u16::MAX)));
        assert_eq!(g.quotas, Quotas::DEFAULT);
        assert!(p.grant(&id("operator")).is_none());
    }

    #[test]
    fn unknown_fields_are_refused_with_their_key_and_line() {
        let e = err("[[identity]]\nname = \"a\"\nroles = [\"operator\"]\nmax_domain = 3\n");
        assert!(e.starts_with("policy:4:1: unknown field `max_domain`"), "{e}");
        let e = err("[[identity]]\nname = \"a\"\nroles = [\"operator\"]\n[server]\nport = 1\n");
        assert!(e.contains("unknown field `server`"), "{e}");
        let e = err("[[identity]]\nname = \"a\"\nroles = [\"operator\"]\n[agent_control]\ntrust = [\"x\"]\n");
        assert!(e.contains("unknown field `trust`"), "{e}");
    }

    #[test]
    fn each_rule_is_enforced() {
        let cases = [
            (
                "[[identity]]\nname = \"a\"\nroles = [\"operator\"]\n[[identity]]\nname = \"a\"\nroles = [\"observer\"]\n",
                "policy:4:1: identity[1]: the name is already used by identity[0]",
            ),
            ("[[identity]]\nname = \"a\"\nroles = []\n", "policy:1:1: identity[0]: roles must not be empty"),
            ("[[identity]]\nname = \"a\"\nroles = [\"device\"]\n", "identity[0]: the device role needs requester_ids"),
            (
                "[[identity]]\nname = \"a\"\nroles = [\"device\"]\nrequester_ids = []\n",
                "the device role needs requester_ids",
            ),
            (
                "[[identity]]\nname = \"a\"\nroles = [\"observer\"]\nrequester_ids = [\"00:01.0\"]\n",
                "identity[0]: requester_ids are only for the device role",
            ),
            (
                "[[identity]]\nname = \"a\"\nroles = [\"device\"]\nrequester_ids = [\"00:01.7-00:01.0\"]\n",
                "policy:4:18: invalid requester id range: the first id is after the last",
            ),
            ("[[identity]]\nname = \"a b\"\nroles = [\"observer\"]\n", "policy:2:8: an identity must be"),
            ("[[identity]]\nname = \"a\"\nroles = [\"root\"]\n", "policy:3:10: unknown role"),
            ("[[identity]]\nroles = [\"observer\"]\n", "missing field `name`"),
            ("[[identity]]\nname = \"a\"\n", "missing field `roles`"),
            (
                "[[identity]]\nname = \"a\"\nroles = [\"observer\"]\nmax_links = -1\n",
                "policy:4:13: invalid value: integer, expected u32",
            ),
            ("", "the policy lists no [[identity]]"),
            ("[agent_control]\n", "the policy lists no [[identity]]"),
            ("identity = 3\n", "invalid type: integer, expected a sequence"),
            ("[[identity]\n", "policy:1:"),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn errors_never_echo_values() {
        const SECRET: &str = "hunter2SECRET";
        let cases = [
            format!("[[identity]]\nname = \"{SECRET}!\"\nroles = [\"observer\"]\n"),
            format!("[[identity]]\nname = \"a\"\nroles = [\"{SECRET}\"]\n"),
            format!("[[identity]]\nname = \"a\"\nroles = [\"device\"]\nrequester_ids = [\"{SECRET}\"]\n"),
            format!("[[identity]]\nname = \"a\"\nroles = [\"observer\"]\nmax_frames = \"{SECRET}\"\n"),
            format!("identity = \"{SECRET}\"\n"),
            format!("agent_control = \"{SECRET}\"\n"),
            format!("[[identity]]\nname = \"a\"\nroles = \"{SECRET}\"\n"),
            format!("[[identity]]\nname = [\"{SECRET}\"]\nroles = [\"observer\"]\n"),
            format!("-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n"),
            format!("{SECRET}\n"),
            format!("x = \"{SECRET}\n"),
            format!("[[identity]]\nname = \"a\"\nroles = [\"observer\"]\n{SECRET} = 1\n"),
        ];
        for text in cases {
            let e = err(&text);
            // The last case names the key itself, which is allowed: it is the offending key.
            if text.contains(&format!("{SECRET} = 1")) {
                assert!(e.contains("unknown field"), "{e}");
                continue;
            }
            assert!(!e.contains(SECRET), "{text:?} leaked into {e:?}");
        }
    }

    #[test]
    fn programmatic_policies_follow_the_same_rules() {
        let device = Grant {
            roles: [Role::Device].into_iter().collect(),
            requester_ids: RequesterIdSet::empty(),
            quotas: Quotas::DEFAULT,
        };
        let e = Policy::new([(id("a"), device)]).unwrap_err().to_string();
        assert_eq!(e, "policy: identity[0]: the device role needs requester_ids");
        assert!(Policy::new([]).unwrap().is_empty());
    }

    #[test]
    fn load_names_the_file_and_bounds_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(Policy::load(&path).unwrap().len(), 3);

        std::fs::write(&path, "[[identity]]\nname = \"a\"\n").unwrap();
        let e = Policy::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:1:1: missing field `roles`", path.display())), "{e}");

        std::fs::write(&path, vec![b'#'; MAX_POLICY_BYTES as usize + 1]).unwrap();
        assert!(matches!(Policy::load(&path), Err(PolicyError::TooLarge { .. })));

        std::fs::write(&path, [0xff, 0xfe, b'\n']).unwrap();
        assert!(matches!(Policy::load(&path), Err(PolicyError::NotUtf8 { .. })));

        let e = Policy::load(dir.path().join("missing.toml")).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.toml"));
    }
}
