//! Callers and credentials: bearer keys with scopes, from a file of SHA-256 hashes.
//!
//! ```toml
//! [[key]]
//! name = "billing-service"   # appears in logs and the audit trail, never the secret
//! sha256 = "9f86d0818…"      # hex SHA-256 of the bearer secret
//! scopes = ["check"]
//!
//! [[certificate]]            # mTLS callers, when --tls-client-ca is set
//! subject = "CN=billing-service"
//! scopes = ["check", "issue"]
//! ```
//!
//! The file holds no secrets. It is reloaded on SIGHUP and when it changes; a reload that
//! fails keeps the keys in force and logs why.

mod layer;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use aws_lc_rs::{constant_time, digest};
use serde::Deserialize;

pub use layer::{Access, AuthLayer, PeerIdentity, required_scope};

use crate::error::{Error, Result};

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Check, CheckBatch, GetAuthorization, ListMembers, Watch, ListChanges, GetTenant,
    /// ListTenants.
    Check,
    /// Grant, Revoke, SetRoles, CreateTenant, DeleteTenant.
    Write,
    /// Issue.
    Issue,
}

/// Who is calling, as the auth layer established it; in request extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The key's name, the certificate's subject, or `anonymous` when auth is off.
    pub name: String,
    /// What the caller may do.
    pub scopes: Vec<Scope>,
}

impl Caller {
    /// The caller when no keys are configured: everything is allowed.
    pub fn anonymous() -> Self {
        Self { name: "anonymous".into(), scopes: vec![Scope::Check, Scope::Write, Scope::Issue] }
    }

    /// Whether the caller holds `scope`.
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// The name to record for a request's caller (audit trail).
pub fn caller_name<T>(request: &tonic::Request<T>) -> String {
    request.extensions().get::<Caller>().map_or_else(|| "anonymous".into(), |c| c.name.clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
    #[serde(default)]
    certificate: Vec<CertEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    scopes: Vec<Scope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertEntry {
    subject: String,
    scopes: Vec<Scope>,
}

struct Key {
    name: String,
    hash: [u8; 32],
    scopes: Vec<Scope>,
}

/// The configured keys and certificate subjects.
#[derive(Default)]
pub struct KeyRing {
    keys: Vec<Key>,
    certificates: Vec<(String, Vec<Scope>)>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("KeyRing").field("keys", &names).finish_non_exhaustive()
    }
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl KeyRing {
    /// Parses the TOML key file.
    pub fn parse(text: &str) -> Result<Self> {
        let file: KeyFile = toml::from_str(text).map_err(|err| {
            Error::FailedPrecondition(format!("api keys file: {}", err.message()))
        })?;
        let mut keys = Vec::with_capacity(file.key.len());
        for entry in file.key {
            if entry.name.trim().is_empty() {
                return Err(Error::FailedPrecondition("api keys file: a key has no name".into()));
            }
            let hash = parse_hex32(&entry.sha256).ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "api keys file: key {:?}: sha256 must be 64 hex digits",
                    entry.name
                ))
            })?;
            keys.push(Key { name: entry.name, hash, scopes: entry.scopes });
        }
        let certificates = file.certificate.into_iter().map(|c| (c.subject, c.scopes)).collect();
        Ok(Self { keys, certificates })
    }

    /// Reads and parses the key file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::FailedPrecondition(format!("cannot read {}: {err}", path.display()))
        })?;
        Self::parse(&text)
    }

    /// Whether no keys and no certificate subjects are configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.certificates.is_empty()
    }

    /// The caller a bearer secret identifies. Every configured hash is compared, in
    /// constant time, whatever matches.
    pub fn authenticate(&self, secret: &str) -> Option<Caller> {
        let presented = digest::digest(&digest::SHA256, secret.as_bytes());
        let mut found = None;
        for key in &self.keys {
            if constant_time::verify_slices_are_equal(presented.as_ref(), &key.hash).is_ok() {
                found = Some(key);
            }
        }
        found.map(|key| Caller { name: key.name.clone(), scopes: key.scopes.clone() })
    }

    /// The caller a verified client certificate subject identifies.
    pub fn certificate(&self, subject: &str) -> Caller {
        let scopes = self
            .certificates
            .iter()
            .find(|(s, _)| s == subject)
            .map(|(_, scopes)| scopes.clone())
            .unwrap_or_default();
        Caller { name: subject.to_owned(), scopes }
    }
}

/// The key ring in force, swapped whole on reload.
#[derive(Clone, Debug)]
pub struct Keys {
    current: Arc<RwLock<Arc<KeyRing>>>,
    path: Option<PathBuf>,
}

impl Keys {
    /// Keys from `path` (none: auth is off).
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let ring = path.map(KeyRing::load).transpose()?.unwrap_or_default();
        Ok(Self { current: Arc::new(RwLock::new(Arc::new(ring))), path: path.map(Path::to_owned) })
    }

    /// The key ring in force.
    pub fn current(&self) -> Arc<KeyRing> {
        self.current.read().map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    }

    /// Re-reads the file; on failure keeps the keys in force and logs why.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        match KeyRing::load(path) {
            Ok(ring) => {
                let count = ring.keys.len();
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(ring);
                }
                tracing::info!(keys = count, "api keys reloaded");
            }
            Err(err) => tracing::error!(%err, "api keys reload failed; keeping the keys in force"),
        }
    }

    /// Reloads on SIGHUP and whenever the file's modification time changes (polled
    /// every `every`).
    pub fn watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let keys = self.clone();
        tokio::spawn(async move {
            let Some(path) = keys.path.clone() else { return };
            let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen: Option<SystemTime> = mtime(&path);
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(signal) => {
                            signal.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<()>();
                tokio::select! {
                    () = hangup => keys.reload(),
                    () = tokio::time::sleep(every) => {
                        let now = mtime(&path);
                        if now != seen {
                            seen = now;
                            keys.reload();
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn keys_authenticate_by_hash_and_carry_scopes() {
        let ring = KeyRing::parse(&format!(
            "[[key]]\nname = \"svc\"\nsha256 = \"{TEST_HASH}\"\nscopes = [\"check\"]\n"
        ))
        .expect("parse");
        let caller = ring.authenticate("test").expect("sha256(test) is configured");
        assert_eq!(caller.name, "svc");
        assert!(caller.may(Scope::Check) && !caller.may(Scope::Write));
        assert!(ring.authenticate("wrong").is_none());
    }

    #[test]
    fn a_reload_that_fails_keeps_the_keys_in_force() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys.toml");
        let entry = |name: &str| {
            format!("[[key]]\nname = \"{name}\"\nsha256 = \"{TEST_HASH}\"\nscopes = [\"check\"]\n")
        };
        std::fs::write(&path, entry("first")).expect("write");
        let keys = Keys::load(Some(&path)).expect("load");
        std::fs::write(&path, "[[key]]\nname = ").expect("write");
        keys.reload();
        assert_eq!(keys.current().authenticate("test").expect("kept").name, "first");
        std::fs::write(&path, entry("second")).expect("write");
        keys.reload();
        assert_eq!(keys.current().authenticate("test").expect("reloaded").name, "second");
    }

    #[test]
    fn malformed_files_are_refused_without_echoing_values() {
        assert!(KeyRing::parse("[[key]]\nname = \"x\"\nsha256 = \"zz\"\nscopes = []").is_err());
        assert!(KeyRing::parse("[[key]]\nname = \"x\"\nscopes = [\"root\"]").is_err());
        assert!(KeyRing::parse("nonsense = 1").is_err());
    }
}
