//! A real Postgres outage: a TCP proxy between the server and Postgres that the test cuts
//! and restores. Calls that need the store answer UNAVAILABLE with no database text, the
//! server stays up, and it serves again by itself once the path is back.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rolecheck::pb;
use tokio::{net::TcpListener, task::AbortHandle};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{Backend, TestDb, admin_url, connect, start, test_config, wait_for};

/// Forwards TCP to Postgres until cut; while cut, drops every connection.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (cut2, live2) = (cut.clone(), live.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed at once
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                live2.lock().expect("lock").push(task.abort_handle());
            }
        });
        Self { addr, cut, live }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.live.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// `host:port` and the URL through `proxy` for a database URL `postgres://user@host:port/db`.
fn split_url(url: &str, proxy: SocketAddr) -> (String, String) {
    let (scheme_user, rest) = url.split_once('@').expect("URL with user@host");
    let (host_port, path) = rest.split_once('/').expect("URL with a path");
    (host_port.to_owned(), format!("{scheme_user}@{proxy}/{path}"))
}

fn assert_unavailable(status: tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("store unavailable"), "no database text: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_unavailable_then_recovers() {
    let db = TestDb::create(Backend::Postgres).await;
    let TestDb::Postgres { url, .. } = &db else { unreachable!() };
    let (upstream, _) = split_url(&admin_url(), "127.0.0.1:1".parse().expect("addr"));
    let proxy = Proxy::start(upstream).await;
    let (_, proxied) = split_url(url, proxy.addr);
    let mut config = test_config(&db);
    config.database_url = Some(rolecheck::config::DatabaseUrl(proxied));
    let app = start(config, db).await;
    let mut health = HealthClient::new(connect(app.addr).await);
    let serving = |status: ServingStatus| {
        let mut health = health.clone();
        async move {
            let got = health.check(HealthCheckRequest { service: String::new() }).await.ok()?;
            (got.into_inner().status == status as i32).then_some(())
        }
    };

    app.create_tenant("acme").await;
    app.grant("u1", "acme", &["admin"]).await;
    assert!(app.check("u1", "acme", "admin").await);

    proxy.cut();
    let mut checks = app.checks.clone();
    let grant = pb::GrantRequest {
        user_id: "u2".into(),
        tenant_id: "acme".into(),
        roles: vec!["admin".into()],
        expires_at: None,
    };
    assert_unavailable(checks.grant(grant.clone()).await.unwrap_err());
    let uncached = pb::CheckRequest {
        user_id: "never-seen".into(),
        tenant_id: "acme".into(),
        role: "admin".into(),
        min_revision: 0,
    };
    assert_unavailable(checks.check(uncached.clone()).await.unwrap_err());
    assert_unavailable(
        app.tenants
            .clone()
            .get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() })
            .await
            .unwrap_err(),
    );
    assert_unavailable(checks.list_members(pb::ListMembersRequest::default()).await.unwrap_err());
    wait_for(Duration::from_secs(10), "health NOT_SERVING", || serving(ServingStatus::NotServing))
        .await;

    proxy.restore();
    wait_for(Duration::from_secs(15), "the store to answer again", || {
        let mut checks = checks.clone();
        let grant = grant.clone();
        async move { checks.grant(grant).await.ok() }
    })
    .await;
    assert!(app.check("u2", "acme", "admin").await);
    assert!(!checks.check(uncached).await.expect("check").into_inner().allowed);
    wait_for(Duration::from_secs(10), "health SERVING", || serving(ServingStatus::Serving)).await;
    health
        .check(HealthCheckRequest { service: "rolecheck.v1.RoleCheck".into() })
        .await
        .expect("health");
}
