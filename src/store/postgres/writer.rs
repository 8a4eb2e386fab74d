//! The group-commit writer: one per process, applying every membership write queued
//! while its previous batch ran in one `rolecheck_apply_plans` call and one COMMIT.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;

use super::{Held, PendingWrite, Session, Suspicion, WRITE_BATCH, bounded, fail_all, take_batch};
use crate::{
    domain::Revision,
    error::Error,
    store::{Plan, Remove},
};

/// Carries out a batch of write plans (migration 0007); one revision (or -1: no such
/// tenant) per plan.
const APPLY: &str = "SELECT rolecheck_apply_plans($1::text::jsonb, $2, $3)";

/// How the batch writer runs: each batch within `timeout`, and the test fault point.
pub(super) struct Writer {
    pub(super) timeout: Duration,
    pub(super) suspicion: Suspicion,
    pub(super) fault: Option<Duration>,
    pub(super) session: Session,
}

/// Runs the writes queued on `queued`, a batch at a time. Ends when the store is dropped.
pub(super) async fn write_batches(
    pool: PgPool,
    mut queued: mpsc::Receiver<PendingWrite>,
    writer: Writer,
) {
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
    let plans: Vec<serde_json::Value> =
        batch.iter().map(|(write, _)| plan_json(&write.plan())).collect();
    let body = serde_json::Value::Array(plans).to_string();
    let mut attempt = 1;
    let applied = loop {
        let once = async {
            let conn = held.get(pool, writer.timeout).await?;
            let run = async {
                let mut tx = writer.session.begin(conn).await?;
                let revisions: Vec<(i64,)> = sqlx::query_as(APPLY)
                    .persistent(writer.session.persistent())
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
            let message = format!(
                "rolecheck_apply_plans answered {} of {} writes",
                revisions.len(),
                batch.len()
            );
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

/// Attempts of a write (batch) that fails with a serialization failure or a deadlock.
pub(super) const WRITE_ATTEMPTS: u32 = 3;

/// A serialization failure (40001) or a deadlock (40P01): the transaction can be retried.
pub(super) fn is_retryable(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
}

/// A plan as `rolecheck_apply_plans` reads it.
fn plan_json(plan: &Plan<'_>) -> serde_json::Value {
    let remove = match plan.remove {
        Remove::Nothing => serde_json::Value::Null,
        Remove::All => "all".into(),
        Remove::These(these) => role_names(these).into(),
    };
    serde_json::json!({
        "t": plan.tenant.as_str(),
        "u": plan.user.as_str(),
        "remove": remove,
        "add": role_names(plan.add),
        "e": plan.expires_at,
        "missing_ok": plan.missing_tenant_ok,
        "c": plan.caller,
    })
}

fn role_names(roles: &[crate::domain::Role]) -> Vec<&str> {
    roles.iter().map(|role| role.as_str()).collect()
}
