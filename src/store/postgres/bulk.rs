//! Import and export on Postgres (see [`crate::store::bulk`]).
//!
//! A batch is one transaction: the revision row first (as every write takes it), the
//! tenants it names, then its rows `COPY`ed into a staging table dropped at COMMIT, and
//! from there into the memberships and the history by a few set statements, with one
//! notification per touched user (what every replica's listener already understands).
//! Through a transaction-mode pooler this holds too: the staging table lives and dies in
//! the transaction, and its statements are never kept.
//!
//! An export is one `REPEATABLE READ READ ONLY` transaction: every page reads the same
//! snapshot.

use std::collections::HashMap;

use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;

use super::{CHANNEL, LOCK_REVISION, PgStore, bounded};
use crate::{
    domain::{Revision, now_millis, now_unix},
    error::Result,
    store::{
        Announcer, ChangeKind,
        bulk::{self, ExportPage, Found, ImportBatch, Imported, UserMemberships},
        sql,
    },
};

const FOUND_TENANTS: &str = "SELECT tenant_id, deleted_at IS NOT NULL FROM tenants \
    WHERE tenant_id = ANY($1::text[])";
const CREATE_TENANTS: &str = "INSERT INTO tenants (tenant_id, name, created_at) \
    SELECT t, t, $2 FROM unnest($1::text[]) AS t";
const STAGING: &str = "CREATE TEMP TABLE rolecheck_import (tenant_id text COLLATE \"C\" NOT NULL, \
    user_id text COLLATE \"C\" NOT NULL, role text COLLATE \"C\", expires_at bigint) ON COMMIT DROP";
const COPY: &str = "COPY rolecheck_import (tenant_id, user_id, role, expires_at) FROM STDIN";
const REPLACE: &str = "DELETE FROM memberships m USING \
    (SELECT DISTINCT tenant_id, user_id FROM rolecheck_import) s \
    WHERE m.tenant_id = s.tenant_id AND m.user_id = s.user_id";
/// After [`REPLACE`], none of the staged rows is held: a plain insert (no conflict to
/// arbitrate).
const INSERT: &str = "INSERT INTO memberships (tenant_id, user_id, role, expires_at) \
    SELECT tenant_id, user_id, role, expires_at FROM rolecheck_import WHERE role IS NOT NULL";
/// Merging: each staged row inserted, or its expiry set when already held. (No join: a
/// join with the memberships is planned as a scan of them all, cheap as the planner sees
/// a batch against the table, slow as it runs.)
const MERGE: &str = "INSERT INTO memberships (tenant_id, user_id, role, expires_at) \
    SELECT tenant_id, user_id, role, expires_at FROM rolecheck_import WHERE role IS NOT NULL \
    ON CONFLICT (tenant_id, user_id, role) DO UPDATE SET expires_at = excluded.expires_at";
/// For [`REPLACE`]: the memberships probed by index, one staged pair at a time.
const BY_INDEX: &str = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";
/// One history row per pair at the batch's revision `$1`, with its live roles at `$2`.
const HISTORY: &str = "INSERT INTO changes \
    (revision, kind, tenant_id, user_id, roles, committed_at, caller) \
    SELECT $1, 'm', s.tenant_id, s.user_id, coalesce((SELECT string_agg(m.role, ',' ORDER BY m.role) \
        FROM memberships m WHERE m.tenant_id = s.tenant_id AND m.user_id = s.user_id \
        AND (m.expires_at IS NULL OR m.expires_at > $2)), ''), $3, $4 \
    FROM (SELECT DISTINCT tenant_id, user_id FROM rolecheck_import) s";
const HISTORY_CREATED: &str = "INSERT INTO changes \
    (revision, kind, tenant_id, user_id, roles, committed_at, caller) \
    SELECT $1, 'c', t, '', '', $2, $3 FROM unnest($4::text[]) AS t";
/// `<revision>:m:<user>` for each touched user, delivered at COMMIT.
const NOTIFY: &str = "SELECT count(pg_notify($1, $2::text || ':m:' || user_id)) \
    FROM (SELECT DISTINCT user_id FROM rolecheck_import) s";

impl PgStore {
    /// Applies `batch` at one revision.
    pub(super) async fn import(&self, batch: &ImportBatch) -> Result<Imported> {
        let run = async {
            let mut tx = self.pool.begin_with(self.session.begin.clone()).await?;
            let kept = self.session.persistent();
            sqlx::query(LOCK_REVISION).persistent(kept).execute(&mut *tx).await?;
            let names = bulk::tenants(batch);
            let rows: Vec<(String, bool)> = sqlx::query_as(FOUND_TENANTS)
                .persistent(kept)
                .bind(&names)
                .fetch_all(&mut *tx)
                .await?;
            let found: HashMap<String, Found> = rows
                .into_iter()
                .map(|(tenant, purging)| {
                    (tenant, if purging { Found::Purging } else { Found::Live })
                })
                .collect();
            let (accepted, create, rejected) = bulk::sort_out(batch, &found)?;
            if accepted.is_empty() {
                let (revision,): (i64,) =
                    sqlx::query_as(sql::REVISION).persistent(kept).fetch_one(&mut *tx).await?;
                let revision = revision as Revision;
                return Ok((None, Imported { revision, rejected, ..Default::default() }));
            }
            let now_ms = now_millis();
            let (revision, memberships) =
                self.write(&mut tx, batch, (&accepted, &create), now_ms).await?;
            // Memberships: the staged rows less the markers of a tenant replaced by none.
            let markers = accepted.iter().flat_map(|u| u.tenants.values()).filter(|r| r.is_empty());
            let imported = Imported {
                revision: revision as Revision,
                memberships: memberships - markers.count() as u64,
                tenants_created: create,
                rejected,
                touched: accepted.iter().map(|user| user.user.clone()).collect(),
            };
            Ok::<_, crate::error::Error>((Some(tx), imported))
        };
        let (tx, imported) = bounded(self.query_timeout, &self.suspicion, run).await?;
        let Some(tx) = tx else { return Ok(imported) };
        let announcement = sql::Announcement {
            // NOTIFY announces at COMMIT.
            announcer: Announcer::database(),
            changes: imported.touched.iter().map(|u| (ChangeKind::Membership, u.clone())).collect(),
            fault_after_commit: self.fault_after_commit,
        };
        sql::commit(tx, imported.revision, announcement, None).await?;
        Ok(imported)
    }

    /// Carries out the accepted users of `batch` in the open transaction: the tenants to
    /// create, the rows staged and written, the revision bumped, the history and the
    /// notifications. The revision, and the memberships staged (markers included).
    async fn write(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &ImportBatch,
        (accepted, create): (&[&UserMemberships], &[String]),
        now_ms: i64,
    ) -> Result<(i64, u64)> {
        let kept = self.session.persistent();
        if !create.is_empty() {
            let insert = sqlx::query(CREATE_TENANTS).persistent(kept).bind(create).bind(now_ms);
            insert.execute(&mut **tx).await?;
        }
        // The staging table is new in every batch: its statements are never kept.
        sqlx::query(STAGING).persistent(false).execute(&mut **tx).await?;
        let mut copy = tx.copy_in_raw(COPY).await?;
        copy.send(copy_rows(accepted).into_bytes()).await?;
        let staged = copy.finish().await?;
        if batch.replace {
            sqlx::Executor::execute(&mut **tx, BY_INDEX).await?;
        }
        let statements: &[&str] = match batch.replace {
            true => &[REPLACE, INSERT],
            false => &[MERGE],
        };
        for statement in statements {
            sqlx::query(statement).persistent(false).execute(&mut **tx).await?;
        }
        let (revision,): (i64,) =
            sqlx::query_as(sql::BUMP_REVISION).persistent(kept).fetch_one(&mut **tx).await?;
        let caller = batch.caller.as_str();
        let history = sqlx::query(HISTORY).persistent(false).bind(revision).bind(now_unix());
        history.bind(now_ms).bind(caller).execute(&mut **tx).await?;
        if !create.is_empty() {
            let created = sqlx::query(HISTORY_CREATED).persistent(kept).bind(revision);
            created.bind(now_ms).bind(caller).bind(create).execute(&mut **tx).await?;
        }
        let notify = sqlx::query(NOTIFY).persistent(false).bind(CHANNEL).bind(revision);
        notify.execute(&mut **tx).await?;
        Ok((revision, staged))
    }

    /// Every live membership in one `REPEATABLE READ` snapshot. A reader that stops
    /// reading for a minute ends it (the transaction's idle timeout).
    pub(super) async fn export(&self, out: mpsc::Sender<ExportPage>) -> Result<Revision> {
        let begin = self.session.begin.replacen(
            "BEGIN",
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            1,
        );
        let begin = format!("{begin}; SET LOCAL idle_in_transaction_session_timeout = 60000");
        let mut tx = self.pool.begin_with(begin).await?;
        let kept = self.session.persistent();
        let (revision,): (i64,) =
            sqlx::query_as(sql::REVISION).persistent(kept).fetch_one(&mut *tx).await?;
        let (now, mut pager) = (now_unix(), bulk::Pager::new(revision as Revision));
        while let Some(key) = pager.next_key() {
            let rows = bulk::export_rows(key, now).persistent(kept).fetch_all(&mut *tx).await?;
            if !pager.send(rows, &out).await {
                break;
            }
        }
        Ok(pager.finish(&out).await)
    }
}

/// The staged rows in `COPY`'s text format: one per role, and a marker (no role) for a
/// tenant replaced by none. Tenant ids and roles never hold a backslash, tab or newline,
/// and user ids no tab or newline ([`crate::domain`]); a user id's backslash is escaped.
fn copy_rows(users: &[&UserMemberships]) -> String {
    let mut out = String::new();
    for user in users {
        let id = user.user.replace('\\', "\\\\");
        for (tenant, roles) in &user.tenants {
            if roles.is_empty() {
                out.push_str(&format!("{tenant}\t{id}\t\\N\t\\N\n"));
            }
            for (role, expires) in roles {
                let expires = expires.map_or_else(|| "\\N".to_owned(), |at| at.to_string());
                out.push_str(&format!("{tenant}\t{id}\t{role}\t{expires}\n"));
            }
        }
    }
    out
}
