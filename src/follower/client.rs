//! The follower's client of its upstream: one more store [`Backend`](crate::store::Backend).
//! Reads of a user's roles come from the upstream's `GetAuthorization` (with each role's
//! expiry, so the cache never allows past one); writes, lists and `Issue` are relayed as
//! calls, with the follower's caller in `x-rolecheck-on-behalf-of` (the upstream records
//! `<caller> via <follower key>`). `prune_history` does nothing: a follower keeps no
//! history of its own. The change feed is in [`super::feed`].

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use tonic::{Code, Request, Status, service::interceptor::InterceptedService, transport::Channel};

use super::feed::kind_from;
use crate::{
    client::{self, Credentials, Flags, Target},
    domain::{Revision, TenantId, UnixSeconds, UserId, UserRoles},
    error::{Error, Result},
    paging::encode_page_token,
    pb::{self, role_check_client::RoleCheckClient, tenants_client::TenantsClient},
    store::{
        Answer, Backend, ChangeFilter, History, HistoryEntry, HistoryLog, Member, MembershipWrite,
        RoleReads, StoredModel, Tenant, TenantReads, WriteKind, Writes,
    },
};

/// How to reach the upstream.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// `http://host:port`, `https://host:port` or `unix:/path`.
    pub url: String,
    /// A file holding the bearer secret presented upstream (a key with `follow`).
    pub key_file: Option<PathBuf>,
    /// CA certificate(s) for an `https` upstream (else the system roots).
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mTLS.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// How often the upstream's Watch sends progress responses.
    pub progress: Duration,
    /// The feed reconnects after hearing nothing for this long.
    pub silence: Duration,
    /// This follower's coherence lease: its trust after a progress response ends no later
    /// than the upstream's own (`lease_left_ms`), and never later than this.
    pub lease: Duration,
    /// Longest one call may take.
    pub timeout: Duration,
}

/// The user a follower asks about to learn the upstream's revision (never a real user:
/// no role is ever granted to it by rolecheck itself).
const PROBE_USER: &str = "~rolecheck-follower-probe";

/// The follower's settings, named in its errors.
const UPSTREAM_FLAGS: Flags = Flags {
    url: "upstream",
    ca: "--upstream-ca",
    cert: "--upstream-cert",
    cert_key: "--upstream-cert-key",
    key_file: "--upstream-key-file",
};

type Upstream = InterceptedService<Channel, Credentials>;

/// A follower's view of its upstream.
#[derive(Clone)]
pub struct UpstreamStore {
    checks: RoleCheckClient<Upstream>,
    tenants: TenantsClient<Upstream>,
    pub(super) options: UpstreamOptions,
    /// This follower's name on its Watch (see [`FOLLOWER_HEADER`]).
    instance: tonic::metadata::AsciiMetadataValue,
    /// Places for cache loads in flight upstream (see [`MAX_UPSTREAM_LOADS`]).
    loads: Arc<tokio::sync::Semaphore>,
}

/// At most this many cache loads of one follower are in flight upstream; more wait for
/// a place (within their callers' deadlines). When a whole fleet loses trust at once and
/// every Check becomes a load, the upstream sees at most this many per follower.
pub const MAX_UPSTREAM_LOADS: usize = 64;

/// The metadata a follower names itself with on `Watch`: the upstream counts streams per
/// key *and* follower, so a fleet sharing one key is not capped as one caller.
pub const FOLLOWER_HEADER: &str = "x-rolecheck-follower";

/// A name for this process: the host's name (a pod's name in Kubernetes), the pid, and
/// random bits, so two followers never share one.
fn instance_name() -> tonic::metadata::AsciiMetadataValue {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_graphic()).take(40).collect();
    let name = format!("{host}-{}-{:08x}", std::process::id(), rand::random::<u32>());
    name.parse().unwrap_or_else(|_| tonic::metadata::AsciiMetadataValue::from_static("follower"))
}

impl std::fmt::Debug for UpstreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamStore").field("url", &self.options.url).finish_non_exhaustive()
    }
}

impl UpstreamStore {
    /// Connects (lazily: an upstream that is down is retried by every call and the feed).
    pub fn connect(options: UpstreamOptions) -> Result<Self> {
        let target = Target {
            url: &options.url,
            ca: options.ca.as_deref(),
            cert: options.cert.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path())),
            timeout: options.timeout,
            // A silent path is noticed within the feed's silence, and the next call gets
            // a fresh connection.
            keepalive: Some(options.silence / 2),
            flags: UPSTREAM_FLAGS,
        };
        let channel = client::channel(&target)?;
        let credentials =
            Credentials::from_file(options.key_file.as_deref(), UPSTREAM_FLAGS.key_file)?;
        Ok(Self {
            checks: RoleCheckClient::with_interceptor(channel.clone(), credentials.clone()),
            tenants: TenantsClient::with_interceptor(channel, credentials),
            options,
            instance: instance_name(),
            loads: Arc::new(tokio::sync::Semaphore::new(MAX_UPSTREAM_LOADS)),
        })
    }

    /// The upstream's JWK Set (what a follower publishes as its own).
    pub async fn keys(&self) -> Result<String> {
        let response = self.checks.clone().get_keys(pb::GetKeysRequest {}).await;
        Ok(response.map_err(from_status)?.into_inner().jwks_json)
    }

    /// Up to `limit` users the upstream answered about recently (`ListActiveUsers`).
    pub async fn active_users(&self, limit: u32) -> Result<Vec<String>> {
        let request = pb::ListActiveUsersRequest { limit };
        let response = self.checks.clone().list_active_users(request).await;
        let mut users = response.map_err(from_status)?.into_inner().user_ids;
        users.retain(|user| user != PROBE_USER);
        Ok(users)
    }

    /// Relays `Issue` for `caller`.
    pub async fn issue(
        &self,
        request: pb::IssueRequest,
        caller: &str,
    ) -> Result<pb::IssueResponse> {
        let response = self.checks.clone().issue(relayed(request, caller)?).await;
        Ok(response.map_err(from_status)?.into_inner())
    }

    /// The upstream's revision, from a Check at `min_revision` about a user nobody is
    /// granted roles to.
    async fn probe(&self, min_revision: Revision) -> std::result::Result<Revision, Status> {
        let request = pb::CheckRequest {
            user_id: PROBE_USER.into(),
            tenant_id: String::new(),
            role: "probe".into(),
            min_revision,
            permission: String::new(),
        };
        Ok(self.checks.clone().check(request).await?.into_inner().revision)
    }

    pub(super) async fn watch(
        &self,
        after: Revision,
        epoch: Option<&str>,
    ) -> std::result::Result<tonic::Streaming<pb::WatchResponse>, Status> {
        let progress_ms = self.options.progress.as_millis().clamp(10, u128::from(u32::MAX)) as u32;
        let epoch = epoch.unwrap_or_default().to_owned();
        let mut request =
            Request::new(pb::WatchRequest { after_revision: after, progress_ms, epoch });
        request.metadata_mut().insert(FOLLOWER_HEADER, self.instance.clone());
        // The stream lives as long as it answers, not the per-call timeout.
        let mut checks = self.checks.clone();
        Ok(checks.watch(request).await?.into_inner())
    }
}

/// `message` as a call relayed for `caller`.
fn relayed<T>(message: T, caller: &str) -> Result<Request<T>> {
    let mut request = Request::new(message);
    let name = caller.parse().map_err(|_| Error::invalid("caller", "not printable ASCII"))?;
    request.metadata_mut().insert(crate::auth::ON_BEHALF_OF, name);
    Ok(request)
}

/// The upstream's answer as this server's own error: the same code and message. A key the
/// upstream refuses is a setting to fix, and until then nothing can be answered:
/// `UNAVAILABLE`, logged.
fn from_status(status: Status) -> Error {
    let message = status.message().to_owned();
    match status.code() {
        Code::NotFound => Error::NotFound(message),
        Code::AlreadyExists => Error::AlreadyExists(message),
        Code::FailedPrecondition => Error::FailedPrecondition(message),
        Code::OutOfRange => Error::OutOfRange(message),
        Code::InvalidArgument => match message.split_once(": ") {
            Some((field, reason)) => {
                Error::InvalidArgument { field: field.into(), reason: reason.into() }
            }
            None => Error::InvalidArgument { field: "request".into(), reason: message },
        },
        Code::Unauthenticated | Code::PermissionDenied => {
            tracing::error!(code = ?status.code(), %message, "the upstream refused this follower's key");
            Error::Unavailable("upstream unavailable: it refused this follower's key".into())
        }
        _ => Error::Unavailable(format!("upstream unavailable: {message}")),
    }
}

fn millis(timestamp: Option<&prost_types::Timestamp>) -> i64 {
    timestamp.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn tenant_from(tenant: pb::Tenant) -> Tenant {
    Tenant {
        created_at_ms: millis(tenant.created_at.as_ref()),
        id: TenantId::trusted(tenant.tenant_id),
        name: tenant.name,
    }
}

/// Largest page the upstream serves.
const PAGE: u32 = 1000;

/// Up to `limit` items of a paged upstream list, from the page after `token` on:
/// `page(page_size, page_token)` answers one page and the next token (empty after the
/// last page).
async fn pages<T, F, Fut>(limit: u32, token: Option<String>, mut page: F) -> Result<Vec<T>>
where
    F: FnMut(u32, String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String)>>,
{
    let (mut items, mut token) = (Vec::new(), token.unwrap_or_default());
    while items.len() < limit as usize {
        let (got, next) = page((limit - items.len() as u32).min(PAGE), token).await?;
        items.extend(got);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    Ok(items)
}

#[async_trait]
impl RoleReads for UpstreamStore {
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Answer> {
        let request = pb::GetAuthorizationRequest {
            expand: false,
            user_id: user.as_str().to_owned(),
            min_revision,
            with_expiry: true,
        };
        let _place = self.loads.acquire().await.map_err(|_| Error::Unavailable("closed".into()))?;
        let response = self.checks.clone().get_authorization(request).await;
        let response = response.map_err(from_status)?.into_inner();
        let rows = response
            .held
            .into_iter()
            .map(|held| (held.tenant_id, held.role, held.expires_at.map(|t| t.seconds)));
        let roles = UserRoles::from_rows(user.as_str(), response.revision, rows)
            .under_model(response.model_revision);
        Ok(Answer::new(Arc::new(roles)))
    }
}

#[async_trait]
impl TenantReads for UpstreamStore {
    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u32,
        _now: UnixSeconds,
    ) -> Result<(Vec<Member>, Revision)> {
        let token = after.map(|user| encode_page_token("members", user.as_str()));
        // The first page's revision: the one the answer reflects.
        let revision = std::sync::OnceLock::new();
        let members = pages(limit, token, |page_size, page_token| {
            let request = pb::ListMembersRequest {
                tenant_id: tenant.as_str().to_owned(),
                page_size,
                page_token,
            };
            let (mut checks, revision) = (self.checks.clone(), &revision);
            async move {
                let page = checks.list_members(request).await.map_err(from_status)?.into_inner();
                let _ = revision.set(page.revision);
                let members =
                    page.members.into_iter().map(|m| Member { user_id: m.user_id, roles: m.roles });
                Ok((members.collect(), page.next_page_token))
            }
        })
        .await?;
        Ok((members, revision.get().copied().unwrap_or_default()))
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Tenant> {
        let request = pb::GetTenantRequest { tenant_id: id.as_str().to_owned() };
        let tenant = self.tenants.clone().get_tenant(request).await.map_err(from_status)?;
        Ok(tenant_from(tenant.into_inner()))
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: u32) -> Result<Vec<Tenant>> {
        let token = after.map(|id| encode_page_token("tenants", id.as_str()));
        pages(limit, token, |page_size, page_token| {
            let request = pb::ListTenantsRequest { page_size, page_token };
            let mut tenants = self.tenants.clone();
            async move {
                let page = tenants.list_tenants(request).await.map_err(from_status)?.into_inner();
                Ok((page.tenants.into_iter().map(tenant_from).collect(), page.next_page_token))
            }
        })
        .await
    }

    async fn get_model(&self) -> Result<StoredModel> {
        let request = pb::GetModelRequest { min_revision: 0 };
        let model = self.checks.clone().get_model(request).await.map_err(from_status)?;
        let model = model.into_inner();
        Ok(StoredModel { spec: model.model, revision: model.model_revision })
    }

    /// The upstream's revision, as its cache knows it.
    async fn revision(&self) -> Result<Revision> {
        self.probe(0).await.map_err(from_status)
    }

    /// The same probe at `min_revision` `at_least`: the upstream waits for its own feed,
    /// then reads its store. `OUT_OF_RANGE` (its store never reached `at_least`) is
    /// answered with the revision it is at.
    async fn revision_reaching(&self, at_least: Revision) -> Result<Revision> {
        match self.probe(at_least).await {
            Err(status) if status.code() == Code::OutOfRange => self.revision().await,
            answer => answer.map_err(from_status),
        }
    }
}

#[async_trait]
impl Writes for UpstreamStore {
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision> {
        let (user_id, tenant_id) =
            (write.user.as_str().to_owned(), write.tenant.as_str().to_owned());
        let roles: Vec<String> = write.roles.iter().map(|r| r.as_str().to_owned()).collect();
        let expires_at =
            write.expires_at.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 });
        let mut checks = self.checks.clone();
        let revision = match write.kind {
            WriteKind::Grant => {
                let request = pb::GrantRequest { user_id, tenant_id, roles, expires_at };
                checks
                    .grant(relayed(request, &write.caller)?)
                    .await
                    .map(|r| r.into_inner().revision)
            }
            WriteKind::Revoke => {
                let request = pb::RevokeRequest { user_id, tenant_id, roles };
                checks
                    .revoke(relayed(request, &write.caller)?)
                    .await
                    .map(|r| r.into_inner().revision)
            }
            WriteKind::SetRoles => {
                let request = pb::SetRolesRequest { user_id, tenant_id, roles, expires_at };
                checks
                    .set_roles(relayed(request, &write.caller)?)
                    .await
                    .map(|r| r.into_inner().revision)
            }
        };
        revision.map_err(from_status)
    }

    /// The upstream answers CreateTenant with the tenant, not a revision: this reports the
    /// upstream's revision read right after (at least the creation's), and the tenant as
    /// the upstream created it (its `created_at`, not this process's clock).
    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<(Revision, Tenant)> {
        let request = pb::CreateTenantRequest {
            tenant_id: tenant.id.as_str().to_owned(),
            name: tenant.name.clone(),
        };
        let relayed = self.tenants.clone().create_tenant(relayed(request, caller)?).await;
        let created = tenant_from(relayed.map_err(from_status)?.into_inner());
        Ok((self.revision().await?, created))
    }

    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision> {
        let request = pb::DeleteTenantRequest { tenant_id: id.as_str().to_owned() };
        let response = self.tenants.clone().delete_tenant(relayed(request, caller)?).await;
        Ok(response.map_err(from_status)?.into_inner().revision)
    }

    async fn set_model(&self, spec: &str, caller: &str) -> Result<Revision> {
        let request = pb::SetModelRequest { model: spec.to_owned() };
        let response = self.checks.clone().set_model(relayed(request, caller)?).await;
        Ok(response.map_err(from_status)?.into_inner().revision)
    }
}

#[async_trait]
impl HistoryLog for UpstreamStore {
    async fn changes_after(&self, after: Revision, limit: u32) -> Result<History> {
        let request = pb::ListChangesRequest {
            after_revision: after,
            page_size: limit.clamp(1, PAGE),
            ..Default::default()
        };
        let page =
            self.checks.clone().list_changes(request).await.map_err(from_status)?.into_inner();
        // Whole revisions, as the upstream pages them (none for a limit of 0).
        let entries = match limit {
            0 => Vec::new(),
            _ => page.entries.into_iter().filter_map(entry_from).collect(),
        };
        Ok(History { entries, pruned_through: page.pruned_through })
    }

    async fn list_changes(
        &self,
        filter: &ChangeFilter,
        after: Revision,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>> {
        pages(limit, None, |page_size, page_token| {
            let request = pb::ListChangesRequest {
                tenant_id: filter.tenant_id.clone(),
                user_id: filter.user_id.clone(),
                caller: filter.caller.clone(),
                after_revision: after,
                page_size,
                page_token,
            };
            let mut checks = self.checks.clone();
            async move {
                let page = checks.list_changes(request).await.map_err(from_status)?.into_inner();
                Ok((
                    page.entries.into_iter().filter_map(entry_from).collect(),
                    page.next_page_token,
                ))
            }
        })
        .await
    }

    /// Nothing: a follower keeps no history of its own (the upstream prunes its own).
    async fn prune_history(&self, _older_than_ms: i64) -> Result<Revision> {
        Ok(0)
    }
}

fn entry_from(entry: pb::AuditEntry) -> Option<HistoryEntry> {
    let change = entry.change?;
    let kind = kind_from(change.kind())?;
    Some(HistoryEntry {
        revision: entry.revision,
        kind,
        tenant_id: change.tenant_id,
        user_id: change.user_id,
        roles: change.roles,
        caller: change.caller,
        committed_at_ms: millis(entry.committed_at.as_ref()),
    })
}

#[async_trait]
impl Backend for UpstreamStore {
    /// Nothing to close: the follower holds no pool; its channel closes when dropped.
    async fn close(&self) {}
}

/// A follower holds no private key: `Issue` and `GetKeys` are its upstream's.
#[tonic::async_trait]
impl crate::api::Issuing for UpstreamStore {
    async fn issue(&self, request: pb::IssueRequest, caller: &str) -> Result<pb::IssueResponse> {
        UpstreamStore::issue(self, request, caller).await
    }

    async fn jwks(&self) -> Result<String> {
        self.keys().await
    }
}
