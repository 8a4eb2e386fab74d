//! The model in effect here, and the rule that keeps each answer to one model.
//!
//! Every read of a user's roles says which model was in effect when they were read
//! ([`UserRoles::model_revision`], from the same snapshot: the revision row holds it). A
//! check judges roles only under that model:
//! - none was ever set where they were read: judged exactly, touching nothing shared;
//! - the model held here is that one: judged at once (one read lock);
//! - it is another: the store's model is read (once, however many checks ask); if the
//!   roles predate it, they are read again, at least at its revision (a model change
//!   drops every cached answer on every replica, through the feed, so only a read in
//!   flight across the change meets this).
//!
//! So no answer mixes the roles of one revision with the model of another, whatever
//! `min_revision` asks, here or on a follower (whose upstream's GetAuthorization carries
//! the same `model_revision`).

use std::sync::{
    Arc, PoisonError, RwLock,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use async_trait::async_trait;

use super::RoleLookup;
use crate::{
    coherence::Invalidate,
    domain::{Revision, UnixSeconds, UserRoles},
    error::{Error, Result},
    model::{Model, ModelSpec},
    store::{Answer, Stale, TenantReads},
};

/// A model and the revision that set it (0 and the empty model when none was).
#[derive(Debug, Default)]
pub struct CurrentModel {
    pub model: Model,
    pub revision: Revision,
}

/// The model an answer is judged under: none ever set when its roles were read (every
/// role exact, no permission: the check touches nothing shared), or the one held.
#[derive(Clone, Debug)]
pub enum Judge {
    Exact,
    Under(Arc<CurrentModel>),
}

impl Judge {
    /// See [`CurrentModel::allows`].
    pub fn allows(
        &self,
        roles: &UserRoles,
        tenants: (&str, &str),
        asked: Asked<'_>,
        now: UnixSeconds,
    ) -> bool {
        match self {
            Judge::Exact => exact(roles, tenants.1, asked, now),
            Judge::Under(model) => model.allows(roles, tenants, asked, now),
        }
    }

    /// See [`CurrentModel::expand`].
    pub fn expand(&self, roles: &UserRoles, application: &str, now: UnixSeconds) -> Expanded {
        match self {
            Judge::Exact => {
                let granted = roles.authorization(now).into_iter();
                granted.map(|(tenant, roles)| (tenant, (roles, Vec::new()))).collect()
            }
            Judge::Under(model) => model.expand(roles, application, now),
        }
    }
}

impl Judge {
    /// The model judged by, if any (`None`: roles exact, no permission).
    pub fn model(&self) -> Option<&Model> {
        match self {
            Judge::Exact => None,
            Judge::Under(current) => Some(&current.model).filter(|model| !model.is_empty()),
        }
    }

    /// What `name` asks: a permission when the model defines one by that name, else a role.
    pub fn asked<'a>(&self, name: &'a str) -> Asked<'a> {
        match self.model() {
            Some(model) if model.defines_permission(name) => Asked::Permission(name),
            _ => Asked::Role(name),
        }
    }

    /// The roles `roles` hold in `tenant` (granted and implied, sorted) and the
    /// permissions they give (sorted): one tenant of [`Judge::expand`], for any tenant.
    pub fn expand_in(
        &self,
        roles: &UserRoles,
        (application, tenant): (&str, &str),
        now: UnixSeconds,
    ) -> (Vec<String>, Vec<String>) {
        let granted = roles.roles_in(tenant, now).map(str::to_owned);
        let Some(model) = self.model() else { return (granted.collect(), Vec::new()) };
        let everywhere = model.everywhere(roles.roles_in(application, now));
        let held = model.held(roles.roles_in(tenant, now), &everywhere);
        let (implied, permissions) = model.expand(&held);
        let mut names: Vec<String> =
            granted.chain(implied.into_iter().map(str::to_owned)).collect();
        names.sort_unstable();
        names.dedup();
        (names, permissions.into_iter().map(str::to_owned).collect())
    }
}

/// Without a model: a role exactly as granted, no permission.
fn exact(roles: &UserRoles, tenant: &str, asked: Asked<'_>, now: UnixSeconds) -> bool {
    match asked {
        Asked::Role(role) => roles.allows_str(tenant, role, now),
        Asked::Permission(_) => false,
    }
}

/// What a check asks.
#[derive(Clone, Copy, Debug)]
pub enum Asked<'a> {
    Role(&'a str),
    Permission(&'a str),
}

impl CurrentModel {
    /// Whether `roles` allow what is `asked` in `tenant` at `now` (`application` is the
    /// application tenant, whose roles may reach every tenant). Without a model a role is
    /// held exactly as granted, and no permission is.
    pub fn allows(
        &self,
        roles: &UserRoles,
        (application, tenant): (&str, &str),
        asked: Asked<'_>,
        now: UnixSeconds,
    ) -> bool {
        let model = &self.model;
        if model.is_empty() {
            return exact(roles, tenant, asked, now);
        }
        // No set is built: a bit test (or one AND) per role granted here and in the
        // application tenant.
        let (granted, everywhere) = (roles.roles_in(tenant, now), roles.roles_in(application, now));
        match asked {
            Asked::Role(role) => model
                .holds_granted(granted, everywhere, role)
                .unwrap_or_else(|| roles.allows_str(tenant, role, now)),
            Asked::Permission(permission) => model.has_granted(granted, everywhere, permission),
        }
    }
}

/// An authorization object with what a model implies: per tenant, the roles held (granted
/// and implied, sorted) and the permissions they give (sorted).
pub type Expanded = std::collections::BTreeMap<String, (Vec<String>, Vec<String>)>;

impl CurrentModel {
    /// `roles` at `now` as an [`Expanded`] object: every tenant the user is granted a role
    /// in, and the application tenant when its roles reach every tenant. Without a model,
    /// the granted roles alone, with no permissions.
    pub fn expand(&self, roles: &UserRoles, application: &str, now: UnixSeconds) -> Expanded {
        let model = &self.model;
        let mut granted = roles.authorization(now);
        if model.is_empty() {
            return granted
                .into_iter()
                .map(|(tenant, roles)| (tenant, (roles, Vec::new())))
                .collect();
        }
        let everywhere = model.everywhere(roles.roles_in(application, now));
        granted.entry(application.to_owned()).or_default();
        granted
            .into_iter()
            .filter_map(|(tenant, mut names)| {
                let held = model.held(roles.roles_in(&tenant, now), &everywhere);
                let (implied, permissions) = model.expand(&held);
                names.extend(implied.into_iter().map(str::to_owned));
                names.sort_unstable();
                names.dedup();
                let permissions = permissions.into_iter().map(str::to_owned).collect();
                (!names.is_empty()).then_some((tenant, (names, permissions)))
            })
            .collect()
    }
}

/// The model this process judges by, read from the store when an answer shows it changed.
pub struct Models {
    current: RwLock<Arc<CurrentModel>>,
    store: Arc<dyn TenantReads>,
    /// One read of the store's model at a time.
    reading: tokio::sync::Mutex<()>,
    /// Counts reads of the store's model: a caller that waited for another's read uses it.
    reads: AtomicU64,
    /// Whether the model may have changed unseen: at start, and whenever the feed drops
    /// every answer (as a model change does). Writes read the model again then
    /// ([`fresh`](Models::fresh)); checks need not, they go by the roles' own revision.
    unsure: AtomicBool,
}

/// How many times a check reads again across model changes before it gives up.
const ATTEMPTS: usize = 3;

impl Models {
    /// No model yet: the first answer read under one brings it in.
    pub fn new(store: Arc<dyn TenantReads>) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(CurrentModel::default())),
            store,
            reading: tokio::sync::Mutex::new(()),
            reads: AtomicU64::new(0),
            unsure: AtomicBool::new(true),
        })
    }

    /// The model held now.
    pub fn current(&self) -> Arc<CurrentModel> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How `answer` is judged when `held` is the model held (taken once for many
    /// answers); `None` when its roles were read under another model.
    pub fn judge_under(held: &Arc<CurrentModel>, answer: &Answer) -> Option<Judge> {
        match answer.roles.model_revision {
            // No model was in effect where the roles were read: exact, whatever is held.
            0 => Some(Judge::Exact),
            read_under if read_under == held.revision => Some(Judge::Under(held.clone())),
            _ => None,
        }
    }

    /// How `answer` is judged: exactly, or under the model its roles were read under (read
    /// from the store if not held); otherwise the revision to read the roles again at.
    pub async fn of(&self, answer: &Answer) -> Result<std::result::Result<Judge, Revision>> {
        if answer.roles.model_revision == 0 {
            return Ok(Ok(Judge::Exact));
        }
        if let Some(judge) = Self::judge_under(&self.current(), answer) {
            return Ok(Ok(judge));
        }
        self.read_since(self.reads.load(Ordering::SeqCst)).await?;
        let now = self.current();
        Ok(Self::judge_under(&now, answer).ok_or(now.revision))
    }

    /// `user`'s answer and the model it was read under (see the module docs).
    pub async fn answer(
        &self,
        roles: &RoleLookup,
        user: &str,
        min_revision: Revision,
    ) -> Result<(Answer, Judge)> {
        let mut min = min_revision;
        for _ in 0..ATTEMPTS {
            let answer = roles.answer(user, min).await?;
            match self.of(&answer).await? {
                Ok(model) => return Ok((answer, model)),
                Err(at_least) => min = min.max(at_least),
            }
        }
        Err(Error::Unavailable("the model changed while answering; retry".into()))
    }

    /// The model as the store has it, read again only when it may have changed since the
    /// last read (see `unsure`): what a write is judged by (a strict model's refusal of
    /// undeclared roles). A model set while the feed is still announcing it may judge a
    /// write committed just after it; the write then only grants a role held exactly.
    pub async fn fresh(&self) -> Result<Arc<CurrentModel>> {
        if self.unsure.swap(false, Ordering::SeqCst)
            && let Err(err) = self.read_since(self.reads.load(Ordering::SeqCst)).await
        {
            self.unsure.store(true, Ordering::SeqCst);
            return Err(err);
        }
        Ok(self.current())
    }

    /// The model may have changed (this process just set it): [`fresh`](Self::fresh)
    /// reads it again.
    pub fn doubt(&self) {
        self.unsure.store(true, Ordering::SeqCst);
    }

    /// Holds the store's model, read now unless a read began after `seen` reads (then
    /// that one is as new as this caller needs). The store's is the model, whatever its
    /// revision: after the store started over, an older one.
    async fn read_since(&self, seen: u64) -> Result<()> {
        let _turn = self.reading.lock().await;
        if self.reads.load(Ordering::SeqCst) != seen {
            return Ok(());
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        let stored = self.store.get_model().await?;
        let model =
            ModelSpec::from_toml(&stored.spec).and_then(Model::compile).map_err(|problems| {
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                Error::Internal(
                    format!("the stored model does not compile: {}", problems.join("; ")).into(),
                )
            })?;
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if stored.revision != current.revision {
            tracing::info!(revision = stored.revision, "model in effect");
            *current = Arc::new(CurrentModel { model, revision: stored.revision });
        }
        Ok(())
    }
}

/// What the change feed drives, with the model marked unsure whenever every answer goes
/// stale (a model change, or a feed that reconnected).
pub struct ModelFeed {
    pub models: Arc<Models>,
    pub inner: Arc<dyn Invalidate>,
}

#[async_trait]
impl Invalidate for ModelFeed {
    async fn invalidate(&self, stale: &Stale) {
        if matches!(stale, Stale::Everyone) {
            self.models.doubt();
        }
        self.inner.invalidate(stale).await;
    }
}
