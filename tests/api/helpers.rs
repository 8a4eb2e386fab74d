//! The spawn helper: a real server on port 0 over a fresh database, and clients for it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rolecheck::{
    config::{Config, DatabaseUrl},
    pb::{role_check_client::RoleCheckClient, tenants_client::TenantsClient},
    server::Server,
};
use sqlx::{Connection, PgConnection};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

use crate::pgbouncer::Bouncer;

/// Which store a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// Postgres through a real PgBouncer in transaction mode, the change listener straight
    /// to Postgres (`--database-pool-mode transaction`, `--listen-database-url`).
    PgBouncer,
}

/// The admin URL of the Postgres the tests use: `DATABASE_URL`, else the local one.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let prefix = &base[..base.rfind('/').expect("database URL has a path")];
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

/// A database that exists for one test and is dropped with it.
pub enum TestDb {
    Sqlite(tempfile::TempDir),
    /// `url` is straight to Postgres (for looking into it); with `via`, servers reach it
    /// through that pooler.
    Postgres {
        name: String,
        url: String,
        via: Option<Arc<Bouncer>>,
    },
    /// Another replica's view of a Postgres database some other `TestDb` owns.
    Replica {
        url: String,
        via: Option<Arc<Bouncer>>,
    },
}

impl TestDb {
    pub async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => TestDb::Sqlite(tempfile::tempdir().expect("temp dir")),
            Backend::Postgres | Backend::PgBouncer => {
                let name = format!("rc_test_{:016x}", rand_u64());
                let mut admin =
                    PgConnection::connect(&admin_url()).await.expect("admin connection");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                let url = with_database(&admin_url(), &name);
                let via = (backend == Backend::PgBouncer)
                    .then(|| Arc::new(Bouncer::start(&admin_url(), "")));
                TestDb::Postgres { name, url, via }
            }
        }
    }

    /// Points `config` at this database.
    pub fn configure(&self, config: &mut Config) {
        match self {
            TestDb::Sqlite(dir) => {
                config.data_dir = dir.path().to_owned();
                config.database_url = None;
            }
            TestDb::Postgres { url, via, .. } | TestDb::Replica { url, via } => match via {
                None => config.database_url = Some(DatabaseUrl(url.clone())),
                Some(bouncer) => {
                    let name = url.rsplit('/').next().expect("database name");
                    let pooled = bouncer.url(name, crate::pgbouncer::PASSWORD);
                    config.database_url = Some(DatabaseUrl(pooled));
                    config.database_pool_mode = "transaction".into();
                    config.listen_database_url = Some(DatabaseUrl(url.clone()));
                }
            },
        }
    }

    /// Another replica's view of this Postgres database, the same way.
    pub fn replica(&self) -> TestDb {
        match self {
            TestDb::Postgres { url, via, .. } | TestDb::Replica { url, via } => {
                TestDb::Replica { url: url.clone(), via: via.clone() }
            }
            TestDb::Sqlite(_) => panic!("not a Postgres database"),
        }
    }

    /// The Postgres URL of this database.
    pub fn url(&self) -> &str {
        match self {
            TestDb::Postgres { url, .. } | TestDb::Replica { url, .. } => url,
            TestDb::Sqlite(_) => panic!("not a Postgres database"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { name, .. } = self {
            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let mut admin = PgConnection::connect(&admin_url()).await?;
                    sqlx::query(&sql).execute(&mut admin).await?;
                    Ok::<_, sqlx::Error>(())
                })?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .join();
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A running server and clients for it.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The HTTP port: JWKS and probes.
    pub http: SocketAddr,
    pub checks: RoleCheckClient<Channel>,
    pub tenants: TenantsClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<rolecheck::error::Result<()>>>,
    /// The server a follower follows (see [`through_follower`]); dropped after it.
    pub upstream: Option<Box<TestApp>>,
    // Declared last: dropped after the server stopped.
    pub db: TestDb,
}

/// Settings for a test server: port 0, quick timeouts, the given database.
pub fn test_config(db: &TestDb) -> Config {
    if std::env::var_os("TEST_LOG").is_some() {
        rolecheck::telemetry::init();
    }
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().expect("address");
    config.http_listen = "127.0.0.1:0".parse().expect("address");
    config.db_acquire_timeout = Duration::from_millis(500);
    config.db_startup_wait = Duration::ZERO;
    db.configure(&mut config);
    config
}

pub async fn spawn(backend: Backend) -> TestApp {
    spawn_with(backend, |_| {}).await
}

tokio::task_local! {
    /// Set by [`through_followers!`]: `spawn` then gives a follower in front of the server.
    static THROUGH_FOLLOWER: ();
}

/// Runs `test` with every `spawn` giving a follower (`--upstream`) in front of the server
/// it starts: the test talks to the follower only.
pub async fn through_follower(test: impl std::future::Future<Output = ()>) {
    THROUGH_FOLLOWER.scope((), test).await;
}

pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let db = TestDb::create(backend).await;
    let mut config = test_config(&db);
    tweak(&mut config);
    let server = start(config.clone(), db).await;
    match THROUGH_FOLLOWER.try_with(|_| ()) {
        Ok(()) => in_front_of(server, config).await,
        Err(_) => server,
    }
}

/// A follower of `server` with `config`'s limits and token settings (what only the
/// upstream may hold, the database and the signing keys, stays the upstream's), ready.
/// Its `db` is the upstream's Postgres database, so tests can look into it.
async fn in_front_of(server: TestApp, mut config: Config) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    config.data_dir = dir.path().to_owned();
    config.database_url = None;
    config.signing_key.clear();
    config.upstream = Some(format!("http://{}", server.addr));
    let db = match &server.db {
        TestDb::Sqlite(_) => TestDb::Sqlite(dir),
        postgres => postgres.replica(),
    };
    let mut follower = start(config, db).await;
    wait_trusted(&follower, 0).await;
    follower.upstream = Some(Box::new(server));
    follower
}

/// Starts a server with `config` over `db`.
pub async fn start(config: Config, db: TestDb) -> TestApp {
    let server = Server::bind(config).await.expect("server starts");
    let addr = server.local_addr();
    let http = server.http_addr();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let channel = connect(addr).await;
    TestApp {
        addr,
        http,
        checks: RoleCheckClient::new(channel.clone()),
        tenants: TenantsClient::new(channel),
        shutdown: Some(tx),
        handle: Some(handle),
        upstream: None,
        db,
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to test server")
}

impl TestApp {
    /// Stops the server gracefully and waits for it; returns the database.
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task").expect("server stops cleanly");
        }
        std::mem::replace(&mut self.db, TestDb::Sqlite(tempfile::tempdir().expect("temp dir")))
    }
}

impl TestApp {
    /// A second server over the same Postgres database: another replica. Of a follower:
    /// a follower of another replica of its upstream.
    pub async fn replica(&self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let db = self.db.replica();
        let mut config = test_config(&db);
        tweak(&mut config);
        let replica = start(config.clone(), db).await;
        match &self.upstream {
            Some(_) => Box::pin(in_front_of(replica, config)).await,
            None => replica,
        }
    }

    /// Where the embedded store keeps its generated signing key (a follower's upstream's).
    pub fn db_path_key(&self) -> std::path::PathBuf {
        if let Some(upstream) = &self.upstream {
            return upstream.db_path_key();
        }
        match &self.db {
            TestDb::Sqlite(dir) => dir.path().join("signing-key.pem"),
            _ => panic!("no generated key on Postgres"),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// Generates one `#[tokio::test]` per store for each named `async fn(Backend)`.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await;
                }
            )*
        }
        mod pgbouncer {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::PgBouncer).await;
                }
            )*
        }
    };
}

/// Generates, for each named `async fn(Backend)`, one `#[tokio::test]` per store that
/// runs it against a follower in front of that store (see [`helpers::through_follower`]).
#[macro_export]
macro_rules! through_followers {
    ($($name:ident),* $(,)?) => {
        mod follower_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let test = super::$name($crate::helpers::Backend::Sqlite);
                    $crate::helpers::through_follower(test).await;
                }
            )*
        }
        mod follower_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let test = super::$name($crate::helpers::Backend::Postgres);
                    $crate::helpers::through_follower(test).await;
                }
            )*
        }
    };
}

/// The conformance suite's tests: each named `async fn(Backend)` against both stores
/// ([`both_stores!`]) and through a follower in front of each ([`through_followers!`]);
/// those after `stores_only:` against the stores alone (say why where they are listed).
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $crate::conformance!($($name),*; stores_only:);
    };
    ($($name:ident),* $(,)? ; stores_only: $($only:ident),* $(,)?) => {
        $crate::both_stores!($($name,)* $($only),*);
        $crate::through_followers!($($name),*);
    };
}

/// Polls `probe` until it returns `Some`, failing the test after `deadline`.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

use std::collections::BTreeMap;

use rolecheck::pb;

/// Short calls for the common RPCs; each panics on an error status.
impl TestApp {
    pub async fn create_tenant(&self, id: &str) -> pb::Tenant {
        let req = pb::CreateTenantRequest { tenant_id: id.into(), name: format!("Tenant {id}") };
        self.tenants.clone().create_tenant(req).await.expect("CreateTenant").into_inner()
    }

    pub async fn grant(&self, user: &str, tenant: &str, roles: &[&str]) -> u64 {
        self.checks
            .clone()
            .grant(pb::GrantRequest {
                user_id: user.into(),
                tenant_id: tenant.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                expires_at: None,
            })
            .await
            .expect("Grant")
            .into_inner()
            .revision
    }

    pub async fn revoke(&self, user: &str, tenant: &str, roles: &[&str]) -> u64 {
        self.checks
            .clone()
            .revoke(pb::RevokeRequest {
                user_id: user.into(),
                tenant_id: tenant.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
            })
            .await
            .expect("Revoke")
            .into_inner()
            .revision
    }

    pub async fn check(&self, user: &str, tenant: &str, role: &str) -> bool {
        self.checks
            .clone()
            .check(pb::CheckRequest {
                permission: String::new(),
                user_id: user.into(),
                tenant_id: tenant.into(),
                role: role.into(),
                min_revision: 0,
            })
            .await
            .expect("Check")
            .into_inner()
            .allowed
    }

    pub async fn authorization(&self, user: &str) -> BTreeMap<String, Vec<String>> {
        self.checks
            .clone()
            .get_authorization(pb::GetAuthorizationRequest {
                expand: false,
                user_id: user.into(),
                min_revision: 0,
                with_expiry: false,
            })
            .await
            .expect("GetAuthorization")
            .into_inner()
            .authorization
            .into_iter()
            .map(|(tenant, roles)| (tenant, roles.roles))
            .collect()
    }
}

/// A map literal for authorization objects.
pub fn authz(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(tenant, roles)| (tenant.to_string(), roles.iter().map(|r| r.to_string()).collect()))
        .collect()
}

/// `GET path` on the HTTP port: (head, body).
pub async fn http_get(app: &TestApp, path: &str) -> (String, String) {
    let (_, head, body) = http(app.http, "GET", path, &[]).await;
    (head, body)
}

/// One HTTP/1.1 request with extra headers: (status, response head, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    http_body(addr, (method, target), headers, None).await
}

/// [`http`] with a request body (sent with its `content-length`).
pub async fn http_body(
    addr: SocketAddr,
    (method, target): (&str, &str),
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(body.unwrap_or_default());
    stream.write_all(&request).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    (status, head.to_owned(), body.to_owned())
}

/// The value of the unlabelled sample `name` on the app's `/metrics`.
pub async fn metric(app: &TestApp, name: &str) -> Option<f64> {
    let (_, body) = http_get(app, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
}

/// A Check request.
pub fn check_req(user: &str, tenant: &str, role: &str, min_revision: u64) -> pb::CheckRequest {
    pb::CheckRequest {
        permission: String::new(),
        user_id: user.into(),
        tenant_id: tenant.into(),
        role: role.into(),
        min_revision,
    }
}

/// Waits until `app` trusts its cache and has applied `revision` (its change feed is
/// connected and caught up), so cached reads are what a test measures.
pub async fn wait_trusted(app: &TestApp, revision: u64) {
    wait_for(Duration::from_secs(10), "the cache to be trusted", || async {
        let trusted = metric(app, "rolecheck_cache_trusted").await == Some(1.0);
        let applied = metric(app, "rolecheck_applied_revision").await.unwrap_or(0.0);
        (trusted && applied >= revision as f64).then_some(())
    })
    .await;
}

/// Twenty users `reader0`..`reader19` holding `admin` in `tenant`, with the grants applied
/// to `app`'s cache; and the revision of the last grant.
pub async fn granted_readers(app: &TestApp, tenant: &str) -> (Vec<String>, u64) {
    let readers: Vec<String> = (0..20).map(|i| format!("reader{i}")).collect();
    let mut last = 0;
    for reader in &readers {
        last = app.grant(reader, tenant, &["admin"]).await;
    }
    wait_trusted(app, last).await;
    (readers, last)
}
