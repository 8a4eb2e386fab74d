//! What the import tests share: the binary as an operator runs it, a server, files in
//! `export`'s form, and a gRPC client for what the commands do not show.
//!
//! The files are written as `export` writes them (users in id order, tenants and roles
//! sorted), so once a file is imported into an empty store, `export` prints it back byte
//! for byte: the state one uninterrupted import ends in.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use rolecheck::pb::{self, role_check_client::RoleCheckClient};

use super::spawned;

pub fn rolecheck(server: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    command.args(args).env("ROLECHECK_SERVER", server).env_remove("ROLECHECK_KEY_FILE");
    command
}

/// `rolecheck ARGS…` against `server`: exit code, stdout, stderr.
pub fn run(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = rolecheck(server, args).output().expect("run rolecheck");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
    (out.status.code().expect("an exit code"), text(out.stdout), text(out.stderr))
}

pub fn ok(server: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = run(server, args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    stdout
}

pub fn serve(data: &Path, database_url: Option<&str>, extra: &[&str]) -> spawned::Server {
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
pub fn users_file(users: usize, variant: &str) -> String {
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
pub fn memberships_in(file: &str) -> usize {
    file.matches("-1\"").count() * 3 + file.matches("-x\"").count()
}

pub async fn client(server: &str) -> RoleCheckClient<tonic::transport::Channel> {
    RoleCheckClient::connect(server.to_owned()).await.expect("connect")
}

/// The server's revision (what an answer about nobody reflects).
pub async fn revision(client: &mut RoleCheckClient<tonic::transport::Channel>) -> u64 {
    let request = pb::GetAuthorizationRequest { user_id: "nobody".into(), ..Default::default() };
    client.get_authorization(request).await.expect("answer").into_inner().revision
}

pub fn export_of(server: &str) -> String {
    ok_once_available(server, &["export"])
}

/// [`ok`], once the server answers other than `UNAVAILABLE` (24): after Postgres
/// restarted, a pooled connection from before fails once, is dropped, and the call is
/// retried, as an operator would.
pub fn ok_once_available(server: &str, args: &[&str]) -> String {
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
pub fn assert_whole(server: &str, file: &str, after: &str) {
    let exported = export_of(server);
    assert!(
        exported == file,
        "after {after}: the store differs from the file ({} of {} bytes)",
        exported.len(),
        file.len()
    );
}

/// A user as `Import` takes it: `roles` in `tenant`, from input line `line`.
pub fn wire_user(id: String, line: u64, tenant: &str, roles: &[&str]) -> pb::UserMemberships {
    let roles = roles.iter().map(|role| (*role).to_owned()).collect();
    let tenants = vec![pb::TenantRoles { tenant_id: tenant.into(), roles, expires_at: None }];
    pb::UserMemberships { user_id: id, line, tenants }
}

/// One `Import` call of `users` with `options`, as a program makes it: its last answer
/// (`done`), or the status it ended with.
pub async fn import_call(
    client: &mut RoleCheckClient<tonic::transport::Channel>,
    options: pb::ImportOptions,
    users: Vec<pb::UserMemberships>,
) -> Result<pb::ImportResponse, tonic::Status> {
    let request = pb::ImportRequest { options: Some(options), users };
    let mut answers = client.import(tokio_stream::iter([request])).await?.into_inner();
    while let Some(answer) = answers.message().await? {
        if answer.done {
            return Ok(answer);
        }
    }
    Err(tonic::Status::unknown("the stream ended without its last answer"))
}
