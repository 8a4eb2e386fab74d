//! Validated identifiers and the membership snapshot a role check is decided on.
//!
//! Once a [`TenantId`], [`UserId`] or [`Role`] exists it is valid; nothing deeper
//! re-checks strings. Comparison is exact and case-sensitive, with no normalization.

use std::{collections::BTreeMap, fmt, time::SystemTime};

use crate::error::Error;

/// A store revision: grows by one with every committed write, in commit order.
pub type Revision = u64;

/// Unix time in whole seconds, the granularity of role expiry.
pub type UnixSeconds = i64;

/// The current unix time in whole seconds (rounded down).
pub fn now_unix() -> UnixSeconds {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The current unix time in milliseconds.
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $max:expr, $allowed:expr, $rule:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Maximum length in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates `value` as this identifier; `field` names it in the error.
            pub fn parse(field: &str, value: &str) -> Result<Self, Error> {
                let ok = !value.is_empty()
                    && value.len() <= Self::MAX_LEN
                    && value.bytes().all($allowed);
                if ok {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(Error::invalid(field, format!("must be {}", $rule)))
                }
            }

            /// Wraps a value read back from the store, which only holds validated ids.
            #[allow(dead_code)]
            pub(crate) fn trusted(value: String) -> Self {
                Self(value)
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

identifier!(
    /// A tenant id: 1–64 chars of `A-Z a-z 0-9 . _ -`.
    TenantId,
    64,
    |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'),
    "1-64 characters of A-Z a-z 0-9 . _ -"
);

identifier!(
    /// A user id: 1–128 chars of printable ASCII without space (`!`..`~`).
    UserId,
    128,
    |b: u8| b.is_ascii_graphic(),
    "1-128 printable ASCII characters without spaces"
);

identifier!(
    /// A role name: 1–64 chars of `A-Z a-z 0-9 . _ : -`.
    Role,
    64,
    |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'),
    "1-64 characters of A-Z a-z 0-9 . _ : -"
);

/// At most this many roles in one Grant, Revoke or SetRoles.
pub const MAX_ROLES_PER_WRITE: usize = 32;

/// One role a user holds in a tenant, with its expiry (`None`: never expires).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldRole {
    /// The role.
    pub role: String,
    /// Unix seconds at which the role stops allowing.
    pub expires_at: Option<UnixSeconds>,
}

impl HeldRole {
    /// Whether the role still allows at `now`.
    pub fn is_live(&self, now: UnixSeconds) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// Everything one user holds, read from the store at one revision.
///
/// Expired roles may be present; every accessor filters them by the time it is given,
/// so a cached snapshot never allows past an expiry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserRoles {
    /// The revision the snapshot was read at.
    pub revision: Revision,
    /// Tenant id -> roles held there, sorted by role.
    pub tenants: BTreeMap<String, Vec<HeldRole>>,
}

impl UserRoles {
    /// Whether the user holds `role` in `tenant` at `now`.
    pub fn allows(&self, tenant: &TenantId, role: &Role, now: UnixSeconds) -> bool {
        self.tenants.get(tenant.as_str()).is_some_and(|roles| {
            roles
                .binary_search_by(|held| held.role.as_str().cmp(role.as_str()))
                .is_ok_and(|i| roles[i].is_live(now))
        })
    }

    /// The authorization object at `now`: tenant id -> sorted live roles, only tenants
    /// with at least one live role.
    pub fn authorization(&self, now: UnixSeconds) -> BTreeMap<String, Vec<String>> {
        self.tenants
            .iter()
            .filter_map(|(tenant, roles)| {
                let live: Vec<String> = roles
                    .iter()
                    .filter(|held| held.is_live(now))
                    .map(|held| held.role.clone())
                    .collect();
                (!live.is_empty()).then(|| (tenant.clone(), live))
            })
            .collect()
    }

    /// The earliest expiry among roles still live at `now`, if any expires.
    pub fn earliest_expiry(&self, now: UnixSeconds) -> Option<UnixSeconds> {
        self.earliest_expiry_in(now, |_| true)
    }

    /// The earliest expiry among roles live at `now` in tenants `include` accepts.
    pub fn earliest_expiry_in(
        &self,
        now: UnixSeconds,
        include: impl Fn(&str) -> bool,
    ) -> Option<UnixSeconds> {
        self.tenants
            .iter()
            .filter(|(tenant, _)| include(tenant))
            .flat_map(|(_, roles)| roles)
            .filter(|held| held.is_live(now))
            .filter_map(|held| held.expires_at)
            .min()
    }

    /// Builds a snapshot from `(tenant, role, expires_at)` rows sorted by tenant, role.
    pub fn from_rows(
        revision: Revision,
        rows: impl IntoIterator<Item = (String, String, Option<UnixSeconds>)>,
    ) -> Self {
        let mut tenants: BTreeMap<String, Vec<HeldRole>> = BTreeMap::new();
        for (tenant, role, expires_at) in rows {
            tenants.entry(tenant).or_default().push(HeldRole { role, expires_at });
        }
        for roles in tenants.values_mut() {
            roles.sort_by(|a, b| a.role.cmp(&b.role));
        }
        Self { revision, tenants }
    }
}

/// Validates a list of role names: at most [`MAX_ROLES_PER_WRITE`], each a [`Role`];
/// returns them sorted and deduplicated.
pub fn parse_roles(field: &str, roles: &[String]) -> Result<Vec<Role>, Error> {
    if roles.len() > MAX_ROLES_PER_WRITE {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_ROLES_PER_WRITE} roles, got {}", roles.len()),
        ));
    }
    let mut parsed =
        roles.iter().map(|role| Role::parse(field, role)).collect::<Result<Vec<_>, _>>()?;
    parsed.sort();
    parsed.dedup();
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_enforce_their_limits() {
        assert!(TenantId::parse("tenant_id", &"a".repeat(64)).is_ok());
        assert!(TenantId::parse("tenant_id", &"a".repeat(65)).is_err());
        assert!(TenantId::parse("tenant_id", "a:b").is_err());
        assert!(Role::parse("role", "billing:read").is_ok());
        assert!(UserId::parse("user_id", &"~".repeat(128)).is_ok());
        assert!(UserId::parse("user_id", "a b").is_err());
        assert!(UserId::parse("user_id", "").is_err());
        assert!(UserId::parse("user_id", "é").is_err());
    }

    #[test]
    fn expiry_is_exclusive_to_the_second() {
        let snap = UserRoles::from_rows(1, [("t".into(), "r".into(), Some(100))]);
        let (t, r) = (TenantId::parse("t", "t").unwrap(), Role::parse("r", "r").unwrap());
        assert!(snap.allows(&t, &r, 99));
        assert!(!snap.allows(&t, &r, 100));
        assert!(snap.authorization(100).is_empty());
    }
}
