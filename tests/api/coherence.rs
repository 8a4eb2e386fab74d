//! Coherence across replicas: two servers over one Postgres, each with its own cache and
//! change listener. Revokes reach the other replica at once, `min_revision` is never
//! answered from an older state, a killed listener never yields a stale allow, an outage
//! ends with every replica correct, and Watch is gapless and duplicate-free.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use rolecheck::pb;
use sqlx::{Connection, PgConnection};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::{
    conformance,
    helpers::{
        Backend, TestApp, TestDb, check_req, spawn, spawn_with, start, test_config, wait_for,
    },
    proxy::Proxy,
};

/// The default `--coherence-lease`, which these tests run with.
const LEASE: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_replica_denies_on_the_other_at_once() {
    let a = spawn(Backend::Postgres).await;
    let b = a.replica(|_| {}).await;
    a.create_tenant("acme").await;
    let mut worst = Duration::ZERO;
    for i in 0..30 {
        let user = format!("u{i}");
        a.grant(&user, "acme", &["admin"]).await;
        wait_for(Duration::from_secs(5), "B to see the grant", || async {
            b.check(&user, "acme", "admin").await.then_some(())
        })
        .await;
        assert!(b.check(&user, "acme", "admin").await, "cached on B");
        a.revoke(&user, "acme", &["admin"]).await;
        let revoked = Instant::now();
        // "At once" means through the change feed, well inside the 1 s coherence lease:
        // a replica that only stopped trusting its cache when the lease ran out would
        // take longer than this deadline and fail here.
        wait_for(LEASE / 2, "B to deny after the revoke", || async {
            (!b.check(&user, "acme", "admin").await).then_some(())
        })
        .await;
        worst = worst.max(revoked.elapsed());
    }
    eprintln!("worst revoke-to-deny across replicas: {worst:?}");
    assert!(worst < LEASE / 2, "worst revoke-to-deny {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_revision_from_one_replica_is_never_stale_on_the_other() {
    let a = spawn(Backend::Postgres).await;
    let b = a.replica(|_| {}).await;
    a.create_tenant("acme").await;
    let mut stale = 0;
    for i in 0..200 {
        let granted = i % 2 == 0;
        let written = if granted {
            a.grant("u", "acme", &["admin"]).await
        } else {
            a.revoke("u", "acme", &["admin"]).await
        };
        let got = b
            .checks
            .clone()
            .check(check_req("u", "acme", "admin", written))
            .await
            .expect("check")
            .into_inner();
        assert!(got.revision >= written, "answer reflects the asked revision");
        if got.allowed != granted {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "stale answers on B");
}

/// Terminates every `LISTEN` backend of the test database (both replicas' listeners).
async fn kill_listeners(url: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let (killed,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'rolecheck-listener'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("terminate");
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_never_yields_a_stale_allow() {
    let a = spawn(Backend::Postgres).await;
    let b = a.replica(|_| {}).await;
    a.create_tenant("acme").await;
    let url = a.db.url().to_owned();
    for round in 0..10 {
        let user = format!("victim{round}");
        a.grant(&user, "acme", &["admin"]).await;
        // B's listener has noticed every earlier round's kill, is connected again, and
        // B allows.
        wait_for(Duration::from_secs(5), "B caches the allow", || async {
            let lost = crate::helpers::metric(&b, "rolecheck_listener_reconnects").await;
            let trusted = crate::helpers::metric(&b, "rolecheck_cache_trusted").await;
            let back = lost >= Some(f64::from(round)) && trusted == Some(1.0);
            (back && b.check(&user, "acme", "admin").await).then_some(())
        })
        .await;
        // Kill the listeners while the revoke happens.
        let (killed, revision) =
            tokio::join!(kill_listeners(&url), a.revoke(&user, "acme", &["admin"]));
        assert!(killed >= 1, "round {round}: found the listeners to kill");
        // At the revoke's revision B never allows, even with its listener just killed
        // (it waits for the feed or reads the store), and says which revision it read.
        let got = b
            .checks
            .clone()
            .check(check_req(&user, "acme", "admin", revision))
            .await
            .expect("check")
            .into_inner();
        assert!(!got.allowed, "round {round}: stale allow at revision {}", got.revision);
        assert!(got.revision >= revision, "round {round}: answered from {}", got.revision);
        // Without min_revision the answer may predate the revoke only by the race with
        // the RPC itself; from here on it must be denied.
        wait_for(Duration::from_secs(3), "B denies", || async {
            (!b.check(&user, "acme", "admin").await).then_some(())
        })
        .await;
        let got = b
            .checks
            .clone()
            .check(check_req(&user, "acme", "admin", revision))
            .await
            .expect("check")
            .into_inner();
        assert!(!got.allowed, "round {round}: stale allow with min_revision");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_ends_with_every_replica_correct() {
    let db = TestDb::create(Backend::Postgres).await;
    let proxy = Proxy::start().await;
    let through = proxy.url_through(db.url());
    let config = |db: &TestDb| {
        let mut config = test_config(db);
        config.database_url = Some(rolecheck::config::DatabaseUrl(through.clone()));
        config
    };
    let replica_db = TestDb::Replica { url: db.url().to_owned(), via: None };
    let b_config = config(&replica_db);
    let a = start(config(&db), db).await;
    let b = start(b_config, replica_db).await;
    a.create_tenant("acme").await;
    a.grant("u", "acme", &["admin"]).await;

    // Load: both replicas answer checks continuously while Postgres goes away.
    let unavailable = Arc::new(AtomicU32::new(0));
    let load = |app: &TestApp| {
        let mut checks = app.checks.clone();
        let unavailable = unavailable.clone();
        tokio::spawn(async move {
            let mut ok = 0u32;
            for _ in 0..3000 {
                match checks.check(check_req("u", "acme", "admin", 0)).await {
                    Ok(_) => ok += 1,
                    Err(status) => {
                        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                        unavailable.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            ok
        })
    };
    let (load_a, load_b) = (load(&a), load(&b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    // While Postgres is away, replicas that cannot prove their caches current say so.
    wait_for(Duration::from_secs(5), "the load to meet UNAVAILABLE", || {
        let unavailable = unavailable.clone();
        async move { (unavailable.load(Ordering::SeqCst) > 10).then_some(()) }
    })
    .await;
    proxy.restore();
    let (ok_a, ok_b) = (load_a.await.expect("load A"), load_b.await.expect("load B"));
    assert!(ok_a > 0 && ok_b > 0);

    // Every replica is correct again: a revoke on A reaches B's cache.
    wait_for(Duration::from_secs(15), "A writes again", || {
        let mut checks = a.checks.clone();
        async move {
            let req =
                pb::RevokeRequest { user_id: "u".into(), tenant_id: "acme".into(), roles: vec![] };
            checks.revoke(req).await.ok()
        }
    })
    .await;
    wait_for(Duration::from_secs(10), "B denies after recovery", || async {
        let got = b.checks.clone().check(check_req("u", "acme", "admin", 0)).await.ok()?;
        (!got.into_inner().allowed).then_some(())
    })
    .await;
    let w = a.grant("v", "acme", &["viewer"]).await;
    let got =
        b.checks.clone().check(check_req("v", "acme", "viewer", w)).await.unwrap().into_inner();
    assert!(got.allowed);
}

/// Reads a Watch stream until it has delivered `through`.
async fn collect_watch(app: &TestApp, after: u64, through: u64) -> Vec<pb::WatchResponse> {
    let mut stream = app
        .checks
        .clone()
        .watch(pb::WatchRequest { after_revision: after, progress_ms: 0, epoch: String::new() })
        .await
        .expect("watch")
        .into_inner();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.last().is_none_or(|r: &pb::WatchResponse| r.revision < through) {
        let next = tokio::time::timeout_at(deadline, stream.next()).await.expect("watch stalled");
        got.push(next.expect("stream ended").expect("watch item"));
    }
    got
}

async fn watch_is_gapless_and_duplicate_free_under_concurrent_writers(backend: Backend) {
    let a = spawn(backend).await;
    let b = if backend == Backend::Postgres { Some(a.replica(|_| {}).await) } else { None };
    let watcher = b.as_ref().unwrap_or(&a);
    a.create_tenant("acme").await;
    let start_revision = a.grant("seed", "acme", &["r"]).await;
    let live = {
        let mut checks = watcher.checks.clone();
        tokio::spawn(async move {
            checks
                .watch(pb::WatchRequest {
                    after_revision: start_revision,
                    progress_ms: 0,
                    epoch: String::new(),
                })
                .await
                .expect("watch")
                .into_inner()
        })
    };
    let live = live.await.expect("subscribe");

    let mut writers = Vec::new();
    for w in 0..4 {
        let app = if w % 2 == 0 { &a } else { watcher };
        let checks = app.checks.clone();
        writers.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..40 {
                let mut checks = checks.clone();
                let user = format!("u{}", (w * 7 + i) % 6);
                last = if i % 4 == 3 {
                    let req = pb::RevokeRequest {
                        user_id: user,
                        tenant_id: "acme".into(),
                        roles: vec![],
                    };
                    checks.revoke(req).await.expect("revoke").into_inner().revision
                } else {
                    let req = pb::GrantRequest {
                        user_id: user,
                        tenant_id: "acme".into(),
                        roles: vec![format!("r{}", i % 3)],
                        expires_at: None,
                    };
                    checks.grant(req).await.expect("grant").into_inner().revision
                };
            }
            last
        }));
    }
    let mut through = 0;
    for writer in writers {
        through = through.max(writer.await.expect("writer"));
    }

    let mut live = live;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.last().is_none_or(|r: &pb::WatchResponse| r.revision < through) {
        let next = tokio::time::timeout_at(deadline, live.next()).await.expect("watch stalled");
        got.push(next.expect("stream ended").expect("watch item"));
    }
    let revisions: Vec<u64> = got.iter().map(|r| r.revision).collect();
    let expected: Vec<u64> = (start_revision + 1..=through).collect();
    assert_eq!(revisions, expected, "every revision once, in order");

    // The stream equals the store's state: replaying it gives every user's roles.
    let mut replayed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    replayed.insert("seed".into(), vec!["r".into()]);
    for response in &got {
        for change in &response.changes {
            assert_eq!(change.kind, pb::ChangeKind::Membership as i32);
            replayed.insert(change.user_id.clone(), change.roles.clone());
        }
    }
    for (user, roles) in &replayed {
        let want = a.authorization(user).await.remove("acme").unwrap_or_default();
        assert_eq!(roles, &want, "replayed roles of {user}");
    }

    // Resuming from any revision a client saw continues exactly after it.
    let middle = expected[expected.len() / 2];
    let resumed = collect_watch(watcher, middle, through).await;
    assert_eq!(resumed.first().map(|r| r.revision), Some(middle + 1));
    assert_eq!(resumed, got[got.len() / 2 + 1..].to_vec());
}

async fn watch_reports_tenant_changes_and_pruned_history(backend: Backend) {
    let app = spawn_with(backend, |c| c.history_retention = Duration::from_millis(1)).await;
    let created = app
        .tenants
        .clone()
        .create_tenant(pb::CreateTenantRequest { tenant_id: "t".into(), name: "T".into() })
        .await
        .unwrap();
    drop(created);
    let granted = app.grant("u", "t", &["r"]).await;
    let deleted = app
        .tenants
        .clone()
        .delete_tenant(pb::DeleteTenantRequest { tenant_id: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .revision;
    // The retention is 1 ms: pruning catches up within its period, then resuming from
    // before the floor is OUT_OF_RANGE naming where to resume.
    let status = wait_for(Duration::from_secs(10), "history to be pruned", || {
        let mut checks = app.checks.clone();
        async move {
            let mut stream = checks
                .watch(pb::WatchRequest { after_revision: 0, progress_ms: 0, epoch: String::new() })
                .await
                .ok()?
                .into_inner();
            match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                Ok(Some(Err(status))) => Some(status),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("; resume from after_revision "), "{}", status.message());
    let floor: u64 = status
        .message()
        .split("after_revision ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("names the revision to resume from");
    // Pruning may have caught up with the Grant or already with the deletion.
    assert!(
        (granted..=deleted).contains(&floor),
        "floor {floor}, granted {granted}, deleted {deleted}"
    );
    assert!(status.message().starts_with(&format!("history through revision {floor} was pruned")));
    let later = app.grant("u2", "", &["r"]).await;
    let resumed = collect_watch(&app, floor, later).await;
    assert_eq!(resumed.last().unwrap().revision, later);
}

async fn watch_kinds(backend: Backend) {
    let app = spawn(backend).await;
    let created = app.create_tenant("t").await;
    drop(created);
    app.grant("u", "t", &["b", "a"]).await;
    let deleted = app
        .tenants
        .clone()
        .delete_tenant(pb::DeleteTenantRequest { tenant_id: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .revision;
    let got = collect_watch(&app, 0, deleted).await;
    let kinds: Vec<(i32, String, Vec<String>)> = got
        .iter()
        .flat_map(|r| r.changes.iter().map(|c| (c.kind, c.user_id.clone(), c.roles.clone())))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (pb::ChangeKind::TenantCreated as i32, String::new(), vec![]),
            (pb::ChangeKind::Membership as i32, "u".into(), vec!["a".into(), "b".into()]),
            (pb::ChangeKind::TenantDeleted as i32, String::new(), vec![]),
        ]
    );
}

conformance!(
    watch_is_gapless_and_duplicate_free_under_concurrent_writers,
    watch_reports_tenant_changes_and_pruned_history,
    watch_kinds,
);

/// A draining server ends its Watch streams (`UNAVAILABLE`, naming the revision to watch
/// again from) instead of waiting out its shutdown grace for streams that never end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_ends_its_watch_streams() {
    let app = spawn_with(Backend::Sqlite, |c| c.shutdown_grace = Duration::from_secs(30)).await;
    app.create_tenant("acme").await;
    let granted = app.grant("alice", "acme", &["admin"]).await;
    let request = pb::WatchRequest { after_revision: 0, progress_ms: 0, epoch: String::new() };
    let mut stream = app.checks.clone().watch(request).await.expect("watch").into_inner();
    loop {
        let response = stream.next().await.expect("an item").expect("a response");
        if response.revision >= granted {
            break;
        }
    }
    let stopping = tokio::spawn(app.stop());
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    let status = end.expect("ended before the grace").expect("an item").expect_err("a status");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&format!("after_revision {granted}")), "{status:?}");
    let stopped = tokio::time::timeout(Duration::from_secs(10), stopping).await;
    stopped.expect("stopped in 10 s, not the 30 s grace").expect("server task");
}
