//! The read path, history pruning and the purge of deleted tenants, written once for both
//! SQL backends over [`Run`]: all a backend supplies is how a statement runs (SQLite on
//! its read pool and its one write connection; Postgres through its pool, under the
//! session rules of `postgres::Session`). Writes stay with each backend: how a write is
//! serialised and announced is where the two differ.
//!
//! # Bounded upkeep
//!
//! Pruning and purging delete any number of rows, so they delete in chunks of about
//! [`CHUNK`] rows, each a statement in a transaction of its own. None runs into the
//! statement timeout, however big the table. None holds writers behind it for longer than
//! one chunk (on SQLite, whose writes share one connection) or at all (on Postgres: a chunk
//! takes none of the locks a write takes, neither the revision row nor a live tenant's
//! rows).
//!
//! - Pruning first raises the floor (`pruned_through`), so a reader of the history hears
//!   of a gap before there is one, then deletes below it from the oldest revision up.
//! - Deleting a tenant with more than [`CHUNK`] memberships is one short write that marks
//!   it deleted (`tenants.deleted_at`): from that revision on, every read and write treats
//!   it as gone. The purge then deletes its memberships by ranges of user id, and its row
//!   last, which frees the id (taking it again before that is `UNAVAILABLE`, retry). A
//!   smaller tenant goes whole in its own write, as it always has.
//!
//! A replica of a release before this one, still running during a rolling upgrade, does
//! not know the mark: until the purge ends, it would read a marked tenant's memberships.
//! Finish a rollout before deleting a tenant of more than [`CHUNK`] memberships.

use async_trait::async_trait;
use sqlx::{FromRow, postgres::PgRow, sqlite::SqliteRow};

use crate::{
    domain::{Revision, TenantId, UnixSeconds, UserId, UserRoles},
    error::{Error, Result},
    store::{
        ChangeFilter, History, HistoryEntry, HistoryLog, Member, StoredModel, Tenant, TenantReads,
        sql,
    },
};

/// The most rows one upkeep statement deletes (a purge chunk may pass it by the roles of
/// its last user).
pub const CHUNK: i64 = 10_000;

/// A statement parameter.
#[derive(Clone, Copy, Debug)]
pub enum Bind<'a> {
    Text(&'a str),
    Int(i64),
}

/// A row both backends can decode.
pub trait Row:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'static
{
}

impl<T> Row for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'static
{
}

/// How a backend runs a statement: the one part of the read path each writes itself.
#[async_trait]
pub trait Run: Send + Sync + 'static {
    /// The rows of a read.
    async fn rows<O: Row>(&self, statement: &str, binds: &[Bind<'_>]) -> Result<Vec<O>>;

    /// Runs one statement that is not a write in the revision's sense (upkeep), in a
    /// transaction of its own under the statement timeout; the rows it affected.
    async fn execute(&self, statement: &str, binds: &[Bind<'_>]) -> Result<u64>;
}

/// Everything `user` holds, with the revision, in one snapshot.
pub async fn user_roles(run: &impl Run, user: &UserId) -> Result<UserRoles> {
    let rows: Vec<sql::UserRoleRow> =
        run.rows(sql::USER_ROLES, &[Bind::Text(user.as_str())]).await?;
    Ok(sql::user_roles_from(user.as_str(), rows))
}

/// The error of a tenant create that found the id taken: `UNAVAILABLE` while the tenant
/// that had it is being purged (the id is free once it is), else `err` as it was.
pub async fn taken(run: &impl Run, id: &TenantId, err: Error) -> Error {
    if !matches!(err, Error::AlreadyExists(_)) {
        return err;
    }
    match run.rows::<(i32,)>(sql::TENANT_PURGING, &[Bind::Text(id.as_str())]).await {
        Ok(rows) if !rows.is_empty() => Error::Unavailable(format!(
            "tenant {id} was deleted and its memberships are still being purged; retry shortly"
        )),
        _ => err,
    }
}

#[async_trait]
impl<R: Run> TenantReads for R {
    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u32,
        now: UnixSeconds,
    ) -> Result<(Vec<Member>, Revision)> {
        let after = after.map_or("", |user| user.as_str());
        let binds = [
            Bind::Text(tenant.as_str()),
            Bind::Text(after),
            Bind::Int(now),
            Bind::Int(limit.into()),
        ];
        Ok(sql::members_from(self.rows(sql::LIST_MEMBERS, &binds).await?))
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Tenant> {
        let rows: Vec<sql::TenantRow> =
            self.rows(sql::GET_TENANT, &[Bind::Text(id.as_str())]).await?;
        sql::tenant_found(id, rows.into_iter().next())
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: u32) -> Result<Vec<Tenant>> {
        let after = after.map_or("", |id| id.as_str());
        let binds = [Bind::Text(after), Bind::Int(limit.into())];
        let rows: Vec<sql::TenantRow> = self.rows(sql::LIST_TENANTS, &binds).await?;
        Ok(rows.into_iter().map(sql::tenant_from_row).collect())
    }

    async fn get_model(&self) -> Result<StoredModel> {
        let rows: Vec<(i64, String)> = self.rows(sql::GET_MODEL, &[]).await?;
        let (revision, spec) = rows.into_iter().next().unwrap_or_default();
        Ok(StoredModel { spec, revision: revision as Revision })
    }

    async fn revision(&self) -> Result<Revision> {
        let rows: Vec<(i64,)> = self.rows(sql::REVISION, &[]).await?;
        let (revision,) = rows.into_iter().next().ok_or_else(|| {
            Error::FailedPrecondition(
                "the store has no revision row: run `rolecheck migrate`".into(),
            )
        })?;
        Ok(revision as Revision)
    }
}

#[async_trait]
impl<R: Run> HistoryLog for R {
    async fn changes_after(&self, after: Revision, limit: u32) -> Result<History> {
        let last = i64::from(limit.saturating_sub(1));
        let binds = [Bind::Int(after as i64), Bind::Int(last), Bind::Int(limit.into())];
        Ok(sql::history_from(self.rows(sql::CHANGES_AFTER, &binds).await?))
    }

    async fn list_changes(
        &self,
        filter: &ChangeFilter,
        after: Revision,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>> {
        let statement = sql::list_changes_sql(filter);
        let mut binds = vec![Bind::Int(after as i64)];
        binds.extend(filter.values().map(Bind::Text));
        binds.push(Bind::Int(limit.saturating_sub(1).into()));
        Ok(sql::audit_from(self.rows(&statement, &binds).await?))
    }

    /// Raises the floor, then deletes below it in chunks (see the module docs).
    async fn prune_history(&self, older_than_ms: i64) -> Result<Revision> {
        let newest: Vec<(i64,)> = self.rows(sql::PRUNE_FLOOR, &[Bind::Int(older_than_ms)]).await?;
        let Some((floor,)) = newest.into_iter().next() else { return Ok(0) };
        self.execute(sql::RAISE_FLOOR, &[Bind::Int(floor)]).await?;
        let oldest: Vec<(Option<i64>,)> = self.rows(sql::OLDEST_CHANGE, &[]).await?;
        let mut from = oldest.into_iter().next().and_then(|(oldest,)| oldest).unwrap_or(floor + 1);
        while from <= floor {
            // About CHUNK rows, in whole revisions (an import's revision holds many).
            let bound: Vec<(i64,)> =
                self.rows(sql::PRUNE_BOUND, &[Bind::Int(from), Bind::Int(CHUNK - 1)]).await?;
            let to = bound.into_iter().next().map_or(floor, |(to,)| to).min(floor);
            self.execute(sql::PRUNE_CHANGES, &[Bind::Int(from), Bind::Int(to)]).await?;
            from = to + 1;
        }
        Ok(floor as Revision)
    }

    /// Empties every tenant marked deleted, a chunk at a time, then drops its row.
    async fn purge_deleted_tenants(&self) -> Result<u64> {
        let tenants: Vec<(String,)> = self.rows(sql::DELETED_TENANTS, &[]).await?;
        let mut purged = 0;
        for (tenant,) in tenants {
            let mut after = String::new();
            loop {
                let binds = [Bind::Text(&tenant), Bind::Text(&after), Bind::Int(CHUNK - 1)];
                let bound: Vec<(String,)> = self.rows(sql::PURGE_BOUND, &binds).await?;
                let Some((upto,)) = bound.into_iter().next() else { break };
                let range = [Bind::Text(&tenant), Bind::Text(&after), Bind::Text(&upto)];
                purged += self.execute(sql::PURGE_RANGE, &range).await?;
                after = upto;
            }
            let rest = [Bind::Text(&tenant), Bind::Text(&after)];
            purged += self.execute(sql::PURGE_REST, &rest).await?;
            self.execute(sql::DROP_PURGED_TENANT, &[Bind::Text(&tenant)]).await?;
            tracing::info!(%tenant, purged, "deleted tenant purged");
        }
        Ok(purged)
    }
}
