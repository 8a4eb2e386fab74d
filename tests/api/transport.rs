//! TLS and mTLS with certificates generated here (rcgen), certificate rotation without a
//! restart, the audit trail, and bad input that must never hurt the server.

use std::{path::Path, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rolecheck::pb::{self, role_check_client::RoleCheckClient};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::{
    callers::{call, keys_toml},
    helpers::{Backend, TestDb, spawn_with, start, test_config, wait_for},
};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).expect("self-signed").pem();
    Ca { pem, issuer: Issuer::new(params, key) }
}

/// (certificate PEM, key PEM) for `names` (server) or `cn` (client), signed by `ca`.
fn leaf(ca: &Ca, names: &[&str], cn: &str) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca.issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

async fn tls_channel(
    port: u16,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

fn check_req(user: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        permission: String::new(),
        user_id: user.into(),
        tenant_id: String::new(),
        role: "r".into(),
        min_revision: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identifies_callers_and_certificates_rotate() {
    let dir = tempfile::tempdir().expect("dir");
    let authority = ca("rolecheck test CA");
    let server = leaf(&authority, &["localhost"], "rolecheck");
    let client = leaf(&authority, &[], "billing-service");
    let cert = write(dir.path(), "server.pem", &server.0);
    let key = write(dir.path(), "server.key", &server.1);
    let client_ca = write(dir.path(), "clients.pem", &authority.pem);
    let keys = write(
        dir.path(),
        "keys.toml",
        &keys_toml(
            &[("admin", "admin-secret", &["check", "write"])],
            &[("CN=billing-service", &["check"])],
        ),
    );
    let app = spawn_with(Backend::Sqlite, |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.tls_client_ca = Some(client_ca.clone());
        c.api_keys_file = Some(keys.clone());
    })
    .await;
    let port = app.addr.port();

    // A client certificate from the CA is a caller with the subject's scopes.
    let channel = tls_channel(port, &authority.pem, Some(&client)).await.expect("mTLS handshake");
    let mut checks = RoleCheckClient::new(channel.clone());
    checks.check(check_req("u")).await.expect("check as CN=billing-service");
    let grant = pb::GrantRequest {
        user_id: "u".into(),
        tenant_id: String::new(),
        roles: vec!["r".into()],
        expires_at: None,
    };
    let denied = checks.grant(grant.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("CN=billing-service"));
    // A bearer key over the same connection takes precedence.
    let mut request = Request::new(grant);
    request.metadata_mut().insert("authorization", "Bearer admin-secret".parse().unwrap());
    checks.grant(request).await.expect("grant as admin over mTLS");

    // Without a client certificate there is no connection at all.
    let anonymous = match tls_channel(port, &authority.pem, None).await {
        Ok(channel) => RoleCheckClient::new(channel).check(check_req("u")).await.err(),
        Err(_) => None,
    };
    if let Some(status) = anonymous {
        assert_ne!(status.code(), Code::Ok);
    }
    // A certificate from another CA is refused too.
    let stranger_ca = ca("someone else");
    let stranger = leaf(&stranger_ca, &[], "billing-service");
    let forged = match tls_channel(port, &authority.pem, Some(&stranger)).await {
        Ok(channel) => RoleCheckClient::new(channel).check(check_req("u")).await.is_ok(),
        Err(_) => false,
    };
    assert!(!forged, "a certificate from an unknown CA is refused");
    // A certificate from the CA whose identity is not listed is not a caller.
    let unlisted = leaf(&authority, &[], "someone-else");
    let channel = tls_channel(port, &authority.pem, Some(&unlisted)).await.expect("handshake");
    let status = RoleCheckClient::new(channel).check(check_req("u")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // A CN whose value spells the listed subject is not that subject either.
    let imitation = leaf(&authority, &[], "x, CN=billing-service");
    let channel = tls_channel(port, &authority.pem, Some(&imitation)).await.expect("handshake");
    let status = RoleCheckClient::new(channel).check(check_req("u")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Rotate the server certificate to one from a new CA, without a restart.
    let next = ca("rotated CA");
    let rotated = leaf(&next, &["localhost"], "rolecheck");
    std::fs::write(&key, &rotated.1).expect("key");
    std::fs::write(&cert, &rotated.0).expect("cert");
    wait_for(Duration::from_secs(10), "the rotated certificate to be served", || {
        let (pem, client) = (next.pem.clone(), client.clone());
        async move {
            let channel = tls_channel(port, &pem, Some(&client)).await.ok()?;
            RoleCheckClient::new(channel).check(check_req("u")).await.ok()
        }
    })
    .await;

    // The HTTP port speaks TLS too, without asking for a client certificate.
    let connector = {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for cert in rustls_pki(&next.pem) {
            roots.add(cert).expect("root");
        }
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(
            std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    };
    let tcp = tokio::net::TcpStream::connect(app.http).await.expect("tcp");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls =
        connector.connect(name, tcp).await.expect("HTTPS handshake without a client cert");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(
        b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("send");
    let mut response = String::new();
    let _ = tls.read_to_string(&mut response).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

fn enc(message: impl prost::Message) -> Vec<u8> {
    message.encode_to_vec()
}

fn rustls_pki(pem: &str) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.expect("pem")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_who_changed_what() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = write(
        dir.path(),
        "keys.toml",
        &keys_toml(
            &[
                ("ops-console", "ops-secret", &["check", "write", "audit"]),
                ("billing", "billing-secret", &["check", "write"]),
            ],
            &[],
        ),
    );
    let app = spawn_with(Backend::Postgres, |c| c.api_keys_file = Some(keys)).await;
    let channel = crate::helpers::connect(app.addr).await;
    let as_ = |secret: &str, body: Vec<u8>, path: &'static str| {
        let channel = channel.clone();
        let secret = secret.to_owned();
        async move { call(&channel, path, body, Some(&secret)).await }
    };
    as_(
        "ops-secret",
        enc(pb::CreateTenantRequest { tenant_id: "acme".into(), name: "Acme".into() }),
        "/rolecheck.v1.Tenants/CreateTenant",
    )
    .await
    .unwrap();
    for i in 0..5 {
        let grant = pb::GrantRequest {
            user_id: format!("u{i}"),
            tenant_id: "acme".into(),
            roles: vec!["admin".into()],
            expires_at: None,
        };
        let secret = if i % 2 == 0 { "billing-secret" } else { "ops-secret" };
        as_(secret, enc(grant), "/rolecheck.v1.RoleCheck/Grant").await.unwrap();
    }
    let page = |caller: &str, token: String| pb::ListChangesRequest {
        caller: caller.into(),
        tenant_id: "acme".into(),
        page_size: 2,
        page_token: token,
        ..Default::default()
    };
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let body =
            as_("ops-secret", enc(page("billing", token)), "/rolecheck.v1.RoleCheck/ListChanges")
                .await
                .unwrap();
        let response: pb::ListChangesResponse = prost::Message::decode(body.as_slice()).unwrap();
        entries.extend(response.entries);
        token = response.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let users: Vec<String> =
        entries.iter().map(|e| e.change.as_ref().unwrap().user_id.clone()).collect();
    assert_eq!(users, ["u0", "u2", "u4"]);
    for entry in &entries {
        let change = entry.change.as_ref().unwrap();
        assert_eq!(change.caller, "billing");
        assert_eq!(change.roles, ["admin"]);
        assert!(entry.committed_at.is_some() && entry.revision > 0);
    }
    // Watch carries the caller too; no secret is ever recorded.
    let all = as_(
        "ops-secret",
        enc(pb::ListChangesRequest::default()),
        "/rolecheck.v1.RoleCheck/ListChanges",
    )
    .await
    .unwrap();
    let all: pb::ListChangesResponse = prost::Message::decode(all.as_slice()).unwrap();
    assert_eq!(all.entries[0].change.as_ref().unwrap().caller, "ops-console");
    assert_eq!(all.entries[0].change.as_ref().unwrap().kind, pb::ChangeKind::TenantCreated as i32);
    let text = format!("{all:?}");
    assert!(!text.contains("secret"), "no secret in the audit trail");
}

/// The store revision, via a caller-free read of the history.
async fn revision(app: &crate::helpers::TestApp) -> u64 {
    app.checks
        .clone()
        .list_members(pb::ListMembersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument_and_harmless() {
    let app = spawn_with(Backend::Sqlite, |_| {}).await;
    app.grant("u", "", &["r"]).await;
    let before = revision(&app).await;
    let channel = crate::helpers::connect(app.addr).await;
    let bodies: Vec<Vec<u8>> = vec![
        vec![0x0a, 0x05, b'a'],             // length past the end
        vec![0x0a, 0x02, 0xff, 0xfe],       // user_id: invalid UTF-8
        vec![0x1a, 0x03, 0xc3, 0x28, b'x'], // roles[0]: invalid UTF-8
        vec![0x0f],                         // field 1 with a bad wire type
        vec![0xff; 16],                     // garbage
    ];
    for path in [
        "/rolecheck.v1.RoleCheck/Grant",
        "/rolecheck.v1.RoleCheck/Check",
        "/rolecheck.v1.Tenants/CreateTenant",
    ] {
        for body in &bodies {
            let status = call(&channel, path, body.clone(), None).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{path} {body:?}: {status:?}");
        }
    }
    // Malformed gRPC framing: a compressed frame nobody negotiated, a truncated frame.
    for frame in [vec![1u8, 0, 0, 0, 1, 0], vec![0u8, 0, 0, 0, 9, 1, 2]] {
        let status = raw_frame(&app, "/rolecheck.v1.RoleCheck/Grant", frame).await;
        assert_eq!(status, "3", "INVALID_ARGUMENT for broken framing");
    }
    assert_eq!(revision(&app).await, before, "nothing was written");
    assert!(app.check("u", "", "r").await, "still serving");
}

/// POSTs a hand-made gRPC body over HTTP/2; returns the grpc-status it got.
async fn raw_frame(app: &crate::helpers::TestApp, path: &str, body: Vec<u8>) -> String {
    use http_body_util::{BodyExt, Full};
    let tcp = tokio::net::TcpStream::connect(app.addr).await.expect("tcp");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{}{path}", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap_or_default().to_owned();
    }
    let collected = response.into_body().collect().await.expect("body");
    collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, failure_persistence: None, ..Default::default() })]

    /// Any bytes at all, as any write: a clear status (never INTERNAL or UNKNOWN), and the
    /// server keeps serving.
    #[test]
    fn random_request_bodies_get_clear_statuses(bodies in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 1..8)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let db = TestDb::create(Backend::Sqlite).await;
            let app = start(test_config(&db), db).await;
            let channel = crate::helpers::connect(app.addr).await;
            for body in bodies {
                for path in ["/rolecheck.v1.RoleCheck/Grant", "/rolecheck.v1.RoleCheck/SetRoles", "/rolecheck.v1.RoleCheck/CheckBatch", "/rolecheck.v1.Tenants/CreateTenant", "/rolecheck.v1.RoleCheck/Issue"] {
                    if let Err(status) = call(&channel, path, body.clone(), None).await {
                        assert!(!matches!(status.code(), Code::Internal | Code::Unknown), "{path} {body:?}: {status:?}");
                    }
                }
            }
            assert!(!app.check("nobody", "", "r").await, "still serving");
        });
    }
}

/// TLS handshakes are bounded in number and in time: 1024 connections that never start
/// their handshake hold every handshake slot, so a real client waits; 5 s later they are
/// cut and the client gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_are_bounded_in_number_and_time() {
    let dir = tempfile::tempdir().expect("dir");
    let authority = ca("rolecheck test CA");
    let server = leaf(&authority, &["localhost"], "rolecheck");
    let cert = write(dir.path(), "server.pem", &server.0);
    let key = write(dir.path(), "server.key", &server.1);
    let app = spawn_with(Backend::Sqlite, |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let port = app.addr.port();
    let started = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..1024 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect"));
    }
    // With every slot held, a real client does not get through in 2 s (unbounded, it
    // would in milliseconds)...
    let blocked =
        tokio::time::timeout(Duration::from_secs(2), tls_channel(port, &authority.pem, None)).await;
    assert!(blocked.is_err(), "a handshake got through while 1024 were in flight");
    // ...and does once the idle ones are cut at the 5 s handshake deadline.
    let channel =
        tokio::time::timeout(Duration::from_secs(10), tls_channel(port, &authority.pem, None))
            .await
            .expect("the idle handshakes were cut in time")
            .expect("handshake");
    assert!(started.elapsed() >= Duration::from_secs(4), "cut after {:?}", started.elapsed());
    RoleCheckClient::new(channel).check(check_req("u")).await.expect("check over TLS");
    drop(idle);
}
