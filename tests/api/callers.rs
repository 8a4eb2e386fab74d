//! Callers and credentials: the scope × RPC matrix, safe start-up defaults, key rotation
//! by reload, rate limits, the unix socket, TLS and mTLS, the audit trail, and bad input.

use std::{path::PathBuf, time::Duration};

use bytes::{Buf, BufMut};
use rolecheck::{pb, server::Server};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

use crate::helpers::{Backend, TestDb, connect, spawn_with, test_config, wait_for};

/// Sends raw bytes as a request body and returns raw response bytes: lets a test call
/// any method, with any (even malformed) payload.
#[derive(Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Calls `path` with `body`, optionally as the holder of `secret`.
pub async fn call(
    channel: &Channel,
    path: &str,
    body: Vec<u8>,
    secret: Option<&str>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|err| Status::unavailable(err.to_string()))?;
    let mut request = Request::new(body);
    if let Some(secret) = secret {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {secret}").parse().expect("header"));
    }
    let path = http::uri::PathAndQuery::try_from(path).expect("path");
    if path.as_str().ends_with("/Watch") {
        return grpc.server_streaming(request, path, Raw).await.map(|_| Vec::new());
    }
    grpc.unary(request, path, Raw).await.map(|r| r.into_inner())
}

fn sha256_hex(secret: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A keys file: (name, secret, scopes) per key, plus certificate subjects.
pub fn keys_toml(keys: &[(&str, &str, &[&str])], certs: &[(&str, &[&str])]) -> String {
    let mut out = String::new();
    for (name, secret, scopes) in keys {
        out += &format!(
            "[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = {:?}\n\n",
            sha256_hex(secret),
            scopes
        );
    }
    for (subject, scopes) in certs {
        out += &format!("[[certificate]]\nsubject = \"{subject}\"\nscopes = {scopes:?}\n\n");
    }
    out
}

const KEYS: &[(&str, &str, &[&str])] = &[
    ("reader", "reader-secret", &["check"]),
    ("writer", "writer-secret", &["write"]),
    ("issuer", "issuer-secret", &["issue"]),
    ("admin", "admin-secret", &["check", "write", "issue"]),
    ("auditor", "auditor-secret", &["audit"]),
    ("follower", "follower-secret", &["follow"]),
];

fn write_keys(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, text).expect("write keys");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_demands_its_scope() {
    let dir = tempfile::tempdir().expect("dir");
    let path = write_keys(&dir, &keys_toml(KEYS, &[]));
    let app = spawn_with(Backend::Sqlite, |c| c.api_keys_file = Some(path)).await;
    let channel = connect(app.addr).await;
    // Every method the server serves, with the scopes any one of which admits a caller
    // (empty: open). The unit test in src/auth/layer.rs holds the rule table to the
    // served descriptor sets; this one holds the running server to the contract.
    let methods: &[(&str, &[&str])] = &[
        ("/rolecheck.v1.RoleCheck/Check", &["check"]),
        ("/rolecheck.v1.RoleCheck/CheckBatch", &["check"]),
        ("/rolecheck.v1.RoleCheck/GetAuthorization", &["check"]),
        ("/rolecheck.v1.RoleCheck/ListMembers", &["check"]),
        ("/rolecheck.v1.RoleCheck/ListChanges", &["audit", "follow"]),
        ("/rolecheck.v1.RoleCheck/Watch", &["audit", "follow"]),
        ("/rolecheck.v1.Tenants/GetTenant", &["check"]),
        ("/rolecheck.v1.Tenants/ListTenants", &["check"]),
        ("/rolecheck.v1.RoleCheck/Grant", &["write"]),
        ("/rolecheck.v1.RoleCheck/Revoke", &["write"]),
        ("/rolecheck.v1.RoleCheck/SetRoles", &["write"]),
        ("/rolecheck.v1.Tenants/CreateTenant", &["write"]),
        ("/rolecheck.v1.Tenants/DeleteTenant", &["write"]),
        ("/rolecheck.v1.RoleCheck/Issue", &["issue"]),
        ("/rolecheck.v1.RoleCheck/GetKeys", &[]),
        ("/grpc.health.v1.Health/Check", &[]),
    ];
    for (path, scope) in methods {
        let refused = |r: &Result<Vec<u8>, Status>| {
            r.as_ref()
                .err()
                .map(Status::code)
                .filter(|c| matches!(c, Code::Unauthenticated | Code::PermissionDenied))
        };
        let anonymous = call(&channel, path, Vec::new(), None).await;
        let unknown = call(&channel, path, Vec::new(), Some("not-a-key")).await;
        match scope.is_empty() {
            true => {
                assert_eq!(refused(&anonymous), None, "{path} is open");
                continue;
            }
            false => {
                assert_eq!(
                    refused(&anonymous),
                    Some(Code::Unauthenticated),
                    "{path} without a key"
                );
                assert_eq!(
                    refused(&unknown),
                    Some(Code::Unauthenticated),
                    "{path} with an unknown key"
                );
            }
        }
        for (name, secret, scopes) in KEYS {
            let got = call(&channel, path, Vec::new(), Some(secret)).await;
            if scopes.iter().any(|s| scope.contains(s)) {
                assert_eq!(refused(&got), None, "{path} as {name}: {got:?}");
            } else {
                assert_eq!(refused(&got), Some(Code::PermissionDenied), "{path} as {name}");
                let message = got.unwrap_err().message().to_owned();
                assert!(!message.contains(secret), "no secret in errors");
            }
        }
    }
}

#[tokio::test]
async fn start_without_keys_is_refused_off_loopback() {
    let db = TestDb::create(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.listen = "0.0.0.0:0".parse().expect("addr");
    let refused = Server::bind(config.clone()).await.err().expect("refused");
    assert!(refused.to_string().contains("without API keys"), "{refused}");

    config.insecure_no_auth = true;
    let server = Server::bind(config.clone()).await.expect("--insecure-no-auth starts");
    drop(server);

    let dir = tempfile::tempdir().expect("dir");
    config.insecure_no_auth = false;
    config.api_keys_file = Some(write_keys(&dir, &keys_toml(KEYS, &[])));
    let server = Server::bind(config.clone()).await.expect("with keys it starts");
    drop(server);

    config.api_keys_file = None;
    config.listen =
        format!("unix:{}", db_dir(&db).join("rc.sock").display()).parse().expect("unix");
    Server::bind(config).await.expect("a unix socket is local: starts open");
}

fn db_dir(db: &TestDb) -> PathBuf {
    match db {
        TestDb::Sqlite(dir) => dir.path().to_owned(),
        _ => std::env::temp_dir(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_when_the_file_changes() {
    let dir = tempfile::tempdir().expect("dir");
    let path = write_keys(&dir, &keys_toml(&[("old", "old-secret", &["check"])], &[]));
    let app = spawn_with(Backend::Sqlite, |c| c.api_keys_file = Some(path.clone())).await;
    let channel = connect(app.addr).await;
    let check = || pb::CheckRequest {
        permission: String::new(),
        user_id: "u".into(),
        tenant_id: String::new(),
        role: "r".into(),
        min_revision: 0,
    };
    let body = |m: pb::CheckRequest| prost::Message::encode_to_vec(&m);
    call(&channel, "/rolecheck.v1.RoleCheck/Check", body(check()), Some("old-secret"))
        .await
        .expect("old key works");

    write_keys(&dir, &keys_toml(&[("new", "new-secret", &["check"])], &[]));
    wait_for(Duration::from_secs(10), "the new key to be accepted", || {
        let channel = channel.clone();
        async move {
            call(&channel, "/rolecheck.v1.RoleCheck/Check", body(check()), Some("new-secret"))
                .await
                .ok()
        }
    })
    .await;
    let old =
        call(&channel, "/rolecheck.v1.RoleCheck/Check", body(check()), Some("old-secret")).await;
    assert_eq!(old.unwrap_err().code(), Code::Unauthenticated, "the old key is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_per_caller() {
    let dir = tempfile::tempdir().expect("dir");
    let path = write_keys(&dir, &keys_toml(KEYS, &[]));
    let app = spawn_with(Backend::Sqlite, |c| {
        c.api_keys_file = Some(path);
        c.rate_limit = 5;
    })
    .await;
    let channel = connect(app.addr).await;
    let mut limited = 0;
    for _ in 0..30 {
        match call(
            &channel,
            "/rolecheck.v1.RoleCheck/GetAuthorization",
            vec![10, 1, b'u'],
            Some("reader-secret"),
        )
        .await
        {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                limited += 1;
            }
        }
    }
    assert!(limited >= 20, "30 calls at a 5/s limit: {limited} refused");
    let other = call(
        &channel,
        "/rolecheck.v1.RoleCheck/GetAuthorization",
        vec![10, 1, b'u'],
        Some("admin-secret"),
    )
    .await;
    assert!(other.is_ok(), "another caller is not limited: {other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_serves_with_its_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("rolecheck.sock");
    let listen = format!("unix:{}", socket.display());
    let db = TestDb::create(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.listen = listen.parse().expect("unix");
    config.unix_socket_mode = 0o600;
    let server = Server::bind(config).await.expect("binds the socket");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let mode = std::fs::metadata(&socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let path = socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect over the socket");
    let mut client = pb::role_check_client::RoleCheckClient::new(channel);
    let grant = pb::GrantRequest {
        user_id: "app-user".into(),
        tenant_id: String::new(),
        roles: vec!["r".into()],
        expires_at: None,
    };
    client.grant(grant).await.expect("grant over the unix socket");
    let got = client
        .check(pb::CheckRequest {
            permission: String::new(),
            user_id: "app-user".into(),
            tenant_id: String::new(),
            role: "r".into(),
            min_revision: 0,
        })
        .await
        .expect("check")
        .into_inner();
    assert!(got.allowed);
    let _ = stop.send(());
    running.await.expect("task").expect("stops cleanly");
    assert!(!socket.exists(), "the socket file is removed on shutdown");
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_are_refused_before_any_service() {
    let dir = tempfile::tempdir().expect("dir");
    let path = write_keys(&dir, &keys_toml(KEYS, &[]));
    let app = spawn_with(Backend::Sqlite, |c| c.api_keys_file = Some(path)).await;
    let channel = connect(app.addr).await;
    for path in ["/rolecheck.v1.RoleCheck/Nope", "/rolecheck.v1.Secret/Check", "/x.Y/Z"] {
        let got = call(&channel, path, Vec::new(), Some("admin-secret")).await;
        assert_eq!(got.unwrap_err().code(), Code::Unimplemented, "{path}");
    }
}

/// The "what was seen" of the issue: a truncated, blank or comment-only keys file must
/// not switch authentication off, not on the file watch and not on SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_file_that_empties_never_switches_authentication_off() {
    let dir = tempfile::tempdir().expect("dir");
    let path = write_keys(&dir, &keys_toml(KEYS, &[]));
    let app = spawn_with(Backend::Sqlite, |c| c.api_keys_file = Some(path.clone())).await;
    let channel = connect(app.addr).await;
    let grant = prost::Message::encode_to_vec(&pb::GrantRequest {
        user_id: "intruder".into(),
        tenant_id: String::new(),
        roles: vec!["admin".into()],
        expires_at: None,
    });
    let failures = |body: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix("rolecheck_api_keys_reload_failures_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // A write may be seen half done (truncated, then filled), so each step waits for the
    // count to grow rather than for an exact value.
    let mut counted = 0;
    for text in ["", "\n\n", "# all keys removed\n"] {
        write_keys(&dir, text);
        counted = wait_for(Duration::from_secs(10), "the failed reload to be counted", || async {
            let (_, body) = crate::helpers::http_get(&app, "/metrics").await;
            failures(&body).filter(|n| *n > counted)
        })
        .await;
        let anonymous = call(&channel, "/rolecheck.v1.RoleCheck/Grant", grant.clone(), None).await;
        assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated, "file {text:?}");
    }
    // SIGHUP re-reads the (still empty) file: still refused, and counted again.
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    wait_for(Duration::from_secs(10), "the SIGHUP reload to be counted", || async {
        let (_, body) = crate::helpers::http_get(&app, "/metrics").await;
        failures(&body).filter(|n| *n > counted)
    })
    .await;
    let anonymous = call(&channel, "/rolecheck.v1.RoleCheck/Grant", grant.clone(), None).await;
    assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
    // The keys in force still work.
    call(&channel, "/rolecheck.v1.RoleCheck/Grant", grant, Some("writer-secret"))
        .await
        .expect("the writer key was kept");
}

#[tokio::test]
async fn a_unix_socket_with_tls_flags_refuses_to_start() {
    let db = TestDb::create(Backend::Sqlite).await;
    let mut config = test_config(&db);
    let dir = db_dir(&db);
    config.listen = format!("unix:{}", dir.join("rc.sock").display()).parse().expect("unix");
    config.tls_cert = Some(dir.join("cert.pem"));
    config.tls_key = Some(dir.join("key.pem"));
    let refused = Server::bind(config).await.err().expect("refused");
    assert!(refused.to_string().contains("unix socket"), "{refused}");
}

/// A follower relays its callers' calls with `x-rolecheck-on-behalf-of`: the audit trail
/// records both names. Only a key with the `follow` scope may relay, and the relayed call
/// still needs its own scope on that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_calls_record_both_names_and_need_the_follow_scope() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = [
        ("sidecar-7", "sidecar-secret", &["follow", "write", "audit"][..]),
        ("reader-sidecar", "reader-sidecar-secret", &["follow", "check"][..]),
        ("writer", "writer-secret", &["write"][..]),
    ];
    let path = write_keys(&dir, &keys_toml(&keys, &[]));
    let app = spawn_with(Backend::Sqlite, move |c| c.api_keys_file = Some(path)).await;
    let channel = connect(app.addr).await;
    let grant = |secret: &str, on_behalf_of: Option<&str>| {
        let mut request = Request::new(pb::GrantRequest {
            user_id: "u1".into(),
            tenant_id: String::new(),
            roles: vec!["viewer".into()],
            expires_at: None,
        });
        let metadata = request.metadata_mut();
        metadata.insert("authorization", format!("Bearer {secret}").parse().expect("header"));
        if let Some(name) = on_behalf_of {
            metadata.insert("x-rolecheck-on-behalf-of", name.parse().expect("header"));
        }
        let mut client = pb::role_check_client::RoleCheckClient::new(channel.clone());
        async move { client.grant(request).await.map(|r| r.into_inner().revision) }
    };
    grant("sidecar-secret", Some("billing-service")).await.expect("relayed Grant");
    let refused = grant("writer-secret", Some("billing-service")).await.expect_err("no follow");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = grant("reader-sidecar-secret", Some("billing-service")).await.expect_err("");
    assert_eq!(refused.code(), Code::PermissionDenied, "relaying needs the call's own scope");
    let refused = grant("sidecar-secret", Some("")).await.expect_err("an empty name");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let mut request = Request::new(pb::ListChangesRequest::default());
    request
        .metadata_mut()
        .insert("authorization", "Bearer sidecar-secret".parse().expect("header"));
    let entries = pb::role_check_client::RoleCheckClient::new(channel.clone())
        .list_changes(request)
        .await
        .expect("ListChanges")
        .into_inner()
        .entries;
    let callers: Vec<&str> =
        entries.iter().filter_map(|e| e.change.as_ref()).map(|c| c.caller.as_str()).collect();
    assert_eq!(callers, ["billing-service via sidecar-7"]);
}
