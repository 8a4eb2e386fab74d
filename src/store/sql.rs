//! The SQL both backends share, and how its rows fold into domain values.
//!
//! Postgres and SQLite accept the same statements here (`$n` parameters, `ON CONFLICT`,
//! `RETURNING`). Each backend implements the store traits plainly, running these
//! statements and folding their rows with the functions here; the steps every write ends
//! with ([`commit`]) and the schema check ([`schema_status`]) are here too.

use tokio::sync::OwnedMutexGuard;

use crate::{
    domain::TenantId,
    domain::{Revision, UserRoles},
    error::{Error, Result},
    store::{Announcer, ChangeKind, Member, Tenant},
};

/// Increments the revision; the last statement of every write transaction.
pub const BUMP_REVISION: &str =
    "UPDATE store_revision SET value = value + 1 WHERE id = 1 RETURNING value";

/// The current revision.
pub const REVISION: &str = "SELECT value FROM store_revision WHERE id = 1";

/// The store's revision and its epoch (its identity, chosen when it was created).
pub const IDENTITY: &str = "SELECT value, epoch FROM store_revision WHERE id = 1";

/// The model as set, and the revision that set it.
pub const GET_MODEL: &str = "SELECT r.model_revision, coalesce(m.spec, '') \
    FROM store_revision r LEFT JOIN model m ON m.id = 1 WHERE r.id = 1";
pub const PUT_MODEL: &str = "INSERT INTO model (id, spec) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET spec = excluded.spec";
/// Marks the model as set by the revision being committed (run under the revision lock,
/// before the bump).
pub const MODEL_SET_NOW: &str = "UPDATE store_revision SET model_revision = value + 1 WHERE id = 1";

/// Everything a user holds, with the revision, in one statement (one snapshot).
///
/// Memberships of a tenant marked deleted (being purged, see [`crate::store::shared`])
/// are never read: the `NOT IN` here (and in [`LIST_MEMBERS`] and the Postgres loader)
/// leaves them out, at the cost of one probe of the partial index `tenants_deleted`,
/// which is empty but while a purge runs.
pub const USER_ROLES: &str = "\
    SELECT r.value, r.model_revision, m.tenant_id, m.role, m.expires_at \
    FROM store_revision r LEFT JOIN memberships m ON m.user_id = $1 \
      AND m.tenant_id NOT IN (SELECT tenant_id FROM tenants WHERE deleted_at IS NOT NULL) \
    WHERE r.id = 1 ORDER BY m.tenant_id, m.role";

/// A page of a tenant's members with their live roles, with the revision.
pub const LIST_MEMBERS: &str = "\
    SELECT r.value, x.user_id, x.role FROM store_revision r LEFT JOIN ( \
        SELECT m.user_id, m.role FROM memberships m \
        WHERE m.tenant_id = $1 AND (m.expires_at IS NULL OR m.expires_at > $3) \
          AND m.user_id IN ( \
            SELECT DISTINCT u.user_id FROM memberships u \
            WHERE u.tenant_id = $1 AND u.user_id > $2 \
              AND $1 NOT IN (SELECT tenant_id FROM tenants WHERE deleted_at IS NOT NULL) \
              AND (u.expires_at IS NULL OR u.expires_at > $3) \
            ORDER BY u.user_id LIMIT $4) \
    ) x ON TRUE \
    WHERE r.id = 1 ORDER BY x.user_id, x.role";

pub const TENANT_EXISTS: &str = "SELECT 1 FROM tenants WHERE tenant_id = $1 AND deleted_at IS NULL";
pub const INSERT_TENANT: &str =
    "INSERT INTO tenants (tenant_id, name, created_at) VALUES ($1, $2, $3)";
pub const ENSURE_TENANT: &str = "INSERT INTO tenants (tenant_id, name, created_at) \
    VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO NOTHING";
pub const GET_TENANT: &str = "SELECT tenant_id, name, created_at FROM tenants \
    WHERE tenant_id = $1 AND deleted_at IS NULL";
pub const LIST_TENANTS: &str = "SELECT tenant_id, name, created_at FROM tenants \
    WHERE tenant_id > $1 AND deleted_at IS NULL ORDER BY tenant_id LIMIT $2";
/// How many memberships a tenant has, counting no further than `$2`.
pub const TENANT_SIZE: &str = "SELECT count(*) FROM \
    (SELECT 1 FROM memberships WHERE tenant_id = $1 LIMIT $2) s";
pub const DELETE_TENANT_MEMBERS: &str = "DELETE FROM memberships WHERE tenant_id = $1";
pub const DELETE_TENANT: &str = "DELETE FROM tenants WHERE tenant_id = $1 AND deleted_at IS NULL";
/// Marks a tenant deleted (`$2`: unix ms), for the purge to empty (see
/// [`crate::store::shared`]).
pub const MARK_TENANT_DELETED: &str =
    "UPDATE tenants SET deleted_at = $2 WHERE tenant_id = $1 AND deleted_at IS NULL";
/// Whether a tenant is marked deleted and not yet purged.
pub const TENANT_PURGING: &str =
    "SELECT 1 FROM tenants WHERE tenant_id = $1 AND deleted_at IS NOT NULL";
pub const DELETE_MEMBER: &str = "DELETE FROM memberships WHERE tenant_id = $1 AND user_id = $2";
pub const UPSERT_ROLES_PREFIX: &str =
    "INSERT INTO memberships (tenant_id, user_id, role, expires_at) ";
pub const UPSERT_ROLES_SUFFIX: &str =
    " ON CONFLICT (tenant_id, user_id, role) DO UPDATE SET expires_at = excluded.expires_at";
pub const DELETE_ROLES_PREFIX: &str = "DELETE FROM memberships WHERE tenant_id = ";

/// A user's live roles in one tenant, for the history row of a membership write.
pub const ROLES_AFTER: &str = "SELECT role FROM memberships \
    WHERE tenant_id = $1 AND user_id = $2 AND (expires_at IS NULL OR expires_at > $3) \
    ORDER BY role";
pub const INSERT_CHANGE: &str = "INSERT INTO changes \
    (revision, kind, tenant_id, user_id, roles, committed_at, caller) \
    VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The audit trail: history after a revision matching `filter` (an empty field matches
/// all), in revision order, in whole revisions (see [`CHANGES_AFTER`]), as one statement
/// per filter shape. Parameters: `$1` the revision, then the filter's non-empty fields in
/// the order tenant, user, caller, then the limit less one (where the page's last
/// revision is found).
///
/// Only the conditions a filter has are in the statement, so every shape, prepared once
/// and run with a generic plan, can use its index: `changes_by_tenant`,
/// `changes_by_user` or `changes_by_caller` (each `(column, revision)`, so the rows come
/// in revision order and the bound stops the scan). A test holds the generic plans to
/// that (`list_changes_filters_use_their_index`); for example, with a caller filter:
///
/// ```text
/// Index Scan using changes_by_caller on changes
///   Index Cond: ((caller = $2) AND (revision > $1) AND (revision <= (InitPlan 1).col1))
/// ```
pub fn list_changes_sql(filter: &crate::store::ChangeFilter) -> String {
    let mut conditions = String::from("revision > $1");
    let mut n = 1;
    for (column, value) in filter.columns() {
        if !value.is_empty() {
            n += 1;
            conditions.push_str(&format!(" AND {column} = ${n}"));
        }
    }
    format!(
        "SELECT revision, kind, tenant_id, user_id, roles, caller, committed_at FROM changes \
         WHERE {conditions} AND revision <= coalesce((SELECT revision FROM changes \
         WHERE {conditions} ORDER BY revision LIMIT 1 OFFSET ${}), {LAST}) ORDER BY revision",
        n + 1
    )
}

/// Past every revision: the bound of a page that reaches the end of the history.
const LAST: &str = "9223372036854775807";

/// A row of [`list_changes_sql`].
pub type AuditRow = (i64, String, String, String, String, String, i64);

/// Folds [`list_changes_sql`] rows into history entries.
pub fn audit_from(rows: Vec<AuditRow>) -> Vec<crate::store::HistoryEntry> {
    rows.into_iter()
        .filter_map(|(revision, kind, tenant_id, user_id, roles, caller, committed_at_ms)| {
            Some(crate::store::HistoryEntry {
                revision: revision as Revision,
                kind: crate::store::ChangeKind::from_code(&kind)?,
                tenant_id,
                user_id,
                roles: split_roles(&roles),
                caller,
                committed_at_ms,
            })
        })
        .collect()
}

fn split_roles(roles: &str) -> Vec<String> {
    roles.split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect()
}

/// History after a revision, with the pruning floor, in one statement, in whole
/// revisions: every row of the revisions up to the one holding the `$2 + 1`-th row after
/// `$1` (an import batch commits many rows at one revision, and a page never splits one),
/// none when `$3` (the limit) is 0.
pub const CHANGES_AFTER: &str = "\
    SELECT r.pruned_through, c.revision, c.kind, c.tenant_id, c.user_id, c.roles, \
        c.caller, c.committed_at \
    FROM store_revision r LEFT JOIN ( \
        SELECT revision, kind, tenant_id, user_id, roles, caller, committed_at FROM changes \
        WHERE revision > $1 AND $3 > 0 AND revision <= coalesce(( \
            SELECT revision FROM changes WHERE revision > $1 \
            ORDER BY revision LIMIT 1 OFFSET $2), 9223372036854775807) \
    ) c ON TRUE WHERE r.id = 1 ORDER BY c.revision, c.tenant_id, c.user_id";

/// A row of [`CHANGES_AFTER`].
pub type ChangeRow = (
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// The newest revision committed before `$1` (unix ms): one probe of `changes_by_time`
/// and its ties (writes of the same millisecond), not a scan of everything older.
pub const PRUNE_FLOOR: &str = "SELECT revision FROM changes WHERE committed_at < $1 \
    ORDER BY committed_at DESC, revision DESC LIMIT 1";
pub const OLDEST_CHANGE: &str = "SELECT min(revision) FROM changes";
/// The revision of the `$2 + 1`-th history row from revision `$1` on: where a prune
/// chunk of about [`crate::store::PURGE_CHUNK`] rows ends (whole revisions).
pub const PRUNE_BOUND: &str =
    "SELECT revision FROM changes WHERE revision >= $1 ORDER BY revision LIMIT 1 OFFSET $2";
pub const PRUNE_CHANGES: &str = "DELETE FROM changes WHERE revision >= $1 AND revision <= $2";
pub const RAISE_FLOOR: &str = "UPDATE store_revision SET pruned_through = $1 \
    WHERE id = 1 AND pruned_through < $1";

/// Tenants marked deleted whose memberships are still to purge.
pub const DELETED_TENANTS: &str = "SELECT tenant_id FROM tenants WHERE deleted_at IS NOT NULL";
/// The user id `$3` memberships past user `$2` in tenant `$1`: where a purge chunk ends.
pub const PURGE_BOUND: &str = "SELECT user_id FROM memberships \
    WHERE tenant_id = $1 AND user_id > $2 ORDER BY user_id LIMIT 1 OFFSET $3";
pub const PURGE_RANGE: &str =
    "DELETE FROM memberships WHERE tenant_id = $1 AND user_id > $2 AND user_id <= $3";
pub const PURGE_REST: &str = "DELETE FROM memberships WHERE tenant_id = $1 AND user_id > $2";
/// The row of a purged tenant, which frees its id.
pub const DROP_PURGED_TENANT: &str =
    "DELETE FROM tenants WHERE tenant_id = $1 AND deleted_at IS NOT NULL";

/// Folds [`CHANGES_AFTER`] rows into history entries and the pruning floor.
pub fn history_from(rows: Vec<ChangeRow>) -> crate::store::History {
    let pruned_through = rows.first().map_or(0, |row| row.0 as Revision);
    let entries = rows
        .into_iter()
        .filter_map(|(_, revision, kind, tenant, user, roles, caller, committed_at)| {
            Some(crate::store::HistoryEntry {
                revision: revision? as Revision,
                kind: crate::store::ChangeKind::from_code(&kind?)?,
                tenant_id: tenant?,
                user_id: user?,
                roles: split_roles(&roles?),
                caller: caller?,
                committed_at_ms: committed_at?,
            })
        })
        .collect();
    crate::store::History { entries, pruned_through }
}

/// A row of [`USER_ROLES`].
pub type UserRoleRow = (i64, i64, Option<String>, Option<String>, Option<i64>);

/// Folds [`USER_ROLES`] rows into `user`'s snapshot.
pub fn user_roles_from(user: &str, rows: Vec<UserRoleRow>) -> UserRoles {
    let (revision, model_revision) =
        rows.first().map_or((0, 0), |row| (row.0 as Revision, row.1 as Revision));
    UserRoles::from_rows(
        user,
        revision,
        rows.into_iter()
            .filter_map(|(_, _, tenant, role, expires)| Some((tenant?, role?, expires))),
    )
    .under_model(model_revision)
}

/// A row of [`LIST_MEMBERS`].
pub type MemberRow = (i64, Option<String>, Option<String>);

/// Folds [`LIST_MEMBERS`] rows (ordered by user, role) into members.
pub fn members_from(rows: Vec<MemberRow>) -> (Vec<Member>, Revision) {
    let revision = rows.first().map_or(0, |row| row.0 as Revision);
    let mut members: Vec<Member> = Vec::new();
    for (_, user, role) in rows {
        let (Some(user), Some(role)) = (user, role) else {
            continue;
        };
        match members.last_mut() {
            Some(last) if last.user_id == user => last.roles.push(role),
            _ => members.push(Member { user_id: user, roles: vec![role] }),
        }
    }
    (members, revision)
}

/// The newest schema version applied.
pub const APPLIED_SCHEMA: &str = "SELECT max(version) FROM _sqlx_migrations WHERE success";

/// Whether a database whose newest applied migration is `applied` (the result of
/// [`APPLIED_SCHEMA`]) can be served by a binary that knows migrations up to `known`.
///
/// No migrations table means a fresh database ("run `rolecheck migrate`"); any other
/// failure (an unreachable database) is itself, `UNAVAILABLE`, and retried at start.
pub fn schema_status(
    applied: std::result::Result<(Option<i64>,), sqlx::Error>,
    known: i64,
) -> Result<()> {
    check_version(applied_version(applied)?, known)
}

/// The newest applied migration from [`APPLIED_SCHEMA`]'s result; `None` for a fresh
/// database (no migrations table).
pub fn applied_version(
    applied: std::result::Result<(Option<i64>,), sqlx::Error>,
) -> Result<Option<i64>> {
    match applied {
        Ok((version,)) => Ok(version),
        Err(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("42P01") || db.message().contains("no such table") =>
        {
            Ok(None)
        }
        Err(err) => Err(err.into()),
    }
}

/// Whether a schema at migration `applied` can be served by a binary that knows
/// migrations up to `known`.
pub fn check_version(applied: Option<i64>, known: i64) -> Result<()> {
    match applied {
        Some(version) if version > known => Err(Error::FailedPrecondition(format!(
            "the database schema is at version {version}, newer than this rolecheck knows \
             ({known}): it was migrated by a newer release; upgrade this rolecheck"
        ))),
        Some(version) if version == known => Ok(()),
        _ => Err(Error::FailedPrecondition(format!(
            "the database schema is behind this rolecheck (needs version {known}): run \
             `rolecheck migrate`"
        ))),
    }
}

/// Ends every write, once the backend has recorded it at `revision` (bumped the revision
/// row, whose lock orders revisions as commits, and inserted the history row): COMMIT,
/// then announce `change` on the change feed.
///
/// Once the change is recorded, the outcome is decided: COMMIT and the announcement run
/// on a task of their own, so a caller that goes away (a deadline, a reset stream) cannot
/// leave a committed write unannounced. Before that, a caller that goes away drops the
/// transaction, which rolls back. `serial` (the embedded store's write lock) is held
/// until the announcement, so announcements keep revision order.
pub async fn commit<DB: sqlx::Database>(
    tx: sqlx::Transaction<'static, DB>,
    revision: Revision,
    change: Announcement,
    serial: Option<OwnedMutexGuard<()>>,
) -> Result<Revision> {
    let decided = tokio::spawn(async move {
        let _serial = serial;
        tx.commit().await?;
        if let Some(delay) = change.fault_after_commit {
            tokio::time::sleep(delay).await;
        }
        change.announcer.committed(revision, &change.changes).await;
        Ok::<_, Error>(revision)
    });
    decided.await.map_err(|err| Error::Internal(Box::new(err)))?
}

/// What [`commit`] announces, and how.
pub struct Announcement {
    /// Where (an in-process feed, or nowhere when the database announces).
    pub announcer: Announcer,
    /// What changed, and whom it concerns: the user of a membership change, the tenant
    /// of a tenant change (one each, but for an import batch).
    pub changes: Vec<(ChangeKind, String)>,
    /// The test fault point: wait this long after COMMIT, before announcing.
    pub fault_after_commit: Option<std::time::Duration>,
}

/// A row of [`GET_TENANT`] and [`LIST_TENANTS`].
pub type TenantRow = (String, String, i64);

/// A tenant from its row.
pub fn tenant_from_row((id, name, created_at_ms): TenantRow) -> Tenant {
    Tenant { id: TenantId::trusted(id), name, created_at_ms }
}

/// The tenant [`GET_TENANT`] found, or `NotFound`.
pub fn tenant_found(id: &TenantId, row: Option<TenantRow>) -> Result<Tenant> {
    row.map(tenant_from_row).ok_or_else(|| Error::NotFound(format!("tenant {id} not found")))
}

/// The error of a failed [`INSERT_TENANT`]: a taken id names the tenant.
pub fn tenant_taken(id: &TenantId, err: sqlx::Error) -> Error {
    match Error::from(err) {
        Error::AlreadyExists(_) => Error::AlreadyExists(format!("tenant {id} already exists")),
        other => other,
    }
}

/// `FailedPrecondition` for the application tenant, which is never deleted.
pub fn deletable(id: &TenantId, application_id: &TenantId) -> Result<()> {
    if id == application_id {
        return Err(Error::FailedPrecondition(format!(
            "tenant {id} is the application tenant and cannot be deleted"
        )));
    }
    Ok(())
}
