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
                Self::validate(field, value).map(|()| Self(value.to_owned()))
            }

            /// Checks `value` without copying it (hot paths that only compare).
            pub fn validate(field: &str, value: &str) -> Result<(), Error> {
                let ok = !value.is_empty()
                    && value.len() <= Self::MAX_LEN
                    && value.bytes().all($allowed);
                if ok { Ok(()) } else { Err(Error::invalid(field, format!("must be {}", $rule))) }
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

        // Lookups by `&str` (the derived `Hash` and `Eq` are those of the string).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
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

/// Where a name lies in [`UserRoles`]' shared string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

/// One role a user holds in a tenant, with its expiry (`None`: never expires).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    tenant: Span,
    role: Span,
    expires_at: Option<UnixSeconds>,
}

impl Held {
    /// Whether the role still allows at `now`.
    fn is_live(&self, now: UnixSeconds) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// Everything one user holds, read from the store at one revision.
///
/// Expired roles may be present; every accessor filters them by the time it is given,
/// so a cached snapshot never allows past an expiry.
///
/// Compact because the cache holds one per user: every tenant and role name lives in one
/// string, and the (tenant, role, expiry) triples, sorted, in one slice — two allocations
/// per user however many memberships it has (see BENCHMARKS.md for the memory figures).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserRoles {
    /// The revision the snapshot was read at.
    pub revision: Revision,
    names: Box<str>,
    held: Box<[Held]>,
}

impl UserRoles {
    fn name(&self, span: Span) -> &str {
        &self.names[span.start as usize..(span.start + span.len) as usize]
    }

    /// Whether the user holds `role` in `tenant` at `now`.
    pub fn allows(&self, tenant: &TenantId, role: &Role, now: UnixSeconds) -> bool {
        self.allows_str(tenant.as_str(), role.as_str(), now)
    }

    /// [`allows`](Self::allows) for already validated text.
    pub fn allows_str(&self, tenant: &str, role: &str, now: UnixSeconds) -> bool {
        let key = (tenant, role);
        self.held
            .binary_search_by(|held| (self.name(held.tenant), self.name(held.role)).cmp(&key))
            .is_ok_and(|i| self.held[i].is_live(now))
    }

    /// The authorization object at `now`: tenant id -> sorted live roles, only tenants
    /// with at least one live role.
    pub fn authorization(&self, now: UnixSeconds) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for held in self.held.iter().filter(|held| held.is_live(now)) {
            let role = self.name(held.role).to_owned();
            out.entry(self.name(held.tenant).to_owned()).or_default().push(role);
        }
        out
    }

    /// Every live role at `now` as (tenant, role, expiry), ordered by tenant and role.
    pub fn live(
        &self,
        now: UnixSeconds,
    ) -> impl Iterator<Item = (&str, &str, Option<UnixSeconds>)> {
        self.held
            .iter()
            .filter(move |held| held.is_live(now))
            .map(|held| (self.name(held.tenant), self.name(held.role), held.expires_at))
    }

    /// The live roles in `tenant` at `now`, sorted.
    pub fn roles_in<'a>(
        &'a self,
        tenant: &'a str,
        now: UnixSeconds,
    ) -> impl Iterator<Item = &'a str> {
        let start = self.held.partition_point(|held| self.name(held.tenant) < tenant);
        self.held[start..]
            .iter()
            .take_while(move |held| self.name(held.tenant) == tenant)
            .filter(move |held| held.is_live(now))
            .map(|held| self.name(held.role))
    }

    /// Whether any role (live or not) is held in a tenant `tenant` accepts.
    pub fn names_tenant(&self, mut tenant: impl FnMut(&str) -> bool) -> bool {
        let mut last = None;
        self.held.iter().any(|held| {
            let name = self.name(held.tenant);
            let fresh = last != Some(name);
            last = Some(name);
            fresh && tenant(name)
        })
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
        self.held
            .iter()
            .filter(|held| held.is_live(now) && include(self.name(held.tenant)))
            .filter_map(|held| held.expires_at)
            .min()
    }

    /// Builds a snapshot from `(tenant, role, expires_at)` rows (any order; a repeated
    /// tenant and role keeps its first row).
    pub fn from_rows(
        revision: Revision,
        rows: impl IntoIterator<Item = (String, String, Option<UnixSeconds>)>,
    ) -> Self {
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        rows.dedup_by(|b, a| (&a.0, &a.1) == (&b.0, &b.1));
        let mut names = String::with_capacity(rows.iter().map(|r| r.0.len() + r.1.len()).sum());
        let mut push = |name: &str| {
            let span = Span { start: names.len() as u32, len: name.len() as u32 };
            names.push_str(name);
            span
        };
        let mut held = Vec::with_capacity(rows.len());
        let mut last_tenant: Option<(&str, Span)> = None;
        for (tenant, role, expires_at) in &rows {
            // A tenant's rows are adjacent: store its name once.
            let tenant_span = match last_tenant {
                Some((name, span)) if name == tenant => span,
                _ => push(tenant),
            };
            last_tenant = Some((tenant, tenant_span));
            held.push(Held { tenant: tenant_span, role: push(role), expires_at: *expires_at });
        }
        Self { revision, names: names.into_boxed_str(), held: held.into_boxed_slice() }
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
