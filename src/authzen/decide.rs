//! The evaluation endpoints: one decision, or a batch of them under one of the three
//! `evaluations_semantic` values.

use std::collections::HashMap;

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    AuthZen, Failure,
    wire::{self, Bad, Entity, Object},
};
use crate::{
    authz::Decision,
    cache::model::{Judge, Models},
    domain::{Role, TenantId, UserId, now_unix},
    error::{Error, Result},
    store::Answer,
};

/// Most items in one `evaluations` request (as in `CheckBatch`).
pub const MAX_EVALUATIONS: usize = 1000;

/// Users a batch reads at once (as `CheckBatch` loads them).
const READ_AT_ONCE: usize = 16;

/// What one evaluation asks, once mapped onto users, tenants and roles.
#[derive(Debug)]
pub enum Query<'a> {
    /// Does `user` hold the role, or have the permission, `name` in `tenant` (all three
    /// validated, borrowed from the request or the server).
    Holds { user: &'a str, tenant: &'a str, name: &'a str },
    /// May `user` take `method` on the route `path` (the API-gateway profile, decided by
    /// the proxy policy's routes).
    Route {
        user: UserId,
        method: &'a str,
        host: Option<&'a str>,
        path: &'a str,
        named: Option<TenantId>,
    },
}

/// One answer: the decision, and why when the reason is worth telling.
#[derive(Debug, Serialize)]
pub struct Outcome {
    decision: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Value>,
}

impl Outcome {
    fn of(decision: bool) -> Self {
        Self { decision, context: None }
    }

    fn denied(reason: &str) -> Self {
        Self { decision: false, context: Some(json!({ "reason": reason })) }
    }

    /// An item of a batch that could not be evaluated: a denial, with the error in its
    /// own context.
    fn failed(bad: Bad) -> Self {
        Self {
            decision: false,
            context: Some(json!({ "error": { "status": 400, "message": bad.0 } })),
        }
    }
}

/// The three `options.evaluations_semantic` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Semantic {
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

fn semantic(body: &Object) -> std::result::Result<Semantic, Bad> {
    let options = wire::optional_object(body, "options")?;
    let field = "options.evaluations_semantic";
    match wire::optional_string(options, field, "evaluations_semantic")? {
        None | Some("execute_all") => Ok(Semantic::ExecuteAll),
        Some("deny_on_first_deny") => Ok(Semantic::DenyOnFirstDeny),
        Some("permit_on_first_permit") => Ok(Semantic::PermitOnFirstPermit),
        Some(_) => Err(Bad(format!(
            "{field}: one of execute_all, deny_on_first_deny, permit_on_first_permit"
        ))),
    }
}

/// The users' answers a batch has read, so each user is read once.
type Memo<'a> = HashMap<&'a str, (Answer, Judge)>;

fn bad(err: Error) -> Bad {
    Bad(err.to_string())
}

impl AuthZen {
    /// The tenant a resource names: its id when it is a `tenant`, else its
    /// `properties.tenant_id`, else the context's `tenant_id`, else the application tenant.
    pub(super) fn tenant_of(
        &self,
        resource: &Entity<'_>,
        context: Option<&Object>,
    ) -> std::result::Result<TenantId, Bad> {
        if resource.kind == "tenant" {
            return TenantId::parse("resource.id", resource.required_id("resource")?).map_err(bad);
        }
        match self.named_tenant(resource, context)? {
            Some(tenant) => Ok(tenant),
            None => Ok(self.application_id.clone()),
        }
    }

    /// [`tenant_of`](Self::tenant_of), validated in place: no copy.
    fn tenant_str<'a>(
        &'a self,
        resource: &Entity<'a>,
        context: Option<&'a Object>,
    ) -> std::result::Result<&'a str, Bad> {
        let (field, id) = if resource.kind == "tenant" {
            ("resource.id", resource.required_id("resource")?)
        } else if let Some(id) = resource.property("resource", "tenant_id")? {
            ("resource.properties.tenant_id", id)
        } else if let Some(id) = wire::optional_string(context, "context.tenant_id", "tenant_id")? {
            ("context.tenant_id", id)
        } else {
            return Ok(self.application_id.as_str());
        };
        TenantId::validate(field, id).map_err(bad)?;
        Ok(id)
    }

    /// A tenant named in `resource.properties.tenant_id` or else `context.tenant_id`.
    pub(super) fn named_tenant(
        &self,
        resource: &Entity<'_>,
        context: Option<&Object>,
    ) -> std::result::Result<Option<TenantId>, Bad> {
        if let Some(id) = resource.property("resource", "tenant_id")? {
            return TenantId::parse("resource.properties.tenant_id", id).map(Some).map_err(bad);
        }
        match wire::optional_string(context, "context.tenant_id", "tenant_id")? {
            Some(id) => TenantId::parse("context.tenant_id", id).map(Some).map_err(bad),
            None => Ok(None),
        }
    }

    /// What `item` asks (`default`: a batch's top level, whose entities it inherits).
    fn query<'a>(
        &'a self,
        item: &'a Object,
        default: Option<&'a Object>,
    ) -> std::result::Result<Query<'a>, Bad> {
        let subject = wire::entity(item, default, "subject")?;
        let user = subject.required_id("subject")?;
        UserId::validate("subject.id", user).map_err(bad)?;
        let name = wire::action(item, default)?;
        let resource = wire::entity(item, default, "resource")?;
        let id = resource.required_id("resource")?;
        let context = wire::context(item, default)?;
        if resource.kind == "route" && self.authz.is_some() {
            return Ok(Query::Route {
                user: UserId::trusted(user.to_owned()),
                method: name,
                host: resource.property("resource", "host")?,
                path: id,
                named: self.named_tenant(&resource, context)?,
            });
        }
        Role::validate("action.name", name).map_err(bad)?;
        Ok(Query::Holds { user, tenant: self.tenant_str(&resource, context)?, name })
    }

    /// The answer to `query`, reading each user once per `memo`.
    async fn decide<'a>(&self, query: Query<'a>, memo: &mut Memo<'a>) -> Result<Outcome> {
        match query {
            Query::Holds { user, tenant, name } => {
                if !memo.contains_key(user) {
                    let judged = self.models.answer(&self.roles, user, 0).await?;
                    memo.insert(user, judged);
                }
                let (answer, judge) = &memo[user];
                let tenants = (self.application_id.as_str(), tenant);
                Ok(Outcome::of(judge.allows(&answer.roles, tenants, judge.asked(name), now_unix())))
            }
            Query::Route { user, method, host, path, named } => {
                let Some(authz) = &self.authz else { return Ok(Outcome::of(false)) };
                match authz.decide_route(&user, (method, host, path), named.as_ref()).await {
                    Decision::Allow { .. } => Ok(Outcome::of(true)),
                    Decision::Denied(why) => Ok(Outcome::denied(why)),
                    Decision::Unauthenticated => Ok(Outcome::denied("no user")),
                    Decision::Unavailable => {
                        Err(Error::Unavailable("the user's roles cannot be read now".into()))
                    }
                }
            }
        }
    }

    /// Reads every user `queries` ask about: from memory at once, the rest a few at a time
    /// (as `CheckBatch` does), so a batch of users the cache lacks costs a few round trips
    /// to the store, not one each.
    /// Only for `execute_all`: a short-circuit reads users as it reaches them.
    async fn read_users<'a>(
        &self,
        queries: &[std::result::Result<Query<'a>, Bad>],
        memo: &mut Memo<'a>,
    ) -> Result<()> {
        let mut users: Vec<&'a str> = queries
            .iter()
            .filter_map(|query| match query {
                Ok(Query::Holds { user, .. }) => Some(*user),
                _ => None,
            })
            .collect();
        users.sort_unstable();
        users.dedup();
        // From memory when read under the model held, as CheckBatch does; the rest below.
        let held = self.models.current();
        let mut hits = 0;
        users.retain(|&user| {
            let Some(answer) = self.roles.in_memory(user, 0) else { return true };
            let Some(judge) = Models::judge_under(&held, &answer) else { return true };
            memo.insert(user, (answer, judge));
            hits += 1;
            false
        });
        self.roles.count_hits(hits);
        // By index, the user copied into its read: a stream of futures borrowing the
        // request's strings trips the compiler's higher-ranked lifetime check.
        let reads = futures::stream::iter(0..users.len())
            .map(|i| {
                let user = users[i].to_owned();
                async move { (i, self.models.answer(&self.roles, &user, 0).await) }
            })
            .buffer_unordered(READ_AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        for (i, judged) in reads {
            memo.insert(users[i], judged?);
        }
        Ok(())
    }

    /// `POST /access/v1/evaluation`.
    pub(super) async fn evaluation(&self, body: &Object) -> std::result::Result<Vec<u8>, Failure> {
        let query = self.query(body, None)?;
        let outcome = self.decide(query, &mut Memo::new()).await?;
        super::to_json(&outcome)
    }

    /// `POST /access/v1/evaluations`: without items (absent or empty), as the single
    /// endpoint; else one answer per item in order, an item that cannot be evaluated
    /// denied with its error in its own context, cut short after the first denial or
    /// permit when the semantic says so.
    pub(super) async fn evaluations(&self, body: &Object) -> std::result::Result<Vec<u8>, Failure> {
        let items = match body.get("evaluations") {
            None | Some(Value::Null) => return self.evaluation(body).await,
            Some(Value::Array(items)) if items.is_empty() => return self.evaluation(body).await,
            Some(Value::Array(items)) => items,
            Some(_) => return Err(Bad("evaluations: must be an array".into()).into()),
        };
        if items.len() > MAX_EVALUATIONS {
            return Err(Bad(format!(
                "evaluations: at most {MAX_EVALUATIONS} items, got {}",
                items.len()
            ))
            .into());
        }
        let semantic = semantic(body)?;
        let queries: Vec<_> = items
            .iter()
            .map(|item| match item {
                Value::Object(item) => self.query(item, Some(body)),
                _ => Err(Bad("must be a JSON object".into())),
            })
            .collect();
        let mut memo = Memo::new();
        if semantic == Semantic::ExecuteAll {
            self.read_users(&queries, &mut memo).await?;
        }
        let mut outcomes = Vec::with_capacity(items.len());
        for (i, query) in queries.into_iter().enumerate() {
            let outcome = match query {
                Ok(query) => self.decide(query, &mut memo).await?,
                Err(Bad(why)) => Outcome::failed(Bad(format!("evaluations[{i}]: {why}"))),
            };
            let stop = match semantic {
                Semantic::ExecuteAll => false,
                Semantic::DenyOnFirstDeny => !outcome.decision,
                Semantic::PermitOnFirstPermit => outcome.decision,
            };
            outcomes.push(outcome);
            if stop {
                break;
            }
        }
        #[derive(Serialize)]
        struct Evaluations {
            evaluations: Vec<Outcome>,
        }
        super::to_json(&Evaluations { evaluations: outcomes })
    }
}
