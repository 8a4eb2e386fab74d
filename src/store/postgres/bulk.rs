//! Import and export on Postgres (see [`crate::store::bulk`]).
//!
//! A batch is one transaction: the revision row first (as every write takes it), the
//! tenants it names, then every membership of the pairs it names taken out (and read
//! back when merging), and the pairs as the batch leaves them `COPY`ed straight into the
//! memberships, and their history rows into the history, with one notification per
//! touched user (what every replica's listener already understands). `COPY` is the
//! fastest way into a table Postgres has, and nothing is staged: no temporary table per
//! batch (a catalog write each), no second pass. Through a transaction-mode pooler this
//! holds too: every statement lives and dies in the transaction.
//!
//! An export is one `REPEATABLE READ READ ONLY` transaction: every page reads the same
//! snapshot.

use std::{collections::HashMap, fmt::Write as _};

use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;

use super::{CHANNEL, LOCK_REVISION, PgStore, bounded};
use crate::{
    domain::{Revision, now_millis, now_unix},
    error::Result,
    store::{
        Announcer, ChangeKind,
        bulk::{
            self, ExportPage, Found, HeldRow, ImportBatch, Imported, PairAfter, UserMemberships,
        },
        sql,
    },
};

const FOUND_TENANTS: &str = "SELECT tenant_id, deleted_at IS NOT NULL FROM tenants \
    WHERE tenant_id = ANY($1::text[])";
const CREATE_TENANTS: &str = "INSERT INTO tenants (tenant_id, name, created_at) \
    SELECT t, t, $2 FROM unnest($1::text[]) AS t";
/// The pairs (`$1` tenants, `$2` users) probed by index one at a time: a hash or merge
/// join with the memberships is planned as a scan of them all, cheap as the planner sees
/// a batch against the table, slow as it runs.
const BY_INDEX: &str = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";
/// Replacing: every membership of the pairs (`$1` tenants, `$2` users) removed.
const CLEAR: &str = "DELETE FROM memberships m USING unnest($1::text[], $2::text[]) AS p (t, u) \
    WHERE m.tenant_id = p.t COLLATE \"C\" AND m.user_id = p.u COLLATE \"C\"";
/// Merging: the same, read back to be written again with the batch's roles.
const TAKE: &str = "DELETE FROM memberships m USING unnest($1::text[], $2::text[]) AS p (t, u) \
    WHERE m.tenant_id = p.t COLLATE \"C\" AND m.user_id = p.u COLLATE \"C\" \
    RETURNING m.tenant_id, m.user_id, m.role, m.expires_at";
const COPY_MEMBERSHIPS: &str = "COPY memberships (tenant_id, user_id, role, expires_at) FROM STDIN";
const COPY_HISTORY: &str = "COPY changes \
    (revision, kind, tenant_id, user_id, roles, committed_at, caller) FROM STDIN";
const HISTORY_CREATED: &str = "INSERT INTO changes \
    (revision, kind, tenant_id, user_id, roles, committed_at, caller) \
    SELECT $1, 'c', t, '', '', $2, $3 FROM unnest($4::text[]) AS t";
/// `<revision>:m:<user>` for each touched user (`$3`), delivered at COMMIT.
const NOTIFY: &str = "SELECT count(pg_notify($1, $2::text || ':m:' || u)) \
    FROM unnest($3::text[]) AS u";

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
            let revision = self.write(&mut tx, batch, (&accepted, &create), now_ms).await?;
            let imported = Imported {
                revision: revision as Revision,
                memberships: accepted.iter().map(|user| user.memberships() as u64).sum(),
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
    /// create, the pairs' memberships taken out and written as the batch leaves them, the
    /// revision bumped, the history and the notifications. The revision.
    async fn write(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &ImportBatch,
        (accepted, create): (&[&UserMemberships], &[String]),
        now_ms: i64,
    ) -> Result<i64> {
        let kept = self.session.persistent();
        if !create.is_empty() {
            let insert = sqlx::query(CREATE_TENANTS).persistent(kept).bind(create).bind(now_ms);
            insert.execute(&mut **tx).await?;
        }
        let (tenants, users): (Vec<&str>, Vec<&str>) = accepted
            .iter()
            .flat_map(|user| user.tenants.keys().map(|t| (t.as_str(), user.user.as_str())))
            .unzip();
        sqlx::Executor::execute(&mut **tx, BY_INDEX).await?;
        let held: Vec<HeldRow> = match batch.replace {
            true => {
                let clear = sqlx::query(CLEAR).persistent(kept).bind(&tenants).bind(&users);
                clear.execute(&mut **tx).await?;
                Vec::new()
            }
            false => {
                let take = sqlx::query_as(TAKE).persistent(kept).bind(&tenants).bind(&users);
                take.fetch_all(&mut **tx).await?
            }
        };
        let pairs = bulk::after(accepted, held, batch.replace);
        let mut copy = tx.copy_in_raw(COPY_MEMBERSHIPS).await?;
        copy.send(membership_rows(&pairs).into_bytes()).await?;
        copy.finish().await?;
        let (revision,): (i64,) =
            sqlx::query_as(sql::BUMP_REVISION).persistent(kept).fetch_one(&mut **tx).await?;
        let caller = batch.caller.as_str();
        let mut copy = tx.copy_in_raw(COPY_HISTORY).await?;
        copy.send(history_rows(&pairs, revision, now_ms, caller).into_bytes()).await?;
        copy.finish().await?;
        if !create.is_empty() {
            let created = sqlx::query(HISTORY_CREATED).persistent(kept).bind(revision);
            created.bind(now_ms).bind(caller).bind(create).execute(&mut **tx).await?;
        }
        let touched: Vec<&str> = accepted.iter().map(|user| user.user.as_str()).collect();
        let notify = sqlx::query(NOTIFY).persistent(kept).bind(CHANNEL).bind(revision);
        notify.bind(&touched).execute(&mut **tx).await?;
        Ok(revision)
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

/// Every role of `pairs` as rows in `COPY`'s text format.
fn membership_rows(pairs: &[PairAfter]) -> String {
    let mut out = String::with_capacity(pairs.len() * 64);
    for pair in pairs {
        for (role, expires) in pair.roles.iter() {
            for field in [pair.tenant, pair.user, role] {
                push_field(&mut out, field);
                out.push('\t');
            }
            match expires {
                Some(at) => _ = writeln!(out, "{at}"),
                None => out.push_str("\\N\n"),
            }
        }
    }
    out
}

/// A history row per pair, at `revision`, with its live roles, in `COPY`'s text format.
fn history_rows(pairs: &[PairAfter], revision: i64, now_ms: i64, caller: &str) -> String {
    let (mut out, now) = (String::with_capacity(pairs.len() * 96), now_unix());
    for pair in pairs {
        _ = write!(out, "{revision}\t{}\t", ChangeKind::Membership.code());
        for field in [pair.tenant, pair.user, &pair.live(now)] {
            push_field(&mut out, field);
            out.push('\t');
        }
        _ = write!(out, "{now_ms}\t");
        push_field(&mut out, caller);
        out.push('\n');
    }
    out
}

/// `field` in `COPY`'s text format: its backslashes, tabs and line ends escaped.
fn push_field(out: &mut String, field: &str) {
    if !field.contains(['\\', '\t', '\n', '\r']) {
        return out.push_str(field);
    }
    for c in field.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_are_escaped_and_rows_end_where_they_should() {
        let mut out = String::new();
        push_field(&mut out, "CN=a\\b\tc\nd\re");
        assert_eq!(out, "CN=a\\\\b\\tc\\nd\\re");
        let roles = [("admin".to_owned(), Some(7)), ("viewer".to_owned(), None)].into();
        let user = UserMemberships {
            user: "u\\1".into(),
            line: 1,
            tenants: [("acme".to_owned(), roles)].into(),
        };
        let pairs = bulk::after(&[&user], Vec::new(), true);
        assert_eq!(membership_rows(&pairs), "acme\tu\\\\1\tadmin\t7\nacme\tu\\\\1\tviewer\t\\N\n");
        let history = history_rows(&pairs, 9, 1000, "ops\tkey");
        assert_eq!(history, "9\tm\tacme\tu\\\\1\tviewer\t1000\tops\\tkey\n", "admin expired at 7");
    }
}
