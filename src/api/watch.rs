//! `Watch`: the committed history after a revision, then every new commit as it lands.
//!
//! The stream reads the history table in revision order. Revisions follow commit order,
//! so once revision r is visible every revision below it is too: reading `revision > last`
//! never skips one. New commits wake the stream through the coherence feed; a poll every
//! [`POLL`] covers a feed that is down.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::role_check::WatchStream;
use crate::{
    coherence::Coherence,
    domain::Revision,
    pb,
    store::{ChangeKind, HistoryEntry, Store},
};

/// History rows read per query.
const PAGE: u32 = 500;
/// Longest a stream waits without re-reading the history.
const POLL: Duration = Duration::from_secs(1);

fn kind(kind: ChangeKind) -> pb::ChangeKind {
    match kind {
        ChangeKind::Membership => pb::ChangeKind::Membership,
        ChangeKind::TenantCreated => pb::ChangeKind::TenantCreated,
        ChangeKind::TenantDeleted => pb::ChangeKind::TenantDeleted,
    }
}

/// A history entry on the wire.
pub fn to_pb(entry: HistoryEntry) -> pb::Change {
    pb::Change {
        tenant_id: entry.tenant_id,
        user_id: entry.user_id,
        roles: entry.roles,
        kind: kind(entry.kind).into(),
        caller: entry.caller,
    }
}

/// Streams every change committed after `after` until the client goes away.
pub fn stream(store: Arc<dyn Store>, coherence: Arc<Coherence>, after: Revision) -> WatchStream {
    let (tx, rx) = mpsc::channel::<Result<pb::WatchResponse, Status>>(16);
    tokio::spawn(async move {
        let mut last = after;
        let mut applied = coherence.watch_applied();
        loop {
            let history = match store.changes_after(last, PAGE).await {
                Ok(history) => history,
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            };
            if last < history.pruned_through {
                let oldest = history.pruned_through;
                let message = format!(
                    "history through revision {oldest} was pruned; resume from after_revision {oldest} or later"
                );
                let _ = tx.send(Err(Status::out_of_range(message))).await;
                return;
            }
            let full = history.entries.len() == PAGE as usize;
            let mut entries = history.entries.into_iter().peekable();
            while let Some(first) = entries.next() {
                let revision = first.revision;
                let mut changes = vec![to_pb(first)];
                while let Some(next) = entries.next_if(|e| e.revision == revision) {
                    changes.push(to_pb(next));
                }
                if tx.send(Ok(pb::WatchResponse { revision, changes })).await.is_err() {
                    return;
                }
                last = revision;
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = applied.wait_for(|applied| *applied > last) => {}
                () = tokio::time::sleep(POLL) => {}
                () = tx.closed() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
