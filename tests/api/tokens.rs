//! Issue, GetKeys and the JWKS URL. Every token is verified by PyJWT (an implementation
//! independent of the signer) against the JWK Set fetched over HTTP.

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use proptest::prelude::*;
use rolecheck::{
    pb,
    token::{KeyKind, SigningKey},
};
use serde_json::{Value, json};
use tonic::Code;

use crate::{
    conformance,
    helpers::{Backend, TestApp, TestDb, authz, http_get, spawn_with, start, test_config},
};

/// PEM files for `kinds`, in a directory that lives as long as the returned guard.
pub fn key_files(kinds: &[KeyKind]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("dir");
    let paths = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let (_, pem) = SigningKey::generate(*kind).expect("generate");
            let path = dir.path().join(format!("key{i}.pem"));
            std::fs::write(&path, pem).expect("write key");
            path
        })
        .collect();
    (dir, paths)
}

fn kid_of(path: &std::path::Path) -> String {
    SigningKey::from_file(path).expect("key").kid().to_owned()
}

/// A server signing with freshly generated keys of `kinds` (the first signs).
async fn spawn_signing(backend: Backend, kinds: &[KeyKind]) -> (TestApp, tempfile::TempDir) {
    let (dir, paths) = key_files(kinds);
    let app = spawn_with(backend, |c| c.signing_key = paths).await;
    (app, dir)
}

/// Verifies `tokens` with PyJWT against the server's JWKS URL.
pub fn verify(app: &TestApp, tokens: &[String]) -> Vec<Value> {
    let python = std::env::var("ROLECHECK_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/verify/verify_jwt.py");
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the PyJWT verifier (scripts/test installs it)");
    let request = json!({
        "jwks_url": format!("http://{}/.well-known/jwks.json", app.http),
        "issuer": "rolecheck",
        "audience": "app",
        "tokens": tokens,
    });
    child.stdin.take().expect("stdin").write_all(request.to_string().as_bytes()).expect("write");
    let out = child.wait_with_output().expect("verifier");
    assert!(
        out.status.success(),
        "PyJWT verifier failed (run the suite with scripts/test): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("verifier output")
}

async fn issue(app: &TestApp, user: &str, tenants: &[&str], ttl: u32) -> pb::IssueResponse {
    app.checks
        .clone()
        .issue(pb::IssueRequest {
            expand: false,
            user_id: user.into(),
            ttl_seconds: ttl,
            tenant_ids: tenants.iter().map(|t| t.to_string()).collect(),
            min_revision: 0,
        })
        .await
        .expect("Issue")
        .into_inner()
}

fn authorization_of(payload: &Value) -> BTreeMap<String, Vec<String>> {
    serde_json::from_value::<BTreeMap<String, BTreeMap<String, Vec<String>>>>(
        payload["authorization"].clone(),
    )
    .expect("authorization object")
    .into_iter()
    .map(|(tenant, mut obj)| (tenant, obj.remove("roles").expect("roles")))
    .collect()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64
}

async fn seed_user_token_verifies_with_pyjwt(backend: Backend) {
    let (app, _keys) = spawn_signing(backend, &[KeyKind::Rsa]).await;
    app.create_tenant("nz569yb7").await;
    app.create_tenant("a5h281k8").await;
    app.grant("1", "nz569yb7", &["admin"]).await;
    app.grant("1", "a5h281k8", &["viewer", "support"]).await;

    let issued = issue(&app, "1", &[], 0).await;
    let verdicts = verify(&app, std::slice::from_ref(&issued.access_token));
    assert_eq!(verdicts[0]["ok"], true, "{}", verdicts[0]);
    let (header, payload) = (&verdicts[0]["header"], &verdicts[0]["payload"]);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "at+jwt");
    for banned in ["jku", "x5u", "jwk", "crit"] {
        assert!(header.get(banned).is_none(), "header has {banned}");
    }
    assert_eq!(payload["sub"], "1");
    assert_eq!(payload["userId"], json!(1), "userId is a JSON number, as in the seed");
    assert_eq!(payload["iss"], "rolecheck");
    assert_eq!(payload["aud"], "app");
    assert_eq!(payload["iat"], payload["nbf"]);
    assert_eq!(payload["exp"].as_i64().unwrap() - payload["iat"].as_i64().unwrap(), 15 * 60);
    let jti = URL_SAFE_NO_PAD.decode(payload["jti"].as_str().expect("jti")).expect("b64 jti");
    assert!(jti.len() >= 16, "jti carries at least 128 bits");
    assert_eq!(
        authorization_of(payload),
        authz(&[("nz569yb7", &["admin"]), ("a5h281k8", &["support", "viewer"])])
    );
    assert_eq!(issued.expires_at.expect("expires_at").seconds, payload["exp"].as_i64().unwrap());

    // GetKeys and the JWKS URL serve the same public set, cacheable.
    let keys = app.checks.clone().get_keys(pb::GetKeysRequest {}).await.unwrap().into_inner();
    let (head, body) = http_get(&app, "/.well-known/jwks.json").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("cache-control: public, max-age="), "{head}");
    let over_http: Value = serde_json::from_str(&body).expect("jwks json");
    assert_eq!(over_http, serde_json::from_str::<Value>(&keys.jwks_json).expect("json"));
    let jwk = &over_http["keys"][0];
    assert_eq!(jwk["kid"], header["kid"]);
    for private in ["d", "p", "q", "dp", "dq", "qi"] {
        assert!(jwk.get(private).is_none(), "JWKS leaks {private}");
    }
    // Tokens are distinct.
    let again = issue(&app, "1", &[], 0).await;
    let verdicts = verify(&app, &[again.access_token]);
    assert_ne!(verdicts[0]["payload"]["jti"], payload["jti"]);
}

async fn every_key_type_signs_verifiable_tokens(backend: Backend) {
    for (kind, alg) in
        [(KeyKind::Rsa, "RS256"), (KeyKind::EcP256, "ES256"), (KeyKind::Ed25519, "EdDSA")]
    {
        let (app, _keys) = spawn_signing(backend, &[kind]).await;
        app.grant("user@example.com", "", &["member"]).await;
        let token = issue(&app, "user@example.com", &[], 0).await.access_token;
        let verdict = &verify(&app, &[token])[0];
        assert_eq!(verdict["ok"], true, "{alg}: {verdict}");
        assert_eq!(verdict["header"]["alg"], alg);
        assert_eq!(verdict["payload"]["userId"], "user@example.com");
        assert_eq!(authorization_of(&verdict["payload"]), authz(&[("app", &["member"])]));
    }
}

async fn narrowing_lifetime_and_size(backend: Backend) {
    let (app, _keys) = spawn_signing(backend, &[KeyKind::Ed25519]).await;
    app.create_tenant("a").await;
    app.create_tenant("b").await;
    app.grant("u", "a", &["x"]).await;
    app.grant("u", "b", &["y"]).await;
    app.grant("u", "", &["z"]).await;

    let narrowed = issue(&app, "u", &["b", ""], 60).await;
    let short = issue(&app, "u", &[], 3600 * 24 * 10).await;
    let verdicts = verify(&app, &[narrowed.access_token, short.access_token]);
    let p = &verdicts[0]["payload"];
    assert_eq!(authorization_of(p), authz(&[("app", &["z"]), ("b", &["y"])]));
    assert_eq!(p["exp"].as_i64().unwrap() - p["iat"].as_i64().unwrap(), 60);
    let p = &verdicts[1]["payload"];
    assert_eq!(p["exp"].as_i64().unwrap() - p["iat"].as_i64().unwrap(), 86400, "capped");

    // exp never outlasts a carried role; a role not carried does not shorten it.
    let soon = now() + 120;
    app.checks
        .clone()
        .grant(pb::GrantRequest {
            user_id: "u".into(),
            tenant_id: "a".into(),
            roles: vec!["temp".into()],
            expires_at: Some(prost_types::Timestamp { seconds: soon, nanos: 0 }),
        })
        .await
        .unwrap();
    let with_temp = issue(&app, "u", &[], 0).await;
    let without = issue(&app, "u", &["b"], 0).await;
    assert_eq!(with_temp.expires_at.unwrap().seconds, soon);
    assert!(without.expires_at.unwrap().seconds > soon);
}

async fn oversized_tokens_are_refused(backend: Backend) {
    let (app, _keys) = spawn_signing(backend, &[KeyKind::Ed25519]).await;
    let mut app = app;
    app.create_tenant("small").await;
    app.grant("u", "small", &["r"]).await;
    for t in 0..40 {
        let tenant = format!("tenant-with-a-long-name-{t:03}");
        app.create_tenant(&tenant).await;
        let roles: Vec<String> = (0..8).map(|r| format!("role-number-{r}")).collect();
        let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
        app.grant("u", &tenant, &roles).await;
    }
    let err = app
        .checks
        .issue(pb::IssueRequest { user_id: "u".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("bytes, over the 8192-byte limit"), "{}", err.message());
    let narrowed = issue(&app, "u", &["small"], 0).await;
    assert!(verify(&app, &[narrowed.access_token])[0]["ok"].as_bool().unwrap());
}

async fn rotation_keeps_old_tokens_verifiable_while_listed(backend: Backend) {
    let (_dir, paths) = key_files(&[KeyKind::Rsa, KeyKind::EcP256]);
    let (old, new) = (paths[0].clone(), paths[1].clone());
    let db = TestDb::create(backend).await;
    let restart = |db: TestDb, keys: Vec<PathBuf>| async move {
        let mut config = test_config(&db);
        config.signing_key = keys;
        start(config, db).await
    };

    let app = restart(db, vec![old.clone()]).await;
    app.grant("1", "", &["admin"]).await;
    let t1 = issue(&app, "1", &[], 0).await.access_token;

    // Step 1: publish the new key first, keep the old one listed.
    let app = restart(app.stop().await, vec![new.clone(), old.clone()]).await;
    let t2 = issue(&app, "1", &[], 0).await.access_token;
    let verdicts = verify(&app, &[t1.clone(), t2.clone()]);
    assert_eq!(verdicts[0]["ok"], true, "old token verifies while its key is listed");
    assert_eq!(verdicts[0]["header"]["kid"], kid_of(&old));
    assert_eq!(verdicts[1]["ok"], true);
    assert_eq!(verdicts[1]["header"]["kid"], kid_of(&new), "the first key signs");

    // Step 2: once old tokens expired, drop the old key.
    let app = restart(app.stop().await, vec![new]).await;
    let verdicts = verify(&app, &[t1, t2]);
    assert_eq!(verdicts[0]["ok"], false, "old key withdrawn");
    assert_eq!(verdicts[1]["ok"], true);
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    aws_lc_rs::hmac::sign(&key, data).as_ref().to_vec()
}

async fn forged_tokens_fail_verification(backend: Backend) {
    let (dir, paths) = key_files(&[KeyKind::Rsa]);
    let app = spawn_with(backend, |c| c.signing_key = paths.clone()).await;
    app.grant("1", "", &["viewer"]).await;
    let token = issue(&app, "1", &[], 0).await.access_token;
    let parts: Vec<&str> = token.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["authorization"]["app"]["roles"] = json!(["admin"]);
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());

    let tampered = format!("{}.{}.{}", parts[0], b64(&payload), parts[2]);
    let none_header = json!({"alg": "none", "typ": "at+jwt", "kid": header["kid"]});
    let alg_none = format!("{}.{}.", b64(&none_header), b64(&payload));
    // The classic confusion attack: HS256 keyed with the published public key.
    let key = SigningKey::from_file(&paths[0]).unwrap();
    let public_pem = {
        let private = std::fs::read_to_string(&paths[0]).unwrap();
        let der = pem::parse(private).unwrap();
        let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(der.contents()).unwrap();
        use aws_lc_rs::{encoding::AsDer, signature::KeyPair};
        let spki = pair.public_key().as_der().unwrap();
        pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec()))
    };
    let hs_header = json!({"alg": "HS256", "typ": "at+jwt", "kid": key.kid()});
    let signing_input = format!("{}.{}", b64(&hs_header), b64(&payload));
    let mut forged = Vec::new();
    for secret in [public_pem.as_bytes(), key.jwk().to_string().as_bytes()] {
        let mac = URL_SAFE_NO_PAD.encode(hmac_sha256(secret, signing_input.as_bytes()));
        forged.push(format!("{signing_input}.{mac}"));
    }

    let mut all = vec![token, tampered, alg_none];
    all.extend(forged);
    let verdicts = verify(&app, &all);
    assert_eq!(verdicts[0]["ok"], true, "the genuine token verifies: {}", verdicts[0]);
    for (i, verdict) in verdicts.iter().enumerate().skip(1) {
        assert_eq!(verdict["ok"], false, "forgery {i} verified: {verdict}");
    }
    drop(dir);
}

async fn postgres_without_a_key_refuses_issue_only(backend: Backend) {
    if backend == Backend::Sqlite {
        // The embedded store generates a key on first start instead.
        let app = spawn_with(backend, |_| {}).await;
        let key = app.db_path_key();
        assert!(key.exists(), "generated key in the data directory");
        app.grant("1", "", &["admin"]).await;
        let token = issue(&app, "1", &[], 0).await.access_token;
        assert_eq!(verify(&app, &[token])[0]["ok"], true);
        return;
    }
    let app = spawn_with(backend, |_| {}).await;
    let mut checks = app.checks.clone();
    let err = checks
        .issue(pb::IssueRequest { user_id: "1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "no signing key configured");
    let keys = checks.get_keys(pb::GetKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(serde_json::from_str::<Value>(&keys.jwks_json).unwrap(), json!({"keys": []}));
    app.grant("1", "", &["admin"]).await;
    assert!(app.check("1", "", "admin").await, "everything else works");
}

conformance!(
    seed_user_token_verifies_with_pyjwt,
    every_key_type_signs_verifiable_tokens,
    narrowing_lifetime_and_size,
    oversized_tokens_are_refused,
    rotation_keeps_old_tokens_verifiable_while_listed,
    forged_tokens_fail_verification,
    postgres_without_a_key_refuses_issue_only,
);

// The invariant: Check(U, T, R).allowed == R ∈ verify(Issue(U)).authorization[T].roles,
// with expiries: a role whose expiry passed is in neither, and a token's `exp` is the
// earlier of its lifetime and the earliest expiry among the roles it carries.

const USERS: [&str; 3] = ["1", "alice", "42"];
const TENANTS: [&str; 3] = ["", "t0", "t1"];
const ROLES: [&str; 3] = ["admin", "viewer", "billing:read"];
/// The default token lifetime (`--token-ttl`).
const TOKEN_TTL: i64 = 15 * 60;

/// When a granted role expires.
#[derive(Clone, Copy, Debug)]
enum Expiry {
    Never,
    /// This many seconds from now: some before the token lifetime ends, some after.
    In(i64),
    /// Two seconds from now: passed by the time the invariant is checked.
    Soon,
}

/// (user, tenant, roles, grant (else revoke), expiry of a grant)
type Op = (usize, usize, Vec<usize>, bool, Expiry);

fn grants() -> impl Strategy<Value = Vec<Op>> {
    let expiry = prop_oneof![
        4 => Just(Expiry::Never),
        4 => (60i64..7200).prop_map(Expiry::In),
        1 => Just(Expiry::Soon),
    ];
    proptest::collection::vec(
        (
            0..USERS.len(),
            0..TENANTS.len(),
            proptest::collection::vec(0..ROLES.len(), 1..3),
            any::<bool>(),
            expiry,
        ),
        1..20,
    )
}

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
        as i64
}

async fn invariant(backend: Backend, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (app, _keys) = spawn_signing(backend, &[KeyKind::EcP256]).await;
    app.create_tenant("t0").await;
    app.create_tenant("t1").await;
    // What each (user, tenant, role) should hold: its expiry (None: never), as the
    // contract says (re-granting updates the expiry, revoking removes).
    let mut model: BTreeMap<(usize, usize, usize), Option<i64>> = BTreeMap::new();
    let mut soonest_passing = None;
    for (u, t, roles, grant, expiry) in &ops {
        let names: Vec<String> = roles.iter().map(|&r| ROLES[r].to_owned()).collect();
        if *grant {
            let at = match expiry {
                Expiry::Never => None,
                Expiry::In(secs) => Some(now_unix() + secs),
                Expiry::Soon => Some(now_unix() + 2),
            };
            if matches!(expiry, Expiry::Soon) {
                soonest_passing = soonest_passing.max(at);
            }
            let request = pb::GrantRequest {
                user_id: USERS[*u].into(),
                tenant_id: TENANTS[*t].into(),
                roles: names,
                expires_at: at.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
            };
            app.checks.clone().grant(request).await.expect("grant");
            for &r in roles {
                model.insert((*u, *t, r), at);
            }
        } else {
            let roles: Vec<&str> = names.iter().map(String::as_str).collect();
            app.revoke(USERS[*u], TENANTS[*t], &roles).await;
            for &r in &roles_of(&names) {
                model.remove(&(*u, *t, r));
            }
        }
    }
    // Wait (on the clock, not for luck) until every "soon" expiry has passed.
    if let Some(at) = soonest_passing {
        while now_unix() <= at {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let now = now_unix();
    let mut issued = Vec::new();
    for user in USERS {
        issued.push(issue(&app, user, &[], 0).await);
    }
    let tokens: Vec<String> = issued.iter().map(|i| i.access_token.clone()).collect();
    let verdicts = verify(&app, &tokens);
    for (u, ((user, verdict), minted)) in USERS.iter().zip(&verdicts).zip(&issued).enumerate() {
        prop_assert_eq!(&verdict["ok"], &json!(true));
        let object = authorization_of(&verdict["payload"]);
        let got = app
            .checks
            .clone()
            .get_authorization(pb::GetAuthorizationRequest {
                expand: false,
                user_id: user.to_string(),
                min_revision: minted.revision,
                with_expiry: false,
            })
            .await
            .unwrap()
            .into_inner();
        prop_assert_eq!(got.revision, minted.revision, "same revision, no writes since");
        let direct: BTreeMap<String, Vec<String>> =
            got.authorization.into_iter().map(|(t, r)| (t, r.roles)).collect();
        prop_assert_eq!(&object, &direct);
        let mut earliest = None::<i64>;
        for (t, tenant) in TENANTS.iter().enumerate() {
            let key = if tenant.is_empty() { "app" } else { tenant };
            for (r, role) in ROLES.iter().enumerate() {
                let in_token = object.get(key).is_some_and(|held| held.iter().any(|x| x == role));
                prop_assert_eq!(
                    app.check(user, tenant, role).await,
                    in_token,
                    "{} {} {}",
                    user,
                    key,
                    role
                );
                let live = match model.get(&(u, t, r)) {
                    None => false,
                    Some(None) => true,
                    Some(Some(at)) => *at > now,
                };
                prop_assert_eq!(in_token, live, "model: {} {} {}", user, key, role);
                if let (true, Some(Some(at))) = (in_token, model.get(&(u, t, r))) {
                    earliest = Some(earliest.map_or(*at, |e| e.min(*at)));
                }
            }
        }
        let payload = &verdict["payload"];
        let (iat, exp) =
            (payload["iat"].as_i64().expect("iat"), payload["exp"].as_i64().expect("exp"));
        let want = earliest.map_or(iat + TOKEN_TTL, |at| at.min(iat + TOKEN_TTL));
        prop_assert_eq!(exp, want, "exp of {}'s token", user);
        prop_assert_eq!(minted.expires_at.as_ref().map(|t| t.seconds), Some(exp));
        let number = user.parse::<i64>().ok().map(Value::from).unwrap_or_else(|| json!(user));
        prop_assert_eq!(&payload["userId"], &number);
    }
    Ok(())
}

/// Role indices of role names.
fn roles_of(names: &[String]) -> Vec<usize> {
    names.iter().map(|n| ROLES.iter().position(|r| r == n).expect("known role")).collect()
}

fn run_blocking(backend: Backend, ops: Vec<Op>) -> Result<(), TestCaseError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(invariant(backend, ops))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_check_equals_token(ops in grants()) {
        run_blocking(Backend::Sqlite, ops)?;
    }

    #[test]
    fn postgres_check_equals_token(ops in grants()) {
        run_blocking(Backend::Postgres, ops)?;
    }
}
