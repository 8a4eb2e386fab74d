//! Load bench: in one run, with one load generator and identical client settings (one
//! HTTP/2 connection, `BENCH_CONCURRENCY` calls in flight, `BENCH_SECONDS` per scenario),
//! measures a no-op gRPC unary call (`grpc.health.v1.Health/Check` on a tiny server of
//! this bench's own, in its own process) and rolecheck's RPCs against a `rolecheck`
//! process. Prints requests/s, p50, p99, p99.9, server CPU per request, and the ratio to
//! the no-op.
//!
//! `cargo bench --bench load`. The store is the embedded SQLite file unless
//! `BENCH_DATABASE_URL` names a Postgres database (it must exist and be empty).

use std::{
    future::Future,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use rolecheck::{pb, pb::role_check_client::RoleCheckClient, pb::tenants_client::TenantsClient};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Starts `command`, waits for the log line holding `marker`, returns the child and the
/// address after `addr=`.
fn spawn_server(mut command: Command, marker: &str) -> (Child, String) {
    let mut child =
        command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("spawn server");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("server exited").expect("read");
        if line.contains(marker) {
            break line
                .split("addr=")
                .nth(1)
                .expect("addr")
                .split_whitespace()
                .next()
                .expect("addr")
                .to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, addr)
}

/// CPU seconds (user + system) a process has used, from /proc (100 ticks per second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

struct Outcome {
    name: String,
    per_second: f64,
    latencies: Vec<Duration>,
    cpu_per_request: Duration,
    errors: u64,
}

/// Runs `call` from `concurrency` tasks for `seconds`; `pid` is the server measured.
async fn load<F, Fut>(name: &str, pid: u32, concurrency: usize, seconds: f64, call: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let call = Arc::new(call);
    // Warm up (connections, caches), then measure.
    for i in 0..200 {
        let _ = call(i).await;
    }
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut i) =
                    (Vec::new(), 0u64, t as u64 * 1_000_000_000);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if call(i).await.is_err() {
                        errors += 1;
                    }
                    latencies.push(sent.elapsed());
                    i += 1;
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await.expect("load task");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    latencies.sort_unstable();
    let count = latencies.len().max(1) as f64;
    Outcome {
        name: name.to_owned(),
        per_second: latencies.len() as f64 / elapsed,
        cpu_per_request: Duration::from_secs_f64(cpu / count),
        latencies,
        errors,
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
}

fn noop_server() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        eprintln!("noop serving addr={}", listener.local_addr().expect("addr"));
        let (_, health) = tonic_health::server::health_reporter();
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .expect("serve");
    });
}

fn main() {
    if std::env::args().any(|a| a == "--noop-server") {
        return noop_server();
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 50);
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let data = tempfile::tempdir().expect("dir");

    let mut noop_cmd = Command::new(std::env::current_exe().expect("exe"));
    noop_cmd.arg("--noop-server");
    let (mut noop, noop_addr) = spawn_server(noop_cmd, "noop serving");

    let mut rc_cmd = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    rc_cmd
        .env("ROLECHECK_LISTEN", "127.0.0.1:0")
        .env("ROLECHECK_HTTP_LISTEN", "127.0.0.1:0")
        .env("ROLECHECK_DATA_DIR", data.path())
        .env("RUST_LOG", "info");
    if let Ok(url) = std::env::var("BENCH_DATABASE_URL") {
        rc_cmd.env("ROLECHECK_DATABASE_URL", url);
    }
    let (mut server, rc_addr) = spawn_server(rc_cmd, "serving gRPC");
    let pid = server.id();

    let noop_channel = connect(&noop_addr).await;
    let channel = connect(&rc_addr).await;
    let checks = RoleCheckClient::new(channel.clone());
    let mut tenants = TenantsClient::new(channel.clone());

    // Data: 1000 hot users with a role in "hot"; one user in 50 tenants.
    tenants
        .create_tenant(pb::CreateTenantRequest { tenant_id: "hot".into(), name: "Hot".into() })
        .await
        .expect("tenant");
    for u in 0..1000 {
        let grant = pb::GrantRequest {
            user_id: format!("u{u}"),
            tenant_id: "hot".into(),
            roles: vec!["viewer".into()],
            expires_at: None,
        };
        checks.clone().grant(grant).await.expect("grant");
    }
    for t in 0..50 {
        let id = format!("t{t:02}");
        tenants
            .create_tenant(pb::CreateTenantRequest { tenant_id: id.clone(), name: id.clone() })
            .await
            .expect("tenant");
        let grant = pb::GrantRequest {
            user_id: "wide".into(),
            tenant_id: id,
            roles: vec!["admin".into(), "viewer".into()],
            expires_at: None,
        };
        checks.clone().grant(grant).await.expect("grant");
    }

    let noop_pid = noop.id();
    let mut outcomes = Vec::new();
    let health = HealthClient::new(noop_channel);
    outcomes.push(
        load("no-op (health Check)", noop_pid, concurrency, seconds, move |_| {
            let mut health = health.clone();
            async move { health.check(HealthCheckRequest { service: String::new() }).await.map(|_| ()) }
        })
        .await,
    );
    let c = checks.clone();
    outcomes.push(
        load("Check (cached, 1000 hot users)", pid, concurrency, seconds, move |i| {
            let mut c = c.clone();
            let req = pb::CheckRequest {
                user_id: format!("u{}", i % 1000),
                tenant_id: "hot".into(),
                role: "viewer".into(),
                min_revision: 0,
            };
            async move { c.check(req).await.map(|_| ()) }
        })
        .await,
    );
    let c = checks.clone();
    outcomes.push(
        load("CheckBatch of 100 (cached)", pid, concurrency, seconds, move |i| {
            let mut c = c.clone();
            let checks = (0..100)
                .map(|k| pb::CheckRequest {
                    user_id: format!("u{}", (i + k) % 1000),
                    tenant_id: "hot".into(),
                    role: "viewer".into(),
                    min_revision: 0,
                })
                .collect();
            async move {
                c.check_batch(pb::CheckBatchRequest { checks, min_revision: 0 }).await.map(|_| ())
            }
        })
        .await,
    );
    let c = checks.clone();
    outcomes.push(
        load("GetAuthorization (50 tenants)", pid, concurrency, seconds, move |_| {
            let mut c = c.clone();
            async move {
                c.get_authorization(pb::GetAuthorizationRequest {
                    user_id: "wide".into(),
                    min_revision: 0,
                })
                .await
                .map(|_| ())
            }
        })
        .await,
    );
    let c = checks.clone();
    outcomes.push(
        load("Issue (RS256, generated key)", pid, concurrency, seconds, move |i| {
            let mut c = c.clone();
            let req = pb::IssueRequest { user_id: format!("u{}", i % 1000), ..Default::default() };
            async move { c.issue(req).await.map(|_| ()) }
        })
        .await,
    );
    let c = checks.clone();
    outcomes.push(
        load("Grant (new user each call)", pid, concurrency, seconds, move |i| {
            let mut c = c.clone();
            let req = pb::GrantRequest {
                user_id: format!("g{i}"),
                tenant_id: "hot".into(),
                roles: vec!["viewer".into()],
                expires_at: None,
            };
            async move { c.grant(req).await.map(|_| ()) }
        })
        .await,
    );

    let baseline = outcomes[0].per_second;
    let base_cpu = outcomes[0].cpu_per_request.as_secs_f64();
    println!(
        "{} s per scenario, {concurrency} calls in flight on one connection; server and client share this machine",
        seconds
    );
    println!(
        "{:<32} {:>10} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8} {:>6}",
        "scenario", "req/s", "p50", "p99", "p99.9", "cpu/req", "x no-op", "cpu x", "errors"
    );
    for o in &outcomes {
        println!(
            "{:<32} {:>10.0} {:>9.3?} {:>9.3?} {:>9.3?} {:>10.2?} {:>8.2} {:>8.2} {:>6}",
            o.name,
            o.per_second,
            pct(&o.latencies, 0.50),
            pct(&o.latencies, 0.99),
            pct(&o.latencies, 0.999),
            o.cpu_per_request,
            o.per_second / baseline,
            o.cpu_per_request.as_secs_f64() / base_cpu,
            o.errors
        );
    }
    let _ = server.kill();
    let _ = noop.kill();
}
