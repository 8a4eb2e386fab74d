//! The command line as a client of a server: `rolecheck model check|apply|show` here,
//! the admin commands in [`admin`], printed by [`print`].
//!
//! Exit codes scripts can rely on: 0 when the command did what it says (`check`: allowed);
//! 1 when `check` is denied or a model file has a problem; 2 for a usage error (clap's, or
//! a flag's value); and for a call the server refused, 10 plus the gRPC status code
//! (`INVALID_ARGUMENT` 13, `NOT_FOUND` 15, `ALREADY_EXISTS` 16, `PERMISSION_DENIED` 17,
//! `FAILED_PRECONDITION` 19, `UNAVAILABLE` 24, `UNAUTHENTICATED` 26).

mod admin;
mod bulk;
mod print;

pub use admin::admin;

use std::process::ExitCode;

use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};

use crate::{
    client::{self, Credentials, Flags, Target},
    config::{ModelCommand, ServerArgs},
    error::Result,
    model::check_file,
    pb::{self, role_check_client::RoleCheckClient},
};

/// How long one call may take.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The command line's settings, named in its errors.
const FLAGS: Flags = Flags {
    url: "--server",
    ca: "--server-ca",
    cert: "--server-cert",
    cert_key: "--server-cert-key",
    key_file: "--key-file",
};

/// Runs `rolecheck model …`: 0 when it did what it says, 1 otherwise (the reason on
/// stderr).
pub async fn model(command: ModelCommand) -> Result<ExitCode> {
    match command {
        ModelCommand::Check { file } => {
            let (report, fine) = check_file(&file);
            Ok(outcome(&report, fine))
        }
        ModelCommand::Apply { file, server } => {
            let (report, fine) = check_file(&file);
            if !fine {
                return Ok(outcome(&report, false));
            }
            let model = String::from_utf8(client::read(&file, "the model file")?)
                .map_err(|_| crate::error::Error::invalid("file", "the model file is not UTF-8"))?;
            let request = pb::SetModelRequest { model };
            match connect(&server)?.set_model(request).await {
                Ok(set) => {
                    let revision = set.into_inner().revision;
                    println!("{}: set at revision {revision}", file.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(status) => Ok(refused(&server, &status)),
            }
        }
        ModelCommand::Show { server } => {
            let request = pb::GetModelRequest { min_revision: 0 };
            match connect(&server)?.get_model(request).await {
                Ok(model) => {
                    let model = model.into_inner();
                    print!("{}", model.model);
                    match model.model_revision {
                        0 => eprintln!("# no model was ever set"),
                        revision => eprintln!("# set at revision {revision}"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(status) => Ok(refused(&server, &status)),
            }
        }
    }
}

/// Prints `report` (on stdout when `fine`, else stderr); the exit code it stands for.
fn outcome(report: &str, fine: bool) -> ExitCode {
    if fine {
        print!("{report}");
        ExitCode::SUCCESS
    } else {
        eprint!("{report}");
        ExitCode::FAILURE
    }
}

/// Says why the server did not do it, and what to change; the exit code for its status.
fn refused(server: &ServerArgs, status: &Status) -> ExitCode {
    let message = status.message();
    match status.code() {
        Code::Unavailable => {
            eprintln!(
                "Error: {} did not answer ({message}); is it running? (--server)",
                server.server
            )
        }
        Code::Unauthenticated | Code::PermissionDenied => {
            eprintln!("Error: {message} (give a key with the scope it needs: --key-file)")
        }
        Code::NotFound | Code::InvalidArgument | Code::AlreadyExists => {
            eprintln!("Error: {message}")
        }
        code => eprintln!("Error: {code:?}: {message}"),
    }
    ExitCode::from(10 + status.code() as u8)
}

/// A channel to `server` carrying the key `--key-file` names.
type Authorized = InterceptedService<Channel, Credentials>;

fn connect(server: &ServerArgs) -> Result<RoleCheckClient<Authorized>> {
    let (channel, credentials) = authorized(server)?;
    Ok(RoleCheckClient::with_interceptor(channel, credentials))
}

fn authorized(server: &ServerArgs) -> Result<(Channel, Credentials)> {
    authorized_for(server, TIMEOUT)
}

/// [`authorized`] with calls that may take up to `timeout` (a Watch stream: for ever).
fn authorized_for(
    server: &ServerArgs,
    timeout: std::time::Duration,
) -> Result<(Channel, Credentials)> {
    let cert = server.server_cert.as_deref().zip(server.server_cert_key.as_deref());
    let target = Target {
        url: &server.server,
        ca: server.server_ca.as_deref(),
        cert,
        timeout,
        keepalive: None,
        flags: FLAGS,
    };
    let credentials = Credentials::from_file(server.key_file.as_deref(), FLAGS.key_file)?;
    Ok((client::channel(&target)?, credentials))
}
