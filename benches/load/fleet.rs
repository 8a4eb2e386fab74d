//! A fleet of followers of one replica whose listener is cut (`BENCH_FLEET`).

use super::*;

/// Phase 7 (`BENCH_FLEET`, e.g. `300`): that many followers of one replica. No keys, so
/// every follower is the same caller ("anonymous"), past the 256 Watch streams one caller
/// may hold: each names itself and is counted alone. All must become ready with the
/// replica's Postgres connections flat. Then the replica's listener is cut for
/// [`FLEET_CUT`] (the database takes no new connections, and the listener's backend is
/// terminated every 50 ms), so the replica stops being current
/// and every follower loses trust at once, under a Check load spread over all of them
/// (one caller per follower). Reports what reached the replica meanwhile and how long the
/// fleet took to trust its caches again.
pub(super) async fn fleet_phase(admin_url: &str, n: usize) {
    let db = "rolecheck_bench_fleet";
    let url = fresh_database(admin_url, db).await;
    let dirs = tempfile::tempdir().expect("dir");
    let upstream =
        spawn(rolecheck(&dirs.path().join("upstream"), &[("ROLECHECK_DATABASE_URL", url)]));
    let up = connect(&upstream.grpc).await;
    seed_small(&up).await;
    let mut admin = PgConnection::connect(admin_url).await.expect("admin");
    let count = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1";
    let (before,): (i64,) =
        sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
    let started = Instant::now();
    let mut followers = Vec::with_capacity(n);
    for i in 0..n {
        let upstream = format!("http://{}", upstream.grpc);
        let dir = dirs.path().join(format!("follower{i}"));
        followers.push(spawn(rolecheck(&dir, &[("ROLECHECK_UPSTREAM", upstream)])));
    }
    let mut waiting: Vec<usize> = (0..n).collect();
    while !waiting.is_empty() {
        waiting.retain(|&i| http_status(&followers[i].http, "/readyz") != Some(200));
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} followers never ready",
            waiting.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_ready = started.elapsed();
    let (ready,): (i64,) =
        sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
    let mut conns = Vec::with_capacity(n);
    for follower in &followers {
        conns.push(connect(&follower.grpc).await);
    }
    // Each follower's cache holds 20 hot users.
    let uri: http::Uri = format!("http://bench{CHECK}").parse().expect("uri");
    for (i, conn) in conns.iter().enumerate() {
        for u in 0..20 {
            let body = frame(&hot_check((i * 20 + u) as u64));
            unary(conn, &uri, body).await.expect("warm");
        }
    }
    let relayed = || {
        metric(&upstream.http, "rolecheck_grpc_request_duration_seconds_count", "GetAuthorization")
    };
    // One caller per follower, each asking its own 20 users in turn, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tally = Arc::new([(); 3].map(|()| std::sync::atomic::AtomicU64::new(0)));
    let mut load = Vec::with_capacity(n);
    for (i, conn) in conns.iter().enumerate() {
        let (conn, uri, stop, tally) = (conn.clone(), uri.clone(), stop.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            let mut u = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = frame(&hot_check((i * 20 + u % 20) as u64));
                let slot = match unary(&conn, &uri, body).await {
                    Ok(answer) if allowed(&answer).is_ok() => 0,
                    Ok(_) => 1,
                    Err(_) => 2,
                };
                tally[slot].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                u += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let counts = |tally: &[std::sync::atomic::AtomicU64; 3]| {
        tally.each_ref().map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (steady_from, steady_relayed) = (counts(&tally), relayed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (steady_to, cut_relayed) = (counts(&tally), relayed());
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = 'rolecheck-listener'";
    // No new connection to the database meanwhile, so the listener cannot come back (the
    // replica's pooled connections stay and answer its loads).
    let allow = |yes: bool| format!("ALTER DATABASE {db} ALLOW_CONNECTIONS {yes}");
    sqlx::query(&allow(false)).execute(&mut admin).await.expect("no new connections");
    let cut = Instant::now();
    let mut peak = ready;
    let mut terminated = 0;
    let mut untrusted_peak = 0;
    while cut.elapsed() < FLEET_CUT {
        let (killed,): (i64,) =
            sqlx::query_as(terminate).bind(db).fetch_one(&mut admin).await.expect("cut");
        terminated += killed;
        if cut.elapsed() > FLEET_CUT / 2 {
            let untrusted = followers
                .iter()
                .filter(|f| metric(&f.http, "rolecheck_cache_trusted", "") != 1.0)
                .count();
            untrusted_peak = untrusted_peak.max(untrusted);
        }
        let (now,): (i64,) =
            sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
        peak = peak.max(now);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (cut_to, after_cut_relayed) = (counts(&tally), relayed());
    sqlx::query(&allow(true)).execute(&mut admin).await.expect("connections again");
    let healed = Instant::now();
    let mut untrusted: Vec<usize> = (0..n).collect();
    while !untrusted.is_empty() {
        untrusted.retain(|&i| metric(&followers[i].http, "rolecheck_cache_trusted", "") != 1.0);
        assert!(
            healed.elapsed() < Duration::from_secs(60),
            "{} followers never trusted again",
            untrusted.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = healed.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    futures::future::join_all(load).await;
    let (after,): (i64,) =
        sqlx::query_as(count).bind(db).fetch_one(&mut admin).await.expect("count");
    let per_s = |calls: f64, d: Duration| calls / d.as_secs_f64();
    println!(
        "\n### A fleet of {n} followers of one replica (one caller name), its listener cut for {FLEET_CUT:?}\n"
    );
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| followers ready | {n} of {n}, all within {} |", ms(all_ready));
    println!(
        "| replica's Postgres connections: before followers / all ready / peak during the cut / after | {before} / {ready} / {peak} / {after} |"
    );
    let steady: Vec<u64> = (0..3).map(|k| steady_to[k] - steady_from[k]).collect();
    let during: Vec<u64> = (0..3).map(|k| cut_to[k] - steady_to[k]).collect();
    println!(
        "| Checks over 2 s steady: allowed / denied / failed | {} / {} / {} |",
        steady[0], steady[1], steady[2]
    );
    println!(
        "| Checks during the cut: allowed / denied / failed | {} / {} / {} |",
        during[0], during[1], during[2]
    );
    println!(
        "| loads reaching the replica (GetAuthorization/s): steady / during the cut | {:.0} / {:.0} |",
        per_s(cut_relayed - steady_relayed, Duration::from_secs(2)),
        per_s(after_cut_relayed - cut_relayed, FLEET_CUT),
    );
    println!(
        "| listener connections terminated / followers not trusting their cache, most seen in the cut's second half | {terminated} / {untrusted_peak} of {n} |"
    );
    println!("| every follower trusted again, after the cut ended | {} |", ms(recovered));
}

/// How long the fleet phase keeps the replica's listener cut.
const FLEET_CUT: Duration = Duration::from_secs(3);
