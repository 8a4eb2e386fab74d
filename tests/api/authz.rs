//! Proxy authorization (`--authz-policy`): a real nginx (`auth_request`) in front of a
//! small upstream, forward-auth asked directly with every spelling of a path, Envoy's
//! ext_authz driven by its own protos, and policy files refused with the line and reason.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context, authorization_client::AuthorizationClient,
    check_response::HttpResponse,
};
use rolecheck::pb;
use tonic::Code;

use crate::{
    helpers::{
        Backend, TestApp, TestDb, connect, http, metric, spawn_with, start, test_config, wait_for,
    },
    proxy::Proxy,
};

const POLICY: &str = r#"
[identity]
header = "x-user-id"
[identity.jwt]
jwks_url = "self"
issuer = "rolecheck"

[[route]]
path = "/tenants/{tenant}/invoices/**"
methods = ["GET", "HEAD"]
roles = ["billing", "admin"]

[[route]]
host = "{tenant}.shop.example"
path = "/settings/**"
roles = ["admin"]

[[route]]
path = "/admin/**"
roles = ["support-agent"]

[[route]]
path = "/healthz"
public = true
"#;

fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).expect("write policy");
    path
}

/// A server with the seed policy, `alice` a biller in `acme`, `bob` in no role.
async fn app_with_policy(backend: Backend, dir: &Path) -> TestApp {
    let policy = write_policy(dir, POLICY);
    let app = spawn_with(backend, |c| c.authz_policy = Some(policy)).await;
    app.create_tenant("acme").await;
    app.grant("alice", "acme", &["billing"]).await;
    app
}

/// Forward-auth asked directly, as nginx would ask it.
async fn forward(
    app: &TestApp,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut all = vec![("x-original-method", method), ("x-original-uri", uri)];
    all.extend_from_slice(headers);
    let (status, head, _) = http(app.http, "GET", "/authz", &all).await;
    (status, head.to_ascii_lowercase())
}

/// The upstream app: answers every request with the `x-rolecheck-*` headers it received.
async fn upstream() -> SocketAddr {
    use axum::{http::HeaderMap, routing::any};
    let app = axum::Router::new().fallback(any(|headers: HeaderMap| async move {
        ["x-rolecheck-user", "x-rolecheck-tenant", "x-rolecheck-roles"]
            .iter()
            .map(|name| {
                let value = headers.get(*name).and_then(|v| v.to_str().ok()).unwrap_or("-");
                format!("{name}={value}\n")
            })
            .collect::<String>()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// nginx from Debian's packages, on loopback, in front of `upstream`, asking `authz`.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    async fn start(authz: SocketAddr, upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let d = dir.path().display();
        let user = if running_as_root() { "user root;" } else { "" };
        let conf = format!(
            r#"{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {addr};
    location = /_rolecheck {{
      internal;
      proxy_pass http://{authz}/authz;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Forwarded-Host $host;
    }}
    location / {{
      auth_request /_rolecheck;
      auth_request_set $rc_user $upstream_http_x_rolecheck_user;
      auth_request_set $rc_tenant $upstream_http_x_rolecheck_tenant;
      auth_request_set $rc_roles $upstream_http_x_rolecheck_roles;
      proxy_set_header x-rolecheck-user $rc_user;
      proxy_set_header x-rolecheck-tenant $rc_tenant;
      proxy_set_header x-rolecheck-roles $rc_roles;
      proxy_pass http://{upstream};
    }}
  }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx starts (.ci/run installs Debian's nginx-light)");
        wait_for(Duration::from_secs(10), "nginx listening", || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
        Self { child, addr, _dir: dir }
    }
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" }
}

/// nginx's workers drop to `nobody` when started as root; the test's files are root's.
fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

async fn issue(app: &TestApp, user: &str) -> String {
    let request = pb::IssueRequest { user_id: user.into(), ..Default::default() };
    app.checks.clone().issue(request).await.expect("Issue").into_inner().access_token
}

fn seen(body: &str) -> HashMap<String, String> {
    body.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_lets_through_only_users_with_the_role() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app_with_policy(Backend::Sqlite, dir.path()).await;
    let nginx = Nginx::start(app.http, upstream().await).await;
    let page = "/tenants/acme/invoices/7";

    // A user with the role gets the page; the upstream sees who, where and which roles,
    // never the client's own copy of them.
    let forged =
        [("x-user-id", "alice"), ("x-rolecheck-roles", "admin"), ("x-rolecheck-user", "root")];
    let (status, _, body) = http(nginx.addr, "GET", page, &forged).await;
    assert_eq!(status, 200, "{body}");
    let headers = seen(&body);
    assert_eq!(headers["x-rolecheck-user"], "alice");
    assert_eq!(headers["x-rolecheck-tenant"], "acme");
    assert_eq!(headers["x-rolecheck-roles"], "billing");

    // The same with a bearer token rolecheck issued.
    let token = issue(&app, "alice").await;
    let bearer = format!("Bearer {token}");
    let (status, _, body) = http(nginx.addr, "GET", page, &[("authorization", &bearer)]).await;
    assert_eq!((status, seen(&body)["x-rolecheck-user"].as_str()), (200, "alice"));

    // Without the role: 403; without a credential, or with a bad one: 401.
    assert_eq!(http(nginx.addr, "GET", page, &[("x-user-id", "bob")]).await.0, 403);
    assert_eq!(http(nginx.addr, "GET", page, &[]).await.0, 401);
    let tampered = format!("Bearer {}x", token);
    assert_eq!(http(nginx.addr, "GET", page, &[("authorization", &tampered)]).await.0, 401);
    // A method the route does not list, and a path no route names: 403.
    assert_eq!(http(nginx.addr, "POST", page, &[("x-user-id", "alice")]).await.0, 403);
    assert_eq!(http(nginx.addr, "GET", "/elsewhere", &[("x-user-id", "alice")]).await.0, 403);

    // A public route lets anyone through and strips the client's x-rolecheck-* headers.
    let (status, _, body) = http(nginx.addr, "GET", "/healthz", &forged[1..]).await;
    assert_eq!(status, 200);
    assert_eq!(seen(&body)["x-rolecheck-roles"], "-", "a forged header never reaches the app");
    assert_eq!(seen(&body)["x-rolecheck-user"], "-");

    // A spelling that leaves the public route is decided as what it normalizes to.
    let sneaky = "/healthz/../tenants/acme/invoices/7";
    assert_eq!(http(nginx.addr, "GET", sneaky, &[("x-user-id", "bob")]).await.0, 403);

    // Revoke: the very next request is 403 (the bearer token still lists nothing: roles
    // are read live).
    app.revoke("alice", "acme", &["billing"]).await;
    assert_eq!(http(nginx.addr, "GET", page, &[("x-user-id", "alice")]).await.0, 403);
    assert_eq!(http(nginx.addr, "GET", page, &[("authorization", &bearer)]).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_path_slips_past_a_route() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app_with_policy(Backend::Sqlite, dir.path()).await;
    app.grant("carol", "acme", &["admin"]).await;
    let alice = [("x-user-id", "alice")];
    for (uri, want) in [
        ("/tenants/acme/invoices/7", 200),
        ("/tenants/acme/invoices/7/", 200),
        ("//tenants//acme///invoices/7", 200),
        ("/tenants/./acme/invoices/./7", 200),
        ("/healthz/../tenants/acme/invoices/7", 200),
        ("/tenants/%61cme/invoices/7", 200),
        ("/tenants/acme/invoices/7?next=/admin/x", 200),
        ("/admin/../tenants/acme/invoices", 200),
        // Escapes that could turn into separators, and broken ones, are refused.
        ("/tenants/acme%2Finvoices/7", 403),
        ("/tenants/acme/invoices%2f7", 403),
        ("/tenants/acme/invoices%5C7", 403),
        ("/tenants/acme/invoices/%zz", 403),
        // A query that looks like a path is only a query.
        ("/healthz?/tenants/acme/invoices/7", 200),
        ("/nothing?/healthz", 403),
        // Leaving a route by dot segments lands where they lead.
        ("/tenants/acme/invoices/../../../admin/x", 403),
        ("/tenants/acme/invoices/%2e%2e/%2e%2e/%2e%2e/admin", 403),
    ] {
        assert_eq!(forward(&app, "GET", uri, &alice).await.0, want, "{uri}");
    }
    let long = format!("/tenants/acme/invoices/{}", "a".repeat(5000));
    assert_eq!(forward(&app, "GET", &long, &alice).await.0, 403, "an over-long path is refused");
    // The host names the tenant, whatever its case and port.
    let carol = [("x-user-id", "carol"), ("x-forwarded-host", "ACME.Shop.Example:8443")];
    let (status, head) = forward(&app, "PUT", "/settings/profile", &carol).await;
    assert_eq!(status, 200);
    assert!(head.contains("x-rolecheck-tenant: acme"), "{head}");
    let alice_host = [("x-user-id", "alice"), ("x-forwarded-host", "acme.shop.example")];
    assert_eq!(forward(&app, "PUT", "/settings/profile", &alice_host).await.0, 403);
    // Traefik and Caddy spell the original request X-Forwarded-*.
    let traefik = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/tenants/acme/invoices/1"),
        ("x-user-id", "alice"),
    ];
    assert_eq!(http(app.http, "GET", "/authz", &traefik).await.0, 200);
    // No original URI: nothing to decide.
    assert_eq!(http(app.http, "GET", "/authz", &alice).await.0, 403);
    // A 401 says how to authenticate.
    let (status, head) = forward(&app, "GET", "/tenants/acme/invoices/7", &[]).await;
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: bearer"), "{head}");
}

fn envoy_request(method: &str, path: &str, host: &str, extra: &[(&str, &str)]) -> CheckRequest {
    // As Envoy and Istio send it: lower-cased headers, pseudo-headers, `:path` with the
    // query string, x-forwarded-* and x-request-id.
    let mut headers: HashMap<String, String> = [
        (":method", method),
        (":path", path),
        (":authority", host),
        (":scheme", "https"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-for", "10.0.0.7"),
        ("x-request-id", "0f8a3c2e-6b0d-4c59-9e3a-5f2c1d7b8e90"),
        ("user-agent", "curl/8.5.0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let query = path.split_once('?').map_or("", |(_, query)| query);
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "12345".into(),
                    method: method.into(),
                    headers,
                    path: path.into(),
                    host: host.into(),
                    scheme: "https".into(),
                    query: query.into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_authz_decides_as_envoy_asks() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = write_policy(dir.path(), POLICY);
    let db = TestDb::create(Backend::Postgres).await;
    let proxy = Proxy::start().await;
    let mut config = test_config(&db);
    config.database_url = Some(rolecheck::config::DatabaseUrl(proxy.url_through(db.url())));
    config.authz_policy = Some(policy);
    config.db_query_timeout = Duration::from_secs(1);
    let app = start(config, db).await;
    app.create_tenant("acme").await;
    app.grant("alice", "acme", &["billing", "reports"]).await;
    let mut envoy = AuthorizationClient::new(connect(app.addr).await);

    let alice = [("x-user-id", "alice"), ("x-rolecheck-roles", "admin")];
    let ok = envoy
        .check(envoy_request("GET", "/tenants/acme/invoices/7?page=2", "shop.example", &alice))
        .await
        .expect("Check")
        .into_inner();
    assert_eq!(ok.status.as_ref().map(|s| s.code), Some(Code::Ok as i32));
    let Some(HttpResponse::OkResponse(ok)) = ok.http_response else { panic!("an ok_response") };
    let set: HashMap<String, String> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert_eq!(set["x-rolecheck-user"], "alice");
    assert_eq!(set["x-rolecheck-tenant"], "acme");
    assert_eq!(set["x-rolecheck-roles"], "billing,reports", "replacing the client's copy");

    let bob = envoy
        .check(envoy_request(
            "GET",
            "/tenants/acme/invoices/7",
            "shop.example",
            &[("x-user-id", "bob")],
        ))
        .await
        .expect("Check")
        .into_inner();
    assert_eq!(bob.status.as_ref().map(|s| s.code), Some(Code::PermissionDenied as i32));
    let Some(HttpResponse::DeniedResponse(denied)) = bob.http_response else { panic!("denied") };
    assert_eq!(denied.status.map(|s| s.code), Some(403));

    let nobody = envoy
        .check(envoy_request("GET", "/tenants/acme/invoices/7", "shop.example", &[]))
        .await
        .expect("Check")
        .into_inner();
    assert_eq!(nobody.status.as_ref().map(|s| s.code), Some(Code::Unauthenticated as i32));
    let Some(HttpResponse::DeniedResponse(denied)) = nobody.http_response else { panic!("denied") };
    assert_eq!(denied.status.map(|s| s.code), Some(401));
    let www: Vec<&str> = denied
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .filter(|h| h.key == "www-authenticate")
        .map(|h| h.value.as_str())
        .collect();
    assert_eq!(www, ["Bearer"]);

    let public = envoy
        .check(envoy_request("GET", "/healthz", "shop.example", &[("x-rolecheck-user", "root")]))
        .await
        .expect("Check")
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = public.http_response else { panic!("ok") };
    let mut removed = ok.headers_to_remove.clone();
    removed.sort();
    assert_eq!(removed, ["x-rolecheck-roles", "x-rolecheck-tenant", "x-rolecheck-user"]);

    // The store down: a user the cache cannot answer for is UNAVAILABLE, never allowed.
    proxy.cut();
    let down = envoy
        .check(envoy_request(
            "GET",
            "/tenants/acme/invoices/7",
            "shop.example",
            &[("x-user-id", "dave")],
        ))
        .await
        .expect_err("UNAVAILABLE");
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    // Forward-auth says the same with 503.
    let dave = [("x-user-id", "dave")];
    assert_eq!(forward(&app, "GET", "/tenants/acme/invoices/7", &dave).await.0, 503);
    let unavailable =
        metric(&app, "rolecheck_authz_decisions_total{decision=\"unavailable\"}").await;
    assert_eq!(unavailable, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_is_refused_at_start_and_kept_on_reload() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = write_policy(
        dir.path(),
        "[identity]\nheader = \"x-user-id\"\n\n[[route]]\npath = \"/a\"\nrolez = [\"x\"]\n",
    );
    let db = TestDb::create(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.authz_policy = Some(bad.clone());
    let err = rolecheck::server::Server::bind(config).await.err().expect("refused at start");
    let message = err.to_string();
    assert!(message.contains("line 6") && message.contains("unknown field `rolez`"), "{message}");

    let app = app_with_policy(Backend::Sqlite, dir.path()).await;
    let page = "/tenants/acme/invoices/7";
    let alice = [("x-user-id", "alice")];
    assert_eq!(forward(&app, "GET", page, &alice).await.0, 200);
    let failures = || async {
        metric(&app, "rolecheck_authz_policy_reload_failures_total").await.expect("the counter")
    };
    assert_eq!(failures().await, 0.0);
    // An invalid rewrite is refused (counted, logged) and the policy in force kept.
    write_policy(
        dir.path(),
        &format!("{POLICY}\n[[route]]\npath = \"/x/{{tenant}}/{{tenant}}\"\nroles = [\"a\"]\n"),
    );
    wait_for(Duration::from_secs(10), "the reload failure counted", || async {
        (failures().await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(forward(&app, "GET", page, &alice).await.0, 200, "the old policy still decides");
    // A valid rewrite takes effect: billing no longer opens invoices.
    write_policy(
        dir.path(),
        &POLICY.replace("roles = [\"billing\", \"admin\"]", "roles = [\"admin\"]"),
    );
    wait_for(Duration::from_secs(10), "the new policy in force", || async {
        (forward(&app, "GET", page, &alice).await.0 == 403).then_some(())
    })
    .await;
}

/// A JWK Set server that counts its fetches, serving `jwks`.
async fn jwks_server(jwks: String) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/keys.json",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = jwks.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

/// Tokens from another issuer, verified with its JWK Set fetched by URL; a flood of
/// tokens naming unknown keys refetches the set at most once per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_verify_against_a_fetched_jwk_set() {
    use std::sync::atomic::Ordering;
    let issuer = spawn_with(Backend::Sqlite, |c| c.issuer = "https://id.example".into()).await;
    let (_, jwks) = crate::helpers::http_get(&issuer, "/.well-known/jwks.json").await;
    let (jwks_addr, fetches) = jwks_server(jwks).await;
    let dir = tempfile::tempdir().expect("dir");
    let policy = POLICY
        .replace("header = \"x-user-id\"\n", "")
        .replace("jwks_url = \"self\"", &format!("jwks_url = \"http://{jwks_addr}/keys.json\""))
        .replace("issuer = \"rolecheck\"", "issuer = \"https://id.example\"");
    let policy = write_policy(dir.path(), &policy);
    let app = spawn_with(Backend::Sqlite, |c| c.authz_policy = Some(policy)).await;
    app.create_tenant("acme").await;
    app.grant("alice", "acme", &["billing"]).await;
    wait_for(Duration::from_secs(5), "the JWK Set fetched at start", || async {
        (fetches.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;

    let token = issue(&issuer, "alice").await;
    let page = "/tenants/acme/invoices/7";
    let bearer = format!("Bearer {token}");
    assert_eq!(forward(&app, "GET", page, &[("authorization", &bearer)]).await.0, 200);
    // A token of this server's own keys is not the issuer's: 401.
    let own = format!("Bearer {}", issue(&app, "alice").await);
    assert_eq!(forward(&app, "GET", page, &[("authorization", &own)]).await.0, 401);

    // Tokens naming keys nobody published: 401 each, and at most one refetch.
    let before = fetches.load(Ordering::SeqCst);
    for i in 0..20 {
        let forged = forge_kid(&token, &format!("made-up-{i}"));
        let header = format!("Bearer {forged}");
        assert_eq!(forward(&app, "GET", page, &[("authorization", &header)]).await.0, 401);
    }
    let refetches = fetches.load(Ordering::SeqCst) - before;
    assert!(refetches <= 1, "{refetches} refetches for 20 unknown kids");
}

/// `token` with its header's `kid` replaced (the signature no longer matches).
fn forge_kid(token: &str, kid: &str) -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let (header, rest) = token.split_once('.').expect("a JWS");
    let mut json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("b64")).expect("json");
    json["kid"] = kid.into();
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(json.to_string()))
}

/// With API keys, ext_authz is a `check`-scoped call; `--authz-envoy-without-key` (for
/// Istio, whose provider sends no key) opens that one method and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_needs_the_check_scope_unless_opened_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = write_policy(dir.path(), POLICY);
    let keys = dir.path().join("keys.toml");
    let reader = [("reader", "reader-secret", &["check"][..])];
    std::fs::write(&keys, crate::callers::keys_toml(&reader, &[])).expect("keys");
    let ask = |app: &TestApp| {
        let addr = app.addr;
        async move {
            let mut envoy = AuthorizationClient::new(connect(addr).await);
            let request = envoy_request("GET", "/healthz", "shop.example", &[]);
            envoy.check(request).await.map(|_| ())
        }
    };
    for open in [false, true] {
        let (policy, keys) = (policy.clone(), keys.clone());
        let app = spawn_with(Backend::Sqlite, move |c| {
            c.authz_policy = Some(policy);
            c.api_keys_file = Some(keys);
            c.authz_envoy_without_key = open;
        })
        .await;
        let without_key = ask(&app).await;
        match open {
            false => assert_eq!(without_key.map_err(|s| s.code()), Err(Code::Unauthenticated)),
            true => assert_eq!(without_key.map_err(|s| s.code()), Ok(())),
        }
        // Every other method still needs its key.
        let check = app.checks.clone().check(crate::helpers::check_req("u", "app", "r", 0)).await;
        assert_eq!(check.map(|_| ()).map_err(|s| s.code()), Err(Code::Unauthenticated));
    }
}
