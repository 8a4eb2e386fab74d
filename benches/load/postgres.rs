//! Phase 2: Postgres at each size: straight, through PgBouncer, or with a standby.

use super::*;

/// Dataset `size` in a fresh Postgres database: every scenario, then one scaling row.
pub(super) async fn postgres_phase(
    admin_url: &str,
    (bin, label, via): (&Path, &str, Via<'_>),
    size: u64,
    concurrency: usize,
    baseline: &Outcome,
) -> String {
    let dataset = Dataset::new(size);
    let url = fresh_database(admin_url, &format!("rolecheck_bench_{size}")).await;
    let data = tempfile::tempdir().expect("dir");
    let db = [("ROLECHECK_DATABASE_URL", url.clone())];
    let status = rolecheck_from(bin, data.path(), &db).arg("migrate").status().expect("migrate");
    assert!(status.success(), "migrate");
    let loaded = generate(&url, dataset).await;

    let server = match via {
        Via::Direct => spawn(rolecheck_from(bin, data.path(), &db)),
        Via::Standby(pair) => {
            let standby = pair.standby_url(&format!("rolecheck_bench_{size}"));
            let memberships = "SELECT count(*) FROM memberships";
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let replayed = match PgConnection::connect(&standby).await {
                    Ok(mut conn) => sqlx::query_as::<_, (i64,)>(memberships)
                        .fetch_one(&mut conn)
                        .await
                        .is_ok_and(|(n,)| n as u64 >= size),
                    Err(_) => false,
                };
                if replayed {
                    break;
                }
                assert!(Instant::now() < deadline, "the standby never replayed the dataset");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let with_standby =
                [("ROLECHECK_DATABASE_URL", url.clone()), ("ROLECHECK_READ_DATABASE_URL", standby)];
            spawn(rolecheck_from(bin, data.path(), &with_standby))
        }
        Via::PgBouncer(pooler) => {
            let name = format!("rolecheck_bench_{size}");
            let through = [
                ("ROLECHECK_DATABASE_URL", pooler.url(&name, pgbouncer::PASSWORD)),
                ("ROLECHECK_DATABASE_POOL_MODE", "transaction".to_owned()),
                ("ROLECHECK_LISTEN_DATABASE_URL", url.clone()),
            ];
            spawn(rolecheck_from(bin, data.path(), &through))
        }
    };
    let conn = connect(&server.grpc).await;
    let rss_start = rss_mib(server.pid);
    let (hits, misses) = ("rolecheck_cache_hits_total", "rolecheck_cache_misses_total");

    // Every user once, in an order that jumps around the key space.
    let step = 7_919 * 104_729; // a product of primes: coprime with the user count below
    let users = dataset.users;
    let stride =
        if users.is_multiple_of(7_919) || users.is_multiple_of(104_729) { 1 } else { step % users };
    let mut miss = Scenario::new("Check, cache miss (every user new)", CHECK, allowed, move |i| {
        frame(&dataset.allowed_check((i * stride) % users))
    });
    miss.limit = users;
    miss.seconds = env_or("BENCH_MISS_SECONDS", 60.0);
    let misses_before = metric(&server.http, misses, "");
    let miss = load(&conn, server.pid, concurrency, miss).await;
    let loaded_users = metric(&server.http, misses, "") - misses_before;
    let rss_warm = rss_mib(server.pid);
    let entries = metric(&server.http, "rolecheck_cache_entries", "");
    assert!(loaded_users as u64 >= miss.calls - miss.errors, "every call a miss");

    // The share of answers from memory while `scenario` runs.
    let counts = || (metric(&server.http, hits, ""), metric(&server.http, misses, ""));
    let hit_ratio = |before: (f64, f64), after: (f64, f64)| {
        let (hits, misses) = (after.0 - before.0, after.1 - before.1);
        hits / (hits + misses).max(1.0)
    };

    let hot = move |i: u64| frame(&dataset.allowed_check(i % 1000));
    setup_calls(&conn, 1000, concurrency, CHECK, hot).await;
    let before = counts();
    let cached = load(
        &conn,
        server.pid,
        concurrency,
        Scenario::new("Check, cached, 1000 hot users", CHECK, allowed, hot),
    )
    .await;
    let cached_hits = hit_ratio(before, counts());

    let before = counts();
    let spread = load(
        &conn,
        server.pid,
        concurrency,
        Scenario::new("Check spread over every user", CHECK, allowed, move |i| {
            // A multiplicative hash of i: uniform over the users, every run the same.
            frame(&dataset.allowed_check(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % users))
        }),
    )
    .await;
    let spread_hits = hit_ratio(before, counts());

    let mut batch =
        Scenario::new("CheckBatch of 100, cached", CHECK_BATCH, all_allowed, move |i| {
            frame(&pb::CheckBatchRequest {
                checks: (0..100).map(|k| dataset.allowed_check((i + k) % 1000)).collect(),
                min_revision: 0,
            })
        });
    batch.items = 100;
    let before = counts();
    let batch = load(&conn, server.pid, concurrency, batch).await;
    let batch_hits = hit_ratio(before, counts());
    let grants = load(
        &conn,
        server.pid,
        concurrency,
        Scenario::new("Grant, Postgres (durable commit)", GRANT, revision, move |i| {
            grant(format!("new-{i}"), tenant_id(i % dataset.tenants), "viewer")
        }),
    )
    .await;
    let title = format!(
        "Postgres ({label}), {} memberships ({} users, {} tenants; COPY load {:.1} s)",
        thousands(size as f64),
        thousands(users as f64),
        thousands(dataset.tenants as f64),
        loaded.as_secs_f64()
    );
    let outcomes = [miss.clone(), cached.clone(), spread.clone(), batch, grants];
    table(&title, baseline, &outcomes);
    println!(
        "\nresident memory: {rss_start:.0} MiB at start, {rss_warm:.0} MiB with {entries:.0} users \
         ({} memberships) cached; hit ratio: cached Check {cached_hits:.3}, spread Check \
         {spread_hits:.3}, CheckBatch {batch_hits:.3}",
        thousands(entries * PER_USER as f64),
    );
    drop(conn);
    drop(server);
    let mut admin = PgConnection::connect(admin_url).await.expect("admin");
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS rolecheck_bench_{size} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    format!(
        "| {} | {label} | {:.1} s | {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.0} MiB | {:.0} MiB | {} |",
        thousands(size as f64),
        loaded.as_secs_f64(),
        thousands(miss.per_second),
        ms(miss.p50),
        ms(miss.p99),
        thousands(cached.per_second),
        ms(cached.p50),
        ms(cached.p99),
        thousands(spread.per_second),
        spread_hits,
        rss_start,
        rss_warm,
        thousands(entries)
    )
}
