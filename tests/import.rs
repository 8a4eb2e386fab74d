//! `rolecheck import` and `rolecheck export` as an operator runs them: the real binary
//! against a real server on the embedded store, Postgres and PgBouncer, with the failures
//! an operator meets (bad lines, unknown tenants, `--strict`); and a round trip of 100,000
//! users from Postgres into the embedded store. Faults during an import:
//! `tests/import_faults.rs`.

// Each binary uses part of it.
#[allow(dead_code)]
#[path = "support/importing.rs"]
mod importing;
#[path = "support/pgbouncer.rs"]
mod pgbouncer;
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/spawned.rs"]
mod spawned;

use std::{path::Path, time::Instant};

use importing::*;
use rolecheck::pb;

fn the_import_and_export_commands_work_as_operators_use_them(server: &str, dir: &Path) {
    bad_lines_are_skipped_whole_or_stop_a_strict_import(server, dir);
    replace_from_csv_then_export(server, dir);
    a_merge_keeps_what_users_held(server, dir);
}

/// JSON Lines with bad lines and an unknown tenant: `--strict` imports nothing; without
/// it, the good users go in and each bad line is reported by number.
fn bad_lines_are_skipped_whole_or_stop_a_strict_import(server: &str, dir: &Path) {
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
    // Line 7: one user with more memberships than one user may bring.
    let roles: Vec<String> = (0..1001).map(|n| format!("\"r{n}\"")).collect();
    let big = format!(
        "{{\"user_id\": \"big\", \"authorization\": {{\"acme\": {{\"roles\": [{}]}}}}}}\n",
        roles.join(",")
    );
    let mut text = std::fs::read_to_string(&file).expect("read");
    text.push_str(&big);
    std::fs::write(&file, text).expect("write");
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
            &serde_json::json!(7),
            &serde_json::json!(2),
            &serde_json::json!(4),
            &serde_json::json!(5)
        ),
        "{summary}"
    );
    assert_eq!(summary["batches"], 1, "one batch, one revision: {summary}");
    let unknown = "line 5: user 3: tenant nope not found (--create-tenants creates it)";
    assert!(stderr.contains(unknown), "{stderr}");
    let big = "line 7: user big: more than 1000 memberships; skipped";
    assert!(stderr.contains(big), "{stderr}");
    assert_eq!(ok(server, &["roles", "1"]), "acme\tadmin,viewer\napp\tsupport\n");
    assert_eq!(ok(server, &["roles", "2"]), "acme\tviewer\n", "Userfront's userId");
    assert_eq!(ok(server, &["roles", "3"]), "", "user 3 skipped whole");

    let (code, _, stderr) = run("http://127.0.0.1:1", &["import", path]);
    assert_eq!(code, 24, "UNAVAILABLE: {stderr}");
    assert!(stderr.contains("is it running? (--server)"), "{stderr}");
}

/// CSV with `--replace` and `--create-tenants`, then the state exported in both formats.
fn replace_from_csv_then_export(server: &str, dir: &Path) {
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

    // A file that is not there is a usage error.
    assert_eq!(run(server, &["import", "/nonexistent.jsonl"]).0, 2);
}

/// Without `--replace`, the file's roles are added to what a user held (an expiry the
/// file gives replaces the one held), and the history row says the roles after.
fn a_merge_keeps_what_users_held(server: &str, dir: &Path) {
    let file = dir.join("more.jsonl");
    std::fs::write(
        &file,
        concat!(
            "{\"user_id\": \"1\", \"authorization\": {\"acme\": {\"roles\": [\"editor\"]}}}\n",
            "{\"user_id\": \"2\", \"authorization\": {\"acme\": {\"roles\": [\"editor\", \"viewer\"], \"expires_at\": \"2098-01-01T00:00:00Z\"}}}\n",
        ),
    )
    .expect("write");
    let (code, stdout, stderr) = run(server, &["import", file.to_str().expect("path")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\t2\t3\t"), "2 users, 3 memberships: {stdout}");
    assert_eq!(ok(server, &["roles", "1"]), "acme\teditor,viewer\napp\tsupport\n");
    let exported = ok(server, &["export"]);
    let user_2 = "{\"user_id\":\"2\",\"authorization\":{\"acme\":{\"expires_at\":\"2098-01-01T00:00:00Z\",\"roles\":[\"editor\",\"viewer\"]}}}\n";
    assert!(exported.contains(user_2), "the file's expiry replaced the one held: {exported}");
    let history = ok(server, &["changes", "--user", "1", "--tenant", "acme"]);
    let last = history.lines().last().expect("a change");
    assert!(last.contains("\tacme\t1\teditor,viewer\t"), "{history}");
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
    the_commands_on_postgres("import", false).await;
}

/// Through a real PgBouncer in transaction mode: the COPYs and the export's
/// snapshot all live inside one transaction each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_export_through_pgbouncer() {
    the_commands_on_postgres("import_bouncer", true).await;
}

/// The operator's commands against a server on a fresh Postgres database, reached
/// directly or through a real PgBouncer in transaction mode.
async fn the_commands_on_postgres(tag: &str, through_pgbouncer: bool) {
    let db = postgres::Db::create(tag).await;
    let dir = tempfile::tempdir().expect("dir");
    let direct = db.url();
    tokio::task::spawn_blocking(move || {
        let bouncer =
            through_pgbouncer.then(|| pgbouncer::Bouncer::start(&postgres::admin_url(), ""));
        let name = direct.rsplit('/').next().expect("name");
        let (url, extra) = match &bouncer {
            Some(bouncer) => (
                bouncer.url(name, pgbouncer::PASSWORD),
                vec!["--database-pool-mode", "transaction", "--listen-database-url", &direct],
            ),
            None => (direct.clone(), Vec::new()),
        };
        let server = serve(&dir.path().join("data"), Some(&url), &extra);
        let grpc = format!("http://{}", server.grpc);
        the_import_and_export_commands_work_as_operators_use_them(&grpc, dir.path());
    })
    .await
    .expect("the commands");
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

/// `Import` as a program calls it, strict: a bad user after the first batch stops the
/// import there. The batch before it stays applied, the answer says so, and nothing
/// after it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_import_stops_at_its_first_bad_user_after_what_came_before() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let server = tokio::task::spawn_blocking(move || serve(&data, None, &[])).await.expect("serve");
    let grpc = format!("http://{}", server.grpc);
    let user = |n: u64, role: &str| wire_user(format!("u{n:05}"), n + 1, "acme", &[role, "viewer"]);
    // 3,000 users of 2 roles: one batch (5,000 memberships) and 1,000 users gathered.
    let mut users: Vec<_> = (0..3000).map(|n| user(n, "admin")).collect();
    users.push(user(3000, "not a role"));
    users.push(user(3001, "admin"));
    let options = pb::ImportOptions { strict: true, create_tenants: true, ..Default::default() };
    let status = import_call(&mut client(&grpc).await, options, users)
        .await
        .expect_err("a strict import with a bad user");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(message.contains("line 3001: user \"u03000\": role"), "{message}");
    assert!(message.contains("1 batches before it were applied (2500 users"), "{message}");
    let exported = export_of(&grpc);
    assert_eq!(exported.lines().count(), 2500, "the first batch, and nothing after it");
    assert!(exported.contains("\"u02499\""), "the first batch's last user");
    assert!(!exported.contains("\"u02500\""), "the first user after it");
}
