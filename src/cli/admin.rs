//! The admin commands: each one RPC (or every page of a list) against a running server,
//! printed as a table or JSON, with exit codes scripts can rely on (see [`super`]).

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use serde_json::json;
use tonic::{Status, transport::Channel};

use super::{Authorized, authorized, print, refused};
use crate::{
    client::Credentials,
    config::{Admin, ChangesArgs, Client, Output, TenantsCommand, TokenCommand},
    error::Result,
    pb::{self, role_check_client::RoleCheckClient, tenants_client::TenantsClient},
};

/// Most entries per page a list asks for.
const PAGE: u32 = 1000;

fn checks(client: &Client) -> Result<RoleCheckClient<Authorized>> {
    let (channel, credentials): (Channel, Credentials) = authorized(&client.server)?;
    Ok(RoleCheckClient::with_interceptor(channel, credentials))
}

fn tenants(client: &Client) -> Result<TenantsClient<Authorized>> {
    let (channel, credentials) = authorized(&client.server)?;
    Ok(TenantsClient::with_interceptor(channel, credentials))
}

/// A usage error in a flag's value: said, and exit 2.
fn usage(message: String) -> ExitCode {
    eprintln!("Error: {message}");
    ExitCode::from(2)
}

/// `--expires-at` as a protobuf timestamp.
fn expiry(value: Option<&str>) -> std::result::Result<Option<prost_types::Timestamp>, ExitCode> {
    let Some(text) = value else { return Ok(None) };
    let at = humantime::parse_rfc3339_weak(text).map_err(|err| {
        usage(format!("--expires-at {text:?}: {err} (RFC 3339, e.g. 2027-01-31T00:00:00Z)"))
    })?;
    Ok(Some(prost_types::Timestamp::from(at)))
}

/// The printed revision a write committed at.
fn committed(output: Output, what: &str, revision: u64) -> ExitCode {
    let text = vec![vec![what.to_owned(), revision.to_string()]];
    print::either(output, &json!({ "revision": revision }), &["DONE", "REVISION"], &text);
    ExitCode::SUCCESS
}

/// Runs an admin command (see [`crate::config::Admin`]).
pub async fn admin(command: Admin) -> Result<ExitCode> {
    let done = match command {
        Admin::Tenants(command) => return tenants_command(command).await,
        Admin::Token(command) => return token(command).await,
        Admin::Changes(args) => return changes(args).await,
        Admin::Import(args) => return super::bulk::import(args).await,
        Admin::Export(args) => return super::bulk::export(args).await,
        Admin::Grant(args) => {
            let expires_at = match expiry(args.expires_at.as_deref()) {
                Ok(at) => at,
                Err(code) => return Ok(code),
            };
            let request = pb::GrantRequest {
                user_id: args.user,
                tenant_id: args.tenant.tenant,
                roles: args.roles,
                expires_at,
            };
            let answer = checks(&args.client)?.grant(request).await;
            (args.client, answer.map(|a| ("granted", a.into_inner().revision)))
        }
        Admin::Revoke(args) => {
            let request = pb::RevokeRequest {
                user_id: args.user,
                tenant_id: args.tenant.tenant,
                roles: args.roles,
            };
            let answer = checks(&args.client)?.revoke(request).await;
            (args.client, answer.map(|a| ("revoked", a.into_inner().revision)))
        }
        Admin::Set(args) => {
            let expires_at = match expiry(args.expires_at.as_deref()) {
                Ok(at) => at,
                Err(code) => return Ok(code),
            };
            let request = pb::SetRolesRequest {
                user_id: args.user,
                tenant_id: args.tenant.tenant,
                roles: args.roles,
                expires_at,
            };
            let answer = checks(&args.client)?.set_roles(request).await;
            (args.client, answer.map(|a| ("set", a.into_inner().revision)))
        }
        Admin::Check(args) => {
            let (role, permission) = match args.permission {
                true => (String::new(), args.role),
                false => (args.role, String::new()),
            };
            let request = pb::CheckRequest {
                user_id: args.user,
                tenant_id: args.tenant.tenant,
                role,
                permission,
                min_revision: 0,
            };
            return match checks(&args.client)?.check(request).await {
                Ok(answer) => {
                    let pb::CheckResponse { allowed, revision } = answer.into_inner();
                    let word = if allowed { "allowed" } else { "denied" };
                    let value = json!({ "allowed": allowed, "revision": revision });
                    let rows = vec![vec![word.to_owned(), revision.to_string()]];
                    print::either(args.client.output, &value, &["ANSWER", "REVISION"], &rows);
                    Ok(if allowed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
                }
                Err(status) => Ok(refused(&args.client.server, &status)),
            };
        }
        Admin::Roles(args) => return roles(args).await,
        Admin::Members(args) => return members(args).await,
    };
    Ok(match done {
        (client, Ok((what, revision))) => committed(client.output, what, revision),
        (client, Err(status)) => refused(&client.server, &status),
    })
}

async fn roles(args: crate::config::RolesArgs) -> Result<ExitCode> {
    let request = pb::GetAuthorizationRequest {
        user_id: args.user.clone(),
        min_revision: 0,
        expand: args.expand,
        with_expiry: false,
    };
    let answer = match checks(&args.client)?.get_authorization(request).await {
        Ok(answer) => answer.into_inner(),
        Err(status) => return Ok(refused(&args.client.server, &status)),
    };
    let tenants: BTreeMap<String, pb::Roles> = answer.authorization.into_iter().collect();
    let mut object = serde_json::Map::new();
    let mut rows = Vec::new();
    for (tenant, roles) in &tenants {
        let mut entry = json!({ "roles": roles.roles });
        if args.expand {
            entry["permissions"] = json!(roles.permissions);
        }
        object.insert(tenant.clone(), entry);
        let mut row = vec![tenant.clone(), roles.roles.join(",")];
        if args.expand {
            row.push(roles.permissions.join(","));
        }
        rows.push(row);
    }
    let value =
        json!({ "user_id": args.user, "authorization": object, "revision": answer.revision });
    let header: &[&str] =
        if args.expand { &["TENANT", "ROLES", "PERMISSIONS"] } else { &["TENANT", "ROLES"] };
    print::either(args.client.output, &value, header, &rows);
    Ok(ExitCode::SUCCESS)
}

async fn members(args: crate::config::MembersArgs) -> Result<ExitCode> {
    let mut client = checks(&args.client)?;
    let (mut members, mut token, mut revision) = (Vec::new(), String::new(), 0);
    loop {
        let request = pb::ListMembersRequest {
            tenant_id: args.tenant.clone(),
            page_size: PAGE,
            page_token: token,
        };
        let page = match client.list_members(request).await {
            Ok(page) => page.into_inner(),
            Err(status) => return Ok(refused(&args.client.server, &status)),
        };
        revision = revision.max(page.revision);
        members.extend(page.members);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let rows: Vec<Vec<String>> =
        members.iter().map(|m| vec![m.user_id.clone(), m.roles.join(",")]).collect();
    let listed: Vec<_> =
        members.iter().map(|m| json!({ "user_id": m.user_id, "roles": m.roles })).collect();
    let value = json!({ "tenant_id": args.tenant, "members": listed, "revision": revision });
    print::either(args.client.output, &value, &["USER", "ROLES"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn tenant_json(tenant: &pb::Tenant) -> serde_json::Value {
    json!({ "tenant_id": tenant.tenant_id, "name": tenant.name })
}

async fn tenants_command(command: TenantsCommand) -> Result<ExitCode> {
    let print_one = |client: &Client, answer: std::result::Result<pb::Tenant, Status>| match answer
    {
        Ok(tenant) => {
            let rows = vec![vec![tenant.tenant_id.clone(), tenant.name.clone()]];
            print::either(client.output, &tenant_json(&tenant), &["TENANT", "NAME"], &rows);
            ExitCode::SUCCESS
        }
        Err(status) => refused(&client.server, &status),
    };
    match command {
        TenantsCommand::Create { id, name, client } => {
            let request =
                pb::CreateTenantRequest { name: name.unwrap_or_else(|| id.clone()), tenant_id: id };
            let answer = tenants(&client)?.create_tenant(request).await.map(|a| a.into_inner());
            Ok(print_one(&client, answer))
        }
        TenantsCommand::Get { id, client } => {
            let request = pb::GetTenantRequest { tenant_id: id };
            let answer = tenants(&client)?.get_tenant(request).await.map(|a| a.into_inner());
            Ok(print_one(&client, answer))
        }
        TenantsCommand::Delete { id, client } => {
            let request = pb::DeleteTenantRequest { tenant_id: id };
            Ok(match tenants(&client)?.delete_tenant(request).await {
                Ok(answer) => committed(client.output, "deleted", answer.into_inner().revision),
                Err(status) => refused(&client.server, &status),
            })
        }
        TenantsCommand::List { client } => {
            let mut api = tenants(&client)?;
            let (mut all, mut token) = (Vec::new(), String::new());
            loop {
                let request = pb::ListTenantsRequest { page_size: PAGE, page_token: token };
                let page = match api.list_tenants(request).await {
                    Ok(page) => page.into_inner(),
                    Err(status) => return Ok(refused(&client.server, &status)),
                };
                all.extend(page.tenants);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let rows: Vec<Vec<String>> =
                all.iter().map(|t| vec![t.tenant_id.clone(), t.name.clone()]).collect();
            let listed: Vec<_> = all.iter().map(tenant_json).collect();
            print::either(client.output, &json!({ "tenants": listed }), &["TENANT", "NAME"], &rows);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn token(command: TokenCommand) -> Result<ExitCode> {
    let TokenCommand::Issue { user, ttl, tenants, client } = command;
    let ttl_seconds = ttl.map_or(0, |ttl| u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX));
    let request = pb::IssueRequest {
        user_id: user,
        ttl_seconds,
        tenant_ids: tenants,
        min_revision: 0,
        expand: false,
    };
    let answer = match checks(&client)?.issue(request).await {
        Ok(answer) => answer.into_inner(),
        Err(status) => return Ok(refused(&client.server, &status)),
    };
    let expires_at = answer.expires_at.map_or(0, |at| at.seconds);
    match client.output {
        // The token alone, so `TOKEN=$(rolecheck token issue 1)` just works.
        Output::Table => println!("{}", answer.access_token),
        Output::Json => print::json(&json!({
            "access_token": answer.access_token,
            "expires_at": expires_at,
            "revision": answer.revision,
        })),
    }
    Ok(ExitCode::SUCCESS)
}

fn change_row(revision: u64, change: &pb::Change) -> (serde_json::Value, Vec<String>) {
    let kind = pb::ChangeKind::try_from(change.kind).map_or("UNKNOWN", |kind| kind.as_str_name());
    let kind = kind.trim_start_matches("CHANGE_KIND_");
    let value = json!({
        "revision": revision, "kind": kind, "tenant_id": change.tenant_id,
        "user_id": change.user_id, "roles": change.roles, "caller": change.caller,
    });
    let row = vec![
        revision.to_string(),
        kind.to_owned(),
        change.tenant_id.clone(),
        change.user_id.clone(),
        change.roles.join(","),
        change.caller.clone(),
    ];
    (value, row)
}

const CHANGE_HEADER: [&str; 6] = ["REVISION", "KIND", "TENANT", "USER", "ROLES", "CALLER"];

async fn changes(args: ChangesArgs) -> Result<ExitCode> {
    if args.follow {
        return follow(args).await;
    }
    let mut client = checks(&args.client)?;
    let (mut values, mut rows, mut token) = (Vec::new(), Vec::new(), String::new());
    loop {
        let request = pb::ListChangesRequest {
            tenant_id: args.tenant.clone().unwrap_or_default(),
            user_id: args.user.clone().unwrap_or_default(),
            caller: String::new(),
            after_revision: args.after,
            page_size: PAGE,
            page_token: token,
        };
        let page = match client.list_changes(request).await {
            Ok(page) => page.into_inner(),
            Err(status) => return Ok(refused(&args.client.server, &status)),
        };
        for entry in &page.entries {
            let (value, row) =
                change_row(entry.revision, &entry.change.clone().unwrap_or_default());
            values.push(value);
            rows.push(row);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    print::either(args.client.output, &json!({ "changes": values }), &CHANGE_HEADER, &rows);
    Ok(ExitCode::SUCCESS)
}

/// Every change as it commits, one line each (a row, or a JSON object), until the
/// stream ends or the process is interrupted.
async fn follow(args: ChangesArgs) -> Result<ExitCode> {
    let (channel, credentials) = super::authorized_for(&args.client.server, Duration::MAX)?;
    let mut client = RoleCheckClient::with_interceptor(channel, credentials);
    let request =
        pb::WatchRequest { after_revision: args.after, progress_ms: 0, epoch: String::new() };
    let mut stream = match client.watch(request).await {
        Ok(stream) => stream.into_inner(),
        Err(status) => return Ok(refused(&args.client.server, &status)),
    };
    loop {
        match stream.message().await {
            Ok(Some(batch)) => {
                for change in &batch.changes {
                    let (value, row) = change_row(batch.revision, change);
                    match args.client.output {
                        Output::Json => println!("{value}"),
                        Output::Table => println!("{}", row.join("\t")),
                    }
                }
            }
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Err(status) => return Ok(refused(&args.client.server, &status)),
        }
    }
}
