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
//!    over 50 tenants, Issue with each key type, Grant;
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
//!    alone (when nginx and h2load are installed);
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
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

mod ab;
#[path = "../../tests/support/pgbouncer.rs"]
mod pgbouncer;

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
        name: scenario.name.clone(),
        calls,
        per_second,
        items_per_second: per_second * scenario.items as f64,
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
    pb::CheckRequest { user_id: user, tenant_id: tenant, role: role.into(), min_revision: 0 }
}

// ---------------------------------------------------------------------------------------
// Servers.

struct Server {
    child: Child,
    pid: u32,
    grpc: String,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` and waits for its "serving gRPC" log line.
fn spawn(mut command: Command) -> Server {
    let mut child =
        command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("spawn server");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let field = |line: &str, key: &str| {
        line.split(key).nth(1).and_then(|v| v.split_whitespace().next()).map(str::to_owned)
    };
    let mut http = String::new();
    let grpc = loop {
        let line = lines.next().expect("server exited before serving").expect("read");
        if let Some(addr) = field(&line, "http_addr=") {
            http = addr;
        }
        if line.contains("serving gRPC") {
            break field(&line, "addr=").expect("addr");
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Server { pid: child.id(), child, grpc, http }
}

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
        sqlite_phase(&noop, &health, concurrency, &baseline).await;
    }
    if std::env::var_os("BENCH_SKIP_AUTHZ").is_none() {
        authz_phase(concurrency, &baseline).await;
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
            followers_phase(&admin_url, &followers, concurrency, &baseline, (bin, label)).await;
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
        tail_phase(&noop, &health, concurrency, tail_rounds).await;
    }
    let fleet: usize = env_or("BENCH_FLEET", 0);
    if let (Ok(admin_url), true) = (std::env::var("BENCH_DATABASE_URL"), fleet > 0) {
        fleet_phase(&admin_url, fleet).await;
    }
    let rollout: usize = env_or("BENCH_ROLLOUT", 0);
    if let (Ok(admin_url), true) = (std::env::var("BENCH_DATABASE_URL"), rollout > 0) {
        rollout_phase(&admin_url, rollout, concurrency).await;
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
                let row = postgres_phase(&admin_url, build, size, concurrency, &baseline);
                scaling.push(row.await);
            }
            if let Some(pooler) = &pooler {
                let label = "this build, through PgBouncer (transaction mode)";
                let build = (this, label, Via::PgBouncer(pooler));
                let row = postgres_phase(&admin_url, build, size, concurrency, &baseline);
                scaling.push(row.await);
            }
            if let Some(pair) = &pair {
                let primary = pair.primary_url("postgres");
                let label = "this build, on a primary with a standby, misses from the primary";
                let build = (this, label, Via::Direct);
                scaling.push(postgres_phase(&primary, build, size, concurrency, &baseline).await);
                let label = "this build, misses from the standby (--read-database-url)";
                let build = (this, label, Via::Standby(pair));
                scaling.push(postgres_phase(&primary, build, size, concurrency, &baseline).await);
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

/// The embedded SQLite store with small data, then the h2load cross-check.
async fn sqlite_phase(noop: &Server, health: &Bytes, concurrency: usize, baseline: &Outcome) {
    // Phase 1: the embedded SQLite store.
    let data = tempfile::tempdir().expect("dir");
    let server = spawn(rolecheck(data.path(), &[]));
    let conn = connect(&server.grpc).await;
    seed_small(&conn).await;
    setup_calls(&conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    let mut scenarios = Vec::new();
    let one_check = frame(&hot_check(7));
    scenarios.push(Scenario::fixed("Check, cached, one key", CHECK, allowed, one_check.clone()));
    scenarios.push(Scenario::new("Check, cached, 1000 hot users", CHECK, allowed, |i| {
        frame(&hot_check(i))
    }));
    let batch = frame(&pb::CheckBatchRequest {
        checks: (0..100).map(hot_check).collect(),
        min_revision: 0,
    });
    let mut scenario =
        Scenario::fixed("CheckBatch of 100, cached", CHECK_BATCH, all_allowed, batch.clone());
    scenario.items = 100;
    scenarios.push(scenario);
    let wide = frame(&pb::GetAuthorizationRequest {
        user_id: "wide".into(),
        min_revision: 0,
        with_expiry: false,
    });
    scenarios.push(Scenario::fixed(
        "GetAuthorization, 50 tenants",
        GET_AUTHORIZATION,
        fifty_tenants,
        wide,
    ));
    scenarios.push(Scenario::new("Grant, SQLite (durable)", GRANT, revision, |i| {
        grant(format!("g{i}"), "hot".into(), "viewer")
    }));
    let issue = |i: u64| {
        frame(&pb::IssueRequest { user_id: format!("h{}", i % 1000), ..Default::default() })
    };
    scenarios.push(Scenario::new("Issue, RS256 (RSA 2048)", ISSUE, token, issue));
    let mut outcomes = vec![baseline.clone()];
    for scenario in scenarios {
        outcomes.push(load(&conn, server.pid, concurrency, scenario).await);
    }
    drop(server);
    let keys = tempfile::tempdir().expect("dir");
    for (kind, name) in
        [(KeyKind::EcP256, "Issue, ES256 (P-256)"), (KeyKind::Ed25519, "Issue, EdDSA (Ed25519)")]
    {
        let (_, pem) = SigningKey::generate(kind).expect("generate key");
        let path = keys.path().join(format!("{kind:?}.pem"));
        std::fs::write(&path, pem).expect("write key");
        let data = tempfile::tempdir().expect("dir");
        let server =
            spawn(rolecheck(data.path(), &[("ROLECHECK_SIGNING_KEY", path.display().to_string())]));
        let conn = connect(&server.grpc).await;
        seed_small(&conn).await;
        outcomes.push(
            load(&conn, server.pid, concurrency, Scenario::new(name, ISSUE, token, issue)).await,
        );
    }

    // The same fixed bodies through h2load, when installed.
    let mut cross = Vec::new();
    if Command::new("h2load").arg("--version").output().is_ok() {
        cross.extend(h2load(
            &noop.grpc,
            noop.pid,
            concurrency,
            "no-op (health Check)",
            HEALTH,
            health,
        ));
        let data = tempfile::tempdir().expect("dir");
        let server = spawn(rolecheck(data.path(), &[]));
        let conn = connect(&server.grpc).await;
        seed_small(&conn).await;
        // Answers are checked on the server's side: h2load sees HTTP statuses only.
        let count = "rolecheck_grpc_request_duration_seconds_count";
        let codes = || {
            let ok = metric(&server.http, count, "code=\"Ok\"");
            // Streams h2load resets when its time is up (at most one per stream in
            // flight) are recorded as Unknown or Cancelled; they are not failures.
            let abandoned = metric(&server.http, count, "code=\"Unknown\"")
                + metric(&server.http, count, "code=\"Cancelled\"");
            (metric(&server.http, count, ""), ok, abandoned)
        };
        for (name, path, body, items) in [
            ("Check, cached, one key", CHECK, &one_check, 1.0),
            ("CheckBatch of 100, cached", CHECK_BATCH, &batch, 100.0),
        ] {
            let before = codes();
            let Some(mut outcome) = h2load(&server.grpc, server.pid, concurrency, name, path, body)
            else {
                continue;
            };
            let after = codes();
            let not_ok = (after.0 - before.0)
                - (after.1 - before.1)
                - (after.2 - before.2).min(concurrency as f64);
            if not_ok > 0.0 {
                outcome.errors += not_ok as u64;
                outcome.first_error = Some(format!("{not_ok} answers with a non-OK grpc-status"));
            }
            outcome.items_per_second = outcome.per_second * items;
            cross.push(outcome);
        }
        drop(conn);
    }
    table("Embedded SQLite store, small data", baseline, &outcomes);
    if !cross.is_empty() {
        let base = cross[0].clone();
        table("Cross-check: the same fixed-body calls driven by h2load", &base, &cross);
    }
}

/// Dataset `size` in a fresh Postgres database: every scenario, then one scaling row.
async fn postgres_phase(
    admin_url: &str,
    (bin, label, via): (&Path, &str, Via<'_>),
    size: u64,
    concurrency: usize,
    baseline: &Outcome,
) -> String {
    let dataset = Dataset::new(size);
    let url = fresh_database(admin_url, &format!("rolecheck_bench_{size}")).await;
    let data = tempfile::tempdir().expect("dir");
    let db = [("ROLECHECK_DATABASE_URL", url.clone())];
    let status = rolecheck_from(bin, data.path(), &db).arg("migrate").status().expect("migrate");
    assert!(status.success(), "migrate");
    let loaded = generate(&url, dataset).await;

    let server = match via {
        Via::Direct => spawn(rolecheck_from(bin, data.path(), &db)),
        Via::Standby(pair) => {
            let standby = pair.standby_url(&format!("rolecheck_bench_{size}"));
            let memberships = "SELECT count(*) FROM memberships";
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let replayed = match PgConnection::connect(&standby).await {
                    Ok(mut conn) => sqlx::query_as::<_, (i64,)>(memberships)
                        .fetch_one(&mut conn)
                        .await
                        .is_ok_and(|(n,)| n as u64 >= size),
                    Err(_) => false,
                };
                if replayed {
                    break;
                }
                assert!(Instant::now() < deadline, "the standby never replayed the dataset");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let with_standby =
                [("ROLECHECK_DATABASE_URL", url.clone()), ("ROLECHECK_READ_DATABASE_URL", standby)];
            spawn(rolecheck_from(bin, data.path(), &with_standby))
        }
        Via::PgBouncer(pooler) => {
            let name = format!("rolecheck_bench_{size}");
            let through = [
                ("ROLECHECK_DATABASE_URL", pooler.url(&name, pgbouncer::PASSWORD)),
                ("ROLECHECK_DATABASE_POOL_MODE", "transaction".to_owned()),
                ("ROLECHECK_LISTEN_DATABASE_URL", url.clone()),
            ];
            spawn(rolecheck_from(bin, data.path(), &through))
        }
    };
    let conn = connect(&server.grpc).await;
    let rss_start = rss_mib(server.pid);
    let (hits, misses) = ("rolecheck_cache_hits_total", "rolecheck_cache_misses_total");

    // Every user once, in an order that jumps around the key space.
    let step = 7_919 * 104_729; // a product of primes: coprime with the user count below
    let users = dataset.users;
    let stride =
        if users.is_multiple_of(7_919) || users.is_multiple_of(104_729) { 1 } else { step % users };
    let mut miss = Scenario::new("Check, cache miss (every user new)", CHECK, allowed, move |i| {
        frame(&dataset.allowed_check((i * stride) % users))
    });
    miss.limit = users;
    miss.seconds = env_or("BENCH_MISS_SECONDS", 60.0);
    let misses_before = metric(&server.http, misses, "");
    let miss = load(&conn, server.pid, concurrency, miss).await;
    let loaded_users = metric(&server.http, misses, "") - misses_before;
    let rss_warm = rss_mib(server.pid);
    let entries = metric(&server.http, "rolecheck_cache_entries", "");
    assert!(loaded_users as u64 >= miss.calls - miss.errors, "every call a miss");

    // The share of answers from memory while `scenario` runs.
    let counts = || (metric(&server.http, hits, ""), metric(&server.http, misses, ""));
    let hit_ratio = |before: (f64, f64), after: (f64, f64)| {
        let (hits, misses) = (after.0 - before.0, after.1 - before.1);
        hits / (hits + misses).max(1.0)
    };

    let hot = move |i: u64| frame(&dataset.allowed_check(i % 1000));
    setup_calls(&conn, 1000, concurrency, CHECK, hot).await;
    let before = counts();
    let cached = load(
        &conn,
        server.pid,
        concurrency,
        Scenario::new("Check, cached, 1000 hot users", CHECK, allowed, hot),
    )
    .await;
    let cached_hits = hit_ratio(before, counts());

    let before = counts();
    let spread = load(
        &conn,
        server.pid,
        concurrency,
        Scenario::new("Check spread over every user", CHECK, allowed, move |i| {
            // A multiplicative hash of i: uniform over the users, every run the same.
            frame(&dataset.allowed_check(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % users))
        }),
    )
    .await;
    let spread_hits = hit_ratio(before, counts());

    let mut batch =
        Scenario::new("CheckBatch of 100, cached", CHECK_BATCH, all_allowed, move |i| {
            frame(&pb::CheckBatchRequest {
                checks: (0..100).map(|k| dataset.allowed_check((i + k) % 1000)).collect(),
                min_revision: 0,
            })
        });
    batch.items = 100;
    let before = counts();
    let batch = load(&conn, server.pid, concurrency, batch).await;
    let batch_hits = hit_ratio(before, counts());
    let grants = load(
        &conn,
        server.pid,
        concurrency,
        Scenario::new("Grant, Postgres (durable commit)", GRANT, revision, move |i| {
            grant(format!("new-{i}"), tenant_id(i % dataset.tenants), "viewer")
        }),
    )
    .await;
    let title = format!(
        "Postgres ({label}), {} memberships ({} users, {} tenants; COPY load {:.1} s)",
        thousands(size as f64),
        thousands(users as f64),
        thousands(dataset.tenants as f64),
        loaded.as_secs_f64()
    );
    let outcomes = [miss.clone(), cached.clone(), spread.clone(), batch, grants];
    table(&title, baseline, &outcomes);
    println!(
        "\nresident memory: {rss_start:.0} MiB at start, {rss_warm:.0} MiB with {entries:.0} users \
         ({} memberships) cached; hit ratio: cached Check {cached_hits:.3}, spread Check \
         {spread_hits:.3}, CheckBatch {batch_hits:.3}",
        thousands(entries * PER_USER as f64),
    );
    drop(conn);
    drop(server);
    let mut admin = PgConnection::connect(admin_url).await.expect("admin");
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS rolecheck_bench_{size} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    format!(
        "| {} | {label} | {:.1} s | {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.0} MiB | {:.0} MiB | {} |",
        thousands(size as f64),
        loaded.as_secs_f64(),
        thousands(miss.per_second),
        ms(miss.p50),
        ms(miss.p99),
        thousands(cached.per_second),
        ms(cached.p50),
        ms(cached.p99),
        thousands(spread.per_second),
        spread_hits,
        rss_start,
        rss_warm,
        thousands(entries)
    )
}

// ---------------------------------------------------------------------------------------
// Proxy authorization.

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
async fn authz_phase(concurrency: usize, baseline: &Outcome) {
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

// ---------------------------------------------------------------------------------------
// The follower tier.

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

/// Phase 4 (`BENCH_FOLLOWERS`, e.g. `1,10,50,100`): one Postgres, two upstream replicas,
/// and that many followers, each following one of them. Per step: Postgres client
/// connections, revoke-to-deny latency across every follower, follower idle RSS, start to
/// ready; then a follower's cached Check against the no-op.
async fn followers_phase(
    admin_url: &str,
    steps: &[usize],
    concurrency: usize,
    baseline: &Outcome,
    (bin, label): (&Path, &str),
) {
    let db = "rolecheck_bench_followers";
    let url = fresh_database(admin_url, db).await;
    let dirs = tempfile::tempdir().expect("dir");
    let upstreams: Vec<Server> = (0..2)
        .map(|i| {
            let dir = dirs.path().join(format!("upstream{i}"));
            spawn(rolecheck_from(bin, &dir, &[("ROLECHECK_DATABASE_URL", url.clone())]))
        })
        .collect();
    let up = connect(&upstreams[0].grpc).await;
    seed_small(&up).await;
    let mut admin = PgConnection::connect(admin_url).await.expect("admin");
    let mut followers: Vec<(Server, SendRequest<Bytes>, Duration)> = Vec::new();
    println!(
        "\n### The follower tier ({label}): one Postgres, two upstream replicas, N followers\n"
    );
    println!(
        "| followers | Postgres connections | revoke → deny p50 | p99 | max | follower idle RSS (median, max) | start → ready (median, max) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &n in steps {
        let first_new = followers.len();
        while followers.len() < n {
            let i = followers.len();
            let upstream = format!("http://{}", upstreams[i % 2].grpc);
            let started = Instant::now();
            let server = spawn(rolecheck_from(
                bin,
                &dirs.path().join(format!("follower{i}")),
                &[("ROLECHECK_UPSTREAM", upstream)],
            ));
            while http_status(&server.http, "/readyz") != Some(200) {
                assert!(started.elapsed() < Duration::from_secs(30), "follower {i} never ready");
                std::thread::sleep(Duration::from_millis(5));
            }
            let ready = started.elapsed();
            let conn = connect(&server.grpc).await;
            followers.push((server, conn, ready));
        }
        let (connections,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(db)
                .fetch_one(&mut admin)
                .await
                .expect("pg_stat_activity");
        let mut latencies = Vec::new();
        for trial in 0..5 {
            let user = format!("revoked-{n}-{trial}");
            let uri =
                |path: &str| -> http::Uri { format!("http://bench{path}").parse().expect("uri") };
            let granted = unary(&up, &uri(GRANT), grant(user.clone(), "hot".into(), "viewer"))
                .await
                .expect("grant");
            let granted = decode::<pb::GrantResponse>(&granted).expect("grant").revision;
            let mut at_grant = check(user.clone(), "hot".into(), "viewer");
            at_grant.min_revision = granted;
            for (_, conn, _) in &followers {
                for request in [&at_grant, &check(user.clone(), "hot".into(), "viewer")] {
                    let answer = unary(conn, &uri(CHECK), frame(request)).await.expect("check");
                    allowed(&answer).expect("allowed on every follower before the revoke");
                }
            }
            let revoke = frame(&pb::RevokeRequest {
                user_id: user.clone(),
                tenant_id: "hot".into(),
                roles: Vec::new(),
            });
            let started = Instant::now();
            unary(&up, &uri(REVOKE), revoke).await.expect("revoke");
            let denied = futures::future::join_all(followers.iter().map(|(_, conn, _)| {
                let body = frame(&check(user.clone(), "hot".into(), "viewer"));
                let uri = uri(CHECK);
                async move {
                    loop {
                        let answer = unary(conn, &uri, body.clone()).await.expect("check");
                        if allowed(&answer).is_err() {
                            return started.elapsed();
                        }
                        assert!(started.elapsed() < Duration::from_secs(30), "never denied");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }))
            .await;
            latencies.extend(denied);
        }
        latencies.sort_unstable();
        let mut rss: Vec<f64> = followers.iter().map(|(s, _, _)| rss_mib(s.pid)).collect();
        rss.sort_by(f64::total_cmp);
        let mut ready: Vec<Duration> = followers[first_new..].iter().map(|f| f.2).collect();
        ready.sort_unstable();
        println!(
            "| {n} | {connections} | {} | {} | {} | {:.1} MiB, {:.1} MiB | {}, {} |",
            pct_ms(&latencies, 0.5),
            pct_ms(&latencies, 0.99),
            ms(*latencies.last().unwrap_or(&Duration::ZERO)),
            rss[rss.len() / 2],
            rss[rss.len() - 1],
            pct_ms(&ready, 0.5),
            ms(*ready.last().unwrap_or(&Duration::ZERO)),
        );
    }
    // A follower's cached Check against the no-op, the other followers idle.
    let Some((follower, conn, _)) = followers.first() else { return };
    setup_calls(conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    let scenario =
        Scenario::new("Check on a follower, cached, 1000 hot users", CHECK, allowed, |i| {
            frame(&hot_check(i))
        });
    let outcome = load(conn, follower.pid, concurrency, scenario).await;
    table(
        &format!("A follower's cached Check against the no-op ({label})"),
        baseline,
        &[baseline.clone(), outcome],
    );
}

/// Phase 7 (`BENCH_FLEET`, e.g. `300`): that many followers of one replica. No keys, so
/// every follower is the same caller ("anonymous"), past the 256 Watch streams one caller
/// may hold: each names itself and is counted alone. All must become ready with the
/// replica's Postgres connections flat. Then the replica's listener is cut for
/// [`FLEET_CUT`] (the database takes no new connections, and the listener's backend is
/// terminated every 50 ms), so the replica stops being current
/// and every follower loses trust at once, under a Check load spread over all of them
/// (one caller per follower). Reports what reached the replica meanwhile and how long the
/// fleet took to trust its caches again.
async fn fleet_phase(admin_url: &str, n: usize) {
    let db = "rolecheck_bench_fleet";
    let url = fresh_database(admin_url, db).await;
    let dirs = tempfile::tempdir().expect("dir");
    let upstream =
        spawn(rolecheck(&dirs.path().join("upstream"), &[("ROLECHECK_DATABASE_URL", url)]));
    let up = connect(&upstream.grpc).await;
    seed_small(&up).await;
    let mut admin = PgConnection::connect(admin_url).await.expect("admin");
    let count = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1";
    let (before,): (i64,) =
        sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
    let started = Instant::now();
    let mut followers = Vec::with_capacity(n);
    for i in 0..n {
        let upstream = format!("http://{}", upstream.grpc);
        let dir = dirs.path().join(format!("follower{i}"));
        followers.push(spawn(rolecheck(&dir, &[("ROLECHECK_UPSTREAM", upstream)])));
    }
    let mut waiting: Vec<usize> = (0..n).collect();
    while !waiting.is_empty() {
        waiting.retain(|&i| http_status(&followers[i].http, "/readyz") != Some(200));
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} followers never ready",
            waiting.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_ready = started.elapsed();
    let (ready,): (i64,) =
        sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
    let mut conns = Vec::with_capacity(n);
    for follower in &followers {
        conns.push(connect(&follower.grpc).await);
    }
    // Each follower's cache holds 20 hot users.
    let uri: http::Uri = format!("http://bench{CHECK}").parse().expect("uri");
    for (i, conn) in conns.iter().enumerate() {
        for u in 0..20 {
            let body = frame(&hot_check((i * 20 + u) as u64));
            unary(conn, &uri, body).await.expect("warm");
        }
    }
    let relayed = || {
        metric(&upstream.http, "rolecheck_grpc_request_duration_seconds_count", "GetAuthorization")
    };
    // One caller per follower, each asking its own 20 users in turn, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tally = Arc::new([(); 3].map(|()| std::sync::atomic::AtomicU64::new(0)));
    let mut load = Vec::with_capacity(n);
    for (i, conn) in conns.iter().enumerate() {
        let (conn, uri, stop, tally) = (conn.clone(), uri.clone(), stop.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            let mut u = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = frame(&hot_check((i * 20 + u % 20) as u64));
                let slot = match unary(&conn, &uri, body).await {
                    Ok(answer) if allowed(&answer).is_ok() => 0,
                    Ok(_) => 1,
                    Err(_) => 2,
                };
                tally[slot].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                u += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let counts = |tally: &[std::sync::atomic::AtomicU64; 3]| {
        tally.each_ref().map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (steady_from, steady_relayed) = (counts(&tally), relayed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (steady_to, cut_relayed) = (counts(&tally), relayed());
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = 'rolecheck-listener'";
    // No new connection to the database meanwhile, so the listener cannot come back (the
    // replica's pooled connections stay and answer its loads).
    let allow = |yes: bool| format!("ALTER DATABASE {db} ALLOW_CONNECTIONS {yes}");
    sqlx::query(&allow(false)).execute(&mut admin).await.expect("no new connections");
    let cut = Instant::now();
    let mut peak = ready;
    let mut terminated = 0;
    let mut untrusted_peak = 0;
    while cut.elapsed() < FLEET_CUT {
        let (killed,): (i64,) =
            sqlx::query_as(terminate).bind(db).fetch_one(&mut admin).await.expect("cut");
        terminated += killed;
        if cut.elapsed() > FLEET_CUT / 2 {
            let untrusted = followers
                .iter()
                .filter(|f| metric(&f.http, "rolecheck_cache_trusted", "") != 1.0)
                .count();
            untrusted_peak = untrusted_peak.max(untrusted);
        }
        let (now,): (i64,) =
            sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
        peak = peak.max(now);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (cut_to, after_cut_relayed) = (counts(&tally), relayed());
    sqlx::query(&allow(true)).execute(&mut admin).await.expect("connections again");
    let healed = Instant::now();
    let mut untrusted: Vec<usize> = (0..n).collect();
    while !untrusted.is_empty() {
        untrusted.retain(|&i| metric(&followers[i].http, "rolecheck_cache_trusted", "") != 1.0);
        assert!(
            healed.elapsed() < Duration::from_secs(60),
            "{} followers never trusted again",
            untrusted.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = healed.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    futures::future::join_all(load).await;
    let (after,): (i64,) =
        sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
    let per_s = |calls: f64, d: Duration| calls / d.as_secs_f64();
    println!(
        "\n### A fleet of {n} followers of one replica (one caller name), its listener cut for {FLEET_CUT:?}\n"
    );
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| followers ready | {n} of {n}, all within {} |", ms(all_ready));
    println!(
        "| replica's Postgres connections: before followers / all ready / peak during the cut / after | {before} / {ready} / {peak} / {after} |"
    );
    let steady: Vec<u64> = (0..3).map(|k| steady_to[k] - steady_from[k]).collect();
    let during: Vec<u64> = (0..3).map(|k| cut_to[k] - steady_to[k]).collect();
    println!(
        "| Checks over 2 s steady: allowed / denied / failed | {} / {} / {} |",
        steady[0], steady[1], steady[2]
    );
    println!(
        "| Checks during the cut: allowed / denied / failed | {} / {} / {} |",
        during[0], during[1], during[2]
    );
    println!(
        "| loads reaching the replica (GetAuthorization/s): steady / during the cut | {:.0} / {:.0} |",
        per_s(cut_relayed - steady_relayed, Duration::from_secs(2)),
        per_s(after_cut_relayed - cut_relayed, FLEET_CUT),
    );
    println!(
        "| listener connections terminated / followers not trusting their cache, most seen in the cut's second half | {terminated} / {untrusted_peak} of {n} |"
    );
    println!("| every follower trusted again, after the cut ended | {} |", ms(recovered));
}

/// How long the fleet phase keeps the replica's listener cut.
const FLEET_CUT: Duration = Duration::from_secs(3);

/// Users active on the upstream before a rollout.
const ROLLOUT_ACTIVE: u64 = 5000;

/// Phase 5 (`BENCH_ROLLOUT`, e.g. `20`): a rollout of that many followers at once, cold
/// and warm, against one upstream whose cache holds [`ROLLOUT_ACTIVE`] users. Reports what
/// reaches the upstream before the followers are ready and during their first Checks.
async fn rollout_phase(admin_url: &str, followers: usize, concurrency: usize) {
    let db = "rolecheck_bench_rollout";
    let url = fresh_database(admin_url, db).await;
    let dirs = tempfile::tempdir().expect("dir");
    let upstream =
        spawn(rolecheck(&dirs.path().join("upstream"), &[("ROLECHECK_DATABASE_URL", url)]));
    let up = connect(&upstream.grpc).await;
    fn user(i: u64) -> String {
        format!("active-{i}")
    }
    setup_calls(&up, 1, 1, CREATE_TENANT, |_| create_tenant("hot".into())).await;
    setup_calls(&up, ROLLOUT_ACTIVE, 8, GRANT, |i| grant(user(i), "hot".into(), "viewer")).await;
    let check_of = move |i: u64| frame(&check(user(i), "hot".into(), "viewer"));
    setup_calls(&up, ROLLOUT_ACTIVE, concurrency, CHECK, check_of).await;
    let relayed = || {
        metric(&upstream.http, "rolecheck_grpc_request_duration_seconds_count", "GetAuthorization")
    };
    let loads = || metric(&upstream.http, "rolecheck_cache_misses_total", "");
    println!(
        "\n### A rollout of {followers} followers, cold and warm ({ROLLOUT_ACTIVE} users active upstream)\n"
    );
    println!(
        "| start | start → ready (median, max) | upstream calls before ready | upstream calls during the first Checks | Postgres loads upstream | follower misses during the first Checks | first Checks p50 | p99 | max |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, warm_users) in [("cold (`--warm-users 0`)", 0), ("warm (default 10,000)", 10_000)] {
        let (relayed_before, loads_before) = (relayed(), loads());
        let started = Instant::now();
        let servers: Vec<Server> = (0..followers)
            .map(|i| {
                let envs = [
                    ("ROLECHECK_UPSTREAM", format!("http://{}", upstream.grpc)),
                    ("ROLECHECK_WARM_USERS", warm_users.to_string()),
                ];
                spawn(rolecheck(&dirs.path().join(format!("{warm_users}-{i}")), &envs))
            })
            .collect();
        let mut ready = Vec::new();
        for server in &servers {
            while http_status(&server.http, "/readyz") != Some(200) {
                assert!(started.elapsed() < Duration::from_secs(60), "a follower never ready");
                std::thread::sleep(Duration::from_millis(5));
            }
            ready.push(started.elapsed());
        }
        ready.sort_unstable();
        let relayed_ready = relayed();
        let miss_total = |servers: &[Server]| -> f64 {
            servers.iter().map(|s| metric(&s.http, "rolecheck_cache_misses_total", "")).sum()
        };
        let misses_ready = miss_total(&servers);
        let conns = futures::future::join_all(servers.iter().map(|s| connect(&s.grpc))).await;
        let uri: http::Uri = format!("http://bench{CHECK}").parse().expect("uri");
        let latencies = futures::future::join_all(conns.iter().map(|conn| {
            let uri = uri.clone();
            async move {
                let next = AtomicU64::new(0);
                let workers = (0..concurrency).map(|_| async {
                    let mut took = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ROLLOUT_ACTIVE {
                            return took;
                        }
                        let at = Instant::now();
                        let answer = unary(conn, &uri, check_of(i)).await.expect("check");
                        allowed(&answer).expect("allowed");
                        took.push(at.elapsed());
                    }
                });
                futures::future::join_all(workers).await.concat()
            }
        }))
        .await;
        let mut latencies = latencies.concat();
        latencies.sort_unstable();
        println!(
            "| {label} | {}, {} | {} | {} | {} | {} | {} | {} | {} |",
            pct_ms(&ready, 0.5),
            ms(*ready.last().unwrap_or(&Duration::ZERO)),
            thousands(relayed_ready - relayed_before),
            thousands(relayed() - relayed_ready),
            thousands(loads() - loads_before),
            thousands(miss_total(&servers) - misses_ready),
            pct_ms(&latencies, 0.5),
            pct_ms(&latencies, 0.99),
            ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        );
    }
}

/// Phase 6 (`BENCH_TAIL` rounds): h2load alternates the no-op, a cached Check on a central
/// server and a cached Check on a follower of it, so each round compares them on the same
/// machine minutes apart at most; p99 is the figure to watch.
async fn tail_phase(noop: &Server, health: &Bytes, concurrency: usize, rounds: usize) {
    let data = tempfile::tempdir().expect("dir");
    let central = spawn(rolecheck(&data.path().join("central"), &[]));
    let conn = connect(&central.grpc).await;
    seed_small(&conn).await;
    let follower = spawn(rolecheck(
        &data.path().join("follower"),
        &[("ROLECHECK_UPSTREAM", format!("http://{}", central.grpc))],
    ));
    while http_status(&follower.http, "/readyz") != Some(200) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let one_check = frame(&hot_check(7));
    for server in [&central, &follower] {
        let conn = connect(&server.grpc).await;
        setup_calls(&conn, 100, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    }
    let perf = std::env::var("BENCH_PERF").ok();
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    println!("\n### The tail: h2load, no-op and cached Check alternating ({rounds} rounds)\n");
    println!(
        "| round | no-op calls/s | no-op p50 | no-op p99 | central Check calls/s | p50 | p99 | p99 × no-op | follower Check calls/s | p50 | p99 | p99 × no-op |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut ratios = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let base = h2load(&noop.grpc, noop.pid, concurrency, "no-op", HEALTH, health);
        let mut checks = Vec::new();
        for (label, server) in [("central", &central), ("follower", &follower)] {
            let recorder = perf.as_ref().filter(|_| round == 0).and_then(|dir| {
                let _ = std::fs::create_dir_all(dir);
                Command::new("perf")
                    .args(["record", "-F", "1999", "-g", "-q", "-p", &server.pid.to_string()])
                    .arg("-o")
                    .arg(format!("{dir}/{label}.data"))
                    .args(["--", "sleep", &format!("{}", seconds.ceil() as u64 + 1)])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            });
            checks.push(h2load(&server.grpc, server.pid, concurrency, label, CHECK, &one_check));
            if let Some(mut recorder) = recorder {
                let _ = recorder.wait();
            }
        }
        let (Some(base), [Some(central), Some(follower)]) = (base, &checks[..]) else {
            println!("(h2load is not installed or failed: no tail figures)");
            return;
        };
        let ratio = |o: &Outcome| o.p99.as_secs_f64() / base.p99.as_secs_f64();
        ratios.0.push(ratio(central));
        ratios.1.push(ratio(follower));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {:.2} |",
            round + 1,
            thousands(base.per_second),
            ms(base.p50),
            ms(base.p99),
            thousands(central.per_second),
            ms(central.p50),
            ms(central.p99),
            ratio(central),
            thousands(follower.per_second),
            ms(follower.p50),
            ms(follower.p99),
            ratio(follower),
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "\nmedian p99 × no-op: central {:.2}, follower {:.2}",
        median(&mut ratios.0),
        median(&mut ratios.1)
    );
}
