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

const DEADLINE: Duration = Duration::from_secs(20);

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn database_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.split('?').next().expect("url");
    format!("{}/{name}", &base[..base.rfind('/').expect("path")])
}

/// A fresh Postgres database, dropped at the end of the test.
struct Db(String);

impl Db {
    async fn create(tag: &str) -> Self {
        let name = format!("rc_proc_{tag}_{}", std::process::id());
        let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .expect("drop");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create");
        Db(name)
    }

    fn url(&self) -> String {
        database_url(&self.0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url()).await.ok()?;
                sqlx::query(&sql).execute(&mut admin).await.ok()
            })
        })
        .join();
    }
}

/// A running `rolecheck` process and the lines it writes to stderr.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: Option<SocketAddr>,
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
        let mut proc = Proc { child, lines, addr: None };
        let line = proc.wait_for_line("serving gRPC");
        let addr = line.split("addr=").nth(1).expect("addr in log").split_whitespace().next();
        proc.addr = Some(addr.expect("addr").parse().expect("socket address"));
        proc
    }

    fn wait_for_line(&mut self, needle: &str) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
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
