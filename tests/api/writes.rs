//! A write's outcome is decided once: a caller that goes away after the COMMIT cannot
//! leave it unannounced, and one that goes away while its write is still queued means the
//! write never lands.

use std::time::Duration;

use rolecheck::pb;
use sqlx::{Connection, PgConnection};
use tonic::{Code, Request};

use crate::{
    conformance,
    helpers::{Backend, TestApp, check_req, metric, spawn_with, wait_for},
};

/// Longer than a caller waits below: the caller is gone before its write is announced.
const FAULT: Duration = Duration::from_millis(400);
const DEADLINE: Duration = Duration::from_millis(50);

async fn allowed(app: &TestApp, user: &str, tenant: &str, min_revision: u64) -> bool {
    let request = check_req(user, tenant, "admin", min_revision);
    app.checks.clone().check(request).await.expect("check").into_inner().allowed
}

/// Cached on `app`: asked twice after the Grant was applied.
async fn cached_allow(app: &TestApp, user: &str, tenant: &str, granted: u64) {
    assert!(allowed(app, user, tenant, granted).await);
    assert!(allowed(app, user, tenant, 0).await);
}

/// With a fault point that holds every write right after its COMMIT for longer than the
/// caller waits, a Revoke and a DeleteTenant whose callers gave up are still announced:
/// afterwards a Check denies, with and without `min_revision` (a later write's), on this
/// replica and, on Postgres, on another. A caller that stayed away sees the denial within
/// the fault's delay, not after the cache's TTL (60 s).
async fn a_write_whose_caller_leaves_after_commit_is_still_announced(backend: Backend) {
    let app = spawn_with(backend, |c| c.fault_delay_after_commit = Some(FAULT)).await;
    let other = match backend {
        Backend::Postgres | Backend::PgBouncer => Some(app.replica(|_| {}).await),
        Backend::Sqlite => None, // the embedded file belongs to one process
    };
    app.create_tenant("acme").await;
    app.create_tenant("doomed").await;
    let granted = app.grant("u", "acme", &["admin"]).await;
    let also = app.grant("w", "doomed", &["admin"]).await;
    cached_allow(&app, "u", "acme", granted).await;
    cached_allow(&app, "w", "doomed", also).await;
    if let Some(other) = &other {
        cached_allow(other, "u", "acme", granted).await;
        cached_allow(other, "w", "doomed", also).await;
    }

    let mut revoke = Request::new(pb::RevokeRequest {
        user_id: "u".into(),
        tenant_id: "acme".into(),
        roles: vec!["admin".into()],
    });
    revoke.set_timeout(DEADLINE);
    let gone = app.checks.clone().revoke(revoke).await.expect_err("the caller gave up");
    assert!(matches!(gone.code(), Code::DeadlineExceeded | Code::Cancelled), "{gone:?}");
    for replica in std::iter::once(&app).chain(other.as_ref()) {
        wait_for(FAULT * 4, "the revoke to be announced", || async {
            (!allowed(replica, "u", "acme", 0).await).then_some(())
        })
        .await;
    }
    // One at a time: a write queued behind the revoke's held turn would be dropped with
    // its caller, never started (the other half of "decided once").
    let mut delete = Request::new(pb::DeleteTenantRequest { tenant_id: "doomed".into() });
    delete.set_timeout(DEADLINE);
    let gone = app.tenants.clone().delete_tenant(delete).await.expect_err("the caller gave up");
    assert!(matches!(gone.code(), Code::DeadlineExceeded | Code::Cancelled), "{gone:?}");
    for replica in std::iter::once(&app).chain(other.as_ref()) {
        wait_for(FAULT * 4, "the deletion to be announced", || async {
            (!allowed(replica, "w", "doomed", 0).await).then_some(())
        })
        .await;
    }
    let later = app.grant("v", "acme", &["viewer"]).await;
    for replica in std::iter::once(&app).chain(other.as_ref()) {
        assert!(!allowed(replica, "u", "acme", later).await, "stale allow at {later}");
        assert!(!allowed(replica, "w", "doomed", later).await, "stale allow at {later}");
        assert!(!allowed(replica, "u", "acme", 0).await);
    }
}

conformance!(
    a_write_whose_caller_leaves_after_commit_is_still_announced,
    tenant_churn_leaves_other_users_cached,
);

/// A Grant queued behind a write that waits on a held row lock, whose caller's deadline
/// passes while it waits, never commits, not even after the lock is released; the write
/// ahead of it, whose caller waited, does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_write_whose_caller_left_never_commits() {
    let app = spawn_with(Backend::Postgres, |_| {}).await;
    app.create_tenant("acme").await;
    let mut blocker = PgConnection::connect(app.db.url()).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut blocker).await.expect("begin");
    sqlx::query("SELECT value FROM store_revision WHERE id = 1 FOR UPDATE")
        .execute(&mut blocker)
        .await
        .expect("hold the revision row");

    // The first write reaches the database and waits on the lock; it has a patient caller.
    let patient = {
        let mut checks = app.checks.clone();
        tokio::spawn(async move {
            let grant = pb::GrantRequest {
                user_id: "patient".into(),
                tenant_id: "acme".into(),
                roles: vec!["admin".into()],
                expires_at: None,
            };
            checks.grant(grant).await.map(|r| r.into_inner().revision)
        })
    };
    wait_for(Duration::from_secs(5), "the first write to wait on the lock", || async {
        let mut conn = PgConnection::connect(app.db.url()).await.ok()?;
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND application_name = 'rolecheck'",
        )
        .fetch_one(&mut conn)
        .await
        .ok()?;
        (waiting >= 1).then_some(())
    })
    .await;

    // The second is queued behind it in this replica; its caller gives up.
    let cancelled = |body: &str| {
        body.lines()
            .find_map(|l| {
                l.strip_prefix(
                    r#"rolecheck_grpc_request_duration_seconds_count{method="rolecheck.v1.RoleCheck/Grant",code="Cancelled"} "#,
                )
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut grant = Request::new(pb::GrantRequest {
        user_id: "impatient".into(),
        tenant_id: "acme".into(),
        roles: vec!["admin".into()],
        expires_at: None,
    });
    grant.set_timeout(Duration::from_millis(200));
    let gone = app.checks.clone().grant(grant).await.expect_err("the caller gave up");
    assert!(matches!(gone.code(), Code::DeadlineExceeded | Code::Cancelled), "{gone:?}");
    // The server has dropped the call (it counts it as Cancelled) before the lock goes.
    wait_for(Duration::from_secs(5), "the server to drop the abandoned call", || async {
        let (_, body) = crate::helpers::http_get(&app, "/metrics").await;
        (cancelled(&body) >= 1).then_some(())
    })
    .await;

    sqlx::query("COMMIT").execute(&mut blocker).await.expect("release");
    let revision = patient.await.expect("task").expect("the patient write commits");
    // A write after both: once it is visible, anything queued before it has been decided.
    let after = app.grant("after", "acme", &["admin"]).await;
    assert!(after > revision);
    assert!(allowed(&app, "patient", "acme", after).await);
    assert!(!allowed(&app, "impatient", "acme", after).await, "the abandoned write landed");
    let history = app
        .checks
        .clone()
        .list_changes(pb::ListChangesRequest { user_id: "impatient".into(), ..Default::default() })
        .await
        .expect("history")
        .into_inner();
    assert!(history.entries.is_empty(), "{history:?}");
    assert_eq!(metric(&app, "rolecheck_cache_trusted").await, Some(1.0));
}

/// DeleteTenant invalidates only what it touched: while one caller creates, fills and
/// deletes tenants in a loop, a steady Check load on other users keeps its hit ratio, and
/// every deleted tenant's member is denied at once.
async fn tenant_churn_leaves_other_users_cached(backend: Backend) {
    let app = spawn_with(backend, |_| {}).await;
    app.create_tenant("stable").await;
    let (readers, _) = crate::helpers::granted_readers(&app, "stable").await;
    for reader in &readers {
        assert!(allowed(&app, reader, "stable", 0).await); // warm
    }
    let counts = || async {
        let hits = metric(&app, "rolecheck_cache_hits_total").await.expect("hits");
        (hits, metric(&app, "rolecheck_cache_misses_total").await.expect("misses"))
    };
    let (mut hits, mut misses) = (0.0, 0.0);
    let mut checked = 0u32;
    for round in 0..30 {
        let tenant = format!("churn{round}");
        let member = format!("member{round}");
        app.create_tenant(&tenant).await;
        let granted = app.grant(&member, &tenant, &["admin"]).await;
        cached_allow(&app, &member, &tenant, granted).await;
        let deleted = app
            .tenants
            .clone()
            .delete_tenant(pb::DeleteTenantRequest { tenant_id: tenant.clone() })
            .await
            .expect("delete")
            .into_inner()
            .revision;
        assert!(!allowed(&app, &member, &tenant, deleted).await, "round {round}: stale allow");
        // The readers' share, counted apart from the churned member's own loads.
        let before = counts().await;
        for _ in 0..5 {
            for reader in &readers {
                assert!(allowed(&app, reader, "stable", 0).await);
                checked += 1;
            }
        }
        let after = counts().await;
        hits += after.0 - before.0;
        misses += after.1 - before.1;
    }
    let ratio = hits / (hits + misses);
    eprintln!("tenant churn: {checked} reader checks, {misses} misses, hit ratio {ratio:.4}");
    assert!(ratio >= 0.99, "hit ratio {ratio:.4} over {checked} reader checks ({misses} misses)");
}
