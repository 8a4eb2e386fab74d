//! Configuration: one clap struct. Every flag has a `ROLECHECK_*` environment variable;
//! the doc comments are the `--help` text.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// rolecheck: a gRPC service that answers "does user U have role R in tenant T".
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for `serve` when no subcommand is given.
    #[command(flatten)]
    pub config: Config,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the gRPC API (the default).
    Serve(Config),
    /// Apply the database migrations and exit.
    Migrate(Config),
}

impl Cli {
    /// The command to run and its settings.
    pub fn into_command(self) -> (bool, Config) {
        match self.command {
            None => (true, self.config),
            Some(Command::Serve(config)) => (true, config),
            Some(Command::Migrate(config)) => (false, config),
        }
    }
}

/// Server settings.
#[derive(Args, Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "ROLECHECK_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Database URL: `postgres://…` for Postgres, `sqlite:PATH` for a SQLite file.
    /// Default: the embedded SQLite file `rolecheck.db` in --data-dir.
    #[arg(long, env = "ROLECHECK_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// Directory for the embedded store's files.
    #[arg(long, env = "ROLECHECK_DATA_DIR", default_value = "./rolecheck-data")]
    pub data_dir: PathBuf,

    /// The application's own id: the tenant holding application-wide roles, meant by an
    /// empty tenant_id.
    #[arg(long, env = "ROLECHECK_APPLICATION_ID", default_value = "app")]
    pub application_id: String,

    /// Maximum number of users whose roles are cached; 0 turns the cache off.
    #[arg(long, env = "ROLECHECK_CACHE_CAPACITY", default_value_t = 1_000_000)]
    pub cache_capacity: u64,

    /// Longest a cached answer is kept (a safety net; writes invalidate at once).
    #[arg(long, env = "ROLECHECK_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// Maximum database connections.
    #[arg(long, env = "ROLECHECK_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// How long a call waits for a database connection before answering UNAVAILABLE.
    #[arg(long, env = "ROLECHECK_DB_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,

    /// At start-up, how long to keep retrying an unreachable database before giving up.
    #[arg(long, env = "ROLECHECK_DB_STARTUP_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub db_startup_wait: Duration,

    /// Largest request message accepted, in bytes.
    #[arg(long, env = "ROLECHECK_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// After SIGTERM, how long in-flight calls may take before remaining connections are
    /// dropped. Keep it below the orchestrator's kill deadline.
    #[arg(long, env = "ROLECHECK_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Do not apply migrations at start (leave them to `rolecheck migrate`).
    #[arg(long, env = "ROLECHECK_NO_MIGRATE")]
    pub no_migrate: bool,
}

impl Config {
    /// Defaults as `rolecheck serve` with no flags would use, for tests and embedding.
    pub fn defaults() -> Self {
        Cli::parse_from(["rolecheck"]).config
    }
}

/// A database URL. It may carry a password, so its `Debug` output is redacted.
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.0.split(':').next().unwrap_or_default();
        write!(f, "DatabaseUrl({scheme}:…)")
    }
}
