//! Access tokens: the seed's JWT, whose `authorization` object says which roles a user
//! holds in each tenant, so any service can verify it and decide offline.

mod keys;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::Rng;
use serde::Serialize;

pub use keys::{KeyKind, KeySet, SigningKey};

use crate::{
    domain::{TenantId, UnixSeconds, UserId, UserRoles},
    error::{Error, Result},
};

/// How tokens are minted.
#[derive(Clone, Debug)]
pub struct TokenSettings {
    /// The `iss` claim.
    pub issuer: String,
    /// The `aud` claim.
    pub audience: String,
    /// Lifetime when the caller asks for none.
    pub default_ttl: Duration,
    /// Longest lifetime; longer requests are capped to it.
    pub max_ttl: Duration,
    /// Largest token accepted, in bytes.
    pub max_bytes: usize,
}

/// Mints access tokens with the first key of a [`KeySet`].
#[derive(Debug)]
pub struct Tokens {
    keys: Arc<KeySet>,
    metrics: Arc<crate::metrics::Metrics>,
    settings: TokenSettings,
}

/// One tenant's entry in the `authorization` object.
#[derive(Serialize)]
struct TenantRoles<'a> {
    roles: &'a [String],
    /// Only in an expanded token.
    #[serde(skip_serializing_if = "Option::is_none")]
    permissions: Option<&'a [String]>,
}

/// What goes in a token's `authorization` object, per tenant: the roles, and (expanded,
/// under a model) the permissions.
pub type Object = BTreeMap<String, (Vec<String>, Option<Vec<String>>)>;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    #[serde(rename = "userId")]
    user_id: serde_json::Value,
    iat: UnixSeconds,
    nbf: UnixSeconds,
    exp: UnixSeconds,
    jti: String,
    authorization: BTreeMap<&'a str, TenantRoles<'a>>,
}

/// A minted token.
#[derive(Debug)]
pub struct Minted {
    /// The compact JWS.
    pub token: String,
    /// Its `exp`.
    pub expires_at: UnixSeconds,
}

/// Largest integer a JSON number carries exactly (2^53 - 1).
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// `userId`: a JSON number when the id is a canonical decimal integer within 53 bits,
/// otherwise the string.
fn user_id_claim(user: &UserId) -> serde_json::Value {
    match user.as_str().parse::<i64>() {
        Ok(n) if n.to_string() == user.as_str() && n.unsigned_abs() <= MAX_SAFE_INTEGER as u64 => {
            n.into()
        }
        _ => user.as_str().into(),
    }
}

impl Tokens {
    /// Mints with `keys` under `settings`.
    pub fn new(
        keys: Arc<KeySet>,
        metrics: Arc<crate::metrics::Metrics>,
        settings: TokenSettings,
    ) -> Self {
        Self { keys, metrics, settings }
    }

    /// The published keys.
    pub fn keys(&self) -> &Arc<KeySet> {
        &self.keys
    }

    /// Mints a token for `user` from `roles` at `now`: its `authorization` is exactly
    /// `roles.authorization(now)` (or `expanded`, the same expanded under a model),
    /// narrowed to `only` when given. `ttl` 0 means the default, and is capped by the
    /// maximum; `exp` never outlasts a carried role.
    pub fn mint(
        &self,
        (user, roles): (&UserId, &UserRoles),
        expanded: Option<Object>,
        only: &[TenantId],
        ttl_seconds: u32,
        now: UnixSeconds,
    ) -> Result<Minted> {
        let key = self
            .keys
            .signer()
            .ok_or_else(|| Error::FailedPrecondition("no signing key configured".into()))?;
        let is_expanded = expanded.is_some();
        let mut object: Object = match expanded {
            Some(object) => object,
            None => roles.authorization(now).into_iter().map(|(t, r)| (t, (r, None))).collect(),
        };
        if !only.is_empty() {
            object.retain(|tenant, _| only.iter().any(|t| t.as_str() == tenant));
        }
        let ttl = match ttl_seconds {
            0 => self.settings.default_ttl,
            n => Duration::from_secs(n.into()).min(self.settings.max_ttl),
        };
        let mut exp = now + ttl.as_secs() as i64;
        // Implied roles may come from any tenant's (the application's): an expanded token
        // lives no longer than the earliest-expiring role anywhere.
        let counts = |tenant: &str| is_expanded || object.contains_key(tenant);
        if let Some(earliest) = roles.earliest_expiry_in(now, counts) {
            exp = exp.min(earliest);
        }
        let claims = Claims {
            iss: &self.settings.issuer,
            aud: &self.settings.audience,
            sub: user.as_str(),
            user_id: user_id_claim(user),
            iat: now,
            nbf: now,
            exp,
            jti: URL_SAFE_NO_PAD.encode(rand::rng().random::<[u8; 16]>()),
            authorization: object
                .iter()
                .map(|(tenant, (roles, permissions))| {
                    (tenant.as_str(), TenantRoles { roles, permissions: permissions.as_deref() })
                })
                .collect(),
        };
        let mut header = jsonwebtoken::Header::new(key.algorithm());
        header.typ = Some("at+jwt".into());
        header.kid = Some(key.kid().to_owned());
        let token = jsonwebtoken::encode(&header, &claims, key.encoding_key()).map_err(|err| {
            tracing::error!(kind = ?err.kind(), "signing failed");
            Error::Internal("signing failed".into())
        })?;
        if token.len() > self.settings.max_bytes {
            return Err(Error::FailedPrecondition(format!(
                "token would be {} bytes, over the {}-byte limit; narrow it with tenant_ids",
                token.len(),
                self.settings.max_bytes
            )));
        }
        self.metrics.token_issued(&format!("{:?}", key.algorithm()));
        Ok(Minted { token, expires_at: exp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_is_a_number_only_when_canonical_and_safe() {
        let id = |s: &str| user_id_claim(&UserId::parse("u", s).expect("id"));
        assert_eq!(id("1"), serde_json::json!(1));
        assert_eq!(id("9007199254740991"), serde_json::json!(9007199254740991_i64));
        assert_eq!(id("9007199254740992"), serde_json::json!("9007199254740992"));
        assert_eq!(id("01"), serde_json::json!("01"));
        assert_eq!(id("+1"), serde_json::json!("+1"));
        assert_eq!(id("-3"), serde_json::json!(-3));
        assert_eq!(id("-0"), serde_json::json!("-0"));
        assert_eq!(id("abc"), serde_json::json!("abc"));
        assert_eq!(id("-9007199254740991"), serde_json::json!(-9007199254740991_i64));
        assert_eq!(id("-9007199254740992"), serde_json::json!("-9007199254740992"));
        assert_eq!(id("-9223372036854775808"), serde_json::json!("-9223372036854775808"));
        assert_eq!(id("9223372036854775807"), serde_json::json!("9223372036854775807"));
    }
}
