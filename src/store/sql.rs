//! The SQL both backends share, and the one implementation of [`Store`] over it.
//!
//! Postgres and SQLite accept the same statements here (`$n` parameters, `ON CONFLICT`,
//! `RETURNING`), so the trait is implemented once, by [`sql_store!`], for each backend's
//! pool type. A backend provides `read_pool()`, `write_pool()` and `application_id()`.

use crate::{
    domain::{Revision, UserRoles},
    store::Member,
};

/// Increments the revision; the last statement of every write transaction.
pub const BUMP_REVISION: &str =
    "UPDATE store_revision SET value = value + 1 WHERE id = 1 RETURNING value";

/// The current revision.
pub const REVISION: &str = "SELECT value FROM store_revision WHERE id = 1";

/// Everything a user holds, with the revision, in one statement (one snapshot).
pub const USER_ROLES: &str = "\
    SELECT r.value, m.tenant_id, m.role, m.expires_at \
    FROM store_revision r LEFT JOIN memberships m ON m.user_id = $1 \
    WHERE r.id = 1 ORDER BY m.tenant_id, m.role";

/// A page of a tenant's members with their live roles, with the revision.
pub const LIST_MEMBERS: &str = "\
    SELECT r.value, x.user_id, x.role FROM store_revision r LEFT JOIN ( \
        SELECT m.user_id, m.role FROM memberships m \
        WHERE m.tenant_id = $1 AND (m.expires_at IS NULL OR m.expires_at > $3) \
          AND m.user_id IN ( \
            SELECT DISTINCT u.user_id FROM memberships u \
            WHERE u.tenant_id = $1 AND u.user_id > $2 \
              AND (u.expires_at IS NULL OR u.expires_at > $3) \
            ORDER BY u.user_id LIMIT $4) \
    ) x ON TRUE \
    WHERE r.id = 1 ORDER BY x.user_id, x.role";

pub const TENANT_EXISTS: &str = "SELECT 1 FROM tenants WHERE tenant_id = $1";
pub const INSERT_TENANT: &str =
    "INSERT INTO tenants (tenant_id, name, created_at) VALUES ($1, $2, $3)";
pub const ENSURE_TENANT: &str = "INSERT INTO tenants (tenant_id, name, created_at) \
    VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO NOTHING";
pub const GET_TENANT: &str = "SELECT tenant_id, name, created_at FROM tenants WHERE tenant_id = $1";
pub const LIST_TENANTS: &str = "SELECT tenant_id, name, created_at FROM tenants \
    WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2";
pub const DELETE_TENANT_MEMBERS: &str = "DELETE FROM memberships WHERE tenant_id = $1";
pub const DELETE_TENANT: &str = "DELETE FROM tenants WHERE tenant_id = $1";
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

/// The audit trail: history after a revision, filtered (empty filters match all).
pub const LIST_CHANGES: &str = "\
    SELECT revision, kind, tenant_id, user_id, roles, caller, committed_at FROM changes \
    WHERE revision > $1 AND ($2 = '' OR tenant_id = $2) AND ($3 = '' OR user_id = $3) \
      AND ($4 = '' OR caller = $4) \
    ORDER BY revision LIMIT $5";

/// A row of [`LIST_CHANGES`].
pub type AuditRow = (i64, String, String, String, String, String, i64);

/// Folds [`LIST_CHANGES`] rows into history entries.
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

/// History after a revision, with the pruning floor, in one statement.
pub const CHANGES_AFTER: &str = "\
    SELECT r.pruned_through, c.revision, c.kind, c.tenant_id, c.user_id, c.roles, \
        c.caller, c.committed_at \
    FROM store_revision r LEFT JOIN ( \
        SELECT revision, kind, tenant_id, user_id, roles, caller, committed_at FROM changes \
        WHERE revision > $1 ORDER BY revision LIMIT $2 \
    ) c ON TRUE WHERE r.id = 1 ORDER BY c.revision";

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

pub const PRUNE_FLOOR: &str = "SELECT max(revision) FROM changes WHERE committed_at < $1";
pub const PRUNE_CHANGES: &str = "DELETE FROM changes WHERE revision <= $1";
pub const RAISE_FLOOR: &str = "UPDATE store_revision SET pruned_through = $1 \
    WHERE id = 1 AND pruned_through < $1";

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
pub type UserRoleRow = (i64, Option<String>, Option<String>, Option<i64>);

/// Folds [`USER_ROLES`] rows into a snapshot.
pub fn user_roles_from(rows: Vec<UserRoleRow>) -> UserRoles {
    let revision = rows.first().map_or(0, |row| row.0 as Revision);
    UserRoles::from_rows(
        revision,
        rows.into_iter().filter_map(|(_, tenant, role, expires)| Some((tenant?, role?, expires))),
    )
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

/// Implements [`crate::store::Store`] for a backend struct over sqlx database `$db`.
macro_rules! sql_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn user_roles(
                &self,
                user: &$crate::domain::UserId,
                min_revision: $crate::domain::Revision,
            ) -> $crate::error::Result<$crate::store::Answer> {
                let rows: Vec<$crate::store::sql::UserRoleRow> =
                    sqlx::query_as($crate::store::sql::USER_ROLES)
                        .bind(user.as_str())
                        .fetch_all(self.read_pool())
                        .await?;
                let snapshot = $crate::store::sql::user_roles_from(rows);
                $crate::store::check_min_revision(snapshot.revision, min_revision)?;
                Ok($crate::store::Answer::new(std::sync::Arc::new(snapshot)))
            }

            async fn write_membership(
                &self,
                write: &$crate::store::MembershipWrite,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::{WriteKind, sql};
                let _serial = self.write_guard().await;
                let mut tx = self.write_pool().begin().await?;
                let exists: Option<(i32,)> = sqlx::query_as(sql::TENANT_EXISTS)
                    .bind(write.tenant.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                if exists.is_none() {
                    return Err($crate::error::Error::NotFound(format!(
                        "tenant {} not found",
                        write.tenant
                    )));
                }
                let remove_all = match write.kind {
                    WriteKind::SetRoles => true,
                    WriteKind::Revoke => write.roles.is_empty(),
                    WriteKind::Grant => false,
                };
                if remove_all {
                    sqlx::query(sql::DELETE_MEMBER)
                        .bind(write.tenant.as_str())
                        .bind(write.user.as_str())
                        .execute(&mut *tx)
                        .await?;
                } else if write.kind == WriteKind::Revoke {
                    let mut query = sqlx::QueryBuilder::<$db>::new(sql::DELETE_ROLES_PREFIX);
                    query.push_bind(write.tenant.as_str());
                    query.push(" AND user_id = ").push_bind(write.user.as_str());
                    query.push(" AND role IN (");
                    let mut roles = query.separated(", ");
                    for role in &write.roles {
                        roles.push_bind(role.as_str());
                    }
                    query.push(")");
                    query.build().execute(&mut *tx).await?;
                }
                if write.kind != WriteKind::Revoke && !write.roles.is_empty() {
                    let mut query = sqlx::QueryBuilder::<$db>::new(sql::UPSERT_ROLES_PREFIX);
                    query.push_values(&write.roles, |mut row, role| {
                        row.push_bind(write.tenant.as_str())
                            .push_bind(write.user.as_str())
                            .push_bind(role.as_str())
                            .push_bind(write.expires_at);
                    });
                    query.push(sql::UPSERT_ROLES_SUFFIX);
                    query.build().execute(&mut *tx).await?;
                }
                let change = $crate::store::ChangeRef {
                    kind: $crate::store::ChangeKind::Membership,
                    tenant: write.tenant.as_str(),
                    user: write.user.as_str(),
                    caller: &write.caller,
                };
                self.finish_write(tx, change).await
            }

            async fn list_members(
                &self,
                tenant: &$crate::domain::TenantId,
                after: Option<&$crate::domain::UserId>,
                limit: u32,
                now: $crate::domain::UnixSeconds,
            ) -> $crate::error::Result<(Vec<$crate::store::Member>, $crate::domain::Revision)> {
                let rows: Vec<$crate::store::sql::MemberRow> =
                    sqlx::query_as($crate::store::sql::LIST_MEMBERS)
                        .bind(tenant.as_str())
                        .bind(after.map_or("", |user| user.as_str()))
                        .bind(now)
                        .bind(i64::from(limit))
                        .fetch_all(self.read_pool())
                        .await?;
                Ok($crate::store::sql::members_from(rows))
            }

            async fn create_tenant(
                &self,
                tenant: &$crate::store::Tenant,
                caller: &str,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                let _serial = self.write_guard().await;
                let mut tx = self.write_pool().begin().await?;
                let inserted = sqlx::query($crate::store::sql::INSERT_TENANT)
                    .bind(tenant.id.as_str())
                    .bind(tenant.name.as_str())
                    .bind(tenant.created_at_ms)
                    .execute(&mut *tx)
                    .await;
                match inserted.map_err($crate::error::Error::from) {
                    Err($crate::error::Error::AlreadyExists(_)) => {
                        return Err($crate::error::Error::AlreadyExists(format!(
                            "tenant {} already exists",
                            tenant.id
                        )));
                    }
                    other => other?,
                };
                let change = $crate::store::ChangeRef {
                    kind: $crate::store::ChangeKind::TenantCreated,
                    tenant: tenant.id.as_str(),
                    user: "",
                    caller,
                };
                self.finish_write(tx, change).await
            }

            async fn get_tenant(
                &self,
                id: &$crate::domain::TenantId,
            ) -> $crate::error::Result<$crate::store::Tenant> {
                let row: Option<(String, String, i64)> =
                    sqlx::query_as($crate::store::sql::GET_TENANT)
                        .bind(id.as_str())
                        .fetch_optional(self.read_pool())
                        .await?;
                row.map($crate::store::tenant_from_row)
                    .ok_or_else(|| $crate::error::Error::NotFound(format!("tenant {id} not found")))
            }

            async fn list_tenants(
                &self,
                after: Option<&$crate::domain::TenantId>,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::Tenant>> {
                let rows: Vec<(String, String, i64)> =
                    sqlx::query_as($crate::store::sql::LIST_TENANTS)
                        .bind(after.map_or("", |id| id.as_str()))
                        .bind(i64::from(limit))
                        .fetch_all(self.read_pool())
                        .await?;
                Ok(rows.into_iter().map($crate::store::tenant_from_row).collect())
            }

            async fn delete_tenant(
                &self,
                id: &$crate::domain::TenantId,
                caller: &str,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::sql;
                if id == self.application_id() {
                    return Err($crate::error::Error::FailedPrecondition(format!(
                        "tenant {id} is the application tenant and cannot be deleted"
                    )));
                }
                let _serial = self.write_guard().await;
                let mut tx = self.write_pool().begin().await?;
                sqlx::query(sql::DELETE_TENANT_MEMBERS).bind(id.as_str()).execute(&mut *tx).await?;
                let deleted =
                    sqlx::query(sql::DELETE_TENANT).bind(id.as_str()).execute(&mut *tx).await?;
                if deleted.rows_affected() == 0 {
                    return Err($crate::error::Error::NotFound(format!("tenant {id} not found")));
                }
                let change = $crate::store::ChangeRef {
                    kind: $crate::store::ChangeKind::TenantDeleted,
                    tenant: id.as_str(),
                    user: "",
                    caller,
                };
                self.finish_write(tx, change).await
            }

            async fn revision(&self) -> $crate::error::Result<$crate::domain::Revision> {
                let (revision,): (i64,) = sqlx::query_as($crate::store::sql::REVISION)
                    .fetch_one(self.read_pool())
                    .await?;
                Ok(revision as $crate::domain::Revision)
            }

            async fn close(&self) {
                self.write_pool().close().await;
                self.read_pool().close().await;
            }

            async fn subscribe(&self) -> $crate::error::Result<$crate::store::Feed> {
                self.feed().await
            }

            async fn changes_after(
                &self,
                after: $crate::domain::Revision,
                limit: u32,
            ) -> $crate::error::Result<$crate::store::History> {
                let rows: Vec<$crate::store::sql::ChangeRow> =
                    sqlx::query_as($crate::store::sql::CHANGES_AFTER)
                        .bind(after as i64)
                        .bind(i64::from(limit))
                        .fetch_all(self.read_pool())
                        .await?;
                Ok($crate::store::sql::history_from(rows))
            }

            async fn list_changes(
                &self,
                filter: &$crate::store::ChangeFilter,
                after: $crate::domain::Revision,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::HistoryEntry>> {
                let rows: Vec<$crate::store::sql::AuditRow> =
                    sqlx::query_as($crate::store::sql::LIST_CHANGES)
                        .bind(after as i64)
                        .bind(filter.tenant_id.as_str())
                        .bind(filter.user_id.as_str())
                        .bind(filter.caller.as_str())
                        .bind(i64::from(limit))
                        .fetch_all(self.read_pool())
                        .await?;
                Ok($crate::store::sql::audit_from(rows))
            }

            async fn prune_history(
                &self,
                older_than_ms: i64,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::sql;
                let mut tx = self.write_pool().begin().await?;
                let (floor,): (Option<i64>,) = sqlx::query_as(sql::PRUNE_FLOOR)
                    .bind(older_than_ms)
                    .fetch_one(&mut *tx)
                    .await?;
                let Some(floor) = floor else { return Ok(0) };
                sqlx::query(sql::PRUNE_CHANGES).bind(floor).execute(&mut *tx).await?;
                sqlx::query(sql::RAISE_FLOOR).bind(floor).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(floor as $crate::domain::Revision)
            }
        }

        impl $store {
            /// Without migrating: refuses a schema newer than this binary knows, or one
            /// that still needs `rolecheck migrate`.
            pub async fn check_schema(&self) -> $crate::error::Result<()> {
                let known = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
                let applied: (Option<i64>,) =
                    sqlx::query_as("SELECT max(version) FROM _sqlx_migrations WHERE success")
                        .fetch_one(self.read_pool())
                        .await
                        .unwrap_or((None,));
                match applied.0 {
                    Some(version) if version > known => Err($crate::error::Error::FailedPrecondition(format!(
                        "the database schema is at version {version}, newer than this rolecheck \
                         knows ({known}): upgrade rolecheck"
                    ))),
                    Some(version) if version == known => Ok(()),
                    _ => Err($crate::error::Error::FailedPrecondition(format!(
                        "the database schema is behind this rolecheck (needs version {known}): \
                         run `rolecheck migrate`"
                    ))),
                }
            }

            /// Ends every write the same way: the revision row is bumped (its lock orders
            /// revisions as commits), the change is recorded in the history, the backend
            /// announces it, and the transaction commits.
            async fn finish_write(
                &self,
                mut tx: sqlx::Transaction<'static, $db>,
                change: $crate::store::ChangeRef<'_>,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::sql;
                let (revision,): (i64,) =
                    sqlx::query_as(sql::BUMP_REVISION).fetch_one(&mut *tx).await?;
                let roles = if change.kind == $crate::store::ChangeKind::Membership {
                    let rows: Vec<(String,)> = sqlx::query_as(sql::ROLES_AFTER)
                        .bind(change.tenant)
                        .bind(change.user)
                        .bind($crate::domain::now_unix())
                        .fetch_all(&mut *tx)
                        .await?;
                    rows.into_iter().map(|(role,)| role).collect::<Vec<_>>().join(",")
                } else {
                    String::new()
                };
                sqlx::query(sql::INSERT_CHANGE)
                    .bind(revision)
                    .bind(change.kind.code())
                    .bind(change.tenant)
                    .bind(change.user)
                    .bind(roles)
                    .bind($crate::domain::now_millis())
                    .bind(change.caller)
                    .execute(&mut *tx)
                    .await?;
                let revision = revision as $crate::domain::Revision;
                self.announce(&mut tx, revision, &change).await?;
                tx.commit().await?;
                self.committed(revision, &change);
                Ok(revision)
            }

            /// Creates the application tenant if it does not exist yet. Not a write:
            /// the application tenant is part of the schema's starting state.
            pub async fn ensure_application_tenant(
                &self,
                id: &$crate::domain::TenantId,
            ) -> $crate::error::Result<()> {
                sqlx::query($crate::store::sql::ENSURE_TENANT)
                    .bind(id.as_str())
                    .bind("Application")
                    .bind($crate::domain::now_millis())
                    .execute(self.write_pool())
                    .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use sql_store;
