//! Bulk import and export: what both backends share.
//!
//! An import arrives in batches of whole users ([`ImportBatch`]). Each backend applies a
//! batch in one transaction that takes the revision row first (as every write does) and
//! bumps it once: every membership of the batch commits at that one revision, with one
//! history row per user and tenant it touched, and every touched user is announced on
//! the change feed. So a reader sees a user's import entirely or not at all, and every
//! cache (this process's, a replica's, a follower's) forgets exactly the touched users.
//!
//! A batch is idempotent: merging (Grant) the same roles again, or replacing (SetRoles)
//! with the same roles, leaves the same rows, so an import cut short and run again ends
//! as one uninterrupted run would.
//!
//! Which users of a batch are applied is decided here ([`sort_out`]), from the tenants
//! the batch names as the backend found them under the revision lock.
//!
//! An export reads every live membership in one snapshot (a read transaction), in pages
//! of [`EXPORT_PAGE`] rows in `(user, tenant, role)` order, folded into users here
//! ([`Folder`]).

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
};

use crate::{
    domain::{Revision, UnixSeconds},
    error::{Error, Result},
};

/// One user's memberships as imported or exported: tenant → role → expiry (`None`
/// never expires). Ids are valid ([`crate::domain`]); an import's are checked at the edge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserMemberships {
    /// The user.
    pub user: String,
    /// Import: the input line it came from (0: none).
    pub line: u64,
    /// Tenant → role → expiry. With `replace`, a tenant with no roles removes the user
    /// from it.
    pub tenants: BTreeMap<String, BTreeMap<String, Option<UnixSeconds>>>,
}

impl UserMemberships {
    /// How many memberships (tenant, role) it holds.
    pub fn memberships(&self) -> usize {
        self.tenants.values().map(BTreeMap::len).sum()
    }
}

/// A batch of an import.
#[derive(Clone, Debug, Default)]
pub struct ImportBatch {
    /// Users, each once.
    pub users: Vec<UserMemberships>,
    /// Set each user's roles in each listed tenant to exactly these (else add them).
    pub replace: bool,
    /// Create missing tenants (else a user naming one is rejected).
    pub create_tenants: bool,
    /// Refuse the whole batch (`FailedPrecondition`) rather than skip a user.
    pub strict: bool,
    /// Who asked, for the audit trail.
    pub caller: String,
}

/// A user an import skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Its input line.
    pub line: u64,
    /// The user.
    pub user: String,
    /// Why.
    pub reason: String,
}

/// What a batch did.
#[derive(Clone, Debug, Default)]
pub struct Imported {
    /// The revision it committed at; the store's revision when it wrote nothing.
    pub revision: Revision,
    /// Memberships written.
    pub memberships: u64,
    /// Tenants created.
    pub tenants_created: Vec<String>,
    /// Users skipped.
    pub rejected: Vec<Rejected>,
    /// The users applied (what caches forget); none when the batch committed nothing.
    pub touched: Vec<String>,
}

/// A tenant a batch names, as the backend found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Live.
    Live,
    /// Marked deleted, its memberships being purged.
    Purging,
}

/// Every tenant `batch` names, each once.
pub fn tenants(batch: &ImportBatch) -> Vec<String> {
    let mut tenants: Vec<String> =
        batch.users.iter().flat_map(|user| user.tenants.keys().cloned()).collect();
    tenants.sort();
    tenants.dedup();
    tenants
}

/// Which users of `batch` are applied, given the tenants found (absent: missing), and
/// which tenants to create; `FailedPrecondition` naming the first skipped line when the
/// batch is strict.
pub fn sort_out<'a>(
    batch: &'a ImportBatch,
    found: &HashMap<String, Found>,
) -> Result<(Vec<&'a UserMemberships>, Vec<String>, Vec<Rejected>)> {
    let (mut accepted, mut create, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
    // A user with no tenant has nothing to write: neither applied nor rejected.
    for user in batch.users.iter().filter(|user| !user.tenants.is_empty()) {
        let refusal = user.tenants.keys().find_map(|tenant| match found.get(tenant) {
            Some(Found::Live) => None,
            Some(Found::Purging) => Some(format!(
                "tenant {tenant} was deleted and its memberships are still being purged; \
                 retry shortly"
            )),
            None if batch.create_tenants => None,
            None => Some(format!("tenant {tenant} not found (--create-tenants creates it)")),
        });
        match refusal {
            None => accepted.push(user),
            Some(reason) => {
                let (line, user) = (user.line, user.user.clone());
                if batch.strict {
                    return Err(Error::FailedPrecondition(format!(
                        "line {line}: user {user}: {reason}; nothing of this batch was applied"
                    )));
                }
                rejected.push(Rejected { line, user, reason });
            }
        }
    }
    for tenant in tenants(batch) {
        if !found.contains_key(&tenant)
            && accepted.iter().any(|user| user.tenants.contains_key(&tenant))
        {
            create.push(tenant);
        }
    }
    Ok((accepted, create, rejected))
}

/// A user's roles in one tenant: role → expiry (`None` never expires).
pub type Roles = BTreeMap<String, Option<UnixSeconds>>;

/// A membership row as a store holds it: tenant, user, role, expiry.
pub type HeldRow = (String, String, String, Option<UnixSeconds>);

/// One (tenant, user) pair of a batch as the batch leaves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairAfter<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The user.
    pub user: &'a str,
    /// Every role the pair holds after the batch (those expired that a merge leaves in
    /// place included).
    pub roles: Cow<'a, Roles>,
}

impl PairAfter<'_> {
    /// Its roles live at `now`, comma-separated in byte order: its history row.
    pub fn live(&self, now: UnixSeconds) -> String {
        let live = self.roles.iter().filter(|(_, expires)| expires.is_none_or(|at| at > now));
        live.map(|(role, _)| role.as_str()).collect::<Vec<_>>().join(",")
    }
}

/// Each (tenant, user) pair of `accepted`, in order, as the batch leaves it, given the
/// rows the pairs `held` before: with `replace`, exactly the batch's roles; else the held
/// ones with the batch's added (the batch's expiry wins for a role held already).
pub fn after<'a>(
    accepted: &[&'a UserMemberships],
    held: Vec<HeldRow>,
    replace: bool,
) -> Vec<PairAfter<'a>> {
    let mut before: HashMap<(String, String), Roles> = HashMap::new();
    if !replace {
        for (tenant, user, role, expires) in held {
            before.entry((tenant, user)).or_default().insert(role, expires);
        }
    }
    let mut pairs = Vec::new();
    for user in accepted {
        for (tenant, roles) in &user.tenants {
            let held = match before.is_empty() {
                true => None,
                false => before.remove(&(tenant.clone(), user.user.clone())),
            };
            let roles = match held {
                None => Cow::Borrowed(roles),
                Some(mut merged) => {
                    merged.extend(roles.iter().map(|(role, at)| (role.clone(), *at)));
                    Cow::Owned(merged)
                }
            };
            pairs.push(PairAfter { tenant, user: &user.user, roles });
        }
    }
    pairs
}

/// Rows an export reads per statement.
pub const EXPORT_PAGE: i64 = 10_000;

/// A page of live memberships after `($1, $2, $3)` in `(user, tenant, role)` order, live at
/// `$4`, at most `$5` rows, leaving out tenants marked deleted.
pub const EXPORT_ROWS: &str = "\
    SELECT m.user_id, m.tenant_id, m.role, m.expires_at FROM memberships m \
    WHERE (m.user_id, m.tenant_id, m.role) > ($1, $2, $3) \
      AND (m.expires_at IS NULL OR m.expires_at > $4) \
      AND m.tenant_id NOT IN (SELECT tenant_id FROM tenants WHERE deleted_at IS NOT NULL) \
    ORDER BY m.user_id, m.tenant_id, m.role LIMIT $5";

/// A row of [`EXPORT_ROWS`].
pub type ExportRow = (String, String, String, Option<i64>);

/// [`EXPORT_ROWS`] after `key`, live at `now`, for either backend.
pub fn export_rows<'q, DB>(
    (user, tenant, role): ExportKey,
    now: i64,
) -> sqlx::query::QueryAs<'q, DB, ExportRow, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    ExportRow: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let query = sqlx::query_as(EXPORT_ROWS).bind(user).bind(tenant).bind(role);
    query.bind(now).bind(EXPORT_PAGE)
}

/// A part of an export.
#[derive(Clone, Debug)]
pub struct ExportPage {
    /// The snapshot's revision.
    pub revision: Revision,
    /// Whole users, in user order.
    pub users: Vec<UserMemberships>,
}

/// Folds export rows (in `(user, tenant, role)` order, over any number of pages) into
/// whole users.
#[derive(Debug, Default)]
pub struct Folder {
    current: Option<UserMemberships>,
}

impl Folder {
    /// Takes a page of rows; the users it completed.
    pub fn take(&mut self, rows: Vec<ExportRow>) -> Vec<UserMemberships> {
        let mut done = Vec::new();
        for (user, tenant, role, expires_at) in rows {
            if self.current.as_ref().is_none_or(|current| current.user != user) {
                done.extend(self.current.take());
                self.current = Some(UserMemberships { user, ..Default::default() });
            }
            if let Some(current) = self.current.as_mut() {
                current.tenants.entry(tenant).or_default().insert(role, expires_at);
            }
        }
        done
    }

    /// The last user.
    pub fn finish(self) -> Option<UserMemberships> {
        self.current
    }
}

/// Where an export page starts: after this `(user, tenant, role)`.
pub type ExportKey = (String, String, String);

/// Pages an export: each backend reads [`EXPORT_ROWS`] after [`next_key`](Self::next_key)
/// in its read transaction and hands the rows to [`send`](Self::send), until there is no
/// next key; then [`finish`](Self::finish).
#[derive(Debug)]
pub struct Pager {
    revision: Revision,
    next: Option<ExportKey>,
    folder: Folder,
    sent: bool,
}

impl Pager {
    /// An export of the snapshot at `revision`.
    pub fn new(revision: Revision) -> Self {
        Self { revision, next: Some(ExportKey::default()), folder: Folder::default(), sent: false }
    }

    /// Where the next page starts; `None` when the last page was read.
    pub fn next_key(&mut self) -> Option<ExportKey> {
        self.next.take()
    }

    /// Folds a page and sends the users it completed; false when `out` closed (stop).
    pub async fn send(
        &mut self,
        rows: Vec<ExportRow>,
        out: &tokio::sync::mpsc::Sender<ExportPage>,
    ) -> bool {
        if rows.len() as i64 == EXPORT_PAGE {
            self.next = rows
                .last()
                .map(|(user, tenant, role, _)| (user.clone(), tenant.clone(), role.clone()));
        }
        let users = self.folder.take(rows);
        if users.is_empty() {
            return true;
        }
        self.sent = true;
        out.send(ExportPage { revision: self.revision, users }).await.is_ok()
    }

    /// Sends the last user (or, when nothing was sent, an empty page: the revision is
    /// always told); the snapshot's revision.
    pub async fn finish(self, out: &tokio::sync::mpsc::Sender<ExportPage>) -> Revision {
        let last = self.folder.finish();
        if last.is_some() || !self.sent {
            let users = last.into_iter().collect();
            let _ = out.send(ExportPage { revision: self.revision, users }).await;
        }
        self.revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, line: u64, tenants: &[&str]) -> UserMemberships {
        let roles = || BTreeMap::from([("viewer".to_owned(), None)]);
        let tenants = tenants.iter().map(|t| ((*t).to_owned(), roles())).collect();
        UserMemberships { user: name.into(), line, tenants }
    }

    #[test]
    fn a_user_naming_a_missing_tenant_is_skipped_whole_or_stops_a_strict_batch() {
        let mut batch = ImportBatch {
            users: vec![
                user("a", 1, &["acme", "nope"]),
                user("b", 2, &["acme"]),
                user("c", 3, &[]),
            ],
            ..Default::default()
        };
        let found = HashMap::from([("acme".to_owned(), Found::Live)]);
        let (accepted, create, rejected) = sort_out(&batch, &found).expect("sorted");
        assert_eq!(accepted.iter().map(|u| u.user.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(create.is_empty());
        assert_eq!((rejected[0].line, rejected[0].reason.contains("nope")), (1, true));
        assert_eq!(rejected.len(), 1, "c has nothing to write, and is not rejected");

        batch.create_tenants = true;
        let (accepted, create, _) = sort_out(&batch, &found).expect("sorted");
        assert_eq!((accepted.len(), create), (2, vec!["nope".to_owned()]));

        batch.create_tenants = false;
        batch.strict = true;
        let err = sort_out(&batch, &found).expect_err("strict");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn a_merge_keeps_what_a_pair_held_and_a_replace_does_not() {
        let mut a = user("a", 1, &["acme", "beta"]);
        a.tenants.get_mut("acme").expect("acme").insert("admin".into(), Some(50));
        let held =
            |role: &str, expires| ("acme".to_owned(), "a".to_owned(), role.to_owned(), expires);
        let rows = vec![held("admin", None), held("owner", Some(10)), held("billing", None)];

        let merged = after(&[&a], rows.clone(), false);
        assert_eq!(merged.len(), 2, "one per tenant named, held or not");
        assert_eq!((merged[0].tenant, merged[0].user), ("acme", "a"));
        let roles: Vec<_> = merged[0].roles.iter().map(|(r, at)| (r.as_str(), *at)).collect();
        assert_eq!(
            roles,
            [("admin", Some(50)), ("billing", None), ("owner", Some(10)), ("viewer", None)],
            "the batch's expiry wins; what it does not name stays, expired or not"
        );
        assert_eq!(merged[0].live(20), "admin,billing,viewer", "owner expired at 10");
        assert_eq!(merged[1].live(20), "viewer");

        let replaced = after(&[&a], rows, true);
        assert_eq!(replaced[0].live(20), "admin,viewer");
        assert!(matches!(replaced[0].roles, Cow::Borrowed(_)), "nothing held is read back");
    }

    #[test]
    fn export_rows_fold_into_whole_users_across_pages() {
        let row = |u: &str, t: &str, r: &str| (u.to_owned(), t.to_owned(), r.to_owned(), None);
        let mut folder = Folder::default();
        let first = folder.take(vec![row("a", "t1", "x"), row("b", "t1", "x")]);
        assert_eq!(first.len(), 1, "b may go on in the next page");
        let second = folder.take(vec![row("b", "t2", "y")]);
        assert!(second.is_empty());
        let last = folder.finish().expect("b");
        assert_eq!(last.memberships(), 2);
    }
}
