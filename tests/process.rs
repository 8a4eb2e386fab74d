//! The real `rolecheck` binary: configuration from `ROLECHECK_*` variables, `migrate`,
//! reflection without proto files, persistence of the embedded store across restarts,
//! and SIGTERM draining an in-flight call before exiting 0.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use rolecheck::pb::{self, role_check_client::RoleCheckClient, tenants_client::TenantsClient};
use sqlx::{Connection, PgConnection};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[path = "support/postgres.rs"]
mod postgres;

use postgres::{Db, admin_url};

const DEADLINE: Duration = Duration::from_secs(20);

/// A running `rolecheck` process and the lines it writes to stderr.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: Option<SocketAddr>,
    http: Option<SocketAddr>,
    seen: Vec<String>,
}

/// A field of a log line, text (`key=value`) or JSON (`"key":"value"`).
fn field(line: &str, key: &str) -> String {
    if let Some(rest) = line.split(&format!("\"{key}\":\"")).nth(1) {
        return rest.split('"').next().unwrap_or_default().to_owned();
    }
    let rest = line.split(&format!(" {key}=")).nth(1).unwrap_or_else(|| panic!("{key} in {line}"));
    rest.split_whitespace().next().unwrap_or_default().to_owned()
}

fn rolecheck(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env("ROLECHECK_LISTEN", "127.0.0.1:0")
        .env("ROLECHECK_HTTP_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

impl Proc {
    fn spawn(env: &[(&str, &str)]) -> Self {
        let mut child = rolecheck(&["serve"], env).spawn().expect("spawn rolecheck");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = Proc { child, lines, addr: None, http: None, seen: Vec::new() };
        let line = proc.wait_for_line("serving HTTP");
        proc.http = Some(field(&line, "http_addr").parse().expect("http address"));
        let line = proc.wait_for_line("serving gRPC");
        proc.addr = Some(field(&line, "addr").parse().expect("socket address"));
        proc
    }

    /// A follower of the rolecheck at `upstream` (`host:port`), its data under `dir`.
    fn follower(upstream: &str, dir: &std::path::Path) -> Self {
        let data = dir.join("follower");
        Proc::spawn(&[
            ("ROLECHECK_UPSTREAM", &format!("http://{upstream}")),
            ("ROLECHECK_DATA_DIR", data.to_str().expect("path")),
        ])
    }

    fn wait_for_line(&mut self, needle: &str) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => {
                    self.seen.push(line.clone());
                    return line;
                }
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("rolecheck never logged {needle:?}"),
            }
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr.expect("addr")))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// Every line written so far, after the process exited.
    fn all_lines(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    async fn http_status(&self, path: &str) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.http?).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, keeping this runtime's client connections polled so
    /// they can answer the server's GOAWAY.
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < until, "rolecheck did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn grant(
    channel: Channel,
    user: &str,
    tenant: &str,
    role: &str,
) -> Result<u64, tonic::Status> {
    let req = pb::GrantRequest {
        user_id: user.into(),
        tenant_id: tenant.into(),
        roles: vec![role.into()],
        expires_at: None,
    };
    Ok(RoleCheckClient::new(channel).grant(req).await?.into_inner().revision)
}

async fn check(channel: Channel, user: &str, tenant: &str, role: &str) -> bool {
    let req = pb::CheckRequest {
        permission: String::new(),
        user_id: user.into(),
        tenant_id: tenant.into(),
        role: role.into(),
        min_revision: 0,
    };
    RoleCheckClient::new(channel).check(req).await.expect("check").into_inner().allowed
}

#[tokio::test]
async fn embedded_store_survives_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let env = [("ROLECHECK_DATA_DIR", data_dir), ("ROLECHECK_APPLICATION_ID", "myapp")];

    let mut first = Proc::spawn(&env);
    grant(first.channel().await, "7", "", "owner").await.expect("grant");
    assert!(check(first.channel().await, "7", "myapp", "owner").await);
    first.sigterm();
    assert!(first.wait_exit().await.success());
    assert!(std::path::Path::new(data_dir).join("rolecheck.db").exists());

    let second = Proc::spawn(&env);
    assert!(check(second.channel().await, "7", "", "owner").await, "the grant survived");
}

/// One process per embedded store: a second rolecheck on the same data directory is
/// refused at once, naming the store and the holder's pid, and the first serves on; a
/// holder killed without any cleanup leaves no lock behind.
#[tokio::test]
async fn a_second_process_on_one_embedded_store_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let env = [("ROLECHECK_DATA_DIR", data_dir)];
    let mut first = Proc::spawn(&env);
    grant(first.channel().await, "7", "", "owner").await.expect("grant");

    let started = Instant::now();
    let out = rolecheck(&["serve"], &env).output().expect("run a second serve");
    assert!(!out.status.success(), "a second process on one embedded store must not start");
    assert!(started.elapsed() < Duration::from_secs(10), "refused in {:?}", started.elapsed());
    let log = String::from_utf8_lossy(&out.stderr);
    let pid = first.child.id().to_string();
    assert!(log.contains(&format!("pid {pid}")), "{log}");
    assert!(log.contains(data_dir) && log.contains("Postgres"), "{log}");

    assert!(check(first.channel().await, "7", "", "owner").await, "the first serves on");
    first.child.kill().expect("kill -9 the holder");
    first.child.wait().expect("reaped");
    let third = Proc::spawn(&env);
    assert!(check(third.channel().await, "7", "", "owner").await, "the lock died with it");
}

#[tokio::test]
async fn migrate_is_idempotent_and_serve_can_skip_it() {
    let db = Db::create("migrate").await;
    let url = db.url();
    for _ in 0..2 {
        let out = rolecheck(&["migrate"], &[("ROLECHECK_DATABASE_URL", &url)])
            .output()
            .expect("run migrate");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("migrations applied"), "{log}");
        assert!(!log.contains(&url), "the database URL is never logged");
    }
    let proc = Proc::spawn(&[("ROLECHECK_DATABASE_URL", &url), ("ROLECHECK_NO_MIGRATE", "true")]);
    let mut tenants = TenantsClient::new(proc.channel().await);
    tenants
        .create_tenant(pb::CreateTenantRequest { tenant_id: "acme".into(), name: "Acme".into() })
        .await
        .expect("create");
}

#[tokio::test]
async fn reflection_lists_the_services_without_proto_files() {
    let dir = tempfile::tempdir().expect("dir");
    let proc = Proc::spawn(&[("ROLECHECK_DATA_DIR", dir.path().to_str().expect("path"))]);
    let mut client = ServerReflectionClient::new(proc.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflect")
        .into_inner();
    let response = responses.message().await.expect("stream").expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["rolecheck.v1.RoleCheck", "rolecheck.v1.Tenants", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[tokio::test]
async fn sigterm_finishes_the_in_flight_call_then_exits_zero() {
    let db = Db::create("sigterm").await;
    let url = db.url();
    let mut proc = Proc::spawn(&[("ROLECHECK_DATABASE_URL", &url)]);
    let channel = proc.channel().await;
    grant(channel.clone(), "u0", "", "warmup").await.expect("grant");

    // Hold the revision row so the next write waits inside its transaction.
    let mut blocker = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut blocker).await.expect("begin");
    sqlx::query("SELECT value FROM store_revision WHERE id = 1 FOR UPDATE")
        .execute(&mut blocker)
        .await
        .expect("lock");
    let in_flight = tokio::spawn(grant(channel.clone(), "u1", "", "admin"));

    let mut watcher = PgConnection::connect(&url).await.expect("connect");
    let until = Instant::now() + DEADLINE;
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < until, "the grant never reached the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    proc.sigterm();
    proc.wait_for_line("shutdown requested");
    assert!(proc.child.try_wait().expect("wait").is_none(), "still draining");
    sqlx::query("COMMIT").execute(&mut blocker).await.expect("commit");

    let revision = in_flight.await.expect("task").expect("the in-flight grant completes");
    assert!(revision > 0);
    let status = proc.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    let after = Channel::from_shared(format!("http://{}", proc.addr.expect("addr")))
        .expect("uri")
        .connect()
        .await;
    assert!(after.is_err(), "no longer accepting");
}

#[tokio::test]
async fn sigterm_goes_unready_first_and_json_logs_hold_no_secrets() {
    let dir = tempfile::tempdir().expect("dir");
    let secret = "s3cr3t-bearer-value-never-logged";
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!("[[key]]\nname = \"ops\"\nsha256 = \"{hash}\"\nscopes = [\"check\", \"write\"]\n"),
    )
    .expect("keys");
    let data = dir.path().join("data");
    let mut proc = Proc::spawn(&[
        ("ROLECHECK_DATA_DIR", data.to_str().expect("path")),
        ("ROLECHECK_API_KEYS_FILE", keys.to_str().expect("path")),
        ("ROLECHECK_LOG_FORMAT", "json"),
        ("ROLECHECK_SHUTDOWN_DELAY", "2s"),
        ("RUST_LOG", "debug,h2=info,hyper=info,tower=info,sqlx=info"),
    ]);
    let channel = proc.channel().await;
    let authed = |body| {
        let mut request = tonic::Request::new(body);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {secret}").parse().expect("header"));
        request.metadata_mut().insert("x-request-id", "req-42".parse().expect("header"));
        request
    };
    let check = || pb::CheckRequest {
        permission: String::new(),
        user_id: "u".into(),
        tenant_id: String::new(),
        role: "r".into(),
        min_revision: 0,
    };
    RoleCheckClient::new(channel.clone()).check(authed(check())).await.expect("check");
    assert_eq!(proc.http_status("/readyz").await, Some(200));

    proc.sigterm();
    let until = Instant::now() + DEADLINE;
    loop {
        let status = proc.http_status("/readyz").await;
        if status == Some(503) {
            break;
        }
        let exited = proc.child.try_wait().expect("wait");
        assert!(
            Instant::now() < until,
            "readyz never went unready: last {status:?}, process exited: {exited:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proc.http_status("/healthz").await, Some(200), "liveness stays up");
    RoleCheckClient::new(channel.clone())
        .check(authed(check()))
        .await
        .expect("still serving while unready");
    assert_eq!(proc.wait_exit().await.code(), Some(0));

    let lines = proc.all_lines();
    assert!(!lines.is_empty());
    for line in &lines {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not JSON: {line}");
        assert!(!line.contains(secret) && !line.contains("Bearer"), "secret in the log: {line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"request_id\":\"req-42\"")
                && l.contains("\"message\":\"request\"")),
        "one debug line per request, with its id"
    );
}

/// Contention, caused for real: two server processes on one Postgres, six writers
/// (Grant, Revoke, SetRoles) on 20 overlapping users in three stable tenants, and two
/// callers creating, filling and deleting tenants of their own beside them, for 10 s. No
/// write fails, and Postgres detects no deadlock (`pg_stat_database.deadlocks`, read after
/// both processes and their backends are gone, so every backend's counts are flushed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_writing_the_same_rows_never_deadlock_or_fail() {
    let db = Db::create("contention").await;
    let url = db.url();
    let deadlocks = || async {
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let (n,): (i64,) = sqlx::query_as(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .expect("deadlocks");
        n
    };
    let before = deadlocks().await;
    // One after the other: the first applies the migrations.
    let a = Proc::spawn(&[("ROLECHECK_DATABASE_URL", url.as_str())]);
    let b = Proc::spawn(&[("ROLECHECK_DATABASE_URL", url.as_str())]);
    let channels = [a.channel().await, b.channel().await];
    let mut tenants = TenantsClient::new(channels[0].clone());
    for t in ["s0", "s1", "s2"] {
        let request = pb::CreateTenantRequest { tenant_id: t.into(), name: t.into() };
        tenants.create_tenant(request).await.expect("create");
    }
    let until = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for w in 0..6usize {
        let mut client = RoleCheckClient::new(channels[w % 2].clone());
        tasks.push(tokio::spawn(async move {
            let (mut done, mut failed) = (0u32, Vec::new());
            let mut n = w as u64;
            while Instant::now() < until {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let user = format!("u{}", (n >> 33) % 20);
                let tenant = format!("s{}", (n >> 40) % 3);
                let roles = vec![["admin", "viewer", "billing"][((n >> 45) % 3) as usize].into()];
                let outcome = match (n >> 50) % 3 {
                    0 => client
                        .grant(pb::GrantRequest {
                            user_id: user,
                            tenant_id: tenant,
                            roles,
                            expires_at: None,
                        })
                        .await
                        .map(drop),
                    1 => client
                        .revoke(pb::RevokeRequest { user_id: user, tenant_id: tenant, roles })
                        .await
                        .map(drop),
                    _ => client
                        .set_roles(pb::SetRolesRequest {
                            user_id: user,
                            tenant_id: tenant,
                            roles,
                            expires_at: None,
                        })
                        .await
                        .map(drop),
                };
                match outcome {
                    Ok(()) => done += 1,
                    Err(status) => {
                        failed.push(format!("{:?}: {}", status.code(), status.message()))
                    }
                }
            }
            (done, failed)
        }));
    }
    for (c, channel) in channels.iter().cloned().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut tenants = TenantsClient::new(channel.clone());
            let mut client = RoleCheckClient::new(channel);
            let (mut done, mut failed) = (0u32, Vec::new());
            let mut round = 0;
            while Instant::now() < until {
                round += 1;
                let tenant = format!("churn{c}x{round}");
                let mut step = |r: Result<(), tonic::Status>| match r {
                    Ok(()) => done += 1,
                    Err(s) => failed.push(format!("{tenant}: {:?}: {}", s.code(), s.message())),
                };
                let created = tenants
                    .create_tenant(pb::CreateTenantRequest {
                        tenant_id: tenant.clone(),
                        name: tenant.clone(),
                    })
                    .await;
                step(created.map(drop));
                for u in 0..5 {
                    let grant = pb::GrantRequest {
                        user_id: format!("u{u}"),
                        tenant_id: tenant.clone(),
                        roles: vec!["member".into()],
                        expires_at: None,
                    };
                    step(client.grant(grant).await.map(drop));
                }
                let deleted = tenants
                    .delete_tenant(pb::DeleteTenantRequest { tenant_id: tenant.clone() })
                    .await;
                step(deleted.map(drop));
            }
            (done, failed)
        }));
    }
    let (mut done, mut failed) = (0u32, Vec::new());
    for task in tasks {
        let (d, f) = task.await.expect("task");
        done += d;
        failed.extend(f);
    }
    eprintln!("{done} writes acknowledged, {} failed", failed.len());
    assert!(done > 500, "only {done} writes in 10 s");
    assert!(
        failed.is_empty(),
        "{} failed writes, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    drop((a, b));
    let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
    let name = url.rsplit('/').next().expect("name").to_owned();
    let gone = Instant::now() + DEADLINE;
    loop {
        let (left,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(&name)
                .fetch_one(&mut admin)
                .await
                .expect("activity");
        if left == 0 {
            break;
        }
        assert!(Instant::now() < gone, "{left} backends still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deadlocks().await, before, "deadlocks detected during the test");
}

#[test]
fn an_invalid_authorization_policy_stops_the_start_with_its_line() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[identity]\nheader = \"x-user-id\"\n\n[[route]]\npath = \"/a\"\n")
        .expect("write policy");
    let data = dir.path().join("data");
    let out = rolecheck(
        &["serve"],
        &[
            ("ROLECHECK_AUTHZ_POLICY", policy.to_str().expect("path")),
            ("ROLECHECK_DATA_DIR", data.to_str().expect("path")),
        ],
    )
    .output()
    .expect("run serve");
    assert!(!out.status.success(), "an invalid policy must stop the start");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("line 4") && log.contains("needs `roles`"), "{log}");
}

/// A follower whose upstream process is killed answers UNAVAILABLE once its lease runs
/// out, never a stale allow; when the upstream returns on the same address the follower
/// resumes by itself, and a revoke made meanwhile is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_fails_closed_when_its_upstream_dies_and_resumes_when_it_returns() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("upstream");
    let data = data.to_str().expect("path");
    let mut upstream = Proc::spawn(&[("ROLECHECK_DATA_DIR", data)]);
    let addr = upstream.addr.expect("addr").to_string();
    let follower = Proc::follower(&addr, dir.path());
    let (up, down) = (upstream.channel().await, follower.channel().await);
    TenantsClient::new(up.clone())
        .create_tenant(pb::CreateTenantRequest { tenant_id: "acme".into(), name: "Acme".into() })
        .await
        .expect("create");
    grant(up.clone(), "alice", "acme", "admin").await.expect("grant");
    let ask = |channel: Channel| async move {
        let req = pb::CheckRequest {
            permission: String::new(),
            user_id: "alice".into(),
            tenant_id: "acme".into(),
            role: "admin".into(),
            min_revision: 0,
        };
        RoleCheckClient::new(channel).check(req).await.map(|r| r.into_inner().allowed)
    };
    let until = Instant::now() + Duration::from_secs(5);
    while ask(down.clone()).await.ok() != Some(true) {
        assert!(Instant::now() < until, "the follower never saw the grant");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    upstream.child.kill().expect("kill the upstream");
    upstream.child.wait().expect("reap");
    // The lease is 1 s: within a few, every read is UNAVAILABLE.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match ask(down.clone()).await {
            Err(status) if status.code() == tonic::Code::Unavailable => break,
            other => assert!(Instant::now() < until, "still answering: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let upstream = Proc::spawn(&[("ROLECHECK_DATA_DIR", data), ("ROLECHECK_LISTEN", &addr)]);
    let up = upstream.channel().await;
    let req =
        pb::RevokeRequest { user_id: "alice".into(), tenant_id: "acme".into(), roles: vec![] };
    RoleCheckClient::new(up).revoke(req).await.expect("revoke");
    let until = Instant::now() + Duration::from_secs(10);
    while ask(down.clone()).await.ok() != Some(false) {
        assert!(Instant::now() < until, "the follower never resumed to see the revoke");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process's resident set, from `/proc`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// A sample of the process's `/metrics`.
async fn sample(proc: &Proc, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proc.http?).await.ok()?;
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Callers that give up mid-load leave nothing behind: 100,000 Checks for distinct users
/// with 1 ms deadlines, and afterwards no load is in flight and the resident set is back
/// near where it started (an abandoned load used to stay in the in-flight map for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_loads_are_removed() {
    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().join("data");
    let env = [("ROLECHECK_DATA_DIR", data_dir.to_str().expect("path"))];
    let proc = Proc::spawn(&env);
    let pid = proc.child.id();
    let channel = proc.channel().await;
    let client = RoleCheckClient::new(channel);
    // Warm the process's allocator and pools with the same shape of traffic first.
    let round = |base: usize, count: usize| {
        let client = client.clone();
        async move {
            let mut cancelled = 0usize;
            for chunk in (base..base + count).collect::<Vec<_>>().chunks(500) {
                let calls = chunk.iter().map(|i| {
                    let mut client = client.clone();
                    let mut request = tonic::Request::new(pb::CheckRequest {
                        permission: String::new(),
                        user_id: format!("gone-{i}"),
                        tenant_id: String::new(),
                        role: "r".into(),
                        min_revision: 0,
                    });
                    request.set_timeout(Duration::from_millis(1));
                    async move { client.check(request).await }
                });
                for answer in futures::future::join_all(calls).await {
                    cancelled += usize::from(answer.is_err());
                }
            }
            cancelled
        }
    };
    round(0, 10_000).await;
    let proc = &proc;
    let settled = |what: &'static str| async move {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if sample(proc, "rolecheck_cache_loads_in_flight").await == Some(0.0) {
                return;
            }
            assert!(Instant::now() < until, "{what}: loads still in flight");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    settled("after the warm-up").await;
    let before = rss_kib(pid);
    let cancelled = round(10_000, 100_000).await;
    assert!(cancelled > 1_000, "only {cancelled} calls gave up: the test proves nothing");
    settled("after 100,000 abandoned reads").await;
    let after = rss_kib(pid);
    assert!(after < before + 32 * 1024, "RSS grew from {before} KiB to {after} KiB");
    eprintln!("{cancelled} calls cancelled; RSS {before} KiB before, {after} KiB after");
}

/// A Check's answer: `Ok(allowed)` or the status.
async fn ask(channel: Channel, user: &str, tenant: &str, role: &str) -> Result<bool, tonic::Code> {
    let req = pb::CheckRequest {
        permission: String::new(),
        user_id: user.into(),
        tenant_id: tenant.into(),
        role: role.into(),
        min_revision: 0,
    };
    RoleCheckClient::new(channel)
        .check(req)
        .await
        .map(|r| r.into_inner().allowed)
        .map_err(|status| status.code())
}

/// Asks until the answer is `want`, for at most `within`; every answer on the way must
/// pass `allowed_on_the_way` (an answer that fails it is a stale one and fails the test).
async fn until_answer(
    channel: &Channel,
    (user, tenant, role): (&str, &str, &str),
    want: Result<bool, tonic::Code>,
    within: Duration,
    on_the_way: impl Fn(&Result<bool, tonic::Code>) -> bool,
) {
    let until = Instant::now() + within;
    loop {
        let got = ask(channel.clone(), user, tenant, role).await;
        if got == want {
            return;
        }
        assert!(on_the_way(&got), "{user} in {tenant} as {role}: {got:?} on the way to {want:?}");
        assert!(
            Instant::now() < until,
            "{user} in {tenant} as {role}: still {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (at most 10 s) until `proc` trusts its cache with at least `revision` applied.
async fn wait_trusted_at(proc: &Proc, revision: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let trusted = sample(proc, "rolecheck_cache_trusted").await == Some(1.0);
        let applied = sample(proc, "rolecheck_applied_revision").await.unwrap_or(0.0);
        if trusted && applied >= revision as f64 {
            return;
        }
        assert!(Instant::now() < until, "never trusted at revision {revision}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn create_tenant(channel: Channel, id: &str) {
    TenantsClient::new(channel)
        .create_tenant(pb::CreateTenantRequest { tenant_id: id.into(), name: id.into() })
        .await
        .expect("create tenant");
}

/// An embedded upstream restarted on another data directory (a new store, whose
/// revisions reuse numbers the follower applied): the follower's resume is refused for
/// the other epoch, it drops its cache, never answers from the old store's roles, and is
/// following the new one again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_starts_over_when_its_upstream_store_does() {
    let dir = tempfile::tempdir().expect("dir");
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    let (old, new) = (old.to_str().expect("path"), new.to_str().expect("path"));
    // The new store, prepared ahead: further along than the old one, without alice.
    {
        let mut prepared = Proc::spawn(&[("ROLECHECK_DATA_DIR", new)]);
        let up = prepared.channel().await;
        create_tenant(up.clone(), "acme").await;
        for i in 0..10 {
            grant(up.clone(), &format!("bob{i}"), "acme", "viewer").await.expect("grant");
        }
        prepared.child.kill().expect("kill");
        prepared.child.wait().expect("reap");
    }
    let mut upstream = Proc::spawn(&[("ROLECHECK_DATA_DIR", old)]);
    let addr = upstream.addr.expect("addr").to_string();
    let follower = Proc::follower(&addr, dir.path());
    let (up, down) = (upstream.channel().await, follower.channel().await);
    create_tenant(up.clone(), "acme").await;
    grant(up.clone(), "alice", "acme", "admin").await.expect("grant");
    let alice = ("alice", "acme", "admin");
    until_answer(&down, alice, Ok(true), Duration::from_secs(5), |_| true).await;

    upstream.child.kill().expect("kill the upstream");
    upstream.child.wait().expect("reap");
    until_answer(&down, alice, Err(tonic::Code::Unavailable), Duration::from_secs(5), |_| true)
        .await;
    let upstream = Proc::spawn(&[("ROLECHECK_DATA_DIR", new), ("ROLECHECK_LISTEN", &addr)]);
    // Not a question until the follower trusts its cache again, past the new store's
    // revision 11 (a read while it does not would go upstream and refresh alice): then
    // the store has no alice, and an allow would be the old store's, still cached.
    wait_trusted_at(&follower, 11).await;
    for _ in 0..20 {
        assert_eq!(ask(down.clone(), "alice", "acme", "admin").await, Ok(false));
    }
    let up = upstream.channel().await;
    grant(up, "carol", "acme", "editor").await.expect("grant on the new store");
    until_answer(&down, ("carol", "acme", "editor"), Ok(true), Duration::from_secs(10), |_| true)
        .await;
    for _ in 0..20 {
        assert_eq!(ask(down.clone(), "alice", "acme", "admin").await, Ok(false));
    }
}

/// A Postgres database restored from a dump taken before the last writes: the central
/// server sees its revision go back, drops its cache and ends its Watch streams; its
/// follower starts over; neither serves the role granted after the dump, and both follow
/// the writes that reuse the lost revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_database_is_a_rewind_nobody_serves_past() {
    let db = Db::create("restore").await;
    let dir = tempfile::tempdir().expect("dir");
    let central = Proc::spawn(&[("ROLECHECK_DATABASE_URL", &db.url())]);
    let addr = central.addr.expect("addr").to_string();
    let follower = Proc::follower(&addr, dir.path());
    let (up, down) = (central.channel().await, follower.channel().await);
    create_tenant(up.clone(), "acme").await;
    grant(up.clone(), "bob", "acme", "viewer").await.expect("grant");
    let dump = dir.path().join("dump.sql");
    let dumped = Command::new("pg_dump")
        .args(["--no-owner", "-f", dump.to_str().expect("path"), &db.url()])
        .status()
        .expect("pg_dump");
    assert!(dumped.success());
    // After the dump: alice becomes admin, and both tiers serve it.
    grant(up.clone(), "alice", "acme", "admin").await.expect("grant");
    let alice = ("alice", "acme", "admin");
    until_answer(&up, alice, Ok(true), Duration::from_secs(5), |_| true).await;
    until_answer(&down, alice, Ok(true), Duration::from_secs(5), |_| true).await;

    // Restore the dump under the database's name: alice's grant is gone.
    let restored = Db::create("restore_into").await;
    let loaded = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-f", dump.to_str().expect("path"), &restored.url()])
        .stdout(Stdio::null())
        .status()
        .expect("psql");
    assert!(loaded.success());
    let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
    sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", db.0))
        .execute(&mut admin)
        .await
        .expect("drop");
    sqlx::query(&format!("ALTER DATABASE {} RENAME TO {}", restored.0, db.0))
        .execute(&mut admin)
        .await
        .expect("rename");

    // Each tier learns of the restore when its connections break (a moment, as with any
    // write another replica commits); from then on alice is denied.
    until_answer(&up, alice, Ok(false), Duration::from_secs(10), |_| true).await;
    until_answer(&down, alice, Ok(false), Duration::from_secs(10), |_| true).await;
    // Writes now reuse the revisions the lost ones had; both tiers follow them.
    let revision = grant(up.clone(), "carol", "acme", "editor").await.expect("grant");
    assert_eq!(revision, 3, "the restored store continues from its own revision");
    // Once the follower trusts its cache again at that revision, it answers from the
    // restored history: alice (cached as admin before) is denied, carol allowed.
    wait_trusted_at(&follower, 3).await;
    for _ in 0..20 {
        assert_eq!(ask(down.clone(), "alice", "acme", "admin").await, Ok(false));
        assert_eq!(ask(up.clone(), "alice", "acme", "admin").await, Ok(false));
        assert_eq!(ask(down.clone(), "carol", "acme", "editor").await, Ok(true));
    }
}

/// `rolecheck model …` against a real server, as an operator runs it.
fn model_command(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rolecheck"))
        .arg("model")
        .args(args)
        .env_remove("ROLECHECK_SERVER")
        .env_remove("ROLECHECK_KEY_FILE")
        .output()
        .expect("run rolecheck model");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// `rolecheck model apply` checks the file and sets it, and the server judges by it;
/// `model show` prints it back with its revision; a file with a problem never reaches the
/// server (the one set stays), and a server that does not answer is named.
#[tokio::test]
async fn model_apply_sets_the_model_and_show_prints_it() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let proc = Proc::spawn(&[("ROLECHECK_DATA_DIR", data.to_str().expect("path"))]);
    let server = format!("http://{}", proc.addr.expect("addr"));
    let good = dir.path().join("model.toml");
    let model = "[roles.viewer]\n[roles.editor]\nincludes = [\"viewer\"]\n";
    std::fs::write(&good, model).expect("write");
    let good = good.to_str().expect("path");
    let (ok, stdout, stderr) = model_command(&["apply", good, "--server", &server]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), format!("{good}: set at revision 1"));
    grant(proc.channel().await, "u", "", "editor").await.expect("grant");
    assert!(check(proc.channel().await, "u", "", "viewer").await, "an editor is a viewer");

    let (ok, stdout, stderr) = model_command(&["show", "--server", &server]);
    assert!(ok, "{stderr}");
    assert_eq!((stdout.as_str(), stderr.trim()), (model, "# set at revision 1"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[roles.viewer]\n[roles.editor]\nincludes = [\"ghost\"]\n")
        .expect("write");
    let bad = bad.to_str().expect("path");
    let (ok, stdout, stderr) = model_command(&["apply", bad, "--server", &server]);
    assert!(!ok && stdout.is_empty());
    assert_eq!(
        stderr.trim(),
        format!(
            "{bad}:2: roles.editor.includes: names the role \"ghost\", which the model does not declare"
        )
    );
    assert_eq!(model_command(&["show", "--server", &server]).1, model, "nothing changed");

    let (ok, _, stderr) = model_command(&["show", "--server", "http://127.0.0.1:1"]);
    assert!(!ok);
    assert!(stderr.starts_with("Error: http://127.0.0.1:1 did not answer"), "{stderr}");
}
