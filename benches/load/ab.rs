//! Before and after, interleaved (`BENCH_AB=<rounds>` with `BENCH_COMPARE_BIN` and a
//! Postgres): the two builds run side by side, each a central server over a database of
//! its own (each migrated by its own build) and a follower of it, and every round measures a cached Check on each, the
//! order flipping every round, with the no-op first. The host's speed drifts over seconds
//! to minutes; rounds a few seconds long, alternated, put both builds under the same
//! drift, so the median of the per-round ratios says what one long run each cannot.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use h2::client::SendRequest;

use super::{
    CHECK, Outcome, Scenario, Server, allowed, connect, env_or, frame, fresh_database, hot_check,
    http_status, load, rolecheck_from, seed_small, setup_calls, spawn, thousands,
};

/// One build's pair: a central server and a follower of it, with a connection to each.
struct Tier {
    label: &'static str,
    central: (Server, SendRequest<Bytes>),
    follower: (Server, SendRequest<Bytes>),
}

async fn tier(bin: &Path, label: &'static str, admin_url: &str, dir: &Path) -> Tier {
    let url = fresh_database(admin_url, &format!("rolecheck_bench_ab_{label}")).await;
    let db = [("ROLECHECK_DATABASE_URL", url)];
    let status = rolecheck_from(bin, dir, &db).arg("migrate").status().expect("migrate");
    assert!(status.success(), "migrate");
    let central = spawn(rolecheck_from(bin, &dir.join(format!("{label}-central")), &db));
    let upstream = format!("http://{}", central.grpc);
    let follower = spawn(rolecheck_from(
        bin,
        &dir.join(format!("{label}-follower")),
        &[("ROLECHECK_UPSTREAM", upstream)],
    ));
    let started = std::time::Instant::now();
    while http_status(&follower.http, "/readyz") != Some(200) {
        assert!(started.elapsed() < Duration::from_secs(30), "{label} follower never ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (central_conn, follower_conn) =
        (connect(&central.grpc).await, connect(&follower.grpc).await);
    Tier { label, central: (central, central_conn), follower: (follower, follower_conn) }
}

fn cached_check(name: &str) -> Scenario {
    let mut scenario = Scenario::new(name, CHECK, allowed, |i| frame(&hot_check(i)));
    scenario.seconds = env_or("BENCH_AB_SECONDS", 3.0);
    scenario
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// The phase; `noop` measures the no-op on its connection.
pub(super) async fn ab_phase(
    admin_url: &str,
    before: &Path,
    rounds: usize,
    concurrency: usize,
    noop: (&Server, &SendRequest<Bytes>, &Bytes),
) {
    let dir = tempfile::tempdir().expect("dir");
    let tiers = [
        tier(before, "before", admin_url, dir.path()).await,
        tier(Path::new(env!("CARGO_BIN_EXE_rolecheck")), "after", admin_url, dir.path()).await,
    ];
    for tier in &tiers {
        seed_small(&tier.central.1).await;
        for (_, conn) in [&tier.central, &tier.follower] {
            setup_calls(conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
        }
    }

    println!(
        "\n### Before and after, interleaved: {rounds} rounds of a cached Check (Postgres, 1,000 hot users)\n"
    );
    println!(
        "| round | no-op calls/s | before central | after central | before follower | after follower |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let cell = |o: &Outcome| {
        format!("{} ({:.1} µs)", thousands(o.per_second), o.cpu_per_call.as_secs_f64() * 1e6)
    };
    let (mut central, mut follower) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (noop_server, noop_conn, health) = noop;
        let mut baseline =
            Scenario::fixed("no-op", super::HEALTH, super::serving, (*health).clone());
        baseline.seconds = env_or("BENCH_AB_SECONDS", 3.0);
        let baseline = load(noop_conn, noop_server.pid, concurrency, baseline).await;
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut got: [Option<(Outcome, Outcome)>; 2] = [None, None];
        for i in order {
            let tier = &tiers[i];
            let c = load(&tier.central.1, tier.central.0.pid, concurrency, cached_check("central"))
                .await;
            let f =
                load(&tier.follower.1, tier.follower.0.pid, concurrency, cached_check("follower"))
                    .await;
            for o in [&c, &f] {
                assert_eq!(o.errors, 0, "{}: {:?}", tier.label, o.first_error);
            }
            got[i] = Some((c, f));
        }
        let [Some((bc, bf)), Some((ac, af))] = got else { unreachable!() };
        println!(
            "| {} ({}) | {} | {} | {} | {} | {} |",
            round + 1,
            if round % 2 == 0 { "before first" } else { "after first" },
            thousands(baseline.per_second),
            cell(&bc),
            cell(&ac),
            cell(&bf),
            cell(&af)
        );
        central.push((
            ac.per_second / bc.per_second,
            ac.cpu_per_call.as_secs_f64() / bc.cpu_per_call.as_secs_f64(),
        ));
        follower.push((
            af.per_second / bf.per_second,
            af.cpu_per_call.as_secs_f64() / bf.cpu_per_call.as_secs_f64(),
        ));
    }
    println!("\n| after ÷ before, median of {rounds} rounds | calls/s | server CPU/call |");
    println!("| --- | --- | --- |");
    for (name, ratios) in [("central cached Check", &central), ("follower cached Check", &follower)]
    {
        println!(
            "| {name} | {:.3} | {:.3} |",
            median(ratios.iter().map(|r| r.0).collect()),
            median(ratios.iter().map(|r| r.1).collect())
        );
    }
    drop(tiers);
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(admin_url).await.expect("admin");
    for label in ["before", "after"] {
        let drop = format!("DROP DATABASE IF EXISTS rolecheck_bench_ab_{label} WITH (FORCE)");
        let _ = sqlx::query(&drop).execute(&mut admin).await;
    }
}
