//! The first hour: every start-up mistake, run through the real binary, ends within 10 s
//! with a non-zero exit and a message that says what went wrong, where, and what to do;
//! never "internal error". `rolecheck doctor` reports the same checks one line each,
//! warnings included, without serving; `rolecheck migrate --create-database` gets an
//! empty Postgres going.

use std::{
    io::Read,
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection};

#[path = "support/pgbouncer.rs"]
mod pgbouncer;
#[path = "support/postgres.rs"]
mod postgres;

use pgbouncer::Bouncer;

use postgres::{Db, admin_url, database_url};

/// Longest any mistake may take to be reported.
const WITHIN: Duration = Duration::from_secs(10);

/// What a finished `rolecheck` run printed.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `rolecheck args` with `env` (on free loopback ports, an empty data directory
/// unless `env` names one) and waits at most [`WITHIN`]; a process still running then is
/// killed and the test fails.
fn run(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let dir = tempfile::tempdir().expect("dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("ROLECHECK_DATABASE_URL")
        .env("ROLECHECK_LISTEN", "127.0.0.1:0")
        .env("ROLECHECK_HTTP_LISTEN", "127.0.0.1:0")
        .env("ROLECHECK_DATA_DIR", dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let started = Instant::now();
    let mut child = command.spawn().expect("spawn rolecheck");
    let (mut out, mut err) = (child.stdout.take().expect("out"), child.stderr.take().expect("err"));
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "rolecheck {args:?} still running after {WITHIN:?}: {}",
                err.join().expect("err")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        code: status.code(),
        stdout: out.join().expect("out"),
        stderr: err.join().expect("err"),
        took: started.elapsed(),
    }
}

/// What `text` says went wrong: from its last `Error: …` line (or clap's `error: …`) on.
fn error_text(text: &str) -> &str {
    let start = text
        .rmatch_indices('\n')
        .map(|(i, _)| i + 1)
        .chain([0])
        .find(|&i| text[i..].starts_with("Error:") || text[i..].starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{text}"));
    text[start..].trim_end()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_str().expect("path").to_owned()
}

/// A fresh database migrated by `rolecheck migrate`, and its URL.
async fn migrated_database(tag: &str) -> (Db, String) {
    let db = Db::create(tag).await;
    let url = db.url();
    let ran = run(&["migrate"], &[("ROLECHECK_DATABASE_URL", &url)]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    (db, url)
}

/// A mistake: what it is, the arguments and environment that make it, and what the
/// message must say.
type Mistake<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);

/// A SHA-256 no secret anyone uses (it is not the hash of any example in the README or docs/).
const SOME_HASH: &str = "5d41402abc4b2a76b9719d911017c5925d41402abc4b2a76b9719d911017c592";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_start_up_mistake_says_what_where_and_the_fix() {
    let files = tempfile::tempdir().expect("dir");
    let dir = files.path();
    let missing = Db::named("missing");
    let missing_url = database_url(&missing.0);
    let (_newer, newer_url) = migrated_database("newer").await;
    let mut conn = PgConnection::connect(&newer_url).await.expect("connect");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999, 'from the future', true, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .expect("a migration from a newer release");
    conn.close().await.expect("close");
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = held.local_addr().expect("addr").to_string();
    let bad_keys = write(
        dir,
        "keys.toml",
        &format!(
            "[[key]]\nname = \"ok\"\nsha256 = \"{SOME_HASH}\"\nscopes = [\"check\"]\n\n\
             [[key]]\nname = \"short\"\nsha256 = \"abc\"\nscopes = [\"check\"]\n"
        ),
    );
    let broken_policy = write(
        dir,
        "policy.toml",
        "[proxy]\nkind = \"nginx\"\n[[route]]\npath = \"/a/../b\"\npublic = true\n",
    );
    let nowhere = dir.join("nowhere.toml");
    let nowhere = nowhere.to_str().expect("path");
    let unknown_user = {
        let admin = admin_url();
        let rest = admin.split_once("://").expect("scheme").1;
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("postgres://nobody_{}@{host}", std::process::id())
    };

    // Something else listening where Postgres was meant to be: it answers like HTTP.
    let web = TcpListener::bind("127.0.0.1:0").expect("bind");
    let web_url = format!("postgres://postgres@{}/postgres", web.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in web.incoming() {
            use std::io::Write;
            let Ok(mut stream) = stream else { return };
            // As a web server would: read the request (here, Postgres's startup message),
            // answer, and close after the client does (closing with unread bytes would
            // reset the connection instead).
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        }
    });
    let strict_pooler = Bouncer::start(&admin_url(), "");
    let strict_url = strict_pooler.url("postgres", "right-password");
    let pooler = Bouncer::start(&admin_url(), "extra_float_digits, options");
    let wrong_password = pooler.url("postgres", "wrong-password");
    let cases: Vec<Mistake> = vec![
        (
            "a pooler that refuses a startup parameter",
            vec!["serve"],
            vec![("ROLECHECK_DATABASE_URL", &strict_url)],
            vec![
                "refused a connection parameter",
                "PgBouncer",
                "--database-pool-mode transaction",
                "ignore_startup_parameters",
            ],
        ),
        (
            "transaction pooling without a way to listen",
            vec!["serve", "--database-pool-mode", "transaction"],
            vec![("ROLECHECK_DATABASE_URL", &strict_url)],
            vec!["--listen-database-url", "LISTEN"],
        ),
        (
            "a listen URL for the embedded store",
            vec!["serve", "--listen-database-url", "postgres://postgres@127.0.0.1:5432/x"],
            vec![],
            vec!["--listen-database-url", "--database-url"],
        ),
        (
            "a wrong password",
            vec!["serve"],
            vec![("ROLECHECK_DATABASE_URL", &wrong_password)],
            vec![
                "refused user \"postgres\"",
                "password authentication failed",
                "password in --database-url",
            ],
        ),
        (
            "a database that does not exist",
            vec!["serve"],
            vec![("ROLECHECK_DATABASE_URL", &missing_url)],
            vec!["has no database", &missing.0, "--create-database", "createdb"],
        ),
        (
            "a user Postgres does not know",
            vec!["serve"],
            vec![("ROLECHECK_DATABASE_URL", &unknown_user)],
            vec!["refused user", "nobody_", "check the user and password"],
        ),
        (
            "nothing listening at the database's port",
            vec!["serve"],
            vec![
                ("ROLECHECK_DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres"),
                ("ROLECHECK_DB_STARTUP_WAIT", "1s"),
            ],
            vec!["connection refused at 127.0.0.1:1", "is Postgres running", "--db-startup-wait"],
        ),
        (
            "a port where something else listens",
            vec!["serve"],
            vec![("ROLECHECK_DATABASE_URL", &web_url), ("ROLECHECK_DB_STARTUP_WAIT", "1s")],
            vec!["does not speak the Postgres protocol", "is that Postgres's port?"],
        ),
        (
            "a schema a newer release migrated",
            vec!["serve"],
            vec![("ROLECHECK_DATABASE_URL", &newer_url)],
            vec!["migration 99999", "newer rolecheck", "upgrade"],
        ),
        (
            "the gRPC port in use",
            vec!["serve"],
            vec![("ROLECHECK_LISTEN", &taken)],
            vec!["cannot listen on", &taken, "another process", "--listen"],
        ),
        (
            "the HTTP port in use",
            vec!["serve"],
            vec![("ROLECHECK_HTTP_LISTEN", &taken)],
            vec!["cannot listen on", &taken, "--http-listen"],
        ),
        (
            "a keys file that is not there",
            vec!["serve"],
            vec![("ROLECHECK_API_KEYS_FILE", nowhere)],
            vec!["cannot read the API keys file", nowhere, "--api-keys-file"],
        ),
        (
            "a keys file with a bad hash",
            vec!["serve"],
            vec![("ROLECHECK_API_KEYS_FILE", &bad_keys)],
            vec![&bad_keys, "line 6", "\"short\"", "64 hex digits"],
        ),
        (
            "a policy file that is not there",
            vec!["serve"],
            vec![("ROLECHECK_AUTHZ_POLICY", nowhere)],
            vec!["cannot read the policy", nowhere, "--authz-policy"],
        ),
        (
            "a policy with an ambiguous route",
            vec!["serve"],
            vec![("ROLECHECK_AUTHZ_POLICY", &broken_policy)],
            vec![&broken_policy, "line 3"],
        ),
        (
            "a TLS key without a certificate",
            vec!["serve", "--tls-key", "key.pem"],
            vec![],
            vec!["--tls-cert"],
        ),
        (
            "a follower given a database",
            vec!["serve"],
            vec![
                ("ROLECHECK_UPSTREAM", "http://127.0.0.1:1"),
                ("ROLECHECK_DATABASE_URL", &missing_url),
            ],
            vec!["follower", "drop --database-url"],
        ),
        (
            "a query timeout no shorter than the request timeout",
            vec!["serve"],
            vec![("ROLECHECK_DB_QUERY_TIMEOUT", "30s"), ("ROLECHECK_REQUEST_TIMEOUT", "30s")],
            vec!["--db-query-timeout", "--request-timeout", "shorter"],
        ),
        (
            "no keys on an address other machines reach",
            vec!["serve"],
            vec![("ROLECHECK_LISTEN", "0.0.0.0:0")],
            vec!["without API keys", "--api-keys-file"],
        ),
        (
            "a pid file in a directory that is not there",
            vec!["serve"],
            vec![("ROLECHECK_PID_FILE", "/nonexistent-dir/rolecheck.pid")],
            vec!["--pid-file", "/nonexistent-dir/rolecheck.pid"],
        ),
    ];
    for (what, args, env, says) in cases {
        let ran = run(&args, &env);
        assert_ne!(ran.code, Some(0), "{what}: started anyway:\n{}", ran.stderr);
        assert!(ran.code.is_some(), "{what}: killed by a signal:\n{}", ran.stderr);
        let line = error_text(&ran.stderr);
        for needle in says {
            assert!(line.contains(needle), "{what}: {needle:?} not in {line:?}");
        }
        assert!(!ran.stderr.contains("internal error"), "{what}: {}", ran.stderr);
        eprintln!("{what} ({:.1?}): {line}", ran.took);
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_database_on_an_empty_postgres() {
    let name = Db::named("create");
    let url = database_url(&name.0);
    let ran = run(&["migrate", "--create-database"], &[("ROLECHECK_DATABASE_URL", &url)]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let doctor = run(&["doctor"], &[("ROLECHECK_DATABASE_URL", &url)]);
    assert_eq!(doctor.code, Some(0), "{}{}", doctor.stdout, doctor.stderr);
    assert!(
        doctor.stdout.contains(&format!("/{}, schema at migration", name.0)),
        "{}",
        doctor.stdout
    );
    // Again: the database is there, nothing to create, still fine.
    let again = run(&["migrate", "--create-database"], &[("ROLECHECK_DATABASE_URL", &url)]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
}

#[test]
fn migrate_help_lists_only_what_migrate_uses() {
    let ran = run(&["migrate", "--help"], &[]);
    assert_eq!(ran.code, Some(0));
    let flags = ["--database-url", "--listen-database-url", "--create-database", "--data-dir"];
    for flag in flags {
        assert!(ran.stdout.contains(flag), "{flag} missing:\n{}", ran.stdout);
    }
    for flag in ["--listen <", "--api-keys-file", "--authz-policy", "--cache-ttl"] {
        assert!(!ran.stdout.contains(flag), "{flag} listed:\n{}", ran.stdout);
    }
}

/// The lines of a doctor report whose check is `what`.
fn lines_of<'a>(report: &'a str, what: &str) -> Vec<&'a str> {
    report.lines().filter(|line| line.split_whitespace().nth(1) == Some(what)).collect()
}

#[test]
fn doctor_passes_a_good_configuration_and_warns_where_silence_misleads() {
    let files = tempfile::tempdir().expect("dir");
    let dir = files.path();
    let keys = write(
        dir,
        "keys.toml",
        &format!(
            "[[key]]\nname = \"app\"\nsha256 = \"{SOME_HASH}\"\nscopes = [\"check\"]\n\n\
             [[key]]\nname = \"idle\"\nsha256 = \"{SOME_HASH}\"\nscopes = []\n\n\
             [[certificate]]\ncn = \"billing\"\nscopes = [\"check\"]\n"
        ),
    );
    let policy = write(
        dir,
        "policy.toml",
        "[proxy]\nkind = \"nginx\"\n\n[[route]]\npath = \"/**\"\npublic = true\n\n\
         [[route]]\npath = \"/admin\"\npublic = true\n",
    );
    let empty = write(dir, "empty.toml", "");
    let ran = run(
        &["doctor"],
        &[("ROLECHECK_API_KEYS_FILE", &keys), ("ROLECHECK_AUTHZ_POLICY", &policy)],
    );
    assert_eq!(ran.code, Some(0), "{}{}", ran.stdout, ran.stderr);
    let report = ran.stdout;
    for what in ["flags", "grpc", "http", "store", "signing"] {
        let lines = lines_of(&report, what);
        assert!(
            !lines.is_empty() && lines.iter().all(|l| l.starts_with("ok")),
            "{what}:\n{report}"
        );
    }
    let keys_lines = lines_of(&report, "api");
    assert!(
        keys_lines.iter().any(|l| l.starts_with("ok") && l.contains("2 keys, 1 certificates")),
        "{report}"
    );
    assert!(
        keys_lines.iter().any(|l| l.starts_with("warn") && l.contains("\"idle\" has no scopes")),
        "{report}"
    );
    assert!(
        keys_lines
            .iter()
            .any(|l| l.starts_with("warn") && l.contains("--tls-client-ca is not set")),
        "{report}"
    );
    let policy_lines = lines_of(&report, "authz");
    assert!(
        policy_lines.iter().any(|l| l.starts_with("warn")
            && l.contains("line 8: this route can never match")
            && l.contains("line 4")),
        "{report}"
    );
    // The store is only looked at: doctor makes no data directory.
    assert!(lines_of(&report, "store")[0].contains("created at first start"), "{report}");

    let ran = run(&["doctor"], &[("ROLECHECK_AUTHZ_POLICY", &empty)]);
    assert_eq!(ran.code, Some(0), "{}{}", ran.stdout, ran.stderr);
    assert!(
        lines_of(&ran.stdout, "authz")
            .iter()
            .any(|l| l.starts_with("warn") && l.contains("no [[route]]: every request is denied")),
        "{}",
        ran.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_what_serve_would_refuse_and_says_the_fix() {
    let missing = Db::named("doctor");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let ran = run(
        &["doctor"],
        &[("ROLECHECK_DATABASE_URL", &database_url(&missing.0)), ("ROLECHECK_LISTEN", &taken_addr)],
    );
    assert_eq!(ran.code, Some(1), "{}{}", ran.stdout, ran.stderr);
    let store = lines_of(&ran.stdout, "store");
    assert!(
        store[0].starts_with("FAIL") && store[0].contains("--create-database"),
        "{}",
        ran.stdout
    );
    let grpc = lines_of(&ran.stdout, "grpc");
    assert!(grpc[0].starts_with("FAIL") && grpc[0].contains("another process"), "{}", ran.stdout);
    assert!(lines_of(&ran.stdout, "http")[0].starts_with("ok"), "{}", ran.stdout);
    drop(taken);
}

/// `rolecheck model check FILE` prints each problem of a model file as `FILE:LINE: place:
/// message` and exits 1; a good file gets a one-line summary and exit 0.
#[test]
fn model_check_names_each_problem_with_its_place_in_the_file() {
    let files = tempfile::tempdir().expect("dir");
    let bad = files.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[roles.viewer]\n[roles.editor]\nincludes = [\"viewer\", \"ghost\"]\n\n[permissions]\n\"invoice pay\" = [\"editor\"]\n",
    )
    .expect("write");
    let ran = run(&["model", "check", bad.to_str().expect("path")], &[]);
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    let name = bad.display();
    assert!(
        ran.stderr.contains(&format!(
            "{name}:6: permissions.\"invoice pay\": permission: must be 1-64 characters"
        )),
        "{}",
        ran.stderr
    );
    let bad_ref = "[roles.viewer]\n[roles.editor]\nincludes = [\"viewer\", \"ghost\"]\n";
    std::fs::write(&bad, bad_ref).expect("write");
    let ran = run(&["model", "check", bad.to_str().expect("path")], &[]);
    assert_eq!(ran.code, Some(1));
    assert_eq!(
        ran.stderr.trim(),
        format!(
            "{name}:2: roles.editor.includes: names the role \"ghost\", which the model does not declare"
        )
    );
    let good = files.path().join("good.toml");
    std::fs::write(&good, "strict = true\n[roles.viewer]\n[permissions]\n\"a.b\" = [\"viewer\"]\n")
        .expect("write");
    let ran = run(&["model", "check", good.to_str().expect("path")], &[]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert_eq!(
        ran.stdout.trim(),
        format!("{}: a model of 1 roles and 1 permissions, strict", good.display())
    );
}
