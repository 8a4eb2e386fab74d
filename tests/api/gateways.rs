//! Real proxies in front of an upstream that echoes what it received, each asking
//! rolecheck's forward-auth with the configuration docs/proxies.md gives for it: nginx
//! (`auth_request`), nginx configured as ingress-nginx's `auth-url` configures it, Caddy
//! (`forward_auth`) and Traefik (`ForwardAuth`), all from the distribution packages
//! `scripts/ensure-proxies` installs. Each is attacked the same way (client-sent
//! forwarding headers of every family, every ambiguous spelling of a path, forged
//! `x-rolecheck-*`, a client-sent identity header, no credential, another tenant's
//! credential), and no attack may reach the upstream.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use rolecheck::{pb, token::KeyKind};

use crate::{
    callers::keys_toml,
    helpers::{Backend, TestApp, TestDb, start, test_config, wait_for},
    tokens::key_files,
};

/// The proxy's key (scope `proxy`), as its config sends it in `x-rolecheck-key`.
pub const PROXY_SECRET: &str = "edge-proxy-secret";

/// The policy every proxy is tested with; `kind` names the proxy.
pub fn policy(kind: &str, case_insensitive: bool) -> String {
    format!(
        r#"
[proxy]
kind = "{kind}"
case_insensitive = {case_insensitive}

[identity]
header = "x-user-id"
[identity.jwt]
jwks_url = "self"
issuer = "rolecheck"

[[route]]
path = "/tenants/{{tenant}}/invoices/**"
methods = ["GET", "HEAD"]
roles = ["billing", "admin"]

[[route]]
host = "{{tenant}}.shop.example"
path = "/settings/**"
roles = ["admin"]

[[route]]
path = "/admin/**"
roles = ["support-agent"]

[[route]]
path = "/public/**"
public = true
"#
    )
}

/// A rolecheck that answers only the proxy's key, over a Postgres database seeded by a
/// second, keyless replica: `alice` bills in `acme`, `carol` in `bbb`, `dave` is an admin
/// in `acme`, `bob` holds nothing.
pub struct Guarded {
    pub app: TestApp,
    _admin: TestApp,
    pub alice: String,
    pub dave: String,
    _dir: tempfile::TempDir,
    _keys: tempfile::TempDir,
}

impl Guarded {
    pub async fn start(policy_text: &str) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, policy_text).expect("policy");
        let keys_file = dir.path().join("keys.toml");
        let keys =
            [("edge", PROXY_SECRET, &["proxy"][..]), ("reader", "reader-secret", &["check"])];
        std::fs::write(&keys_file, keys_toml(&keys, &[])).expect("keys");
        let (key_dir, signing) = key_files(&[KeyKind::Ed25519]);
        let db = TestDb::create(Backend::Postgres).await;
        let url = db.url().to_owned();
        let mut config = test_config(&db);
        config.signing_key = signing.clone();
        let admin = start(config, db).await;
        admin.create_tenant("acme").await;
        admin.create_tenant("bbb").await;
        admin.grant("alice", "acme", &["billing"]).await;
        admin.grant("carol", "bbb", &["billing"]).await;
        admin.grant("dave", "acme", &["admin"]).await;
        let issue = |user: &str| {
            let mut client = admin.checks.clone();
            let request = pb::IssueRequest { user_id: user.into(), ..Default::default() };
            async move { client.issue(request).await.expect("Issue").into_inner().access_token }
        };
        let (alice, dave) = (issue("alice").await, issue("dave").await);
        let replica = TestDb::Replica { url, via: None };
        let mut config = test_config(&replica);
        config.signing_key = signing;
        config.api_keys_file = Some(keys_file);
        config.authz_policy = Some(policy);
        let app = start(config, replica).await;
        Self { app, _admin: admin, alice, dave, _dir: dir, _keys: key_dir }
    }
}

/// What the upstream saw of one request.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub path: String,
    pub user: Option<String>,
    pub tenant: Option<String>,
    pub roles: Option<String>,
    pub key: Option<String>,
}

/// The upstream app: records every request it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Self {
        use axum::{extract::Request, routing::any};
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(any(move |request: Request| {
            let log = log.clone();
            async move {
                let header = |name: &str| {
                    request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
                };
                let entry = Seen {
                    path: request.uri().to_string(),
                    user: header("x-rolecheck-user"),
                    tenant: header("x-rolecheck-tenant"),
                    roles: header("x-rolecheck-roles"),
                    key: header("x-rolecheck-key"),
                };
                log.lock().expect("log").push(entry);
                "upstream\n"
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, seen }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("log").len()
    }

    pub fn last(&self) -> Seen {
        self.seen.lock().expect("log").last().cloned().expect("a request reached the upstream")
    }
}

/// A child process that dies with the test: killed on drop, and by a watchdog if the
/// test process itself dies first (a nextest timeout kills it without unwinding).
pub struct Guard {
    child: Child,
    watchdog: Child,
}

impl Guard {
    pub fn spawn(mut command: Command) -> Self {
        let child = command.spawn().unwrap_or_else(|err| {
            panic!("{command:?} starts (scripts/ensure-proxies installs it): {err}")
        });
        let script = format!(
            "while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill -9 {} 2>/dev/null",
            std::process::id(),
            child.id()
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
        Self { child, watchdog }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// A proxy running on loopback in front of an upstream.
pub struct Front {
    pub addr: SocketAddr,
    _guard: Guard,
    _dir: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" }
}

/// The auth location of docs/proxies.md's nginx example (`kind = "nginx"`).
pub fn nginx_auth_location(authz: SocketAddr) -> String {
    format!(
        r#"
    location = /_rolecheck {{
      internal;
      proxy_pass http://{authz}/authz;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Rolecheck-Key "{PROXY_SECRET}";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Original-Host $host;
      proxy_set_header X-User-Id "";
    }}"#
    )
}

/// The auth location ingress-nginx generates for `auth-url` (its template's headers),
/// plus docs/proxies.md's `auth-proxy-set-headers` ConfigMap (`kind = "ingress-nginx"`).
fn ingress_nginx_auth_location(authz: SocketAddr) -> String {
    format!(
        r#"
    location = /_rolecheck {{
      internal;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Forwarded-Proto "";
      proxy_set_header X-Request-ID $request_id;
      proxy_set_header Host rolecheck.rolecheck.svc.cluster.local;
      proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Sent-From "nginx-ingress-controller";
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Auth-Request-Redirect $request_uri;
      proxy_set_header X-Rolecheck-Key "{PROXY_SECRET}";
      proxy_set_header X-User-Id "";
      proxy_http_version 1.1;
      proxy_pass http://{authz}/authz;
    }}"#
    )
}

impl Front {
    /// nginx with `auth_location` as its auth subrequest.
    pub async fn nginx_with(auth_location: String, upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let addr = free_addr();
        let d = dir.path().display();
        let conf = format!(
            r#"master_process off;
daemon off;
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
{auth_location}
    location / {{
      auth_request /_rolecheck;
      auth_request_set $rc_user $upstream_http_x_rolecheck_user;
      auth_request_set $rc_tenant $upstream_http_x_rolecheck_tenant;
      auth_request_set $rc_roles $upstream_http_x_rolecheck_roles;
      proxy_set_header X-Rolecheck-User $rc_user;
      proxy_set_header X-Rolecheck-Tenant $rc_tenant;
      proxy_set_header X-Rolecheck-Roles $rc_roles;
      proxy_pass http://{upstream};
    }}
  }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut command = Command::new(nginx_binary());
        command.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path).stdout(Stdio::null());
        Self::ready(Guard::spawn(command), addr, dir).await
    }

    pub async fn nginx(authz: SocketAddr, upstream: SocketAddr) -> Self {
        Self::nginx_with(nginx_auth_location(authz), upstream).await
    }

    pub async fn ingress_nginx(authz: SocketAddr, upstream: SocketAddr) -> Self {
        Self::nginx_with(ingress_nginx_auth_location(authz), upstream).await
    }

    /// Caddy with docs/proxies.md's `forward_auth` site.
    pub async fn caddy(authz: SocketAddr, upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let addr = free_addr();
        let caddyfile = format!(
            r#"{{
	admin off
	auto_https off
}}

:{port} {{
	bind 127.0.0.1
	route {{
		request_header -X-Rolecheck-User
		request_header -X-Rolecheck-Tenant
		request_header -X-Rolecheck-Roles
		forward_auth {authz} {{
			uri /authz
			header_up X-Rolecheck-Key "{PROXY_SECRET}"
			header_up -X-User-Id
			copy_headers X-Rolecheck-User X-Rolecheck-Tenant X-Rolecheck-Roles
		}}
		reverse_proxy {upstream}
	}}
}}
"#,
            port = addr.port()
        );
        let path = dir.path().join("Caddyfile");
        std::fs::write(&path, caddyfile).expect("write Caddyfile");
        let mut command = Command::new("caddy");
        command
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Self::ready(Guard::spawn(command), addr, dir).await
    }

    /// Traefik with docs/proxies.md's `ForwardAuth` middleware chain (the key set before it,
    /// removed after it).
    pub async fn traefik(authz: SocketAddr, upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let addr = free_addr();
        let dynamic = format!(
            r#"http:
  routers:
    app:
      entryPoints: [web]
      rule: "PathPrefix(`/`)"
      middlewares: [rolecheck-key, rolecheck, rolecheck-unkey]
      service: app
  middlewares:
    rolecheck-key:
      headers:
        customRequestHeaders:
          X-Rolecheck-Key: "{PROXY_SECRET}"
    rolecheck:
      forwardAuth:
        address: "http://{authz}/authz"
        authRequestHeaders: ["Authorization", "X-Rolecheck-Key"]
        authResponseHeaders: ["X-Rolecheck-User", "X-Rolecheck-Tenant", "X-Rolecheck-Roles"]
    rolecheck-unkey:
      headers:
        customRequestHeaders:
          X-Rolecheck-Key: ""
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://{upstream}"
"#
        );
        let path = dir.path().join("dynamic.yml");
        std::fs::write(&path, dynamic).expect("write traefik config");
        let mut command = Command::new(traefik_binary());
        command
            .arg(format!("--entryPoints.web.address={addr}"))
            // Traefik cleans dot segments by default; off, every spelling reaches
            // rolecheck as the client sent it, which is what is tested here.
            .arg("--entryPoints.web.http.sanitizePath=false")
            .arg(format!("--providers.file.filename={}", path.display()))
            .args([
                "--log.level=ERROR",
                "--global.checkNewVersion=false",
                "--global.sendAnonymousUsage=false",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Self::ready(Guard::spawn(command), addr, dir).await
    }

    /// Waits until a public page reaches the upstream through the proxy.
    async fn ready(guard: Guard, addr: SocketAddr, dir: tempfile::TempDir) -> Self {
        wait_for(Duration::from_secs(20), "the proxy passing a public page", || async {
            let (status, _) = send(addr, "GET", "/public/ready", "shop.example", &[]).await.ok()?;
            (status == 200).then_some(())
        })
        .await;
        Self { addr, _guard: guard, _dir: dir }
    }
}

fn traefik_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ROLECHECK_TEST_TRAEFIK") {
        return path.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/proxies-venv/bin/traefik");
    if venv.exists() { venv } else { "traefik".into() }
}

/// One HTTP/1.1 request exactly as given (the target is not re-encoded): (status, body).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("no answer in 10 s"))??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// Every ambiguous spelling of a path alice (billing in `acme`) could try, with the
/// canonical page she may see beside them.
pub const AMBIGUOUS: &[&str] = &[
    "/tenants/bbb/../acme/invoices/1",
    "/tenants/bbb/%2e%2e/acme/invoices/1",
    "/tenants/bbb/%2E%2E/acme/invoices/1",
    "/tenants/bbb/.%2e/acme/invoices/1",
    "/tenants/./acme/invoices/1",
    "/tenants/acme/invoices/./1",
    "/public/../tenants/bbb/invoices/1",
    "/public/%2e%2e/admin/users",
    "/tenants/bbb;/../acme/invoices/1",
    "/tenants/acme;jsessionid=1/invoices/1",
    "/tenants/acme/invoices/1;x",
    "/tenants/acme%3Bx/invoices/1",
    "//tenants/acme/invoices/1",
    "/tenants//acme/invoices/1",
    "/tenants/acme/invoices/1/",
    "/tenants/acme/invoices%2F1",
    "/tenants/acme/invoices%2f1",
    "/tenants/acme%5Cinvoices/1",
    "/tenants\\acme\\invoices\\1",
    "/tenants/acme/invoices/%2E",
    "/tenants/%61cme/invoices/1",
    "/tenants/acme/invoices/1%00",
    "/tenants/acme/invoices/1%0a",
    "/tenants/acme/invoices/%zz",
    "/tenants/acme/invoices/%",
    "/TENANTS/acme/invoices/1",
    "/Tenants/acme/Invoices/1",
];

/// An attack: what it is, the method, the target and the headers sent.
type Attack<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>);

/// Asserts `front` passes alice's own page and stops every attack before the upstream.
///
/// `normalized` are the spellings the proxy itself rewrites to a canonical path before
/// it asks and before it forwards (Traefik decodes escaped letters): the app and
/// rolecheck then see the same path, which alice may see, so they pass as that path.
pub async fn attack(
    front: &Front,
    upstream: &Upstream,
    guarded: &Guarded,
    label: &str,
    normalized: &[(&str, &str)],
) {
    let alice = format!("Bearer {}", guarded.alice);
    let dave = format!("Bearer {}", guarded.dave);
    let page = "/tenants/acme/invoices/1";
    let host = "shop.example";

    // The page alice may see passes, and the upstream learns who, where and which roles,
    // never a client's copy of them, and never the proxy's key.
    let forged = [
        ("authorization", alice.as_str()),
        ("x-rolecheck-user", "root"),
        ("x-rolecheck-tenant", "bbb"),
        ("x-rolecheck-roles", "admin"),
    ];
    let (status, body) = send(front.addr, "GET", page, host, &forged).await.expect("send");
    assert_eq!(status, 200, "{label}: alice's own page: {body}");
    let seen = upstream.last();
    assert_eq!(seen.path, page, "{label}");
    assert_eq!(seen.user.as_deref(), Some("alice"), "{label}");
    assert_eq!(seen.tenant.as_deref(), Some("acme"), "{label}");
    assert_eq!(seen.roles.as_deref(), Some("billing"), "{label}");
    assert_ne!(seen.key.as_deref(), Some(PROXY_SECRET), "{label}: the key stays with the proxy");
    let query = format!("{page}?next=/admin/users");
    assert_eq!(
        send(front.addr, "GET", &query, host, &[("authorization", &alice)]).await.expect("send").0,
        200,
        "{label}: a query is only a query"
    );
    // The host names the tenant.
    let settings =
        send(front.addr, "PUT", "/settings/x", "acme.shop.example", &[("authorization", &dave)])
            .await
            .expect("send");
    assert_eq!(settings.0, 200, "{label}: dave administers acme: {}", settings.1);
    assert_eq!(upstream.last().tenant.as_deref(), Some("acme"), "{label}");
    // A public page passes with none of the forged headers.
    let (status, _) = send(front.addr, "GET", "/public/x", host, &forged[1..]).await.expect("send");
    assert_eq!(status, 200, "{label}: public");
    let seen = upstream.last();
    for (name, value) in [("user", &seen.user), ("tenant", &seen.tenant), ("roles", &seen.roles)] {
        assert!(
            value.as_deref().is_none_or(str::is_empty),
            "{label}: a forged x-rolecheck-{name} reached the app on a public page: {value:?}"
        );
    }

    let every_family = |uri: &'static str| {
        vec![
            ("x-forwarded-uri", uri),
            ("x-forwarded-method", "GET"),
            ("x-forwarded-host", "acme.shop.example"),
            ("x-original-uri", uri),
            ("x-original-method", "GET"),
            ("x-original-host", "acme.shop.example"),
            ("x-original-url", "http://shop.example/public/x"),
            ("x-rewrite-url", uri),
        ]
    };
    let alice = alice.as_str();
    let mut public_family = every_family("/public/x");
    public_family.push(("x-user-id", "dave"));
    let mut tenant_family = every_family("/tenants/acme/invoices/1");
    tenant_family.push(("authorization", alice));
    let forged_all = vec![
        ("x-rolecheck-user", "root"),
        ("x-rolecheck-roles", "support-agent"),
        ("x-rolecheck-key", "guess"),
    ];
    let mut attacks: Vec<Attack> = vec![
        ("no credential", "GET", page, vec![]),
        ("a tampered token", "GET", page, vec![("authorization", "Bearer x.y.z")]),
        ("another tenant's page", "GET", "/tenants/bbb/invoices/1", vec![("authorization", alice)]),
        ("a method the route does not list", "DELETE", page, vec![("authorization", alice)]),
        ("a page no route names", "GET", "/elsewhere", vec![("authorization", alice)]),
        ("another tenant's host", "PUT", "/settings/x", vec![("authorization", alice)]),
        ("a client-sent identity header", "GET", page, vec![("x-user-id", "alice")]),
        ("a client-sent identity for admin", "GET", "/admin/users", vec![("x-user-id", "dave")]),
        ("forged x-rolecheck-* and key", "GET", "/admin/users", forged_all),
        ("every family pointing at a public page", "GET", "/admin/users", public_family),
        (
            "every family pointing at alice's tenant",
            "GET",
            "/tenants/bbb/invoices/1",
            tenant_family,
        ),
    ];
    for target in AMBIGUOUS {
        attacks.push(("an ambiguous spelling", "GET", target, vec![("authorization", alice)]));
    }
    let mut reached = Vec::new();
    for (what, method, target, headers) in &attacks {
        let before = upstream.count();
        let host = if *target == "/settings/x" { "bbb.shop.example" } else { host };
        let answer = send(front.addr, method, target, host, headers).await;
        let status = answer.as_ref().map_or(0, |(status, _)| *status);
        if upstream.count() != before {
            reached
                .push(format!("{what}: {method} {target} reached it as {}", upstream.last().path));
        } else if ![400, 401, 403, 404].contains(&status) {
            reached.push(format!("{what}: {method} {target} answered {answer:?}"));
        }
    }
    let expected: Vec<String> = normalized
        .iter()
        .map(|(target, path)| format!("an ambiguous spelling: GET {target} reached it as {path}"))
        .collect();
    assert_eq!(reached, expected, "{label}: what reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_lets_no_attack_through() {
    let guarded = Guarded::start(&policy("nginx", false)).await;
    let upstream = Upstream::start().await;
    let front = Front::nginx(guarded.app.http, upstream.addr).await;
    attack(&front, &upstream, &guarded, "nginx", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_nginx_lets_no_attack_through() {
    let guarded = Guarded::start(&policy("ingress-nginx", false)).await;
    let upstream = Upstream::start().await;
    let front = Front::ingress_nginx(guarded.app.http, upstream.addr).await;
    attack(&front, &upstream, &guarded, "ingress-nginx", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_lets_no_attack_through() {
    let guarded = Guarded::start(&policy("caddy", false)).await;
    let upstream = Upstream::start().await;
    let front = Front::caddy(guarded.app.http, upstream.addr).await;
    attack(&front, &upstream, &guarded, "caddy", &[]).await;
}

/// What Traefik rewrites before it asks and forwards (RFC 3986 normalization of escaped
/// unreserved characters): rolecheck and the app both see the canonical path.
const TRAEFIK_NORMALIZES: &[(&str, &str)] =
    &[("/tenants/%61cme/invoices/1", "/tenants/acme/invoices/1")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_lets_no_attack_through() {
    let guarded = Guarded::start(&policy("traefik", false)).await;
    let upstream = Upstream::start().await;
    let front = Front::traefik(guarded.app.http, upstream.addr).await;
    attack(&front, &upstream, &guarded, "traefik", TRAEFIK_NORMALIZES).await;
}

/// With `case_insensitive`, a mixed-case spelling of a guarded route is that route, not
/// the public catch-all after it (as an Express app would route it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_insensitive_routes_guard_every_casing() {
    let text = format!("{}\n[[route]]\npath = \"/**\"\npublic = true\n", policy("nginx", true));
    let guarded = Guarded::start(&text).await;
    let upstream = Upstream::start().await;
    let front = Front::nginx(guarded.app.http, upstream.addr).await;
    let alice = format!("Bearer {}", guarded.alice);
    for target in ["/ADMIN/users", "/Admin/users", "/aDmIn"] {
        let (status, _) = send(front.addr, "GET", target, "shop.example", &[]).await.expect("send");
        assert_eq!((target, status), (target, 401));
        let (status, _) =
            send(front.addr, "GET", target, "shop.example", &[("authorization", &alice)])
                .await
                .expect("send");
        assert_eq!((target, status), (target, 403), "alice is no support agent");
    }
    let (status, _) = send(
        front.addr,
        "GET",
        "/TENANTS/acme/INVOICES/1",
        "shop.example",
        &[("authorization", &alice)],
    )
    .await
    .expect("send");
    assert_eq!(status, 200, "the same route, folded");
    assert_eq!(upstream.last().tenant.as_deref(), Some("acme"));
    let (status, _) = send(
        front.addr,
        "GET",
        "/Tenants/BBB/invoices/1",
        "shop.example",
        &[("authorization", &alice)],
    )
    .await
    .expect("send");
    assert_eq!(status, 403, "tenant BBB is not acme");
    assert_eq!(upstream.count(), 2, "the ready probe and the folded page only");
}
