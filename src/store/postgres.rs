//! The production store: Postgres, with a change feed over `LISTEN/NOTIFY`.
//!
//! Every write transaction sends `NOTIFY rolecheck, '<revision>:<kind>:<subject>'`, which
//! Postgres delivers at commit, in commit order (so in revision order). The subject is
//! the user of a membership change, or the tenant of a deleted one (`<revision>:d:<tenant>`:
//! every member's roles read before it), so the payload stays far below the 8000-byte
//! limit even when a tenant with a million members is deleted.
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
//!
//! A network path that goes silent (a failover behind a virtual IP, a dropped conntrack
//! entry: sockets stay open, nothing arrives) must not hang anything for good:
//! - every connection asks the server for `statement_timeout` and
//!   `idle_in_transaction_session_timeout` of the query timeout (so a silenced client's
//!   transaction releases its locks), TCP keepalive and `tcp_user_timeout` on the server's
//!   socket, and `idle_session_timeout` longer than the pool's idle timeout;
//! - on the client side every database call is bounded by the query timeout (sqlx 0.8
//!   does not expose its sockets, so no TCP option can be set there): the loader and the
//!   writer here, every other call in [`MeasuredStore`](super::MeasuredStore);
//! - a connection returned to the pool is pinged with a deadline before it is reused, and
//!   closed if it does not answer (sqlx's own release check would wait forever); after a
//!   silence was noticed, idle connections are pinged the same way before they are handed
//!   out;
//! - the listener reconnects when it has heard nothing, not even its own sync, for
//!   `listener_silence`, and the heartbeat runs on a connection of its own, so neither
//!   waits on the pool.
//!
//! One cost remains: sqlx's `PgListener`, when dropped, sends `UNLISTEN *` from a task of
//! its own with no deadline; on a silenced socket that task waits until the kernel gives
//! the connection up. So each listener connection comes from a one-connection pool of its
//! own, never the shared one, and a reconnect after a silence leaves at most that task and
//! its socket behind for that long.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{
    Connection, PgConnection, PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::{
    OwnedMutexGuard,
    mpsc::{self, UnboundedReceiver, UnboundedSender},
    oneshot,
};

use crate::{
    domain::{Revision, TenantId, UserId, UserRoles},
    error::{Error, Result},
    store::{
        Announcer, ChangeKind, ChangeRef, Feed, FeedEvent, MAX_QUEUED_WRITES, MembershipWrite,
        Stale, StoreOptions, WriteKind, sql,
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

/// Longest a pooled connection may take to answer the ping that proves it is still
/// usable (on release, and on acquire after a silence): a quarter of the query timeout,
/// between 100 ms and 1 s, so an acquire that meets a few silenced connections still
/// ends well inside the query timeout.
fn ping_timeout(query_timeout: Duration) -> Duration {
    (query_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Pool connections idle this long are closed (the server's `idle_session_timeout` is
/// longer, so it only ever ends sessions whose client went silent).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest a kept connection may have gone unused and still be used.
const HOLD_IDLE: Duration = Duration::from_secs(1);

/// A pooled connection kept across back-to-back batches while more are queued, so a busy
/// writer or loader pays no release (and no release ping) between them; given back when
/// its queue runs dry or a batch fails (it may be broken, or left mid-query by a
/// deadline), and not reused after [`HOLD_IDLE`] unused.
#[derive(Default)]
struct Held(Option<(sqlx::pool::PoolConnection<Postgres>, Instant)>);

impl Held {
    async fn get(&mut self, pool: &PgPool) -> Result<&mut PgConnection> {
        if self.0.as_ref().is_some_and(|(_, used)| used.elapsed() > HOLD_IDLE) {
            self.0 = None;
        }
        let (conn, used) = match &mut self.0 {
            Some(held) => held,
            empty => empty.insert((pool.acquire().await?, Instant::now())),
        };
        *used = Instant::now();
        Ok(&mut **conn)
    }

    /// Gives the connection back to the pool.
    fn release(&mut self) {
        self.0 = None;
    }
}

/// When a silence or a timed-out call was last seen, in milliseconds since `epoch`: idle
/// connections older than that are pinged before use.
#[derive(Clone)]
struct Suspicion {
    epoch: Instant,
    at_millis: Arc<AtomicU64>,
}

impl Suspicion {
    fn new() -> Self {
        Self { epoch: Instant::now(), at_millis: Arc::new(AtomicU64::new(0)) }
    }

    /// Something did not answer in time: distrust every connection idle since before now.
    fn raise(&self) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.at_millis.fetch_max(now, Ordering::SeqCst);
    }

    /// Whether a connection idle for `idle_for` was already idle when suspicion was raised.
    fn covers(&self, idle_for: Duration) -> bool {
        let at = self.at_millis.load(Ordering::SeqCst);
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        at != 0 && now.saturating_sub(idle_for.as_millis() as u64) <= at
    }
}

/// Pings `conn` with a deadline: whether it answered.
async fn answers(conn: &mut PgConnection, within: Duration) -> bool {
    matches!(tokio::time::timeout(within, conn.ping()).await, Ok(Ok(())))
}

/// The options every connection starts with: server-side timeouts and keepalive.
fn session_options(connect: PgConnectOptions, timeout: Duration) -> PgConnectOptions {
    let millis = timeout.as_millis().max(1).to_string();
    let idle = (POOL_IDLE_TIMEOUT * 2).as_millis().to_string();
    connect.application_name("rolecheck").options([
        ("statement_timeout", millis.as_str()),
        ("idle_in_transaction_session_timeout", millis.as_str()),
        ("idle_session_timeout", idle.as_str()),
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", millis.as_str()),
    ])
}

/// Runs `call` for at most `timeout`; past it, raises `suspicion` and answers
/// `UNAVAILABLE`.
async fn bounded<T>(
    timeout: Duration,
    suspicion: &Suspicion,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => {
            suspicion.raise();
            tracing::warn!(?timeout, "the database did not answer in time");
            Err(Error::Unavailable("store unavailable: no answer in time".into()))
        }
    }
}

/// A membership write, and where its revision goes.
type PendingWrite = (MembershipWrite, oneshot::Sender<Result<Revision>>);

/// A user whose roles were asked for, and where the answer goes.
type PendingLoad = (String, oneshot::Sender<Result<UserRoles>>);

/// Memberships in Postgres. One pool serves reads and writes.
pub struct PgStore {
    pool: PgPool,
    /// How to open a connection outside the pool (the heartbeat's).
    connect: PgConnectOptions,
    query_timeout: Duration,
    listener_silence: Duration,
    suspicion: Suspicion,
    application_id: TenantId,
    /// This process's writers take turns at the revision row (see `commit_guard`).
    committing: tokio::sync::Mutex<()>,
    /// Misses for the coalescing loader (see the module docs).
    loads: UnboundedSender<PendingLoad>,
    /// Membership writes for the batch writer (see the module docs), at most
    /// [`MAX_QUEUED_WRITES`] waiting.
    writes: mpsc::Sender<PendingWrite>,
    fault_after_commit: Option<Duration>,
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
        let connect = session_options(connect, options.query_timeout);
        let suspicion = Suspicion::new();
        let (on_acquire, on_release) = (suspicion.clone(), suspicion.clone());
        let ping = ping_timeout(options.query_timeout);
        let connecting = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(POOL_IDLE_TIMEOUT)
            // No ping round trip before every query: a dead connection fails the query
            // itself (UNAVAILABLE, fail closed) and is dropped from the pool. Only after a
            // silence are connections that sat idle through it pinged first.
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                let suspicion = on_acquire.clone();
                Box::pin(async move {
                    Ok(!suspicion.covers(meta.idle_for) || answers(conn, ping).await)
                })
            })
            // sqlx pings every released connection and waits for the answer with no
            // deadline; this ping has one, and a connection that misses it is closed.
            .after_release(move |conn, _| {
                let suspicion = on_release.clone();
                Box::pin(async move {
                    let alive = answers(conn, ping).await;
                    if !alive {
                        suspicion.raise();
                    }
                    Ok(alive)
                })
            })
            .connect_with(connect.clone());
        let pool =
            tokio::time::timeout(options.acquire_timeout.max(options.query_timeout), connecting)
                .await
                .map_err(|_| Error::Unavailable("store unavailable: no answer in time".into()))??;
        let (loads, pending) = tokio::sync::mpsc::unbounded_channel();
        let timeout = options.query_timeout;
        tokio::spawn(coalesce_loads(pool.clone(), pending, timeout, suspicion.clone()));
        let (writes, queued) = mpsc::channel(MAX_QUEUED_WRITES);
        let writer =
            Writer { timeout, suspicion: suspicion.clone(), fault: options.fault_after_commit };
        tokio::spawn(write_batches(pool.clone(), queued, writer));
        Ok(Self {
            pool,
            connect,
            application_id: application_id.clone(),
            committing: Default::default(),
            loads,
            writes,
            fault_after_commit: options.fault_after_commit,
            query_timeout: timeout,
            listener_silence: options.listener_silence,
            suspicion,
        })
    }

    /// Applies the embedded migrations. Refuses a schema newer than this binary knows.
    ///
    /// Migrations run on a connection of their own with no `statement_timeout` (building
    /// an index on a long history may take longer than any query should), which is
    /// closed afterwards so the setting never reaches the pool.
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = PgConnection::connect_with(&self.connect).await?;
        sqlx::query("SET statement_timeout = 0").execute(&mut conn).await?;
        let migrated = self.migrator().run(&mut conn).await;
        let _ = conn.close().await;
        migrated?;
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
    async fn write_guard(&self) -> Result<Option<OwnedMutexGuard<()>>> {
        Ok(None)
    }

    /// Held from taking the revision until COMMIT returns. The revision row lock already
    /// orders writers; queueing this process's writers here instead of on the row lock
    /// spares Postgres waking every waiting backend at each commit (measured: Grant
    /// throughput, see BENCHMARKS.md).
    async fn commit_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.committing.lock().await)
    }

    /// Queues the write for the batch writer (see the module docs). A full queue is
    /// `UNAVAILABLE` at once. A caller that goes away while its write is still queued
    /// drops it: the writer skips writes nobody waits for, so a write never lands after
    /// its caller gave up on it unseen (and perhaps retried elsewhere).
    async fn write_member(&self, write: &MembershipWrite) -> Result<Revision> {
        let (tx, rx) = oneshot::channel();
        let closed = || Error::Unavailable("store closed".into());
        self.writes.try_send((write.clone(), tx)).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => {
                Error::Unavailable("store unavailable: too many writes queued, retry".into())
            }
            mpsc::error::TrySendError::Closed(_) => closed(),
        })?;
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

    /// Every write transaction takes the revision row before anything else (the same
    /// order as `rolecheck_apply`, migration 0006), so writers never deadlock.
    async fn lock_first(&self, tx: &mut Transaction<'static, Postgres>) -> Result<()> {
        sqlx::query("SELECT 1 FROM store_revision WHERE id = 1 FOR UPDATE")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// `NOTIFY` announces at COMMIT.
    fn announcer(&self) -> Announcer {
        Announcer::database()
    }

    fn fault_after_commit(&self) -> Option<Duration> {
        self.fault_after_commit
    }

    /// Starts the listener and the sync heartbeat; both stop when the feed is dropped.
    async fn feed(&self) -> Result<Feed> {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let sync_channel = format!("rolecheck_sync_{:016x}", rand::random::<u64>());
        let epoch = Instant::now();
        let link = Link {
            pool: self.pool.clone(),
            connect: self.connect.clone(),
            timeout: self.query_timeout,
            silence: self.listener_silence,
            suspicion: self.suspicion.clone(),
            sync_channel,
            epoch,
        };
        tokio::spawn(listen(link.clone(), tx.clone()));
        tokio::spawn(heartbeat(link, tx));
        Ok(Feed { events, needs_lease: true })
    }
}

/// Applies a batch of membership writes; one revision (or -1: no such tenant) per write.
const APPLY: &str = "SELECT rolecheck_apply($1::text::jsonb, $2, $3)";

/// `first` and whatever else `next` has right now, up to `max` in all.
fn take_batch<T>(first: T, mut next: impl FnMut() -> Option<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match next() {
            Some(item) => batch.push(item),
            None => break,
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

/// How the batch writer runs: each batch within `timeout`, and the test fault point.
struct Writer {
    timeout: Duration,
    suspicion: Suspicion,
    fault: Option<Duration>,
}

/// Runs the writes queued on `queued`, a batch at a time. Ends when the store is dropped.
async fn write_batches(pool: PgPool, mut queued: mpsc::Receiver<PendingWrite>, writer: Writer) {
    let mut held = Held::default();
    while let Some(first) = queued.recv().await {
        let mut batch = take_batch(first, || queued.try_recv().ok(), WRITE_BATCH);
        // Writes whose caller went away before the database saw them are dropped.
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        write_batch(&pool, &mut held, batch, &writer).await;
        // Keep the connection only for a next batch that is already waiting.
        if queued.is_empty() {
            held.release();
        }
    }
}

async fn write_batch(pool: &PgPool, held: &mut Held, batch: Vec<PendingWrite>, writer: &Writer) {
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
    let body = serde_json::Value::Array(writes).to_string();
    let mut attempt = 1;
    let applied = loop {
        let once = async {
            let conn = held.get(pool).await?;
            let run = async {
                let mut tx = conn.begin().await?;
                let revisions: Vec<(i64,)> = sqlx::query_as(APPLY)
                    .bind(&body)
                    .bind(crate::domain::now_unix())
                    .bind(crate::domain::now_millis())
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(revisions)
            };
            Ok::<_, Error>(run.await)
        };
        match bounded(writer.timeout, &writer.suspicion, once).await {
            Ok(Ok(revisions)) => break Ok(revisions),
            // A serialization failure or deadlock rolled the whole batch back: try again,
            // a few times, before any caller hears of it.
            Ok(Err(err)) if attempt < WRITE_ATTEMPTS && is_retryable(&err) => {
                tracing::debug!(error = %err, attempt, "write batch retried");
                attempt += 1;
            }
            Ok(Err(err)) => break Err(Error::from(err)),
            Err(err) => break Err(err),
        }
    };
    if applied.is_err() {
        held.release();
    }
    if let Some(delay) = writer.fault {
        tokio::time::sleep(delay).await;
    }
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
        // The whole batch rolled back: no write in it is any caller's own fault, and
        // each may simply be retried.
        Err(err) => {
            tracing::warn!(error = %err, writes = batch.len(), "write batch failed");
            fail_all(batch, Error::Unavailable("store unavailable, retry".into()));
        }
    }
}

/// Attempts of a write batch that fails with a serialization failure or a deadlock.
const WRITE_ATTEMPTS: u32 = 3;

/// A serialization failure (40001) or a deadlock (40P01): the transaction can be retried.
fn is_retryable(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
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
async fn coalesce_loads(
    pool: PgPool,
    mut pending: UnboundedReceiver<PendingLoad>,
    timeout: Duration,
    suspicion: Suspicion,
) {
    // The loads in flight, each with the connection it keeps between batches.
    let (slots, mut free) = mpsc::channel::<Held>(LOAD_CONCURRENCY);
    for _ in 0..LOAD_CONCURRENCY {
        let _ = slots.try_send(Held::default());
    }
    while let Some(first) = pending.recv().await {
        let Some(mut slot) = free.recv().await else { return };
        let mut batch = take_batch(first, || pending.try_recv().ok(), LOAD_BATCH);
        // Skip loads nobody waits for any more (a caller that gave up, or a batch that
        // only tried the cache without waiting).
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            let _ = slots.try_send(slot);
            continue;
        }
        // Keep the connection for the next load only while loads are queued already.
        let busy = !pending.is_empty();
        let (pool, suspicion, slots) = (pool.clone(), suspicion.clone(), slots.clone());
        tokio::spawn(async move {
            load_batch(&pool, &mut slot, batch, timeout, &suspicion).await;
            if !busy {
                slot.release();
            }
            let _ = slots.try_send(slot);
        });
    }
}

type UsersRolesRow = (i64, String, Option<String>, Option<String>, Option<i64>);
/// (tenant, role, expires_at)
type HeldRow = (String, String, Option<i64>);

async fn load_batch(
    pool: &PgPool,
    held: &mut Held,
    batch: Vec<PendingLoad>,
    timeout: Duration,
    suspicion: &Suspicion,
) {
    let mut users: Vec<&str> = batch.iter().map(|(user, _)| user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let read = async {
        let conn = held.get(pool).await?;
        Ok(sqlx::query_as::<_, UsersRolesRow>(USERS_ROLES).bind(&users).fetch_all(conn).await?)
    };
    let rows = match bounded(timeout, suspicion, read).await {
        Ok(rows) => rows,
        Err(e) => {
            held.release();
            return fail_all(batch, e);
        }
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

/// Bumps the revision, inserts the history row and queues the
/// `<revision>:<kind>:<subject>` notification (the user of a membership change, the
/// tenant of a deleted one), in one statement.
const RECORD_CHANGE: &str = "\
    WITH r AS (UPDATE store_revision SET value = value + 1 WHERE id = 1 RETURNING value), \
    c AS (INSERT INTO changes (revision, kind, tenant_id, user_id, roles, committed_at, caller) \
        SELECT value, $1::text, $2, $3, $4, $5, $6 FROM r RETURNING revision) \
    SELECT revision, pg_notify($7, revision || ':' || $1::text || ':' || \
        CASE WHEN $1::text = 'd' THEN $2 ELSE $3 END) FROM c";

/// Parses `<revision>:<kind>:<user>`.
fn parse_change(payload: &str) -> Option<FeedEvent> {
    let mut parts = payload.splitn(3, ':');
    let revision = parts.next()?.parse().ok()?;
    let kind = ChangeKind::from_code(parts.next()?)?;
    let user = parts.next().unwrap_or_default();
    Some(FeedEvent::Changed { revision, stale: Stale::of(kind, user, revision) })
}

/// Parses the sync payload `<micros since epoch>:<revision>`.
fn parse_sync(payload: &str, epoch: Instant) -> Option<FeedEvent> {
    let (micros, revision) = payload.split_once(':')?;
    let at = epoch + Duration::from_micros(micros.parse().ok()?);
    Some(FeedEvent::Synced { revision: revision.parse().ok()?, at })
}

/// What the listener and the heartbeat share.
#[derive(Clone)]
struct Link {
    pool: PgPool,
    connect: PgConnectOptions,
    timeout: Duration,
    silence: Duration,
    suspicion: Suspicion,
    sync_channel: String,
    epoch: Instant,
}

/// Keeps a `LISTEN` connection, reconnecting with backoff, and forwards what it hears.
/// Hearing nothing at all (not even this replica's own sync, sent every
/// [`SYNC_INTERVAL`]) for `link.silence` means the connection went silent: it is dropped
/// and a new one made, as for a closed one.
async fn listen(link: Link, tx: UnboundedSender<FeedEvent>) {
    let mut backoff = Duration::from_millis(50);
    while !tx.is_closed() {
        let connected = async {
            // A pool of one of its own for each connection: sqlx's listener hands its
            // connection back with `UNLISTEN *` and no deadline, which on a silenced
            // socket would hold a slot of the shared pool for good.
            let own = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(link.timeout)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_lazy_with(
                    link.connect
                        .clone()
                        .application_name("rolecheck-listener")
                        // It only listens: never end it for being idle.
                        .options([("idle_session_timeout", "0")]),
                );
            let mut listener = PgListener::connect_with(&own).await?;
            listener.eager_reconnect(false);
            listener.listen_all([CHANNEL, link.sync_channel.as_str()]).await?;
            let (revision,): (i64,) =
                sqlx::query_as(sql::REVISION).fetch_one(&mut listener).await?;
            Ok((listener, revision as Revision))
        };
        let (mut listener, revision) = match bounded(link.timeout, &link.suspicion, connected).await
        {
            Ok(connected) => connected,
            Err(err) => {
                if link.pool.is_closed() {
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
            let heard = match tokio::time::timeout(link.silence, listener.try_recv()).await {
                Ok(heard) => heard,
                Err(_) => {
                    link.suspicion.raise();
                    tracing::warn!(
                        silence = ?link.silence,
                        "change listener heard nothing, not even its own sync; reconnecting"
                    );
                    break;
                }
            };
            let event = match heard {
                Ok(Some(n)) if n.channel() == link.sync_channel => {
                    parse_sync(n.payload(), link.epoch)
                }
                Ok(Some(n)) => parse_change(n.payload()),
                Ok(None) | Err(_) => break,
            };
            if let Some(event) = event {
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
        if link.pool.is_closed() {
            return;
        }
        tracing::warn!(
            "change listener lost its connection; serving from the store until it is back"
        );
        let _ = tx.send(FeedEvent::Lost);
    }
}

/// Sends this replica's sync notification every [`SYNC_INTERVAL`], on a connection of its
/// own (not the pool's, so no load on the pool can delay it past the lease). The revision
/// in it is read in the same statement, so every commit up to it precedes the sync in the
/// queue. A send that fails or takes longer than the query timeout drops the connection.
async fn heartbeat(link: Link, tx: UnboundedSender<FeedEvent>) {
    let mut ticker = tokio::time::interval(SYNC_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<PgConnection> = None;
    while !tx.is_closed() && !link.pool.is_closed() {
        ticker.tick().await;
        if conn.is_none() {
            let options = link.connect.clone().application_name("rolecheck-heartbeat");
            let connect = async { Ok(PgConnection::connect_with(&options).await?) };
            match bounded(link.timeout, &link.suspicion, connect).await {
                Ok(connected) => conn = Some(connected),
                Err(err) => {
                    tracing::debug!(error = %err, "heartbeat cannot connect");
                    continue;
                }
            }
        }
        let Some(connection) = conn.as_mut() else { continue };
        let micros = link.epoch.elapsed().as_micros().to_string();
        let sent = async {
            sqlx::query(
                "SELECT pg_notify($1, $2 || ':' || (SELECT value FROM store_revision WHERE id = 1))",
            )
            .bind(&link.sync_channel)
            .bind(micros)
            .execute(&mut *connection)
            .await?;
            Ok(())
        };
        if let Err(err) = bounded(link.timeout.min(SYNC_INTERVAL * 5), &link.suspicion, sent).await
        {
            tracing::debug!(error = %err, "sync notification failed; reconnecting");
            conn = None; // dropped: its socket is closed at once
        }
    }
}

super::sql_store::sql_store!(PgStore, sqlx::Postgres);
