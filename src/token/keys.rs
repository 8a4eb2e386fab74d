//! Signing keys and the JWK Set that publishes them.
//!
//! Keys are PEM files: RSA (PKCS#1 `RSA PRIVATE KEY` or PKCS#8, at least 2048 bits) signs
//! RS256, P-256 EC (PKCS#8 or SEC1 `EC PRIVATE KEY`) signs ES256, Ed25519 (PKCS#8) signs
//! EdDSA. The algorithm follows from the key type. Each key's `kid` is its RFC 7638
//! thumbprint. aws-lc-rs parses and generates keys and yields their public parts;
//! jsonwebtoken (on its aws-lc-rs backend) signs.

use std::{collections::BTreeMap, fmt, path::Path, sync::Arc};

use aws_lc_rs::{
    digest,
    encoding::AsDer,
    rsa,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// The kinds of signing key rolecheck can generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048, RS256.
    Rsa,
    /// P-256, ES256.
    EcP256,
    /// Ed25519, EdDSA.
    Ed25519,
}

/// One private signing key. Its `Debug` shows only the algorithm and `kid`.
pub struct SigningKey {
    algorithm: Algorithm,
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rejected(what: &str) -> Error {
    Error::FailedPrecondition(format!("signing key: {what}"))
}

impl SigningKey {
    /// Parses a PEM private key. Errors never include key material.
    pub fn from_pem(pem_text: &[u8]) -> Result<Self> {
        let block = pem::parse(pem_text).map_err(|_| rejected("not a PEM file"))?;
        let der = block.contents();
        match block.tag() {
            "RSA PRIVATE KEY" => Self::rsa(
                rsa::KeyPair::from_der(der).map_err(|_| rejected("invalid RSA key"))?,
                pem_text,
            ),
            "EC PRIVATE KEY" => Self::ec(
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(|_| rejected("only P-256 EC keys are supported"))?,
            ),
            "PRIVATE KEY" => {
                if let Ok(key) = rsa::KeyPair::from_pkcs8(der) {
                    Self::rsa(key, pem_text)
                } else if let Ok(key) =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                {
                    Self::ec(key)
                } else if let Ok(key) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                    Self::ed25519(&key)
                } else {
                    Err(rejected("a PKCS#8 key that is not RSA (2048+), P-256 or Ed25519"))
                }
            }
            other => Err(rejected(&format!("unsupported PEM block {other:?}"))),
        }
    }

    /// Reads and parses a PEM file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|err| {
            Error::FailedPrecondition(format!("cannot read signing key {}: {err}", path.display()))
        })?;
        Self::from_pem(&text)
            .map_err(|err| Error::FailedPrecondition(format!("{} ({})", err, path.display())))
    }

    /// Generates a new key; returns it with its PKCS#8 PEM encoding.
    pub fn generate(kind: KeyKind) -> Result<(Self, String)> {
        let failed = |_| Error::Internal("key generation failed".into());
        let pkcs8: Vec<u8> = match kind {
            KeyKind::Rsa => rsa::KeyPair::generate(rsa::KeySize::Rsa2048)
                .map_err(failed)?
                .as_der()
                .map_err(failed)?
                .as_ref()
                .to_vec(),
            KeyKind::EcP256 => EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                .map_err(failed)?
                .to_pkcs8v1()
                .map_err(failed)?
                .as_ref()
                .to_vec(),
            KeyKind::Ed25519 => Ed25519KeyPair::generate()
                .map_err(failed)?
                .to_pkcs8()
                .map_err(failed)?
                .as_ref()
                .to_vec(),
        };
        let pem_text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8));
        Ok((Self::from_pem(pem_text.as_bytes())?, pem_text))
    }

    fn rsa(key: rsa::KeyPair, pem_text: &[u8]) -> Result<Self> {
        if key.public_modulus_len() < 256 {
            return Err(rejected("RSA keys must have at least 2048 bits"));
        }
        let public = key.public_key();
        let members = json!({
            "kty": "RSA",
            "n": b64(public.modulus().big_endian_without_leading_zero()),
            "e": b64(public.exponent().big_endian_without_leading_zero()),
        });
        let encoding =
            EncodingKey::from_rsa_pem(pem_text).map_err(|_| rejected("invalid RSA key"))?;
        Ok(Self::finish(Algorithm::RS256, encoding, members))
    }

    fn ec(key: EcdsaKeyPair) -> Result<Self> {
        // An uncompressed SEC1 point: 0x04 || x || y.
        let point = key.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        let members = json!({ "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y) });
        let pkcs8 = key.to_pkcs8v1().map_err(|_| rejected("invalid EC key"))?;
        Ok(Self::finish(Algorithm::ES256, EncodingKey::from_ec_der(pkcs8.as_ref()), members))
    }

    fn ed25519(key: &Ed25519KeyPair) -> Result<Self> {
        let members =
            json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key().as_ref()) });
        let pkcs8 = key.to_pkcs8().map_err(|_| rejected("invalid Ed25519 key"))?;
        Ok(Self::finish(Algorithm::EdDSA, EncodingKey::from_ed_der(pkcs8.as_ref()), members))
    }

    /// Completes a key from its required public members: `kid` is the RFC 7638
    /// thumbprint (SHA-256 over the required members, keys sorted, no whitespace).
    fn finish(algorithm: Algorithm, encoding: EncodingKey, members: Value) -> Self {
        let canonical: BTreeMap<String, Value> =
            serde_json::from_value(members.clone()).unwrap_or_default();
        let canonical = serde_json::to_string(&canonical).unwrap_or_default();
        let kid = b64(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref());
        let mut jwk = members;
        if let Value::Object(map) = &mut jwk {
            map.insert("kid".into(), kid.clone().into());
            map.insert("alg".into(), format!("{algorithm:?}").into());
            map.insert("use".into(), "sig".into());
        }
        Self { algorithm, kid, encoding, jwk }
    }

    /// The JWS algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The key id: the RFC 7638 thumbprint.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK (public members only).
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }
}

/// The configured keys: the first signs, all are published.
///
/// A server's own keys are fixed for the life of the process. A follower's set is its
/// upstream's, published and refreshed with [`publish`](Self::publish).
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<SigningKey>,
    jwks_json: std::sync::RwLock<Arc<str>>,
}

impl KeySet {
    /// A key set from keys in order of preference.
    pub fn new(keys: Vec<SigningKey>) -> Self {
        let jwks = json!({ "keys": keys.iter().map(SigningKey::jwk).collect::<Vec<_>>() });
        Self { keys, jwks_json: std::sync::RwLock::new(jwks.to_string().into()) }
    }

    /// Publishes another server's JWK Set and signs nothing (a follower's keys).
    pub fn published(jwks_json: String) -> Self {
        Self { keys: Vec::new(), jwks_json: std::sync::RwLock::new(jwks_json.into()) }
    }

    /// Replaces a published set (the upstream's keys changed); whether it differed.
    pub fn publish(&self, jwks_json: String) -> bool {
        let Ok(mut current) = self.jwks_json.write() else { return false };
        let changed = *current.as_ref() != jwks_json;
        if changed {
            *current = jwks_json.into();
        }
        changed
    }

    /// The key that signs new tokens, if any is configured.
    pub fn signer(&self) -> Option<&SigningKey> {
        self.keys.first()
    }

    /// The RFC 7517 JWK Set, as JSON.
    pub fn jwks_json(&self) -> Arc<str> {
        self.jwks_json.read().map_or_else(|p| p.into_inner().clone(), |json| json.clone())
    }

    /// Loads `paths`; with none and an embedded store, loads or creates the key kept in
    /// `generated` (owner-only permissions); with none otherwise, an empty set.
    pub fn load(paths: &[std::path::PathBuf], generated: Option<&Path>) -> Result<Self> {
        if !paths.is_empty() {
            let keys = paths.iter().map(|p| SigningKey::from_file(p)).collect::<Result<_>>()?;
            return Ok(Self::new(keys));
        }
        let Some(path) = generated else { return Ok(Self::new(Vec::new())) };
        if path.exists() {
            return Ok(Self::new(vec![SigningKey::from_file(path)?]));
        }
        let (key, pem_text) = SigningKey::generate(KeyKind::Rsa)?;
        write_private(path, pem_text.as_bytes())?;
        tracing::info!(kid = key.kid(), path = %path.display(), "generated a signing key");
        Ok(Self::new(vec![key]))
    }
}

/// Writes a new file readable and writable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;

    let fail = |err: std::io::Error| {
        Error::FailedPrecondition(format!("cannot write {}: {err}", path.display()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(fail)?;
    file.write_all(contents).map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_kind_signs_without_panicking() {
        for kind in [KeyKind::Rsa, KeyKind::EcP256, KeyKind::Ed25519] {
            let (key, pem_text) = SigningKey::generate(kind).expect("generate");
            let header = jsonwebtoken::Header::new(key.algorithm());
            let token = jsonwebtoken::encode(&header, &json!({"sub": "1"}), key.encoding_key())
                .expect("sign");
            assert_eq!(token.split('.').count(), 3);
            let again = SigningKey::from_pem(pem_text.as_bytes()).expect("reparse");
            assert_eq!(again.kid(), key.kid(), "kid is a stable thumbprint");
            assert!(!format!("{key:?}").contains("PRIVATE"), "Debug shows no key material");
        }
    }

    #[test]
    fn rfc7638_thumbprint_example() {
        // RFC 7638 section 3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let members = json!({ "kty": "RSA", "n": n, "e": "AQAB" });
        let key = SigningKey::finish(Algorithm::RS256, EncodingKey::from_secret(b"x"), members);
        assert_eq!(key.kid(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn a_generated_key_file_is_owner_only() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys/signing-key.pem");
        let first = KeySet::load(&[], Some(&path)).expect("generate");
        let second = KeySet::load(&[], Some(&path)).expect("reload");
        assert_eq!(first.signer().map(SigningKey::kid), second.signer().map(SigningKey::kid));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let jwks: Value = serde_json::from_str(&first.jwks_json()).expect("json");
        let jwk = &jwks["keys"][0];
        assert_eq!(jwk["kty"], "RSA");
        assert!(jwk.get("d").is_none() && jwk.get("p").is_none(), "public members only");
    }
}
