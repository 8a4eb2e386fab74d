//! The production store: Postgres, with a change feed over `LISTEN/NOTIFY`. Split by what
//! runs: this module (the store, its pool and deadlines), [`loader`] (coalesced cache
//! misses), [`writer`] (group-committed membership writes) and [`listener`] (the change
//! listener and the sync heartbeat).
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
//! applies them in one call of `rolecheck_apply_plans` (migration 0007) and one COMMIT, so one
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

use async_trait::async_trait;
use sqlx::{
    Connection, PgConnection, PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::sync::{mpsc, oneshot};

mod bulk;
pub mod diagnose;
mod listener;
mod loader;
mod writer;

use listener::{Link, heartbeat, listen};
use loader::coalesce_loads;
use writer::{WRITE_ATTEMPTS, Writer, is_retryable, write_batches};

use crate::{
    domain::{Revision, TenantId, UserId, UserRoles},
    error::{Error, Result},
    store::{
        Announcer, Answer, Backend, ChangeFeed, ChangeKind, ChangeRef, Feed, MAX_QUEUED_WRITES,
        MembershipWrite, RoleReads, StoreOptions, Tenant, Writes, check_min_revision,
        shared::{self, Bind},
        sql,
    },
};

/// The channel every write notifies.
pub const CHANNEL: &str = "rolecheck";
/// How often a replica sends itself a sync notification.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// At most this many coalesced user loads run at once.
pub const LOAD_CONCURRENCY: usize = 2;
/// At most this many cache misses wait for the loader; past it a miss is
/// `UNAVAILABLE` (a caller that floods misses cannot grow the queue without bound).
pub const MAX_QUEUED_LOADS: usize = 16_384;
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

/// How statements meet the server. Straight to Postgres (or through a session-mode
/// pooler), a connection is one server session: statements are prepared once and kept
/// (sqlx's statement cache), and the session's timeouts come with its startup options.
/// Through a transaction-mode pooler (PgBouncer's `pool_mode = transaction`), each
/// transaction may run on another server session, so nothing may outlive one:
/// - statements are unnamed and never kept (sqlx's `persistent(false)`): a named one would
///   be missing, or already taken, on the next session;
/// - every statement runs inside a transaction: sqlx parses a statement in one round trip
///   and runs it in the next, and between the two, outside a transaction, the pooler
///   may hand the client another session;
/// - the timeouts are `SET LOCAL` at each transaction's start (a pooler refuses the
///   startup options that would set them for the session), and no startup parameter
///   but `application_name` is sent.
#[derive(Clone)]
pub(super) struct Session {
    pooled: bool,
    /// What begins a transaction, with its timeouts when pooled.
    begin: String,
}

impl Session {
    fn new(pooled: bool, timeout: Duration) -> Self {
        let millis = timeout.as_millis().max(1);
        let begin = if pooled {
            format!(
                "BEGIN; SET LOCAL statement_timeout = {millis}; \
                 SET LOCAL idle_in_transaction_session_timeout = {millis}"
            )
        } else {
            "BEGIN".to_owned()
        };
        Self { pooled, begin }
    }

    /// Whether statements are prepared once and kept.
    pub(super) fn persistent(&self) -> bool {
        !self.pooled
    }

    /// Begins a transaction on `conn`.
    pub(super) async fn begin<'c>(
        &self,
        conn: &'c mut PgConnection,
    ) -> sqlx::Result<Transaction<'c, Postgres>> {
        conn.begin_with(self.begin.clone()).await
    }
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
struct Held(Option<(Pooled, Instant)>);

impl Held {
    async fn get(&mut self, pool: &PgPool, timeout: Duration) -> Result<&mut PgConnection> {
        if self.0.as_ref().is_some_and(|(_, used)| used.elapsed() > HOLD_IDLE) {
            self.0 = None;
        }
        let (conn, used) = match &mut self.0 {
            Some(held) => held,
            empty => empty.insert((Pooled::acquire(pool, timeout).await?, Instant::now())),
        };
        *used = Instant::now();
        Ok(&mut **conn)
    }

    /// Gives the connection back to the pool.
    fn release(&mut self) {
        self.0 = None;
    }
}

/// A pooled connection given back to the pool within a deadline.
///
/// sqlx pings every connection given back to its pool, after the `after_release` hook,
/// and waits for the answer with no deadline (sqlx issue 4349, open upstream): a
/// connection given back just as the network to Postgres goes silent holds its pool slot
/// until the kernel gives the socket up. Given back through this, the whole return (the
/// hook's ping, then sqlx's) has [`release_within`] of the query timeout; a return that
/// runs out is dropped, which closes the connection and frees its slot. Every pool use in
/// this store goes through it, but the transactions of tenant writes (rare; sqlx gives an
/// owned transaction's connection back itself).
///
/// Through a transaction-mode pooler, a connection taken for reads ([`Pooled::read`])
/// holds a transaction of its own from the start, committed as it is given back (see
/// [`Session`]).
pub(super) struct Pooled {
    conn: Option<sqlx::pool::PoolConnection<Postgres>>,
    within: Duration,
    /// A transaction this opened, to end as the connection is given back.
    open: bool,
}

/// How long giving a connection back may take: our ping and sqlx's, each at most
/// [`ping_timeout`], and a margin.
fn release_within(query_timeout: Duration) -> Duration {
    ping_timeout(query_timeout) * 2 + Duration::from_millis(100)
}

impl Pooled {
    /// A connection from `pool`, given back within [`release_within`] of `timeout`.
    pub(super) async fn acquire(pool: &PgPool, timeout: Duration) -> Result<Self> {
        let conn = Some(pool.acquire().await?);
        Ok(Self { conn, within: release_within(timeout), open: false })
    }

    /// A connection for statements run on it directly: through a transaction-mode
    /// pooler, inside a transaction begun here.
    pub(super) async fn read(pool: &PgPool, timeout: Duration, session: &Session) -> Result<Self> {
        let mut pooled = Self::acquire(pool, timeout).await?;
        if session.pooled {
            let conn: &mut PgConnection = &mut pooled;
            sqlx::Executor::execute(conn, session.begin.as_str()).await?;
            pooled.open = true;
        }
        Ok(pooled)
    }
}

impl std::ops::Deref for Pooled {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_deref().unwrap_or_else(|| unreachable!("taken only when dropped"))
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!("taken only when dropped"))
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Without a runtime (one shutting down) the connection is dropped: it closes
            // (ending any transaction) and its slot is freed.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
            let (within, open) = (self.within, self.open);
            runtime.spawn(async move {
                let back = async {
                    let raw: &mut PgConnection = &mut conn;
                    if open && let Err(err) = sqlx::Executor::execute(raw, "COMMIT").await {
                        let _ = conn.close().await;
                        return Err(err);
                    }
                    // sqlx's own drop path, run here so it can be bounded.
                    conn.return_to_pool().await;
                    Ok(())
                };
                match tokio::time::timeout(within, back).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::debug!(%err, "a connection given back failed; closed"),
                    Err(_) => {
                        tracing::debug!(?within, "a connection given back did not answer; dropped")
                    }
                }
            });
        }
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

fn parse_url(url: &str, field: &str) -> Result<PgConnectOptions> {
    url.parse::<PgConnectOptions>()
        .map_err(|_| Error::invalid(field, "not a valid postgres:// URL"))
}

/// The pool's connect options and those of a connection of its own straight to
/// Postgres (the listener's, the heartbeat's, migrations'): through a transaction-mode
/// pooler, the pool sends no startup options (see [`Session`]).
fn connect_options(
    url: &str,
    options: &StoreOptions,
) -> Result<(PgConnectOptions, PgConnectOptions)> {
    let timeout = options.query_timeout;
    let pooled = parse_url(url, "database_url")?;
    let direct = match &options.listen_url {
        Some(listen) => session_options(parse_url(listen, "listen_database_url")?, timeout),
        None => session_options(pooled.clone(), timeout),
    };
    let pooled = if options.transaction_pooling {
        pooled.application_name("rolecheck").extra_float_digits(None).statement_cache_capacity(0)
    } else {
        session_options(pooled, timeout)
    };
    Ok((pooled, direct))
}

/// A pool of `connect` with this store's deadlines: a connection is pinged before use
/// only after a silence, and given back only if it answers a ping in time.
async fn open_pool(
    connect: PgConnectOptions,
    options: &StoreOptions,
    suspicion: &Suspicion,
) -> Result<PgPool> {
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
            Box::pin(
                async move { Ok(!suspicion.covers(meta.idle_for) || answers(conn, ping).await) },
            )
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
        .connect_with(connect);
    tokio::time::timeout(options.acquire_timeout.max(options.query_timeout), connecting)
        .await
        .map_err(|_| Error::Unavailable("store unavailable: no answer in time".into()))?
        .map_err(Error::from)
}

/// A membership write, and where its revision goes.
type PendingWrite = (MembershipWrite, oneshot::Sender<Result<Revision>>);

/// A user whose roles were asked for, and where the answer goes.
type PendingLoad = (String, oneshot::Sender<Result<UserRoles>>);

/// Memberships in Postgres. One pool serves reads and writes.
pub struct PgStore {
    pool: PgPool,
    /// How statements meet the server (see [`Session`]).
    session: Session,
    /// How to open a connection of its own, straight to Postgres: the listener's, the
    /// heartbeat's, and migrations'.
    connect: PgConnectOptions,
    query_timeout: Duration,
    listener_silence: Duration,
    suspicion: Suspicion,
    application_id: TenantId,
    /// Misses for the coalescing loader (see the module docs).
    loads: mpsc::Sender<PendingLoad>,
    /// With `--read-database-url`: a current cache's misses, for the standby's loader.
    read_loads: Option<mpsc::Sender<PendingLoad>>,
    read_pool: Option<PgPool>,
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
        let session = Session::new(options.transaction_pooling, options.query_timeout);
        let (pooled, connect) = connect_options(url, options)?;
        let read = match &options.read_url {
            Some(read) => {
                Some(session_options(parse_url(read, "read_database_url")?, options.query_timeout))
            }
            None => None,
        };
        // One connection first, alone, each way: its failure is explained (the pool's
        // would read as a timeout), and a mistake of the operator's is refused at once.
        let within = options.acquire_timeout.max(options.query_timeout);
        let _ = diagnose::probe(&pooled, within).await?.close().await;
        if options.listen_url.is_some() {
            let _ = diagnose::probe(&connect, within).await?.close().await;
        }
        if let Some(read) = &read {
            let _ = diagnose::probe(read, within).await?.close().await;
        }
        let suspicion = Suspicion::new();
        let pool = open_pool(pooled, options, &suspicion).await?;
        let (loads, pending) = mpsc::channel(MAX_QUEUED_LOADS);
        let timeout = options.query_timeout;
        let reader = (timeout, suspicion.clone(), session.clone());
        tokio::spawn(coalesce_loads(pool.clone(), pending, reader));
        // The standby's loader: a pool of its own, direct (no pooler between).
        let (read_loads, read_pool) = match read {
            Some(read) => {
                let read_pool = open_pool(read, options, &suspicion).await?;
                let (read_loads, pending) = mpsc::channel(MAX_QUEUED_LOADS);
                let reader = (timeout, suspicion.clone(), Session::new(false, timeout));
                tokio::spawn(coalesce_loads(read_pool.clone(), pending, reader));
                (Some(read_loads), Some(read_pool))
            }
            None => (None, None),
        };
        let (writes, queued) = mpsc::channel(MAX_QUEUED_WRITES);
        let writer = Writer {
            timeout,
            suspicion: suspicion.clone(),
            fault: options.fault_after_commit,
            session: session.clone(),
        };
        tokio::spawn(write_batches(pool.clone(), queued, writer));
        Ok(Self {
            pool,
            session,
            connect,
            application_id: application_id.clone(),
            loads,
            read_loads,
            read_pool,
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
        let mut conn = PgConnection::connect_with(&self.connect)
            .await
            .map_err(|err| diagnose::explain(err, &self.connect))?;
        sqlx::query("SET statement_timeout = 0").execute(&mut conn).await?;
        let migrated = self.migrator().run(&mut conn).await;
        let _ = conn.close().await;
        migrated?;
        Ok(())
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/postgres")
    }

    /// A connection of the pool, given back within a deadline (see [`Pooled`]).
    async fn conn(&self) -> Result<Pooled> {
        Pooled::read(&self.pool, self.query_timeout, &self.session).await
    }

    /// The pool, for callers that need raw access (tests, benches).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Without migrating: refuses a schema newer than this binary knows, or one that
    /// still needs `rolecheck migrate`.
    pub async fn check_schema(&self) -> Result<()> {
        let known = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let applied = sqlx::query_as(sql::APPLIED_SCHEMA)
            .persistent(self.session.persistent())
            .fetch_one(&mut *self.conn().await?)
            .await;
        sql::schema_status(applied, known)
    }

    /// Creates the application tenant if it does not exist yet. Not a write: the
    /// application tenant is part of the schema's starting state. Committed before this
    /// returns (the server serves once it does): through a transaction-mode pooler, a
    /// statement on [`conn`](Self::conn) commits only as its connection is given back.
    pub async fn ensure_application_tenant(&self, id: &TenantId) -> Result<()> {
        let now = crate::domain::now_millis();
        let binds = [Bind::Text(id.as_str()), Bind::Text("Application"), Bind::Int(now)];
        shared::Run::execute(self, sql::ENSURE_TENANT, &binds).await?;
        Ok(())
    }

    /// Creates or deletes a tenant: one transaction that takes the revision row first (as
    /// every write does, so writers never deadlock), changes the tenant, records the
    /// change; then commits and announces it. A serialization failure or deadlock is
    /// retried a few times before the caller hears of it.
    async fn write_tenant(&self, op: TenantOp<'_>, caller: &str) -> Result<Revision> {
        let (kind, id) = match op {
            TenantOp::Create(tenant) => (ChangeKind::TenantCreated, Some(&tenant.id)),
            TenantOp::Delete(id) => (ChangeKind::TenantDeleted, Some(id)),
            TenantOp::Model(_) => (ChangeKind::ModelChanged, None),
        };
        let change = match id {
            Some(id) => ChangeRef::tenant(kind, id, caller),
            None => ChangeRef::model(caller),
        };
        let mut attempt = 1;
        let (tx, revision) = loop {
            match self.record_tenant_write(op, &change).await {
                Ok(recorded) => break recorded?,
                Err(err) if attempt < WRITE_ATTEMPTS && is_retryable(&err) => {
                    tracing::debug!(error = %err, attempt, "tenant write retried");
                    attempt += 1;
                }
                Err(err) => match id {
                    Some(id) => {
                        return Err(shared::taken(self, id, sql::tenant_taken(id, err)).await);
                    }
                    None => return Err(err.into()),
                },
            }
        };
        let announcement = sql::Announcement {
            // NOTIFY announces at COMMIT.
            announcer: Announcer::database(),
            changes: vec![(kind, change.subject().to_owned())],
            fault_after_commit: self.fault_after_commit,
        };
        sql::commit(tx, revision, announcement, None).await
    }

    /// One attempt of [`write_tenant`](Self::write_tenant), up to (not including) COMMIT.
    /// The outer error is the database's (perhaps worth a retry); the inner one, the
    /// write's own outcome.
    async fn record_tenant_write(
        &self,
        op: TenantOp<'_>,
        change: &ChangeRef<'_>,
    ) -> std::result::Result<Result<(Transaction<'static, Postgres>, Revision)>, sqlx::Error> {
        let mut tx = self.pool.begin_with(self.session.begin.clone()).await?;
        let persistent = self.session.persistent();
        sqlx::query(LOCK_REVISION).persistent(persistent).execute(&mut *tx).await?;
        match op {
            TenantOp::Create(tenant) => {
                sqlx::query(sql::INSERT_TENANT)
                    .persistent(persistent)
                    .bind(tenant.id.as_str())
                    .bind(tenant.name.as_str())
                    .bind(tenant.created_at_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            TenantOp::Delete(id) => {
                let (size,): (i64,) = sqlx::query_as(sql::TENANT_SIZE)
                    .persistent(persistent)
                    .bind(id.as_str())
                    .bind(shared::CHUNK + 1)
                    .fetch_one(&mut *tx)
                    .await?;
                // A big tenant is marked deleted here and purged in chunks (see `shared`).
                let deleted = if size > shared::CHUNK {
                    sqlx::query(sql::MARK_TENANT_DELETED)
                        .persistent(persistent)
                        .bind(id.as_str())
                        .bind(crate::domain::now_millis())
                        .execute(&mut *tx)
                        .await?
                } else {
                    sqlx::query(sql::DELETE_TENANT_MEMBERS)
                        .persistent(persistent)
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(sql::DELETE_TENANT)
                        .persistent(persistent)
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?
                };
                if deleted.rows_affected() == 0 {
                    return Ok(Err(Error::NotFound(format!("tenant {id} not found"))));
                }
            }
            TenantOp::Model(spec) => {
                sqlx::query(sql::PUT_MODEL)
                    .persistent(persistent)
                    .bind(spec)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql::MODEL_SET_NOW).persistent(persistent).execute(&mut *tx).await?;
            }
        }
        let (revision,): (i64,) = sqlx::query_as(RECORD)
            .persistent(persistent)
            .bind(change.kind.code())
            .bind(change.tenant)
            .bind(change.user)
            .bind("")
            .bind(crate::domain::now_millis())
            .bind(change.caller)
            .fetch_one(&mut *tx)
            .await?;
        Ok(Ok((tx, revision as Revision)))
    }
}

/// A write committed on its own, not batched: a tenant's creation or deletion, or the
/// model (rare writes, each its own transaction).
#[derive(Clone, Copy)]
enum TenantOp<'a> {
    Create(&'a Tenant),
    Delete(&'a TenantId),
    /// The model file to set.
    Model(&'a str),
}

/// Takes the revision row, the first lock of every write transaction.
const LOCK_REVISION: &str = "SELECT 1 FROM store_revision WHERE id = 1 FOR UPDATE";

/// Bumps the revision, records the change and queues its notification (migration 0007).
const RECORD: &str = "SELECT rolecheck_record($1, $2, $3, $4, $5, $6)";

#[async_trait]
impl RoleReads for PgStore {
    /// Through the coalescing loader (see the module docs).
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Answer> {
        let snapshot = load(&self.loads, user).await?;
        check_min_revision(snapshot.revision, min_revision)?;
        Ok(Answer::new(Arc::new(snapshot)))
    }

    /// From the standby when it has replayed `floor`; from the primary when it has not,
    /// or does not answer.
    async fn user_roles_at_least(&self, user: &UserId, floor: Revision) -> Result<Answer> {
        if let Some(read) = &self.read_loads {
            match load(read, user).await {
                Ok(snapshot) if snapshot.revision >= floor => {
                    return Ok(Answer::new(Arc::new(snapshot)));
                }
                Ok(snapshot) => {
                    tracing::debug!(standby = snapshot.revision, floor, "the standby is behind")
                }
                Err(err) => tracing::debug!(%err, "the standby did not answer"),
            }
        }
        self.user_roles(user, floor).await
    }
}

/// `user`'s roles from the loader fed by `loads`.
async fn load(loads: &mpsc::Sender<PendingLoad>, user: &UserId) -> Result<UserRoles> {
    let (tx, rx) = oneshot::channel();
    let closed = || Error::Unavailable("store closed".into());
    loads.try_send((user.as_str().to_owned(), tx)).map_err(|err| match err {
        mpsc::error::TrySendError::Full(_) => {
            Error::Unavailable("too many cache loads queued; retry".into())
        }
        mpsc::error::TrySendError::Closed(_) => closed(),
    })?;
    rx.await.map_err(|_| closed())?
}

#[async_trait]
impl shared::Run for PgStore {
    /// On a pooled connection (inside a transaction of its own when pooled).
    async fn rows<O: shared::Row>(&self, statement: &str, binds: &[Bind<'_>]) -> Result<Vec<O>> {
        let mut query =
            sqlx::query_as::<Postgres, O>(statement).persistent(self.session.persistent());
        for bind in binds {
            query = match *bind {
                Bind::Text(text) => query.bind(text),
                Bind::Int(int) => query.bind(int),
            };
        }
        Ok(query.fetch_all(&mut *self.conn().await?).await?)
    }

    /// In a transaction of its own, under the statement timeout.
    async fn execute(&self, statement: &str, binds: &[Bind<'_>]) -> Result<u64> {
        let mut conn = Pooled::acquire(&self.pool, self.query_timeout).await?;
        let mut tx = self.session.begin(&mut conn).await?;
        let mut query = sqlx::query::<Postgres>(statement).persistent(self.session.persistent());
        for bind in binds {
            query = match *bind {
                Bind::Text(text) => query.bind(text),
                Bind::Int(int) => query.bind(int),
            };
        }
        let affected = query.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(affected)
    }
}

#[async_trait]
impl Writes for PgStore {
    /// Queues the write for the batch writer (see the module docs). A full queue is
    /// `UNAVAILABLE` at once. A caller that goes away while its write is still queued
    /// drops it: the writer skips writes nobody waits for, so a write never lands after
    /// its caller gave up on it unseen (and perhaps retried elsewhere).
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision> {
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

    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<(Revision, Tenant)> {
        Ok((self.write_tenant(TenantOp::Create(tenant), caller).await?, tenant.clone()))
    }

    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision> {
        sql::deletable(id, &self.application_id)?;
        self.write_tenant(TenantOp::Delete(id), caller).await
    }

    async fn set_model(&self, spec: &str, caller: &str) -> Result<Revision> {
        self.write_tenant(TenantOp::Model(spec), caller).await
    }

    async fn import_batch(
        &self,
        batch: &crate::store::ImportBatch,
    ) -> Result<crate::store::Imported> {
        self.import(batch).await
    }
}

#[async_trait]
impl ChangeFeed for PgStore {
    /// Starts the listener and the sync heartbeat; both stop when the feed is dropped.
    async fn subscribe(&self) -> Result<Feed> {
        let (tx, events) = crate::store::feed_channel();
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

#[async_trait]
impl Backend for PgStore {
    async fn close(&self) {
        if let Some(read_pool) = &self.read_pool {
            read_pool.close().await;
        }
        self.pool.close().await;
    }

    async fn export(&self, out: mpsc::Sender<crate::store::ExportPage>) -> Result<Revision> {
        PgStore::export(self, out).await
    }
}

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
