//! Phase 6: the tail, h2load rounds side by side (`BENCH_TAIL`).

use super::*;

/// Phase 6 (`BENCH_TAIL` rounds): h2load alternates the no-op, a cached Check on a central
/// server and a cached Check on a follower of it, so each round compares them on the same
/// machine minutes apart at most; p99 is the figure to watch.
pub(super) async fn tail_phase(noop: &Server, health: &Bytes, concurrency: usize, rounds: usize) {
    let data = tempfile::tempdir().expect("dir");
    let central = spawn(rolecheck(&data.path().join("central"), &[]));
    let conn = connect(&central.grpc).await;
    seed_small(&conn).await;
    let follower = spawn(rolecheck(
        &data.path().join("follower"),
        &[("ROLECHECK_UPSTREAM", format!("http://{}", central.grpc))],
    ));
    while http_status(&follower.http, "/readyz") != Some(200) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let one_check = frame(&hot_check(7));
    for server in [&central, &follower] {
        let conn = connect(&server.grpc).await;
        setup_calls(&conn, 100, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    }
    let perf = std::env::var("BENCH_PERF").ok();
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    println!("\n### The tail: h2load, no-op and cached Check alternating ({rounds} rounds)\n");
    println!(
        "| round | no-op calls/s | no-op p50 | no-op p99 | central Check calls/s | p50 | p99 | p99 × no-op | follower Check calls/s | p50 | p99 | p99 × no-op |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut ratios = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let base = h2load(&noop.grpc, noop.pid, concurrency, "no-op", HEALTH, health);
        let mut checks = Vec::new();
        for (label, server) in [("central", &central), ("follower", &follower)] {
            let recorder = perf.as_ref().filter(|_| round == 0).and_then(|dir| {
                let _ = std::fs::create_dir_all(dir);
                Command::new("perf")
                    .args(["record", "-F", "1999", "-g", "-q", "-p", &server.pid.to_string()])
                    .arg("-o")
                    .arg(format!("{dir}/{label}.data"))
                    .args(["--", "sleep", &format!("{}", seconds.ceil() as u64 + 1)])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            });
            checks.push(h2load(&server.grpc, server.pid, concurrency, label, CHECK, &one_check));
            if let Some(mut recorder) = recorder {
                let _ = recorder.wait();
            }
        }
        let (Some(base), [Some(central), Some(follower)]) = (base, &checks[..]) else {
            println!("(h2load is not installed or failed: no tail figures)");
            return;
        };
        let ratio = |o: &Outcome| o.p99.as_secs_f64() / base.p99.as_secs_f64();
        ratios.0.push(ratio(central));
        ratios.1.push(ratio(follower));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {:.2} |",
            round + 1,
            thousands(base.per_second),
            ms(base.p50),
            ms(base.p99),
            thousands(central.per_second),
            ms(central.p50),
            ms(central.p99),
            ratio(central),
            thousands(follower.per_second),
            ms(follower.p50),
            ms(follower.p99),
            ratio(follower),
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "\nmedian p99 × no-op: central {:.2}, follower {:.2}",
        median(&mut ratios.0),
        median(&mut ratios.1)
    );
}
