//! The docs stay true.
//!
//! - `docs/configuration.md` is generated from the clap definitions: this test fails when
//!   it differs from what they say (`UPDATE_DOCS=1 cargo nextest run --test docs` writes
//!   it).
//! - Every ```` ```sh ```` block in the README and in `docs/` runs, in the order of the
//!   README's map, against one real server (the `rolecheck` binary on free loopback
//!   ports, started with the proxy policy of `docs/proxies.md`), each block under
//!   `set -euo pipefail`, so any failing command fails the test with the page and line.
//!   `cargo run --release --` becomes the binary, and the ports of the examples
//!   (`127.0.0.1:50051`, `127.0.0.1:9090`) the server's. Blocks that need what a laptop
//!   lacks (a cluster, a pooler, a key file) are fenced ```` ```shell ```` and only shown.
//!
//! The blocks call `grpcurl`, `jq`, `curl` and `python3`; `scripts/test` installs
//! grpcurl beside PyJWT, and jq and curl from Debian's packages.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use clap::CommandFactory;

// Shared with the load bench, which also reads the server's pid.
#[allow(dead_code)]
#[path = "support/spawned.rs"]
mod spawned;
use spawned::Server;

/// The pages whose `sh` blocks run, in this order (the README's map, the walk-through first).
const PAGES: &[&str] = &[
    "README.md",
    "docs/model.md",
    "docs/tokens.md",
    "docs/proxies.md",
    "docs/authzen.md",
    "docs/api.md",
    "docs/cli.md",
    "docs/operating.md",
    "docs/postgres.md",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The blocks fenced `lang` in `text`, with the line each starts on.
fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) if info.trim() == lang => open = Some((n + 1, String::new())),
            (None, Some(_)) => open = Some((0, String::new())),
            (Some(_), Some("")) => {
                let (start, body) = open.take().expect("open");
                if start > 0 {
                    out.push((start, body));
                }
            }
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// One flag as the table shows it.
fn row(arg: &clap::Arg) -> Option<String> {
    let long = arg.get_long().map(|l| format!("`--{l}`"));
    let name = match (long, arg.is_positional()) {
        (Some(long), _) => long,
        (None, true) => format!("`<{}>`", arg.get_id().as_str().to_uppercase()),
        (None, false) => return None,
    };
    if arg.is_hide_set() || matches!(arg.get_id().as_str(), "help" | "version") {
        return None;
    }
    let env = arg.get_env().map_or("".into(), |e| format!("`{}`", e.to_string_lossy()));
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
        .collect();
    let default = match (defaults.is_empty(), arg.get_action().takes_values()) {
        (false, _) => format!("`{}`", defaults.join(",")),
        (true, false) => "off".into(),
        (true, true) => String::new(),
    };
    let help = arg.get_long_help().or(arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
    let help = help.split("\n\n").next().unwrap_or_default().replace('\n', " ").replace('|', "\\|");
    Some(format!("| {name} | {env} | {default} | {help} |"))
}

/// The configuration reference, from the clap definitions.
fn configuration() -> String {
    let cli = rolecheck::config::Cli::command();
    let mut out = String::from(
        "# Configuration\n\n<!-- Generated from src/config.rs by tests/docs.rs; \
         UPDATE_DOCS=1 cargo nextest run --test docs rewrites it. -->\n\n\
         Every flag has an environment variable. Logs go to stderr; `RUST_LOG` filters them \
         (default `info`; `rolecheck=debug` adds a span per call).\n",
    );
    let mut section = |title: String, about: String, command: &clap::Command| {
        out += &format!(
            "\n## {title}\n\n{about}\n\n| flag | variable | default | meaning |\n| --- | --- | --- | --- |\n"
        );
        for arg in command.get_arguments() {
            if let Some(row) = row(arg) {
                out += &row;
                out.push('\n');
            }
        }
    };
    for command in cli.get_subcommands() {
        let about = command.get_about().map(|a| a.to_string()).unwrap_or_default();
        if command.get_subcommands().next().is_none() {
            section(format!("`rolecheck {}`", command.get_name()), about, command);
            continue;
        }
        for sub in command.get_subcommands() {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            section(format!("`rolecheck {} {}`", command.get_name(), sub.get_name()), about, sub);
        }
    }
    out
}

#[test]
fn the_configuration_reference_is_generated_from_the_flags() {
    let path = root().join("docs/configuration.md");
    let generated = configuration();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).expect("write docs/configuration.md");
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == generated,
        "docs/configuration.md differs from the flags in src/config.rs: run \
         `UPDATE_DOCS=1 cargo nextest run --test docs` and commit the result"
    );
}

fn serve(dir: &Path, policy: &Path) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolecheck"));
    command
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--authz-policy")
        .arg(policy)
        .env("RUST_LOG", "info")
        .env_remove("ROLECHECK_DATABASE_URL");
    spawned::spawn(command)
}

/// Where grpcurl is: beside the test's Python (`scripts/test`), else on the PATH.
fn path_with_tools() -> String {
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Some(python) = std::env::var_os("ROLECHECK_TEST_PYTHON") {
        let bin = Path::new(&python).parent().expect("venv bin").display().to_string();
        path = format!("{bin}:{path}");
    }
    path
}

#[test]
fn every_sh_block_in_the_readme_and_docs_runs() {
    let path = path_with_tools();
    for tool in ["grpcurl", "jq", "curl", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .env("PATH", &path)
            .output()
            .is_ok_and(|out| out.status.success());
        assert!(
            found,
            "{tool} is not installed: run the suite with scripts/test, which installs it"
        );
    }
    let dir = tempfile::tempdir().expect("dir");
    let proxies = std::fs::read_to_string(root().join("docs/proxies.md")).expect("docs/proxies.md");
    let (_, policy) =
        blocks(&proxies, "toml").into_iter().next().expect("a policy in docs/proxies.md");
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy).expect("policy.toml");
    let server = serve(dir.path(), &policy_path);
    let bin = env!("CARGO_BIN_EXE_rolecheck");
    let mut ran = 0;
    for page in PAGES {
        let text = std::fs::read_to_string(root().join(page)).expect("page");
        for (line, block) in blocks(&text, "sh") {
            let script = block
                .replace("cargo run --release --", bin)
                .replace("127.0.0.1:50051", &server.grpc)
                .replace("127.0.0.1:9090", &server.http);
            // coreutils' timeout: a block that hangs (a server started in the foreground)
            // fails in a minute instead of holding the suite.
            let out = Command::new("timeout")
                .args(["60", "bash", "-c", &format!("set -euo pipefail\n{script}")])
                .current_dir(dir.path())
                .env("PATH", &path)
                .env("ROLECHECK_SERVER", format!("http://{}", server.grpc))
                .stdin(Stdio::null())
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "{page}:{line}: the block failed ({}):\n{script}\n--- stdout\n{}\n--- stderr\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} blocks ran: were they fenced `sh`?");
}
