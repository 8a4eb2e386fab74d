//! `rolecheck doctor`: checks what `serve` would start with, from the same flags and
//! environment, without serving. One line per check (`ok`, `warn` or `FAIL`, what, and
//! the detail or the fix); the process exits 1 when a check fails.
//!
//! Each check calls the code `serve` runs at start (the same parsers, the same
//! explanations), so a configuration doctor passes is one `serve` accepts. Nothing is
//! written: the store is only looked at (no migration, no data directory created), and
//! ports are bound and released at once.

use std::{fmt::Write as _, time::Duration};

use crate::{
    auth::KeyRing,
    authz::trust::Exposure,
    config::Config,
    error::{Error, Result},
    listen::{GrpcListener, ListenAddr},
    tls::Tls,
    token::KeySet,
};

/// One check's outcome.
enum Outcome {
    Ok(String),
    Warn(String),
    Fail(String),
}

/// The lines of a doctor run.
#[derive(Default)]
pub struct Report {
    lines: Vec<(&'static str, Outcome)>,
}

impl Report {
    fn ok(&mut self, what: &'static str, detail: impl Into<String>) {
        self.lines.push((what, Outcome::Ok(detail.into())));
    }

    fn warn(&mut self, what: &'static str, detail: impl Into<String>) {
        self.lines.push((what, Outcome::Warn(detail.into())));
    }

    /// `Ok` as a passed check with `detail`, an error as a failed one.
    fn result(&mut self, what: &'static str, result: Result<String>) {
        let outcome = match result {
            Ok(detail) => Outcome::Ok(detail),
            Err(err) => Outcome::Fail(err.to_string()),
        };
        self.lines.push((what, outcome));
    }

    /// Whether every check passed (warnings allowed).
    pub fn passed(&self) -> bool {
        !self.lines.iter().any(|(_, outcome)| matches!(outcome, Outcome::Fail(_)))
    }

    /// The report, one line per check.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (what, outcome) in &self.lines {
            let (mark, detail) = match outcome {
                Outcome::Ok(detail) => ("ok", detail),
                Outcome::Warn(detail) => ("warn", detail),
                Outcome::Fail(detail) => ("FAIL", detail),
            };
            let _ = writeln!(out, "{mark:<4}  {what:<12}  {detail}");
        }
        out
    }
}

/// Runs every check on `config`.
pub async fn check(config: &Config) -> Report {
    let mut report = Report::default();
    report.result("flags", config.validate().map(|()| "no contradictions".to_owned()));
    keys(config, &mut report);
    policy(config, &mut report);
    tls(config, &mut report);
    signing(config, &mut report);
    listeners(config, &mut report).await;
    store(config, &mut report).await;
    report
}

fn keys(config: &Config, report: &mut Report) {
    match config.without_keys() {
        Err(err) => report.result("api keys", Err(err)),
        Ok(Some(warning)) => report.warn("api keys", warning),
        Ok(None) => {}
    }
    let Some(path) = &config.api_keys_file else { return };
    match KeyRing::load(path) {
        Ok(ring) => {
            report.ok("api keys", format!("{}: {}", path.display(), ring.summary()));
            for warning in ring.warnings(config.tls_client_ca.is_some()) {
                report.warn("api keys", format!("{}: {warning}", path.display()));
            }
        }
        Err(err) => report.result("api keys", Err(err)),
    }
}

fn policy(config: &Config, report: &mut Report) {
    let Some(path) = &config.authz_policy else { return };
    let exposure = Exposure::of(config, config.api_keys_file.is_some());
    match crate::authz::preflight(path, exposure) {
        Ok(policy) => {
            report.ok("authz policy", format!("{}: {} routes", path.display(), policy.len()));
            for warning in policy.warnings() {
                report.warn("authz policy", format!("{}: {warning}", path.display()));
            }
        }
        Err(err) => report.result("authz policy", Err(err)),
    }
}

fn tls(config: &Config, report: &mut Report) {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else { return };
    let loaded = Tls::load(cert, key, config.tls_client_ca.as_deref()).map(|_| {
        let mtls =
            if config.tls_client_ca.is_some() { ", client certificates required" } else { "" };
        format!("{} matches {}{mtls}", cert.display(), key.display())
    });
    report.result("tls", loaded);
}

fn signing(config: &Config, report: &mut Report) {
    if config.upstream.is_some() {
        return;
    }
    if config.signing_key.is_empty() {
        if config.embedded_store() {
            let path = config.data_dir.join("signing-key.pem");
            report.ok("signing key", format!("{} (generated at first start)", path.display()));
        } else {
            report.warn("signing key", "none configured: Issue is refused (--signing-key)");
        }
        return;
    }
    let loaded = KeySet::load(&config.signing_key, None).map(|keys| match keys.signer() {
        Some(key) => format!("{} keys, signing with kid {}", config.signing_key.len(), key.kid()),
        None => "no key".to_owned(),
    });
    report.result("signing key", loaded);
}

/// Binds each listener and lets it go: whether `serve` could.
async fn listeners(config: &Config, report: &mut Report) {
    let grpc = match &config.listen {
        // A unix socket file is replaced at start; only its directory must be there.
        ListenAddr::Unix(path) => match path.parent().filter(|dir| !dir.exists()) {
            Some(dir) => Err(Error::FailedPrecondition(format!(
                "the directory {} of --listen does not exist",
                dir.display()
            ))),
            None => Ok(format!("{} (unix socket)", config.listen)),
        },
        ListenAddr::Tcp(_) => GrpcListener::bind(&config.listen, config.unix_socket_mode)
            .await
            .map(|_| format!("{} is free", config.listen)),
    };
    report.result("grpc port", grpc);
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map(|_| format!("{} is free", config.http_listen))
        .map_err(|err| crate::listen::cannot_listen(&config.http_listen, "--http-listen", &err));
    report.result("http port", http);
}

async fn store(config: &Config, report: &mut Report) {
    if let Some(upstream) = &config.upstream {
        report.ok("store", format!("none: following {upstream}"));
        return;
    }
    let within =
        config.db_acquire_timeout.max(config.db_query_timeout).min(Duration::from_secs(10));
    let url = config.database_url.as_ref().map(|url| url.0.as_str());
    let found = crate::store::inspect(url, &config.data_dir, within).await;
    report.result("store", found.and_then(|found| found.verdict(!config.no_migrate)));
}
