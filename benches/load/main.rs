//! Load bench: in one run, with one load generator and identical client settings, measures
//! a no-op gRPC unary call (`grpc.health.v1.Health/Check` on a tiny server of this bench's
//! own, in its own process) and rolecheck's RPCs against `rolecheck` processes. Prints
//! calls/s, p50, p99, p99.9, server CPU per call (from `/proc`), and the ratios to the
//! no-op, as Markdown tables.
//!
//! The load generator is a bare HTTP/2 client (the `h2` crate, as `h2load` is one for
//! nghttp2): one connection, `BENCH_CONCURRENCY` (50) streams in flight, request bodies
//! encoded before the clock starts where they are fixed, every answer's `grpc-status`
//! checked and its message decoded and verified (a Check must say allowed). When `h2load`
//! is installed, the fixed-body scenarios are also run through it as a cross-check that
//! the generator is not the bottleneck.
//!
//! Phases:
//! 1. the embedded SQLite store: no-op, cached Check, CheckBatch of 100, GetAuthorization
//!    over 50 tenants, Issue with each key type, Grant; then the model
//!    (`BENCH_SKIP_MODEL` skips it): Check and CheckBatch by permission against by role,
//!    in alternating rounds (`load/model.rs`);
//! 2. when `BENCH_DATABASE_URL` names a Postgres server (an admin URL; the bench creates
//!    and drops `rolecheck_bench_*` databases there), for each size in `BENCH_SIZES`
//!    (memberships; default `10000,1000000`): a dataset loaded with COPY, then cache-miss
//!    Check (every user once), resident memory with the dataset cached, cached Check,
//!    Check spread over the whole dataset, CheckBatch of 100, Grant. With
//!    `BENCH_COMPARE_BIN` (the path of another build's `rolecheck`, say the previous
//!    commit's), each size runs first on that binary, then on this build's, against the
//!    same no-op: before and after in one run;
//! 3. proxy authorization (`BENCH_SKIP_AUTHZ` skips it): Envoy ext_authz with header
//!    identity and with RS256 bearer tokens, and forward-auth through nginx against nginx
//!    alone (when nginx and h2load are installed); then AuthZEN (`BENCH_SKIP_AUTHZEN`
//!    skips it): an evaluation over HTTP/1.1 keep-alive against a gRPC Check, and
//!    evaluations of 100 against a CheckBatch of 100, in rounds (`BENCH_AUTHZEN_ROUNDS`,
//!    2) whose order flips (`load/authzen.rs`);
//!    Then bulk import (`BENCH_SKIP_IMPORT` skips it): a million memberships through
//!    `rolecheck import` into Postgres and the embedded store, against SetRoles calls and
//!    Postgres's own COPY (`load/import.rs`);
//! 4. with `BENCH_FOLLOWERS` (e.g. `1,10,50,100`) and a Postgres: two upstream replicas
//!    and that many followers: Postgres connections, revoke-to-deny latency across every
//!    follower, follower RSS and start-to-ready per step, then a follower's cached Check.
//!
//! 5. with `BENCH_ROLLOUT` (e.g. `20`) and a Postgres: one upstream whose cache holds 5000
//!    active users, then a rollout of that many followers started at once, cold
//!    (`--warm-users 0`) and warm: calls reaching the upstream before the followers are
//!    ready and while they take their first Checks (every active user once on each).
//!
//! 6. with `BENCH_TAIL` (e.g. `3`) rounds: the tail, side by side. h2load (1 connection,
//!    `BENCH_CONCURRENCY` streams, one fixed body) alternates the no-op, a cached Check
//!    on a central server (embedded store) and a cached Check on a follower of it, each
//!    round; with `BENCH_PERF=DIR`, `perf record` samples each server during its first
//!    round into `DIR/central.data` and `DIR/follower.data`.
//!
//!    With `BENCH_PGBOUNCER`, each size also runs on this build through a real PgBouncer
//!    in transaction mode (`--database-pool-mode transaction`), against direct above it.
//!    With `BENCH_STANDBY`, each size also runs on this build over a throwaway primary
//!    and a streaming standby of it (`tests/support/standby.rs`): misses from the primary,
//!    then from the standby (`--read-database-url`).
//! 7. with `BENCH_AB` (e.g. `12`) rounds, `BENCH_COMPARE_BIN` and a Postgres: before and
//!    after interleaved, a cached Check on a central server and on a follower of each
//!    build, the order flipping every round (`load/ab.rs`); `BENCH_AB_SECONDS` (3) each.
//!
//! `scripts/bench` runs it all; `BENCH_SECONDS` (5) sets each time-bound scenario's length.

use std::{
    io::{Read, Write},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

mod ab;
mod authz;
mod authzen;
mod fleet;
mod followers;
mod import;
mod model;
#[path = "../../tests/support/pgbouncer.rs"]
mod pgbouncer;
mod postgres;
mod rollout;
mod sqlite;
mod tail;

#[path = "../../tests/support/spawned.rs"]
mod spawned;
use spawned::{Server, spawn};

// Shared with the tests, whose failover helpers the bench does not use.
#[allow(dead_code)]
#[path = "../../tests/support/standby.rs"]
mod standby;

use pgbouncer::Bouncer;

/// How a Postgres phase's server reaches its database.
#[derive(Clone, Copy)]
enum Via<'a> {
    Direct,
    PgBouncer(&'a Bouncer),
    Standby(&'a standby::Pair),
}

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use prost::Message;
use rolecheck::{
    pb,
    token::{KeyKind, SigningKey},
};
use sqlx::{Connection, PgConnection};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// The load generator.

/// One HTTP/2 connection with large flow-control windows, driven by its own task.
async fn connect(addr: &str) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake(tcp)
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// A protobuf message in a gRPC length-prefixed frame.
fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message.encode(&mut buf).expect("encode");
    buf.freeze()
}

/// The `authorization` every call sends while a phase runs against a server with keys.
static BEARER: std::sync::RwLock<Option<http::HeaderValue>> = std::sync::RwLock::new(None);

/// One gRPC unary call; the response message's bytes when `grpc-status` is 0.
async fn unary(conn: &SendRequest<Bytes>, uri: &http::Uri, body: Bytes) -> Result<Bytes, String> {
    let mut send = conn.clone().ready().await.map_err(|e| e.to_string())?;
    let mut request = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .expect("request");
    if let Some(bearer) = BEARER.read().ok().and_then(|b| b.clone()) {
        request.headers_mut().insert(http::header::AUTHORIZATION, bearer);
    }
    let (response, mut stream) = send.send_request(request, false).map_err(|e| e.to_string())?;
    stream.send_data(body, true).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP {}", response.status()));
    }
    let status = |headers: &http::HeaderMap| -> Result<(), String> {
        match headers.get("grpc-status") {
            Some(code) if code == "0" => Ok(()),
            Some(code) => Err(format!(
                "grpc-status {code:?}: {:?}",
                headers.get("grpc-message").map(|m| String::from_utf8_lossy(m.as_bytes()))
            )),
            None => Err("no grpc-status".into()),
        }
    };
    if response.headers().contains_key("grpc-status") {
        // Trailers-only: an error (or an empty answer, which no RPC here gives).
        status(response.headers())?;
        return Err("trailers-only success".into());
    }
    let mut body = response.into_body();
    let mut message = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    status(&trailers.ok_or("no trailers")?)?;
    if message.len() < 5 {
        return Err("short response".into());
    }
    Ok(message.freeze().split_off(5))
}

type Verify = fn(&[u8]) -> Result<(), String>;

/// What a scenario sends and how it checks each answer.
struct Scenario {
    name: String,
    /// The gRPC method path.
    path: &'static str,
    /// The `i`-th call's framed request body.
    body: Box<dyn Fn(u64) -> Bytes + Send + Sync>,
    verify: Verify,
    /// Answers per call (checks in a batch).
    items: u64,
    /// At most this many calls (`i` runs from 0); the scenario also ends at its deadline.
    limit: u64,
    seconds: f64,
}

impl Scenario {
    fn new(
        name: impl Into<String>,
        path: &'static str,
        verify: Verify,
        body: impl Fn(u64) -> Bytes + Send + Sync + 'static,
    ) -> Self {
        Scenario {
            name: name.into(),
            path,
            body: Box::new(body),
            verify,
            items: 1,
            limit: u64::MAX,
            seconds: env_or("BENCH_SECONDS", 5.0),
        }
    }

    /// The same body for every call: encoded once, before the clock starts.
    fn fixed(name: impl Into<String>, path: &'static str, verify: Verify, body: Bytes) -> Self {
        Self::new(name, path, verify, move |_| body.clone())
    }
}

#[derive(Clone)]
struct Outcome {
    name: String,
    calls: u64,
    per_second: f64,
    items_per_second: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    cpu_per_call: Duration,
    errors: u64,
    first_error: Option<String>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

/// CPU seconds (user + system) a process has used, from /proc (100 ticks per second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of a process, in MiB, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Runs `scenario` on `conn` from `concurrency` tasks; `pid` is the server measured.
async fn load(
    conn: &SendRequest<Bytes>,
    pid: u32,
    concurrency: usize,
    scenario: Scenario,
) -> Outcome {
    let uri: http::Uri = format!("http://bench{}", scenario.path).parse().expect("uri");
    if scenario.name != "setup" {
        // For profilers attached from outside: which process runs what, from now on.
        eprintln!("scenario starting: {} (server pid {pid})", scenario.name);
    }
    let scenario = Arc::new(scenario);
    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(scenario.seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (conn, uri, scenario, next) =
                (conn.clone(), uri.clone(), scenario.clone(), next.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0u64, None);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= scenario.limit || Instant::now() >= deadline {
                        break;
                    }
                    let body = (scenario.body)(i);
                    let sent = Instant::now();
                    let answer = unary(&conn, &uri, body).await;
                    latencies.push(sent.elapsed());
                    if let Err(e) = answer.and_then(|m| (scenario.verify)(&m)) {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    summarize(&scenario.name, scenario.items, tasks, (started, pid, cpu_before)).await
}

/// What one load task saw: each call's latency, the errors, and the first one.
type TaskResult = (Vec<Duration>, u64, Option<String>);

/// The outcome of `tasks` (each answering `items` per call) started at `started`, with
/// the CPU server `pid` used since `cpu_before`: the one harness every load shares.
async fn summarize(
    name: &str,
    items: u64,
    tasks: Vec<tokio::task::JoinHandle<TaskResult>>,
    (started, pid, cpu_before): (Instant, u32, f64),
) -> Outcome {
    let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
    for task in tasks {
        let (l, e, f) = task.await.expect("load task");
        latencies.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    latencies.sort_unstable();
    let calls = latencies.len() as u64;
    let per_second = calls as f64 / elapsed;
    Outcome {
        name: name.to_owned(),
        calls,
        per_second,
        items_per_second: per_second * items as f64,
        p50: pct(&latencies, 0.50),
        p99: pct(&latencies, 0.99),
        p999: pct(&latencies, 0.999),
        cpu_per_call: Duration::from_secs_f64(cpu / calls.max(1) as f64),
        errors,
        first_error,
    }
}

/// The same fixed-body scenario driven by `h2load` (one connection, the same streams in
/// flight), when it is installed. Every answer's `grpc-status` is checked by comparing the
/// server's OK count before and after (`ok_count`), or skipped for the no-op.
fn h2load(
    addr: &str,
    pid: u32,
    concurrency: usize,
    name: &str,
    path: &str,
    body: &Bytes,
) -> Option<Outcome> {
    let dir = tempfile::tempdir().ok()?;
    let (body_file, log_file) = (dir.path().join("body"), dir.path().join("log"));
    std::fs::write(&body_file, body).ok()?;
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let cpu_before = cpu_seconds(pid);
    let output = Command::new("h2load")
        .args(["-c", "1", "-t", "1", "-m", &concurrency.to_string()])
        .args(["-D", &format!("{}", seconds.ceil() as u64), "--warm-up-time", "1"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&body_file)
        .arg(format!("--log-file={}", log_file.display()))
        .arg(format!("http://{addr}{path}"))
        .output()
        .ok()?;
    // The warm-up second is not in the log; CPU is measured over both, so scale it.
    let cpu = cpu_seconds(pid) - cpu_before;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log = std::fs::read_to_string(&log_file).ok()?;
    let mut latencies = Vec::new();
    let (mut errors, mut unanswered) = (0_u64, 0_u64);
    let mut first_error = None;
    for line in log.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        match cols.get(1) {
            Some(&"200") => {}
            // No response: a stream h2load abandons when its time is up (at most one per
            // stream in flight; more count as errors below). Not a latency either.
            Some(&"0") => {
                unanswered += 1;
                continue;
            }
            status => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("h2load logged HTTP status {status:?}"));
            }
        }
        if let Some(us) = cols.get(2).and_then(|v| v.parse::<u64>().ok()) {
            latencies.push(Duration::from_micros(us));
        }
    }
    if unanswered > concurrency as u64 {
        errors += unanswered;
        first_error.get_or_insert_with(|| format!("{unanswered} streams without a response"));
    }
    latencies.sort_unstable();
    let calls = latencies.len() as u64;
    let per_second = stdout
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let measured_share = seconds.ceil() / (seconds.ceil() + 1.0);
    Some(Outcome {
        name: format!("{name} [h2load]"),
        calls,
        per_second,
        items_per_second: per_second,
        p50: pct(&latencies, 0.50),
        p99: pct(&latencies, 0.99),
        p999: pct(&latencies, 0.999),
        cpu_per_call: Duration::from_secs_f64(cpu * measured_share / calls.max(1) as f64),
        errors,
        first_error,
    })
}

// ---------------------------------------------------------------------------------------
// Verifying answers.

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, String> {
    M::decode(bytes).map_err(|e| e.to_string())
}

fn serving(bytes: &[u8]) -> Result<(), String> {
    let answer: tonic_health::pb::HealthCheckResponse = decode(bytes)?;
    (answer.status == 1).then_some(()).ok_or_else(|| "not serving".into())
}

fn allowed(bytes: &[u8]) -> Result<(), String> {
    let answer: pb::CheckResponse = decode(bytes)?;
    answer.allowed.then_some(()).ok_or_else(|| "denied".into())
}

fn all_allowed(bytes: &[u8]) -> Result<(), String> {
    let answer: pb::CheckBatchResponse = decode(bytes)?;
    (answer.results.len() == 100 && answer.results.iter().all(|r| r.allowed))
        .then_some(())
        .ok_or_else(|| "not 100 allowed".into())
}

fn fifty_tenants(bytes: &[u8]) -> Result<(), String> {
    let answer: pb::GetAuthorizationResponse = decode(bytes)?;
    (answer.authorization.len() == 50).then_some(()).ok_or_else(|| "not 50 tenants".into())
}

fn token(bytes: &[u8]) -> Result<(), String> {
    let answer: pb::IssueResponse = decode(bytes)?;
    (answer.access_token.split('.').count() == 3).then_some(()).ok_or_else(|| "no JWT".into())
}

fn revision(bytes: &[u8]) -> Result<(), String> {
    let answer: pb::GrantResponse = decode(bytes)?;
    (answer.revision > 0).then_some(()).ok_or_else(|| "no revision".into())
}

const CHECK: &str = "/rolecheck.v1.RoleCheck/Check";
const CHECK_BATCH: &str = "/rolecheck.v1.RoleCheck/CheckBatch";
const GRANT: &str = "/rolecheck.v1.RoleCheck/Grant";
const ISSUE: &str = "/rolecheck.v1.RoleCheck/Issue";
const GET_AUTHORIZATION: &str = "/rolecheck.v1.RoleCheck/GetAuthorization";
const CREATE_TENANT: &str = "/rolecheck.v1.Tenants/CreateTenant";
const HEALTH: &str = "/grpc.health.v1.Health/Check";

fn check(user: String, tenant: String, role: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        user_id: user,
        tenant_id: tenant,
        role: role.into(),
        min_revision: 0,
        permission: String::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Servers.

fn rolecheck(data_dir: &Path, envs: &[(&str, String)]) -> Command {
    rolecheck_from(Path::new(env!("CARGO_BIN_EXE_rolecheck")), data_dir, envs)
}

/// [`rolecheck`] from the binary at `bin`.
fn rolecheck_from(bin: &Path, data_dir: &Path, envs: &[(&str, String)]) -> Command {
    let mut command = Command::new(bin);
    command
        .env("ROLECHECK_LISTEN", "127.0.0.1:0")
        .env("ROLECHECK_HTTP_LISTEN", "127.0.0.1:0")
        .env("ROLECHECK_DATA_DIR", data_dir)
        // Long enough that nothing expires while a dataset is being warmed and measured.
        .env("ROLECHECK_CACHE_TTL", "30m")
        .env("RUST_LOG", "warn,rolecheck::server=info");
    for (key, value) in envs {
        command.env(key, value);
    }
    command
}

fn noop_server() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        eprintln!("noop serving gRPC addr={}", listener.local_addr().expect("addr"));
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

/// One sample of a Prometheus text metric (summed over its label sets matching `filter`).
fn metric(http_addr: &str, name: &str, filter: &str) -> f64 {
    let mut stream = std::net::TcpStream::connect(http_addr).expect("metrics");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `call` once per `i` in `0..n`, `concurrency` at a time; panics on any error.
async fn setup_calls(
    conn: &SendRequest<Bytes>,
    n: u64,
    concurrency: usize,
    path: &'static str,
    body: impl Fn(u64) -> Bytes + Send + Sync + 'static,
) {
    let mut scenario = Scenario::new("setup", path, |_| Ok(()), body);
    scenario.limit = n;
    scenario.seconds = 3600.0;
    let outcome = load(conn, std::process::id(), concurrency, scenario).await;
    assert_eq!(outcome.errors, 0, "setup {path}: {:?}", outcome.first_error);
    assert_eq!(outcome.calls, n, "setup {path}");
}

fn grant(user: String, tenant: String, role: &str) -> Bytes {
    frame(&pb::GrantRequest {
        user_id: user,
        tenant_id: tenant,
        roles: vec![role.to_owned()],
        expires_at: None,
    })
}

fn create_tenant(id: String) -> Bytes {
    frame(&pb::CreateTenantRequest { name: id.clone(), tenant_id: id })
}

/// On a fresh store: tenant "hot" with 1000 viewers `h0..h999`; "wide" in 50 tenants.
async fn seed_small(conn: &SendRequest<Bytes>) {
    setup_calls(conn, 1, 1, CREATE_TENANT, |_| create_tenant("hot".into())).await;
    setup_calls(conn, 1000, 8, GRANT, |i| grant(format!("h{i}"), "hot".into(), "viewer")).await;
    setup_calls(conn, 50, 1, CREATE_TENANT, |i| create_tenant(format!("w{i:02}"))).await;
    setup_calls(conn, 50, 1, GRANT, |i| grant("wide".into(), format!("w{i:02}"), "admin")).await;
}

fn hot_check(i: u64) -> pb::CheckRequest {
    check(format!("h{}", i % 1000), "hot".into(), "viewer")
}

// ---------------------------------------------------------------------------------------
// The Postgres dataset.

/// Memberships per user in a generated dataset.
const PER_USER: u64 = 5;

/// The shape of a generated dataset of `memberships` memberships: `users` users
/// (`user-<n>`), each with a role in `PER_USER` of `tenants` tenants (`tenant-<n>`),
/// "viewer" in the first (tenant `u % tenants`), alternating "editor"/"viewer" after.
#[derive(Clone, Copy)]
struct Dataset {
    users: u64,
    tenants: u64,
}

impl Dataset {
    fn new(memberships: u64) -> Self {
        let users = (memberships / PER_USER).max(1);
        Dataset { users, tenants: (memberships / 1000).max(10) }
    }

    fn tenant_of(&self, user: u64, k: u64) -> u64 {
        (user + k * (self.tenants / PER_USER)) % self.tenants
    }

    /// A Check that the dataset allows: the user's first tenant, as viewer.
    fn allowed_check(&self, user: u64) -> pb::CheckRequest {
        check(user_id(user), tenant_id(self.tenant_of(user, 0)), "viewer")
    }
}

fn user_id(u: u64) -> String {
    format!("user-{u:08}")
}

fn tenant_id(t: u64) -> String {
    format!("tenant-{t:06}")
}

/// Loads `dataset` into the empty, migrated database at `url` with COPY, then vacuums it.
/// Foreign-key
/// triggers are skipped for the load (`session_replication_role = replica`): every
/// membership names a tenant loaded first, by construction.
async fn generate(url: &str, dataset: Dataset) -> Duration {
    let started = Instant::now();
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut conn)
        .await
        .expect("replica role");
    let mut copy = conn
        .copy_in_raw("COPY tenants (tenant_id, name, created_at) FROM STDIN")
        .await
        .expect("copy tenants");
    let mut rows = String::new();
    for t in 0..dataset.tenants {
        rows.push_str(&format!("{id}\t{id}\t0\n", id = tenant_id(t)));
    }
    copy.send(rows.into_bytes()).await.expect("send");
    copy.finish().await.expect("finish");

    let mut copy = conn
        .copy_in_raw("COPY memberships (tenant_id, user_id, role, expires_at) FROM STDIN")
        .await
        .expect("copy memberships");
    let mut chunk = Vec::with_capacity(1 << 20);
    for u in 0..dataset.users {
        for k in 0..PER_USER {
            let role = if k % 2 == 0 { "viewer" } else { "editor" };
            writeln!(chunk, "{}\t{}\t{role}\t\\N", tenant_id(dataset.tenant_of(u, k)), user_id(u))
                .expect("write");
        }
        if chunk.len() > (1 << 20) - 256 {
            copy.send(std::mem::replace(&mut chunk, Vec::with_capacity(1 << 20)))
                .await
                .expect("send");
        }
    }
    copy.send(chunk).await.expect("send");
    copy.finish().await.expect("finish");
    // Vacuum now (visibility map, statistics) so autovacuum does not start on the fresh
    // rows while the scenarios run.
    sqlx::query("VACUUM (ANALYZE) tenants, memberships").execute(&mut conn).await.expect("vacuum");
    started.elapsed()
}

/// Creates (or re-creates) the database `name` on the server at `admin_url`.
async fn fresh_database(admin_url: &str, name: &str) -> String {
    let mut admin = PgConnection::connect(admin_url).await.expect("admin connect");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create");
    let (base, _) = admin_url.rsplit_once('/').expect("url with a database");
    format!("{base}/{name}")
}

// ---------------------------------------------------------------------------------------
// Reporting.

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn table(title: &str, baseline: &Outcome, outcomes: &[Outcome]) {
    println!("\n### {title}\n");
    println!(
        "| scenario | calls/s | answers/s | p50 | p99 | p99.9 | server CPU/call | × no-op calls/s | × no-op CPU | errors |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for o in outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} µs | {:.2} | {:.2} | {} |",
            o.name,
            thousands(o.per_second),
            thousands(o.items_per_second),
            ms(o.p50),
            ms(o.p99),
            ms(o.p999),
            o.cpu_per_call.as_secs_f64() * 1e6,
            o.per_second / baseline.per_second,
            o.cpu_per_call.as_secs_f64() / baseline.cpu_per_call.as_secs_f64(),
            o.errors
        );
        if let Some(e) = &o.first_error {
            println!("|   first error: {e} | | | | | | | | | |");
        }
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    if std::env::args().any(|a| a == "--noop-server") {
        return noop_server();
    }
    // The generator runs on one thread, as h2load does, leaving the other core to servers.
    let threads: usize = env_or("BENCH_CLIENT_THREADS", 1);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 50);
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    println!(
        "# rolecheck load bench\n\none HTTP/2 connection, {concurrency} calls in flight, {seconds} s per \
         time-bound scenario; server, load generator and Postgres share this machine"
    );

    let mut noop_cmd = Command::new(std::env::current_exe().expect("exe"));
    noop_cmd.arg("--noop-server");
    let noop = spawn(noop_cmd);
    let noop_conn = connect(&noop.grpc).await;
    let health = frame(&tonic_health::pb::HealthCheckRequest { service: String::new() });
    setup_calls(&noop_conn, 1000, concurrency, HEALTH, {
        let health = health.clone();
        move |_| health.clone()
    })
    .await;
    let baseline = load(
        &noop_conn,
        noop.pid,
        concurrency,
        Scenario::fixed("no-op (health Check)", HEALTH, serving, health.clone()),
    )
    .await;

    if std::env::var_os("BENCH_SKIP_SQLITE").is_none() {
        sqlite::sqlite_phase(&noop, &health, concurrency, &baseline).await;
    }
    if std::env::var_os("BENCH_SKIP_MODEL").is_none() {
        model::model_phase(concurrency, &baseline).await;
    }
    if std::env::var_os("BENCH_SKIP_AUTHZ").is_none() {
        authz::authz_phase(concurrency, &baseline).await;
    }
    if std::env::var_os("BENCH_SKIP_AUTHZEN").is_none() {
        authzen::authzen_phase(concurrency, &baseline).await;
    }
    if std::env::var_os("BENCH_SKIP_IMPORT").is_none() {
        import::import_phase(std::env::var("BENCH_DATABASE_URL").ok().as_deref()).await;
    }
    let followers: Vec<usize> = env_or("BENCH_FOLLOWERS", String::new())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    if let (Ok(admin_url), false) = (std::env::var("BENCH_DATABASE_URL"), followers.is_empty()) {
        // With `BENCH_COMPARE_BIN`, that build's tier first, then this one's.
        let mut builds = Vec::new();
        if let Some(other) = std::env::var_os("BENCH_COMPARE_BIN") {
            builds.push((std::path::PathBuf::from(other), "before: BENCH_COMPARE_BIN"));
        }
        builds.push((env!("CARGO_BIN_EXE_rolecheck").into(), "this build"));
        for (bin, label) in &builds {
            followers::followers_phase(
                &admin_url,
                &followers,
                concurrency,
                &baseline,
                (bin, label),
            )
            .await;
        }
    }
    let ab_rounds: usize = env_or("BENCH_AB", 0);
    if let (Ok(admin_url), Some(before), true) =
        (std::env::var("BENCH_DATABASE_URL"), std::env::var_os("BENCH_COMPARE_BIN"), ab_rounds > 0)
    {
        let noop = (&noop, &noop_conn, &health);
        ab::ab_phase(&admin_url, Path::new(&before), ab_rounds, concurrency, noop).await;
    }
    let tail_rounds: usize = env_or("BENCH_TAIL", 0);
    if tail_rounds > 0 {
        tail::tail_phase(&noop, &health, concurrency, tail_rounds).await;
    }
    let fleet: usize = env_or("BENCH_FLEET", 0);
    if let (Ok(admin_url), true) = (std::env::var("BENCH_DATABASE_URL"), fleet > 0) {
        fleet::fleet_phase(&admin_url, fleet).await;
    }
    let rollout: usize = env_or("BENCH_ROLLOUT", 0);
    if let (Ok(admin_url), true) = (std::env::var("BENCH_DATABASE_URL"), rollout > 0) {
        rollout::rollout_phase(&admin_url, rollout, concurrency).await;
    }
    if let Ok(admin_url) = std::env::var("BENCH_DATABASE_URL") {
        let sizes: String = env_or("BENCH_SIZES", "10000,1000000".to_owned());
        let mut bins = Vec::new();
        if let Some(other) = std::env::var_os("BENCH_COMPARE_BIN") {
            bins.push((std::path::PathBuf::from(other), "before: BENCH_COMPARE_BIN"));
        }
        bins.push((env!("CARGO_BIN_EXE_rolecheck").into(), "this build"));
        // With `BENCH_PGBOUNCER`, this build again through PgBouncer in transaction mode.
        let pooler = std::env::var_os("BENCH_PGBOUNCER").map(|_| Bouncer::start(&admin_url, ""));
        // With `BENCH_STANDBY`, this build on a throwaway primary, without and with a hot
        // standby of it answering misses.
        let pair = match std::env::var_os("BENCH_STANDBY") {
            Some(_) => Some(
                tokio::task::spawn_blocking(standby::Pair::start).await.expect("primary, standby"),
            ),
            None => None,
        };
        let this = Path::new(env!("CARGO_BIN_EXE_rolecheck"));
        let mut scaling = Vec::new();
        for size in sizes.split(',').filter_map(|s| s.trim().parse::<u64>().ok()) {
            for (bin, label) in &bins {
                let build = (bin.as_path(), *label, Via::Direct);
                let row = postgres::postgres_phase(&admin_url, build, size, concurrency, &baseline);
                scaling.push(row.await);
            }
            if let Some(pooler) = &pooler {
                let label = "this build, through PgBouncer (transaction mode)";
                let build = (this, label, Via::PgBouncer(pooler));
                let row = postgres::postgres_phase(&admin_url, build, size, concurrency, &baseline);
                scaling.push(row.await);
            }
            if let Some(pair) = &pair {
                let primary = pair.primary_url("postgres");
                let label = "this build, on a primary with a standby, misses from the primary";
                let build = (this, label, Via::Direct);
                scaling.push(
                    postgres::postgres_phase(&primary, build, size, concurrency, &baseline).await,
                );
                let label = "this build, misses from the standby (--read-database-url)";
                let build = (this, label, Via::Standby(pair));
                scaling.push(
                    postgres::postgres_phase(&primary, build, size, concurrency, &baseline).await,
                );
            }
        }
        println!("\n### How cost grows with the dataset (Postgres)\n");
        println!(
            "| memberships | binary | load (COPY) | cache-miss Check calls/s | miss p50 | miss p99 | cached Check calls/s | cached p50 | cached p99 | spread Check calls/s | spread hit ratio | RSS at start | RSS warmed | users cached |"
        );
        println!(
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for row in &scaling {
            println!("{row}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared by the follower phases.

const REVOKE: &str = "/rolecheck.v1.RoleCheck/Revoke";

/// `GET path` on `addr`: the HTTP status, if anything answered.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

fn pct_ms(sorted: &[Duration], p: f64) -> String {
    ms(pct(sorted, p))
}
