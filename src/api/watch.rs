//! `Watch`: the committed history after a revision, then every new commit as it lands.
//!
//! One history reader per process (the [`WatchHub`]) follows the store: each time the
//! coherence feed applies a new revision (or every [`POLL`] when the feed is down) it
//! reads what was committed since and broadcasts it to every open stream. So a commit
//! costs one history query however many streams are open, and the database pool and the
//! coherence heartbeat never compete with watchers.
//!
//! A stream first subscribes to the broadcast, then catches up from the store on its own
//! (`revision > after_revision`, in pages), then forwards what the hub broadcasts,
//! skipping what it already sent. Revisions follow commit order, so once revision r is
//! visible every revision below it is too: whatever the hub broadcast before the stream
//! subscribed is visible to the catch-up read, and whatever it broadcasts after is in the
//! subscription; none is missed, none sent twice. A stream that falls behind the
//! broadcast buffer catches up from the store again.
//!
//! Streams are capped per caller and per server ([`WatchLimits`]); past a cap, the call is
//! `RESOURCE_EXHAUSTED`.
//!
//! A resume that cannot be honoured is `OUT_OF_RANGE`, never a wait: an `after_revision`
//! beyond the store's revision or an `epoch` other than the store's (the store started
//! over, see `crate::coherence`), or history pruned past it. When this process sees its
//! store start over, every open stream ends the same way.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::{
    coherence::Coherence,
    domain::Revision,
    pb,
    store::{HistoryEntry, Store},
};

/// History rows read per query.
const PAGE: u32 = 500;
/// Longest the hub waits without re-reading the history.
const POLL: Duration = Duration::from_secs(1);
/// Revisions the broadcast buffers for a slow stream before it must catch up itself.
const BUFFER: usize = 1024;

/// The server stream type of `Watch`.
pub type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Groups entries (in revision order) into one response per revision.
fn responses(entries: Vec<HistoryEntry>) -> Vec<pb::WatchResponse> {
    let mut out: Vec<pb::WatchResponse> = Vec::new();
    for entry in entries {
        match out.last_mut() {
            Some(last) if last.revision == entry.revision => {
                last.changes.push(super::audit::to_pb(entry))
            }
            _ => out.push(pb::WatchResponse {
                revision: entry.revision,
                changes: vec![super::audit::to_pb(entry)],
                ..Default::default()
            }),
        }
    }
    out
}

/// How many Watch streams may be open: in all, and per caller.
pub struct WatchLimits {
    total: Arc<Semaphore>,
    max_total: usize,
    max_per_caller: usize,
    per_caller: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream's place under the limits; released when dropped.
pub struct WatchPermit {
    _total: OwnedSemaphorePermit,
    caller: String,
    per_caller: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.per_caller.lock()
            && let Some(n) = counts.get_mut(&self.caller)
        {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

impl WatchLimits {
    /// At most `max_total` streams, `max_per_caller` of them for one caller.
    pub fn new(max_total: usize, max_per_caller: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            max_per_caller,
            per_caller: Arc::default(),
        }
    }

    /// A place for one more stream of `caller`, or `RESOURCE_EXHAUSTED`.
    pub fn admit(&self, caller: &str) -> Result<WatchPermit, Status> {
        let mut counts = self.per_caller.lock().map_err(|_| Status::unavailable("busy"))?;
        let open = counts.get(caller).copied().unwrap_or(0);
        if open >= self.max_per_caller {
            return Err(Status::resource_exhausted(format!(
                "caller {caller} has {open} Watch streams open, the most one caller may \
                 (--max-watch-streams-per-caller)"
            )));
        }
        let total = self.total.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} Watch streams are open, the most this server allows (--max-watch-streams)",
                self.max_total
            ))
        })?;
        counts.insert(caller.to_owned(), open + 1);
        Ok(WatchPermit {
            _total: total,
            caller: caller.to_owned(),
            per_caller: self.per_caller.clone(),
        })
    }
}

/// The process's one history reader, fanning commits out to every Watch stream.
pub struct WatchHub {
    store: Store,
    coherence: Arc<Coherence>,
    live: broadcast::Sender<Arc<pb::WatchResponse>>,
    /// Held while a stream subscribes, and while the reader, finding no subscriber, moves
    /// its mark without reading: so the mark never moves past what a stream that has just
    /// subscribed has yet to read for itself.
    gate: Arc<Mutex<()>>,
    reader: tokio::task::JoinHandle<()>,
    /// Set when the server stops accepting calls: every stream then ends (see
    /// [`close`](Self::close)).
    closing: tokio::sync::watch::Sender<bool>,
}

impl Drop for WatchHub {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl WatchHub {
    /// Starts the reader.
    pub fn start(store: Store, coherence: Arc<Coherence>) -> Arc<Self> {
        let (live, _) = broadcast::channel(BUFFER);
        let gate = Arc::new(Mutex::new(()));
        let reader = tokio::spawn(read_history(
            store.clone(),
            coherence.clone(),
            live.clone(),
            gate.clone(),
        ));
        let closing = tokio::sync::watch::Sender::new(false);
        Arc::new(Self { store, coherence, live, gate, reader, closing })
    }

    /// Refuses a resume from `after` in `epoch` (empty: any) that this store cannot
    /// honour: another epoch, or a revision it never reached.
    pub async fn check_start(&self, after: Revision, epoch: &str) -> Result<(), Status> {
        if let Some(current) = self.coherence.store_epoch()
            && !epoch.is_empty()
            && current != epoch
        {
            return Err(Status::out_of_range(format!(
                "the store started over (epoch {current}, not {epoch}): drop what was built on \
                 the old history and watch from after_revision 0"
            )));
        }
        let revision = self.store.tenants.revision_reaching(after).await?;
        if after > revision {
            return Err(Status::out_of_range(format!(
                "after_revision {after} is ahead of the store (at revision {revision}): it \
                 started over or was restored; drop what was built on the old history"
            )));
        }
        Ok(())
    }

    /// Ends every open stream, and any opened from now on once it has caught up, with
    /// `UNAVAILABLE` naming the revision to watch again from: a stream never ends on its
    /// own, so a server draining for shutdown would otherwise wait out its whole grace
    /// period for its followers' and watchers' streams.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Streams every change committed after `after` until the client goes away; `permit`
    /// is held as long as the stream is open. With `progress`, also a response with no
    /// changes about that often (see [`Progress`]), timed from `opened`, when the request
    /// was received.
    ///
    /// One piece (past 80 lines) on purpose: catching up from the store and following
    /// the hub share the stream's position, its subscription and its progress, and the
    /// order between subscribing and reading is what makes the stream gapless.
    pub fn stream(
        self: &Arc<Self>,
        after: Revision,
        permit: WatchPermit,
        progress: Option<Duration>,
        opened: Instant,
    ) -> WatchStream {
        let (tx, rx) = mpsc::channel::<Result<pb::WatchResponse, Status>>(16);
        let hub = self.clone();
        let mut closing = self.closing.subscribe();
        let mut rewinds = self.coherence.watch_rewinds();
        rewinds.mark_unchanged();
        tokio::spawn(async move {
            let _permit = permit;
            let mut progress = Progress::new(progress, opened);
            let mut last = after;
            loop {
                let mut live = {
                    let _gate = hub.gate.lock();
                    hub.live.subscribe()
                };
                // Catch up from the store.
                loop {
                    let history = match hub.store.history.changes_after(last, PAGE).await {
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
                    let full = history.entries.len() >= PAGE as usize;
                    for response in responses(history.entries) {
                        last = response.revision;
                        if tx.send(Ok(response)).await.is_err() {
                            return;
                        }
                    }
                    if !full {
                        break;
                    }
                }
                // Then follow the hub.
                loop {
                    tokio::select! {
                        got = live.recv() => match got {
                            Ok(response) if response.revision > last => {
                                last = response.revision;
                                if tx.send(Ok((*response).clone())).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        () = progress.tick() => progress.owe(&hub.coherence),
                        Ok(()) = rewinds.changed() => {
                            let message = format!(
                                "the store started over (at revision {}): drop what was built on \
                                 the old history and watch from after_revision 0",
                                hub.coherence.applied()
                            );
                            let _ = tx.send(Err(Status::out_of_range(message))).await;
                            return;
                        }
                        () = tx.closed() => return,
                        true = async { closing.wait_for(|closing| *closing).await.is_ok() } => {
                            let message = format!(
                                "server shutting down; watch again from after_revision {last}"
                            );
                            let _ = tx.send(Err(Status::unavailable(message))).await;
                            return;
                        }
                    }
                    if let Some(response) = progress.due(last, &hub.coherence)
                        && tx.send(Ok(response)).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Progress responses (`WatchRequest.progress_ms`): a response with no changes whose
/// revision says every change through it has been sent, which a follower leases its
/// trust on.
///
/// At each tick, while this server's own view is current, the stream owes a progress
/// response for the revision applied at that moment; it sends it once it has forwarded
/// everything through that revision (at once when idle). So the response proves, as of
/// the tick, that nothing applied here is still on its way; while this server is not
/// current none is sent, and a follower's lease runs out.
struct Progress {
    ticker: Option<tokio::time::Interval>,
    /// The revision owed, and the store's epoch to send with it.
    owed: Option<(Revision, String)>,
    /// When the Watch request was received: each response says when its proof ends
    /// counted from here (`lease_end_ms`).
    opened: Instant,
}

impl Progress {
    fn new(every: Option<Duration>, opened: Instant) -> Self {
        let ticker = every.map(|every| {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        Self { ticker, owed: None, opened }
    }

    /// The next tick; never, without progress responses.
    async fn tick(&mut self) {
        match &mut self.ticker {
            Some(ticker) => {
                ticker.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// A tick: owe a response for what is applied now, if this server is current.
    fn owe(&mut self, coherence: &Coherence) {
        self.owed = coherence
            .is_current()
            .then(|| (coherence.applied(), coherence.store_epoch().unwrap_or_default()));
    }

    /// The response owed, once the stream has sent everything through it, with what is
    /// left of this server's lease as it is sent; none if the lease ran out meanwhile.
    fn due(&mut self, sent: Revision, coherence: &Coherence) -> Option<pb::WatchResponse> {
        let (owed, _) = self.owed.as_ref()?;
        if sent < *owed {
            return None;
        }
        let (_, epoch) = self.owed.take()?;
        let left = coherence.lease_left();
        let end = (self.opened.elapsed() + left).as_millis();
        let left = left.as_millis().min(u128::from(u32::MAX)) as u32;
        (left > 0).then(|| pb::WatchResponse {
            revision: sent,
            changes: Vec::new(),
            epoch,
            lease_left_ms: left,
            lease_end_ms: end.min(u128::from(u64::MAX)) as u64,
        })
    }
}

/// The hub's reader: after each applied revision, reads what was committed since its last
/// read and broadcasts it, a response per revision. With no stream subscribed it reads no
/// history and only moves its mark to the store's revision (a new stream catches up from
/// the store itself).
async fn read_history(
    store: Store,
    coherence: Arc<Coherence>,
    live: broadcast::Sender<Arc<pb::WatchResponse>>,
    gate: Arc<Mutex<()>>,
) {
    let mut applied = coherence.watch_applied();
    let mut rewinds = coherence.watch_rewinds();
    // The mark starts at 0 and moves only by the rules below. (It used to start at the
    // store's revision, read without the gate: a stream that subscribed while that read
    // was slow, at a server's start, could find the mark past revisions its own catch-up
    // read had not seen, and miss them.)
    let mut last = 0;
    loop {
        let idle = {
            let _gate = gate.lock();
            live.receiver_count() == 0
        };
        if idle {
            // Move the mark to a revision this process can already read (the revision
            // row, read in a snapshot), not to the feed's applied revision: a
            // notification may arrive a moment before its transaction is visible to other
            // sessions, and a stream subscribing then would not find it in its own read.
            if let Ok(visible) = store.tenants.revision().await {
                let _gate = gate.lock();
                if live.receiver_count() == 0 {
                    last = last.max(visible);
                }
            }
        } else {
            match store.history.changes_after(last, PAGE).await {
                Ok(history) => {
                    last = last.max(history.pruned_through);
                    let full = history.entries.len() >= PAGE as usize;
                    for response in responses(history.entries) {
                        last = response.revision;
                        let _ = live.send(Arc::new(response));
                    }
                    if full {
                        continue;
                    }
                }
                Err(err) => tracing::debug!(%err, "watch history read failed; retrying"),
            }
        }
        tokio::select! {
            _ = applied.wait_for(|applied| *applied > last) => {}
            () = tokio::time::sleep(POLL) => {}
            // The store started over: its history is read again from where it is now
            // (every stream has ended; new ones catch up for themselves).
            Ok(()) = rewinds.changed() => last = coherence.applied(),
        }
    }
}
