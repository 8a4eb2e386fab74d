//! Upkeep at scale: deleting a tenant of many memberships and pruning a long history while
//! Grants run beside them. Both delete in bounded chunks (`src/store/shared.rs`): the
//! tenant is gone for every reader at once, its rows go afterwards, and no Grant waits on
//! either for long. The size is `ROLECHECK_BIG_ROWS`: 100,000 by default (ten chunks), the
//! issue's 2,000,000 by hand (`ROLECHECK_BIG_ROWS=2000000 scripts/test -E 'test(upkeep)'`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rolecheck::{
    domain::{TenantId, UserId},
    error::Error,
    store::{PURGE_CHUNK, Store, StoreOptions, WriteKind},
};
use sqlx::{Connection, PgConnection, SqliteConnection};

use crate::{
    both_stores,
    helpers::{Backend, TestDb, wait_for},
    store::{create_tenant, open_with, write},
};

/// The statement timeout of the store under test: one statement deleting the whole
/// tenant or history would run into it at 2,000,000 rows.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

fn big_rows() -> i64 {
    std::env::var("ROLECHECK_BIG_ROWS").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000)
}

/// Runs `statements` straight on the database, as a bulk load would.
async fn raw(db: &TestDb, statements: &[String]) {
    match db {
        TestDb::Sqlite(dir) => {
            let url = format!("sqlite:{}", dir.path().join("rolecheck.db").display());
            let mut conn = SqliteConnection::connect(&url).await.expect("connect");
            for statement in statements {
                sqlx::query(statement).execute(&mut conn).await.expect(statement);
            }
        }
        other => {
            let mut conn = PgConnection::connect(other.url()).await.expect("connect");
            for statement in statements {
                sqlx::query(statement).execute(&mut conn).await.expect(statement);
            }
        }
    }
}

/// One count, straight from the database.
async fn count(db: &TestDb, statement: &str) -> i64 {
    let (n,): (i64,) = match db {
        TestDb::Sqlite(dir) => {
            let url = format!("sqlite:{}", dir.path().join("rolecheck.db").display());
            let mut conn = SqliteConnection::connect(&url).await.expect("connect");
            sqlx::query_as(statement).fetch_one(&mut conn).await.expect(statement)
        }
        other => {
            let mut conn = PgConnection::connect(other.url()).await.expect("connect");
            sqlx::query_as(statement).fetch_one(&mut conn).await.expect(statement)
        }
    };
    n
}

/// `count` rows of `select` (over a series `g` from 1), in each backend's spelling.
fn series(backend: Backend, count: i64, insert: &str, select: &str) -> String {
    match backend {
        Backend::Sqlite => format!(
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {count}) \
             {insert} {select} FROM s"
        ),
        _ => format!("{insert} {select} FROM generate_series(1, {count}) g"),
    }
}

/// Grants, one after another, until stopped: how many, how many failed, the slowest.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<(u64, Duration)>,
}

fn grant_until_stopped(store: &Store) -> Writer {
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let (store, flag, counter) = (store.clone(), stop.clone(), done.clone());
    let task = tokio::spawn(async move {
        let (mut failed, mut slowest) = (0, Duration::ZERO);
        while !flag.load(Ordering::Relaxed) {
            let n = counter.load(Ordering::Relaxed);
            let grant = write(WriteKind::Grant, "keep", &format!("k{}", n % 50), &["reader"]);
            let started = Instant::now();
            if store.writes.write_membership(&grant).await.is_err() {
                failed += 1;
            }
            slowest = slowest.max(started.elapsed());
            counter.fetch_add(1, Ordering::Relaxed);
        }
        (failed, slowest)
    });
    Writer { stop, done, task }
}

/// A tenant of `ROLECHECK_BIG_ROWS` memberships is deleted in one short write and is gone
/// at once for every read and write (its id refused, UNAVAILABLE, until the purge ends);
/// the purge then empties it in chunks, and a history as long is pruned in chunks, while
/// Grants in another tenant all succeed, none waiting as long as the statement timeout.
async fn a_big_tenant_and_a_long_history_go_in_chunks_while_grants_run(backend: Backend) {
    let rows = big_rows();
    let db = TestDb::create(backend).await;
    let mut options = StoreOptions::new(8, Duration::from_secs(1));
    options.query_timeout = QUERY_TIMEOUT;
    let store = open_with(&db, true, options).await.expect("open");
    // A history of `rows` old writes (committed at 1 ms past the epoch), then the tenants.
    raw(
        &db,
        &[
            series(
                backend,
                rows,
                "INSERT INTO changes (revision, kind, tenant_id, user_id, roles, committed_at, caller)",
                "SELECT g, 'm', 'old', 'u', 'reader', 1, 'seed'",
            ),
            format!("UPDATE store_revision SET value = {rows} WHERE id = 1"),
        ],
    )
    .await;
    let cutoff = rolecheck::domain::now_millis() - 1;
    create_tenant(&store, "big").await;
    create_tenant(&store, "keep").await;
    let user_id = match backend {
        Backend::Sqlite => "printf('u%08d', g)",
        _ => "'u' || lpad(g::text, 8, '0')",
    };
    raw(
        &db,
        &[series(
            backend,
            rows,
            "INSERT INTO memberships (tenant_id, user_id, role)",
            &format!("SELECT 'big', {user_id}, 'reader'"),
        )],
    )
    .await;
    let big = TenantId::parse("tenant_id", "big").expect("tenant");
    let user = UserId::parse("user_id", "u00000001").expect("user");
    let held = store.roles.user_roles(&user, 0).await.expect("roles");
    let now = rolecheck::domain::now_unix();
    assert!(held.roles.authorization(now).contains_key("big"), "seeded");

    let writer = grant_until_stopped(&store);
    wait_for(Duration::from_secs(10), "grants to run", || async {
        (writer.done.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;

    let started = Instant::now();
    let deleted_at = store.writes.delete_tenant(&big, "upkeep").await.expect("delete");
    let delete_took = started.elapsed();
    assert!(delete_took < QUERY_TIMEOUT, "DeleteTenant took {delete_took:?}");
    // Gone at once, to every read and write, while its rows are still there.
    let held = store.roles.user_roles(&user, deleted_at).await.expect("roles");
    assert!(!held.roles.authorization(now).contains_key("big"), "gone after the delete");
    let (members, _) = store.tenants.list_members(&big, None, 10, now).await.expect("members");
    assert!(members.is_empty(), "members of a deleted tenant: {members:?}");
    assert!(matches!(store.tenants.get_tenant(&big).await, Err(Error::NotFound(_))));
    let tenants = store.tenants.list_tenants(None, 100).await.expect("tenants");
    assert!(tenants.iter().all(|tenant| tenant.id != big), "listed: {tenants:?}");
    let grant = write(WriteKind::Grant, "big", "u00000001", &["reader"]);
    assert!(matches!(store.writes.write_membership(&grant).await, Err(Error::NotFound(_))));
    let again = rolecheck::store::Tenant { id: big.clone(), name: "big".into(), created_at_ms: 0 };
    match store.writes.create_tenant(&again, "upkeep").await {
        Err(Error::Unavailable(message)) => assert!(message.contains("purged"), "{message}"),
        other => panic!("the id of a tenant being purged is refused, got {other:?}"),
    }
    let left = "SELECT count(*) FROM memberships WHERE tenant_id = 'big'";
    assert_eq!(count(&db, left).await, rows, "the rows wait for the purge");

    let grants_before = writer.done.load(Ordering::Relaxed);
    let started = Instant::now();
    let purged = store.history.purge_deleted_tenants().await.expect("purge");
    let purge_took = started.elapsed();
    let started = Instant::now();
    let floor = store.history.prune_history(cutoff).await.expect("prune");
    let prune_took = started.elapsed();
    let grants_during = writer.done.load(Ordering::Relaxed) - grants_before;

    writer.stop.store(true, Ordering::Relaxed);
    let (failed, slowest) = writer.task.await.expect("writer");
    eprintln!(
        "{backend:?}, {rows} rows (chunks of {PURGE_CHUNK}): DeleteTenant {delete_took:?}; \
         purge {purge_took:?}; prune {prune_took:?}; {grants_during} grants meanwhile, \
         {failed} failed, slowest {slowest:?}"
    );
    assert_eq!(purged, rows as u64);
    assert_eq!(floor, rows as u64, "pruned through the last old write");
    assert_eq!(failed, 0, "no grant failed");
    assert!(slowest < QUERY_TIMEOUT, "the slowest grant took {slowest:?}");
    assert!(grants_during > 0, "grants ran during the purge and the prune");
    assert_eq!(count(&db, left).await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM tenants WHERE tenant_id = 'big'").await, 0);
    let old = format!("SELECT count(*) FROM changes WHERE revision <= {rows}");
    assert_eq!(count(&db, &old).await, 0);
    let history = store.history.changes_after(0, 10).await.expect("history");
    assert_eq!(history.pruned_through, rows as u64);
    assert!(history.entries.iter().all(|entry| entry.revision > rows as u64));
    // The id is free again, and the new tenant starts empty.
    store.writes.create_tenant(&again, "upkeep").await.expect("the id is free");
    let (members, _) = store.tenants.list_members(&big, None, 10, now).await.expect("members");
    assert!(members.is_empty(), "a new tenant inherits nothing: {members:?}");
    store.backend.close().await;
}

both_stores!(a_big_tenant_and_a_long_history_go_in_chunks_while_grants_run);
