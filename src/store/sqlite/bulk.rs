//! Import and export on the embedded store (see [`crate::store::bulk`]): a batch is one
//! write under the store's write lock, its rows written by multi-row statements.

use std::collections::{BTreeMap, HashMap};

use sqlx::{QueryBuilder, Sqlite, Transaction};
use tokio::sync::mpsc;

use super::SqliteStore;
use crate::{
    domain::{Revision, now_millis, now_unix},
    error::Result,
    store::{
        ChangeKind,
        bulk::{self, ExportPage, Found, ImportBatch, Imported, UserMemberships},
        sql,
    },
};

/// Rows per multi-row statement (each row a handful of parameters, far below SQLite's
/// 32,766).
const ROWS_PER_STATEMENT: usize = 200;

impl SqliteStore {
    /// Applies `batch` at one revision.
    pub(super) async fn import(&self, batch: &ImportBatch) -> Result<Imported> {
        let (mut tx, serial) = self.begin().await?;
        let found = found_tenants(&mut tx, &bulk::tenants(batch)).await?;
        let (accepted, create, rejected) = bulk::sort_out(batch, &found)?;
        if accepted.is_empty() {
            let (revision,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(&mut *tx).await?;
            return Ok(Imported { revision: revision as Revision, rejected, ..Default::default() });
        }
        let now_ms = now_millis();
        for tenant in &create {
            let insert = sqlx::query(sql::INSERT_TENANT).bind(tenant).bind(tenant).bind(now_ms);
            insert.execute(&mut *tx).await?;
        }
        let pairs: Vec<(&str, &str)> = accepted
            .iter()
            .flat_map(|user| {
                user.tenants.keys().map(|tenant| (tenant.as_str(), user.user.as_str()))
            })
            .collect();
        let rows = write_rows(&mut tx, &accepted, &pairs, batch.replace).await?;
        let after = roles_after(&mut tx, &pairs).await?;
        let (revision,): (i64,) = sqlx::query_as(sql::BUMP_REVISION).fetch_one(&mut *tx).await?;
        let written = (revision, now_ms, batch.caller.as_str());
        record(&mut tx, written, &create, &pairs, &after).await?;
        let touched: Vec<String> = accepted.iter().map(|user| user.user.clone()).collect();
        let changes = touched.iter().map(|user| (ChangeKind::Membership, user.clone())).collect();
        let imported = Imported {
            revision: revision as Revision,
            memberships: rows as u64,
            tenants_created: create,
            rejected,
            touched,
        };
        let announcement = self.announcement(changes);
        sql::commit(tx, revision as Revision, announcement, Some(serial)).await?;
        Ok(imported)
    }

    /// Every live membership in one read transaction (a WAL snapshot from its first read).
    pub(super) async fn export(&self, out: mpsc::Sender<ExportPage>) -> Result<Revision> {
        let mut tx = self.read.begin().await?;
        let (revision,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(&mut *tx).await?;
        let (now, mut pager) = (now_unix(), bulk::Pager::new(revision as Revision));
        while let Some(key) = pager.next_key() {
            let rows = bulk::export_rows(key, now).fetch_all(&mut *tx).await?;
            if !pager.send(rows, &out).await {
                break;
            }
        }
        Ok(pager.finish(&out).await)
    }
}

/// With `replace`, removes each pair's roles; then writes every role of `accepted`; how
/// many.
async fn write_rows(
    tx: &mut Transaction<'static, Sqlite>,
    accepted: &[&UserMemberships],
    pairs: &[(&str, &str)],
    replace: bool,
) -> Result<usize> {
    if replace {
        // An OR of pairs, each term searched by index (a row-value IN list would scan
        // every membership).
        for chunk in pairs.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("DELETE FROM memberships WHERE ");
            let mut terms = query.separated(" OR ");
            for (tenant, user) in chunk {
                terms.push("(tenant_id = ").push_bind_unseparated(*tenant);
                terms.push_unseparated(" AND user_id = ").push_bind_unseparated(*user);
                terms.push_unseparated(")");
            }
            query.build().execute(&mut **tx).await?;
        }
    }
    let rows: Vec<(&str, &str, &str, Option<i64>)> = accepted
        .iter()
        .flat_map(|user| {
            user.tenants.iter().flat_map(move |(tenant, roles)| {
                roles.iter().map(move |(role, expires)| {
                    (tenant.as_str(), user.user.as_str(), role.as_str(), *expires)
                })
            })
        })
        .collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(sql::UPSERT_ROLES_PREFIX);
        query.push_values(chunk, |mut row, (tenant, user, role, expires)| {
            row.push_bind(*tenant).push_bind(*user).push_bind(*role).push_bind(*expires);
        });
        query.push(sql::UPSERT_ROLES_SUFFIX);
        query.build().execute(&mut **tx).await?;
    }
    Ok(rows.len())
}

/// The history rows of a batch at its revision: one per tenant created, one per pair
/// with its roles `after`.
async fn record(
    tx: &mut Transaction<'static, Sqlite>,
    (revision, now_ms, caller): (i64, i64, &str),
    created: &[String],
    pairs: &[(&str, &str)],
    after: &HashMap<(&str, &str), String>,
) -> Result<()> {
    let empty = String::new();
    let history: Vec<(&str, &str, &str, &str)> = created
        .iter()
        .map(|tenant| (ChangeKind::TenantCreated.code(), tenant.as_str(), "", ""))
        .chain(pairs.iter().map(|(tenant, user)| {
            let roles = after.get(&(*tenant, *user)).unwrap_or(&empty);
            (ChangeKind::Membership.code(), *tenant, *user, roles.as_str())
        }))
        .collect();
    for chunk in history.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO changes (revision, kind, tenant_id, user_id, roles, committed_at, caller) ",
        );
        query.push_values(chunk, |mut row, (kind, tenant, user, roles)| {
            row.push_bind(revision)
                .push_bind(*kind)
                .push_bind(*tenant)
                .push_bind(*user)
                .push_bind(*roles)
                .push_bind(now_ms)
                .push_bind(caller);
        });
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// The tenants among `names` as they stand in the open write.
async fn found_tenants(
    tx: &mut Transaction<'static, Sqlite>,
    names: &[String],
) -> Result<HashMap<String, Found>> {
    let mut found = HashMap::new();
    for chunk in names.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT tenant_id, deleted_at IS NOT NULL FROM tenants WHERE tenant_id IN (",
        );
        let mut list = query.separated(", ");
        for name in chunk {
            list.push_bind(name.as_str());
        }
        query.push(")");
        let rows: Vec<(String, bool)> = query.build_query_as().fetch_all(&mut **tx).await?;
        for (tenant, purging) in rows {
            found.insert(tenant, if purging { Found::Purging } else { Found::Live });
        }
    }
    Ok(found)
}

/// Each pair's live roles after the batch, comma-separated (its history row).
async fn roles_after<'p>(
    tx: &mut Transaction<'static, Sqlite>,
    pairs: &[(&'p str, &'p str)],
) -> Result<HashMap<(&'p str, &'p str), String>> {
    let mut roles: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let now = now_unix();
    for chunk in pairs.chunks(ROWS_PER_STATEMENT) {
        // The pairs as a table joined to the memberships: each searched by index.
        let mut query =
            QueryBuilder::<Sqlite>::new("SELECT m.tenant_id, m.user_id, m.role FROM (VALUES ");
        let mut list = query.separated(", ");
        for (tenant, user) in chunk {
            list.push("(").push_bind_unseparated(*tenant);
            list.push_unseparated(", ").push_bind_unseparated(*user).push_unseparated(")");
        }
        query.push(") p JOIN memberships m ON m.tenant_id = p.column1 AND m.user_id = p.column2");
        query.push(" WHERE (m.expires_at IS NULL OR m.expires_at > ").push_bind(now);
        query.push(") ORDER BY m.tenant_id, m.user_id, m.role");
        let rows: Vec<(String, String, String)> =
            query.build_query_as().fetch_all(&mut **tx).await?;
        for (tenant, user, role) in rows {
            roles.entry((tenant, user)).or_default().push(role);
        }
    }
    Ok(pairs
        .iter()
        .filter_map(|pair| {
            let held = roles.get(&(pair.0.to_owned(), pair.1.to_owned()))?;
            Some((*pair, held.join(",")))
        })
        .collect())
}
