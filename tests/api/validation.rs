//! Every identifier rule and limit: `INVALID_ARGUMENT` naming the field, nothing written,
//! and the server keeps serving.

use rolecheck::pb;
use tonic::{Code, Status};

use crate::{
    conformance,
    helpers::{Backend, TestApp, spawn},
};

fn assert_invalid(result: Result<impl std::fmt::Debug, Status>, field: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{field}:")),
        "message names {field}: {}",
        status.message()
    );
}

fn check(user: &str, tenant: &str, role: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        permission: String::new(),
        user_id: user.into(),
        tenant_id: tenant.into(),
        role: role.into(),
        min_revision: 0,
    }
}

fn grant(user: &str, tenant: &str, roles: Vec<String>) -> pb::GrantRequest {
    pb::GrantRequest { user_id: user.into(), tenant_id: tenant.into(), roles, expires_at: None }
}

/// The store's current revision (ListMembers reads the store, not the cache).
async fn revision(app: &TestApp) -> u64 {
    let req = pb::ListMembersRequest::default();
    app.checks.clone().list_members(req).await.unwrap().into_inner().revision
}

async fn identifiers_at_and_past_their_limits(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = app.checks.clone();
    let tenant64 = "t".repeat(64);
    app.create_tenant(&tenant64).await;
    let before = revision(&app).await;

    // At the limit: accepted.
    let user128 = "~".repeat(128);
    let role64 = "r:".repeat(32);
    c.grant(grant(&user128, &tenant64, vec![role64.clone()])).await.unwrap();
    assert!(app.check(&user128, &tenant64, &role64).await);
    let max_roles: Vec<String> = (0..32).map(|i| format!("role{i}")).collect();
    c.grant(grant("u", &tenant64, max_roles)).await.unwrap();

    // Past the limit or outside the alphabet: refused, naming the field.
    let written = revision(&app).await;
    for (user, tenant, role, field) in [
        ("", "acme", "r", "user_id"),
        (&*"u".repeat(129), "acme", "r", "user_id"),
        ("a b", "acme", "r", "user_id"),
        ("é", "acme", "r", "user_id"),
        ("tab\t", "acme", "r", "user_id"),
        ("u", &*"t".repeat(65), "r", "tenant_id"),
        ("u", "a:b", "r", "tenant_id"),
        ("u", "a/b", "r", "tenant_id"),
        ("u", "acme", "", "role"),
        ("u", "acme", &*"r".repeat(65), "role"),
        ("u", "acme", "a b", "role"),
        ("u", "acme", "a/b", "role"),
    ] {
        assert_invalid(c.check(check(user, tenant, role)).await, field);
        assert_invalid(
            c.grant(grant(user, tenant, vec![role.into()])).await,
            if role.is_empty() || field == "role" { "roles" } else { field },
        );
    }
    let too_many: Vec<String> = (0..33).map(|i| format!("role{i}")).collect();
    assert_invalid(c.grant(grant("u", &tenant64, too_many.clone())).await, "roles");
    assert_invalid(
        c.revoke(pb::RevokeRequest {
            user_id: "u".into(),
            tenant_id: tenant64.clone(),
            roles: too_many.clone(),
        })
        .await,
        "roles",
    );
    assert_invalid(
        c.set_roles(pb::SetRolesRequest {
            user_id: "u".into(),
            tenant_id: tenant64.clone(),
            roles: too_many,
            expires_at: None,
        })
        .await,
        "roles",
    );
    assert_invalid(c.grant(grant("u", &tenant64, vec![])).await, "roles");
    let past = prost_types::Timestamp { seconds: 1_000_000, nanos: 0 };
    assert_invalid(
        c.grant(pb::GrantRequest {
            expires_at: Some(past),
            ..grant("u", &tenant64, vec!["r".into()])
        })
        .await,
        "expires_at",
    );
    assert_invalid(
        c.get_authorization(pb::GetAuthorizationRequest {
            expand: false,
            user_id: String::new(),
            min_revision: 0,
            with_expiry: false,
        })
        .await,
        "user_id",
    );
    assert_eq!(revision(&app).await, written, "nothing refused was written");
    assert!(written > before);
}

async fn batch_and_page_limits(backend: Backend) {
    let app = spawn(backend).await;
    let mut c = app.checks.clone();
    let too_big = pb::CheckBatchRequest {
        checks: (0..1001).map(|_| check("u", "", "r")).collect(),
        min_revision: 0,
    };
    assert_invalid(c.check_batch(too_big).await, "checks");
    let bad_item = pb::CheckBatchRequest {
        checks: vec![check("u", "", "r"), check("u", "", "bad role")],
        min_revision: 0,
    };
    assert_invalid(c.check_batch(bad_item).await, "checks[1].role");
    let empty = c.check_batch(pb::CheckBatchRequest::default()).await.unwrap().into_inner();
    assert!(empty.results.is_empty());

    assert_invalid(
        c.list_members(pb::ListMembersRequest {
            tenant_id: String::new(),
            page_size: 1001,
            page_token: String::new(),
        })
        .await,
        "page_size",
    );
    assert_invalid(
        c.list_members(pb::ListMembersRequest {
            tenant_id: String::new(),
            page_size: 0,
            page_token: "garbage!".into(),
        })
        .await,
        "page_token",
    );
    let mut t = app.tenants.clone();
    assert_invalid(
        t.list_tenants(pb::ListTenantsRequest { page_size: 5000, page_token: String::new() }).await,
        "page_size",
    );
    assert_invalid(
        t.get_tenant(pb::GetTenantRequest { tenant_id: String::new() }).await,
        "tenant_id",
    );
    assert_invalid(
        t.create_tenant(pb::CreateTenantRequest { tenant_id: "ok".into(), name: String::new() })
            .await,
        "name",
    );
    assert_invalid(
        t.create_tenant(pb::CreateTenantRequest {
            tenant_id: "no spaces".into(),
            name: "n".into(),
        })
        .await,
        "tenant_id",
    );
    assert_invalid(
        t.delete_tenant(pb::DeleteTenantRequest { tenant_id: "bad/id".into() }).await,
        "tenant_id",
    );

    // Still serving after all of that.
    app.create_tenant("ok").await;
    app.grant("u", "ok", &["r"]).await;
    assert!(app.check("u", "ok", "r").await);
}

async fn oversized_messages_are_refused(backend: Backend) {
    let app = crate::helpers::spawn_with(backend, |c| c.max_message_bytes = 64 * 1024).await;
    let mut c = app.checks.clone();
    let huge = pb::CheckBatchRequest {
        checks: (0..1000).map(|_| check(&"u".repeat(100), "", "r")).collect(),
        min_revision: 0,
    };
    let status = c.check_batch(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("--max-message-bytes (65536 bytes)"), "{status:?}");
    assert!(!app.check("u", "", "r").await, "still serving");
}

conformance!(
    identifiers_at_and_past_their_limits,
    batch_and_page_limits,
    oversized_messages_are_refused,
);
