//! Proxy authorization (`--authz-policy`) asked directly: forward-auth with every
//! spelling of a path and every way to ask without being the proxy, Envoy's ext_authz
//! driven by its own protos, bearer JWTs as RFC 8725 wants them, and policy files
//! refused with the line and reason. Real proxies in front: `gateways`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
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
[proxy]
kind = "nginx"

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
    let app = spawn_with(backend, |c| {
        c.authz_policy = Some(policy);
        c.authz_private_listener = true;
    })
    .await;
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
    if !headers.iter().any(|(name, _)| *name == "x-original-host") {
        all.push(("x-original-host", "shop.example"));
    }
    all.extend_from_slice(headers);
    let (status, head, _) = http(app.http, "GET", "/authz", &all).await;
    (status, head.to_ascii_lowercase())
}

/// The reason header of a forward-auth answer head.
fn reason(head: &str) -> Option<&str> {
    head.lines().find_map(|line| line.strip_prefix("x-rolecheck-reason: "))
}

async fn issue(app: &TestApp, user: &str) -> String {
    let request = pb::IssueRequest { user_id: user.into(), ..Default::default() };
    app.checks.clone().issue(request).await.expect("Issue").into_inner().access_token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_spellings_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app_with_policy(Backend::Sqlite, dir.path()).await;
    app.grant("carol", "acme", &["admin"]).await;
    let alice = [("x-user-id", "alice")];
    for uri in [
        "/tenants/acme/invoices/7",
        "/tenants/acme/invoices",
        "/tenants/acme/invoices/7?next=/admin/x",
        "/tenants/acme/invoices/7#/../../admin",
    ] {
        assert_eq!(forward(&app, "GET", uri, &alice).await.0, 200, "{uri}");
    }
    for (uri, why) in [
        ("/tenants/acme/invoices/7/", "empty path segment"),
        ("//tenants/acme/invoices/7", "empty path segment"),
        ("/tenants/./acme/invoices/7", "dot segment"),
        ("/healthz/../tenants/acme/invoices/7", "dot segment"),
        ("/tenants/acme/invoices/%2e%2e/7", "encoded ."),
        ("/tenants/%61cme/invoices/7", "escape of a plain character"),
        ("/tenants/acme%2Finvoices/7", "encoded /"),
        ("/tenants/acme/invoices%5C7", "encoded \\"),
        ("/tenants/acme/invoices/%zz", "malformed percent-escape"),
        ("/tenants/acme;v=1/invoices/7", "; in the path"),
        ("/tenants/acme/invoices/7%00", "encoded control character"),
        ("/tenants/acme/invoices/%FF", "not utf-8"),
        ("tenants/acme/invoices/7", "does not start with /"),
    ] {
        let (status, head) = forward(&app, "GET", uri, &alice).await;
        assert_eq!(status, 403, "{uri}");
        assert!(reason(&head).is_some_and(|r| r.contains(why)), "{uri}: {head}");
    }
    let long = format!("/tenants/acme/invoices/{}", "a".repeat(5000));
    let (status, head) = forward(&app, "GET", &long, &alice).await;
    assert_eq!((status, reason(&head)), (403, Some("path too long")));
    // Matching is case-sensitive: another casing is no route.
    let (status, head) = forward(&app, "GET", "/Tenants/acme/invoices/7", &alice).await;
    assert_eq!((status, reason(&head)), (403, Some("no route matches")));
    // Methods are upper-case tokens.
    let (status, head) = forward(&app, "get", "/tenants/acme/invoices/7", &alice).await;
    assert_eq!((status, reason(&head)), (403, Some("method is not an upper-case token")));
    // The host names the tenant, whatever its case and port; a trailing dot is refused.
    let carol = [("x-user-id", "carol"), ("x-original-host", "ACME.Shop.Example:8443")];
    let (status, head) = forward(&app, "PUT", "/settings/profile", &carol).await;
    assert_eq!(status, 200);
    assert!(head.contains("x-rolecheck-tenant: acme"), "{head}");
    let dotted = [("x-user-id", "carol"), ("x-original-host", "acme.shop.example.")];
    assert_eq!(forward(&app, "PUT", "/settings/profile", &dotted).await.0, 403);
    let alice_host = [("x-user-id", "alice"), ("x-original-host", "acme.shop.example")];
    assert_eq!(forward(&app, "PUT", "/settings/profile", &alice_host).await.0, 403);
    // Another family's headers never stand in for nginx's: missing ones are a denial.
    let traefik = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/tenants/acme/invoices/1"),
        ("x-forwarded-host", "shop.example"),
        ("x-user-id", "alice"),
    ];
    let (status, head, _) = http(app.http, "GET", "/authz", &traefik).await;
    assert_eq!(
        (status, reason(&head.to_ascii_lowercase())),
        (403, Some("missing x-original-method"))
    );
    // A header sent twice is ambiguous.
    let twice = [("x-original-uri", "/healthz"), ("x-user-id", "alice")];
    let (status, head) = forward(&app, "GET", "/tenants/acme/invoices/1", &twice).await;
    assert_eq!((status, reason(&head)), (403, Some("original-request header sent more than once")));
    let (status, _) = forward(
        &app,
        "GET",
        "/tenants/acme/invoices/1",
        &[("x-user-id", "alice"), ("x-user-id", "bob")],
    )
    .await;
    assert_eq!(status, 401, "two identities name nobody");
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
    config.authz_private_listener = true;
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

    // Every ambiguous spelling the proxies are attacked with, sent as Envoy sends a
    // path, is denied with the reason, though alice may see the page it resolves to.
    for path in crate::gateways::AMBIGUOUS {
        let request = envoy_request("GET", path, "shop.example", &[("x-user-id", "alice")]);
        let answer = envoy.check(request).await.expect("Check").into_inner();
        assert_eq!(
            answer.status.as_ref().map(|s| s.code),
            Some(Code::PermissionDenied as i32),
            "{path}"
        );
        let Some(HttpResponse::DeniedResponse(denied)) = answer.http_response else {
            panic!("denied: {path}")
        };
        assert_eq!(denied.status.map(|s| s.code), Some(403), "{path}");
        assert!(
            denied
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .any(|h| h.key == "x-rolecheck-reason" && !h.value.is_empty()),
            "{path}: a reason"
        );
    }
    // The request is read from the attributes only: a `:path` header stands in for
    // nothing, and a path in the attributes wins over any header.
    let mut headless =
        envoy_request("GET", "/tenants/acme/invoices/7", "shop.example", &[("x-user-id", "alice")]);
    if let Some(http) =
        headless.attributes.as_mut().and_then(|a| a.request.as_mut()).and_then(|r| r.http.as_mut())
    {
        http.path.clear();
    }
    let answer = envoy.check(headless).await.expect("Check").into_inner();
    assert_eq!(
        answer.status.map(|s| s.code),
        Some(Code::PermissionDenied as i32),
        "no attributes path"
    );
    let steered = envoy_request(
        "GET",
        "/tenants/acme/invoices/7",
        "shop.example",
        &[("x-user-id", "alice"), (":path", "/healthz")],
    );
    let answer = envoy.check(steered).await.expect("Check").into_inner();
    assert!(
        matches!(answer.http_response, Some(HttpResponse::OkResponse(ref ok)) if ok.headers.iter().any(|h| h.header.as_ref().is_some_and(|h| h.key == "x-rolecheck-user" && h.value == "alice"))),
        "decided on the attributes' path"
    );

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

/// Only the proxy may ask: forward-auth wants a key with the `proxy` scope in
/// `x-rolecheck-key`, ext_authz the same key as bearer metadata; anyone else is 401 /
/// UNAUTHENTICATED (a key without the scope 403 / PERMISSION_DENIED) and learns nothing
/// about any user. `--authz-private-listener` opens both, on loopback only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_proxy_may_ask() {
    use crate::gateways::{Guarded, PROXY_SECRET, policy};
    let guarded = Guarded::start(&policy("nginx", false)).await;
    let app = &guarded.app;
    let page = [
        ("x-original-method", "GET"),
        ("x-original-uri", "/tenants/acme/invoices/1"),
        ("x-original-host", "shop.example"),
        ("x-user-id", "alice"),
    ];
    let with = |key: Option<&'static str>| {
        let mut headers = page.to_vec();
        headers.extend(key.map(|key| ("x-rolecheck-key", key)));
        headers
    };
    // The oracle: with no key, alice's roles are not for anyone to read.
    for (key, want) in [(None, 401), (Some("guess"), 401), (Some("reader-secret"), 403)] {
        let (status, head, _) = http(app.http, "GET", "/authz", &with(key)).await;
        assert_eq!(status, want, "{key:?}");
        assert!(!head.to_ascii_lowercase().contains("x-rolecheck-"), "{key:?}: {head}");
    }
    let (status, head, _) = http(app.http, "GET", "/authz", &with(Some(PROXY_SECRET))).await;
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("x-rolecheck-roles: billing"), "{head}");
    let mut keyed = page.to_vec();
    keyed.push(("x-rolecheck-key", PROXY_SECRET));
    keyed.push(("x-rolecheck-key", "guess"));
    assert_eq!(http(app.http, "GET", "/authz", &keyed).await.0, 401, "two keys are no key");

    // ext_authz: bearer metadata with the proxy scope.
    let ask = |addr: SocketAddr, key: Option<&'static str>| async move {
        let mut envoy = AuthorizationClient::new(connect(addr).await);
        let mut request = tonic::Request::new(envoy_request(
            "GET",
            "/tenants/acme/invoices/1",
            "shop.example",
            &[("x-user-id", "alice")],
        ));
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().expect("metadata"));
        }
        envoy
            .check(request)
            .await
            .map(|r| r.into_inner().status.map(|s| s.code))
            .map_err(|s| s.code())
    };
    assert_eq!(ask(app.addr, None).await, Err(Code::Unauthenticated));
    assert_eq!(ask(app.addr, Some("reader-secret")).await, Err(Code::PermissionDenied));
    assert_eq!(ask(app.addr, Some(PROXY_SECRET)).await, Ok(Some(Code::Ok as i32)));

    // Declared private (loopback): both answer without a key; every other method still
    // needs its key.
    let dir = tempfile::tempdir().expect("dir");
    let policy_path = write_policy(dir.path(), POLICY);
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        crate::callers::keys_toml(&[("reader", "reader-secret", &["check"])], &[]),
    )
    .expect("keys");
    let private = spawn_with(Backend::Sqlite, |c| {
        c.authz_policy = Some(policy_path.clone());
        c.api_keys_file = Some(keys.clone());
        c.authz_private_listener = true;
    })
    .await;
    assert_eq!(
        ask(private.addr, None).await,
        Ok(Some(Code::PermissionDenied as i32)),
        "answered: alice holds nothing here"
    );
    let (status, _, _) = http(private.http, "GET", "/authz", &page).await;
    assert_eq!(status, 403, "answered without a key");
    let check = private.checks.clone().check(crate::helpers::check_req("u", "app", "r", 0)).await;
    assert_eq!(check.map(|_| ()).map_err(|s| s.code()), Err(Code::Unauthenticated));
}

/// The start-up refusals: a trusted-header identity with anonymous callers on a shared
/// port, a private listener that is not loopback, forward-auth open on a shared port;
/// and a reload cannot bring the first back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposures_that_would_answer_anyone_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = write_policy(dir.path(), POLICY);
    let refused = |tweak: Box<dyn FnOnce(&mut rolecheck::config::Config)>| {
        let policy = policy.clone();
        async move {
            let db = TestDb::create(Backend::Sqlite).await;
            let mut config = test_config(&db);
            config.authz_policy = Some(policy);
            tweak(&mut config);
            rolecheck::server::Server::bind(config)
                .await
                .err()
                .expect("refused at start")
                .to_string()
        }
    };
    let message = refused(Box::new(|_| {})).await;
    assert!(
        message.contains("[identity] header") && message.contains("--authz-private-listener"),
        "{message}"
    );
    let message = refused(Box::new(|c| {
        c.authz_private_listener = true;
        c.http_listen = "0.0.0.0:0".parse().expect("addr");
    }))
    .await;
    assert!(message.contains("loopback"), "{message}");
    let jwt_only = write_policy(dir.path(), &POLICY.replace("header = \"x-user-id\"\n", ""));
    let message = refused(Box::new(move |c| {
        c.authz_policy = Some(jwt_only);
        c.http_listen = "0.0.0.0:0".parse().expect("addr");
    }))
    .await;
    assert!(message.contains("non-loopback --http-listen"), "{message}");

    // A JWT-only policy starts keyless on loopback; a reload that adds a header identity
    // is refused, counted, and the policy in force kept.
    let app =
        spawn_with(Backend::Sqlite, |c| c.authz_policy = Some(dir.path().join("policy.toml")))
            .await;
    app.create_tenant("acme").await;
    app.grant("alice", "acme", &["billing"]).await;
    let alice = [("x-user-id", "alice")];
    assert_eq!(
        forward(&app, "GET", "/tenants/acme/invoices/1", &alice).await.0,
        401,
        "no header identity"
    );
    write_policy(dir.path(), POLICY);
    wait_for(Duration::from_secs(10), "the reload refused", || async {
        let failures = metric(&app, "rolecheck_authz_policy_reload_failures_total").await?;
        (failures >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        forward(&app, "GET", "/tenants/acme/invoices/1", &alice).await.0,
        401,
        "still no header identity"
    );
}

/// A JWK Set server whose `/big.json` is `jwks` padded past the size rolecheck accepts;
/// `/keys.json` is `jwks` itself.
async fn awkward_jwks_server(jwks: String) -> SocketAddr {
    let mut big: serde_json::Value = serde_json::from_str(&jwks).expect("jwks json");
    big["padding"] = "x".repeat(rolecheck::authz::jwt::MAX_JWKS_BYTES).into();
    let big = big.to_string();
    let app = axum::Router::new()
        .route("/keys.json", axum::routing::get(move || std::future::ready(jwks.clone())))
        .route("/big.json", axum::routing::get(move || std::future::ready(big.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// RFC 8725: `exp` and `nbf` checked with the stated leeway, the algorithm the key's
/// (an HMAC over the public key, or `none`, is refused), and a JWK Set fetch bounded in
/// size and in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_checked_as_rfc_8725_asks() {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use rolecheck::authz::jwt::{FETCH_TIMEOUT, LEEWAY};
    let (_keys, paths) = crate::tokens::key_files(&[rolecheck::token::KeyKind::EcP256]);
    let pem = std::fs::read(&paths[0]).expect("pem");
    let issuer = spawn_with(Backend::Sqlite, |c| {
        c.signing_key = paths.clone();
        c.issuer = "https://id.example".into();
    })
    .await;
    let (_, jwks) = crate::helpers::http_get(&issuer, "/.well-known/jwks.json").await;
    let kid = serde_json::from_str::<serde_json::Value>(&jwks).expect("json")["keys"][0]["kid"]
        .as_str()
        .expect("kid")
        .to_owned();
    let server = awkward_jwks_server(jwks.clone()).await;
    // A JWK Set server that takes the connection and never answers: how long the fetch
    // holds it is how long rolecheck waits.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let (held_tx, held) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut conn, _) = silent.accept().await.expect("accept");
        let accepted = std::time::Instant::now();
        let mut sink = Vec::new();
        let _ = conn.read_to_end(&mut sink).await;
        let _ = held_tx.send(accepted.elapsed());
    });
    let guarded = |url: String| {
        let dir = tempfile::tempdir().expect("dir");
        let policy = POLICY
            .replace("header = \"x-user-id\"\n", "")
            .replace("jwks_url = \"self\"", &format!("jwks_url = \"{url}\""))
            .replace("issuer = \"rolecheck\"", "issuer = \"https://id.example\"");
        let policy = write_policy(dir.path(), &policy);
        async move {
            let app = spawn_with(Backend::Sqlite, |c| c.authz_policy = Some(policy)).await;
            app.create_tenant("acme").await;
            app.grant("alice", "acme", &["billing"]).await;
            (app, dir)
        }
    };
    let (app, _dir) = guarded(format!("http://{server}/keys.json")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let leeway = LEEWAY.as_secs() as i64;
    let sign = |claims: serde_json::Value| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.clone());
        let key = EncodingKey::from_ec_pem(&pem).expect("key");
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    };
    let claims = |extra: serde_json::Value| {
        let mut base =
            serde_json::json!({"sub": "alice", "iss": "https://id.example", "exp": now + 300});
        for (k, v) in extra.as_object().expect("object") {
            match v {
                serde_json::Value::Null => base.as_object_mut().expect("object").remove(k),
                v => base.as_object_mut().expect("object").insert(k.clone(), v.clone()),
            };
        }
        base
    };
    let page = "/tenants/acme/invoices/1";
    let status = |token: String| {
        let app = &app;
        async move {
            let bearer = format!("Bearer {token}");
            forward(app, "GET", page, &[("authorization", &bearer)]).await.0
        }
    };
    assert_eq!(status(sign(claims(serde_json::json!({})))).await, 200, "a valid token");
    for (extra, want, what) in [
        (serde_json::json!({"nbf": now + leeway + 60}), 401, "not yet valid"),
        (serde_json::json!({"nbf": now + leeway / 3}), 200, "nbf within the leeway"),
        (serde_json::json!({"exp": now - leeway / 3}), 200, "exp within the leeway"),
        (serde_json::json!({"exp": now - leeway - 60}), 401, "expired"),
        (serde_json::json!({"exp": null}), 401, "no exp"),
        (serde_json::json!({"iss": "https://other.example"}), 401, "another issuer"),
    ] {
        assert_eq!(status(sign(claims(extra))).await, want, "{what}");
    }
    // The header cannot choose the algorithm: HS256 keyed with the public JWK Set, and
    // `none`, are both refused.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.clone());
    let confused = jsonwebtoken::encode(
        &header,
        &claims(serde_json::json!({})),
        &EncodingKey::from_secret(jwks.as_bytes()),
    )
    .expect("hs256");
    assert_eq!(status(confused).await, 401, "HS256 over the public key");
    let none_header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{kid}"}}"#));
    let payload = URL_SAFE_NO_PAD.encode(claims(serde_json::json!({})).to_string());
    assert_eq!(status(format!("{none_header}.{payload}.")).await, 401, "alg none");

    // A JWK Set past the size limit is not read: its keys never verify anything.
    let (big, _big_dir) = guarded(format!("http://{server}/big.json")).await;
    let bearer = format!("Bearer {}", sign(claims(serde_json::json!({}))));
    assert_eq!(forward(&big, "GET", page, &[("authorization", &bearer)]).await.0, 401);

    // A JWK Set server that never answers holds no request: a token is 401 at once,
    // well inside the fetch timeout the start-up fetch is still waiting out.
    let (slow, _slow_dir) = guarded(format!("http://{silent_addr}/keys.json")).await;
    let started = std::time::Instant::now();
    assert_eq!(forward(&slow, "GET", page, &[("authorization", &bearer)]).await.0, 401);
    assert!(started.elapsed() < FETCH_TIMEOUT / 2, "answered in {:?}", started.elapsed());
    // And the fetch gives up at its timeout, not before and not much after.
    let held = tokio::time::timeout(FETCH_TIMEOUT * 2, held)
        .await
        .expect("the fetch let go within twice its timeout")
        .expect("held");
    assert!(held >= FETCH_TIMEOUT - Duration::from_millis(500), "let go after {held:?}");
}

/// Routes may ask a permission, and a route's roles are held through the model: without
/// a model no permission is granted and roles are exact; once one is set, an admin may pay
/// invoices (admin is listed) and read docs (admin includes viewer), a biller may pay but
/// not read, a viewer may read but not pay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_ask_roles_and_permissions_under_the_model() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = write_policy(
        dir.path(),
        r#"
[proxy]
kind = "nginx"

[identity]
header = "x-user-id"

[[route]]
path = "/tenants/{tenant}/invoices/**"
methods = ["POST"]
permissions = ["invoice.pay"]

[[route]]
path = "/tenants/{tenant}/docs/**"
roles = ["viewer"]
"#,
    );
    let app = spawn_with(Backend::Sqlite, |c| {
        c.authz_policy = Some(policy);
        c.authz_private_listener = true;
    })
    .await;
    app.create_tenant("acme").await;
    app.grant("dave", "acme", &["admin"]).await;
    app.grant("erin", "acme", &["billing"]).await;
    app.grant("frank", "acme", &["viewer"]).await;
    let ask = |user: &'static str, method: &'static str, uri: &'static str| {
        let app = &app;
        async move { forward(app, method, uri, &[("x-user-id", user)]).await.0 }
    };
    let (pay, read) = ("/tenants/acme/invoices/7", "/tenants/acme/docs/a");
    assert_eq!(ask("dave", "POST", pay).await, 403, "no permission without a model");
    assert_eq!(ask("dave", "GET", read).await, 403, "roles are exact without a model");
    assert_eq!(ask("frank", "GET", read).await, 200);
    let model = r#"
[roles.viewer]
[roles.editor]
includes = ["viewer"]
[roles.admin]
includes = ["editor"]
[roles.billing]

[permissions]
"invoice.pay" = ["admin", "billing"]
"#;
    let request = pb::SetModelRequest { model: model.into() };
    app.checks.clone().set_model(request).await.expect("SetModel");
    wait_for(Duration::from_secs(5), "the model to reach the proxy decisions", || async {
        (ask("dave", "POST", pay).await == 200).then_some(())
    })
    .await;
    for (user, method, uri, status) in [
        ("dave", "GET", read, 200),
        ("erin", "POST", pay, 200),
        ("erin", "GET", read, 403),
        ("frank", "POST", pay, 403),
        ("frank", "GET", read, 200),
    ] {
        assert_eq!(ask(user, method, uri).await, status, "{user} {method} {uri}");
    }
}
