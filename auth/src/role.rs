//! What kind of peer an identity is: the closed set of [`Role`]s and a small set type.
//!
//! This module owns the names of the roles and what each one means in words. It does not map
//! RPC methods to roles: that table lives with the services that define the methods (the
//! server and the agent), because only they know their methods. The policy file
//! ([`crate::policy`]) says which identity holds which roles.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A role an identity can hold.
///
/// Roles are coarse on purpose: an IOMMU's job is isolation, and a reviewer must be able to
/// read a policy file and see who can touch what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The whole `Control` service: domains, attach/detach, maps, flushes, translations,
    /// raw registers and host memory, invalidation and interrupt entries, page-request
    /// responses, and everything an [`Role::Observer`] may do. Whoever holds it controls
    /// every tenant's memory.
    Operator,
    /// Statistics and the watch streams (faults, interrupts, page requests): nothing that
    /// changes state and nothing that reads host memory or registers.
    Observer,
    /// The ATS link only, and only for the requester ids the policy lists for the identity:
    /// what a device agent needs to bind its functions and translate.
    Device,
}

impl Role {
    /// Every role, in declaration order.
    pub const ALL: [Role; 3] = [Role::Operator, Role::Observer, Role::Device];

    /// The spelling in the policy file and in messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Observer => "observer",
            Role::Device => "device",
        }
    }

    /// True when holding `self` allows what `required` allows: each role permits itself,
    /// and an operator may also do what an observer does. Nothing implies
    /// [`Role::Device`]: binding requester ids needs the device role and its ranges.
    pub const fn permits(self, required: Role) -> bool {
        matches!(
            (self, required),
            (Role::Operator, Role::Operator | Role::Observer)
                | (Role::Observer, Role::Observer)
                | (Role::Device, Role::Device)
        )
    }

    const fn bit(self) -> u8 {
        match self {
            Role::Operator => 1,
            Role::Observer => 2,
            Role::Device => 4,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a role. Names the accepted spellings, not the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown role, expected one of operator, observer, device")]
pub struct ParseRoleError;

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or(ParseRoleError)
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(crate::de::TextVisitor::new("a role (operator, observer or device)", |s| {
            s.parse::<Role>().map_err(|e| e.to_string())
        }))
    }
}

/// A set of roles, `Copy` and one byte, so a grant check is a mask test.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    /// No roles.
    pub const EMPTY: Roles = Roles(0);
    /// Every role: what the permissive policy grants.
    pub const ALL: Roles = Roles(1 | 2 | 4);

    /// True when `role` itself is in the set.
    pub const fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// True when some role in the set [permits](Role::permits) `required`.
    pub fn permits(self, required: Role) -> bool {
        self.iter().any(|r| r.permits(required))
    }

    /// Adds `role`.
    pub fn insert(&mut self, role: Role) {
        self.0 |= role.bit();
    }

    /// True when the set holds no role.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The roles in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.contains(*r))
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Self {
        let mut roles = Roles::EMPTY;
        for role in iter {
            roles.insert(role);
        }
        roles
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_text() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert_eq!("Operator".parse::<Role>(), Err(ParseRoleError));
        assert_eq!("root".parse::<Role>(), Err(ParseRoleError));
    }

    #[test]
    fn operator_implies_observer_and_nothing_implies_device() {
        assert!(Role::Operator.permits(Role::Observer));
        assert!(!Role::Observer.permits(Role::Operator));
        assert!(!Role::Operator.permits(Role::Device));
        assert!(!Role::Device.permits(Role::Observer));
        for role in Role::ALL {
            assert!(role.permits(role));
        }
    }

    #[test]
    fn sets_hold_what_was_inserted() {
        let set: Roles = [Role::Device, Role::Observer, Role::Device].into_iter().collect();
        assert!(set.contains(Role::Device) && set.contains(Role::Observer) && !set.contains(Role::Operator));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![Role::Observer, Role::Device]);
        assert!(Roles::EMPTY.is_empty() && !set.is_empty());
        assert!(Roles::ALL.iter().eq(Role::ALL));
        assert!(!set.permits(Role::Operator));
    }
}
