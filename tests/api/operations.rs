//! Operations: metrics, health and readiness that agree, schema version checks.

use std::time::Duration;

use rolecheck::{pb, server::Server};
use sqlx::{Connection, PgConnection};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    helpers::{Backend, TestDb, connect, http_get, test_config, wait_for},
    tokens::key_files,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_cache_store_and_tokens() {
    let (_dir, keys) = key_files(&[rolecheck::token::KeyKind::Ed25519]);
    let app = crate::helpers::spawn_with(Backend::Postgres, |c| c.signing_key = keys).await;
    app.create_tenant("acme").await;
    let granted = app.grant("u", "acme", &["admin"]).await;
    // Until the change listener is connected and has applied the Grant, reads bypass the
    // cache (fail closed), which would make the counts below depend on start-up timing.
    wait_for(Duration::from_secs(10), "the cache to be trusted with the Grant applied", || async {
        let (_, body) = http_get(&app, "/metrics").await;
        let applied = body
            .lines()
            .find_map(|l| l.strip_prefix("rolecheck_applied_revision "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        (body.contains("rolecheck_cache_trusted 1") && applied >= granted).then_some(())
    })
    .await;
    // The first Check waits until this replica's feed has applied the Grant, so the
    // Grant's notification cannot arrive after the load and force a second one.
    let first = pb::CheckRequest {
        permission: String::new(),
        user_id: "u".into(),
        tenant_id: "acme".into(),
        role: "admin".into(),
        min_revision: granted,
    };
    assert!(app.checks.clone().check(first).await.expect("check").into_inner().allowed);
    for _ in 0..2 {
        assert!(app.check("u", "acme", "admin").await);
    }
    let missing =
        app.tenants.clone().get_tenant(pb::GetTenantRequest { tenant_id: "nope".into() }).await;
    assert!(missing.is_err());
    app.checks
        .clone()
        .issue(pb::IssueRequest { user_id: "u".into(), ..Default::default() })
        .await
        .expect("issue");

    let (head, body) = http_get(&app, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for expected in [
        r#"rolecheck_grpc_request_duration_seconds_count{method="rolecheck.v1.RoleCheck/Check",code="Ok"} 3"#,
        r#"rolecheck_grpc_request_duration_seconds_count{method="rolecheck.v1.Tenants/GetTenant",code="NotFound"} 1"#,
        "rolecheck_cache_hits_total 3", // two Checks and the Issue
        "rolecheck_cache_misses_total 1",
        "rolecheck_cache_entries ",
        r#"rolecheck_store_query_duration_seconds_count{operation="user_roles"} 1"#,
        r#"rolecheck_tokens_issued_total{alg="EdDSA"} 1"#,
        "rolecheck_applied_revision ",
        "rolecheck_coherence_sync_age_seconds ",
        "rolecheck_cache_trusted 1",
        "rolecheck_listener_reconnects 0",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in\n{body}");
    }
}

/// `/readyz` and gRPC health come from one probe of the store, so they agree: both
/// serving, both not while the database is unreachable, both serving again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_readyz_and_grpc_health_agree() {
    let db = TestDb::create(Backend::Postgres).await;
    let proxy = crate::proxy::Proxy::start().await;
    let mut config = test_config(&db);
    config.database_url = Some(rolecheck::config::DatabaseUrl(proxy.url_through(db.url())));
    let app = crate::helpers::start(config, db).await;
    let health = HealthClient::new(connect(app.addr).await);
    let grpc = || {
        let mut health = health.clone();
        async move {
            let request = HealthCheckRequest { service: String::new() };
            health.check(request).await.expect("health").into_inner().status
        }
    };
    let ready = || async { http_get(&app, "/readyz").await.0.starts_with("HTTP/1.1 200") };
    let (head, _) = http_get(&app, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    wait_for(Duration::from_secs(5), "ready", || async { ready().await.then_some(()) }).await;
    assert_eq!(grpc().await, serving);

    proxy.cut();
    // The health task probes every 2 s; both flip on the same probe, so once one has,
    // the other follows within far less than a probe period.
    wait_for(Duration::from_secs(10), "readyz 503", || async { (!ready().await).then_some(()) })
        .await;
    wait_for(Duration::from_millis(200), "gRPC NOT_SERVING", || async {
        (grpc().await == not_serving).then_some(())
    })
    .await;
    let (head, _) = http_get(&app, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "the process is alive: {head}");

    proxy.restore();
    wait_for(Duration::from_secs(10), "readyz 200", || async { ready().await.then_some(()) }).await;
    wait_for(Duration::from_millis(200), "gRPC SERVING", || async {
        (grpc().await == serving).then_some(())
    })
    .await;
}

async fn fresh_migrated_database() -> TestDb {
    let db = TestDb::create(Backend::Postgres).await;
    let config = test_config(&db);
    let args = rolecheck::config::MigrateArgs {
        database_url: config.database_url.clone(),
        database_pool_mode: config.database_pool_mode.clone(),
        listen_database_url: config.listen_database_url.clone(),
        create_database: false,
        data_dir: config.data_dir.clone(),
        application_id: config.application_id.clone(),
        db_startup_wait: config.db_startup_wait,
        log_format: config.log_format.clone(),
    };
    rolecheck::server::migrate(&args).await.expect("migrate");
    db
}

#[tokio::test]
async fn serve_refuses_a_schema_newer_than_it_knows() {
    let db = fresh_migrated_database().await;
    let mut conn = PgConnection::connect(db.url()).await.expect("connect");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999, 'from the future', true, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .expect("fake a newer migration");
    for no_migrate in [false, true] {
        let mut config = test_config(&db);
        config.no_migrate = no_migrate;
        let err = Server::bind(config).await.err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}

#[tokio::test]
async fn no_migrate_refuses_a_schema_that_is_behind() {
    let db = TestDb::create(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.no_migrate = true;
    config.db_startup_wait = Duration::ZERO;
    let err = Server::bind(config).await.err().expect("refused");
    assert!(err.to_string().contains("rolecheck migrate"), "{err}");
}

/// Every ListChanges filter shape, planned generically (as a prepared statement is after
/// a few runs), scans the index of its first filter column between the revision and the
/// page's bound, never the whole history; with no filter, the primary key.
#[tokio::test]
async fn list_changes_filters_use_their_index() {
    use rolecheck::store::{ChangeFilter, list_changes_sql};
    let db = fresh_migrated_database().await;
    let mut conn = PgConnection::connect(db.url()).await.expect("connect");
    for setting in ["SET enable_seqscan = off", "SET plan_cache_mode = force_generic_plan"] {
        sqlx::query(setting).execute(&mut conn).await.expect("set");
    }
    let filter = |tenant: &str, user: &str, caller: &str| ChangeFilter {
        tenant_id: tenant.into(),
        user_id: user.into(),
        caller: caller.into(),
    };
    let shapes = [
        (filter("", "", ""), "changes_pkey"),
        (filter("acme", "", ""), "changes_by_tenant"),
        (filter("", "u1", ""), "changes_by_user"),
        (filter("", "", "billing"), "changes_by_caller"),
        (filter("acme", "u1", ""), "changes_by_"),
        (filter("acme", "", "billing"), "changes_by_"),
        (filter("acme", "u1", "billing"), "changes_by_"),
    ];
    for (n, (filter, index)) in shapes.iter().enumerate() {
        let sql = list_changes_sql(filter);
        sqlx::query(&format!("PREPARE q{n} AS {sql}")).execute(&mut conn).await.expect("prepare");
        let params: Vec<String> = std::iter::once("0".to_owned())
            .chain(
                [&filter.tenant_id, &filter.user_id, &filter.caller]
                    .into_iter()
                    .filter(|v| !v.is_empty())
                    .map(|v| format!("'{v}'")),
            )
            .chain(std::iter::once("100".to_owned()))
            .collect();
        let plan: Vec<(String,)> =
            sqlx::query_as(&format!("EXPLAIN EXECUTE q{n}({})", params.join(", ")))
                .fetch_all(&mut conn)
                .await
                .expect("explain");
        let plan: Vec<String> = plan.into_iter().map(|(line,)| line).collect();
        let plan = plan.join("\n");
        // The page's rows are read from the index (an index or bitmap scan of it), between
        // the revision and the page's bound (whole revisions up to the limit-th row's): the
        // scan stops there however long the history.
        let reads_index = plan.lines().any(|l| l.contains("Index Scan") && l.contains(index));
        assert!(reads_index, "{sql}\n{plan}");
        let bounded = plan.lines().any(|l| {
            l.contains("Index Cond")
                && l.contains("(revision > $1)")
                && l.contains("(revision <= COALESCE(")
        });
        assert!(bounded, "bounded in the index: {sql}\n{plan}");
        // A filtered shape reads its own index, never the whole history by revision.
        let scans_history = plan.contains("changes_pkey");
        assert_eq!(scans_history, *index == "changes_pkey", "{sql}\n{plan}");
    }
}

/// An in-memory SQLite URL is refused with a message that says why and what to use: the
/// store's two pools would each see a database of their own.
#[tokio::test]
async fn an_in_memory_sqlite_url_is_refused_clearly() {
    let db = TestDb::create(Backend::Sqlite).await;
    for url in ["sqlite::memory:", "sqlite://file:x?mode=memory&cache=shared"] {
        let mut config = test_config(&db);
        config.database_url = Some(rolecheck::config::DatabaseUrl(url.into()));
        let err = Server::bind(config).await.err().expect("refused");
        assert!(err.to_string().contains("in-memory SQLite database is not supported"), "{err}");
    }
}
