//! A real Postgres outage: a TCP proxy between the server and Postgres that the test cuts
//! and restores. Calls that need the store answer UNAVAILABLE with no database text, the
//! server stays up, and it serves again by itself once the path is back.

use std::time::Duration;

use rolecheck::pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    helpers::{Backend, TestDb, connect, start, test_config, wait_for},
    proxy::Proxy,
};

fn assert_unavailable(status: tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("store unavailable"), "no database text: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_unavailable_then_recovers() {
    let db = TestDb::create(Backend::Postgres).await;
    let TestDb::Postgres { url, .. } = &db else { unreachable!() };
    let proxy = Proxy::start().await;
    let proxied = proxy.url_through(url);
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
        permission: String::new(),
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
