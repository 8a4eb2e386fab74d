//! Revisions follow commit order, under concurrent writers.

use std::time::Instant;

use crate::{
    conformance,
    helpers::{Backend, spawn},
};

const WRITERS: usize = 8;
const WRITES_EACH: usize = 25;

async fn concurrent_writes_get_distinct_revisions_in_commit_order(backend: Backend) {
    let app = spawn(backend).await;
    app.create_tenant("a").await;
    app.create_tenant("b").await;
    let start = app.grant("seed", "a", &["r"]).await;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let checks = app.checks.clone();
        tasks.push(tokio::spawn(async move {
            let mut log = Vec::new();
            for i in 0..WRITES_EACH {
                let mut checks = checks.clone();
                let user = format!("u{}", (w + i) % 5);
                let tenant = if i % 2 == 0 { "a" } else { "b" };
                let began = Instant::now();
                let revision = if i % 3 == 2 {
                    let req = rolecheck::pb::RevokeRequest {
                        user_id: user,
                        tenant_id: tenant.into(),
                        roles: vec![],
                    };
                    checks.revoke(req).await.expect("revoke").into_inner().revision
                } else {
                    let req = rolecheck::pb::GrantRequest {
                        user_id: user,
                        tenant_id: tenant.into(),
                        roles: vec![format!("r{w}")],
                        expires_at: None,
                    };
                    checks.grant(req).await.expect("grant").into_inner().revision
                };
                log.push((began, Instant::now(), revision));
            }
            log
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("writer"));
    }

    let mut revisions: Vec<u64> = all.iter().map(|w| w.2).collect();
    revisions.sort_unstable();
    let expected: Vec<u64> = (start + 1..=start + (WRITERS * WRITES_EACH) as u64).collect();
    assert_eq!(revisions, expected, "one revision per write, no gaps, no repeats");

    // A write that finished before another began has the lower revision.
    for a in &all {
        for b in &all {
            if a.1 < b.0 {
                assert!(a.2 < b.2, "write at {} finished before write at {} began", a.2, b.2);
            }
        }
    }
}

conformance!(concurrent_writes_get_distinct_revisions_in_commit_order);
