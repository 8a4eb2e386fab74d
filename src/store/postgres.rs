//! The production store: Postgres, with a change feed over `LISTEN/NOTIFY`.
//!
//! Every write transaction sends `NOTIFY rolecheck, '<revision>:<kind>:<user>'`, which
//! Postgres delivers at commit, in commit order (so in revision order). The payload names
//! one user at most, so it stays far below the 8000-byte limit even when a tenant with a
//! million members is deleted (`<revision>:d:` means "everyone").
//!
//! A listener that silently stops hearing would let a cache serve revoked roles, so each
//! replica also sends itself a sync notification on a private channel every
//! [`SYNC_INTERVAL`]: its arrival proves every commit before it was delivered. The cache
//! trusts the feed only while the last sync is recent (the lease).
//!
//! Reads of one user's roles (cache misses) are coalesced: while [`LOAD_CONCURRENCY`]
//! loads are in flight, the users asked for meanwhile are read together by the next one,
//! in one statement (so one snapshot and one revision for all of them). A lone miss is
//! one query, as before; under load a round trip serves up to [`LOAD_BATCH`] users.
//!
//! Membership writes are group-committed the same way: one writer per process takes
//! every write queued while its previous transaction ran (up to [`WRITE_BATCH`]) and
//! applies them in one call of `rolecheck_apply` (migration 0004) and one COMMIT, so one
//! WAL flush serves the batch. Each write still gets its own revision, history row and
//! notification, in queue order; a caller hears of its revision only after the COMMIT.
//! A write to a missing tenant fails alone (NOT_FOUND); any other failure rolls the whole
//! batch back and every write in it fails (UNAVAILABLE), so nothing is half-written.

use std::time::{Duration, Instant};

use sqlx::{
    PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::{
    Semaphore,
    mpsc::{UnboundedReceiver, UnboundedSender},
    oneshot,
};

use crate::{
    domain::{Revision, TenantId, UserId, UserRoles},
    error::{Error, Result},
    store::{
        ChangeKind, ChangeRef, Feed, FeedEvent, MembershipWrite, Stale, StoreOptions, WriteKind,
        sql,
    },
};

/// The channel every write notifies.
pub const CHANNEL: &str = "rolecheck";
/// How often a replica sends itself a sync notification.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// At most this many coalesced user loads run at once.
pub const LOAD_CONCURRENCY: usize = 2;
/// At most this many users are read by one load.
pub const LOAD_BATCH: usize = 64;

/// At most this many membership writes share one transaction.
pub const WRITE_BATCH: usize = 128;

/// A membership write, and where its revision goes.
type PendingWrite = (MembershipWrite, oneshot::Sender<Result<Revision>>);

/// A user whose roles were asked for, and where the answer goes.
type PendingLoad = (String, oneshot::Sender<Result<UserRoles>>);

/// Memberships in Postgres. One pool serves reads and writes.
pub struct PgStore {
    pool: PgPool,
    application_id: TenantId,
    /// This process's writers take turns at the revision row (see `commit_guard`).
    committing: tokio::sync::Mutex<()>,
    /// Misses for the coalescing loader (see the module docs).
    loads: UnboundedSender<PendingLoad>,
    /// Membership writes for the batch writer (see the module docs).
    writes: UnboundedSender<PendingWrite>,
}

impl PgStore {
    /// Connects to `url`. The URL may hold a password: it is never logged.
    pub async fn connect(
        url: &str,
        application_id: &TenantId,
        options: &StoreOptions,
    ) -> Result<Self> {
        let connect: PgConnectOptions = url.parse().map_err(|_| {
            crate::error::Error::invalid("database_url", "not a valid postgres:// URL")
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // No ping round trip before every query: a dead connection fails the query
            // itself (UNAVAILABLE, fail closed) and is dropped from the pool.
            .test_before_acquire(false)
            .connect_with(connect.application_name("rolecheck"))
            .await?;
        let (loads, pending) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(coalesce_loads(pool.clone(), pending));
        let (writes, queued) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_batches(pool.clone(), queued));
        Ok(Self {
            pool,
            application_id: application_id.clone(),
            committing: Default::default(),
            loads,
            writes,
        })
    }

    /// Applies the embedded migrations. Refuses a schema newer than this binary knows.
    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/postgres")
    }

    /// The pool, for callers that need raw access (tests, benches).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One user's roles, through the coalescing loader.
    async fn read_user(&self, user: &UserId) -> Result<UserRoles> {
        let (tx, rx) = oneshot::channel();
        let closed = || Error::Unavailable("store closed".into());
        self.loads.send((user.as_str().to_owned(), tx)).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    fn read_pool(&self) -> &PgPool {
        &self.pool
    }

    fn write_pool(&self) -> &PgPool {
        &self.pool
    }

    fn application_id(&self) -> &TenantId {
        &self.application_id
    }

    /// Postgres orders concurrent writers itself (the revision row lock).
    async fn write_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        None
    }

    /// Held from taking the revision until COMMIT returns. The revision row lock already
    /// orders writers; queueing this process's writers here instead of on the row lock
    /// spares Postgres waking every waiting backend at each commit (measured: Grant
    /// throughput, see BENCHMARKS.md).
    async fn commit_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.committing.lock().await)
    }

    /// Queues the write for the batch writer (see the module docs).
    async fn write_member(&self, write: &MembershipWrite) -> Result<Revision> {
        let (tx, rx) = oneshot::channel();
        let closed = || Error::Unavailable("store closed".into());
        self.writes.send((write.clone(), tx)).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// One statement takes the next revision (the row lock it holds until COMMIT orders
    /// revisions as commits), records the change and queues its notification, which
    /// Postgres delivers at commit: the lock is held for one round trip and the commit.
    async fn record(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        change: &ChangeRef<'_>,
        roles: String,
    ) -> Result<Revision> {
        let (revision,): (i64,) = sqlx::query_as(RECORD_CHANGE)
            .bind(change.kind.code())
            .bind(change.tenant)
            .bind(change.user)
            .bind(roles)
            .bind(crate::domain::now_millis())
            .bind(change.caller)
            .bind(CHANNEL)
            .fetch_one(&mut **tx)
            .await?;
        Ok(revision as Revision)
    }

    fn committed(&self, _revision: Revision, _change: &ChangeRef<'_>) {}

    /// Starts the listener and the sync heartbeat; both stop when the feed is dropped.
    async fn feed(&self) -> Result<Feed> {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let sync_channel = format!("rolecheck_sync_{:016x}", rand::random::<u64>());
        let epoch = Instant::now();
        tokio::spawn(listen(self.pool.clone(), tx.clone(), sync_channel.clone(), epoch));
        tokio::spawn(heartbeat(self.pool.clone(), tx, sync_channel, epoch));
        Ok(Feed { events, needs_lease: true })
    }
}

/// Applies a batch of membership writes; one revision (or -1: no such tenant) per write.
const APPLY: &str = "SELECT rolecheck_apply($1::text::jsonb, $2, $3)";

/// `first` and whatever else is queued right now, up to `max` in all.
fn take_batch<T>(first: T, queue: &mut UnboundedReceiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

/// Answers every waiter of a batch with (a copy of) `error`.
fn fail_all<K, T>(batch: Vec<(K, oneshot::Sender<Result<T>>)>, error: Error) {
    let shared = std::sync::Arc::new(error);
    for (_, reply) in batch {
        let _ = reply.send(Err(Error::unshare(shared.clone())));
    }
}

/// Runs the writes queued on `queued`, a batch at a time. Ends when the store is dropped.
async fn write_batches(pool: PgPool, mut queued: UnboundedReceiver<PendingWrite>) {
    while let Some(first) = queued.recv().await {
        let batch = take_batch(first, &mut queued, WRITE_BATCH);
        write_batch(&pool, batch).await;
    }
}

async fn write_batch(pool: &PgPool, batch: Vec<PendingWrite>) {
    let writes: Vec<serde_json::Value> = batch
        .iter()
        .map(|(write, _)| {
            let kind = match write.kind {
                WriteKind::Grant => "grant",
                WriteKind::Revoke => "revoke",
                WriteKind::SetRoles => "set",
            };
            serde_json::json!({
                "k": kind,
                "t": write.tenant.as_str(),
                "u": write.user.as_str(),
                "r": write.roles.iter().map(|role| role.as_str()).collect::<Vec<_>>(),
                "e": write.expires_at,
                "c": write.caller,
            })
        })
        .collect();
    let applied = async {
        let mut tx = pool.begin().await?;
        let revisions: Vec<(i64,)> = sqlx::query_as(APPLY)
            .bind(serde_json::Value::Array(writes).to_string())
            .bind(crate::domain::now_unix())
            .bind(crate::domain::now_millis())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok::<_, Error>(revisions)
    }
    .await;
    match applied {
        Ok(revisions) if revisions.len() == batch.len() => {
            for ((write, reply), (revision,)) in batch.into_iter().zip(revisions) {
                let _ = reply.send(if revision < 0 {
                    Err(Error::NotFound(format!("tenant {} not found", write.tenant)))
                } else {
                    Ok(revision as Revision)
                });
            }
        }
        Ok(revisions) => {
            let message =
                format!("rolecheck_apply answered {} of {} writes", revisions.len(), batch.len());
            fail_all(batch, Error::Internal(message.into()));
        }
        Err(e) => fail_all(batch, e),
    }
}

/// Everything each of a list of users holds, with the revision, in one statement. A user
/// with no memberships still gets a row (with NULLs), so every user gets the revision.
const USERS_ROLES: &str = "\
    SELECT r.value, u.user_id, m.tenant_id, m.role, m.expires_at \
    FROM store_revision r CROSS JOIN unnest($1::text[]) AS u(user_id) \
    LEFT JOIN memberships m ON m.user_id = u.user_id \
    WHERE r.id = 1";

/// Runs the loads queued on `pending`: each takes every user queued by the time it
/// starts, up to [`LOAD_BATCH`], with at most [`LOAD_CONCURRENCY`] in flight. Ends when
/// the store is dropped.
async fn coalesce_loads(pool: PgPool, mut pending: UnboundedReceiver<PendingLoad>) {
    let slots = std::sync::Arc::new(Semaphore::new(LOAD_CONCURRENCY));
    while let Some(first) = pending.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = take_batch(first, &mut pending, LOAD_BATCH);
        // Skip loads nobody waits for any more (a caller that gave up, or a batch that
        // only tried the cache without waiting).
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            load_batch(&pool, batch).await;
            drop(slot);
        });
    }
}

type UsersRolesRow = (i64, String, Option<String>, Option<String>, Option<i64>);
/// (tenant, role, expires_at)
type HeldRow = (String, String, Option<i64>);

async fn load_batch(pool: &PgPool, batch: Vec<PendingLoad>) {
    let mut users: Vec<&str> = batch.iter().map(|(user, _)| user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let rows: std::result::Result<Vec<UsersRolesRow>, _> =
        sqlx::query_as(USERS_ROLES).bind(&users).fetch_all(pool).await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return fail_all(batch, e.into()),
    };
    let revision = rows.first().map_or(0, |row| row.0 as Revision);
    let mut held: std::collections::HashMap<&str, Vec<HeldRow>> =
        std::collections::HashMap::with_capacity(users.len());
    for (_, user, tenant, role, expires_at) in &rows {
        let entry = held.entry(user.as_str()).or_default();
        if let (Some(tenant), Some(role)) = (tenant, role) {
            entry.push((tenant.clone(), role.clone(), *expires_at));
        }
    }
    for (user, reply) in batch {
        let rows = held.get(user.as_str()).cloned().unwrap_or_default();
        let _ = reply.send(Ok(UserRoles::from_rows(revision, rows)));
    }
}

/// Bumps the revision, inserts the history row and queues the `<revision>:<kind>:<user>`
/// notification, in one statement.
const RECORD_CHANGE: &str = "\
    WITH r AS (UPDATE store_revision SET value = value + 1 WHERE id = 1 RETURNING value), \
    c AS (INSERT INTO changes (revision, kind, tenant_id, user_id, roles, committed_at, caller) \
        SELECT value, $1::text, $2, $3, $4, $5, $6 FROM r RETURNING revision) \
    SELECT revision, pg_notify($7, revision || ':' || $1::text || ':' || $3) FROM c";

/// Parses `<revision>:<kind>:<user>`.
fn parse_change(payload: &str) -> Option<FeedEvent> {
    let mut parts = payload.splitn(3, ':');
    let revision = parts.next()?.parse().ok()?;
    let kind = ChangeKind::from_code(parts.next()?)?;
    let user = parts.next().unwrap_or_default();
    Some(FeedEvent::Changed { revision, stale: Stale::of(kind, user) })
}

/// Parses the sync payload `<micros since epoch>:<revision>`.
fn parse_sync(payload: &str, epoch: Instant) -> Option<FeedEvent> {
    let (micros, revision) = payload.split_once(':')?;
    let at = epoch + Duration::from_micros(micros.parse().ok()?);
    Some(FeedEvent::Synced { revision: revision.parse().ok()?, at })
}

/// Keeps a `LISTEN` connection, reconnecting with backoff, and forwards what it hears.
async fn listen(
    pool: PgPool,
    tx: UnboundedSender<FeedEvent>,
    sync_channel: String,
    epoch: Instant,
) {
    let mut backoff = Duration::from_millis(50);
    while !tx.is_closed() {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.eager_reconnect(false);
            listener.listen_all([CHANNEL, sync_channel.as_str()]).await?;
            let (revision,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(&pool).await?;
            Ok::<_, sqlx::Error>((listener, revision as Revision))
        }
        .await;
        let (mut listener, revision) = match connected {
            Ok(connected) => connected,
            Err(err) => {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(error = %err, retry_in = ?backoff, "change listener cannot connect");
                let _ = tx.send(FeedEvent::Lost);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        tracing::info!(revision, "change listener connected");
        backoff = Duration::from_millis(50);
        if tx.send(FeedEvent::Connected { revision }).is_err() {
            return;
        }
        loop {
            let event = match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == sync_channel => parse_sync(n.payload(), epoch),
                Ok(Some(n)) => parse_change(n.payload()),
                Ok(None) | Err(_) => break,
            };
            if let Some(event) = event {
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
        if pool.is_closed() {
            return;
        }
        tracing::warn!(
            "change listener lost its connection; serving from the store until it is back"
        );
        let _ = tx.send(FeedEvent::Lost);
    }
}

/// Sends this replica's sync notification every [`SYNC_INTERVAL`]. The revision in it is
/// read in the same statement, so every commit up to it precedes the sync in the queue.
async fn heartbeat(
    pool: PgPool,
    tx: UnboundedSender<FeedEvent>,
    sync_channel: String,
    epoch: Instant,
) {
    let mut ticker = tokio::time::interval(SYNC_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !tx.is_closed() && !pool.is_closed() {
        ticker.tick().await;
        let micros = epoch.elapsed().as_micros().to_string();
        let sent = sqlx::query(
            "SELECT pg_notify($1, $2 || ':' || (SELECT value FROM store_revision WHERE id = 1))",
        )
        .bind(&sync_channel)
        .bind(micros)
        .execute(&pool);
        if let Ok(Err(err)) = tokio::time::timeout(SYNC_INTERVAL * 5, sent).await {
            tracing::debug!(error = %err, "sync notification failed");
        }
    }
}

super::sql_store::sql_store!(PgStore, sqlx::Postgres);
