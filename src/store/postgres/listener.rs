//! The change listener (`LISTEN`, with silence detection) and the sync heartbeat on a
//! connection of its own.

use std::time::{Duration, Instant};

use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::mpsc;

use super::{CHANNEL, SYNC_INTERVAL, Suspicion, bounded};
use crate::{
    domain::Revision,
    store::{ChangeKind, FeedEvent, Stale},
};

/// The store's revision and identity: its epoch and the server's WAL timeline, which a
/// promotion moves to a new one. A standby promoted after an asynchronous failover may
/// lack writes the old primary acknowledged, and its revisions may have caught up with
/// them by the time a listener reconnects; as another timeline it is another store, so
/// every cache built on the old one starts over. (A synchronous failover loses nothing
/// and pays one cold cache for it.)
const IDENTITY: &str = "SELECT value, epoch || '.' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) \
                        FROM store_revision WHERE id = 1";

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
pub(super) struct Link {
    pub(super) pool: PgPool,
    pub(super) connect: PgConnectOptions,
    pub(super) timeout: Duration,
    pub(super) silence: Duration,
    pub(super) suspicion: Suspicion,
    pub(super) sync_channel: String,
    pub(super) epoch: Instant,
}

/// Keeps a `LISTEN` connection, reconnecting with backoff, and forwards what it hears.
/// Hearing nothing at all (not even this replica's own sync, sent every
/// [`SYNC_INTERVAL`]) for `link.silence` means the connection went silent: it is dropped
/// and a new one made, as for a closed one.
///
/// One piece (past 80 lines) on purpose: connecting, proving the revision, and hearing
/// share one connection and one backoff, in the order that makes the proof valid.
pub(super) async fn listen(link: Link, tx: mpsc::Sender<FeedEvent>) {
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
            // Listening already: the revision read next is proof as of no later than now.
            let at = Instant::now();
            let (revision, epoch): (i64, String) =
                sqlx::query_as(IDENTITY).fetch_one(&mut listener).await?;
            Ok((listener, revision as Revision, epoch, at))
        };
        let (mut listener, revision, epoch, at) = match bounded(
            link.timeout,
            &link.suspicion,
            connected,
        )
        .await
        {
            Ok(connected) => connected,
            Err(err) => {
                if link.pool.is_closed() {
                    return;
                }
                tracing::warn!(error = %err, retry_in = ?backoff, "change listener cannot connect");
                let _ = tx.send(FeedEvent::Lost).await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        tracing::info!(revision, "change listener connected");
        backoff = Duration::from_millis(50);
        if tx.send(FeedEvent::Connected { revision, epoch, at }).await.is_err() {
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
            if let Some(event) = event
                && tx.send(event).await.is_err()
            {
                return;
            }
        }
        if link.pool.is_closed() {
            return;
        }
        tracing::warn!(
            "change listener lost its connection; serving from the store until it is back"
        );
        let _ = tx.send(FeedEvent::Lost).await;
    }
}

/// Sends this replica's sync notification every [`SYNC_INTERVAL`], on a connection of its
/// own (not the pool's, so no load on the pool can delay it past the lease). The revision
/// in it is read in the same statement, so every commit up to it precedes the sync in the
/// queue. A send that fails, or takes longer than the listener waits for a sync (two leases: a
/// later one would be of no use), drops the connection.
pub(super) async fn heartbeat(link: Link, tx: mpsc::Sender<FeedEvent>) {
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
        if let Err(err) = bounded(link.silence, &link.suspicion, sent).await {
            tracing::debug!(error = %err, "sync notification failed; reconnecting");
            conn = None; // dropped: its socket is closed at once
        }
    }
}
