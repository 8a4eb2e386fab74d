//! The store-level conformance suite: what every backend (`rolecheck::store::Backend`)
//! must do, run against each through the storage traits alone, with no server, cache or
//! metrics in between (the way SpiceDB's datastore tests hold every datastore to one
//! contract). A new backend joins by adding itself to `both_stores!`.

use std::{collections::BTreeSet, path::Path, sync::Arc, time::Duration};

use futures::future::join_all;
use rolecheck::{
    domain::{Role, TenantId, UserId},
    error::Error,
    store::{self, FeedEvent, MembershipWrite, Store, StoreOptions, Tenant, WriteKind},
};
use sqlx::{Connection, PgConnection, SqliteConnection};
use tokio::sync::Mutex;

use crate::{
    both_stores,
    helpers::{Backend, TestDb, wait_for},
};

fn app_tenant() -> TenantId {
    TenantId::parse("application_id", "app").expect("tenant id")
}

/// Opens the store of `db` (a second call opens a second instance over the same data).
async fn open(db: &TestDb, migrate: bool) -> Result<Store, Error> {
    open_with(db, migrate, StoreOptions::new(8, Duration::from_secs(1))).await
}

/// [`open`] with `options`.
pub(crate) async fn open_with(
    db: &TestDb,
    migrate: bool,
    mut options: StoreOptions,
) -> Result<Store, Error> {
    // The way a server would reach it (through a pooler, for one).
    let config = crate::helpers::test_config(db);
    options.transaction_pooling = config.database_pool_mode == "transaction";
    options.listen_url = config.listen_database_url.map(|url| url.0);
    let (url, dir) = match db {
        TestDb::Sqlite(dir) => (None, dir.path().to_owned()),
        _ => (config.database_url.map(|url| url.0), std::env::temp_dir()),
    };
    store::open(url.as_deref(), &dir, &app_tenant(), &options, migrate).await
}

pub(crate) fn write(kind: WriteKind, tenant: &str, user: &str, roles: &[&str]) -> MembershipWrite {
    MembershipWrite {
        kind,
        tenant: TenantId::parse("tenant_id", tenant).expect("tenant"),
        user: UserId::parse("user_id", user).expect("user"),
        roles: roles.iter().map(|role| Role::parse("roles", role).expect("role")).collect(),
        expires_at: None,
        caller: "store-suite".into(),
    }
}

pub(crate) async fn create_tenant(store: &Store, id: &str) -> u64 {
    let tenant = Tenant {
        id: TenantId::parse("tenant_id", id).expect("tenant"),
        name: id.into(),
        created_at_ms: 0,
    };
    store.writes.create_tenant(&tenant, "store-suite").await.expect("create tenant").0
}

/// Revisions of the history after `after`.
async fn committed_after(store: &Store, after: u64) -> Vec<u64> {
    let history = store.history.changes_after(after, 10_000).await.expect("history");
    history.entries.iter().map(|entry| entry.revision).collect()
}

/// Writes sent together (on Postgres, one group-committed batch): one to a tenant that
/// does not exist fails alone, with NOT_FOUND naming that tenant; a Revoke there is a
/// no-op success; every other write commits at a revision of its own.
async fn a_failure_belongs_to_its_own_write(backend: Backend) {
    let db = TestDb::create(backend).await;
    let store = open(&db, true).await.expect("open");
    create_tenant(&store, "live").await;
    let before = store.tenants.revision().await.expect("revision");
    let mut writes: Vec<MembershipWrite> =
        (0..40).map(|i| write(WriteKind::Grant, "live", &format!("u{i}"), &["reader"])).collect();
    writes.insert(10, write(WriteKind::Grant, "gone", "x", &["reader"]));
    writes.insert(20, write(WriteKind::Revoke, "gone", "y", &["reader"]));
    writes.insert(30, write(WriteKind::SetRoles, "gone", "z", &["reader"]));
    let results = join_all(writes.iter().map(|w| store.writes.write_membership(w))).await;

    let mut revisions = BTreeSet::new();
    for (write, result) in writes.iter().zip(results) {
        match (write.tenant.as_str(), write.kind) {
            ("live", _) => {
                revisions.insert(result.expect("a write to a live tenant commits"));
            }
            (_, WriteKind::Revoke) => {
                let revision = result.expect("a Revoke in a missing tenant succeeds");
                assert!(revision >= before, "{revision} answers a current revision");
            }
            _ => match result {
                Err(Error::NotFound(message)) => assert!(message.contains("gone"), "{message}"),
                other => panic!("a write to a missing tenant is NOT_FOUND, got {other:?}"),
            },
        }
    }
    assert_eq!(revisions.len(), 40, "each write has a revision of its own");
    let committed: BTreeSet<u64> = committed_after(&store, before).await.into_iter().collect();
    assert_eq!(committed, revisions, "the history holds exactly the writes that succeeded");
    store.backend.close().await;
}

/// Two store instances over one database (on SQLite, one instance: its file belongs to
/// one process) write the same rows while tenants are created, filled and deleted beside
/// them: no write to a live tenant fails, and Postgres reports no deadlock.
async fn two_writers_on_the_same_rows_never_fail(backend: Backend) {
    let db = TestDb::create(backend).await;
    let first = open(&db, true).await.expect("open");
    let second = match backend {
        Backend::Postgres | Backend::PgBouncer => {
            open(&db, false).await.expect("open a second instance")
        }
        Backend::Sqlite => first.clone(),
    };
    for tenant in ["t0", "t1", "t2"] {
        create_tenant(&first, tenant).await;
    }
    let deadlocks = || async {
        let TestDb::Postgres { name, url, .. } = &db else { return 0 };
        let mut conn = PgConnection::connect(url).await.expect("connect");
        let sql = "SELECT deadlocks FROM pg_stat_database WHERE datname = $1";
        let (count,): (i64,) =
            sqlx::query_as(sql).bind(name).fetch_one(&mut conn).await.expect("stats");
        count
    };
    let deadlocks_before = deadlocks().await;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for (n, store) in [&first, &second, &first, &second].into_iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let (mut done, mut i) = (0u32, n);
            while tokio::time::Instant::now() < until {
                let kind = [WriteKind::Grant, WriteKind::Revoke, WriteKind::SetRoles][i % 3];
                let w = write(kind, &format!("t{}", i % 3), &format!("u{}", i % 7), &["admin"]);
                store.writes.write_membership(&w).await.expect("write to a live tenant");
                (done, i) = (done + 1, i + 1);
            }
            done
        }));
    }
    for (n, store) in [&first, &second].into_iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut cycles = 0u32;
            while tokio::time::Instant::now() < until {
                let id = format!("churn{n}x{cycles}");
                create_tenant(&store, &id).await;
                for user in ["u0", "u1", "u2"] {
                    let w = write(WriteKind::Grant, &id, user, &["admin"]);
                    store.writes.write_membership(&w).await.expect("fill a churned tenant");
                }
                let tenant = TenantId::parse("tenant_id", &id).expect("tenant");
                store.writes.delete_tenant(&tenant, "store-suite").await.expect("delete");
                cycles += 1;
            }
            cycles
        }));
    }
    let counts: Vec<u32> = join_all(tasks).await.into_iter().map(|t| t.expect("task")).collect();
    assert!(counts.iter().all(|&count| count > 0), "every writer made progress: {counts:?}");
    assert_eq!(deadlocks().await, deadlocks_before, "no deadlock");
    first.backend.close().await;
    second.backend.close().await;
}

/// Writes cancelled at every step (deadlines from 0 up, in small increments, so the
/// cancellation lands before the write is queued, while it waits, while it runs, during
/// COMMIT and after it): every write that committed was announced on the change feed,
/// and nothing else was.
async fn a_cancelled_write_is_announced_if_and_only_if_it_committed(backend: Backend) {
    let db = TestDb::create(backend).await;
    let store = open(&db, true).await.expect("open");
    let mut feed = store.backend.subscribe().await.expect("feed");
    let announced = Arc::new(Mutex::new(BTreeSet::new()));
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let collector = {
        let announced = announced.clone();
        tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            while let Some(event) = feed.events.recv().await {
                match event {
                    FeedEvent::Connected { .. } => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    FeedEvent::Changed { revision, .. } => {
                        announced.lock().await.insert(revision);
                    }
                    FeedEvent::Synced { .. }
                    | FeedEvent::Lost
                    | FeedEvent::Interrupted
                    | FeedEvent::Resumed { .. } => {}
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(5), connected).await.expect("feed connects").ok();
    create_tenant(&store, "live").await;
    let start = store.tenants.revision().await.expect("revision");

    let (mut cancelled, mut finished) = (0, 0);
    // Twice over: 0 to ~6 ms in 25 µs steps, then a few with time to finish.
    for i in 0u64..480 {
        let step = i % 240;
        let deadline =
            if step < 232 { Duration::from_micros(step * 25) } else { Duration::from_secs(5) };
        let kind = [WriteKind::Grant, WriteKind::Revoke, WriteKind::SetRoles][i as usize % 3];
        let w = write(kind, "live", &format!("u{}", i % 5), &["admin"]);
        let outcome = if i % 8 == 7 {
            // Tenant writes: create, then delete, a tenant of their own.
            let id = format!("c{i}");
            let tenant = Tenant {
                id: TenantId::parse("tenant_id", &id).expect("tenant"),
                name: id.clone(),
                created_at_ms: 0,
            };
            let run = async {
                store.writes.create_tenant(&tenant, "store-suite").await?;
                store.writes.delete_tenant(&tenant.id, "store-suite").await
            };
            tokio::time::timeout(deadline, run).await
        } else {
            tokio::time::timeout(deadline, store.writes.write_membership(&w)).await
        };
        match outcome {
            Ok(result) => {
                result.expect("a write given time succeeds");
                finished += 1;
            }
            Err(_) => cancelled += 1,
        }
    }
    assert!(cancelled > 0 && finished > 0, "{cancelled} cancelled, {finished} finished");

    let committed: BTreeSet<u64> = committed_after(&store, start).await.into_iter().collect();
    assert!(committed.len() >= finished, "{} committed", committed.len());
    wait_for(Duration::from_secs(5), "every committed write announced", || async {
        committed.is_subset(&*announced.lock().await).then_some(())
    })
    .await;
    let announced: BTreeSet<u64> =
        announced.lock().await.iter().copied().filter(|&revision| revision > start).collect();
    assert_eq!(announced, committed, "announced if and only if committed");
    collector.abort();
    store.backend.close().await;
}

/// The schema check at start: a fresh database is "run `rolecheck migrate`", a newer
/// schema is "upgrade rolecheck", a migrated one opens without migrating again, and an
/// unreachable Postgres is UNAVAILABLE (retried at start), never "run migrate".
async fn the_schema_check_classifies_what_it_finds(backend: Backend) {
    let db = TestDb::create(backend).await;
    match open(&db, false).await {
        Err(Error::FailedPrecondition(message)) => {
            assert!(message.contains("rolecheck migrate"), "{message}")
        }
        other => panic!("a fresh database needs migrating, got {other:?}"),
    }
    open(&db, true).await.expect("migrate").backend.close().await;
    open(&db, false).await.expect("a migrated database opens").backend.close().await;

    let fake = "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                execution_time) VALUES (99999, 'from the future', true, x'00', 0)";
    match &db {
        TestDb::Sqlite(dir) => {
            let url = format!("sqlite:{}", dir.path().join("rolecheck.db").display());
            let mut conn = SqliteConnection::connect(&url).await.expect("connect");
            sqlx::query(fake).execute(&mut conn).await.expect("fake a newer migration");
        }
        other => {
            let mut conn = PgConnection::connect(other.url()).await.expect("connect");
            let fake = fake.replace("x'00'", "'\\x00'");
            sqlx::query(&fake).execute(&mut conn).await.expect("fake a newer migration");
        }
    }
    for migrate in [false, true] {
        match open(&db, migrate).await {
            Err(Error::FailedPrecondition(message)) => {
                assert!(message.contains("upgrade"), "{message}")
            }
            other => panic!("a newer schema is refused, got {other:?}"),
        }
    }

    match backend {
        Backend::Postgres | Backend::PgBouncer => {
            let unreachable =
                TestDb::Replica { url: "postgres://postgres@127.0.0.1:1/x".into(), via: None };
            match open(&unreachable, false).await {
                Err(Error::Unavailable(_)) => {}
                other => panic!("an unreachable database is UNAVAILABLE, got {other:?}"),
            }
        }
        // A file is not reached over a network; a path that cannot hold one is refused
        // as a setting, and an in-memory database is refused with the reason.
        Backend::Sqlite => {
            let under_a_file = Path::new("/dev/null/rolecheck");
            let options = StoreOptions::new(2, Duration::from_secs(1));
            let app = app_tenant();
            match store::open(None, under_a_file, &app, &options, true).await {
                Err(Error::FailedPrecondition(message)) => {
                    assert!(message.contains("/dev/null"), "{message}")
                }
                other => panic!("an unusable path is refused, got {other:?}"),
            }
            match store::open(Some("sqlite::memory:"), under_a_file, &app, &options, true).await {
                Err(Error::InvalidArgument { reason, .. }) => {
                    assert!(reason.contains("in-memory"), "{reason}")
                }
                other => panic!("sqlite::memory: is refused, got {other:?}"),
            }
        }
    }
}

/// The application tenant is there, committed, when the store opens: a write in it at
/// once succeeds (through a transaction-mode pooler it once committed only as its
/// connection was given back, after the server had begun serving). Ten fresh stores.
async fn the_application_tenant_is_there_when_the_store_opens(backend: Backend) {
    for round in 0..10 {
        let db = TestDb::create(backend).await;
        let store = open(&db, true).await.expect("open");
        let grant = write(WriteKind::Grant, "app", "u", &["member"]);
        let written = store.writes.write_membership(&grant).await;
        assert!(written.is_ok(), "round {round}: {written:?}");
        store.backend.close().await;
    }
}

both_stores!(
    a_failure_belongs_to_its_own_write,
    two_writers_on_the_same_rows_never_fail,
    a_cancelled_write_is_announced_if_and_only_if_it_committed,
    the_schema_check_classifies_what_it_finds,
    the_application_tenant_is_there_when_the_store_opens,
);
