//! Bulk import (`BENCH_SKIP_IMPORT` skips it): `BENCH_IMPORT_USERS` (250,000) users, each
//! with two roles in each of two of 100 tenants (1,000,000 memberships by default), from a
//! JSON Lines file through `rolecheck import --create-tenants` into Postgres and into the
//! embedded store, each on a fresh store. Against two references in the same run, on the
//! same rows: the path before `Import`, one `SetRoles` call per user and tenant (10,000
//! users' worth, 50 calls in flight on one connection, into the store the import filled),
//! and Postgres's own `COPY` of every row into an empty copy of the memberships table,
//! its indexes included (the floor: no history, no revision, no notification). With
//! `BENCH_COMPARE_BIN`, that build's import into Postgres first, in the same run.

use super::*;

const SET_ROLES: &str = "/rolecheck.v1.RoleCheck/SetRoles";

/// User `n`'s two tenants.
fn tenants_of(n: u64) -> [u64; 2] {
    let (a, b) = (n % 100, (n * 7 + 3) % 100);
    if a == b { [a, (b + 1) % 100] } else { [a.min(b), a.max(b)] }
}

fn file_of(users: u64) -> String {
    let mut text = String::with_capacity(users as usize * 120);
    for n in 0..users {
        let [a, b] = tenants_of(n);
        text.push_str(&format!(
            "{{\"user_id\":\"user-{n:07}\",\"authorization\":{{\"t{a:03}\":{{\"roles\":[\"editor\",\"viewer\"]}},\"t{b:03}\":{{\"roles\":[\"admin\",\"billing\"]}}}}}}\n"
        ));
    }
    text
}

/// `rolecheck import FILE --create-tenants` by `bin` against `grpc`; how long it took.
fn import(bin: &Path, grpc: &str, file: &Path) -> Duration {
    let started = Instant::now();
    let out = Command::new(bin)
        .args(["import", "--create-tenants", "--output", "json"])
        .arg(file)
        .env("ROLECHECK_SERVER", format!("http://{grpc}"))
        .output()
        .expect("rolecheck import");
    let took = started.elapsed();
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["rejected"], 0, "{summary}");
    took
}

/// 10,000 users' memberships as SetRoles calls (two per user) against `grpc`.
async fn set_roles(grpc: &str) -> (u64, Duration) {
    let conn = connect(grpc).await;
    let calls = 20_000;
    let started = Instant::now();
    setup_calls(&conn, calls, 50, SET_ROLES, |i| {
        let (n, side) = (10_000_000 + i / 2, i % 2);
        let tenant = tenants_of(n)[side as usize];
        let roles = match side {
            0 => vec!["editor".to_owned(), "viewer".to_owned()],
            _ => vec!["admin".to_owned(), "billing".to_owned()],
        };
        frame(&pb::SetRolesRequest {
            user_id: format!("user-{n:08}"),
            tenant_id: format!("t{tenant:03}"),
            roles,
            expires_at: None,
        })
    })
    .await;
    (calls * 2, started.elapsed())
}

/// Postgres's COPY of the same rows into an empty copy of `memberships`.
async fn copy_floor(url: &str, users: u64) -> Duration {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("CREATE TABLE bench_copy (LIKE memberships INCLUDING ALL)")
        .execute(&mut conn)
        .await
        .expect("table");
    let mut rows = String::with_capacity(users as usize * 100);
    for n in 0..users {
        let [a, b] = tenants_of(n);
        for (tenant, role) in [(a, "editor"), (a, "viewer"), (b, "admin"), (b, "billing")] {
            rows.push_str(&format!("t{tenant:03}\tuser-{n:07}\t{role}\t\\N\n"));
        }
    }
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw("COPY bench_copy (tenant_id, user_id, role, expires_at) FROM STDIN")
        .await
        .expect("copy");
    copy.send(rows.into_bytes()).await.expect("send");
    copy.finish().await.expect("finish");
    started.elapsed()
}

pub async fn import_phase(admin_url: Option<&str>) {
    let users: u64 = env_or("BENCH_IMPORT_USERS", 250_000);
    let memberships = users * 4;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("users.jsonl");
    std::fs::write(&file, file_of(users)).expect("file");
    let rate = |n: u64, took: Duration| n as f64 / took.as_secs_f64();
    let mut rows: Vec<(String, u64, Duration)> = Vec::new();
    let this = Path::new(env!("CARGO_BIN_EXE_rolecheck"));
    if let Some(admin_url) = admin_url {
        // With `BENCH_COMPARE_BIN`, that build's import first, into a fresh store of its own.
        if let Some(other) = std::env::var_os("BENCH_COMPARE_BIN") {
            let other = Path::new(&other);
            let url = fresh_database(admin_url, "rolecheck_bench_import").await;
            let data = dir.path().join("pg-before");
            let env = [("ROLECHECK_DATABASE_URL", url.clone())];
            let server = spawn(rolecheck_from(other, &data, &env));
            let took = import(other, &server.grpc, &file);
            rows.push((
                "`rolecheck import`, Postgres, before (BENCH_COMPARE_BIN)".into(),
                memberships,
                took,
            ));
        }
        let url = fresh_database(admin_url, "rolecheck_bench_import").await;
        let data = dir.path().join("pg");
        let server = spawn(rolecheck(&data, &[("ROLECHECK_DATABASE_URL", url.clone())]));
        rows.push((
            "`rolecheck import`, Postgres".into(),
            memberships,
            import(this, &server.grpc, &file),
        ));
        let (n, took) = set_roles(&server.grpc).await;
        rows.push(("SetRoles per user and tenant, Postgres (the path before)".into(), n, took));
        drop(server);
        let took = copy_floor(&url, users).await;
        rows.push((
            "Postgres `COPY` into a copy of the table (the floor)".into(),
            memberships,
            took,
        ));
    }
    let data = dir.path().join("embedded");
    let server = spawn(rolecheck(&data, &[]));
    rows.push((
        "`rolecheck import`, embedded store".into(),
        memberships,
        import(this, &server.grpc, &file),
    ));
    let (n, took) = set_roles(&server.grpc).await;
    rows.push(("SetRoles per user and tenant, embedded store (the path before)".into(), n, took));
    println!(
        "\n### Bulk import: {} memberships ({} users, 2 roles in each of 2 of 100 tenants)\n",
        thousands(memberships as f64),
        thousands(users as f64)
    );
    println!("| path | memberships | seconds | memberships/s |");
    println!("| --- | --- | --- | --- |");
    for (path, n, took) in rows {
        println!(
            "| {path} | {} | {:.2} | {} |",
            thousands(n as f64),
            took.as_secs_f64(),
            thousands(rate(n, took))
        );
    }
}
