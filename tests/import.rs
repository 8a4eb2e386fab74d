//! `rolecheck import` and `rolecheck export` as an operator runs them: the real binary
//! against a real server on both stores, with the failures an operator meets (bad lines,
//! unknown tenants, `--strict`), an import interrupted by killing the client, the server
//! or Postgres and run again, readers during an import, and a round trip of 100,000
//! users from Postgres into the embedded store.
//!
//! The files here are written as `export` writes them (users in id order, tenants and
//! roles sorted), so once a file is imported into an empty store, `export` prints it back
//! byte for byte: the state one uninterrupted import ends in.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use rolecheck::pb::{self, role_check_client::RoleCheckClient};

#[path = "support/pgbouncer.rs"]
mod pgbouncer;
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/spawned.rs"]
mod spawned;
#[allow(dead_code)]
#[path = "support/standby.rs"]
mod standby;

fn rolecheck(server: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    command.args(args).env("ROLECHECK_SERVER", server).env_remove("ROLECHECK_KEY_FILE");
    command
}

/// `rolecheck ARGS…` against `server`: exit code, stdout, stderr.
fn run(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = rolecheck(server, args).output().expect("run rolecheck");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
    (out.status.code().expect("an exit code"), text(out.stdout), text(out.stderr))
}

fn ok(server: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = run(server, args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    stdout
}

fn serve(data: &Path, database_url: Option<&str>, extra: &[&str]) -> spawned::Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("ROLECHECK_DATABASE_URL");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    spawned::spawn(command)
}

/// A file of `users` users as `export` writes it: user `u…` holds `variant`'s roles in
/// two of 20 tenants, and every third one a role with an expiry in a third tenant.
fn users_file(users: usize, variant: &str) -> String {
    let mut text = String::new();
    for n in 0..users {
        let (a, b) = (n % 20, (n * 7 + 3) % 20);
        let (a, b) = if a == b { (a, (b + 1) % 20) } else { (a.min(b), a.max(b)) };
        let mut tenants = vec![
            format!("\"t{a:02}\":{{\"roles\":[\"{variant}-1\",\"{variant}-2\"]}}"),
            format!("\"t{b:02}\":{{\"roles\":[\"{variant}-3\"]}}"),
        ];
        if n % 3 == 0 {
            let c = (b + 1) % 20;
            let c = if c == a { (c + 1) % 20 } else { c };
            tenants.push(format!(
                "\"t{c:02}\":{{\"expires_at\":\"2099-01-01T00:00:00Z\",\"roles\":[\"{variant}-x\"]}}"
            ));
        }
        tenants.sort();
        let _ = writeln!(
            text,
            "{{\"user_id\":\"u{n:06}\",\"authorization\":{{{}}}}}",
            tenants.join(",")
        );
    }
    text
}

/// Each line's memberships: how many `users_file` holds in all.
fn memberships_in(file: &str) -> usize {
    file.matches("-1\"").count() * 3 + file.matches("-x\"").count()
}

async fn client(server: &str) -> RoleCheckClient<tonic::transport::Channel> {
    RoleCheckClient::connect(server.to_owned()).await.expect("connect")
}

/// The server's revision (what an answer about nobody reflects).
async fn revision(client: &mut RoleCheckClient<tonic::transport::Channel>) -> u64 {
    let request = pb::GetAuthorizationRequest { user_id: "nobody".into(), ..Default::default() };
    client.get_authorization(request).await.expect("answer").into_inner().revision
}

fn the_import_and_export_commands_work_as_operators_use_them(server: &str, dir: &Path) {
    ok(server, &["tenants", "create", "acme"]);
    let file = dir.join("users.jsonl");
    std::fs::write(
        &file,
        concat!(
            "{\"user_id\": \"1\", \"authorization\": {\"acme\": {\"roles\": [\"admin\", \"viewer\"]}, \"\": {\"roles\": [\"support\"]}}}\n",
            "{\"userId\": 2, \"email\": \"bob@example.com\", \"authorization\": {\"acme\": {\"roles\": [\"viewer\"], \"expires_at\": \"2099-01-01T00:00:00Z\"}}}\n",
            "not json\n",
            "{\"user_id\": \"has space\", \"authorization\": {\"acme\": {\"roles\": [\"viewer\"]}}}\n",
            "{\"user_id\": \"3\", \"authorization\": {\"nope\": {\"roles\": [\"viewer\"]}}}\n",
            "{\"user_id\": \"4\", \"authorization\": {\"acme\": {\"roles\": [\"not a role\"]}}}\n",
        ),
    )
    .expect("write");
    let path = file.to_str().expect("path");
    let before = ok(server, &["changes", "--output", "json"]);

    // --strict: a bad line, or a tenant that does not exist, and nothing is imported.
    let (code, _, stderr) = run(server, &["import", path, "--strict"]);
    assert_eq!(code, 13, "INVALID_ARGUMENT: {stderr}");
    for line in ["line 3: bad JSON", "line 4: user_id", "line 6: role"] {
        assert!(stderr.contains(line), "{line}: {stderr}");
    }
    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        "{\"user_id\": \"9\", \"authorization\": {\"nope\": {\"roles\": [\"x\"]}}}\n",
    )
    .expect("write");
    let (code, _, stderr) = run(server, &["import", good.to_str().expect("path"), "--strict"]);
    assert_eq!(code, 15, "NOT_FOUND: {stderr}");
    assert!(stderr.contains("line 1: user 9") && stderr.contains("--create-tenants"), "{stderr}");
    assert_eq!(ok(server, &["changes", "--output", "json"]), before, "nothing was written");

    // Without it: bad lines are reported with their number and skipped whole.
    let (code, stdout, stderr) = run(server, &["import", path, "--output", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(
        (&summary["lines"], &summary["users"], &summary["memberships"], &summary["rejected"]),
        (
            &serde_json::json!(6),
            &serde_json::json!(2),
            &serde_json::json!(4),
            &serde_json::json!(4)
        ),
        "{summary}"
    );
    assert_eq!(summary["batches"], 1, "one batch, one revision: {summary}");
    let unknown = "line 5: user 3: tenant nope not found (--create-tenants creates it)";
    assert!(stderr.contains(unknown), "{stderr}");
    assert_eq!(ok(server, &["roles", "1"]), "acme\tadmin,viewer\napp\tsupport\n");
    assert_eq!(ok(server, &["roles", "2"]), "acme\tviewer\n", "Userfront's userId");
    assert_eq!(ok(server, &["roles", "3"]), "", "user 3 skipped whole");

    // CSV, with --replace and --create-tenants: the listed users' roles in the listed
    // tenants become exactly the file's.
    let csv = dir.join("users.csv");
    std::fs::write(
        &csv,
        "user_id,tenant_id,role,expires_at\n1,acme,viewer\n\"we,ird\",newco,owner\n2,acme,editor,2099-01-01T00:00:00Z\nonly-two,fields\n",
    )
    .expect("write");
    let csv = csv.to_str().expect("path");
    let (code, stdout, stderr) =
        run(server, &["import", csv, "--replace", "--create-tenants", "--output", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["tenants_created"], serde_json::json!(["newco"]), "{summary}");
    assert!(stderr.contains("line 5: 2 fields"), "{stderr}");
    assert_eq!(
        ok(server, &["roles", "1"]),
        "acme\tviewer\napp\tsupport\n",
        "replaced in acme only"
    );
    assert_eq!(ok(server, &["members", "newco"]), "we,ird\towner\n");
    let revision = summary["revision"].as_u64().expect("a revision");

    // Export: one snapshot at the revision printed, in either format, which import reads.
    let (code, jsonl, stderr) = run(server, &["export"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("at revision {revision}")), "{stderr}");
    assert_eq!(
        jsonl,
        concat!(
            "{\"user_id\":\"1\",\"authorization\":{\"acme\":{\"roles\":[\"viewer\"]},\"app\":{\"roles\":[\"support\"]}}}\n",
            "{\"user_id\":\"2\",\"authorization\":{\"acme\":{\"expires_at\":\"2099-01-01T00:00:00Z\",\"roles\":[\"editor\"]}}}\n",
            "{\"user_id\":\"we,ird\",\"authorization\":{\"newco\":{\"roles\":[\"owner\"]}}}\n",
        )
    );
    let exported = dir.join("export.csv");
    ok(server, &["export", exported.to_str().expect("path")]);
    assert_eq!(
        std::fs::read_to_string(&exported).expect("read"),
        "1,acme,viewer,\n1,app,support,\n2,acme,editor,2099-01-01T00:00:00Z\n\"we,ird\",newco,owner,\n"
    );

    // A file that is not there, and a server that is not there, name their fix.
    assert_eq!(run(server, &["import", "/nonexistent.jsonl"]).0, 2);
    let (code, _, stderr) = run("http://127.0.0.1:1", &["import", path]);
    assert_eq!(code, 24, "UNAVAILABLE: {stderr}");
    assert!(stderr.contains("is it running? (--server)"), "{stderr}");
}

#[test]
fn import_and_export_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(&dir.path().join("data"), None, &[]);
    the_import_and_export_commands_work_as_operators_use_them(
        &format!("http://{}", server.grpc),
        dir.path(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_export_on_postgres() {
    let db = postgres::Db::create("import").await;
    let dir = tempfile::tempdir().expect("dir");
    let url = db.url();
    tokio::task::spawn_blocking(move || {
        let server = serve(&dir.path().join("data"), Some(&url), &[]);
        the_import_and_export_commands_work_as_operators_use_them(
            &format!("http://{}", server.grpc),
            dir.path(),
        );
    })
    .await
    .expect("the commands");
}

/// Through a real PgBouncer in transaction mode: the staging table, COPY and the export's
/// snapshot all live inside one transaction each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_export_through_pgbouncer() {
    let db = postgres::Db::create("import_bouncer").await;
    let dir = tempfile::tempdir().expect("dir");
    let direct = db.url();
    tokio::task::spawn_blocking(move || {
        let bouncer = pgbouncer::Bouncer::start(&postgres::admin_url(), "");
        let pooled = bouncer.url(direct.rsplit('/').next().expect("name"), pgbouncer::PASSWORD);
        let through = ["--database-pool-mode", "transaction", "--listen-database-url", &direct];
        let server = serve(&dir.path().join("data"), Some(&pooled), &through);
        the_import_and_export_commands_work_as_operators_use_them(
            &format!("http://{}", server.grpc),
            dir.path(),
        );
    })
    .await
    .expect("the commands");
}

/// Imports `file` into `server` and kills `victim` once a few batches are in; then checks
/// the store holds part of the file, not all of it. Returns the import's exit code.
async fn interrupted(
    server: &str,
    file: &Path,
    kill: impl FnOnce(&mut std::process::Child),
) -> Option<i32> {
    let mut watch = client(server).await;
    let start = revision(&mut watch).await;
    let mut import =
        rolecheck(server, &["import", file.to_str().expect("path"), "--create-tenants"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("import");
    // Each batch takes at least the server's fault delay: the import is still running
    // when its third batch has committed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while revision(&mut watch).await < start + 3 {
        assert!(Instant::now() < deadline, "the import never got going");
        assert!(import.try_wait().expect("wait").is_none(), "the import ended too soon");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill(&mut import);
    let status =
        tokio::task::spawn_blocking(move || import.wait().expect("wait")).await.expect("join");
    status.code()
}

fn export_of(server: &str) -> String {
    ok_once_available(server, &["export"])
}

/// [`ok`], once the server answers other than `UNAVAILABLE` (24): after Postgres
/// restarted, a pooled connection from before fails once, is dropped, and the call is
/// retried, as an operator would.
fn ok_once_available(server: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, stdout, stderr) = run(server, args);
        if code != 24 || Instant::now() > deadline {
            assert_eq!(code, 0, "{args:?}: {stderr}");
            return stdout;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The state an uninterrupted import ends in is the file itself (see the module docs).
fn assert_whole(server: &str, file: &str, after: &str) {
    let exported = export_of(server);
    assert!(
        exported == file,
        "after {after}: the store differs from the file ({} of {} bytes)",
        exported.len(),
        file.len()
    );
}

/// An import cut short (the client killed, the server killed, Postgres restarted) and run
/// again ends in the state of one uninterrupted run: batches are idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_import_run_again_ends_as_one_uninterrupted_run_on_postgres() {
    let mut pair = tokio::task::spawn_blocking(standby::Pair::start).await.expect("cluster");
    let dir = tempfile::tempdir().expect("dir");
    let text = users_file(40_000, "r");
    let file = dir.path().join("users.jsonl");
    std::fs::write(&file, &text).expect("write");
    // Each batch waits after its COMMIT: the import takes a few seconds, whatever the
    // machine, so each fault lands in the middle of it.
    let slow = ["--fault-delay-after-commit", "100ms", "--db-query-timeout", "2s"];
    for (n, fault) in
        ["the client killed", "the server killed", "Postgres restarted"].into_iter().enumerate()
    {
        let database = format!("import_{n}");
        let admin = pair.primary_url("postgres");
        let mut conn =
            <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await.expect("connect");
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {database}").as_str())
            .await
            .expect("create");
        let url = pair.primary_url(&database);
        let data = dir.path().join(&database);
        let mut server = serve(&data, Some(&url), &slow);
        let grpc = format!("http://{}", server.grpc);
        let code = match n {
            0 => interrupted(&grpc, &file, |import| import.kill().expect("kill")).await,
            1 => {
                let pid = server.pid;
                let code = interrupted(&grpc, &file, |_| {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                })
                .await;
                server = serve(&data, Some(&url), &slow);
                code
            }
            _ => interrupted(&grpc, &file, |_| pair.restart_primary()).await,
        };
        let grpc = format!("http://{}", server.grpc);
        assert_ne!(code, Some(0), "{fault}: the import did not finish");
        let partial = export_of(&grpc);
        assert!(
            partial.len() < text.len() && !partial.is_empty(),
            "{fault}: part of the file is in"
        );
        ok_once_available(&grpc, &["import", file.to_str().expect("path"), "--create-tenants"]);
        assert_whole(&grpc, &text, fault);
        drop(server);
    }
}

/// The same on the embedded store: the client killed, and the server killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_import_run_again_ends_as_one_uninterrupted_run_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("dir");
    let text = users_file(40_000, "r");
    let file = dir.path().join("users.jsonl");
    std::fs::write(&file, &text).expect("write");
    let slow = ["--fault-delay-after-commit", "100ms"];
    for (n, fault) in ["the client killed", "the server killed"].into_iter().enumerate() {
        let data = dir.path().join(format!("data{n}"));
        let mut server = serve(&data, None, &slow);
        let grpc = format!("http://{}", server.grpc);
        let code = match n {
            0 => interrupted(&grpc, &file, |import| import.kill().expect("kill")).await,
            _ => {
                let pid = server.pid;
                let code = interrupted(&grpc, &file, |_| {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                })
                .await;
                let _ = server.child.wait();
                server = serve(&data, None, &slow);
                code
            }
        };
        let grpc = format!("http://{}", server.grpc);
        assert_ne!(code, Some(0), "{fault}: the import did not finish");
        let partial = export_of(&grpc);
        assert!(
            partial.len() < text.len() && !partial.is_empty(),
            "{fault}: part of the file is in"
        );
        let (code, _, stderr) =
            run(&grpc, &["import", file.to_str().expect("path"), "--create-tenants"]);
        assert_eq!(code, 0, "{fault}: run again: {stderr}");
        assert_whole(&grpc, &text, fault);
    }
}

/// While `import --replace` moves every user from one set of roles to another, a reader
/// sees each user with exactly the old roles or exactly the new, never a mix.
async fn readers_never_see_a_user_half_imported(server: &str, dir: &Path) {
    let (old, new) = (users_file(20_000, "old"), users_file(20_000, "new"));
    let (old_file, new_file) = (dir.join("old.jsonl"), dir.join("new.jsonl"));
    std::fs::write(&old_file, &old).expect("write");
    std::fs::write(&new_file, &new).expect("write");
    ok(server, &["import", old_file.to_str().expect("path"), "--create-tenants"]);
    let expected = |text: &str, user: usize| -> Vec<(String, Vec<String>)> {
        let line = text.lines().nth(user).expect("line");
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let mut tenants: Vec<(String, Vec<String>)> = value["authorization"]
            .as_object()
            .expect("object")
            .iter()
            .map(|(tenant, held)| {
                let roles = held["roles"].as_array().expect("roles");
                (
                    tenant.clone(),
                    roles.iter().map(|r| r.as_str().expect("role").to_owned()).collect(),
                )
            })
            .collect();
        tenants.sort();
        tenants
    };
    let import = rolecheck(server, &["import", new_file.to_str().expect("path"), "--replace"])
        .stdout(Stdio::null())
        .spawn()
        .expect("import");
    let import = tokio::task::spawn_blocking(move || import.wait_with_output().expect("import"));
    let mut reader = client(server).await;
    let (mut read, mut seen_old, mut seen_new, mut n) = (0, 0, 0, 0usize);
    while !import.is_finished() {
        n = (n * 7919 + 1) % 20_000;
        let request =
            pb::GetAuthorizationRequest { user_id: format!("u{n:06}"), ..Default::default() };
        let answer = reader.get_authorization(request).await.expect("answer").into_inner();
        let mut got: Vec<(String, Vec<String>)> =
            answer.authorization.into_iter().map(|(tenant, roles)| (tenant, roles.roles)).collect();
        got.sort();
        read += 1;
        if got == expected(&old, n) {
            seen_old += 1;
        } else {
            assert_eq!(
                got,
                expected(&new, n),
                "u{n:06} at revision {}: neither old nor new",
                answer.revision
            );
            seen_new += 1;
        }
    }
    assert!(import.await.expect("join").status.success());
    assert_whole(server, &new, "the replacing import");
    eprintln!("{read} reads during the import: {seen_old} all old, {seen_new} all new, none mixed");
    assert!(
        seen_old > 0 && seen_new > 0,
        "the reads overlapped the import: {seen_old} old, {seen_new} new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_user_half_imported_on_postgres() {
    let db = postgres::Db::create("import_readers").await;
    let dir = tempfile::tempdir().expect("dir");
    let url = db.url();
    let data = dir.path().join("data");
    let server = tokio::task::spawn_blocking(move || {
        serve(&data, Some(&url), &["--fault-delay-after-commit", "20ms"])
    })
    .await
    .expect("serve");
    readers_never_see_a_user_half_imported(&format!("http://{}", server.grpc), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_user_half_imported_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let server = tokio::task::spawn_blocking(move || {
        serve(&data, None, &["--fault-delay-after-commit", "20ms"])
    })
    .await
    .expect("serve");
    readers_never_see_a_user_half_imported(&format!("http://{}", server.grpc), dir.path()).await;
}

/// `export | import --replace` into an empty server reproduces every user: 100,000 users
/// from Postgres into the embedded store. The two exports are equal byte for byte (every
/// user's live roles with their expiries), and `GetAuthorization` agrees for a sample of
/// 2,000 users spread over all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_reproduces_every_user() {
    let db = postgres::Db::create("import_round_trip").await;
    let dir = tempfile::tempdir().expect("dir");
    let text = users_file(100_000, "r");
    let file = dir.path().join("users.jsonl");
    std::fs::write(&file, &text).expect("write");
    let (url, data) = (db.url(), dir.path().to_owned());
    let (from, into) = tokio::task::spawn_blocking(move || {
        (serve(&data.join("pg"), Some(&url), &[]), serve(&data.join("embedded"), None, &[]))
    })
    .await
    .expect("serve");
    let (from, into) = (format!("http://{}", from.grpc), format!("http://{}", into.grpc));
    let started = Instant::now();
    ok(&from, &["import", file.to_str().expect("path"), "--create-tenants"]);
    eprintln!("{} memberships imported in {:?}", memberships_in(&text), started.elapsed());
    let exported = dir.path().join("exported.jsonl");
    ok(&from, &["export", exported.to_str().expect("path")]);
    let (code, _, stderr) =
        run(&into, &["import", exported.to_str().expect("path"), "--replace", "--create-tenants"]);
    assert_eq!(code, 0, "{stderr}");
    let (first, second) = (export_of(&from), export_of(&into));
    assert_eq!(first.lines().count(), 100_000);
    assert!(first == second && first == text, "the two stores hold the same memberships");
    let (mut a, mut b) = (client(&from).await, client(&into).await);
    for n in (0..100_000).step_by(50) {
        let ask = || pb::GetAuthorizationRequest {
            user_id: format!("u{n:06}"),
            with_expiry: true,
            ..Default::default()
        };
        let (x, y) = (
            a.get_authorization(ask()).await.expect("a"),
            b.get_authorization(ask()).await.expect("b"),
        );
        let (x, y) = (x.into_inner(), y.into_inner());
        assert!(!x.authorization.is_empty(), "u{n:06} holds roles");
        assert_eq!((x.authorization, x.held), (y.authorization, y.held), "u{n:06}");
    }
}
