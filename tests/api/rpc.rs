//! Every RPC's normal path, idempotency, expiry, pagination and tenant deletion.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rolecheck::pb;
use tonic::Code;

use crate::{
    conformance,
    helpers::{Backend, authz, spawn, spawn_with, wait_for},
};

async fn seed_example_reads_back_through_get_authorization(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("nz569yb7").await;
    app.create_tenant("a5h281k8").await;
    app.grant("1", "nz569yb7", &["admin"]).await;
    let last = app.grant("1", "a5h281k8", &["viewer", "support"]).await;

    let got = app
        .checks
        .clone()
        .get_authorization(pb::GetAuthorizationRequest {
            expand: false,
            user_id: "1".into(),
            min_revision: last,
            with_expiry: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.revision, last);
    let object: std::collections::BTreeMap<_, _> =
        got.authorization.into_iter().map(|(t, r)| (t, r.roles)).collect();
    assert_eq!(object, authz(&[("nz569yb7", &["admin"]), ("a5h281k8", &["support", "viewer"])]));
    assert!(app.check("1", "nz569yb7", "admin").await);
    assert!(!app.check("1", "nz569yb7", "viewer").await);
    assert!(app.check("1", "a5h281k8", "support").await);
}

async fn grant_check_revoke_and_application_tenant(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    assert!(!app.check("u1", "acme", "admin").await, "unknown user is simply denied");
    assert!(!app.check("u1", "nope", "admin").await, "unknown tenant is simply denied");

    let r1 = app.grant("u1", "acme", &["admin", "viewer", "admin"]).await;
    assert!(app.check("u1", "acme", "admin").await);
    assert!(!app.check("u1", "acme", "Admin").await, "comparison is case-sensitive");
    assert!(!app.check("u2", "acme", "admin").await);

    // Empty tenant_id is the application tenant, also reachable by its id.
    let r2 = app.grant("u1", "", &["superuser"]).await;
    assert!(r2 > r1);
    assert!(app.check("u1", "app", "superuser").await);
    assert!(app.check("u1", "", "superuser").await);
    assert_eq!(
        app.authorization("u1").await,
        authz(&[("acme", &["admin", "viewer"]), ("app", &["superuser"])])
    );

    let r3 = app.revoke("u1", "acme", &["admin"]).await;
    assert!(r3 > r2);
    assert!(!app.check("u1", "acme", "admin").await);
    assert!(app.check("u1", "acme", "viewer").await);

    // Revoke with no roles removes the user from the tenant.
    app.revoke("u1", "acme", &[]).await;
    assert_eq!(app.authorization("u1").await, authz(&[("app", &["superuser"])]));
}

async fn grant_and_revoke_are_idempotent(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    let a = app.grant("u1", "acme", &["admin"]).await;
    let b = app.grant("u1", "acme", &["admin"]).await;
    assert!(b > a, "every committed write gets its own revision");
    assert_eq!(app.authorization("u1").await, authz(&[("acme", &["admin"])]));
    app.revoke("u1", "acme", &["admin"]).await;
    app.revoke("u1", "acme", &["admin"]).await;
    app.revoke("u1", "acme", &[]).await;
    assert!(app.authorization("u1").await.is_empty());
}

async fn set_roles_replaces_exactly(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    app.grant("u1", "acme", &["a", "b"]).await;
    let mut checks = app.checks.clone();
    let set = |roles: &[&str]| pb::SetRolesRequest {
        user_id: "u1".into(),
        tenant_id: "acme".into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        expires_at: None,
    };
    checks.set_roles(set(&["c", "b", "c"])).await.unwrap();
    assert_eq!(app.authorization("u1").await, authz(&[("acme", &["b", "c"])]));
    assert!(!app.check("u1", "acme", "a").await);
    checks.set_roles(set(&[])).await.unwrap();
    assert!(app.authorization("u1").await.is_empty());
    let err = checks
        .set_roles(pb::SetRolesRequest { tenant_id: "missing".into(), ..set(&["a"]) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Concurrent writes (on Postgres, group-committed together): a write to a missing
/// tenant fails alone with NOT_FOUND, every other one lands with its own revision.
async fn concurrent_writes_fail_alone(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    let writes = (0..30).map(|i| {
        let mut checks = app.checks.clone();
        async move {
            let tenant = if i % 6 == 5 { "missing" } else { "acme" };
            let req = pb::GrantRequest {
                user_id: format!("w{i}"),
                tenant_id: tenant.into(),
                roles: vec!["admin".into()],
                expires_at: None,
            };
            (i, checks.grant(req).await)
        }
    });
    let mut revisions = Vec::new();
    for (i, outcome) in futures::future::join_all(writes).await {
        if i % 6 == 5 {
            assert_eq!(outcome.expect_err("missing tenant").code(), Code::NotFound, "w{i}");
            assert!(!app.check(&format!("w{i}"), "acme", "admin").await);
        } else {
            revisions.push(outcome.expect("grant").into_inner().revision);
            assert!(app.check(&format!("w{i}"), "acme", "admin").await, "w{i}");
        }
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 25, "one revision per landed write");
    assert_eq!(revisions[24] - revisions[0], 24, "contiguous: {revisions:?}");
}

/// Many users read at once, each a cache miss (on Postgres, coalesced into shared
/// queries): every user gets exactly its own roles, and a user without any gets none.
async fn concurrent_misses_get_their_own_roles(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    for i in 0..40 {
        app.grant(&format!("u{i}"), "acme", &[&format!("r{i}")]).await;
    }
    let reads = (0..41).map(|i| {
        let mut checks = app.checks.clone();
        async move {
            let req = pb::GetAuthorizationRequest {
                expand: false,
                user_id: format!("u{i}"),
                min_revision: 0,
                with_expiry: false,
            };
            (i, checks.get_authorization(req).await.expect("GetAuthorization").into_inner())
        }
    });
    for (i, got) in futures::future::join_all(reads).await {
        let roles: Vec<(String, Vec<String>)> =
            got.authorization.into_iter().map(|(t, r)| (t, r.roles)).collect();
        let want = if i < 40 { vec![("acme".to_owned(), vec![format!("r{i}")])] } else { vec![] };
        assert_eq!(roles, want, "user u{i}");
    }
    let check = |u: usize, r: usize| pb::CheckRequest {
        permission: String::new(),
        user_id: format!("u{u}"),
        tenant_id: "acme".into(),
        role: format!("r{r}"),
        min_revision: 0,
    };
    let pairs: Vec<(usize, usize)> = (0..100).map(|k| (k % 40, (k * 7) % 40)).collect();
    let batch = pb::CheckBatchRequest {
        checks: pairs.iter().map(|&(u, r)| check(u, r)).collect(),
        min_revision: 0,
    };
    let got = app.checks.clone().check_batch(batch).await.unwrap().into_inner();
    for (result, (u, r)) in got.results.iter().zip(&pairs) {
        assert_eq!(result.allowed, u == r, "u{u} r{r}");
    }
}

async fn check_batch_answers_in_order(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    let last = app.grant("u1", "acme", &["admin"]).await;
    app.grant("u2", "", &["viewer"]).await;
    let check = |u: &str, t: &str, r: &str| pb::CheckRequest {
        permission: String::new(),
        user_id: u.into(),
        tenant_id: t.into(),
        role: r.into(),
        min_revision: 0,
    };
    let batch = pb::CheckBatchRequest {
        checks: vec![
            check("u1", "acme", "admin"),
            check("u2", "acme", "admin"),
            check("u2", "", "viewer"),
            check("u1", "acme", "viewer"),
            check("u1", "acme", "admin"),
        ],
        min_revision: last,
    };
    let got = app.checks.clone().check_batch(batch).await.unwrap().into_inner();
    let allowed: Vec<bool> = got.results.iter().map(|r| r.allowed).collect();
    assert_eq!(allowed, [true, false, true, false, true]);
    assert!(got.revision >= last);

    let full = pb::CheckBatchRequest {
        checks: (0..1000).map(|i| check(&format!("u{}", i % 3), "acme", "admin")).collect(),
        min_revision: 0,
    };
    let got = app.checks.clone().check_batch(full).await.unwrap().into_inner();
    assert_eq!(got.results.len(), 1000);
    assert!(got.results[1].allowed && !got.results[0].allowed && !got.results[2].allowed);
}

async fn tenants_create_get_and_generate_ids(backend: Backend) {
    let app = spawn(backend).await;
    let mut tenants = app.tenants.clone();
    let made = app.create_tenant("acme").await;
    assert_eq!(made.name, "Tenant acme");
    let got = tenants
        .get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, made);
    let again = tenants
        .create_tenant(pb::CreateTenantRequest { tenant_id: "acme".into(), name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    let generated = tenants
        .create_tenant(pb::CreateTenantRequest { tenant_id: String::new(), name: "Gen".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.tenant_id.len(), 8);
    assert!(generated.tenant_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    let missing =
        tenants.get_tenant(pb::GetTenantRequest { tenant_id: "missing".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let grant = app
        .checks
        .clone()
        .grant(pb::GrantRequest {
            user_id: "u".into(),
            tenant_id: "missing".into(),
            roles: vec!["r".into()],
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(grant.code(), Code::NotFound, "grant in an unknown tenant");
    // A Revoke there changes nothing and succeeds: a retry after DeleteTenant is not an
    // error. It answers the current revision and commits none.
    let current = app.grant("u", "acme", &["r"]).await;
    let revoke = pb::RevokeRequest {
        user_id: "u".into(),
        tenant_id: "missing".into(),
        roles: vec!["r".into()],
    };
    let revoked = app.checks.clone().revoke(revoke.clone()).await.expect("a no-op revoke");
    assert_eq!(revoked.into_inner().revision, current);
    let all = pb::RevokeRequest { roles: Vec::new(), ..revoke };
    let revoked = app.checks.clone().revoke(all).await.expect("a no-op revoke of every role");
    assert_eq!(revoked.into_inner().revision, current);
    assert!(app.check("u", "acme", "r").await, "nothing else changed");
}

async fn delete_tenant_removes_every_membership(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    app.create_tenant("other").await;
    for i in 0..20 {
        app.grant(&format!("u{i}"), "acme", &["admin", "viewer"]).await;
    }
    app.grant("u1", "other", &["admin"]).await;
    assert!(app.check("u1", "acme", "admin").await, "cached before the delete");

    let mut tenants = app.tenants.clone();
    tenants.delete_tenant(pb::DeleteTenantRequest { tenant_id: "acme".into() }).await.unwrap();
    assert!(!app.check("u1", "acme", "admin").await);
    assert_eq!(app.authorization("u1").await, authz(&[("other", &["admin"])]));
    let gone =
        tenants.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let again = tenants
        .delete_tenant(pb::DeleteTenantRequest { tenant_id: "acme".into() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // Re-creating the id starts empty.
    app.create_tenant("acme").await;
    let members = app
        .checks
        .clone()
        .list_members(pb::ListMembersRequest { tenant_id: "acme".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(members.members.is_empty());
    assert!(!app.check("u3", "acme", "viewer").await);

    let app_tenant = tenants
        .delete_tenant(pb::DeleteTenantRequest { tenant_id: "app".into() })
        .await
        .unwrap_err();
    assert_eq!(app_tenant.code(), Code::FailedPrecondition);
}

async fn list_members_pages_across_boundaries(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    let mut expected = Vec::new();
    for i in 0..25 {
        let user = format!("user-{i:02}");
        app.grant(&user, "acme", &["viewer", "admin"]).await;
        expected.push(user);
    }
    app.grant("someone-else", "", &["admin"]).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .checks
            .clone()
            .list_members(pb::ListMembersRequest {
                tenant_id: "acme".into(),
                page_size: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        for member in &page.members {
            assert_eq!(member.roles, ["admin", "viewer"]);
        }
        seen.extend(page.members.into_iter().map(|m| m.user_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);

    // Tenants page the same way, the application tenant included.
    for i in 0..11 {
        app.create_tenant(&format!("t{i:02}")).await;
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .tenants
            .clone()
            .list_tenants(pb::ListTenantsRequest { page_size: 5, page_token: token })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tenants.len() <= 5);
        ids.extend(page.tenants.into_iter().map(|t| t.tenant_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "ordered, without repeats");
    assert_eq!(ids.len(), 13, "11 + acme + app");
}

fn in_seconds(secs: u64) -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    prost_types::Timestamp { seconds: (now + secs) as i64, nanos: 0 }
}

async fn expired_roles_never_allow(backend: Backend, cache_capacity: u64) {
    let app = spawn_with(backend, |c| c.cache_capacity = cache_capacity).await;
    app.create_tenant("acme").await;
    let expires = in_seconds(2);
    app.checks
        .clone()
        .grant(pb::GrantRequest {
            user_id: "u1".into(),
            tenant_id: "acme".into(),
            roles: vec!["temp".into()],
            expires_at: Some(expires),
        })
        .await
        .unwrap();
    app.grant("u1", "acme", &["keep"]).await;
    assert!(app.check("u1", "acme", "temp").await, "allowed before expiry (and now cached)");
    wait_for(Duration::from_secs(6), "the role to expire", || async {
        (!app.check("u1", "acme", "temp").await).then_some(())
    })
    .await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(now >= expires.seconds, "denied no earlier than the expiry second");
    assert_eq!(app.authorization("u1").await, authz(&[("acme", &["keep"])]));
    let members = app
        .checks
        .clone()
        .list_members(pb::ListMembersRequest { tenant_id: "acme".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members.members[0].roles, ["keep"]);

    // Re-granting updates the expiry: without one, the role is back for good.
    app.grant("u1", "acme", &["temp"]).await;
    assert!(app.check("u1", "acme", "temp").await);
}

async fn expiry_cached(backend: Backend) {
    expired_roles_never_allow(backend, 1000).await;
}

async fn expiry_uncached(backend: Backend) {
    expired_roles_never_allow(backend, 0).await;
}

async fn check_after_revoke_never_allows(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    for _ in 0..100 {
        app.grant("u1", "acme", &["admin"]).await;
        assert!(app.check("u1", "acme", "admin").await);
        app.revoke("u1", "acme", &["admin"]).await;
        assert!(!app.check("u1", "acme", "admin").await, "stale allow after Revoke");
    }
}

async fn reads_report_the_revision_they_reflect(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    let w = app.grant("u1", "acme", &["admin"]).await;
    let got = app
        .checks
        .clone()
        .check(pb::CheckRequest {
            permission: String::new(),
            user_id: "u1".into(),
            tenant_id: "acme".into(),
            role: "admin".into(),
            min_revision: w,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.allowed && got.revision >= w);
    let ahead = app
        .checks
        .clone()
        .check(pb::CheckRequest {
            permission: String::new(),
            user_id: "u1".into(),
            tenant_id: "acme".into(),
            role: "admin".into(),
            min_revision: w + 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::OutOfRange);
}

async fn data_survives_a_restart(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    let written = app.grant("u1", "acme", &["admin"]).await;
    let db = app.stop().await;
    let config = crate::helpers::test_config(&db);
    let app = crate::helpers::start(config, db).await;
    assert!(app.check("u1", "acme", "admin").await);
    let w2 = app.grant("u2", "acme", &["viewer"]).await;
    assert_eq!(w2, written + 1, "revisions continue where they were");
}

// `data_survives_a_restart` runs against the stores only: a follower keeps no data of its
// own (it restarts cold and catches up; the process test
// `a_follower_fails_closed_when_its_upstream_dies_and_resumes_when_it_returns` restarts
// the upstream under one).
conformance!(
    seed_example_reads_back_through_get_authorization,
    grant_check_revoke_and_application_tenant,
    grant_and_revoke_are_idempotent,
    set_roles_replaces_exactly,
    check_batch_answers_in_order,
    concurrent_misses_get_their_own_roles,
    concurrent_writes_fail_alone,
    tenants_create_get_and_generate_ids,
    delete_tenant_removes_every_membership,
    list_members_pages_across_boundaries,
    expiry_cached,
    expiry_uncached,
    check_after_revoke_never_allows,
    reads_report_the_revision_they_reflect,
    ;
    stores_only: data_survives_a_restart,
);
