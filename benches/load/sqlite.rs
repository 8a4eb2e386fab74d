//! Phase 1: the embedded SQLite store with small data, then the h2load cross-check.

use super::*;

/// The embedded SQLite store with small data, then the h2load cross-check.
pub(super) async fn sqlite_phase(
    noop: &Server,
    health: &Bytes,
    concurrency: usize,
    baseline: &Outcome,
) {
    // Phase 1: the embedded SQLite store.
    let data = tempfile::tempdir().expect("dir");
    let server = spawn(rolecheck(data.path(), &[]));
    let conn = connect(&server.grpc).await;
    seed_small(&conn).await;
    setup_calls(&conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    let mut scenarios = Vec::new();
    let one_check = frame(&hot_check(7));
    scenarios.push(Scenario::fixed("Check, cached, one key", CHECK, allowed, one_check.clone()));
    scenarios.push(Scenario::new("Check, cached, 1000 hot users", CHECK, allowed, |i| {
        frame(&hot_check(i))
    }));
    let batch = frame(&pb::CheckBatchRequest {
        checks: (0..100).map(hot_check).collect(),
        min_revision: 0,
    });
    let mut scenario =
        Scenario::fixed("CheckBatch of 100, cached", CHECK_BATCH, all_allowed, batch.clone());
    scenario.items = 100;
    scenarios.push(scenario);
    let wide = frame(&pb::GetAuthorizationRequest {
        expand: false,
        user_id: "wide".into(),
        min_revision: 0,
        with_expiry: false,
    });
    scenarios.push(Scenario::fixed(
        "GetAuthorization, 50 tenants",
        GET_AUTHORIZATION,
        fifty_tenants,
        wide,
    ));
    scenarios.push(Scenario::new("Grant, SQLite (durable)", GRANT, revision, |i| {
        grant(format!("g{i}"), "hot".into(), "viewer")
    }));
    let issue = |i: u64| {
        frame(&pb::IssueRequest { user_id: format!("h{}", i % 1000), ..Default::default() })
    };
    scenarios.push(Scenario::new("Issue, RS256 (RSA 2048)", ISSUE, token, issue));
    let mut outcomes = vec![baseline.clone()];
    for scenario in scenarios {
        outcomes.push(load(&conn, server.pid, concurrency, scenario).await);
    }
    drop(server);
    let keys = tempfile::tempdir().expect("dir");
    for (kind, name) in
        [(KeyKind::EcP256, "Issue, ES256 (P-256)"), (KeyKind::Ed25519, "Issue, EdDSA (Ed25519)")]
    {
        let (_, pem) = SigningKey::generate(kind).expect("generate key");
        let path = keys.path().join(format!("{kind:?}.pem"));
        std::fs::write(&path, pem).expect("write key");
        let data = tempfile::tempdir().expect("dir");
        let server =
            spawn(rolecheck(data.path(), &[("ROLECHECK_SIGNING_KEY", path.display().to_string())]));
        let conn = connect(&server.grpc).await;
        seed_small(&conn).await;
        outcomes.push(
            load(&conn, server.pid, concurrency, Scenario::new(name, ISSUE, token, issue)).await,
        );
    }

    // The same fixed bodies through h2load, when installed.
    let mut cross = Vec::new();
    if Command::new("h2load").arg("--version").output().is_ok() {
        cross.extend(h2load(
            &noop.grpc,
            noop.pid,
            concurrency,
            "no-op (health Check)",
            HEALTH,
            health,
        ));
        let data = tempfile::tempdir().expect("dir");
        let server = spawn(rolecheck(data.path(), &[]));
        let conn = connect(&server.grpc).await;
        seed_small(&conn).await;
        // Answers are checked on the server's side: h2load sees HTTP statuses only.
        let count = "rolecheck_grpc_request_duration_seconds_count";
        let codes = || {
            let ok = metric(&server.http, count, "code=\"Ok\"");
            // Streams h2load resets when its time is up (at most one per stream in
            // flight) are recorded as Unknown or Cancelled; they are not failures.
            let abandoned = metric(&server.http, count, "code=\"Unknown\"")
                + metric(&server.http, count, "code=\"Cancelled\"");
            (metric(&server.http, count, ""), ok, abandoned)
        };
        for (name, path, body, items) in [
            ("Check, cached, one key", CHECK, &one_check, 1.0),
            ("CheckBatch of 100, cached", CHECK_BATCH, &batch, 100.0),
        ] {
            let before = codes();
            let Some(mut outcome) = h2load(&server.grpc, server.pid, concurrency, name, path, body)
            else {
                continue;
            };
            let after = codes();
            let not_ok = (after.0 - before.0)
                - (after.1 - before.1)
                - (after.2 - before.2).min(concurrency as f64);
            if not_ok > 0.0 {
                outcome.errors += not_ok as u64;
                outcome.first_error = Some(format!("{not_ok} answers with a non-OK grpc-status"));
            }
            outcome.items_per_second = outcome.per_second * items;
            cross.push(outcome);
        }
        drop(conn);
    }
    table("Embedded SQLite store, small data", baseline, &outcomes);
    if !cross.is_empty() {
        let base = cross[0].clone();
        table("Cross-check: the same fixed-body calls driven by h2load", &base, &cross);
    }
}
