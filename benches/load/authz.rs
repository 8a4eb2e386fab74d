//! Phase 3: proxy authorization (Envoy ext_authz, forward-auth through nginx).

use super::*;

const ENVOY_CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Viewers of a tenant may read anything under it; identity from `x-user-id`, else a
/// bearer token rolecheck issued.
const AUTHZ_POLICY: &str = r#"
[identity]
header = "x-user-id"
[identity.jwt]
jwks_url = "self"
issuer = "rolecheck"

[[route]]
path = "/tenants/{tenant}/**"
roles = ["viewer"]
"#;

/// An ext_authz request as Envoy sends it, for the page every proxy scenario asks about.
fn envoy_check(header: (&str, String)) -> Bytes {
    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext, CheckRequest, attribute_context,
    };
    let headers = [
        (":method".to_owned(), "GET".to_owned()),
        (":path".to_owned(), "/tenants/hot/page".to_owned()),
        (":authority".to_owned(), "shop.example".to_owned()),
        ("x-request-id".to_owned(), "0f8a3c2e-6b0d-4c59-9e3a-5f2c1d7b8e90".to_owned()),
        (header.0.to_owned(), header.1),
    ];
    frame(&CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/tenants/hot/page".into(),
                    host: "shop.example".into(),
                    headers: headers.into_iter().collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    })
}

fn envoy_allowed(bytes: &[u8]) -> Result<(), String> {
    let response: envoy_types::pb::envoy::service::auth::v3::CheckResponse = decode(bytes)?;
    match response.status.map(|s| s.code) {
        Some(0) => Ok(()),
        other => Err(format!("ext_authz status {other:?}")),
    }
}

/// Phase 3: proxy authorization against the no-op. ext_authz with header identity, and
/// with RS256 bearer tokens (1000 distinct ones, each verified once and then answered
/// from the verified-token cache); then forward-auth through nginx against nginx serving
/// the same page with no `auth_request`, both driven by `h2load --h1`. With
/// `BENCH_COMPARE_BIN`, that build first, then this one, in the same run: this build asks
/// as a proxy must (a key with the `proxy` scope, as gRPC metadata and in nginx's
/// `x-rolecheck-key`), the other as it could (no key).
pub(super) async fn authz_phase(concurrency: usize, baseline: &Outcome) {
    let mut builds = Vec::new();
    if let Some(other) = std::env::var_os("BENCH_COMPARE_BIN") {
        builds.push((std::path::PathBuf::from(other), "before: BENCH_COMPARE_BIN", false));
    }
    builds.push((std::path::PathBuf::from(env!("CARGO_BIN_EXE_rolecheck")), "this build", true));
    for (bin, label, current) in builds {
        authz_build(&bin, label, current, concurrency, baseline).await;
    }
}

/// The bench's one key: every scope the phase uses.
const BENCH_KEY: &str = "bench-proxy-key";

async fn authz_build(
    bin: &Path,
    label: &str,
    current: bool,
    concurrency: usize,
    baseline: &Outcome,
) {
    let data = tempfile::tempdir().expect("dir");
    let policy = data.path().join("policy.toml");
    let text = if current {
        format!("[proxy]\nkind = \"nginx\"\n{AUTHZ_POLICY}")
    } else {
        AUTHZ_POLICY.to_owned()
    };
    std::fs::write(&policy, text).expect("write policy");
    let mut envs = vec![("ROLECHECK_AUTHZ_POLICY", policy.display().to_string())];
    if current {
        let keys = data.path().join("keys.toml");
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, BENCH_KEY.as_bytes());
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let file = format!(
            "[[key]]\nname = \"bench\"\nsha256 = \"{hex}\"\nscopes = [\"check\", \"write\", \"issue\", \"proxy\"]\n"
        );
        std::fs::write(&keys, file).expect("write keys");
        envs.push(("ROLECHECK_API_KEYS_FILE", keys.display().to_string()));
        *BEARER.write().expect("bearer") =
            Some(format!("Bearer {BENCH_KEY}").parse().expect("header value"));
    }
    let server = spawn(rolecheck_from(bin, data.path(), &envs));
    let conn = connect(&server.grpc).await;
    seed_small(&conn).await;
    setup_calls(&conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    let uri: http::Uri = format!("http://bench{ISSUE}").parse().expect("uri");
    let mut tokens = Vec::new();
    for i in 0..1000 {
        let issue = frame(&pb::IssueRequest { user_id: format!("h{i}"), ..Default::default() });
        let answer = unary(&conn, &uri, issue).await.expect("Issue");
        tokens.push(decode::<pb::IssueResponse>(&answer).expect("token").access_token);
    }
    let by_header: Arc<Vec<Bytes>> =
        Arc::new((0..1000).map(|i| envoy_check(("x-user-id", format!("h{i}")))).collect());
    let by_token: Arc<Vec<Bytes>> = Arc::new(
        tokens.iter().map(|t| envoy_check(("authorization", format!("Bearer {t}")))).collect(),
    );
    let mut outcomes = vec![baseline.clone()];
    let scenario = Scenario::new("ext_authz, header identity", ENVOY_CHECK, envoy_allowed, {
        let bodies = by_header.clone();
        move |i| bodies[(i % 1000) as usize].clone()
    });
    outcomes.push(load(&conn, server.pid, concurrency, scenario).await);
    let scenario =
        Scenario::new("ext_authz, RS256 bearer (1000 tokens)", ENVOY_CHECK, envoy_allowed, {
            let bodies = by_token.clone();
            move |i| bodies[(i % 1000) as usize].clone()
        });
    outcomes.push(load(&conn, server.pid, concurrency, scenario).await);
    *BEARER.write().expect("bearer") = None;
    table(
        &format!("Proxy authorization ({label}): Envoy ext_authz (gRPC), against the no-op"),
        baseline,
        &outcomes,
    );

    let nginx = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|bin| Command::new(bin).arg("-v").output().is_ok());
    let (Some(nginx), true) = (nginx, Command::new("h2load").arg("--version").output().is_ok())
    else {
        println!("\n(nginx or h2load not installed: forward-auth not measured)");
        return;
    };
    let rows = forward_auth_through_nginx(nginx, &server.http, concurrency, server.pid);
    println!(
        "\n### Proxy authorization ({label}): forward-auth through nginx, against nginx alone\n"
    );
    println!(
        "one nginx process (no workers), {concurrency} HTTP/1.1 connections (h2load --h1), the same static page; identity from x-user-id\n"
    );
    println!("| setup | requests/s | 2xx | × nginx alone | rolecheck CPU/request |");
    println!("| --- | --- | --- | --- | --- |");
    let alone = rows.first().map_or(1.0, |row| row.1);
    for (name, per_second, ok, cpu) in rows {
        println!(
            "| {name} | {} | {ok} | {:.2} | {:.1} µs |",
            thousands(per_second),
            per_second / alone,
            cpu * 1e6
        );
    }
}

/// `(setup, requests/s, 2xx answers, rolecheck CPU seconds per request)` for nginx
/// serving a static page alone, then behind `auth_request` to rolecheck's `/authz`.
fn forward_auth_through_nginx(
    nginx: &str,
    authz: &str,
    concurrency: usize,
    rolecheck_pid: u32,
) -> Vec<(&'static str, f64, u64, f64)> {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    std::fs::create_dir_all(dir.path().join("www/tenants/hot")).expect("www");
    std::fs::write(dir.path().join("www/tenants/hot/page"), "a page\n").expect("page");
    let port = |_| {
        std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
    };
    let (alone, guarded) = (port(0), port(1));
    // One process, no workers: killing it leaves nothing behind.
    let conf = format!(
        r#"master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log error;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream rolecheck {{ server {authz}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{alone};
    root {d}/www;
  }}
  server {{
    listen 127.0.0.1:{guarded};
    root {d}/www;
    location = /_rolecheck {{
      internal;
      proxy_pass http://rolecheck/authz;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Rolecheck-Key "{BENCH_KEY}";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Original-Host $host;
    }}
    location / {{
      auth_request /_rolecheck;
      auth_request_set $rc_roles $upstream_http_x_rolecheck_roles;
      add_header x-rolecheck-roles $rc_roles;
    }}
  }}
}}
"#
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let mut child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .spawn()
        .expect("start nginx");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", guarded)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let run = |port: u16| {
        let cpu_before = cpu_seconds(rolecheck_pid);
        let out = Command::new("h2load")
            .args(["--h1", "-c", &concurrency.to_string(), "-t", "1"])
            .args(["-D", &format!("{}", seconds.ceil() as u64), "--warm-up-time", "1"])
            .args(["-H", "x-user-id: h7"])
            .arg(format!("http://127.0.0.1:{port}/tenants/hot/page"))
            .output()
            .expect("h2load");
        let cpu = cpu_seconds(rolecheck_pid) - cpu_before;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let per_second = stdout
            .lines()
            .find(|l| l.starts_with("finished in"))
            .and_then(|l| l.split(", ").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let ok = stdout
            .lines()
            .find(|l| l.starts_with("status codes:"))
            .and_then(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
            .unwrap_or(0);
        let requests = per_second * (seconds.ceil() + 1.0);
        (per_second, ok, cpu / requests.max(1.0))
    };
    let (a, a_ok, a_cpu) = run(alone);
    let (g, g_ok, g_cpu) = run(guarded);
    let _ = child.kill();
    let _ = child.wait();
    vec![
        ("nginx alone (static page)", a, a_ok, a_cpu),
        ("nginx + auth_request to rolecheck /authz", g, g_ok, g_cpu),
    ]
}
