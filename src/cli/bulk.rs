//! `rolecheck import FILE` and `rolecheck export [FILE]`.
//!
//! Import reads the whole file first: every line is checked (ids, roles, expiries) and a
//! bad one is reported with its number and skipped whole; a user's lines (CSV rows, or a
//! user on two lines) are gathered into one user, so the server applies each user in one
//! batch, at one revision. Then the users stream to the server (`Import`) under a
//! progress bar (on a terminal), and a summary is printed. With `--strict`, any bad line,
//! or a tenant that does not exist (without `--create-tenants`), stops it before anything
//! is sent.
//!
//! Export writes what `Export` streams, in the format import reads, and prints the
//! snapshot's revision on stderr.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{BufRead, Write},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

use super::{print, refused};
use crate::{
    config::{DataFormat, ExportArgs, ImportArgs, Output},
    domain::{MAX_IMPORTED_MEMBERSHIPS, Role, TenantId, UserId},
    error::{Error, Result},
    pb::{self, role_check_client::RoleCheckClient, tenants_client::TenantsClient},
};

/// Users per request of the import stream, and memberships (a request holds whole users,
/// so it stays far below the server's message limit).
const USERS_PER_REQUEST: usize = 500;
const MEMBERSHIPS_PER_REQUEST: usize = 2_000;

/// A line that is not imported: its number and why.
type Bad = (u64, String);

/// The format `path` names: `.csv` is CSV, anything else JSON Lines.
fn format_of(path: Option<&Path>, given: Option<DataFormat>) -> DataFormat {
    given.unwrap_or(match path.and_then(Path::extension).and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("csv") => DataFormat::Csv,
        _ => DataFormat::Jsonl,
    })
}

/// Runs `rolecheck import`.
pub async fn import(args: ImportArgs) -> Result<ExitCode> {
    let stdin = args.file.as_os_str() == "-";
    let format = format_of((!stdin).then_some(args.file.as_path()), args.format);
    let reader: Box<dyn BufRead> = match stdin {
        true => Box::new(std::io::stdin().lock()),
        false => match std::fs::File::open(&args.file) {
            Ok(file) => Box::new(std::io::BufReader::new(file)),
            Err(err) => {
                eprintln!("Error: cannot read {}: {err}", args.file.display());
                return Ok(ExitCode::from(2));
            }
        },
    };
    let (lines, users, mut bad) = match format {
        DataFormat::Jsonl => read_jsonl(reader)?,
        DataFormat::Csv => read_csv(reader),
    };
    // A user the server would refuse whole, refused here (its message could pass the
    // server's size limit).
    let (users, too_big): (Vec<_>, Vec<_>) = users.into_iter().partition(|user| {
        user.tenants.iter().map(|t| t.roles.len()).sum::<usize>() <= MAX_IMPORTED_MEMBERSHIPS
    });
    let most = format!("more than {MAX_IMPORTED_MEMBERSHIPS} memberships");
    bad.extend(too_big.iter().map(|user| (user.line, format!("user {}: {most}", user.user_id))));
    bad.sort();
    for (line, reason) in &bad {
        eprintln!("line {line}: {reason}; skipped");
    }
    if args.strict && !bad.is_empty() {
        eprintln!("Error: {} bad lines; nothing was imported (--strict)", bad.len());
        return Ok(ExitCode::from(10 + tonic::Code::InvalidArgument as u8));
    }
    let server = &args.client.server;
    if args.strict
        && !args.create_tenants
        && let Some(refusal) = strictly_known_tenants(server, &users).await?
    {
        return Ok(refusal);
    }
    let options = pb::ImportOptions {
        replace: args.replace,
        create_tenants: args.create_tenants,
        strict: args.strict,
    };
    let summary = match send(server, options, users).await? {
        Ok(summary) => summary,
        Err(status) => return Ok(refused(server, &status)),
    };
    for rejected in &summary.rejected {
        let (line, user, reason) = (rejected.line, &rejected.user_id, &rejected.reason);
        eprintln!("line {line}: user {user}: {reason}; skipped");
    }
    print_summary(args.client.output, lines, &summary, summary.rejected_count + bad.len() as u64);
    Ok(ExitCode::SUCCESS)
}

/// With `--strict`: every tenant the file names must exist. The refusal (exit 15, each
/// line naming a missing tenant said), or what the server answered instead.
async fn strictly_known_tenants(
    server: &crate::config::ServerArgs,
    users: &[pb::UserMemberships],
) -> Result<Option<ExitCode>> {
    let missing = match missing_tenants(server, users).await? {
        Ok(missing) => missing,
        Err(status) => return Ok(Some(refused(server, &status))),
    };
    if missing.is_empty() {
        return Ok(None);
    }
    for user in users.iter().filter(|u| u.tenants.iter().any(|t| missing.contains(&t.tenant_id))) {
        eprintln!("line {}: user {}: names a tenant that does not exist", user.line, user.user_id);
    }
    let names: Vec<&str> = missing.iter().map(String::as_str).collect();
    eprintln!(
        "Error: tenants not found: {} (--create-tenants creates them); nothing was imported \
         (--strict)",
        names.join(", ")
    );
    Ok(Some(ExitCode::from(10 + tonic::Code::NotFound as u8)))
}

/// The summary of an import, as `--output` says.
fn print_summary(output: Output, lines: u64, summary: &pb::ImportResponse, rejected: u64) {
    let value = json!({
        "lines": lines,
        "users": summary.users,
        "memberships": summary.memberships,
        "tenants_created": summary.tenants_created,
        "rejected": rejected,
        "batches": summary.batches,
        "revision": summary.revision,
    });
    let row = vec![
        lines.to_string(),
        summary.users.to_string(),
        summary.memberships.to_string(),
        summary.tenants_created.len().to_string(),
        rejected.to_string(),
        summary.revision.to_string(),
    ];
    let header = ["LINES", "USERS", "MEMBERSHIPS", "TENANTS_CREATED", "REJECTED", "REVISION"];
    print::either(output, &value, &header, &[row]);
}

/// Streams `users` to the server under a progress bar; the server's summary.
async fn send(
    server: &crate::config::ServerArgs,
    options: pb::ImportOptions,
    users: Vec<pb::UserMemberships>,
) -> Result<std::result::Result<pb::ImportResponse, tonic::Status>> {
    let (channel, credentials) = super::authorized_for(server, Duration::MAX)?;
    let mut client =
        RoleCheckClient::with_interceptor(channel, credentials).max_decoding_message_size(64 << 20);
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(users.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} users  {per_sec}  {eta}")
            .map_err(|err| Error::Internal(Box::new(err)))?,
    );
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let mut options = Some(options);
        let mut users = users.into_iter().peekable();
        while users.peek().is_some() || options.is_some() {
            let (mut chunk, mut memberships) = (Vec::new(), 0);
            while chunk.len() < USERS_PER_REQUEST && memberships < MEMBERSHIPS_PER_REQUEST {
                let Some(user) = users.next() else { break };
                memberships += user.tenants.iter().map(|t| t.roles.len()).sum::<usize>();
                chunk.push(user);
            }
            let request = pb::ImportRequest { options: options.take(), users: chunk };
            if tx.send(request).await.is_err() {
                return;
            }
        }
    });
    let answers = client.import(ReceiverStream::new(rx)).await;
    let mut answers = match answers {
        Ok(answers) => answers.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    // Each answer tells what was applied since the last; the last one (`done`) sums up.
    let (mut rejected, mut created) = (Vec::new(), Vec::new());
    let ended = loop {
        match answers.message().await {
            Ok(Some(mut answer)) => {
                rejected.append(&mut answer.rejected);
                created.append(&mut answer.tenants_created);
                bar.set_position(answer.users + answer.rejected_count);
                if answer.done {
                    answer.rejected = rejected;
                    answer.tenants_created = created;
                    break Ok(answer);
                }
            }
            Ok(None) => break Err(tonic::Status::unavailable("the server ended the import early")),
            Err(status) => break Err(status),
        }
    };
    bar.finish_and_clear();
    Ok(ended)
}

/// The tenants `users` name that the server does not have.
async fn missing_tenants(
    server: &crate::config::ServerArgs,
    users: &[pb::UserMemberships],
) -> Result<std::result::Result<BTreeSet<String>, tonic::Status>> {
    let mut named: BTreeSet<String> =
        users.iter().flat_map(|u| u.tenants.iter().map(|t| t.tenant_id.clone())).collect();
    named.remove("");
    let (channel, credentials) = super::authorized(server)?;
    let mut tenants = TenantsClient::with_interceptor(channel, credentials);
    let mut page_token = String::new();
    loop {
        let request = pb::ListTenantsRequest { page_size: 1000, page_token };
        let page = match tenants.list_tenants(request).await {
            Ok(page) => page.into_inner(),
            Err(status) => return Ok(Err(status)),
        };
        for tenant in &page.tenants {
            named.remove(&tenant.tenant_id);
        }
        if page.next_page_token.is_empty() || named.is_empty() {
            return Ok(Ok(named));
        }
        page_token = page.next_page_token;
    }
}

/// Gathers users by id, in the order each first appears (its first line).
#[derive(Default)]
struct Gathered {
    users: Vec<pb::UserMemberships>,
    index: HashMap<String, usize>,
}

impl Gathered {
    fn add(&mut self, line: u64, user_id: String, tenants: Vec<pb::TenantRoles>) {
        match self.index.get(&user_id) {
            Some(&at) => self.users[at].tenants.extend(tenants),
            None => {
                self.index.insert(user_id.clone(), self.users.len());
                self.users.push(pb::UserMemberships { user_id, tenants, line });
            }
        }
    }
}

/// A JSON Lines line: `{"user_id": …, "authorization": {tenant: {"roles": […],
/// "expires_at": …}}}`. Userfront's `userId` (a number there) is read as well; other
/// fields are ignored.
#[derive(Deserialize)]
struct JsonUser {
    #[serde(alias = "userId")]
    user_id: JsonId,
    #[serde(default)]
    authorization: BTreeMap<String, JsonTenant>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonId {
    Text(String),
    Number(u64),
}

#[derive(Deserialize)]
struct JsonTenant {
    roles: Vec<String>,
    /// RFC 3339, or unix seconds.
    #[serde(default)]
    expires_at: Option<JsonTime>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonTime {
    Text(String),
    Seconds(i64),
}

/// Lines read, users gathered, and bad lines.
type Read = (u64, Vec<pb::UserMemberships>, Vec<Bad>);

fn read_jsonl(reader: Box<dyn BufRead>) -> Result<Read> {
    let (mut gathered, mut bad, mut lines) = (Gathered::default(), Vec::new(), 0);
    for (n, text) in reader.lines().enumerate() {
        let line = n as u64 + 1;
        let text = text.map_err(|err| Error::FailedPrecondition(format!("line {line}: {err}")))?;
        lines = line;
        if text.trim().is_empty() {
            continue;
        }
        let parsed =
            serde_json::from_str::<JsonUser>(&text).map_err(|err| format!("bad JSON: {err}"));
        match parsed.and_then(user_from_json) {
            Ok((user_id, tenants)) => gathered.add(line, user_id, tenants),
            Err(reason) => bad.push((line, reason)),
        }
    }
    Ok((lines, gathered.users, bad))
}

fn user_from_json(user: JsonUser) -> std::result::Result<(String, Vec<pb::TenantRoles>), String> {
    let user_id = match user.user_id {
        JsonId::Text(text) => text,
        JsonId::Number(number) => number.to_string(),
    };
    UserId::validate("user_id", &user_id).map_err(|err| err.to_string())?;
    let mut tenants = Vec::new();
    for (tenant_id, held) in user.authorization {
        let expires_at = match held.expires_at {
            None => None,
            Some(JsonTime::Seconds(seconds)) => Some(prost_types::Timestamp { seconds, nanos: 0 }),
            Some(JsonTime::Text(text)) => Some(rfc3339(&text)?),
        };
        tenants.push(tenant_roles(tenant_id, held.roles, expires_at)?);
    }
    Ok((user_id, tenants))
}

fn rfc3339(text: &str) -> std::result::Result<prost_types::Timestamp, String> {
    humantime::parse_rfc3339_weak(text)
        .map(prost_types::Timestamp::from)
        .map_err(|err| format!("expires_at {text:?}: {err} (RFC 3339)"))
}

/// A tenant's roles, checked.
fn tenant_roles(
    tenant_id: String,
    roles: Vec<String>,
    expires_at: Option<prost_types::Timestamp>,
) -> std::result::Result<pb::TenantRoles, String> {
    if !tenant_id.is_empty() {
        TenantId::validate("tenant_id", &tenant_id).map_err(|err| err.to_string())?;
    }
    for role in &roles {
        Role::validate("role", role).map_err(|err| err.to_string())?;
    }
    Ok(pb::TenantRoles { tenant_id, roles, expires_at })
}

fn read_csv(reader: Box<dyn BufRead>) -> Read {
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(reader);
    let (mut gathered, mut bad, mut lines) = (Gathered::default(), Vec::new(), 0);
    for record in csv.records() {
        let (line, row) = match record {
            Ok(row) => (row.position().map_or(0, |p| p.line()), row),
            Err(err) => {
                let line = err.position().map_or(0, |p| p.line());
                bad.push((line, err.to_string()));
                continue;
            }
        };
        lines = lines.max(line);
        let fields: Vec<&str> = row.iter().collect();
        if line == 1 && fields.first() == Some(&"user_id") {
            continue;
        }
        match membership_from_csv(&fields) {
            Ok((user_id, tenant)) => gathered.add(line, user_id, vec![tenant]),
            Err(reason) => bad.push((line, reason)),
        }
    }
    (lines, gathered.users, bad)
}

fn membership_from_csv(fields: &[&str]) -> std::result::Result<(String, pb::TenantRoles), String> {
    let (user, tenant, role, expires) = match fields {
        [user, tenant, role] => (*user, *tenant, *role, ""),
        [user, tenant, role, expires] => (*user, *tenant, *role, *expires),
        _ => {
            return Err(format!(
                "{} fields; want user_id,tenant_id,role[,expires_at]",
                fields.len()
            ));
        }
    };
    UserId::validate("user_id", user).map_err(|err| err.to_string())?;
    let expires_at = match expires {
        "" => None,
        text => Some(rfc3339(text)?),
    };
    Ok((user.to_owned(), tenant_roles(tenant.to_owned(), vec![role.to_owned()], expires_at)?))
}

/// Runs `rolecheck export`.
pub async fn export(args: ExportArgs) -> Result<ExitCode> {
    let format = format_of(args.file.as_deref(), args.format);
    let (channel, credentials) = super::authorized_for(&args.server, Duration::MAX)?;
    let mut client =
        RoleCheckClient::with_interceptor(channel, credentials).max_decoding_message_size(64 << 20);
    let mut stream = match client.export(pb::ExportRequest {}).await {
        Ok(stream) => stream.into_inner(),
        Err(status) => return Ok(refused(&args.server, &status)),
    };
    let mut out: Box<dyn Write> = match &args.file {
        Some(path) => match std::fs::File::create(path) {
            Ok(file) => Box::new(std::io::BufWriter::new(file)),
            Err(err) => {
                eprintln!("Error: cannot write {}: {err}", path.display());
                return Ok(ExitCode::from(2));
            }
        },
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let (mut revision, mut users, mut memberships) = (0, 0u64, 0u64);
    loop {
        let page = match stream.message().await {
            Ok(Some(page)) => page,
            Ok(None) => break,
            Err(status) => return Ok(refused(&args.server, &status)),
        };
        revision = page.revision;
        for user in page.users {
            users += 1;
            memberships += user.tenants.iter().map(|t| t.roles.len() as u64).sum::<u64>();
            write_user(&mut out, format, &user)
                .map_err(|err| Error::FailedPrecondition(format!("cannot write: {err}")))?;
        }
    }
    out.flush().map_err(|err| Error::FailedPrecondition(format!("cannot write: {err}")))?;
    drop(out);
    eprintln!("exported {users} users, {memberships} memberships at revision {revision}");
    Ok(ExitCode::SUCCESS)
}

fn write_user(
    out: &mut dyn Write,
    format: DataFormat,
    user: &pb::UserMemberships,
) -> std::io::Result<()> {
    let time = |at: &prost_types::Timestamp| {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(at.seconds.max(0) as u64);
        humantime::format_rfc3339_seconds(at).to_string()
    };
    match format {
        DataFormat::Jsonl => {
            let mut authorization = serde_json::Map::new();
            for tenant in &user.tenants {
                let mut held = json!({ "roles": tenant.roles });
                if let Some(at) = &tenant.expires_at {
                    held["expires_at"] = json!(time(at));
                }
                // Roles of another expiry in the same tenant go on a line of their own.
                if authorization.contains_key(&tenant.tenant_id) {
                    let mut apart = serde_json::Map::new();
                    apart.insert(tenant.tenant_id.clone(), held);
                    write_line(out, &user.user_id, apart)?;
                    continue;
                }
                authorization.insert(tenant.tenant_id.clone(), held);
            }
            write_line(out, &user.user_id, authorization)
        }
        DataFormat::Csv => {
            for tenant in &user.tenants {
                let expires = tenant.expires_at.as_ref().map(time).unwrap_or_default();
                for role in &tenant.roles {
                    let user_id = csv_field(&user.user_id);
                    writeln!(out, "{user_id},{},{role},{expires}", tenant.tenant_id)?;
                }
            }
            Ok(())
        }
    }
}

/// One JSON line, `user_id` first (as people write it).
fn write_line(
    out: &mut dyn Write,
    user_id: &str,
    authorization: serde_json::Map<String, serde_json::Value>,
) -> std::io::Result<()> {
    let (user_id, authorization) = (json!(user_id), serde_json::Value::Object(authorization));
    writeln!(out, "{{\"user_id\":{user_id},\"authorization\":{authorization}}}")
}

/// A user id as a CSV field: quoted when it holds a comma or a quote.
fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    match text.contains([',', '"']) {
        true => format!("\"{}\"", text.replace('"', "\"\"")).into(),
        false => text.into(),
    }
}
