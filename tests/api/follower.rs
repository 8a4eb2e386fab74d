//! The follower tier (`--upstream`): a rolecheck with no database and no private key that
//! answers as its upstream would, from its own cache kept coherent by the upstream's
//! Watch, relaying writes, lists and Issue.

use std::time::Duration;

use rolecheck::pb;
use tonic::Code;

use crate::{
    both_stores,
    helpers::{
        Backend, TestApp, TestDb, check_req, spawn, start, test_config, wait_for, wait_trusted,
    },
};

/// A follower of `upstream`, over loopback, with the default lease.
pub(crate) async fn follower_of(upstream: &TestApp) -> TestApp {
    follower_with(upstream, |_| {}).await
}

/// A follower of `upstream` with `tweak` applied to its settings.
async fn follower_with(
    upstream: &TestApp,
    tweak: impl FnOnce(&mut rolecheck::config::Config),
) -> TestApp {
    let db = TestDb::Sqlite(tempfile::tempdir().expect("dir"));
    let mut config = test_config(&db);
    config.upstream = Some(format!("http://{}", upstream.addr));
    tweak(&mut config);
    start(config, db).await
}

/// A follower of `upstream` through a test proxy (to cut or silence), with a 1 s bound
/// on each upstream call.
async fn follower_through_proxy(upstream: &TestApp) -> (crate::proxy::Proxy, TestApp) {
    let proxy = crate::proxy::Proxy::start_to(upstream.addr.to_string()).await;
    let db = TestDb::Sqlite(tempfile::tempdir().expect("dir"));
    let mut config = test_config(&db);
    config.upstream = Some(format!("http://{}", proxy.addr));
    config.db_query_timeout = Duration::from_secs(1);
    (proxy, start(config, db).await)
}

async fn allowed(app: &TestApp, user: &str, tenant: &str, role: &str, min: u64) -> bool {
    let response = app.checks.clone().check(check_req(user, tenant, role, min)).await;
    response.expect("Check").into_inner().allowed
}

/// Every RPC through a follower answers as the upstream does: results, codes, revisions,
/// `min_revision`, pagination, validation errors, tokens and the audit trail.
async fn a_follower_answers_as_its_upstream(backend: Backend) {
    let upstream = spawn(backend).await;
    let follower = follower_of(&upstream).await;
    wait_trusted(&follower, 0).await;

    // Tenants: created through the follower, seen through both.
    follower.create_tenant("acme").await;
    let again = pb::CreateTenantRequest { tenant_id: "acme".into(), name: "A".into() };
    let code = follower.tenants.clone().create_tenant(again).await.expect_err("taken").code();
    assert_eq!(code, Code::AlreadyExists);
    for app in [&upstream, &follower] {
        let missing = pb::GetTenantRequest { tenant_id: "nope".into() };
        let code = app.tenants.clone().get_tenant(missing).await.expect_err("absent").code();
        assert_eq!(code, Code::NotFound);
    }

    // Writes relayed; reads from the follower's cache honour min_revision.
    let mut last = 0;
    for i in 0..5 {
        last = follower.grant(&format!("u{i}"), "acme", &["admin", "viewer"]).await;
    }
    assert!(allowed(&follower, "u3", "acme", "admin", last).await);
    assert!(allowed(&follower, "u3", "acme", "admin", 0).await, "then from the cache");
    let missing = pb::GrantRequest {
        user_id: "u1".into(),
        tenant_id: "gone".into(),
        roles: vec!["admin".into()],
        expires_at: None,
    };
    let code = follower.checks.clone().grant(missing).await.expect_err("no tenant").code();
    assert_eq!(code, Code::NotFound);
    let ahead = follower.checks.clone().check(check_req("u3", "acme", "admin", last + 1000)).await;
    assert_eq!(ahead.expect_err("ahead").code(), Code::OutOfRange);

    // Same answers for GetAuthorization, pages of members and tenants, validation.
    for user in ["u0", "u4", "nobody"] {
        assert_eq!(follower.authorization(user).await, upstream.authorization(user).await);
    }
    let pages = |app: &TestApp| {
        let mut checks = app.checks.clone();
        async move {
            let (mut pages, mut token) = (Vec::new(), String::new());
            loop {
                let request = pb::ListMembersRequest {
                    tenant_id: "acme".into(),
                    page_size: 2,
                    page_token: token,
                };
                let page = checks.list_members(request).await.expect("ListMembers").into_inner();
                pages.push(page.members.iter().map(|m| m.user_id.clone()).collect::<Vec<_>>());
                if page.next_page_token.is_empty() {
                    return pages;
                }
                token = page.next_page_token;
            }
        }
    };
    assert_eq!(pages(&follower).await, pages(&upstream).await);
    let tenants = |app: &TestApp| {
        let mut client = app.tenants.clone();
        async move {
            let page = client.list_tenants(pb::ListTenantsRequest::default()).await;
            page.expect("ListTenants").into_inner().tenants
        }
    };
    assert_eq!(tenants(&follower).await, tenants(&upstream).await);
    for app in [&upstream, &follower] {
        let bad = app.checks.clone().check(check_req("", "acme", "admin", 0)).await;
        let status = bad.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("user_id"), "{status:?}");
    }

    // Issue and GetKeys come from the upstream, which holds the key.
    let keys = |app: &TestApp| {
        let mut checks = app.checks.clone();
        async move { checks.get_keys(pb::GetKeysRequest {}).await.expect("keys").into_inner() }
    };
    assert_eq!(keys(&follower).await.jwks_json, keys(&upstream).await.jwks_json);
    let issue = pb::IssueRequest { user_id: "u0".into(), ..Default::default() };
    let issued = follower.checks.clone().issue(issue).await;
    match backend {
        Backend::Sqlite => assert!(issued.expect("Issue").into_inner().access_token.contains('.')),
        // Postgres has no key unless configured: the upstream's answer, relayed.
        Backend::Postgres | Backend::PgBouncer => {
            assert_eq!(issued.expect_err("no key").code(), Code::FailedPrecondition)
        }
    }

    // A revoke through the follower is denied there at once.
    let revoked = follower.revoke("u3", "acme", &["admin"]).await;
    assert!(!allowed(&follower, "u3", "acme", "admin", 0).await);
    assert!(!allowed(&follower, "u3", "acme", "admin", revoked).await);
    assert!(!allowed(&upstream, "u3", "acme", "admin", revoked).await);

    // The upstream's audit trail names the follower's caller and the follower.
    let request = pb::ListChangesRequest { user_id: "u3".into(), ..Default::default() };
    let entries =
        upstream.checks.clone().list_changes(request).await.expect("audit").into_inner().entries;
    let callers: Vec<String> =
        entries.iter().filter_map(|e| e.change.as_ref()).map(|c| c.caller.clone()).collect();
    assert_eq!(callers, ["anonymous via anonymous", "anonymous via anonymous"]);
}

both_stores!(a_follower_answers_as_its_upstream);

/// A revoke through the upstream is denied on every follower; with the revoke's revision
/// as `min_revision`, never allowed, not even once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_upstream_is_denied_on_every_follower() {
    let upstream = spawn(Backend::Postgres).await;
    let followers = [follower_of(&upstream).await, follower_of(&upstream).await];
    upstream.create_tenant("acme").await;
    let granted = upstream.grant("alice", "acme", &["admin"]).await;
    for follower in &followers {
        assert!(allowed(follower, "alice", "acme", "admin", granted).await);
        assert!(allowed(follower, "alice", "acme", "admin", 0).await, "cached");
    }
    let revoked = upstream.revoke("alice", "acme", &["admin"]).await;
    for follower in &followers {
        assert!(!allowed(follower, "alice", "acme", "admin", revoked).await);
        wait_for(Duration::from_secs(2), "the follower's cache denies", || async {
            (!allowed(follower, "alice", "acme", "admin", 0).await).then_some(())
        })
        .await;
    }
}

/// A follower's load never reads older than what its cache already applied: the
/// upstream's cache is held behind its own Watch (a fault point delays every change it
/// applies), a revoke made through another replica reaches the follower by that Watch,
/// and the follower's next load, asking with the applied revision as its floor, gets the
/// revoke from the upstream's store instead of the old roles from its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_never_brings_back_what_the_follower_already_revoked() {
    const LAG: Duration = Duration::from_secs(3);
    let db = TestDb::create(Backend::Postgres).await;
    let url = db.url().to_owned();
    let writer = start(test_config(&db), db).await;
    writer.create_tenant("acme").await;
    let granted = writer.grant("alice", "acme", &["admin"]).await;
    let lagging = TestDb::Replica { url, via: None };
    let mut config = test_config(&lagging);
    config.fault_delay_feed = Some(LAG);
    // The upstream's cache stays trusted while it lags (its lease outlasts the delayed
    // change), as a cache a moment behind within its lease is.
    config.coherence_lease = Duration::from_secs(60);
    let upstream = start(config, lagging).await;
    wait_trusted(&upstream, granted).await;
    let follower = follower_of(&upstream).await;
    wait_trusted(&follower, granted).await;
    // The follower loads alice through the upstream, which caches her too.
    assert!(allowed(&follower, "alice", "acme", "admin", 0).await);
    let revoked = writer.revoke("alice", "acme", &["admin"]).await;
    let started = std::time::Instant::now();
    // The upstream's Watch (its history reader) carries the revoke at once; its cache
    // applies it only after LAG.
    wait_trusted(&follower, revoked).await;
    assert!(started.elapsed() < LAG / 2, "the Watch took {:?}", started.elapsed());
    assert!(
        !allowed(&follower, "alice", "acme", "admin", 0).await,
        "the follower re-cached the roles its feed had revoked"
    );
    assert!(started.elapsed() < LAG, "decided while the upstream's cache still lagged");
    assert!(!allowed(&follower, "alice", "acme", "admin", 0).await, "and stays denied");
}

/// A follower refuses to hold a database or a signing key.
#[tokio::test]
async fn a_follower_holds_no_database_and_no_key() {
    let db = TestDb::Sqlite(tempfile::tempdir().expect("dir"));
    for tweak in [
        |c: &mut rolecheck::config::Config| {
            c.database_url = Some(rolecheck::config::DatabaseUrl("postgres://x/y".into()))
        },
        |c: &mut rolecheck::config::Config| c.signing_key = vec!["/k.pem".into()],
    ] {
        let mut config = test_config(&db);
        config.upstream = Some("http://127.0.0.1:1".into());
        tweak(&mut config);
        let err = rolecheck::server::Server::bind(config).await.err().expect("refused");
        assert!(err.to_string().contains("follower"), "{err}");
    }
}

/// The path to the upstream goes silent (sockets open, nothing carried): a Check at the
/// revision of a revoke made meanwhile is UNAVAILABLE, never allowed; once the lease runs
/// out every read is; when the path carries again the follower resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_silent_network_fails_closed_and_recovers() {
    let upstream = spawn(Backend::Postgres).await;
    let (proxy, follower) = follower_through_proxy(&upstream).await;
    upstream.create_tenant("acme").await;
    let granted = upstream.grant("alice", "acme", &["admin"]).await;
    assert!(allowed(&follower, "alice", "acme", "admin", granted).await);

    proxy.silence();
    let revoked = upstream.revoke("alice", "acme", &["admin"]).await;
    let mut checks = follower.checks.clone();
    let at_revoke = checks.check(check_req("alice", "acme", "admin", revoked)).await;
    let at_revoke = at_revoke.map(|r| r.into_inner().allowed).map_err(|s| s.code());
    assert_eq!(at_revoke, Err(Code::Unavailable));
    wait_for(Duration::from_secs(5), "every read UNAVAILABLE", || async {
        let answer = follower.checks.clone().check(check_req("alice", "acme", "admin", 0)).await;
        (answer.map_err(|s| s.code()).err() == Some(Code::Unavailable)).then_some(())
    })
    .await;

    proxy.restore();
    wait_trusted(&follower, revoked).await;
    assert!(!allowed(&follower, "alice", "acme", "admin", 0).await);
}

/// The staleness bound: a follower trusts its cache at most one lease after its upstream
/// last proved it was current, not one lease after the upstream's last progress response
/// arrived (which, sent just before the upstream's own lease ran out, made nearly two).
/// The upstream's path to Postgres goes silent and a revoke lands through another
/// replica: the follower stops allowing within the lease (1 s) and a margin, well short
/// of two leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_trusts_at_most_one_lease_past_its_upstreams_last_proof() {
    trust_ends_one_lease_after_the_upstreams_last_proof(None).await;
}

/// The same bound behind a backlog: every byte from the upstream reaches the follower
/// 600 ms late, so each progress response arrives 600 ms after it was made. Trust is
/// counted from when the follower asked for the stream, not from arrivals, so the
/// follower still stops allowing within the lease, where counting from arrivals it would
/// allow for 600 ms more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_backlogged_stream_a_follower_trusts_no_longer() {
    trust_ends_one_lease_after_the_upstreams_last_proof(Some(Duration::from_millis(600))).await;
}

async fn trust_ends_one_lease_after_the_upstreams_last_proof(backlog: Option<Duration>) {
    let db = TestDb::create(Backend::Postgres).await;
    let TestDb::Postgres { url, .. } = &db else { unreachable!() };
    let proxy = crate::proxy::Proxy::start().await;
    let mut config = test_config(&db);
    config.database_url = Some(rolecheck::config::DatabaseUrl(proxy.url_through(url)));
    config.request_timeout = Duration::from_secs(3);
    config.db_query_timeout = Duration::from_secs(1);
    let lease = Duration::from_secs(1);
    config.coherence_lease = lease;
    let upstream = start(config, db).await;
    let other = upstream.replica(|_| {}).await;
    let stream = crate::proxy::Proxy::start_to(upstream.addr.to_string()).await;
    if let Some(backlog) = backlog {
        stream.delay(backlog);
    }
    let follower = follower_with(&upstream, |c| {
        c.upstream = Some(format!("http://{}", stream.addr));
        c.coherence_lease = lease;
        c.request_timeout = Duration::from_secs(5);
        c.db_query_timeout = Duration::from_secs(3);
    })
    .await;
    other.create_tenant("acme").await;
    let granted = other.grant("alice", "acme", &["admin"]).await;
    wait_trusted(&follower, granted).await;
    assert!(allowed(&follower, "alice", "acme", "admin", granted).await);

    proxy.silence();
    let silenced = std::time::Instant::now();
    other.revoke("alice", "acme", &["admin"]).await;
    let bound = lease + Duration::from_millis(250);
    loop {
        // The time a read is asked decides (a read that goes upstream may then wait).
        let asked = silenced.elapsed();
        let answer = follower.checks.clone().check(check_req("alice", "acme", "admin", 0)).await;
        let answer = answer.map(|r| r.into_inner().allowed).map_err(|s| s.code());
        if answer != Ok(true) {
            eprintln!("the follower answered {answer:?} when asked {asked:?} after the silence");
            break;
        }
        assert!(asked < bound, "still allowed when asked {asked:?} after the silence");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A follower cut off while the upstream pruned the history it would resume from drops
/// its whole cache and starts over from the upstream's current revision: a user cached
/// before, and unchanged since, is read again; a revoke made meanwhile is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_revision_was_pruned_drops_its_cache_and_starts_over() {
    let upstream = crate::helpers::spawn_with(Backend::Postgres, |c| {
        c.history_retention = Duration::from_secs(1)
    })
    .await;
    let (proxy, follower) = follower_through_proxy(&upstream).await;
    upstream.create_tenant("acme").await;
    upstream.grant("bob", "acme", &["viewer"]).await;
    let granted = upstream.grant("alice", "acme", &["admin"]).await;
    assert!(allowed(&follower, "bob", "acme", "viewer", granted).await);
    assert!(allowed(&follower, "alice", "acme", "admin", granted).await);
    assert!(allowed(&follower, "bob", "acme", "viewer", 0).await, "bob is cached");

    proxy.silence();
    let revoked = upstream.revoke("alice", "acme", &["admin"]).await;
    wait_for(Duration::from_secs(10), "the upstream to prune past the revoke", || async {
        let request = pb::ListChangesRequest::default();
        let page = upstream.checks.clone().list_changes(request).await.ok()?.into_inner();
        (page.pruned_through >= revoked).then_some(())
    })
    .await;
    proxy.restore();
    wait_trusted(&follower, revoked).await;

    let misses = || async {
        crate::helpers::metric(&follower, "rolecheck_cache_misses_total").await.expect("metric")
    };
    let before = misses().await;
    assert!(allowed(&follower, "bob", "acme", "viewer", 0).await);
    assert_eq!(misses().await, before + 1.0, "bob was dropped with the whole cache");
    assert!(!allowed(&follower, "alice", "acme", "admin", 0).await);
}

/// A new follower loads the users its upstream answered about lately before it reports
/// ready: each Check of them is then answered from its cache, where a follower started
/// cold (`--warm-users 0`) misses each once. `ListActiveUsers` validates its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_follower_warms_its_cache_with_the_upstreams_active_users() {
    let upstream = spawn(Backend::Sqlite).await;
    upstream.create_tenant("acme").await;
    let mut users: Vec<String> = (0..40).map(|i| format!("user{i}")).collect();
    users.sort();
    let mut last = 0;
    for user in &users {
        last = upstream.grant(user, "acme", &["viewer"]).await;
    }
    for user in &users {
        assert!(allowed(&upstream, user, "acme", "viewer", 0).await, "{user} is cached upstream");
    }

    let list = |limit: u32| {
        let mut checks = upstream.checks.clone();
        async move {
            let request = pb::ListActiveUsersRequest { limit };
            checks.list_active_users(request).await.map(|r| r.into_inner().user_ids)
        }
    };
    let mut listed = list(1000).await.expect("ListActiveUsers");
    listed.sort();
    assert_eq!(listed, users);
    assert_eq!(list(5).await.expect("ListActiveUsers").len(), 5);
    for limit in [0, 100_001] {
        assert_eq!(list(limit).await.expect_err("bad limit").code(), Code::InvalidArgument);
    }

    for (warm_users, misses_per_user) in [(10_000, 0.0), (0, 1.0)] {
        let follower = follower_with(&upstream, |c| c.warm_users = warm_users).await;
        wait_for(Duration::from_secs(10), "the follower to be ready", || async {
            let (status, _, _) = crate::helpers::http(follower.http, "GET", "/readyz", &[]).await;
            (status == 200).then_some(())
        })
        .await;
        let misses = || async {
            let misses = crate::helpers::metric(&follower, "rolecheck_cache_misses_total").await;
            misses.expect("metric")
        };
        let before = misses().await;
        for user in &users {
            assert!(allowed(&follower, user, "acme", "viewer", last).await);
        }
        let per_user = (misses().await - before) / users.len() as f64;
        assert_eq!(per_user, misses_per_user, "cache misses per user, --warm-users {warm_users}");
    }
}

/// A follower publishes its upstream's keys and follows them: once the upstream restarts
/// with a new key listed, the follower's `/.well-known/jwks.json` lists it too (fetched
/// again when the feed comes back, not at the next periodic refresh 30 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_publishes_the_keys_its_upstream_restarted_with() {
    use rolecheck::token::KeyKind;
    let (_keys, paths) = crate::tokens::key_files(&[KeyKind::Ed25519, KeyKind::EcP256]);
    let first = vec![paths[0].clone()];
    let upstream = crate::helpers::spawn_with(Backend::Sqlite, |c| c.signing_key = first).await;
    let addr = upstream.addr;
    let follower = follower_of(&upstream).await;
    let kids = |jwks: &str| -> Vec<String> {
        let jwks: serde_json::Value = serde_json::from_str(jwks).expect("JWK Set");
        let keys = jwks["keys"].as_array().expect("keys").iter();
        keys.map(|key| key["kid"].as_str().expect("kid").to_owned()).collect()
    };
    let published = |app: &TestApp| {
        let http = app.http;
        async move {
            let (_, _, body) =
                crate::helpers::http(http, "GET", "/.well-known/jwks.json", &[]).await;
            kids(&body)
        }
    };
    let before = published(&upstream).await;
    assert_eq!(before.len(), 1);
    assert_eq!(published(&follower).await, before);

    let db = upstream.stop().await;
    let mut config = test_config(&db);
    config.listen = addr.to_string().parse().expect("address");
    config.signing_key = paths.clone();
    let upstream = start(config, db).await;
    let after = published(&upstream).await;
    assert_eq!(after.len(), 2);
    wait_for(Duration::from_secs(10), "the follower to publish the new key", || async {
        (published(&follower).await == after).then_some(())
    })
    .await;
}
