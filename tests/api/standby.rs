//! Misses from a hot standby (`--read-database-url`): a real primary and a real streaming
//! standby of it (`pg_basebackup`), both throwaway clusters on their own ports.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::{
    helpers::{TestApp, TestDb, check_req, start, test_config, wait_for, wait_trusted},
    standby_pair::Pair,
};

async fn allowed(app: &TestApp, user: &str) -> bool {
    let answer = app.checks.clone().check(check_req(user, "acme", "admin", 0)).await;
    answer.expect("Check").into_inner().allowed
}

async fn query_i64(url: &str, sql: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let (value,): (i64,) = sqlx::query_as(sql).fetch_one(&mut conn).await.expect(sql);
    value
}

/// The standby's revision, once it has replayed at least `revision`.
async fn replayed(standby: &str, revision: u64) {
    wait_for(Duration::from_secs(10), "the standby to replay", || async {
        let at = query_i64(standby, "SELECT value FROM store_revision WHERE id = 1").await;
        (at as u64 >= revision).then_some(())
    })
    .await;
}

/// The failover: the address the replicas use leads nowhere (`vip` cut), the primary
/// dies (an immediate stop, as in a crash) and the standby is promoted.
async fn fail_over(pair: Pair, vip: &crate::proxy::Proxy) -> Pair {
    vip.cut();
    tokio::task::spawn_blocking(move || {
        pair.kill_primary();
        pair.promote();
        pair
    })
    .await
    .expect("failover")
}

/// With `--read-database-url`, a current cache's miss is read on the standby once it
/// has replayed what the cache applied, and on the primary while it lags: a standby
/// paused before a revoke never brings the revoked role back, and a user granted after
/// the pause is read from the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_come_from_a_standby_only_once_it_has_replayed_what_the_cache_applied() {
    let pair = tokio::task::spawn_blocking(Pair::start).await.expect("clusters");
    let mut admin = PgConnection::connect(&pair.primary_url("postgres")).await.expect("admin");
    sqlx::query("CREATE DATABASE rc").execute(&mut admin).await.expect("create");
    let (primary, standby) = (pair.primary_url("rc"), pair.standby_url("rc"));
    wait_for(Duration::from_secs(10), "the standby to have the database", || async {
        PgConnection::connect(&standby).await.ok().map(|_| ())
    })
    .await;
    let db = TestDb::Replica { url: primary.clone(), via: None };
    let mut config = test_config(&db);
    config.read_database_url = Some(rolecheck::config::DatabaseUrl(standby.clone()));
    let app = start(config, db).await;
    app.create_tenant("acme").await;
    let granted = app.grant("alice", "acme", &["admin"]).await;
    replayed(&standby, granted).await;
    wait_trusted(&app, granted).await;
    // A load whose query started on the standby after `since`.
    let loads_since = |since: String| {
        let standby = standby.clone();
        async move {
            let mut conn = PgConnection::connect(&standby).await.expect("standby");
            let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'rc' AND pid <> pg_backend_pid() \
                       AND query LIKE '%unnest(%::text[])%' AND query_start >= $1::timestamptz";
            let (n,): (i64,) =
                sqlx::query_as(sql).bind(since).fetch_one(&mut conn).await.expect("activity");
            n
        }
    };
    let now = || async {
        let mut conn = PgConnection::connect(&standby).await.expect("standby");
        let (now,): (String,) = sqlx::query_as("SELECT clock_timestamp()::text")
            .fetch_one(&mut conn)
            .await
            .expect("now");
        now
    };
    let before = now().await;
    assert!(allowed(&app, "alice").await);
    assert_eq!(loads_since(before).await, 1, "alice's miss was read on the standby");

    // The standby stops replaying; a revoke lands on the primary and in the cache.
    let mut on_standby = PgConnection::connect(&standby).await.expect("standby");
    sqlx::query("SELECT pg_wal_replay_pause()").execute(&mut on_standby).await.expect("pause");
    let revoked = app.revoke("alice", "acme", &["admin"]).await;
    let bob = app.grant("bob", "acme", &["admin"]).await;
    wait_trusted(&app, bob).await;
    let standby_at = query_i64(&standby, "SELECT value FROM store_revision WHERE id = 1").await;
    assert!((standby_at as u64) < revoked, "the standby is behind the revoke");
    let before = now().await;
    assert!(!allowed(&app, "alice").await, "a lagging standby brings no revoked role back");
    assert_eq!(loads_since(before).await, 1, "the standby was asked first");
    assert!(allowed(&app, "bob").await, "a user the standby has not seen is read on the primary");

    sqlx::query("SELECT pg_wal_replay_resume()").execute(&mut on_standby).await.expect("resume");
    replayed(&standby, bob).await;
    let carol = app.grant("carol", "acme", &["admin"]).await;
    replayed(&standby, carol).await;
    assert!(allowed(&app, "carol").await);
    app.stop().await;
    drop(pair);
}

/// An asynchronous failover that lost a write is a new store to every cache, even once
/// the promoted standby's revisions have caught up with the lost ones. A grant to
/// mallory is acknowledged by the primary but never reaches the standby (its replication
/// is stopped); a follower caches mallory's role. The primary dies, the standby is
/// promoted, another replica writes on it until its revision is the lost grant's, and
/// the address the replicas use moves to it. The follower never allows mallory again:
/// its replica sees another timeline (another epoch) and every cache starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_writes_is_a_new_store_to_every_cache() {
    let pair = tokio::task::spawn_blocking(Pair::start).await.expect("clusters");
    let mut admin = PgConnection::connect(&pair.primary_url("postgres")).await.expect("admin");
    sqlx::query("CREATE DATABASE rc").execute(&mut admin).await.expect("create");
    let standby = pair.standby_url("rc");
    let (primary_addr, standby_addr) = pair.addrs();
    // The address the replicas use, which an HA manager moves on failover.
    let vip = crate::proxy::Proxy::start_to(primary_addr).await;
    let through_vip = format!("postgres://postgres@{}/rc", vip.addr);
    let db = TestDb::Replica { url: through_vip, via: None };
    let mut config = test_config(&db);
    config.db_query_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(3);
    let replica = start(config, db).await;
    let follower = crate::follower::follower_of(&replica).await;
    replica.create_tenant("acme").await;
    let seeded = replica.grant("alice", "acme", &["viewer"]).await;
    replayed(&standby, seeded).await;

    // Replication stops; the grant to mallory exists on the primary alone.
    let mut on_standby = PgConnection::connect(&standby).await.expect("standby");
    for sql in ["ALTER SYSTEM SET primary_conninfo = ''", "SELECT pg_reload_conf()"] {
        sqlx::query(sql).execute(&mut on_standby).await.expect(sql);
    }
    drop(on_standby);
    wait_for(Duration::from_secs(10), "the standby to stop receiving", || async {
        let mut conn = PgConnection::connect(&standby).await.ok()?;
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM pg_stat_wal_receiver")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await;
    let lost = replica.grant("mallory", "acme", &["admin"]).await;
    wait_trusted(&follower, lost).await;
    let mallory = |min| check_req("mallory", "acme", "admin", min);
    let answer = follower.checks.clone().check(mallory(lost)).await.expect("Check");
    assert!(answer.into_inner().allowed, "the follower caches mallory's role");

    // Failover: the primary dies, the standby is promoted and written to until its
    // revision is the lost grant's, then the address moves to it.
    let pair = fail_over(pair, &vip).await;
    let promoted = TestDb::Replica { url: pair.standby_url("rc"), via: None };
    let other = start(test_config(&promoted), promoted).await;
    let mut revision = 0;
    while revision < lost {
        revision = other.grant("bob", "acme", &[&format!("r{revision}")]).await;
    }
    assert_eq!(revision, lost, "the new primary's revisions caught up with the lost one");
    vip.retarget(standby_addr);
    vip.restore();

    // Every cache starts over: once the follower trusts its cache again, mallory is
    // denied there (a cache that took the new store for the old would still allow).
    wait_trusted(&replica, lost).await;
    wait_trusted(&follower, lost).await;
    let answer = follower.checks.clone().check(mallory(0)).await.expect("Check");
    assert!(!answer.into_inner().allowed, "the lost grant is gone from every cache");
    let answer = replica.checks.clone().check(mallory(0)).await.expect("Check");
    assert!(!answer.into_inner().allowed);
    let bob = check_req("bob", "acme", "r0", 0);
    let answer = follower.checks.clone().check(bob).await.expect("Check");
    assert!(answer.into_inner().allowed, "the follower answers from the new store");
    drop((follower, replica, other));
    drop(pair);
}

/// A synchronous failover under load: two replicas and a follower of one, a writer and
/// readers running throughout. The primary dies, the standby is promoted and the address
/// moves to it. Every grant acknowledged before, during or after the switch is on the new
/// primary; writes fail only after the primary died, only with `UNAVAILABLE`, and work
/// again within seconds of the address moving (the outage is printed); a user revoked
/// before the failover is never allowed anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_failover_loses_no_acknowledged_write_and_allows_nothing_stale() {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };

    let pair = tokio::task::spawn_blocking(|| {
        let pair = Pair::start();
        pair.synchronous();
        pair
    })
    .await
    .expect("clusters");
    let mut admin = PgConnection::connect(&pair.primary_url("postgres")).await.expect("admin");
    sqlx::query("CREATE DATABASE rc").execute(&mut admin).await.expect("create");
    drop(admin);
    let (primary_addr, standby_addr) = pair.addrs();
    let vip = crate::proxy::Proxy::start_to(primary_addr).await;
    let through_vip = format!("postgres://postgres@{}/rc", vip.addr);
    let configured = || {
        let db = TestDb::Replica { url: through_vip.clone(), via: None };
        let mut config = test_config(&db);
        config.db_query_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(3);
        (config, db)
    };
    let (config, db) = configured();
    let a = start(config, db).await;
    let (config, db) = configured();
    let b = start(config, db).await;
    let follower = crate::follower::follower_of(&a).await;
    a.create_tenant("acme").await;
    a.grant("gone", "acme", &["admin"]).await;
    let revoked = a.revoke("gone", "acme", &["admin"]).await;
    wait_trusted(&follower, revoked).await;

    let stop = Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    // The writer: acknowledged users, and (when, code) of every failed write.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(Mutex::new(Vec::<(Duration, tonic::Code)>::new()));
    let writer = {
        let (mut checks, stop) = (b.checks.clone(), stop.clone());
        let (acknowledged, failures) = (acknowledged.clone(), failures.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let user = format!("w{i}");
                let request = rolecheck::pb::GrantRequest {
                    user_id: user.clone(),
                    tenant_id: "acme".into(),
                    roles: vec!["viewer".into()],
                    expires_at: None,
                };
                match checks.grant(request).await {
                    Ok(_) => acknowledged.lock().expect("lock").push(user),
                    Err(status) => {
                        failures.lock().expect("lock").push((started.elapsed(), status.code()))
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // The readers: the revoked user, on the follower and on the other replica.
    let stale = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = [follower.checks.clone(), b.checks.clone()]
        .into_iter()
        .map(|mut checks| {
            let (stop, stale) = (stop.clone(), stale.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let answer = checks.check(check_req("gone", "acme", "admin", 0)).await;
                    if answer.is_ok_and(|a| a.into_inner().allowed) {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    wait_for(Duration::from_secs(10), "writes before the failover", || async {
        (acknowledged.lock().expect("lock").len() >= 10).then_some(())
    })
    .await;
    let died = started.elapsed();
    let pair = fail_over(pair, &vip).await;
    vip.retarget(standby_addr);
    vip.restore();
    let moved = started.elapsed();
    let at_move = acknowledged.lock().expect("lock").len();
    wait_for(Duration::from_secs(20), "writes to work again", || async {
        (acknowledged.lock().expect("lock").len() > at_move + 10).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    for reader in readers {
        reader.await.expect("reader");
    }

    let failures = failures.lock().expect("lock").clone();
    let acknowledged = acknowledged.lock().expect("lock").clone();
    let (first, last) = (failures.first().map(|f| f.0), failures.last().map(|f| f.0));
    eprintln!(
        "primary killed at {died:?}, address moved at {moved:?}; {} writes refused, from \
         {first:?} to {last:?}; {} acknowledged",
        failures.len(),
        acknowledged.len()
    );
    assert!(failures.iter().all(|(_, code)| *code == tonic::Code::Unavailable), "{failures:?}");
    assert!(failures.iter().all(|(at, _)| *at >= died), "a write failed before the failover");
    assert!(
        failures.iter().all(|(at, _)| *at < moved + Duration::from_secs(5)),
        "writes still failed 5 s after the address moved: {failures:?}"
    );
    assert_eq!(stale.load(Ordering::SeqCst), 0, "a revoked user was allowed");
    let mut promoted = PgConnection::connect(&pair.standby_url("rc")).await.expect("connect");
    let (present,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM memberships WHERE tenant_id = 'acme' AND user_id = ANY($1)",
    )
    .bind(&acknowledged)
    .fetch_one(&mut promoted)
    .await
    .expect("count");
    assert_eq!(present as usize, acknowledged.len(), "an acknowledged write was lost");
    drop((follower, a, b));
    drop(pair);
}
