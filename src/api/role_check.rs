//! The `RoleCheck` service: checks, membership writes, authorization objects.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use tonic::{Request, Response, Status};

use super::{parse_expiry, tenant_or_application};
use crate::{
    auth::caller_name,
    cache::{
        CachedStore, RoleLookup,
        model::{Asked, Judge, Models},
    },
    coherence::Coherence,
    domain::{Revision, Role, TenantId, UserId, UserRoles, now_unix, parse_roles},
    error::{Error, Result},
    model::{Model, ModelSpec},
    paging::{decode_page_token, encode_page_token, page_size},
    pb::{self, role_check_server::RoleCheck},
    store::{Answer, MembershipWrite, Store, WriteKind, check_min_revision},
};

/// Most checks in one `CheckBatch`.
pub const MAX_BATCH: usize = 1000;
/// The shortest interval between Watch progress responses a caller may ask for.
pub const MIN_PROGRESS_MS: u32 = 10;
/// Most users one `ListActiveUsers` returns.
pub const MAX_ACTIVE_USERS: u32 = 100_000;
/// Distinct users a `CheckBatch` loads from the store at once.
const BATCH_LOAD_CONCURRENCY: usize = 16;

/// Handlers for `rolecheck.v1.RoleCheck`.
pub struct RoleCheckApi {
    store: Store,
    roles: RoleLookup,
    /// The model checks are judged by.
    models: Arc<Models>,
    /// Who mints tokens: this process, or a follower's upstream.
    issuing: Arc<dyn super::Issuing>,
    application_id: TenantId,
    watch_hub: Arc<super::watch::WatchHub>,
    watch_limits: super::watch::WatchLimits,
}

impl RoleCheckApi {
    /// Serves checks and writes from `store` (through `cache` first, when there is one);
    /// empty tenant ids mean `application_id`.
    pub fn new(
        store: Store,
        cache: Option<Arc<CachedStore>>,
        issuing: Arc<dyn super::Issuing>,
        application_id: TenantId,
        (coherence, models): (Arc<Coherence>, Arc<Models>),
        watch_limits: super::watch::WatchLimits,
    ) -> Self {
        let watch_hub = super::watch::WatchHub::start(store.clone(), coherence);
        let roles = RoleLookup::new(store.roles.clone(), cache);
        Self { store, roles, models, issuing, application_id, watch_hub, watch_limits }
    }

    /// The Watch hub, to end its streams when the server drains.
    pub fn watch_hub(&self) -> Arc<super::watch::WatchHub> {
        self.watch_hub.clone()
    }

    fn tenant(&self, field: &str, value: &str) -> Result<TenantId> {
        tenant_or_application(field, value, &self.application_id)
    }

    /// A validated tenant id, or the application's when empty.
    fn tenant_str<'a>(&'a self, tenant_id: &'a str) -> &'a str {
        if tenant_id.is_empty() { self.application_id.as_str() } else { tenant_id }
    }

    /// Validates a check without copying its strings: a role or a permission, not both.
    fn validate_check(&self, req: &pb::CheckRequest) -> Result<()> {
        UserId::validate("user_id", &req.user_id)?;
        if !req.tenant_id.is_empty() {
            TenantId::validate("tenant_id", &req.tenant_id)?;
        }
        match (req.role.is_empty(), req.permission.is_empty()) {
            (true, false) => Role::validate("permission", &req.permission),
            (false, false) => {
                Err(Error::invalid("permission", "ask a role or a permission, not both"))
            }
            _ => Role::validate("role", &req.role),
        }
    }

    /// Whether `roles` allow `check` under `model`.
    fn allows(&self, model: &Judge, roles: &UserRoles, check: &pb::CheckRequest, now: i64) -> bool {
        let asked = match check.permission.is_empty() {
            true => Asked::Role(&check.role),
            false => Asked::Permission(&check.permission),
        };
        let tenants = (self.application_id.as_str(), self.tenant_str(&check.tenant_id));
        model.allows(roles, tenants, asked, now)
    }

    fn parse_write(
        &self,
        caller: String,
        kind: WriteKind,
        user_id: &str,
        tenant_id: &str,
        roles: &[String],
        expires_at: Option<&prost_types::Timestamp>,
    ) -> Result<MembershipWrite> {
        let roles = parse_roles("roles", roles)?;
        if kind == WriteKind::Grant && roles.is_empty() {
            return Err(Error::invalid("roles", "at least one role is required"));
        }
        Ok(MembershipWrite {
            kind,
            user: UserId::parse("user_id", user_id)?,
            tenant: self.tenant("tenant_id", tenant_id)?,
            roles,
            expires_at: parse_expiry("expires_at", expires_at)?,
            caller,
        })
    }

    /// Under a strict model, a role the model does not declare is refused (Grant and
    /// SetRoles; a Revoke may always take one away).
    async fn declared(&self, write: &MembershipWrite) -> Result<()> {
        let model = self.models.fresh().await?;
        if !model.model.strict() {
            return Ok(());
        }
        match write.roles.iter().find(|role| !model.model.declares(role.as_str())) {
            None => Ok(()),
            Some(role) => Err(Error::invalid(
                "roles",
                format!("{role} is not a role the model declares, and the model is strict"),
            )),
        }
    }

    /// `user`'s answer: see [`RoleLookup::answer`]. Every RPC reads roles through here
    /// or, for a batch, through the same lookup.
    async fn answer(&self, user: &str, min_revision: Revision) -> Result<Answer> {
        self.roles.answer(user, min_revision).await
    }
}

#[tonic::async_trait]
impl RoleCheck for RoleCheckApi {
    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %request.get_ref().tenant_id, role = %request.get_ref().role))]
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let req = request.get_ref();
        self.validate_check(req)?;
        let (answer, model) =
            self.models.answer(&self.roles, &req.user_id, req.min_revision).await?;
        Ok(Response::new(pb::CheckResponse {
            allowed: self.allows(&model, &answer.roles, req, now_unix()),
            revision: answer.revision,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(checks = request.get_ref().checks.len()))]
    async fn check_batch(
        &self,
        request: Request<pb::CheckBatchRequest>,
    ) -> Result<Response<pb::CheckBatchResponse>, Status> {
        let req = request.get_ref();
        if req.checks.len() > MAX_BATCH {
            return Err(Error::invalid(
                "checks",
                format!("at most {MAX_BATCH} checks, got {}", req.checks.len()),
            )
            .into());
        }
        // Validate in place: the 3 × N strings are never copied (only a missed user id is).
        for (i, check) in req.checks.iter().enumerate() {
            self.validate_check(check).map_err(|e| e.in_field(|| format!("checks[{i}].")))?;
        }
        let (checks, min_revision) = (&req.checks, req.min_revision);
        // The checks' indices grouped by user: one lookup per distinct user, cached users
        // answered at once, the rest loaded a few at a time.
        let mut order: Vec<usize> = (0..checks.len()).collect();
        order.sort_unstable_by(|&a, &b| checks[a].user_id.cmp(&checks[b].user_id));
        let mut results = vec![pb::CheckResponse::default(); checks.len()];
        let mut revision = if checks.is_empty() { 0 } else { Revision::MAX };
        let mut answer_group = |group: &[usize], answer: &Answer, model: &Judge, now| {
            for &i in group {
                let allowed = self.allows(model, &answer.roles, &checks[i], now);
                results[i] = pb::CheckResponse { allowed, revision: answer.revision };
            }
            revision = revision.min(answer.revision);
        };
        let (now, mut hits, mut waiting, mut start) = (now_unix(), 0, Vec::new(), 0);
        let held = self.models.current();
        for group in order.chunk_by(|&a, &b| checks[a].user_id == checks[b].user_id) {
            let user = &checks[group[0]].user_id;
            // From memory when read under the model held; else loaded (and judged) below.
            let cached = self.roles.in_memory(user, min_revision);
            match cached
                .as_ref()
                .and_then(|answer| Some((answer, Models::judge_under(&held, answer)?)))
            {
                Some((answer, judge)) => {
                    hits += 1;
                    answer_group(group, answer, &judge, now);
                }
                None => waiting.push((start..start + group.len(), UserId::trusted(user.clone()))),
            }
            start += group.len();
        }
        self.roles.count_hits(hits);
        if !waiting.is_empty() {
            let (roles, models) = (&self.roles, &self.models);
            let fetched: Vec<(std::ops::Range<usize>, (Answer, Judge))> =
                futures::stream::iter(waiting)
                    .map(|(group, id)| async move {
                        Ok::<_, Error>((
                            group,
                            models.answer(roles, id.as_str(), min_revision).await?,
                        ))
                    })
                    .buffer_unordered(BATCH_LOAD_CONCURRENCY)
                    .try_collect()
                    .await?;
            let now = now_unix();
            for (group, (answer, model)) in fetched {
                answer_group(&order[group], &answer, &model, now);
            }
        }
        Ok(Response::new(pb::CheckBatchResponse { results, revision }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant_id))]
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantResponse>, Status> {
        let req = request.get_ref();
        let write = self.parse_write(
            caller_name(&request),
            WriteKind::Grant,
            &req.user_id,
            &req.tenant_id,
            &req.roles,
            req.expires_at.as_ref(),
        )?;
        self.declared(&write).await?;
        let revision = self.store.writes.write_membership(&write).await?;
        Ok(Response::new(pb::GrantResponse { revision }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant_id))]
    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let req = request.get_ref();
        let write = self.parse_write(
            caller_name(&request),
            WriteKind::Revoke,
            &req.user_id,
            &req.tenant_id,
            &req.roles,
            None,
        )?;
        let revision = self.store.writes.write_membership(&write).await?;
        Ok(Response::new(pb::RevokeResponse { revision }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant_id))]
    async fn set_roles(
        &self,
        request: Request<pb::SetRolesRequest>,
    ) -> Result<Response<pb::SetRolesResponse>, Status> {
        let req = request.get_ref();
        let write = self.parse_write(
            caller_name(&request),
            WriteKind::SetRoles,
            &req.user_id,
            &req.tenant_id,
            &req.roles,
            req.expires_at.as_ref(),
        )?;
        self.declared(&write).await?;
        let revision = self.store.writes.write_membership(&write).await?;
        Ok(Response::new(pb::SetRolesResponse { revision }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_authorization(
        &self,
        request: Request<pb::GetAuthorizationRequest>,
    ) -> Result<Response<pb::GetAuthorizationResponse>, Status> {
        let req = request.get_ref();
        UserId::validate("user_id", &req.user_id)?;
        let (answer, model) = match req.expand {
            false => (self.answer(&req.user_id, req.min_revision).await?, None),
            true => {
                let (answer, model) =
                    self.models.answer(&self.roles, &req.user_id, req.min_revision).await?;
                (answer, Some(model))
            }
        };
        let now = now_unix();
        let authorization = match &model {
            Some(model) => model
                .expand(&answer.roles, self.application_id.as_str(), now)
                .into_iter()
                .map(|(tenant, (roles, permissions))| (tenant, pb::Roles { roles, permissions }))
                .collect(),
            None => answer
                .roles
                .authorization(now)
                .into_iter()
                .map(|(tenant, roles)| (tenant, pb::Roles { roles, permissions: Vec::new() }))
                .collect(),
        };
        let held = match req.with_expiry {
            false => Vec::new(),
            true => answer
                .roles
                .live(now)
                .map(|(tenant, role, expires_at)| pb::HeldRole {
                    tenant_id: tenant.to_owned(),
                    role: role.to_owned(),
                    expires_at: expires_at
                        .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                })
                .collect(),
        };
        Ok(Response::new(pb::GetAuthorizationResponse {
            authorization,
            revision: answer.revision,
            held,
            model_revision: answer.roles.model_revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn set_model(
        &self,
        request: Request<pb::SetModelRequest>,
    ) -> Result<Response<pb::SetModelResponse>, Status> {
        let spec = &request.get_ref().model;
        ModelSpec::from_toml(spec).and_then(Model::compile).map_err(|problems| {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            Error::invalid("model", problems.join("; "))
        })?;
        let revision = self.store.writes.set_model(spec, &caller_name(&request)).await;
        // Whatever the outcome (a failed COMMIT may have committed), the next write here
        // reads the model again; other replicas hear of it from the feed.
        self.models.doubt();
        let revision = revision?;
        Ok(Response::new(pb::SetModelResponse { revision }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        let min_revision = request.get_ref().min_revision;
        if min_revision > 0 {
            let at = self.store.tenants.revision_reaching(min_revision).await?;
            check_min_revision(at, min_revision)?;
        }
        let stored = self.store.tenants.get_model().await?;
        Ok(Response::new(pb::GetModelResponse {
            model: stored.spec,
            model_revision: stored.revision,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %request.get_ref().tenant_id))]
    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let req = request.get_ref();
        let tenant = self.tenant("tenant_id", &req.tenant_id)?;
        let limit = page_size(req.page_size)?;
        let after = decode_page_token("members", &req.page_token)?
            .map(|user| UserId::parse("page_token", &user))
            .transpose()?;
        let (mut members, revision) =
            self.store.tenants.list_members(&tenant, after.as_ref(), limit + 1, now_unix()).await?;
        let next_page_token = if members.len() > limit as usize {
            members.truncate(limit as usize);
            members.last().map(|m| encode_page_token("members", &m.user_id)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListMembersResponse {
            members: members
                .into_iter()
                .map(|m| pb::Member { user_id: m.user_id, roles: m.roles })
                .collect(),
            next_page_token,
            revision,
        }))
    }

    #[tracing::instrument(skip_all, fields(tenants = request.get_ref().tenant_ids.len()))]
    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let caller = crate::auth::caller_name(&request);
        Ok(Response::new(self.issuing.issue(request.into_inner(), &caller).await?))
    }

    async fn get_keys(
        &self,
        _request: Request<pb::GetKeysRequest>,
    ) -> Result<Response<pb::GetKeysResponse>, Status> {
        let jwks_json = self.issuing.jwks().await?;
        Ok(Response::new(pb::GetKeysResponse { jwks_json }))
    }

    type WatchStream = super::watch::WatchStream;
    type ExportStream = super::bulk::ExportStream;

    type ImportStream = super::bulk::ImportStream;

    #[tracing::instrument(skip_all)]
    async fn import(
        &self,
        request: Request<tonic::Streaming<pb::ImportRequest>>,
    ) -> Result<Response<Self::ImportStream>, Status> {
        let into = (self.store.clone(), self.models.clone(), self.application_id.clone());
        Ok(Response::new(super::bulk::import(into, caller_name(&request), request.into_inner())))
    }

    async fn export(
        &self,
        _request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Ok(Response::new(super::bulk::export(&self.store)))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        super::audit::list_changes(self.store.history.as_ref(), request.get_ref())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_active_users(
        &self,
        request: Request<pb::ListActiveUsersRequest>,
    ) -> Result<Response<pb::ListActiveUsersResponse>, Status> {
        let limit = request.get_ref().limit;
        if !(1..=MAX_ACTIVE_USERS).contains(&limit) {
            let why = format!("must be 1 to {MAX_ACTIVE_USERS}");
            return Err(Error::invalid("limit", why).into());
        }
        let user_ids = self.roles.active_users(limit as usize);
        Ok(Response::new(pb::ListActiveUsersResponse { user_ids }))
    }

    #[tracing::instrument(skip_all, fields(after = request.get_ref().after_revision))]
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let opened = std::time::Instant::now();
        let (after, progress_ms) =
            (request.get_ref().after_revision, request.get_ref().progress_ms);
        let progress = match progress_ms {
            0 => None,
            ms if ms < MIN_PROGRESS_MS => {
                return Err(Error::invalid(
                    "progress_ms",
                    format!("0 (none) or at least {MIN_PROGRESS_MS}"),
                )
                .into());
            }
            ms => Some(std::time::Duration::from_millis(u64::from(ms))),
        };
        self.watch_hub.check_start(after, &request.get_ref().epoch).await?;
        // Streams count per caller and, for a follower that names itself, per follower:
        // a fleet sharing one key is many callers (the server-wide cap still bounds all).
        let mut counted = crate::auth::caller_name(&request);
        if let Some(follower) = request
            .metadata()
            .get(crate::follower::FOLLOWER_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| (1..=128).contains(&v.len()))
        {
            counted = format!("{counted}/{follower}");
        }
        let permit = self.watch_limits.admit(&counted)?;
        Ok(Response::new(self.watch_hub.stream(after, permit, progress, opened)))
    }
}
