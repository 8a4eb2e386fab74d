//! The admin command line as scripts run it: the real binary against a real server, on
//! the embedded store and on Postgres, output piped (tab-separated rows, or JSON) and
//! exit codes checked: 0 done or allowed, 1 denied, 2 usage, 10 + the gRPC status code
//! for a call the server refused.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

#[path = "support/postgres.rs"]
mod postgres;
// Shared with the load bench, which also reads the server's pid.
#[allow(dead_code)]
#[path = "support/spawned.rs"]
mod spawned;

/// `rolecheck ARGS…` against `server`: exit code, stdout, stderr.
fn run(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rolecheck"))
        .args(args)
        .env("ROLECHECK_SERVER", server)
        .env_remove("ROLECHECK_KEY_FILE")
        .output()
        .expect("run rolecheck");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
    (out.status.code().expect("an exit code"), text(out.stdout), text(out.stderr))
}

/// The first column of each output line after the command's.
fn ok(server: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = run(server, args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    stdout
}

fn serve(data: &std::path::Path, database_url: Option<&str>) -> spawned::Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "info")
        .env_remove("ROLECHECK_DATABASE_URL");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    spawned::spawn(command)
}

fn the_admin_commands_work_as_scripts_use_them(server: &str, embedded: bool) {
    // Tenants.
    assert_eq!(
        ok(server, &["tenants", "create", "acme", "--name", "Acme Inc"]),
        "acme\tAcme Inc\n"
    );
    let (code, _, stderr) = run(server, &["tenants", "create", "acme"]);
    assert_eq!(code, 16, "ALREADY_EXISTS: {stderr}");
    let (code, _, stderr) = run(server, &["tenants", "get", "nope"]);
    assert_eq!(code, 15, "NOT_FOUND: {stderr}");
    assert!(stderr.starts_with("Error: ") && stderr.contains("not found"), "{stderr}");
    assert!(ok(server, &["tenants", "list"]).lines().any(|l| l == "acme\tAcme Inc"));

    // Writes print what they did and the revision.
    let granted = ok(server, &["grant", "alice", "admin", "viewer", "--tenant", "acme"]);
    assert!(granted.starts_with("granted\t"), "{granted}");
    ok(server, &["grant", "alice", "support", "--expires-at", "2099-01-01T00:00:00Z"]);
    assert_eq!(run(server, &["grant", "bob", "x", "--tenant", "nope"]).0, 15);
    let (code, _, stderr) = run(server, &["grant", "alice", "not a role", "-t", "acme"]);
    assert_eq!(code, 13, "INVALID_ARGUMENT: {stderr}");
    assert!(stderr.contains("roles"), "the field is named: {stderr}");
    let (code, _, stderr) = run(server, &["grant", "alice", "admin", "--expires-at", "soon"]);
    assert_eq!(code, 2, "a bad flag value is a usage error: {stderr}");
    assert!(stderr.contains("RFC 3339"), "{stderr}");
    assert_eq!(run(server, &["grant", "alice"]).0, 2, "no role: clap's usage error");

    // Check: 0 allowed, 1 denied.
    let (code, stdout, _) = run(server, &["check", "alice", "admin", "-t", "acme"]);
    assert_eq!((code, stdout.split('\t').next()), (0, Some("allowed")));
    let (code, stdout, _) = run(server, &["check", "alice", "billing", "-t", "acme"]);
    assert_eq!((code, stdout.split('\t').next()), (1, Some("denied")));
    let (code, stdout, _) = run(server, &["check", "alice", "support", "--output", "json"]);
    let answer: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!((code, &answer["allowed"]), (0, &serde_json::json!(true)), "{stdout}");

    // Reads.
    assert_eq!(ok(server, &["roles", "alice"]), "acme\tadmin,viewer\napp\tsupport\n");
    let roles: serde_json::Value =
        serde_json::from_str(&ok(server, &["roles", "alice", "--output", "json"])).expect("JSON");
    assert_eq!(roles["authorization"]["acme"]["roles"], serde_json::json!(["admin", "viewer"]));
    assert_eq!(ok(server, &["members", "acme"]), "alice\tadmin,viewer\n");
    ok(server, &["set", "alice", "viewer", "-t", "acme"]);
    assert_eq!(ok(server, &["members", "acme"]), "alice\tviewer\n");
    ok(server, &["revoke", "alice", "-t", "acme"]);
    assert_eq!(ok(server, &["members", "acme"]), "");

    // Tokens: minted by the embedded store's generated key; on Postgres, no key.
    let (code, stdout, stderr) = run(server, &["token", "issue", "alice", "--ttl", "5m"]);
    if embedded {
        assert_eq!((code, stdout.trim().split('.').count()), (0, 3), "a JWT: {stderr}");
    } else {
        assert_eq!(code, 19, "FAILED_PRECONDITION without a signing key: {stderr}");
    }

    // The audit trail: every write above, in order.
    let kinds: Vec<String> = ok(server, &["changes", "--tenant", "acme"])
        .lines()
        .map(|l| l.split('\t').nth(1).expect("a kind").to_owned())
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("TENANT_CREATED"), "{kinds:?}");
    assert_eq!(kinds.len(), 4, "created, granted, set, revoked: {kinds:?}");

    // Followed changes arrive as they commit.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_rolecheck"))
        .args(["changes", "--follow", "--output", "json"])
        .env("ROLECHECK_SERVER", server)
        .stdout(Stdio::piped())
        .spawn()
        .expect("changes --follow");
    let (tx, lines) = mpsc::channel();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut followed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    ok(server, &["grant", "carol", "viewer", "-t", "acme"]);
    while !followed.iter().any(|l: &String| l.contains("\"carol\"")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        followed.push(lines.recv_timeout(left).expect("the grant, followed"));
    }
    let _ = follow.kill();
    let _ = follow.wait();

    assert!(ok(server, &["tenants", "delete", "acme"]).starts_with("deleted\t"));
    assert_eq!(run(server, &["tenants", "get", "acme"]).0, 15);
}

#[test]
fn completions_cover_every_command() {
    let script = ok("http://127.0.0.1:1", &["completions", "bash"]);
    let commands = [
        "tenants", "grant", "revoke", "check", "members", "token", "changes", "model", "import",
        "export",
    ];
    for command in commands {
        assert!(script.contains(command), "bash completion lacks {command}");
    }
    assert_eq!(run("http://127.0.0.1:1", &["completions", "tcsh"]).0, 2, "an unknown shell");
}

#[test]
fn the_admin_commands_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(&dir.path().join("data"), None);
    the_admin_commands_work_as_scripts_use_them(&format!("http://{}", server.grpc), true);
    let (code, _, stderr) = run("http://127.0.0.1:1", &["check", "alice", "admin"]);
    assert_eq!(code, 24, "UNAVAILABLE: {stderr}");
    assert!(stderr.contains("is it running? (--server)"), "the fix is named: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_commands_on_postgres() {
    let db = postgres::Db::create("cli").await;
    let dir = tempfile::tempdir().expect("dir");
    let url = db.url();
    tokio::task::spawn_blocking(move || {
        let server = serve(&dir.path().join("data"), Some(&url));
        the_admin_commands_work_as_scripts_use_them(&format!("http://{}", server.grpc), false);
    })
    .await
    .expect("the commands");
}
