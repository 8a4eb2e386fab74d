//! AuthZEN mapped onto the contract, end to end: where the tenant comes from, actions as
//! permissions and roles, the three batch semantics, the searches paged and agreeing
//! with `Check`, routes decided by the proxy policy (the API-gateway profile), and the
//! edges: keys, limits, a store that cannot answer, and the metrics.

use std::{collections::BTreeSet, path::Path, time::Duration};

use serde_json::{Value, json};

use crate::{
    authzen::{ask, decision, post},
    conformance,
    helpers::{Backend, TestApp, TestDb, http, http_body, spawn, spawn_with, start, test_config},
    proxy::Proxy,
};

/// The contract's example model (CONTRACT, "The model").
const MODEL: &str = crate::permissions::EXAMPLE;

fn user(id: &str) -> Value {
    json!({ "type": "user", "id": id })
}

fn action(name: &str) -> Value {
    json!({ "name": name })
}

fn tenant(id: &str) -> Value {
    json!({ "type": "tenant", "id": id })
}

/// The seed's user 1 (admin in acme, billing in globex, support agent everywhere) and
/// user 2 (editor in acme), under the contract's model.
async fn seeded(backend: Backend) -> TestApp {
    let app = spawn(backend).await;
    for id in ["acme", "globex", "initech"] {
        app.create_tenant(id).await;
    }
    let request = rolecheck::pb::SetModelRequest { model: MODEL.into() };
    app.checks.clone().set_model(request).await.expect("SetModel");
    app.grant("1", "acme", &["admin"]).await;
    app.grant("1", "globex", &["billing"]).await;
    app.grant("1", "", &["support-agent"]).await;
    app.grant("2", "acme", &["editor"]).await;
    app
}

/// What `Check` says: `name` as a permission when the model defines one, else a role.
async fn check(app: &TestApp, user: &str, tenant: &str, name: &str, at: u64) -> bool {
    let permission = name.starts_with("invoice.");
    let request = rolecheck::pb::CheckRequest {
        user_id: user.into(),
        tenant_id: tenant.into(),
        role: if permission { String::new() } else { name.into() },
        permission: if permission { name.into() } else { String::new() },
        min_revision: at,
    };
    app.checks.clone().check(request).await.expect("Check").into_inner().allowed
}

async fn tenants_and_actions_map_as_the_contract_says(backend: Backend) {
    let app = seeded(backend).await;
    // Every evaluation agrees with Check, tenant by tenant, action by action.
    for user_id in ["1", "2", "3"] {
        for tenant_id in ["acme", "globex", "initech", "app"] {
            for name in ["admin", "editor", "viewer", "billing", "invoice.read", "invoice.pay"] {
                let asked = json!({ "subject": user(user_id), "action": action(name), "resource": tenant(tenant_id) });
                let want = check(&app, user_id, tenant_id, name, 0).await;
                assert_eq!(decision(&app, asked).await, want, "{user_id} {name} in {tenant_id}");
            }
        }
    }
    // The tenant from properties, else the context, else the application tenant.
    let invoice = |properties: Value, context: Value| {
        json!({ "subject": user("2"), "action": action("invoice.read"),
                "resource": { "type": "invoice", "id": "7", "properties": properties }, "context": context })
    };
    assert!(decision(&app, invoice(json!({ "tenant_id": "acme" }), json!({}))).await);
    assert!(decision(&app, invoice(json!({}), json!({ "tenant_id": "acme" }))).await);
    assert!(
        decision(&app, invoice(json!({ "tenant_id": "acme" }), json!({ "tenant_id": "globex" })))
            .await
    );
    assert!(
        !decision(&app, invoice(json!({ "tenant_id": "globex" }), json!({ "tenant_id": "acme" })))
            .await
    );
    assert!(
        !decision(&app, invoice(json!({}), json!({}))).await,
        "user 2 has nothing in the app tenant"
    );
    let support = json!({ "subject": user("1"), "action": action("support-agent"), "resource": { "type": "page", "id": "x" } });
    assert!(decision(&app, support).await, "no tenant named: the application tenant");
    for bad in [json!({ "tenant_id": "not a tenant" }), json!({ "tenant_id": 7 })] {
        let (status, _, text) =
            post(&app, "/access/v1/evaluation", &invoice(bad, json!({})).to_string()).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("resource.properties.tenant_id"), "{text}");
    }
    let (status, _, text) = post(&app, "/access/v1/evaluation",
        &json!({ "subject": user("bad user"), "action": action("viewer"), "resource": tenant("acme") }).to_string()).await;
    assert_eq!((status, text.contains("subject.id")), (400, true), "{text}");

    // The three semantics: in order, cut short after the first deny or permit.
    let three = |semantic: &str| {
        json!({
            "subject": user("2"), "resource": tenant("acme"), "options": { "evaluations_semantic": semantic },
            "evaluations": [{ "action": action("viewer") }, { "action": action("invoice.pay") }, { "action": action("editor") }]
        })
    };
    let decisions = |answer: Value| -> Vec<bool> {
        answer["evaluations"]
            .as_array()
            .expect("evaluations")
            .iter()
            .map(|e| e["decision"].as_bool().expect("bool"))
            .collect()
    };
    assert_eq!(
        decisions(ask(&app, "/access/v1/evaluations", three("execute_all")).await),
        [true, false, true]
    );
    assert_eq!(
        decisions(ask(&app, "/access/v1/evaluations", three("deny_on_first_deny")).await),
        [true, false]
    );
    let mut permit = three("permit_on_first_permit");
    permit["evaluations"][0] = json!({ "action": action("admin") });
    permit["evaluations"][1] = json!({ "action": action("editor") });
    assert_eq!(decisions(ask(&app, "/access/v1/evaluations", permit).await), [false, true]);
    let (status, _, _) =
        post(&app, "/access/v1/evaluations", &three("all_of_them").to_string()).await;
    assert_eq!(status, 400, "an unknown semantic");
}

fn found(answer: &Value, key: &str) -> Vec<String> {
    let results = answer["results"].as_array().unwrap_or_else(|| panic!("results: {answer}"));
    results.iter().map(|r| r[key].as_str().expect("a string").to_owned()).collect()
}

/// Every page of a search, following `next_token`: the keys, and the revisions.
async fn every_page(
    app: &TestApp,
    path: &str,
    mut body: Value,
    key: &str,
    limit: u32,
) -> (Vec<String>, Vec<u64>) {
    let (mut keys, mut revisions, mut token) = (Vec::new(), Vec::new(), String::new());
    for _ in 0..100 {
        body["page"] = json!({ "limit": limit, "token": token });
        let answer = ask(app, path, body.clone()).await;
        let page = found(&answer, key);
        assert!(page.len() <= limit as usize, "a page of at most {limit}: {answer}");
        keys.extend(page);
        revisions.push(answer["context"]["revision"].as_u64().expect("a revision"));
        token = answer["page"]["next_token"].as_str().expect("next_token").to_owned();
        if token.is_empty() {
            return (keys, revisions);
        }
    }
    panic!("more than 100 pages");
}

async fn searches_page_and_agree_with_check(backend: Backend) {
    let app = seeded(backend).await;
    for n in 0..23 {
        let roles: &[&str] = if n % 3 == 0 { &["viewer"] } else { &["x"] };
        app.grant(&format!("u{n:02}"), "acme", roles).await;
    }
    // Who may read invoices in acme: user 1 and 2 by their roles, every third u by viewer.
    let who = json!({ "subject": { "type": "user" }, "action": action("invoice.read"), "resource": tenant("acme") });
    let (users, revisions) = every_page(&app, "/access/v1/search/subject", who, "id", 4).await;
    let unique: BTreeSet<&String> = users.iter().collect();
    assert_eq!(unique.len(), users.len(), "no user twice: {users:?}");
    let mut sorted = users.clone();
    sorted.sort();
    assert_eq!(users, sorted, "in user id order");
    let at = *revisions.iter().max().expect("a page");
    let mut everyone: Vec<String> = vec!["1".into(), "2".into(), "3".into()];
    everyone.extend((0..23).map(|n| format!("u{n:02}")));
    for candidate in &everyone {
        let holds = check(&app, candidate, "acme", "invoice.read", at).await;
        assert_eq!(users.contains(candidate), holds, "{candidate}: the search and Check at {at}");
    }
    // In initech only user 1 reads, by the support-agent role that reaches every tenant.
    let initech = json!({ "subject": { "type": "user" }, "action": action("invoice.read"), "resource": tenant("initech") });
    assert_eq!(found(&ask(&app, "/access/v1/search/subject", initech).await, "id"), ["1"]);

    // Where: user 1 is a viewer everywhere; user 2 only in acme.
    let r#where = |u: &str| json!({ "subject": user(u), "action": action("viewer"), "resource": { "type": "tenant" } });
    let (tenants, _) = every_page(&app, "/access/v1/search/resource", r#where("1"), "id", 1).await;
    assert_eq!(tenants, ["acme", "app", "globex", "initech"]);
    let (tenants, _) = every_page(&app, "/access/v1/search/resource", r#where("2"), "id", 1).await;
    assert_eq!(tenants, ["acme"]);
    let pays = json!({ "subject": user("1"), "action": action("invoice.pay"), "resource": { "type": "tenant" } });
    assert_eq!(
        found(&ask(&app, "/access/v1/search/resource", pays).await, "id"),
        ["acme", "globex"]
    );

    // What: the permissions and roles held, implied ones too.
    let what = |u: &str, t: &str| json!({ "subject": user(u), "resource": tenant(t) });
    let (names, _) =
        every_page(&app, "/access/v1/search/action", what("1", "acme"), "name", 2).await;
    assert_eq!(names, ["admin", "editor", "invoice.pay", "invoice.read", "viewer"]);
    let (names, _) =
        every_page(&app, "/access/v1/search/action", what("2", "globex"), "name", 2).await;
    assert!(names.is_empty(), "{names:?}");
    let (status, _, _) = post(&app, "/access/v1/search/subject",
        &json!({ "subject": { "type": "user" }, "action": action("viewer"), "resource": tenant("acme"), "page": { "token": "bogus" } }).to_string()).await;
    assert_eq!(status, 400, "a token this search never returned");
}

/// The API-gateway interop's routes, and two more: a tenant's invoices and a public probe.
const GATEWAY_POLICY: &str = r#"
[proxy]
kind = "nginx"

[identity]
header = "x-user-id"

[[route]]
path = "/users/*"
methods = ["GET"]
roles = ["viewer"]

[[route]]
path = "/todos"
methods = ["GET"]
roles = ["viewer"]

[[route]]
path = "/todos"
methods = ["POST"]
roles = ["editor"]

[[route]]
path = "/todos/archive"
methods = ["POST"]
roles = ["admin"]

[[route]]
path = "/todos/*"
methods = ["PUT", "DELETE", "POST"]
roles = ["editor"]

[[route]]
path = "/tenants/{tenant}/invoices/**"
permissions = ["invoice.read"]

[[route]]
path = "/healthz"
public = true
"#;

async fn gateway(backend: Backend, dir: &Path) -> TestApp {
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, GATEWAY_POLICY).expect("write policy");
    let app = spawn_with(backend, |c| {
        c.authz_policy = Some(policy);
        c.authz_private_listener = true;
    })
    .await;
    app.create_tenant("acme").await;
    let request = rolecheck::pb::SetModelRequest { model: MODEL.into() };
    app.checks.clone().set_model(request).await.expect("SetModel");
    app.grant("alice", "", &["editor"]).await;
    app.grant("bob", "", &["viewer"]).await;
    app.grant("carol", "acme", &["billing", "viewer"]).await;
    app
}

fn route(who: &str, method: &str, id: &str, properties: Value) -> Value {
    json!({ "subject": { "type": "identity", "id": who }, "action": action(method),
            "resource": { "type": "route", "id": id, "properties": properties } })
}

async fn route_reason(app: &TestApp, body: Value) -> (bool, String) {
    let answer = ask(app, "/access/v1/evaluation", body).await;
    let reason = answer["context"]["reason"].as_str().unwrap_or_default().to_owned();
    (answer["decision"].as_bool().expect("a decision"), reason)
}

async fn routes_are_decided_by_the_proxy_policy(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let app = gateway(backend, dir.path()).await;
    // The interop's decisions: an editor may do everything, a viewer only read.
    for (who, method, id, want) in [
        ("alice", "GET", "/users/{userId}", true),
        ("alice", "GET", "/todos", true),
        ("alice", "POST", "/todos", true),
        ("alice", "PUT", "/todos/{todoId}", true),
        ("alice", "DELETE", "/todos/{todoId}", true),
        ("bob", "GET", "/users/{userId}", true),
        ("bob", "GET", "/todos", true),
        ("bob", "POST", "/todos", false),
        ("bob", "PUT", "/todos/{todoId}", false),
        ("bob", "DELETE", "/todos/{todoId}", false),
        ("nobody", "GET", "/healthz", true),
        ("alice", "GET", "/nowhere", false),
    ] {
        assert_eq!(
            decision(&app, route(who, method, id, json!({}))).await,
            want,
            "{who} {method} {id}"
        );
    }
    // A template standing for requests the policy decides apart is refused, not guessed.
    let (allowed, why) =
        route_reason(&app, route("alice", "POST", "/todos/{todoId}", json!({}))).await;
    assert!(!allowed && why.contains("decide apart"), "{why}");
    assert!(
        decision(&app, route("alice", "POST", "/todos/7", json!({}))).await,
        "a concrete path is not ambiguous"
    );
    // A path the proxy would refuse is refused here too.
    let (allowed, why) =
        route_reason(&app, route("alice", "GET", "/todos/../users/1", json!({}))).await;
    assert!(!allowed && why.contains("dot segment"), "{why}");
    // The tenant: from the path, or named when the template leaves it open; never both ways.
    let invoices = "/tenants/{tenantId}/invoices/{invoiceId}";
    let (allowed, why) = route_reason(&app, route("carol", "GET", invoices, json!({}))).await;
    assert!(!allowed && why.contains("placeholder"), "{why}");
    assert!(decision(&app, route("carol", "GET", invoices, json!({ "tenant_id": "acme" }))).await);
    assert!(decision(&app, route("carol", "GET", "/tenants/acme/invoices/7", json!({}))).await);
    let (allowed, why) = route_reason(
        &app,
        route("carol", "GET", "/tenants/acme/invoices/7", json!({ "tenant_id": "globex" })),
    )
    .await;
    assert!(!allowed && why.contains("not the tenant the route names"), "{why}");
    assert!(!decision(&app, route("bob", "GET", "/tenants/acme/invoices/7", json!({}))).await);
    // What each may do on a route: the methods the policy lets them take.
    for (who, want) in [("alice", vec!["GET", "POST"]), ("bob", vec!["GET"])] {
        let body = json!({ "subject": { "type": "identity", "id": who }, "resource": { "type": "route", "id": "/todos" } });
        let answer = ask(&app, "/access/v1/search/action", body).await;
        let names: Vec<&str> = answer["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, want, "{who}");
    }
}

conformance!(
    tenants_and_actions_map_as_the_contract_says,
    searches_page_and_agree_with_check;
    stores_only: routes_are_decided_by_the_proxy_policy
);

const READER: &str = "reader-secret";
const WRITER: &str = "writer-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_keys_with_the_check_scope_are_answered_and_limits_hold() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys.toml");
    let toml = crate::callers::keys_toml(
        &[("reader", READER, &["check"]), ("writer", WRITER, &["write"])],
        &[],
    );
    std::fs::write(&keys, toml).expect("write keys");
    let app = spawn_with(Backend::Sqlite, |c| c.api_keys_file = Some(keys)).await;
    let body =
        json!({ "subject": user("1"), "action": action("viewer"), "resource": tenant("app") })
            .to_string();
    let evaluate = |key: Option<&'static str>, body: String| {
        let app = app.http;
        async move {
            let bearer = key.map(|key| format!("Bearer {key}"));
            let mut headers = vec![("content-type", "application/json")];
            headers.extend(bearer.as_deref().map(|value| ("authorization", value)));
            http_body(app, ("POST", "/access/v1/evaluation"), &headers, Some(body.as_bytes())).await
        }
    };
    let (status, head, _) = evaluate(None, body.clone()).await;
    assert_eq!(status, 401);
    assert!(head.to_ascii_lowercase().contains("www-authenticate: bearer"), "{head}");
    assert_eq!(evaluate(Some("nobody's-secret"), body.clone()).await.0, 401);
    assert_eq!(evaluate(Some(WRITER), body.clone()).await.0, 403, "a key without the check scope");
    let (status, _, text) = evaluate(Some(READER), body.clone()).await;
    assert_eq!((status, text.as_str()), (200, r#"{"decision":false}"#));
    let (status, _, _) = http(app.http, "GET", "/.well-known/authzen-configuration", &[]).await;
    assert_eq!(status, 200, "the metadata is public, like the JWK Set");

    // Limits: 1,000 items, pages of 1,000, a body of 1 MiB.
    let items: Vec<Value> = (0..1001).map(|_| json!({})).collect();
    let batch = json!({ "subject": user("1"), "action": action("viewer"), "resource": tenant("app"), "evaluations": items });
    let headers = [("content-type", "application/json"), ("authorization", "Bearer reader-secret")];
    let (status, _, text) = http_body(
        app.http,
        ("POST", "/access/v1/evaluations"),
        &headers,
        Some(batch.to_string().as_bytes()),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at most 1000"), "{text}");
    let page = json!({ "subject": { "type": "user" }, "action": action("viewer"), "resource": tenant("app"), "page": { "limit": 1001 } });
    let (status, _, _) = http_body(
        app.http,
        ("POST", "/access/v1/search/subject"),
        &headers,
        Some(page.to_string().as_bytes()),
    )
    .await;
    assert_eq!(status, 400);
    let padded = format!(r#"{{"pad":"{}"}}"#, "x".repeat(rolecheck::authzen::MAX_BODY));
    let (status, _, _) =
        http_body(app.http, ("POST", "/access/v1/evaluation"), &headers, Some(padded.as_bytes()))
            .await;
    assert_eq!(status, 413);
    // Counted like the gRPC calls.
    let (_, metrics) = crate::helpers::http_get(&app, "/metrics").await;
    let count = |status: &str| {
        let wanted = format!(
            r#"rolecheck_http_request_duration_seconds_count{{path="/access/v1/evaluation",status="{status}"}} "#
        );
        metrics.lines().find_map(|line| line.strip_prefix(wanted.as_str())?.parse::<f64>().ok())
    };
    assert_eq!(
        (count("200"), count("401"), count("403"), count("413")),
        (Some(1.0), Some(2.0), Some(1.0), Some(1.0)),
        "{metrics}"
    );
}

/// With the path to Postgres cut, an answer that cannot be read is a 503, never a
/// decision; the server answers again once the path is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_answer_is_a_503() {
    let db = TestDb::create(Backend::Postgres).await;
    let TestDb::Postgres { url, .. } = &db else { unreachable!() };
    let proxy = Proxy::start().await;
    let mut config = test_config(&db);
    config.database_url = Some(rolecheck::config::DatabaseUrl(proxy.url_through(url)));
    let app = start(config, db).await;
    app.grant("u1", "", &["viewer"]).await;
    let asked = |u: &str| {
        json!({ "subject": user(u), "action": action("viewer"), "resource": tenant("app") })
            .to_string()
    };
    assert_eq!(post(&app, "/access/v1/evaluation", &asked("u1")).await.2, r#"{"decision":true}"#);
    proxy.cut();
    let (status, _, text) = post(&app, "/access/v1/evaluation", &asked("never-seen")).await;
    assert_eq!(status, 503, "{text}");
    let search = json!({ "subject": { "type": "user" }, "action": action("viewer"), "resource": tenant("app") });
    assert_eq!(post(&app, "/access/v1/search/subject", &search.to_string()).await.0, 503);
    proxy.restore();
    crate::helpers::wait_for(Duration::from_secs(15), "answers again", || async {
        (post(&app, "/access/v1/evaluation", &asked("never-seen")).await.0 == 200).then_some(())
    })
    .await;
}

/// `--rate-limit` holds for AuthZEN callers as for gRPC ones: past it, a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_past_the_rate_limit_is_told_to_slow_down() {
    let app = spawn_with(Backend::Sqlite, |c| c.rate_limit = 5).await;
    let body =
        json!({ "subject": user("1"), "action": action("viewer"), "resource": tenant("app") });
    let started = std::time::Instant::now();
    let mut allowed = 0;
    let refused = loop {
        let (status, _, text) = post(&app, "/access/v1/evaluation", &body.to_string()).await;
        match status {
            200 => allowed += 1,
            429 => break text,
            other => panic!("{other}: {text}"),
        }
        assert!(allowed < 50, "50 requests and no 429");
    };
    assert!(refused.contains("rate limit exceeded for caller anonymous"), "{refused}");
    // A burst of 5, then 5 a second: no more passed than the quota allowed meanwhile.
    let quota = 5.0 + 5.0 * started.elapsed().as_secs_f64();
    assert!(f64::from(allowed) <= quota.ceil(), "{allowed} passed within a quota of {quota}");
}
