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
async fn follower_of(upstream: &TestApp) -> TestApp {
    let db = TestDb::Sqlite(tempfile::tempdir().expect("dir"));
    let mut config = test_config(&db);
    config.upstream = Some(format!("http://{}", upstream.addr));
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
        Backend::Postgres => {
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
