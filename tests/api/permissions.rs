//! The model over the API: a role hierarchy and permissions set once for every tenant,
//! checked by role and by permission, refused whole when wrong, and followed at the
//! revision that set it (on both stores, and through a follower).

use rolecheck::pb;
use tonic::Code;

use crate::{
    conformance,
    helpers::{Backend, TestApp, spawn},
};

/// The contract's example (CONTRACT, "The model").
pub const EXAMPLE: &str = r#"
[roles.viewer]
[roles.editor]
includes = ["viewer"]            # an editor is also a viewer
[roles.admin]
includes = ["editor"]
[roles.billing]
[roles.support-agent]            # held in the application tenant...
in_every_tenant = ["viewer"]     # ...acts as viewer in every tenant

[permissions]
"invoice.read" = ["viewer"]
"invoice.pay"  = ["admin", "billing"]
"#;

async fn set_model(app: &TestApp, model: &str) -> Result<u64, tonic::Status> {
    let request = pb::SetModelRequest { model: model.into() };
    Ok(app.checks.clone().set_model(request).await?.into_inner().revision)
}

async fn get_model(app: &TestApp) -> pb::GetModelResponse {
    let request = pb::GetModelRequest { min_revision: 0 };
    app.checks.clone().get_model(request).await.expect("GetModel").into_inner()
}

fn asking(user: &str, tenant: &str, role: &str, permission: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        user_id: user.into(),
        tenant_id: tenant.into(),
        role: role.into(),
        permission: permission.into(),
        min_revision: 0,
    }
}

/// Whether `user` holds `role` in `tenant`, at least at `revision`.
async fn holds(app: &TestApp, user: &str, tenant: &str, role: &str, revision: u64) -> bool {
    let request = pb::CheckRequest { min_revision: revision, ..asking(user, tenant, role, "") };
    let answer = app.checks.clone().check(request).await.expect("Check").into_inner();
    assert!(answer.revision >= revision, "answered at {} < {revision}", answer.revision);
    answer.allowed
}

/// Whether `user` has `permission` in `tenant`, at least at `revision`.
async fn has(app: &TestApp, user: &str, tenant: &str, permission: &str, revision: u64) -> bool {
    let request =
        pb::CheckRequest { min_revision: revision, ..asking(user, tenant, "", permission) };
    app.checks.clone().check(request).await.expect("Check").into_inner().allowed
}

/// The seed's user 1 under the contract's model: admin (so editor and viewer) in acme,
/// billing in globex, support-agent in the application tenant (so viewer everywhere).
async fn the_model_gives_held_roles_and_permissions(backend: Backend) {
    let app = spawn(backend).await;
    for tenant in ["acme", "globex", "initech"] {
        app.create_tenant(tenant).await;
    }
    app.grant("1", "acme", &["admin", "x"]).await;
    app.grant("1", "globex", &["billing"]).await;
    app.grant("1", "", &["support-agent"]).await;
    app.grant("2", "acme", &["editor"]).await;
    // Without a model: roles exact, no permission.
    assert!(!app.check("1", "acme", "editor").await);
    assert!(!has(&app, "1", "acme", "invoice.pay", 0).await);
    assert_eq!(get_model(&app).await, pb::GetModelResponse::default());

    let set = set_model(&app, EXAMPLE).await.expect("SetModel");
    for (tenant, role, held) in [
        ("acme", "admin", true),
        ("acme", "editor", true),
        ("acme", "viewer", true),
        ("acme", "x", true),
        ("acme", "billing", false),
        ("globex", "billing", true),
        ("globex", "editor", false),
        ("globex", "viewer", true),
        ("initech", "viewer", true),
        ("initech", "editor", false),
        ("", "support-agent", true),
        ("", "viewer", true),
    ] {
        assert_eq!(holds(&app, "1", tenant, role, set).await, held, "user 1, {role} in {tenant:?}");
    }
    for (tenant, permission, granted) in [
        ("acme", "invoice.pay", true),
        ("acme", "invoice.read", true),
        ("globex", "invoice.pay", true),
        ("initech", "invoice.read", true),
        ("initech", "invoice.pay", false),
        ("acme", "invoice.void", false),
    ] {
        assert_eq!(
            has(&app, "1", tenant, permission, set).await,
            granted,
            "{permission} in {tenant}"
        );
    }
    assert!(holds(&app, "2", "acme", "viewer", set).await);
    assert!(!holds(&app, "2", "acme", "admin", set).await);
    assert!(!has(&app, "2", "acme", "invoice.pay", set).await);
    assert!(!holds(&app, "2", "globex", "viewer", set).await, "user 2 is no support agent");

    // CheckBatch: roles and permissions mixed, answered in order.
    let checks = vec![
        asking("1", "acme", "", "invoice.pay"),
        asking("2", "acme", "viewer", ""),
        asking("2", "acme", "", "invoice.pay"),
        asking("1", "globex", "editor", ""),
    ];
    let batch = pb::CheckBatchRequest { checks, min_revision: set };
    let answers = app.checks.clone().check_batch(batch).await.expect("CheckBatch").into_inner();
    let allowed: Vec<bool> = answers.results.iter().map(|r| r.allowed).collect();
    assert_eq!(allowed, [true, true, false, false]);

    // The model reads back as set, at the revision that set it, and is in the history.
    let model = get_model(&app).await;
    assert_eq!((model.model.as_str(), model.model_revision), (EXAMPLE, set));
    let request = pb::ListChangesRequest { after_revision: set - 1, ..Default::default() };
    let page = app.checks.clone().list_changes(request).await.expect("ListChanges").into_inner();
    let entry = page.entries.first().expect("the model's change");
    let change = entry.change.as_ref().expect("a change");
    assert_eq!((entry.revision, change.kind()), (set, pb::ChangeKind::ModelChanged));
    assert!(change.tenant_id.is_empty() && change.user_id.is_empty(), "{change:?}");
    // GetAuthorization and tokens keep the granted roles.
    assert_eq!(app.authorization("2").await["acme"], ["editor"]);
}

/// A change of the model applies from its revision on: editor stops including viewer.
async fn a_model_change_applies_from_its_revision(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    app.grant("u", "acme", &["editor"]).await;
    let first = set_model(&app, EXAMPLE).await.expect("SetModel");
    assert!(holds(&app, "u", "acme", "viewer", first).await);
    assert!(has(&app, "u", "acme", "invoice.read", first).await);
    let flat = "[roles.viewer]\n[roles.editor]\n[permissions]\n\"invoice.read\" = [\"viewer\"]\n";
    let second = set_model(&app, flat).await.expect("SetModel");
    assert!(second > first);
    assert!(!holds(&app, "u", "acme", "viewer", second).await);
    assert!(!has(&app, "u", "acme", "invoice.read", second).await);
    assert!(holds(&app, "u", "acme", "editor", second).await);
    // An empty model removes it: exact roles again, no permissions.
    let none = set_model(&app, "").await.expect("SetModel");
    assert!(!has(&app, "u", "acme", "invoice.read", none).await);
    assert!(holds(&app, "u", "acme", "editor", none).await);
    assert_eq!(get_model(&app).await.model_revision, none);
}

/// A model with problems is INVALID_ARGUMENT naming each, with its line, and nothing
/// changes: the model in effect, and the revision.
async fn a_bad_model_is_refused_whole(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    let set = set_model(&app, EXAMPLE).await.expect("SetModel");
    let bad = "[roles.a]\nincludes = [\"b\"]\n[roles.b]\nincludes = [\"a\", \"ghost\"]\n";
    let status = set_model(&app, bad).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("line 3, roles.b.includes: names the role \"ghost\""),
        "{}",
        status.message()
    );
    let cycle = "[roles.a]\nincludes = [\"b\"]\n[roles.b]\nincludes = [\"a\"]\n";
    let status = set_model(&app, cycle).await.expect_err("refused");
    assert!(status.message().contains("a cycle: a includes b includes a"), "{}", status.message());
    let status = set_model(&app, "[roles.a\n").await.expect_err("refused");
    assert!(status.message().starts_with("model: line 1"), "{}", status.message());
    let model = get_model(&app).await;
    assert_eq!((model.model.as_str(), model.model_revision), (EXAMPLE, set));
    let after = app.grant("u", "acme", &["admin"]).await;
    assert_eq!(after, set + 1, "no revision was taken by a refused model");
    assert!(holds(&app, "u", "acme", "viewer", after).await);
}

/// A check asks a role or a permission, never both, and a permission is named as a role is.
async fn a_check_asks_a_role_or_a_permission(backend: Backend) {
    let app = spawn(backend).await;
    for (request, field) in [
        (asking("u", "acme", "admin", "invoice.pay"), "permission"),
        (asking("u", "acme", "", "has space"), "permission"),
        (asking("u", "acme", "", ""), "role"),
    ] {
        let status = app.checks.clone().check(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(&format!("{field}:")), "{}", status.message());
    }
}

/// A strict model refuses Grant and SetRoles of a role it does not declare; Revoke can
/// still take one away.
async fn a_strict_model_refuses_undeclared_roles(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    app.grant("u", "acme", &["legacy"]).await;
    set_model(&app, &format!("strict = true\n{EXAMPLE}")).await.expect("SetModel");
    let roles = vec!["viewer".to_owned(), "legacy2".to_owned()];
    let grant = pb::GrantRequest {
        user_id: "u".into(),
        tenant_id: "acme".into(),
        roles: roles.clone(),
        expires_at: None,
    };
    let status = app.checks.clone().grant(grant).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("legacy2 is not a role the model declares"),
        "{}",
        status.message()
    );
    let set_roles = pb::SetRolesRequest {
        user_id: "u".into(),
        tenant_id: "acme".into(),
        roles,
        expires_at: None,
    };
    let status = app.checks.clone().set_roles(set_roles).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let granted = app.grant("u", "acme", &["viewer"]).await;
    assert!(holds(&app, "u", "acme", "legacy", granted).await, "held exactly, as granted");
    let revoke = pb::RevokeRequest {
        user_id: "u".into(),
        tenant_id: "acme".into(),
        roles: vec!["legacy".into()],
    };
    let revoked = app.checks.clone().revoke(revoke).await.expect("Revoke").into_inner().revision;
    assert!(!holds(&app, "u", "acme", "legacy", revoked).await);
    // Not strict any more: grantable again.
    set_model(&app, EXAMPLE).await.expect("SetModel");
    app.grant("u", "acme", &["legacy2"]).await;
}

/// GetAuthorization with `expand` lists the roles held by implication and the
/// permissions; without it, the granted roles alone, as tokens carry them.
async fn expand_lists_implied_roles_and_permissions(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    app.grant("1", "acme", &["admin"]).await;
    app.grant("1", "", &["support-agent"]).await;
    let set = set_model(&app, EXAMPLE).await.expect("SetModel");
    let read = |expand| pb::GetAuthorizationRequest {
        user_id: "1".into(),
        min_revision: set,
        with_expiry: false,
        expand,
    };
    let expanded =
        app.checks.clone().get_authorization(read(true)).await.expect("expand").into_inner();
    let acme = &expanded.authorization["acme"];
    assert_eq!(acme.roles, ["admin", "editor", "viewer"]);
    assert_eq!(acme.permissions, ["invoice.pay", "invoice.read"]);
    let application = &expanded.authorization["app"];
    assert_eq!(application.roles, ["support-agent", "viewer"]);
    assert_eq!(application.permissions, ["invoice.read"]);
    assert_eq!(expanded.model_revision, set);
    let plain =
        app.checks.clone().get_authorization(read(false)).await.expect("plain").into_inner();
    assert_eq!(plain.authorization["acme"].roles, ["admin"]);
    assert!(plain.authorization["acme"].permissions.is_empty());
}

/// The claims of a token (its signature is checked by the token suite).
fn claims(token: &str) -> serde_json::Value {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let payload = token.split('.').nth(1).expect("a JWS");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("JSON")
}

/// Issue with `expand` carries the roles held by implication and the permissions; without
/// it, the token is as it always was (no `permissions` key).
async fn an_expanded_token_carries_the_model(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("acme").await;
    app.grant("1", "acme", &["admin"]).await;
    let set = set_model(&app, EXAMPLE).await.expect("SetModel");
    let issue = |expand| pb::IssueRequest {
        user_id: "1".into(),
        ttl_seconds: 0,
        tenant_ids: Vec::new(),
        min_revision: set,
        expand,
    };
    let token = app.checks.clone().issue(issue(true)).await.expect("Issue").into_inner();
    let expanded_bytes = token.access_token.len();
    let expanded = claims(&token.access_token);
    assert_eq!(
        expanded["authorization"]["acme"],
        serde_json::json!({
            "roles": ["admin", "editor", "viewer"],
            "permissions": ["invoice.pay", "invoice.read"],
        })
    );
    let token = app.checks.clone().issue(issue(false)).await.expect("Issue").into_inner();
    let plain = claims(&token.access_token);
    assert_eq!(plain["authorization"], serde_json::json!({ "acme": { "roles": ["admin"] } }));
    eprintln!("token: {} bytes, expanded {expanded_bytes}", token.access_token.len());
}

/// Tokens are signed by the embedded store's generated key (the Postgres test servers
/// hold none): here, and through a follower, which relays Issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expanded_token_carries_the_model_here_and_through_a_follower() {
    an_expanded_token_carries_the_model(Backend::Sqlite).await;
    crate::helpers::through_follower(an_expanded_token_carries_the_model(Backend::Sqlite)).await;
}

conformance!(
    a_strict_model_refuses_undeclared_roles,
    expand_lists_implied_roles_and_permissions,
    the_model_gives_held_roles_and_permissions,
    a_model_change_applies_from_its_revision,
    a_bad_model_is_refused_whole,
    a_check_asks_a_role_or_a_permission,
);

/// Models that tell apart a mixed answer: under `NESTED` an editor is a viewer, under
/// `FLAT` not.
const NESTED: &str = "[roles.viewer]\n[roles.editor]\nincludes = [\"viewer\"]\n";
const FLAT: &str = "[roles.viewer]\n[roles.editor]\n";

/// The model changes under load: a writer on one replica alternates the model (nested,
/// flat) and user u's roles (editor, viewer) while readers ask, on two replicas and a
/// follower of each, whether u is a viewer, at `min_revision`s the writer reached. Every
/// answer is the truth at the revision it reports: the model and the roles of that one
/// revision, never one's roles under the other's model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_change_under_load_is_never_mixed_with_other_roles() {
    crate::helpers::through_follower(async {
        let follower = spawn(Backend::Postgres).await;
        let other_follower = follower.replica(|_| {}).await;
        let first = follower.upstream.as_deref().expect("the follower's upstream");
        let second = other_follower.upstream.as_deref().expect("the other's upstream");
        first.create_tenant("acme").await;
        let granted = first.grant("u", "acme", &["editor"]).await;
        let start = set_model(first, NESTED).await.expect("SetModel");
        // (revision, the model: None without one, else whether nested; u is an editor,
        // else a viewer, else nothing): the truth from each write on.
        let truth = std::sync::Arc::new(std::sync::Mutex::new(vec![
            (0, None, None),
            (granted, None, Some(true)),
            (start, Some(true), Some(true)),
        ]));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for app in [first, second, &follower, &other_follower] {
            let (mut checks, truth, done) = (app.checks.clone(), truth.clone(), done.clone());
            readers.push(tokio::spawn(async move {
                let mut answers = Vec::new();
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let known = truth.lock().expect("truth").last().map_or(0, |t| t.0);
                    for min_revision in [0, known] {
                        let request =
                            pb::CheckRequest { min_revision, ..asking("u", "acme", "viewer", "") };
                        match checks.check(request).await {
                            Ok(answer) => {
                                let answer = answer.into_inner();
                                answers.push((answer.revision, answer.allowed));
                            }
                            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status}"),
                        }
                    }
                }
                answers
            }));
        }
        let (mut nested, mut editor) = (true, true);
        for step in 0..40 {
            let revision = if step % 2 == 0 {
                nested = !nested;
                set_model(first, if nested { NESTED } else { FLAT }).await.expect("SetModel")
            } else {
                editor = !editor;
                let roles = vec![if editor { "editor" } else { "viewer" }.to_owned()];
                let request = pb::SetRolesRequest {
                    user_id: "u".into(),
                    tenant_id: "acme".into(),
                    roles,
                    expires_at: None,
                };
                first
                    .checks
                    .clone()
                    .set_roles(request)
                    .await
                    .expect("SetRoles")
                    .into_inner()
                    .revision
            };
            truth.lock().expect("truth").push((revision, Some(nested), Some(editor)));
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let truth = truth.lock().expect("truth").clone();
        let (mut answered, mut allowed) = (0, 0);
        for reader in readers {
            for (revision, got) in reader.await.expect("reader") {
                let (_, nested, editor) =
                    *truth.iter().rev().find(|t| t.0 <= revision).expect("a known revision");
                let expected = match editor {
                    None => false,
                    Some(false) => true,
                    Some(true) => nested == Some(true),
                };
                assert_eq!(
                    got, expected,
                    "at revision {revision}: nested {nested:?}, editor {editor:?}"
                );
                answered += 1;
                allowed += usize::from(got);
            }
        }
        eprintln!(
            "{answered} answers checked against the truth at their revision ({allowed} allowed)"
        );
        assert!(answered > 100, "{answered} answers");
    })
    .await;
}
