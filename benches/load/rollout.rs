//! A rollout of followers started at once, cold and warm (`BENCH_ROLLOUT`).

use super::*;

/// Users active on the upstream before a rollout.
const ROLLOUT_ACTIVE: u64 = 5000;

/// Phase 5 (`BENCH_ROLLOUT`, e.g. `20`): a rollout of that many followers at once, cold
/// and warm, against one upstream whose cache holds [`ROLLOUT_ACTIVE`] users. Reports what
/// reaches the upstream before the followers are ready and during their first Checks.
pub(super) async fn rollout_phase(admin_url: &str, followers: usize, concurrency: usize) {
    let db = "rolecheck_bench_rollout";
    let url = fresh_database(admin_url, db).await;
    let dirs = tempfile::tempdir().expect("dir");
    let upstream =
        spawn(rolecheck(&dirs.path().join("upstream"), &[("ROLECHECK_DATABASE_URL", url)]));
    let up = connect(&upstream.grpc).await;
    fn user(i: u64) -> String {
        format!("active-{i}")
    }
    setup_calls(&up, 1, 1, CREATE_TENANT, |_| create_tenant("hot".into())).await;
    setup_calls(&up, ROLLOUT_ACTIVE, 8, GRANT, |i| grant(user(i), "hot".into(), "viewer")).await;
    let check_of = move |i: u64| frame(&check(user(i), "hot".into(), "viewer"));
    setup_calls(&up, ROLLOUT_ACTIVE, concurrency, CHECK, check_of).await;
    let relayed = || {
        metric(&upstream.http, "rolecheck_grpc_request_duration_seconds_count", "GetAuthorization")
    };
    let loads = || metric(&upstream.http, "rolecheck_cache_misses_total", "");
    println!(
        "\n### A rollout of {followers} followers, cold and warm ({ROLLOUT_ACTIVE} users active upstream)\n"
    );
    println!(
        "| start | start → ready (median, max) | upstream calls before ready | upstream calls during the first Checks | Postgres loads upstream | follower misses during the first Checks | first Checks p50 | p99 | max |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, warm_users) in [("cold (`--warm-users 0`)", 0), ("warm (default 10,000)", 10_000)] {
        let (relayed_before, loads_before) = (relayed(), loads());
        let started = Instant::now();
        let servers: Vec<Server> = (0..followers)
            .map(|i| {
                let envs = [
                    ("ROLECHECK_UPSTREAM", format!("http://{}", upstream.grpc)),
                    ("ROLECHECK_WARM_USERS", warm_users.to_string()),
                ];
                spawn(rolecheck(&dirs.path().join(format!("{warm_users}-{i}")), &envs))
            })
            .collect();
        let mut ready = Vec::new();
        for server in &servers {
            while http_status(&server.http, "/readyz") != Some(200) {
                assert!(started.elapsed() < Duration::from_secs(60), "a follower never ready");
                std::thread::sleep(Duration::from_millis(5));
            }
            ready.push(started.elapsed());
        }
        ready.sort_unstable();
        let relayed_ready = relayed();
        let miss_total = |servers: &[Server]| -> f64 {
            servers.iter().map(|s| metric(&s.http, "rolecheck_cache_misses_total", "")).sum()
        };
        let misses_ready = miss_total(&servers);
        let conns = futures::future::join_all(servers.iter().map(|s| connect(&s.grpc))).await;
        let uri: http::Uri = format!("http://bench{CHECK}").parse().expect("uri");
        let latencies = futures::future::join_all(conns.iter().map(|conn| {
            let uri = uri.clone();
            async move {
                let next = AtomicU64::new(0);
                let workers = (0..concurrency).map(|_| async {
                    let mut took = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ROLLOUT_ACTIVE {
                            return took;
                        }
                        let at = Instant::now();
                        let answer = unary(conn, &uri, check_of(i)).await.expect("check");
                        allowed(&answer).expect("allowed");
                        took.push(at.elapsed());
                    }
                });
                futures::future::join_all(workers).await.concat()
            }
        }))
        .await;
        let mut latencies = latencies.concat();
        latencies.sort_unstable();
        println!(
            "| {label} | {}, {} | {} | {} | {} | {} | {} | {} | {} |",
            pct_ms(&ready, 0.5),
            ms(*ready.last().unwrap_or(&Duration::ZERO)),
            thousands(relayed_ready - relayed_before),
            thousands(relayed() - relayed_ready),
            thousands(loads() - loads_before),
            thousands(miss_total(&servers) - misses_ready),
            pct_ms(&latencies, 0.5),
            pct_ms(&latencies, 0.99),
            ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        );
    }
}
