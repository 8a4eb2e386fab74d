//! `Import` and `Export`: memberships in bulk (see [`crate::store::bulk`]).
//!
//! An import is read as it streams in, user by user, into batches of about
//! [`BATCH_MEMBERSHIPS`] memberships of whole users. One task reads and checks the next
//! batch while the store applies the one before (at most one waits between them), so the
//! server holds two batches at a time however long the stream, and the store is never
//! idle waiting for the wire. A user that is invalid (an id, a role, an expiry, a role a
//! strict model does not declare) is skipped whole and reported with its line; with
//! `strict`, the import stops there instead (the batches before it stay applied: the
//! command line checks a whole file before it sends any of it). A stream that breaks off
//! applies nothing read after the break.

use std::collections::{BTreeMap, HashMap};

use prost_types::Timestamp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::{
    cache::model::Models,
    domain::{MAX_IMPORTED_MEMBERSHIPS, Role, TenantId, UserId, now_unix},
    error::{Error, Result},
    pb,
    store::{ExportPage, ImportBatch, Store, UserMemberships},
};

/// Memberships a batch gathers before it is applied (whole users: the user that passes
/// it goes whole into it).
pub const BATCH_MEMBERSHIPS: usize = 5_000;
/// Rejections an answer lists (it counts them all).
const LISTED_REJECTIONS: usize = 1_000;

/// The server stream type of `Export`.
pub type ExportStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportResponse, Status>> + Send>>;

/// The server stream type of `Import`.
pub type ImportStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ImportResponse, Status>> + Send>>;

/// Reads an import stream and applies it in batches, answering after each batch and
/// once at the end (`done`).
pub fn import(
    (store, models, application): (Store, std::sync::Arc<Models>, TenantId),
    caller: String,
    stream: Streaming<pb::ImportRequest>,
) -> ImportStream {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let (batches, read) = mpsc::channel(1);
        let reader = tokio::spawn(gather(models, application, stream, batches));
        let mut progress = Progress { tx: tx.clone(), done: Default::default(), listed: 0 };
        let mut ended = apply_all(&store, &caller, read, &mut progress).await;
        match ended {
            // The stream ended as the reader read it whole, or the reader failed (never
            // taken for the end of the stream).
            Ok(true) => {
                if reader.await.is_err() {
                    ended = Err(progress.stopped(Status::internal("the import's reader failed")));
                }
            }
            // Stopped early (a failed batch, the caller gone): the reader stops too.
            _ => reader.abort(),
        }
        let last = match ended {
            Ok(true) => {
                let mut done = progress.done;
                if done.batches == 0 {
                    match store.tenants.revision().await {
                        Ok(revision) => done.revision = revision,
                        Err(err) => return drop(tx.send(Err(err.into())).await),
                    }
                }
                done.done = true;
                let (users, revision) = (done.users, done.revision);
                tracing::info!(users, batches = done.batches, revision, "import done");
                Ok(done)
            }
            Ok(false) => return,
            Err(status) => Err(status),
        };
        let _ = tx.send(last).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

/// What an import has done, and where it is told.
struct Progress {
    tx: mpsc::Sender<Result<pb::ImportResponse, Status>>,
    done: pb::ImportResponse,
    /// Rejections listed so far.
    listed: usize,
}

impl Progress {
    fn reject(&mut self, line: u64, user_id: String, reason: String) {
        self.done.rejected_count += 1;
        if self.listed < LISTED_REJECTIONS {
            self.listed += 1;
            self.done.rejected.push(pb::ImportRejection { line, user_id, reason });
        }
    }

    /// Tells what was done since the last time; false when the caller is gone.
    async fn tell(&mut self) -> bool {
        let told = self.done.clone();
        self.done.rejected.clear();
        self.done.tenants_created.clear();
        self.tx.send(Ok(told)).await.is_ok()
    }

    /// `status`, saying what was applied before it.
    fn stopped(&self, status: Status) -> Status {
        let done = &self.done;
        let message = match done.batches {
            0 => format!("{}; nothing was applied", status.message()),
            n => format!(
                "{}; {n} batches before it were applied ({} users, through revision {}): run \
                 the import again to finish it (it is idempotent)",
                status.message(),
                done.users,
                done.revision
            ),
        };
        Status::new(status.code(), message)
    }
}

/// What the reader hands the applier, in stream order.
enum Read {
    /// A batch, and the users skipped while it was gathered (line, user, reason).
    Batch(Batch, pb::ImportOptions, Vec<(u64, String, String)>),
    /// The import stops here (a bad line under `strict`, a broken stream): what came
    /// before is applied, then this is the answer.
    Stop(Status),
}

/// Reads the stream into batches for [`apply_all`]; stops when it is gone.
async fn gather(
    models: std::sync::Arc<Models>,
    application: TenantId,
    stream: Streaming<pb::ImportRequest>,
    batches: mpsc::Sender<Read>,
) {
    if let Err(status) = read(&models, &application, stream, &batches).await {
        let _ = batches.send(Read::Stop(status)).await;
    }
}

async fn read(
    models: &Models,
    application: &TenantId,
    mut stream: Streaming<pb::ImportRequest>,
    batches: &mpsc::Sender<Read>,
) -> Result<(), Status> {
    let model = models.fresh().await?;
    let declared = |role: &str| !model.model.strict() || model.model.declares(role);
    let mut options: Option<pb::ImportOptions> = None;
    let (mut batch, mut rejected) = (Batch::default(), Vec::new());
    while let Some(request) = stream.message().await? {
        let options = *options.get_or_insert_with(|| request.options.unwrap_or_default());
        for user in request.users {
            let (line, id) = (user.line, user.user_id.clone());
            match user_from(user, application, &declared) {
                Ok(user) => batch.add(user),
                Err(reason) if options.strict => {
                    let message = format!("line {line}: user {id:?}: {reason}");
                    return Err(Status::invalid_argument(message));
                }
                Err(reason) => rejected.push((line, id, reason)),
            }
            if batch.memberships >= BATCH_MEMBERSHIPS {
                let read =
                    Read::Batch(std::mem::take(&mut batch), options, std::mem::take(&mut rejected));
                if batches.send(read).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    let _ = batches.send(Read::Batch(batch, options.unwrap_or_default(), rejected)).await;
    Ok(())
}

/// Applies what the reader hands over, telling the caller after each batch: true when
/// the stream ended and every batch was applied, false when the caller is gone.
async fn apply_all(
    store: &Store,
    caller: &str,
    mut batches: mpsc::Receiver<Read>,
    progress: &mut Progress,
) -> Result<bool, Status> {
    while let Some(read) = batches.recv().await {
        let (batch, options, rejected) = match read {
            Read::Batch(batch, options, rejected) => (batch, options, rejected),
            Read::Stop(status) => return Err(progress.stopped(status)),
        };
        for (line, user, reason) in rejected {
            progress.reject(line, user, reason);
        }
        if !batch.users.is_empty() {
            apply(store, batch, &options, caller, progress).await?;
            if !progress.tell().await {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// The batch being gathered: users by id, merged when one comes twice.
#[derive(Default)]
struct Batch {
    users: Vec<UserMemberships>,
    index: HashMap<String, usize>,
    memberships: usize,
}

impl Batch {
    fn add(&mut self, user: UserMemberships) {
        self.memberships += user.memberships().max(1);
        match self.index.get(&user.user) {
            Some(&at) => {
                for (tenant, roles) in user.tenants {
                    self.users[at].tenants.entry(tenant).or_default().extend(roles);
                }
            }
            None => {
                self.index.insert(user.user.clone(), self.users.len());
                self.users.push(user);
            }
        }
    }
}

/// Applies a gathered batch and adds what it did to `progress`.
async fn apply(
    store: &Store,
    gathered: Batch,
    options: &pb::ImportOptions,
    caller: &str,
    progress: &mut Progress,
) -> Result<(), Status> {
    let batch = ImportBatch {
        users: gathered.users,
        replace: options.replace,
        create_tenants: options.create_tenants,
        strict: options.strict,
        caller: caller.to_owned(),
    };
    let imported = match store.writes.import_batch(&batch).await {
        Ok(imported) => imported,
        Err(err) => return Err(progress.stopped(err.into())),
    };
    let done = &mut progress.done;
    if !imported.touched.is_empty() {
        done.batches += 1;
        done.revision = imported.revision;
    }
    done.users += imported.touched.len() as u64;
    done.memberships += imported.memberships;
    done.tenants_created.extend(imported.tenants_created);
    for rejected in imported.rejected {
        progress.reject(rejected.line, rejected.user, rejected.reason);
    }
    Ok(())
}

/// A user from the wire, checked; the reason it is skipped otherwise. Roles already
/// expired are not held, so they are left out (a tenant replaced by only those loses the
/// user).
fn user_from(
    user: pb::UserMemberships,
    application: &TenantId,
    declared: &impl Fn(&str) -> bool,
) -> std::result::Result<UserMemberships, String> {
    let reason = |err: Error| match err {
        Error::InvalidArgument { field, reason } => format!("{field} {reason}"),
        other => other.to_string(),
    };
    UserId::validate("user_id", &user.user_id).map_err(reason)?;
    let now = now_unix();
    let mut tenants: BTreeMap<String, BTreeMap<String, Option<i64>>> = BTreeMap::new();
    for held in user.tenants {
        let tenant = match held.tenant_id.is_empty() {
            true => application.as_str().to_owned(),
            false => {
                TenantId::parse("tenant_id", &held.tenant_id).map_err(reason)?.as_str().to_owned()
            }
        };
        let expires = expiry(held.expires_at.as_ref())?;
        let roles = tenants.entry(tenant).or_default();
        for role in held.roles {
            Role::validate("role", &role).map_err(reason)?;
            if !declared(&role) {
                return Err(format!(
                    "{role} is not a role the model declares, and the model is strict"
                ));
            }
            if expires.is_none_or(|at| at > now) {
                roles.insert(role, expires);
            }
        }
    }
    let user = UserMemberships { user: user.user_id, line: user.line, tenants };
    if user.memberships() > MAX_IMPORTED_MEMBERSHIPS {
        return Err(format!("more than {MAX_IMPORTED_MEMBERSHIPS} memberships"));
    }
    Ok(user)
}

fn expiry(at: Option<&Timestamp>) -> std::result::Result<Option<i64>, String> {
    match at {
        None => Ok(None),
        Some(ts) if (0..1_000_000_000).contains(&ts.nanos) => Ok(Some(ts.seconds)),
        Some(_) => Err("expires_at nanos must be within 0..1e9".into()),
    }
}

/// Streams every membership at one revision.
pub fn export(store: &Store) -> ExportStream {
    let (pages, mut read) = mpsc::channel::<ExportPage>(2);
    let (tx, rx) = mpsc::channel(2);
    let backend = store.backend.clone();
    tokio::spawn(async move {
        let forward = async {
            while let Some(page) = read.recv().await {
                if tx.send(Ok(page_to_pb(page))).await.is_err() {
                    break;
                }
            }
            // Dropped: an export still reading stops.
            drop(read);
        };
        let (exported, ()) = tokio::join!(backend.export(pages), forward);
        if let Err(err) = exported {
            let _ = tx.send(Err(err.into())).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn page_to_pb(page: ExportPage) -> pb::ExportResponse {
    pb::ExportResponse {
        revision: page.revision,
        users: page.users.into_iter().map(user_to_pb).collect(),
    }
}

/// A user on the wire: one entry per tenant and expiry.
pub fn user_to_pb(user: UserMemberships) -> pb::UserMemberships {
    let mut tenants = Vec::new();
    for (tenant_id, roles) in user.tenants {
        let mut by_expiry: BTreeMap<Option<i64>, Vec<String>> = BTreeMap::new();
        for (role, expires) in roles {
            by_expiry.entry(expires).or_default().push(role);
        }
        for (expires, roles) in by_expiry {
            let expires_at = expires.map(|seconds| Timestamp { seconds, nanos: 0 });
            tenants.push(pb::TenantRoles { tenant_id: tenant_id.clone(), roles, expires_at });
        }
    }
    pb::UserMemberships { user_id: user.user, tenants, line: 0 }
}
