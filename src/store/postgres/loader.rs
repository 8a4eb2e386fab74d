//! The coalescing loader: cache misses queued while a load runs are read together by the
//! next one, in one statement.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc::{self, Receiver};

use super::{
    Held, LOAD_BATCH, LOAD_CONCURRENCY, PendingLoad, Session, Suspicion, bounded, fail_all,
    take_batch,
};
use crate::domain::{Revision, UserRoles};

/// Everything each of a list of users holds, with the revision, in one statement. A user
/// with no memberships still gets a row (with NULLs), so every user gets the revision.
const USERS_ROLES: &str = "\
    SELECT r.value, r.model_revision, u.user_id, m.tenant_id, m.role, m.expires_at \
    FROM store_revision r CROSS JOIN unnest($1::text[]) AS u(user_id) \
    LEFT JOIN memberships m ON m.user_id = u.user_id \
      AND m.tenant_id NOT IN (SELECT tenant_id FROM tenants WHERE deleted_at IS NOT NULL) \
    WHERE r.id = 1";

/// Runs the loads queued on `pending`: each takes every user queued by the time it
/// starts, up to [`LOAD_BATCH`], with at most [`LOAD_CONCURRENCY`] in flight. Ends when
/// the store is dropped.
pub(super) async fn coalesce_loads(
    pool: PgPool,
    mut pending: Receiver<PendingLoad>,
    (timeout, suspicion, session): (Duration, Suspicion, Session),
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
        let session = session.clone();
        tokio::spawn(async move {
            load_batch(&pool, &mut slot, batch, (timeout, &suspicion, &session)).await;
            if !busy {
                slot.release();
            }
            let _ = slots.try_send(slot);
        });
    }
}

type UsersRolesRow = (i64, i64, String, Option<String>, Option<String>, Option<i64>);
/// (tenant, role, expires_at)
type HeldRow = (String, String, Option<i64>);

async fn load_batch(
    pool: &PgPool,
    held: &mut Held,
    batch: Vec<PendingLoad>,
    (timeout, suspicion, session): (Duration, &Suspicion, &Session),
) {
    let mut users: Vec<&str> = batch.iter().map(|(user, _)| user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let read = async {
        let conn = held.get(pool, timeout).await?;
        let query = sqlx::query_as::<_, UsersRolesRow>(USERS_ROLES)
            .persistent(session.persistent())
            .bind(&users);
        if !session.pooled {
            return Ok(query.fetch_all(conn).await?);
        }
        // Through a transaction-mode pooler, in a transaction (see `Session`).
        let mut tx = session.begin(conn).await?;
        let rows = query.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    };
    let rows = match bounded(timeout, suspicion, read).await {
        Ok(rows) => rows,
        Err(e) => {
            held.release();
            return fail_all(batch, e);
        }
    };
    let (revision, model_revision) =
        rows.first().map_or((0, 0), |row| (row.0 as Revision, row.1 as Revision));
    let mut held: std::collections::HashMap<&str, Vec<HeldRow>> =
        std::collections::HashMap::with_capacity(users.len());
    for (_, _, user, tenant, role, expires_at) in &rows {
        let entry = held.entry(user.as_str()).or_default();
        if let (Some(tenant), Some(role)) = (tenant, role) {
            entry.push((tenant.clone(), role.clone(), *expires_at));
        }
    }
    for (user, reply) in batch {
        let rows = held.get(user.as_str()).cloned().unwrap_or_default();
        let roles = UserRoles::from_rows(&user, revision, rows).under_model(model_revision);
        let _ = reply.send(Ok(roles));
    }
}
