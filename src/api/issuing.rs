//! `Issue` and `GetKeys`: tokens signed by this process, or (on a follower, which holds no
//! private key) relayed to its upstream. The API sees which through [`Issuing`] alone.

use std::sync::Arc;

use super::tenant_or_application;
use crate::{
    cache::{RoleLookup, model::Models},
    domain::{TenantId, UserId, now_unix},
    error::{Error, Result},
    pb,
    token::Tokens,
};

/// Who mints the tokens this process hands out.
#[tonic::async_trait]
pub trait Issuing: Send + Sync + 'static {
    /// A token for `request`, asked by `caller`.
    async fn issue(&self, request: pb::IssueRequest, caller: &str) -> Result<pb::IssueResponse>;

    /// The JWK Set that verifies the tokens handed out here.
    async fn jwks(&self) -> Result<String>;
}

/// Tokens signed with this process's keys, carrying the roles read through its cache.
pub struct SignHere {
    /// The keys and token settings.
    pub tokens: Arc<Tokens>,
    /// Where a user's roles are read (the cache first).
    pub roles: RoleLookup,
    /// The tenant an empty tenant id means.
    pub application_id: TenantId,
    /// The model an expanded token is judged by.
    pub models: Arc<Models>,
}

#[tonic::async_trait]
impl Issuing for SignHere {
    async fn issue(&self, req: pb::IssueRequest, _caller: &str) -> Result<pb::IssueResponse> {
        let user = UserId::parse("user_id", &req.user_id)?;
        if req.tenant_ids.len() > super::role_check::MAX_BATCH {
            return Err(Error::invalid(
                "tenant_ids",
                format!("at most {}", super::role_check::MAX_BATCH),
            ));
        }
        let only = req
            .tenant_ids
            .iter()
            .enumerate()
            .map(|(i, tenant)| {
                tenant_or_application(&format!("tenant_ids[{i}]"), tenant, &self.application_id)
            })
            .collect::<Result<Vec<_>>>()?;
        if self.tokens.keys().signer().is_none() {
            return Err(Error::FailedPrecondition("no signing key configured".into()));
        }
        let now = now_unix();
        let (answer, expanded) = match req.expand {
            false => (self.roles.answer(user.as_str(), req.min_revision).await?, None),
            true => {
                let (answer, model) =
                    self.models.answer(&self.roles, user.as_str(), req.min_revision).await?;
                let object = model.expand(&answer.roles, self.application_id.as_str(), now);
                let object = object.into_iter().map(|(t, (r, p))| (t, (r, Some(p)))).collect();
                (answer, Some(object))
            }
        };
        let minted =
            self.tokens.mint((&user, &answer.roles), expanded, &only, req.ttl_seconds, now)?;
        Ok(pb::IssueResponse {
            access_token: minted.token,
            expires_at: Some(prost_types::Timestamp { seconds: minted.expires_at, nanos: 0 }),
            revision: answer.revision,
        })
    }

    async fn jwks(&self) -> Result<String> {
        Ok(self.tokens.keys().jwks_json().to_string())
    }
}
