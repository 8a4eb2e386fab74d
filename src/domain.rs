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

/// At most this many memberships (tenant, role) for one user in an import.
pub const MAX_IMPORTED_MEMBERSHIPS: usize = 1_000;

/// Stored for "never expires" among expiries.
const NEVER: UnixSeconds = UnixSeconds::MAX;

/// Everything one user holds, read from the store at one revision.
///
/// Expired roles may be present; every accessor filters them by the time it is given,
/// so a cached snapshot never allows past an expiry.
///
/// Compact because the cache holds one per user (see BENCHMARKS.md for the memory
/// figures). The user's id, then each distinct tenant and role name once, live in one
/// string, each name preceded by a byte that gives its length (names are validated ids
/// of 1–128 ASCII characters). The (tenant, role) pairs, sorted, are the two names'
/// offsets: one `u32` per pair (two 16-bit offsets) while the names fit in 64 KiB, two
/// otherwise. Expiries follow the pairs in the same slice only when some role expires.
/// Two allocations per user besides the snapshot itself: 4 bytes per membership besides
/// the names it does not share.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserRoles {
    /// The revision the snapshot was read at.
    pub revision: Revision,
    /// The revision that set the model in effect when it was read (0: none ever set):
    /// the roles are only ever judged under that model (see `crate::cache::model`).
    pub model_revision: Revision,
    names: Box<str>,
    /// `count` pairs, sorted by (tenant, role); then, if any role expires, `count`
    /// expiries in the same order, each as two words, high first ([`NEVER`] for a role
    /// that does not).
    cells: Box<[u32]>,
    count: u32,
    /// How long the user's id at the start of `names` is.
    user_len: u8,
    /// Whether a pair takes two words (names past 64 KiB).
    wide: bool,
}

impl UserRoles {
    /// The user whose roles these are.
    pub fn user(&self) -> &str {
        &self.names[..usize::from(self.user_len)]
    }

    fn name(&self, start: u32) -> &str {
        let start = start as usize;
        let len = usize::from(self.names.as_bytes()[start]) + 1;
        &self.names[start + 1..start + 1 + len]
    }

    /// Where the `i`th pair's tenant and role names start.
    fn pair(&self, i: usize) -> (u32, u32) {
        if self.wide {
            (self.cells[2 * i], self.cells[2 * i + 1])
        } else {
            (self.cells[i] >> 16, self.cells[i] & 0xffff)
        }
    }

    fn tenant(&self, i: usize) -> &str {
        self.name(self.pair(i).0)
    }

    fn role(&self, i: usize) -> &str {
        self.name(self.pair(i).1)
    }

    fn expires_at(&self, i: usize) -> Option<UnixSeconds> {
        let at = self.count as usize * if self.wide { 2 } else { 1 } + 2 * i;
        let (high, low) = (*self.cells.get(at)?, self.cells[at + 1]);
        let at = (u64::from(high) << 32 | u64::from(low)) as UnixSeconds;
        (at != NEVER).then_some(at)
    }

    /// Whether the `i`th role still allows at `now`.
    fn is_live(&self, i: usize, now: UnixSeconds) -> bool {
        self.expires_at(i).is_none_or(|at| now < at)
    }

    fn indices(&self) -> std::ops::Range<usize> {
        0..self.count as usize
    }

    /// The index of the first pair not below (`tenant`, `role`).
    fn lower_bound(&self, tenant: &str, role: &str) -> usize {
        let (mut low, mut high) = (0, self.count as usize);
        while low < high {
            let mid = (low + high) / 2;
            if (self.tenant(mid), self.role(mid)) < (tenant, role) {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }

    /// Whether the user holds `role` in `tenant` at `now`.
    pub fn allows(&self, tenant: &TenantId, role: &Role, now: UnixSeconds) -> bool {
        self.allows_str(tenant.as_str(), role.as_str(), now)
    }

    /// [`allows`](Self::allows) for already validated text.
    pub fn allows_str(&self, tenant: &str, role: &str, now: UnixSeconds) -> bool {
        let i = self.lower_bound(tenant, role);
        i < self.count as usize
            && (self.tenant(i), self.role(i)) == (tenant, role)
            && self.is_live(i, now)
    }

    /// The authorization object at `now`: tenant id -> sorted live roles, only tenants
    /// with at least one live role.
    pub fn authorization(&self, now: UnixSeconds) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tenant, role, _) in self.live(now) {
            out.entry(tenant.to_owned()).or_default().push(role.to_owned());
        }
        out
    }

    /// Every live role at `now` as (tenant, role, expiry), ordered by tenant and role.
    pub fn live(
        &self,
        now: UnixSeconds,
    ) -> impl Iterator<Item = (&str, &str, Option<UnixSeconds>)> {
        self.indices()
            .filter(move |&i| self.is_live(i, now))
            .map(|i| (self.tenant(i), self.role(i), self.expires_at(i)))
    }

    /// The live roles in `tenant` at `now`, sorted.
    pub fn roles_in<'a>(
        &'a self,
        tenant: &'a str,
        now: UnixSeconds,
    ) -> impl Iterator<Item = &'a str> {
        // Roles are never empty: ("tenant", "") sorts before the tenant's first pair.
        (self.lower_bound(tenant, "")..self.count as usize)
            .take_while(move |&i| self.tenant(i) == tenant)
            .filter(move |&i| self.is_live(i, now))
            .map(|i| self.role(i))
    }

    /// Whether any role (live or not) is held in a tenant `tenant` accepts.
    pub fn names_tenant(&self, mut tenant: impl FnMut(&str) -> bool) -> bool {
        let mut last = None;
        self.indices().any(|i| {
            let start = self.pair(i).0;
            let fresh = last != Some(start);
            last = Some(start);
            fresh && tenant(self.tenant(i))
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
        self.indices()
            .filter(|&i| self.is_live(i, now) && include(self.tenant(i)))
            .filter_map(|i| self.expires_at(i))
            .min()
    }

    /// Builds `user`'s snapshot from `(tenant, role, expires_at)` rows (any order; a
    /// repeated tenant and role keeps its first row). Rows whose names are empty or longer
    /// than 128 bytes, which the store never holds, are left out (they allow nothing); so
    /// is a user id longer than 128 bytes (the snapshot names no user then).
    pub fn from_rows(
        user: &str,
        revision: Revision,
        rows: impl IntoIterator<Item = (String, String, Option<UnixSeconds>)>,
    ) -> Self {
        let fits = |name: &str| (1..=128).contains(&name.len());
        let mut rows: Vec<_> =
            rows.into_iter().filter(|(tenant, role, _)| fits(tenant) && fits(role)).collect();
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        rows.dedup_by(|b, a| (&a.0, &a.1) == (&b.0, &b.1));
        let user = if fits(user) { user } else { "" };
        let mut names = String::with_capacity(
            user.len() + rows.iter().map(|r| r.0.len() + r.1.len() + 2).sum::<usize>(),
        );
        names.push_str(user);
        // Each distinct name once (a role held in several tenants, a tenant with several
        // roles): the offset of its first copy.
        let mut stored: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        let mut push = |name| {
            *stored.entry(name).or_insert_with(|| {
                let start = names.len() as u32;
                names.push(char::from(name.len() as u8 - 1));
                names.push_str(name);
                start
            })
        };
        let pairs: Vec<(u32, u32)> =
            rows.iter().map(|(tenant, role, _)| (push(tenant), push(role))).collect();
        let wide = names.len() > 1 << 16;
        let expiring = rows.iter().any(|row| row.2.is_some());
        let words = if wide { 2 } else { 1 } + if expiring { 2 } else { 0 };
        let mut cells = Vec::with_capacity(rows.len() * words);
        for &(tenant, role) in &pairs {
            if wide {
                cells.extend([tenant, role]);
            } else {
                cells.push(tenant << 16 | role);
            }
        }
        if expiring {
            for row in &rows {
                let at = row.2.unwrap_or(NEVER) as u64;
                cells.extend([(at >> 32) as u32, at as u32]);
            }
        }
        Self {
            revision,
            model_revision: 0,
            // A copy of exactly its length: mimalloc shrinks a block in place, so
            // `into_boxed_str` would keep the capacity's size class.
            names: Box::from(names.as_str()),
            cells: cells.into_boxed_slice(),
            count: rows.len() as u32,
            user_len: user.len() as u8,
            wide,
        }
    }
}

impl UserRoles {
    /// This snapshot, read under the model set at `model_revision`.
    pub fn under_model(mut self, model_revision: Revision) -> Self {
        self.model_revision = model_revision;
        self
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
        let snap = UserRoles::from_rows("u", 1, [("t".into(), "r".into(), Some(100))]);
        let (t, r) = (TenantId::parse("t", "t").unwrap(), Role::parse("r", "r").unwrap());
        assert!(snap.allows(&t, &r, 99));
        assert!(!snap.allows(&t, &r, 100));
        assert!(snap.authorization(100).is_empty());
    }

    #[test]
    fn a_snapshot_reads_back_what_it_was_built_from() {
        let rows = [
            ("beta", "viewer", None),
            ("alpha", "editor", Some(50)),
            ("beta", "admin", None),
            ("alpha", "billing:read", None),
            ("beta", "viewer", Some(10)),
            ("", "ghost", None),
        ];
        let snap = UserRoles::from_rows(
            "user-7",
            7,
            rows.map(|(t, r, e)| (t.to_owned(), r.to_owned(), e)),
        );
        let live: Vec<_> = snap.live(20).collect();
        assert_eq!(
            live,
            [
                ("alpha", "billing:read", None),
                ("alpha", "editor", Some(50)),
                ("beta", "admin", None),
                ("beta", "viewer", None),
            ]
        );
        assert_eq!(snap.live(60).count(), 3, "the editor role expired at 50");
        assert!(snap.allows_str("alpha", "editor", 49));
        assert!(!snap.allows_str("alpha", "editor", 50));
        assert!(!snap.allows_str("alpha", "viewer", 0));
        assert!(!snap.allows_str("", "ghost", 0), "an empty tenant name is left out");
        assert_eq!(snap.roles_in("beta", 0).collect::<Vec<_>>(), ["admin", "viewer"]);
        assert_eq!(snap.roles_in("gamma", 0).count(), 0);
        assert_eq!(snap.earliest_expiry(20), Some(50));
        assert_eq!(snap.earliest_expiry_in(20, |t| t == "beta"), None);
        let mut named = Vec::new();
        assert!(!snap.names_tenant(|t| {
            named.push(t.to_owned());
            false
        }));
        assert_eq!(named, ["alpha", "beta"], "each tenant once");
        assert_eq!(snap.authorization(60).len(), 2);
        assert_eq!(snap.user(), "user-7");
        let long = "r".repeat(128);
        let snap = UserRoles::from_rows(&long, 1, [("t".to_owned(), long.clone(), None)]);
        assert!(snap.allows_str("t", &long, 0));
        assert_eq!(snap.user(), long);
        assert_eq!(UserRoles::from_rows("u", 1, []).live(0).count(), 0);
    }

    #[test]
    fn names_past_64_kib_take_the_wide_encoding() {
        let tenant = |i: usize| format!("{i:04}{}", "t".repeat(100));
        let rows = (0..700).map(|i| (tenant(i), "viewer".to_owned(), (i == 699).then_some(50)));
        let snap = UserRoles::from_rows("u", 1, rows);
        assert!(snap.wide, "{} bytes of names", snap.names.len());
        assert!(snap.allows_str(&tenant(0), "viewer", 0));
        assert!(snap.allows_str(&tenant(698), "viewer", 100));
        assert!(snap.allows_str(&tenant(699), "viewer", 49));
        assert!(!snap.allows_str(&tenant(699), "viewer", 50));
        assert!(!snap.allows_str(&tenant(699), "editor", 0));
        assert_eq!(snap.roles_in(&tenant(350), 0).collect::<Vec<_>>(), ["viewer"]);
        assert_eq!(snap.live(60).count(), 699);
        assert_eq!(snap.earliest_expiry(0), Some(50));
    }
}
