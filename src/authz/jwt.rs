//! Bearer JWTs as proxy identity: verified against rolecheck's own keys or a JWK Set
//! fetched from a URL, and remembered once verified.
//!
//! - Each distinct token is verified once: a bounded cache ([`VERIFIED_CAPACITY`]
//!   tokens, keyed by the token's SHA-256) keeps the user it names until the token's
//!   `exp` (at most [`VERIFIED_TTL`]), so a busy proxy pays for the signature only on a
//!   token's first request.
//! - A JWK Set from a URL is fetched at start (a failure is logged; requests are 401
//!   until it arrives), refreshed every [`JWKS_REFRESH`], and fetched again at once when
//!   a token names a `kid` it does not hold, at most once per [`REFETCH_EVERY`] (so
//!   tokens with made-up `kid`s cannot make us hammer the issuer). A failed refresh keeps
//!   the keys held.
//! - rolecheck's own keys (`"self"`) are looked at again when a token names a `kid`
//!   they lack: a follower's set follows its upstream's (see `crate::token::KeySet`).
//! - `exp` is required; `exp` and `nbf` are checked with [`LEEWAY`] of clock skew.
//! - A JWK Set is fetched within [`FETCH_TIMEOUT`] and at most [`MAX_JWKS_BYTES`]; over
//!   `https`, or plain `http` only to loopback or when the policy says `allow_http`.
//! - HMAC algorithms are refused (a JWK Set publishes public keys), and the algorithm
//!   is the key's (its `alg`, else its family's), never chosen by the token's header,
//!   so a public key is never used as an HMAC secret.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use moka::future::Cache;

use super::policy::{JwksSource, JwtIdentity};
use crate::token::KeySet;

/// Most verified tokens remembered.
pub const VERIFIED_CAPACITY: u64 = 100_000;
/// Longest a verified token is remembered, whatever its `exp`.
pub const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// How often a fetched JWK Set is refreshed.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// At most one fetch for an unknown `kid` this often.
pub const REFETCH_EVERY: Duration = Duration::from_secs(30);
/// Longest a JWK Set fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The clock skew allowed either side of a token's `nbf` and `exp`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Largest JWK Set accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Why a bearer token was not accepted (never shown to the client in detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Malformed, bad signature, wrong issuer or audience, expired, no user claim.
    Invalid,
    /// No key with the token's `kid` (after the bounded refetch).
    UnknownKey,
}

/// Verifies bearer tokens for one `[identity.jwt]`.
pub struct Verifier {
    config: JwtIdentity,
    keys: RwLock<Arc<KeyMap>>,
    /// rolecheck's own keys, and the JWK Set `keys` was built from (for `"self"`: a
    /// follower's set changes when its upstream's does).
    own: (Arc<KeySet>, RwLock<Arc<str>>),
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// By the token's SHA-256 (so 100,000 entries stay small whatever the tokens' size).
    verified: Cache<[u8; 32], (Arc<str>, u64)>,
}

/// Decoding keys by `kid`.
#[derive(Default)]
struct KeyMap {
    by_kid: HashMap<String, (DecodingKey, Vec<Algorithm>)>,
}

impl KeyMap {
    fn from_jwks(set: &JwkSet) -> Self {
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            let algorithms = algorithms_for(jwk);
            if algorithms.is_empty() {
                continue;
            }
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                by_kid.insert(kid, (key, algorithms));
            }
        }
        Self { by_kid }
    }
}

/// The keys of rolecheck's own JWK Set.
fn own_key_map(jwks: &str) -> KeyMap {
    serde_json::from_str::<JwkSet>(jwks).map(|set| KeyMap::from_jwks(&set)).unwrap_or_default()
}

/// The algorithms a public JWK may verify (none for a symmetric key).
fn algorithms_for(jwk: &jsonwebtoken::jwk::Jwk) -> Vec<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
    let declared =
        jwk.common.key_algorithm.and_then(|alg| alg.to_string().parse::<Algorithm>().ok());
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        AlgorithmParameters::OctetKey(_) => vec![],
    };
    match declared {
        Some(alg) if family.contains(&alg) => vec![alg],
        Some(_) => vec![],
        None => family,
    }
}

impl Verifier {
    /// A verifier for `config`; `own` are rolecheck's own keys (for `"self"`).
    pub fn new(config: JwtIdentity, own: Arc<KeySet>) -> Self {
        let own_jwks = own.jwks_json();
        let keys = match config.keys {
            JwksSource::Own => own_key_map(&own_jwks),
            JwksSource::Url(_) => KeyMap::default(),
        };
        Self {
            config,
            keys: RwLock::new(Arc::new(keys)),
            own: (own, RwLock::new(own_jwks)),
            last_fetch: tokio::sync::Mutex::new(None),
            verified: Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build(),
        }
    }

    /// The configuration verified against.
    pub fn config(&self) -> &JwtIdentity {
        &self.config
    }

    fn current(&self) -> Arc<KeyMap> {
        self.keys.read().map_or_else(|p| p.into_inner().clone(), |k| k.clone())
    }

    /// The user `token` names, once its signature and claims check out.
    pub async fn user(&self, token: &str) -> Result<Arc<str>, Rejected> {
        let now = crate::domain::now_unix() as u64;
        let hashed = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let digest: [u8; 32] = hashed.as_ref().try_into().map_err(|_| Rejected::Invalid)?;
        if let Some((user, exp)) = self.verified.get(&digest).await {
            if exp > now {
                return Ok(user);
            }
            self.verified.invalidate(&digest).await;
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejected::Invalid)?;
        let kid = header.kid.ok_or(Rejected::Invalid)?;
        let mut keys = self.current();
        if !keys.by_kid.contains_key(&kid) && self.refetch().await {
            keys = self.current();
        }
        let (key, algorithms) = keys.by_kid.get(&kid).ok_or(Rejected::UnknownKey)?;
        if !algorithms.contains(&header.alg) {
            return Err(Rejected::Invalid);
        }
        // RFC 8725: the algorithms are the key's (the header's `alg` must be one of them,
        // checked above and again by `decode`), and `exp` and `nbf` both count.
        let mut validation = Validation::new(header.alg);
        validation.algorithms = algorithms.clone();
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY.as_secs();
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            key,
            &validation,
        )
        .map_err(|_| Rejected::Invalid)?;
        let user = data.claims.get(&self.config.user_claim).and_then(|v| v.as_str());
        let user: Arc<str> = user.filter(|u| !u.is_empty()).ok_or(Rejected::Invalid)?.into();
        let exp = data.claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
        self.verified.insert(digest, (user.clone(), exp)).await;
        Ok(user)
    }

    /// Fetches the JWK Set now if a fetch is allowed (URL source, none in the last
    /// [`REFETCH_EVERY`]); whether new keys were installed.
    async fn refetch(&self) -> bool {
        let JwksSource::Url(url) = &self.config.keys else { return self.reread_own() };
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < REFETCH_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        self.fetch(url).await
    }

    async fn fetch(&self, url: &http::Uri) -> bool {
        match tokio::time::timeout(FETCH_TIMEOUT, super::fetch::get(url, MAX_JWKS_BYTES)).await {
            Ok(Ok(body)) => match serde_json::from_slice::<JwkSet>(&body) {
                Ok(set) => {
                    let keys = KeyMap::from_jwks(&set);
                    tracing::info!(%url, keys = keys.by_kid.len(), "JWK Set fetched");
                    if let Ok(mut current) = self.keys.write() {
                        *current = Arc::new(keys);
                    }
                    true
                }
                Err(err) => {
                    tracing::warn!(%url, %err, "JWK Set did not parse; keeping the keys held");
                    false
                }
            },
            Ok(Err(err)) => {
                tracing::warn!(%url, %err, "JWK Set fetch failed; keeping the keys held");
                false
            }
            Err(_) => {
                tracing::warn!(%url, "JWK Set fetch timed out; keeping the keys held");
                false
            }
        }
    }

    /// For `"self"`: rebuilds the keys if rolecheck's own set changed since they were
    /// built (a pointer comparison otherwise); whether it did.
    fn reread_own(&self) -> bool {
        let (own, seen) = &self.own;
        let now = own.jwks_json();
        let Ok(mut seen) = seen.write() else { return false };
        if Arc::ptr_eq(&seen, &now) {
            return false;
        }
        if let Ok(mut current) = self.keys.write() {
            *current = Arc::new(own_key_map(&now));
        }
        *seen = now;
        true
    }

    /// Fetches a URL source now and every [`JWKS_REFRESH`]; ends when `self` is dropped.
    pub fn refresh(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let JwksSource::Url(url) = self.config.keys.clone() else { return None };
        let weak = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            loop {
                let Some(verifier) = weak.upgrade() else { return };
                *verifier.last_fetch.lock().await = Some(Instant::now());
                verifier.fetch(&url).await;
                drop(verifier);
                tokio::time::sleep(JWKS_REFRESH).await;
            }
        }))
    }
}
