//! The search endpoints, each a paged list in a stable order (user ids, tenant ids,
//! action names), whose page token is the last key returned: a page never repeats or
//! skips an entry that stays put while the caller pages.
//!
//! - subjects: the users who hold the action in the resource's tenant: its members, and,
//!   when the model lets application-tenant roles reach every tenant, the application
//!   tenant's members too; each judged as `Check` judges it, at least at the revision the
//!   member list was read at;
//! - resources (type `tenant`): the tenants where the subject holds the action: every
//!   tenant when their application-tenant roles reach everywhere, else the ones they are
//!   granted roles in;
//! - actions: the permissions and roles (granted and implied) the subject holds in the
//!   resource's tenant; on a `route`, the HTTP methods the policy lets them take.

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    AuthZen, Failure,
    wire::{self, Bad, Object},
};
use crate::{
    authz::Decision,
    domain::{Revision, Role, TenantId, UserId, now_unix},
    error::Error,
    paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_page_token, encode_page_token},
    store::Member,
};

/// The subject types a subject search lists users as; any other type has no subjects
/// (the scenario's "unknown entity type" answer). An evaluation takes any type.
pub const SUBJECT_TYPES: [&str; 2] = ["user", "identity"];

/// Most candidates one subject search judges before it returns what it has found (with
/// a token to go on), so a rare action in a big tenant costs bounded work per request.
pub const MAX_SCANNED: usize = 10_000;

/// The methods an action search on a route tries.
const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

/// Users judged at once in a subject search.
const JUDGED_AT_ONCE: usize = 16;

/// A page asked for: its size, and the last key of the page before.
struct Page {
    limit: usize,
    after: Option<String>,
}

fn page(body: &Object, kind: &str) -> Result<Page, Bad> {
    let page = wire::optional_object(body, "page")?;
    let limit = match page.and_then(|page| page.get("limit")) {
        None | Some(Value::Null) => DEFAULT_PAGE_SIZE as usize,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => DEFAULT_PAGE_SIZE as usize,
            Some(n) if n <= u64::from(MAX_PAGE_SIZE) => n as usize,
            _ => return Err(Bad(format!("page.limit: an integer from 1 to {MAX_PAGE_SIZE}"))),
        },
        Some(_) => return Err(Bad("page.limit: must be a number".into())),
    };
    let token = wire::optional_string(page, "page.token", "token")?;
    let next = wire::optional_string(page, "page.next_token", "next_token")?;
    let token = match (token, next) {
        (Some(a), Some(b)) if a != b => {
            return Err(Bad("page: token and next_token disagree; send one".into()));
        }
        (token, next) => token.or(next).unwrap_or_default(),
    };
    let after = decode_page_token(kind, token)
        .map_err(|_| Bad("page.token: not a token this search returned".into()))?;
    Ok(Page { limit, after })
}

/// A search's answer: `results`, the token of the next page (`""` at the end) and the
/// revision the answer reflects.
#[derive(Serialize)]
struct Found {
    results: Vec<Value>,
    page: NextPage,
    context: Revisioned,
}

#[derive(Serialize)]
struct NextPage {
    next_token: String,
}

#[derive(Serialize)]
struct Revisioned {
    revision: Revision,
}

fn found(results: Vec<Value>, next_token: String, revision: Revision) -> Result<Vec<u8>, Failure> {
    super::to_json(&Found {
        results,
        page: NextPage { next_token },
        context: Revisioned { revision },
    })
}

/// `keys` (sorted, unique) after `page.after`, cut to a page: the page and its token.
fn keyset(keys: impl Iterator<Item = String>, page: &Page, kind: &str) -> (Vec<String>, String) {
    let mut keys: Vec<String> = keys
        .filter(|key| page.after.as_ref().is_none_or(|after| key > after))
        .take(page.limit + 1)
        .collect();
    let token = match keys.len() > page.limit {
        true => {
            keys.truncate(page.limit);
            keys.last().map(|key| encode_page_token(kind, key)).unwrap_or_default()
        }
        false => String::new(),
    };
    (keys, token)
}

fn bad(err: Error) -> Bad {
    Bad(err.to_string())
}

impl AuthZen {
    /// `POST /access/v1/search/subject`.
    pub(super) async fn search_subjects(&self, body: &Object) -> Result<Vec<u8>, Failure> {
        const KIND: &str = "authzen.subject";
        let subject = wire::entity(body, None, "subject")?;
        let name = wire::action(body, None)?;
        let resource = wire::entity(body, None, "resource")?;
        resource.required_id("resource")?;
        let context = wire::context(body, None)?;
        let page = page(body, KIND)?;
        if resource.kind == "route" && self.authz.is_some() {
            return Err(Bad(
                "search/subject: not answered for routes; ask /access/v1/evaluation per user"
                    .into(),
            )
            .into());
        }
        Role::validate("action.name", name).map_err(bad)?;
        let tenant = self.tenant_of(&resource, context)?;
        if !SUBJECT_TYPES.contains(&subject.kind) {
            return found(Vec::new(), String::new(), 0);
        }
        let after = page.after.as_deref().map(|user| UserId::parse("page.token", user)).transpose();
        let after = after.map_err(bad)?;
        let (users, next, revision) = self.holders(&tenant, name, after, page.limit).await?;
        let results =
            users.into_iter().map(|id| json!({ "type": subject.kind, "id": id })).collect();
        let token = next.map(|last| encode_page_token(KIND, &last)).unwrap_or_default();
        found(results, token, revision)
    }

    /// Up to `limit` users after `after` who hold `name` in `tenant`, in user id order;
    /// the key to go on from (`None`: no more), and the revision the members were read at.
    ///
    /// One piece, past 80 lines: the two member lists are merged, judged and cut in one
    /// loop, whose bounds (what each list may still hold) are only clear together.
    async fn holders(
        &self,
        tenant: &TenantId,
        name: &str,
        mut after: Option<UserId>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>, Revision), Failure> {
        let application = &self.application_id;
        let reach = tenant != application && self.models.current().model.reaches_every_tenant();
        let batch = limit as u32 + 1;
        let (mut results, mut scanned, mut revision) = (Vec::new(), 0, 0);
        loop {
            let now = now_unix();
            let mut lists = vec![self.members(tenant, after.as_ref(), batch, now).await?];
            if reach {
                lists.push(self.members(application, after.as_ref(), batch, now).await?);
            }
            // The candidates both lists have settled: up to the smallest last key of a
            // list that was cut (it may hold more past it).
            let mut bound: Option<String> = None;
            for (members, at) in &lists {
                revision = revision.max(*at);
                if members.len() == batch as usize
                    && let Some(last) = members.last()
                    && bound.as_ref().is_none_or(|bound| last.user_id < *bound)
                {
                    bound = Some(last.user_id.clone());
                }
            }
            let mut candidates: Vec<String> = lists
                .into_iter()
                .flat_map(|(members, _)| members.into_iter().map(|member| member.user_id))
                .filter(|user| bound.as_ref().is_none_or(|bound| user <= bound))
                .collect();
            candidates.sort_unstable();
            candidates.dedup();
            scanned += candidates.len();
            let judged = futures::stream::iter(candidates)
                .map(|user| async move {
                    let (answer, judge) = self.models.answer(&self.roles, &user, revision).await?;
                    let tenants = (application.as_str(), tenant.as_str());
                    let holds = judge.allows(&answer.roles, tenants, judge.asked(name), now_unix());
                    Ok::<_, Error>((user, holds))
                })
                .buffered(JUDGED_AT_ONCE)
                .collect::<Vec<_>>()
                .await;
            for judged in judged {
                let (user, holds) = judged?;
                if holds {
                    results.push(user);
                }
                if results.len() > limit {
                    results.truncate(limit);
                    let last = results.last().cloned();
                    return Ok((results, last, revision));
                }
            }
            let Some(bound) = bound else { return Ok((results, None, revision)) };
            if scanned >= MAX_SCANNED {
                return Ok((results, Some(bound), revision));
            }
            after = Some(UserId::trusted(bound));
        }
    }

    /// A page of `tenant`'s members; none when the tenant does not exist.
    async fn members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u32,
        now: i64,
    ) -> Result<(Vec<Member>, Revision), Failure> {
        match self.tenants.list_members(tenant, after, limit, now).await {
            Ok(page) => Ok(page),
            Err(Error::NotFound(_)) => Ok((Vec::new(), 0)),
            Err(err) => Err(err.into()),
        }
    }

    /// `POST /access/v1/search/resource`.
    pub(super) async fn search_resources(&self, body: &Object) -> Result<Vec<u8>, Failure> {
        const KIND: &str = "authzen.resource";
        let subject = wire::entity(body, None, "subject")?;
        let user = subject.required_id("subject")?;
        UserId::validate("subject.id", user).map_err(bad)?;
        let name = wire::action(body, None)?;
        Role::validate("action.name", name).map_err(bad)?;
        let resource = wire::entity(body, None, "resource")?;
        wire::context(body, None)?;
        let page = page(body, KIND)?;
        if resource.kind != "tenant" {
            return found(Vec::new(), String::new(), 0);
        }
        let (answer, judge) = self.models.answer(&self.roles, user, 0).await?;
        let (application, now) = (self.application_id.as_str(), now_unix());
        let asked = judge.asked(name);
        // No tenant id is empty, so "" asks what the user holds in a tenant they were
        // granted nothing in: what their application-tenant roles reach everywhere.
        let (tenants, token) = if judge.allows(&answer.roles, (application, ""), asked, now) {
            let after = page.after.as_deref().map(|t| TenantId::parse("page.token", t)).transpose();
            let after = after.map_err(bad)?;
            let mut tenants =
                self.tenants.list_tenants(after.as_ref(), page.limit as u32 + 1).await?;
            let ids = tenants.drain(..).map(|tenant| tenant.id.as_str().to_owned());
            keyset(ids, &Page { limit: page.limit, after: None }, KIND)
        } else {
            let mut ids: Vec<String> = answer.roles.authorization(now).into_keys().collect();
            ids.push(application.to_owned());
            ids.sort_unstable();
            ids.dedup();
            let holds =
                |tenant: &String| judge.allows(&answer.roles, (application, tenant), asked, now);
            keyset(ids.into_iter().filter(holds), &page, KIND)
        };
        let results = tenants.into_iter().map(|id| json!({ "type": "tenant", "id": id })).collect();
        found(results, token, answer.revision)
    }

    /// `POST /access/v1/search/action`.
    pub(super) async fn search_actions(&self, body: &Object) -> Result<Vec<u8>, Failure> {
        const KIND: &str = "authzen.action";
        let subject = wire::entity(body, None, "subject")?;
        let user = subject.required_id("subject")?;
        UserId::validate("subject.id", user).map_err(bad)?;
        let resource = wire::entity(body, None, "resource")?;
        let id = resource.required_id("resource")?;
        let context = wire::context(body, None)?;
        let page = page(body, KIND)?;
        if resource.kind == "route"
            && let Some(authz) = &self.authz
        {
            let (user, host) =
                (UserId::trusted(user.to_owned()), resource.property("resource", "host")?);
            let named = self.named_tenant(&resource, context)?;
            let mut allowed = Vec::new();
            for method in METHODS {
                match authz.decide_route(&user, (method, host, id), named.as_ref()).await {
                    Decision::Allow { .. } => allowed.push(method.to_owned()),
                    Decision::Unavailable => {
                        return Err(Error::Unavailable(
                            "the user's roles cannot be read now".into(),
                        )
                        .into());
                    }
                    _ => {}
                }
            }
            allowed.sort_unstable();
            let (names, token) = keyset(allowed.into_iter(), &page, KIND);
            let results = names.into_iter().map(|name| json!({ "name": name })).collect();
            return found(results, token, 0);
        }
        let tenant = self.tenant_of(&resource, context)?;
        let (answer, judge) = self.models.answer(&self.roles, user, 0).await?;
        let tenants = (self.application_id.as_str(), tenant.as_str());
        let (mut names, permissions) = judge.expand_in(&answer.roles, tenants, now_unix());
        names.extend(permissions);
        names.sort_unstable();
        names.dedup();
        let (names, token) = keyset(names.into_iter(), &page, KIND);
        let results = names.into_iter().map(|name| json!({ "name": name })).collect();
        found(results, token, answer.revision)
    }
}
