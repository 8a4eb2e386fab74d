//! Callers and credentials: bearer keys with scopes, from a file of SHA-256 hashes.
//!
//! ```toml
//! [[key]]
//! name = "billing-service"   # appears in logs and the audit trail, never the secret
//! sha256 = "9f86d0818…"      # hex SHA-256 of the bearer secret
//! scopes = ["check"]
//!
//! [[certificate]]            # mTLS callers, when --tls-client-ca is set
//! cn = "billing-service"     # or uri = "spiffe://…", dns = "billing.internal"
//! scopes = ["check", "issue"]
//! ```
//!
//! A certificate entry names one structured identity: the subject's CN attribute (`cn`,
//! or the older spelling `subject = "CN=…"`), a DNS name or a URI from the subject
//! alternative names. A verified certificate that matches no entry is `UNAUTHENTICATED`.
//!
//! The file holds no secrets. Whether callers must authenticate is decided once, at
//! start: given a keys file, always. The file is reloaded on SIGHUP and when it changes;
//! a reload that cannot be read, does not parse, or lists no keys and no certificates
//! (a truncated file, a half-written ConfigMap) keeps the keys in force, logs an error
//! and counts it in `rolecheck_api_keys_reload_failures_total`: a reload never loosens
//! authentication.

mod layer;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use aws_lc_rs::{constant_time, digest};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

pub use layer::{Access, AuthLayer, ON_BEHALF_OF, PeerIdentity, RULES, required_scope, rule};

use crate::error::{Error, Result};

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Check, CheckBatch, GetAuthorization, ListMembers, GetTenant, ListTenants.
    Check,
    /// Grant, Revoke, SetRoles, CreateTenant, DeleteTenant.
    Write,
    /// Issue.
    Issue,
    /// ListChanges and Watch: every tenant's history and every caller's name.
    Audit,
    /// Watch, for a follower (and relaying its callers).
    Follow,
    /// Forward-auth and ext_authz decisions: the proxy in front of an app.
    Proxy,
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
        Self {
            name: "anonymous".into(),
            scopes: vec![
                Scope::Check,
                Scope::Write,
                Scope::Issue,
                Scope::Audit,
                Scope::Follow,
                Scope::Proxy,
            ],
        }
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
    key: Vec<toml::Spanned<KeyEntry>>,
    #[serde(default)]
    certificate: Vec<toml::Spanned<CertEntry>>,
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
    /// The older spelling of `cn`: exactly `CN=<name>`.
    subject: Option<String>,
    cn: Option<String>,
    dns: Option<String>,
    uri: Option<String>,
    scopes: Vec<Scope>,
}

/// The one structured identity a certificate entry names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CertId {
    Cn(String),
    Dns(String),
    Uri(String),
}

impl CertId {
    fn from_entry(entry: &CertEntry) -> Result<Self> {
        let legacy = entry.subject.as_deref().map(|subject| {
            subject
                .strip_prefix("CN=")
                .filter(|cn| !cn.contains([',', '+', '=']))
                .map(str::to_owned)
        });
        let named = [
            legacy.map(|cn| cn.map(CertId::Cn)),
            entry.cn.clone().map(|v| Some(CertId::Cn(v))),
            entry.dns.clone().map(|v| Some(CertId::Dns(v))),
            entry.uri.clone().map(|v| Some(CertId::Uri(v))),
        ];
        let named: Vec<Option<CertId>> = named.into_iter().flatten().collect();
        match named.as_slice() {
            [Some(id)] if !id.value().trim().is_empty() => Ok(id.clone()),
            [None] => Err(Error::FailedPrecondition(
                "a certificate's `subject` must be `CN=<name>`; use `cn`, `dns` \
                 or `uri` for other identities"
                    .into(),
            )),
            _ => Err(Error::FailedPrecondition(
                "a certificate entry needs exactly one non-empty `cn`, `dns` or \
                 `uri`"
                    .into(),
            )),
        }
    }

    fn value(&self) -> &str {
        match self {
            CertId::Cn(v) | CertId::Dns(v) | CertId::Uri(v) => v,
        }
    }

    fn matches(&self, peer: &PeerIdentity) -> bool {
        match self {
            CertId::Cn(cn) => peer.cn.as_deref() == Some(cn.as_str()),
            CertId::Dns(dns) => peer.dns.iter().any(|d| d.eq_ignore_ascii_case(dns)),
            CertId::Uri(uri) => peer.uris.iter().any(|u| u == uri),
        }
    }

    /// The caller's name in logs and the audit trail.
    fn name(&self) -> String {
        match self {
            CertId::Cn(v) => format!("CN={v}"),
            CertId::Dns(v) => format!("DNS:{v}"),
            CertId::Uri(v) => format!("URI:{v}"),
        }
    }
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
    certificates: Vec<(CertId, Vec<Scope>)>,
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
    /// Parses the TOML key file; an error names the line.
    pub fn parse(text: &str) -> Result<Self> {
        let line = |offset: usize| {
            text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
        };
        let at = |offset: usize, reason: String| {
            Error::FailedPrecondition(format!("api keys file: line {}: {reason}", line(offset)))
        };
        let file: KeyFile = toml::from_str(text)
            .map_err(|err| at(err.span().map_or(0, |span| span.start), err.message().to_owned()))?;
        let mut keys = Vec::with_capacity(file.key.len());
        for spanned in file.key {
            let start = spanned.span().start;
            let entry = spanned.into_inner();
            if entry.name.trim().is_empty() {
                return Err(at(start, "a key has no name".into()));
            }
            let hash = parse_hex32(&entry.sha256).ok_or_else(|| {
                at(start, format!("key {:?}: sha256 must be 64 hex digits", entry.name))
            })?;
            keys.push(Key { name: entry.name, hash, scopes: entry.scopes });
        }
        let mut certificates = Vec::with_capacity(file.certificate.len());
        for spanned in file.certificate {
            let start = spanned.span().start;
            let id = CertId::from_entry(spanned.get_ref()).map_err(|err| match err {
                Error::FailedPrecondition(reason) => at(start, reason),
                other => other,
            })?;
            certificates.push((id, spanned.into_inner().scopes));
        }
        if keys.is_empty() && certificates.is_empty() {
            return Err(Error::FailedPrecondition(
                "api keys file lists no keys and no certificates".into(),
            ));
        }
        Ok(Self { keys, certificates })
    }

    /// How many keys and certificates the file lists.
    pub fn summary(&self) -> String {
        format!("{} keys, {} certificates", self.keys.len(), self.certificates.len())
    }

    /// What is valid but surely not meant: keys without a scope (they can call only what
    /// needs no key), and certificate callers when no client is asked for a certificate
    /// (`client_ca`: whether --tls-client-ca is set).
    pub fn warnings(&self, client_ca: bool) -> Vec<String> {
        let mut out: Vec<String> = self
            .keys
            .iter()
            .filter(|key| key.scopes.is_empty())
            .map(|key| {
                format!("key {:?} has no scopes: it can call only what needs no key", key.name)
            })
            .collect();
        if !self.certificates.is_empty() && !client_ca {
            out.push(
                "the file lists [[certificate]] callers, but --tls-client-ca is not set: no \
                 client is asked for a certificate, so those entries match nobody"
                    .into(),
            );
        }
        out
    }

    /// Reads and parses the key file at `path`; an error names the file (and the line).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::FailedPrecondition(format!(
                "cannot read the API keys file {} (--api-keys-file): {err}",
                path.display()
            ))
        })?;
        Self::parse(&text).map_err(|err| match err {
            Error::FailedPrecondition(reason) => {
                let reason = reason.strip_prefix("api keys file: ").unwrap_or(&reason);
                Error::FailedPrecondition(format!("api keys file {}: {reason}", path.display()))
            }
            other => other,
        })
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

    /// The caller a verified client certificate identifies: the first entry it matches;
    /// `None` when it matches none.
    pub fn certificate(&self, peer: &PeerIdentity) -> Option<Caller> {
        self.certificates
            .iter()
            .find(|(id, _)| id.matches(peer))
            .map(|(id, scopes)| Caller { name: id.name(), scopes: scopes.clone() })
    }
}

/// The key ring in force, swapped whole on reload.
#[derive(Clone, Debug)]
pub struct Keys {
    current: Arc<RwLock<Arc<KeyRing>>>,
    path: Option<PathBuf>,
    reload_failures: Counter,
    /// The file's stamp taken before it was read, so a change made before the watch
    /// starts is still seen.
    loaded: Option<crate::reload::Stamp>,
}

impl Keys {
    /// Keys from `path`; none: authentication is off for the life of the process. A file
    /// that cannot be read, does not parse or lists nothing is refused.
    /// `reload_failures` counts reloads that kept the keys in force.
    pub fn load(path: Option<&Path>, reload_failures: Counter) -> Result<Self> {
        let loaded = path.and_then(crate::reload::stamp);
        let ring = path.map(KeyRing::load).transpose()?.unwrap_or_default();
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(ring))),
            path: path.map(Path::to_owned),
            reload_failures,
            loaded,
        })
    }

    /// Whether callers must authenticate: decided at start (a keys file was given), never
    /// changed by a reload.
    pub fn enabled(&self) -> bool {
        self.path.is_some()
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
                // Certificates are judged at start, where the TLS settings are known.
                for warning in ring.warnings(true) {
                    tracing::warn!("api keys file: {warning}");
                }
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(ring);
                }
                tracing::info!(keys = count, "api keys reloaded");
            }
            Err(err) => {
                self.reload_failures.inc();
                tracing::error!(%err, "api keys reload failed; keeping the keys in force")
            }
        }
    }

    /// Reloads on SIGHUP and whenever the file changes (polled every `every`).
    pub fn watch(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        let path = self.path.clone()?;
        let keys = self.clone();
        Some(crate::reload::watch(path, self.loaded, every, move || keys.reload()))
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
        let failures = Counter::default();
        let keys = Keys::load(Some(&path), failures.clone()).expect("load");
        let bad_files: [(&str, Option<&str>); 5] = [
            ("unparsable", Some("[[key]]\nname = ")),
            ("empty", Some("")),
            ("blank", Some("\n  \n\t\n")),
            ("comment-only", Some("# every key was removed\n# by a half-written update\n")),
            ("unreadable", None),
        ];
        for (n, (what, text)) in bad_files.into_iter().enumerate() {
            match text {
                Some(text) => std::fs::write(&path, text).expect("write"),
                None => std::fs::remove_file(&path).expect("remove"),
            }
            keys.reload();
            assert!(keys.enabled(), "{what}: authentication stays on");
            assert_eq!(keys.current().authenticate("test").expect(what).name, "first", "{what}");
            assert_eq!(failures.get(), n as u64 + 1, "{what}: counted");
        }
        std::fs::write(&path, entry("second")).expect("write");
        keys.reload();
        assert_eq!(keys.current().authenticate("test").expect("reloaded").name, "second");
        assert_eq!(failures.get(), 5);
    }

    #[test]
    fn a_keys_file_that_lists_nothing_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "# nothing yet\n").expect("write");
        let err = Keys::load(Some(&path), Counter::default()).unwrap_err();
        assert!(err.to_string().contains("no keys and no certificates"), "{err}");
        assert!(!Keys::load(None, Counter::default()).expect("no file").enabled());
    }

    #[test]
    fn certificates_match_structured_fields_only() {
        let ring = KeyRing::parse(
            "[[certificate]]\nsubject = \"CN=billing\"\nscopes = [\"check\"]\n\
             [[certificate]]\nuri = \"spiffe://td/ns/a/sa/app\"\nscopes = [\"write\"]\n\
             [[certificate]]\ndns = \"ops.internal\"\nscopes = [\"audit\"]\n",
        )
        .expect("parse");
        let peer = |cn: Option<&str>, dns: &[&str], uris: &[&str]| PeerIdentity {
            cn: cn.map(str::to_owned),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
        };
        let billing = ring.certificate(&peer(Some("billing"), &[], &[])).expect("listed CN");
        assert_eq!(
            (billing.name.as_str(), billing.scopes.as_slice()),
            ("CN=billing", &[Scope::Check][..])
        );
        let app = ring.certificate(&peer(None, &[], &["spiffe://td/ns/a/sa/app"])).expect("URI");
        assert!(app.may(Scope::Write) && !app.may(Scope::Check));
        assert!(
            ring.certificate(&peer(None, &["OPS.internal"], &[])).expect("DNS").may(Scope::Audit)
        );
        // A CN whose value spells another subject is not that subject.
        assert!(ring.certificate(&peer(Some("x, CN=billing"), &[], &[])).is_none());
        assert!(ring.certificate(&peer(Some("billing2"), &[], &[])).is_none());
        assert!(ring.certificate(&peer(None, &["billing"], &[])).is_none());
        // Only `CN=<name>` is accepted in the older spelling, and one identity per entry.
        assert!(KeyRing::parse("[[certificate]]\nsubject = \"O=x, CN=y\"\nscopes = []").is_err());
        assert!(KeyRing::parse("[[certificate]]\ncn = \"a\"\ndns = \"b\"\nscopes = []").is_err());
        assert!(KeyRing::parse("[[certificate]]\nscopes = []").is_err());
    }

    #[test]
    fn malformed_files_are_refused_without_echoing_values() {
        assert!(KeyRing::parse("[[key]]\nname = \"x\"\nsha256 = \"zz\"\nscopes = []").is_err());
        assert!(KeyRing::parse("[[key]]\nname = \"x\"\nscopes = [\"root\"]").is_err());
        assert!(KeyRing::parse("nonsense = 1").is_err());
    }

    /// The keys files the Kubernetes manifests ship parse and list something, so the
    /// manifests start as they are (once their placeholders are replaced).
    #[test]
    fn the_manifests_keys_files_start() {
        for manifest in
            ["deploy/kubernetes/central/secrets.yaml", "deploy/kubernetes/sidecar/secrets.yaml"]
        {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(manifest);
            let yaml = std::fs::read_to_string(&path).expect("manifest");
            let start = yaml.find("keys.toml: |").expect("a keys.toml block");
            let mut lines = yaml[start..].lines().skip(1).peekable();
            let indent = lines.peek().map_or(0, |l| l.len() - l.trim_start().len());
            let toml: String = lines
                .take_while(|l| l.len() - l.trim_start().len() >= indent && !l.trim().is_empty())
                .map(|l| format!("{}\n", &l[indent..]))
                .collect();
            let ring = KeyRing::parse(&toml).unwrap_or_else(|e| panic!("{manifest}: {e}"));
            assert!(!ring.keys.is_empty(), "{manifest}");
        }
    }
}
