//! Phase 4: the follower tier (`BENCH_FOLLOWERS`).

use super::*;

/// Phase 4 (`BENCH_FOLLOWERS`, e.g. `1,10,50,100`): one Postgres, two upstream replicas,
/// and that many followers, each following one of them. Per step: Postgres client
/// connections, revoke-to-deny latency across every follower, follower idle RSS, start to
/// ready; then a follower's cached Check against the no-op.
pub(super) async fn followers_phase(
    admin_url: &str,
    steps: &[usize],
    concurrency: usize,
    baseline: &Outcome,
    (bin, label): (&Path, &str),
) {
    let db = "rolecheck_bench_followers";
    let url = fresh_database(admin_url, db).await;
    let dirs = tempfile::tempdir().expect("dir");
    let upstreams: Vec<Server> = (0..2)
        .map(|i| {
            let dir = dirs.path().join(format!("upstream{i}"));
            spawn(rolecheck_from(bin, &dir, &[("ROLECHECK_DATABASE_URL", url.clone())]))
        })
        .collect();
    let up = connect(&upstreams[0].grpc).await;
    seed_small(&up).await;
    let mut admin = PgConnection::connect(admin_url).await.expect("admin");
    let mut followers: Vec<(Server, SendRequest<Bytes>, Duration)> = Vec::new();
    println!(
        "\n### The follower tier ({label}): one Postgres, two upstream replicas, N followers\n"
    );
    println!(
        "| followers | Postgres connections | revoke → deny p50 | p99 | max | follower idle RSS (median, max) | start → ready (median, max) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &n in steps {
        let first_new = followers.len();
        while followers.len() < n {
            let i = followers.len();
            let upstream = format!("http://{}", upstreams[i % 2].grpc);
            let started = Instant::now();
            let server = spawn(rolecheck_from(
                bin,
                &dirs.path().join(format!("follower{i}")),
                &[("ROLECHECK_UPSTREAM", upstream)],
            ));
            while http_status(&server.http, "/readyz") != Some(200) {
                assert!(started.elapsed() < Duration::from_secs(30), "follower {i} never ready");
                std::thread::sleep(Duration::from_millis(5));
            }
            let ready = started.elapsed();
            let conn = connect(&server.grpc).await;
            followers.push((server, conn, ready));
        }
        let (connections,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(db)
                .fetch_one(&mut admin)
                .await
                .expect("pg_stat_activity");
        let mut latencies = Vec::new();
        for trial in 0..5 {
            let user = format!("revoked-{n}-{trial}");
            let uri =
                |path: &str| -> http::Uri { format!("http://bench{path}").parse().expect("uri") };
            let granted = unary(&up, &uri(GRANT), grant(user.clone(), "hot".into(), "viewer"))
                .await
                .expect("grant");
            let granted = decode::<pb::GrantResponse>(&granted).expect("grant").revision;
            let mut at_grant = check(user.clone(), "hot".into(), "viewer");
            at_grant.min_revision = granted;
            for (_, conn, _) in &followers {
                for request in [&at_grant, &check(user.clone(), "hot".into(), "viewer")] {
                    let answer = unary(conn, &uri(CHECK), frame(request)).await.expect("check");
                    allowed(&answer).expect("allowed on every follower before the revoke");
                }
            }
            let revoke = frame(&pb::RevokeRequest {
                user_id: user.clone(),
                tenant_id: "hot".into(),
                roles: Vec::new(),
            });
            let started = Instant::now();
            unary(&up, &uri(REVOKE), revoke).await.expect("revoke");
            let denied = futures::future::join_all(followers.iter().map(|(_, conn, _)| {
                let body = frame(&check(user.clone(), "hot".into(), "viewer"));
                let uri = uri(CHECK);
                async move {
                    loop {
                        let answer = unary(conn, &uri, body.clone()).await.expect("check");
                        if allowed(&answer).is_err() {
                            return started.elapsed();
                        }
                        assert!(started.elapsed() < Duration::from_secs(30), "never denied");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }))
            .await;
            latencies.extend(denied);
        }
        latencies.sort_unstable();
        let mut rss: Vec<f64> = followers.iter().map(|(s, _, _)| rss_mib(s.pid)).collect();
        rss.sort_by(f64::total_cmp);
        let mut ready: Vec<Duration> = followers[first_new..].iter().map(|f| f.2).collect();
        ready.sort_unstable();
        println!(
            "| {n} | {connections} | {} | {} | {} | {:.1} MiB, {:.1} MiB | {}, {} |",
            pct_ms(&latencies, 0.5),
            pct_ms(&latencies, 0.99),
            ms(*latencies.last().unwrap_or(&Duration::ZERO)),
            rss[rss.len() / 2],
            rss[rss.len() - 1],
            pct_ms(&ready, 0.5),
            ms(*ready.last().unwrap_or(&Duration::ZERO)),
        );
    }
    // A follower's cached Check against the no-op, the other followers idle.
    let Some((follower, conn, _)) = followers.first() else { return };
    setup_calls(conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    let scenario =
        Scenario::new("Check on a follower, cached, 1000 hot users", CHECK, allowed, |i| {
            frame(&hot_check(i))
        });
    let outcome = load(conn, follower.pid, concurrency, scenario).await;
    table(
        &format!("A follower's cached Check against the no-op ({label})"),
        baseline,
        &[baseline.clone(), outcome],
    );
}
