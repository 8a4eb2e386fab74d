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

use std::time::{Duration, Instant};

use sqlx::{
    PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    domain::{Revision, TenantId},
    error::Result,
    store::{ChangeKind, ChangeRef, Feed, FeedEvent, Stale, StoreOptions, sql},
};

/// The channel every write notifies.
pub const CHANNEL: &str = "rolecheck";
/// How often a replica sends itself a sync notification.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// Memberships in Postgres. One pool serves reads and writes.
pub struct PgStore {
    pool: PgPool,
    application_id: TenantId,
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
        Ok(Self { pool, application_id: application_id.clone() })
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

    /// Keeps concurrent writes to one membership apart until this one commits (a
    /// transaction-scoped advisory lock on a hash of the pair; a collision only makes two
    /// unrelated writes wait for each other).
    async fn lock_member(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        tenant: &TenantId,
        user: &crate::domain::UserId,
    ) -> Result<()> {
        sqlx::query(LOCK_MEMBER)
            .bind(tenant.as_str())
            .bind(user.as_str())
            .execute(&mut **tx)
            .await?;
        Ok(())
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

/// Serializes writes to one (tenant, user) for the rest of the transaction.
const LOCK_MEMBER: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(10) || $2, 0))";

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
