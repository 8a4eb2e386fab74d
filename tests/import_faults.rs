//! An import interrupted (the client killed, the server killed, Postgres restarted) and
//! run again, readers during an import, on both stores; and an import seen by another
//! replica and by a follower.

// Each binary uses part of it.
#[allow(dead_code)]
#[path = "support/importing.rs"]
mod importing;
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/spawned.rs"]
mod spawned;
#[allow(dead_code)]
#[path = "support/standby.rs"]
mod standby;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use importing::*;
use rolecheck::pb;

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

/// After `fault` cut an import short (its exit `code`): part of `file` is in; run again,
/// the store holds the file, as one uninterrupted run leaves it.
fn run_again(server: &str, (file, text): (&Path, &str), fault: &str, code: Option<i32>) {
    assert_ne!(code, Some(0), "{fault}: the import did not finish");
    let partial = export_of(server);
    let part = partial.len() < text.len() && !partial.is_empty();
    assert!(part, "{fault}: part of the file is in");
    ok_once_available(server, &["import", file.to_str().expect("path"), "--create-tenants"]);
    assert_whole(server, text, fault);
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
        run_again(&format!("http://{}", server.grpc), (&file, &text), fault, code);
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
        run_again(&format!("http://{}", server.grpc), (&file, &text), fault, code);
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

/// An import through one replica reaches every cache: another replica of the same
/// Postgres (by its listener) and a follower of the first (by Watch) forget each imported
/// user, so after `import --replace`, every user they had cached answers its new roles
/// at the import's revision, on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_and_followers_forget_every_imported_user() {
    let db = postgres::Db::create("import_everywhere").await;
    let dir = tempfile::tempdir().expect("dir");
    let (url, data) = (db.url(), dir.path().to_owned());
    let (a, b, follower) = tokio::task::spawn_blocking(move || {
        let a = serve(&data.join("a"), Some(&url), &[]);
        let b = serve(&data.join("b"), Some(&url), &[]);
        let upstream = format!("http://{}", a.grpc);
        let follower = serve(&data.join("f"), None, &["--upstream", &upstream]);
        (a, b, follower)
    })
    .await
    .expect("servers");
    let grpc = |server: &spawned::Server| format!("http://{}", server.grpc);
    let (old, new) = (users_file(2_000, "old"), users_file(2_000, "new"));
    let (old_file, new_file) = (dir.path().join("old.jsonl"), dir.path().join("new.jsonl"));
    std::fs::write(&old_file, &old).expect("write");
    std::fs::write(&new_file, &new).expect("write");
    ok(&grpc(&a), &["import", old_file.to_str().expect("path"), "--create-tenants"]);
    let roles = |answer: pb::GetAuthorizationResponse| {
        let mut roles: Vec<(String, Vec<String>)> =
            answer.authorization.into_iter().map(|(t, r)| (t, r.roles)).collect();
        roles.sort();
        roles
    };
    let ask = |n: usize, min_revision: u64| pb::GetAuthorizationRequest {
        user_id: format!("u{n:06}"),
        min_revision,
        ..Default::default()
    };
    let (mut replica, mut followed) = (client(&grpc(&b)).await, client(&grpc(&follower)).await);
    let old_revision = revision(&mut client(&grpc(&a)).await).await;
    for n in 0..2_000 {
        // Cached on both, at the old roles.
        for caches in [&mut replica, &mut followed] {
            let answer = caches.get_authorization(ask(n, old_revision)).await.expect("answer");
            assert!(!answer.into_inner().authorization.is_empty(), "u{n:06} is in");
        }
    }
    let summary = ok(
        &grpc(&a),
        &["import", new_file.to_str().expect("path"), "--replace", "--output", "json"],
    );
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("JSON");
    let at = summary["revision"].as_u64().expect("revision");
    let mut expected = new.lines();
    for n in 0..2_000 {
        let line: serde_json::Value =
            serde_json::from_str(expected.next().expect("line")).expect("JSON");
        let mut want: Vec<(String, Vec<String>)> = line["authorization"]
            .as_object()
            .expect("object")
            .iter()
            .map(|(t, held)| {
                let roles = held["roles"].as_array().expect("roles").iter();
                (t.clone(), roles.map(|r| r.as_str().expect("role").to_owned()).collect())
            })
            .collect();
        want.sort();
        for (name, caches) in [("replica", &mut replica), ("follower", &mut followed)] {
            let answer = caches.get_authorization(ask(n, at)).await.expect("answer");
            assert_eq!(roles(answer.into_inner()), want, "u{n:06} on the {name}");
        }
    }
}

/// An export is one snapshot: taken again and again while `import --replace` moves the
/// users from old roles to new, a batch at a time, each export holds every user whole,
/// and exactly the users whose batch committed at or before the export's revision are new.
/// The import goes from the last user id down while an export reads up from the first,
/// so a page read after a batch committed, next to one read before, is one a batch later
/// than the export's revision.
async fn exports_are_snapshots_during_an_import(server: &str, dir: &Path) {
    let (old, new) = (users_file(20_000, "old"), users_file(20_000, "new"));
    let (old_file, new_file) = (dir.join("old.jsonl"), dir.join("new.jsonl"));
    std::fs::write(&old_file, &old).expect("write");
    let downward: Vec<&str> = new.lines().rev().collect();
    std::fs::write(&new_file, downward.join("\n") + "\n").expect("write");
    ok(server, &["import", old_file.to_str().expect("path"), "--create-tenants"]);
    let start = revision(&mut client(server).await).await;
    let import = rolecheck(server, &["import", new_file.to_str().expect("path"), "--replace"])
        .stdout(Stdio::null())
        .spawn()
        .expect("import");
    let import = tokio::task::spawn_blocking(move || import.wait_with_output().expect("import"));
    let mut exports = Vec::new();
    while !import.is_finished() {
        let (code, exported, stderr) = run(server, &["export"]);
        assert_eq!(code, 0, "{stderr}");
        let at = stderr.rsplit("at revision ").next().expect("a revision").trim();
        exports.push((at.parse::<u64>().expect("a revision"), exported));
    }
    assert!(import.await.expect("join").status.success());
    // The revision each user's batch committed at, from the audit trail.
    let committed = batch_revisions(server, start).await;
    let (old_lines, new_lines): (Vec<&str>, Vec<&str>) =
        (old.lines().collect(), new.lines().collect());
    let mut mixed = 0;
    for (at, exported) in &exports {
        let lines: Vec<&str> = exported.lines().collect();
        assert_eq!(lines.len(), 20_000, "every user, whole");
        let mut moved = 0;
        for (n, line) in lines.iter().enumerate() {
            let user = format!("u{n:06}");
            let batch = committed.get(&user).copied().expect("every user's batch");
            let want = if batch <= *at { new_lines[n] } else { old_lines[n] };
            assert_eq!(*line, want, "{user} in the export at revision {at} (its batch: {batch})");
            moved += usize::from(batch <= *at);
        }
        mixed += usize::from(moved > 0 && moved < 20_000);
    }
    eprintln!("{} exports during the import, {mixed} of them between two batches", exports.len());
    assert!(mixed > 0, "an export overlapped the import");
}

/// Each user's revision in the audit trail after `after` (the batch that changed it).
async fn batch_revisions(server: &str, after: u64) -> std::collections::HashMap<String, u64> {
    let mut audit = client(server).await;
    let (mut committed, mut page_token) = (std::collections::HashMap::new(), String::new());
    loop {
        let request = pb::ListChangesRequest {
            after_revision: after,
            page_size: 1000,
            page_token,
            ..Default::default()
        };
        let page = audit.list_changes(request).await.expect("changes").into_inner();
        for entry in page.entries {
            let change = entry.change.expect("a change");
            if !change.user_id.is_empty() {
                committed.insert(change.user_id, entry.revision);
            }
        }
        if page.next_page_token.is_empty() {
            return committed;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_snapshots_on_postgres() {
    let db = postgres::Db::create("export_snapshot").await;
    let dir = tempfile::tempdir().expect("dir");
    let (url, data) = (db.url(), dir.path().join("data"));
    let slow = ["--fault-delay-after-commit", "50ms"];
    let server =
        tokio::task::spawn_blocking(move || serve(&data, Some(&url), &slow)).await.expect("serve");
    exports_are_snapshots_during_an_import(&format!("http://{}", server.grpc), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_snapshots_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let slow = ["--fault-delay-after-commit", "50ms"];
    let server =
        tokio::task::spawn_blocking(move || serve(&data, None, &slow)).await.expect("serve");
    exports_are_snapshots_during_an_import(&format!("http://{}", server.grpc), dir.path()).await;
}

/// No membership outlives its tenant, with no foreign key to say so (migration 0012): two
/// servers on one Postgres, one creating and deleting a tenant over and over while the
/// other imports into it (creating it, or not) and grants in it. Each write takes the
/// revision row before it looks for its tenant, so each sees the tenant live and writes,
/// or gone and writes nothing; after 150 rounds no membership names a tenant that is not
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_membership_outlives_its_tenant_on_postgres() {
    use pb::tenants_client::TenantsClient;

    let db = postgres::Db::create("import_orphans").await;
    let dir = tempfile::tempdir().expect("dir");
    let (url, data) = (db.url(), dir.path().to_owned());
    let (a, b) = tokio::task::spawn_blocking(move || {
        (serve(&data.join("a"), Some(&url), &[]), serve(&data.join("b"), Some(&url), &[]))
    })
    .await
    .expect("serve");
    let (a_url, b_url) = (format!("http://{}", a.grpc), format!("http://{}", b.grpc));
    const ROUNDS: usize = 150;
    let churn = async {
        let mut tenants = TenantsClient::connect(a_url.clone()).await.expect("connect");
        for _ in 0..ROUNDS {
            let create = pb::CreateTenantRequest { tenant_id: "churn".into(), name: "c".into() };
            let _ = tenants.create_tenant(create).await;
            let _ =
                tenants.delete_tenant(pb::DeleteTenantRequest { tenant_id: "churn".into() }).await;
        }
    };
    let import = async {
        let mut importer = client(&b_url).await;
        let (mut applied, mut rejected) = (0, 0);
        for round in 0..ROUNDS {
            let users = (0..20)
                .map(|n| wire_user(format!("u{round}-{n}"), n + 1, "churn", &["viewer"]))
                .collect();
            let options =
                pb::ImportOptions { create_tenants: round % 2 == 0, ..Default::default() };
            let done = import_call(&mut importer, options, users).await.expect("an answer");
            (applied, rejected) = (applied + done.users, rejected + done.rejected_count);
        }
        (applied, rejected)
    };
    let grant = async {
        let mut granter = client(&b_url).await;
        let mut granted = 0;
        for round in 0..ROUNDS {
            let request = pb::GrantRequest {
                user_id: format!("g{round}"),
                tenant_id: "churn".into(),
                roles: vec!["editor".into()],
                expires_at: None,
            };
            granted += u64::from(granter.grant(request).await.is_ok());
        }
        granted
    };
    let ((), (applied, rejected), granted) = tokio::join!(churn, import, grant);
    assert!(
        applied > 0 && rejected > 0,
        "the tenant was there, and gone: {applied} applied, {rejected} rejected"
    );
    assert!(granted > 0, "some grants found the tenant");
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(&db.url()).await.expect("connect");
    let (orphans,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM memberships m \
         WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.tenant_id = m.tenant_id)",
    )
    .fetch_one(&mut conn)
    .await
    .expect("count");
    assert_eq!(orphans, 0, "memberships whose tenant is gone");
}
