//! Configuration: one clap struct. Every flag has a `ROLECHECK_*` environment variable;
//! the doc comments are the `--help` text.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::listen::ListenAddr;

mod client;
pub use client::*;

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| format!("{s:?} is not octal"))
}

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
    Migrate(MigrateArgs),
    /// Check what `serve` would start with (the same flags and environment): database
    /// reachable and migrated, key and policy files, TLS material, ports free. One line
    /// per check; exits 1 when one fails. Serves nothing.
    Doctor(Config),
    /// Work with a model file (role hierarchy and permissions): check it offline, apply
    /// it to a server, show a server's.
    #[command(subcommand)]
    Model(ModelCommand),
    /// The admin commands, clients of a running server (`tenants`, `grant`, `check`, …).
    #[command(flatten)]
    Admin(Admin),
    /// Print a shell completion script: `rolecheck completions bash >
    /// /etc/bash_completion.d/rolecheck` (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// What to run.
#[derive(Debug)]
pub enum Run {
    /// `rolecheck serve`.
    Serve(Config),
    /// `rolecheck migrate`.
    Migrate(MigrateArgs),
    /// `rolecheck doctor`.
    Doctor(Config),
    /// `rolecheck model …`.
    Model(ModelCommand),
    /// The admin commands, clients of a running server.
    Admin(Admin),
    /// `rolecheck completions SHELL`.
    Completions(clap_complete::Shell),
}

impl Cli {
    /// The command to run and its settings.
    pub fn into_run(self) -> Run {
        match self.command {
            None => Run::Serve(self.config),
            Some(Command::Serve(config)) => Run::Serve(config),
            Some(Command::Migrate(args)) => Run::Migrate(args),
            Some(Command::Doctor(config)) => Run::Doctor(config),
            Some(Command::Model(command)) => Run::Model(command),
            Some(Command::Admin(command)) => Run::Admin(command),
            Some(Command::Completions { shell }) => Run::Completions(shell),
        }
    }
}

impl Run {
    /// The log format the command asked for.
    pub fn log_format(&self) -> &str {
        match self {
            Run::Serve(config) | Run::Doctor(config) => &config.log_format,
            Run::Migrate(args) => &args.log_format,
            Run::Model(_) | Run::Admin(_) | Run::Completions(_) => "text",
        }
    }
}

/// Settings of `rolecheck migrate`: only what reaches the store.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Database URL: `postgres://…` for Postgres, `sqlite:PATH` for a SQLite file.
    /// Default: the embedded SQLite file `rolecheck.db` in --data-dir.
    #[arg(long, env = "ROLECHECK_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// As for `serve`: `transaction` when --database-url is a transaction-mode pooler.
    #[arg(long, env = "ROLECHECK_DATABASE_POOL_MODE", default_value = "direct", value_parser = ["direct", "transaction"])]
    pub database_pool_mode: String,

    /// As for `serve`: a URL straight to Postgres; migrations run through it.
    #[arg(long, env = "ROLECHECK_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<DatabaseUrl>,

    /// Postgres: create the database --database-url names when it does not exist (as
    /// its user, connected to the `postgres` database), then migrate it.
    #[arg(long, env = "ROLECHECK_CREATE_DATABASE")]
    pub create_database: bool,

    /// Directory for the embedded store's files.
    #[arg(long, env = "ROLECHECK_DATA_DIR", default_value = "./rolecheck-data")]
    pub data_dir: PathBuf,

    /// The application's own id: the tenant holding application-wide roles.
    #[arg(long, env = "ROLECHECK_APPLICATION_ID", default_value = "app")]
    pub application_id: String,

    /// How long to keep retrying an unreachable database before giving up.
    #[arg(long, env = "ROLECHECK_DB_STARTUP_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub db_startup_wait: Duration,

    /// Log format: `text` or `json`.
    #[arg(long, env = "ROLECHECK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl MigrateArgs {
    /// The server settings these stand for (every other setting at its default).
    pub fn config(&self) -> Config {
        let mut config = Config::defaults();
        config.database_url = self.database_url.clone();
        config.database_pool_mode = self.database_pool_mode.clone();
        config.listen_database_url = self.listen_database_url.clone();
        config.data_dir = self.data_dir.clone();
        config.application_id = self.application_id.clone();
        config.db_startup_wait = self.db_startup_wait;
        config.log_format = self.log_format.clone();
        config
    }
}

/// Server settings.
#[derive(Args, Debug, Clone)]
pub struct Config {
    /// gRPC listen address: `host:port`, or `unix:/path/to.sock` for a sidecar.
    #[arg(long, env = "ROLECHECK_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: ListenAddr,

    /// Permissions of the unix socket file (octal), when --listen is `unix:`.
    #[arg(long, env = "ROLECHECK_UNIX_SOCKET_MODE", default_value = "660", value_parser = parse_octal)]
    pub unix_socket_mode: u32,

    /// TOML file of API keys (names, SHA-256 hashes of the secrets, scopes). Reloaded on
    /// SIGHUP and when it changes. Without it every caller is trusted, which is allowed
    /// only on loopback or a unix socket.
    #[arg(long, env = "ROLECHECK_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// TOML policy for proxy authorization: serves Envoy's
    /// `envoy.service.auth.v3.Authorization/Check` on the gRPC listener and forward-auth at
    /// `/authz` on the HTTP listener. Refused at start when invalid; reloaded on SIGHUP and
    /// when it changes (a reload that fails keeps the policy in force).
    #[arg(long, env = "ROLECHECK_AUTHZ_POLICY")]
    pub authz_policy: Option<PathBuf>,

    /// Follow this rolecheck instead of opening a database (`http://host:port`,
    /// `https://host:port` or `unix:/path`): reads from this process's cache, kept coherent
    /// by the upstream's Watch; writes, lists and Issue relayed. Refused together with
    /// --database-url or --signing-key: a follower holds neither.
    #[arg(long, env = "ROLECHECK_UPSTREAM")]
    pub upstream: Option<String>,

    /// A file holding the bearer secret presented upstream (a key with the `follow` scope,
    /// plus the scopes of the calls this follower relays).
    #[arg(long, env = "ROLECHECK_UPSTREAM_KEY_FILE")]
    pub upstream_key_file: Option<PathBuf>,

    /// CA certificate(s) that verify an `https` upstream (default: the system roots).
    #[arg(long, env = "ROLECHECK_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to the upstream, with --upstream-cert-key.
    #[arg(long, env = "ROLECHECK_UPSTREAM_CERT", requires = "upstream_cert_key")]
    pub upstream_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, env = "ROLECHECK_UPSTREAM_CERT_KEY", requires = "upstream_cert")]
    pub upstream_cert_key: Option<PathBuf>,

    /// A follower, before it reports ready, loads up to this many of the users its
    /// upstream answered about recently (`ListActiveUsers`) into its cache; 0 starts cold.
    /// Ignored without --upstream.
    #[arg(long, env = "ROLECHECK_WARM_USERS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub warm_users: u32,

    /// The longest a follower's warm start may delay its readiness; what is loaded by
    /// then stays, and the follower reports ready.
    #[arg(long, env = "ROLECHECK_WARM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub warm_timeout: Duration,

    /// Declare the listeners private to the proxy: forward-auth and ext_authz answer
    /// without a key (for a mesh whose proxy cannot send one, like Istio's
    /// `envoyExtAuthzGrpc`). Accepted only when --listen is loopback or a unix socket and
    /// --http-listen is loopback: only what runs beside rolecheck can reach them. Decided
    /// at start. (`--authz-envoy-without-key` is its older name.)
    #[arg(long, env = "ROLECHECK_AUTHZ_PRIVATE_LISTENER", alias = "authz-envoy-without-key")]
    pub authz_private_listener: bool,

    /// PEM certificate chain: serve gRPC and HTTP over TLS (with --tls-key). Re-read
    /// when the file changes.
    #[arg(long, env = "ROLECHECK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "ROLECHECK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: gRPC and HTTP clients must present a certificate it signed
    /// (mTLS). The certificate's subject is the caller when no bearer key is sent.
    #[arg(long, env = "ROLECHECK_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve without API keys on a non-loopback address (every caller is trusted).
    #[arg(long, env = "ROLECHECK_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Requests per second each caller may make (0: unlimited); past it,
    /// RESOURCE_EXHAUSTED on gRPC and 429 on AuthZEN.
    #[arg(long, env = "ROLECHECK_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,

    /// Longest a call may take to produce its response (a Watch stream, once started,
    /// is not cut).
    #[arg(long, env = "ROLECHECK_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// gRPC listener: how often an idle connection is probed (an HTTP/2 PING, and TCP
    /// keepalive at the same period), so a client that vanished without closing its
    /// connection is dropped after this plus --keepalive-timeout.
    #[arg(long, env = "ROLECHECK_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// gRPC listener: how long an HTTP/2 PING may go unanswered before the connection is
    /// closed.
    #[arg(long, env = "ROLECHECK_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Most Watch streams open at once on this server; past it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "ROLECHECK_MAX_WATCH_STREAMS", default_value_t = 1024)]
    pub max_watch_streams: usize,

    /// Most Watch streams one caller (key name, certificate identity) may have open.
    #[arg(long, env = "ROLECHECK_MAX_WATCH_STREAMS_PER_CALLER", default_value_t = 256)]
    pub max_watch_streams_per_caller: usize,

    /// Most concurrent streams (calls) one HTTP/2 connection may have open.
    #[arg(long, env = "ROLECHECK_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// HTTP listen address: `/.well-known/jwks.json`, `/healthz`, `/readyz`, `/metrics`,
    /// forward-auth at `/authz` and AuthZEN at `/access/v1/*` (a loopback address answers
    /// AuthZEN without keys; any other needs --api-keys-file).
    #[arg(long, env = "ROLECHECK_HTTP_LISTEN", default_value = "127.0.0.1:9090")]
    pub http_listen: SocketAddr,

    /// Database URL: `postgres://…` for Postgres, `sqlite:PATH` for a SQLite file.
    /// Default: the embedded SQLite file `rolecheck.db` in --data-dir.
    #[arg(long, env = "ROLECHECK_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// Postgres: how --database-url reaches it. `direct`: Postgres itself, or a pooler in
    /// session mode. `transaction`: a pooler in transaction mode (PgBouncer's
    /// `pool_mode = transaction`): every statement runs inside a transaction of its own and
    /// keeps no server-side state between transactions, and the change listener uses
    /// --listen-database-url.
    #[arg(long, env = "ROLECHECK_DATABASE_POOL_MODE", default_value = "direct", value_parser = ["direct", "transaction"])]
    pub database_pool_mode: String,

    /// Postgres: a URL straight to Postgres (not through a transaction-mode pooler) for
    /// what needs a session of its own: the change listener (`LISTEN`), its heartbeat and
    /// migrations. Default: --database-url. Required with --database-pool-mode
    /// transaction.
    #[arg(long, env = "ROLECHECK_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<DatabaseUrl>,

    /// Postgres: a hot standby of --database-url's database, straight (no pooler). A
    /// cache miss of a current cache is read there when the standby has replayed the
    /// revision the cache has applied, and from the primary otherwise; nothing else is.
    #[arg(long, env = "ROLECHECK_READ_DATABASE_URL", hide_env_values = true)]
    pub read_database_url: Option<DatabaseUrl>,

    /// Directory for the embedded store's files.
    #[arg(long, env = "ROLECHECK_DATA_DIR", default_value = "./rolecheck-data")]
    pub data_dir: PathBuf,

    /// The application's own id: the tenant holding application-wide roles, meant by an
    /// empty tenant_id.
    #[arg(long, env = "ROLECHECK_APPLICATION_ID", default_value = "app")]
    pub application_id: String,

    /// The `iss` claim of issued tokens.
    #[arg(long, env = "ROLECHECK_ISSUER", default_value = "rolecheck")]
    pub issuer: String,

    /// The `aud` claim of issued tokens. Default: the application id.
    #[arg(long, env = "ROLECHECK_AUDIENCE")]
    pub audience: Option<String>,

    /// Token lifetime when `Issue` asks for none.
    #[arg(long, env = "ROLECHECK_TOKEN_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,

    /// Longest token lifetime; longer requests are capped to it.
    #[arg(long, env = "ROLECHECK_MAX_TOKEN_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_token_ttl: Duration,

    /// Largest token `Issue` returns; larger is FAILED_PRECONDITION (narrow with tenant_ids).
    #[arg(long, env = "ROLECHECK_MAX_TOKEN_BYTES", default_value_t = 8192)]
    pub max_token_bytes: usize,

    /// PEM private key that signs tokens (RSA 2048+ → RS256, P-256 → ES256, Ed25519 →
    /// EdDSA). Repeatable: the first signs, all are published. Without one, the embedded
    /// store generates `signing-key.pem` in --data-dir; on Postgres, Issue is refused.
    #[arg(long, env = "ROLECHECK_SIGNING_KEY", value_delimiter = ',')]
    pub signing_key: Vec<PathBuf>,

    /// Maximum number of users whose roles are cached; 0 turns the cache off.
    #[arg(long, env = "ROLECHECK_CACHE_CAPACITY", default_value_t = 1_000_000)]
    pub cache_capacity: u64,

    /// Longest a cached answer is kept (a safety net; writes invalidate at once).
    #[arg(long, env = "ROLECHECK_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// How long a read whose `min_revision` this replica has not applied yet waits for the
    /// change feed before it reads the store instead.
    #[arg(long, env = "ROLECHECK_MIN_REVISION_WAIT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub min_revision_wait: Duration,

    /// Postgres: the cache is trusted only this long after the change listener last
    /// proved it is hearing every commit (it checks every 100ms). Past it, reads go to
    /// the store.
    #[arg(long, env = "ROLECHECK_COHERENCE_LEASE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub coherence_lease: Duration,

    /// How long Watch history is kept; resuming from before it is OUT_OF_RANGE.
    #[arg(long, env = "ROLECHECK_HISTORY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub history_retention: Duration,

    /// Maximum database connections.
    #[arg(long, env = "ROLECHECK_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// How long a call waits for a database connection before answering UNAVAILABLE.
    #[arg(long, env = "ROLECHECK_DB_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,

    /// Longest one database call may take (enforced by the client, and by Postgres as
    /// `statement_timeout` and `idle_in_transaction_session_timeout`); past it the call is
    /// UNAVAILABLE. Must be shorter than --request-timeout, so a caller hears UNAVAILABLE
    /// rather than a cancelled call when the network to the database goes silent.
    #[arg(long, env = "ROLECHECK_DB_QUERY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub db_query_timeout: Duration,

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

    /// After SIGTERM, how long to report not-ready (readyz 503, gRPC health NOT_SERVING)
    /// while still serving, so load balancers stop sending before connections close.
    #[arg(long, env = "ROLECHECK_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// Log format: `text` or `json`.
    #[arg(long, env = "ROLECHECK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Fault injection for tests: every write waits this long right after its COMMIT,
    /// before it is announced and answered. Never set it in production.
    #[arg(long, env = "ROLECHECK_FAULT_DELAY_AFTER_COMMIT", hide = true, value_parser = humantime::parse_duration)]
    pub fault_delay_after_commit: Option<Duration>,

    /// Fault injection for tests: the cache applies each change from the store's feed
    /// this long late (it lags the feed, as a busy process's can). Never set it in
    /// production.
    #[arg(long, env = "ROLECHECK_FAULT_DELAY_FEED", hide = true, value_parser = humantime::parse_duration)]
    pub fault_delay_feed: Option<Duration>,

    /// Write this process's id to this file once serving (and remove it at exit), so
    /// `kill -HUP "$(cat FILE)"` signals this one process.
    #[arg(long, env = "ROLECHECK_PID_FILE")]
    pub pid_file: Option<PathBuf>,

    /// Do not apply migrations at start (leave them to `rolecheck migrate`).
    #[arg(long, env = "ROLECHECK_NO_MIGRATE")]
    pub no_migrate: bool,
}

impl Config {
    /// Whether the store is the embedded SQLite file (not Postgres).
    pub fn embedded_store(&self) -> bool {
        self.database_url.as_ref().is_none_or(|url| url.0.starts_with("sqlite:"))
    }

    /// Refuses settings that contradict each other, saying which and why.
    pub fn validate(&self) -> crate::error::Result<()> {
        use crate::error::Error;
        if self.db_query_timeout >= self.request_timeout {
            return Err(Error::FailedPrecondition(format!(
                "--db-query-timeout ({:?}) must be shorter than --request-timeout ({:?}), so a \
                 call whose database does not answer is UNAVAILABLE rather than cancelled",
                self.db_query_timeout, self.request_timeout
            )));
        }
        if self.listen.is_unix() && self.tls_cert.is_some() {
            return Err(Error::FailedPrecondition(
                "--tls-cert/--tls-key/--tls-client-ca apply to a TCP listener; a unix socket \
                 (--listen unix:…) is protected by its file mode instead: drop the TLS flags \
                 or listen on host:port"
                    .into(),
            ));
        }
        let postgres = self.database_url.as_ref().is_some_and(|url| !url.0.starts_with("sqlite:"));
        if self.read_database_url.is_some() && !postgres {
            return Err(Error::FailedPrecondition(
                "--read-database-url names a standby of the Postgres --database-url names: \
                 set --database-url to that Postgres (postgres://…) too, or drop \
                 --read-database-url"
                    .into(),
            ));
        }
        if self.listen_database_url.is_some() && !postgres {
            return Err(Error::FailedPrecondition(
                "--listen-database-url is the change listener's way to a Postgres that \
                 --database-url reaches through a pooler: set --database-url to that \
                 Postgres (postgres://…) too, or drop --listen-database-url"
                    .into(),
            ));
        }
        if self.database_pool_mode == "transaction" && self.listen_database_url.is_none() {
            return Err(Error::FailedPrecondition(
                "--database-pool-mode transaction needs --listen-database-url: LISTEN does \
                 not survive a transaction-mode pooler, so the change listener (and \
                 migrations) need a URL straight to Postgres"
                    .into(),
            ));
        }
        if self.upstream.is_some() && (self.database_url.is_some() || !self.signing_key.is_empty())
        {
            return Err(Error::FailedPrecondition(
                "--upstream makes this a follower, which opens no database and holds no private \
                 key: drop --database-url and --signing-key (the upstream has them)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Without --api-keys-file: what to warn about when serving open is allowed (only on
    /// loopback, a unix socket, or with --insecure-no-auth), or the refusal.
    pub fn without_keys(&self) -> crate::error::Result<Option<&'static str>> {
        if self.api_keys_file.is_some() {
            Ok(None)
        } else if self.listen.is_local_only() {
            Ok(Some("no API keys configured: every caller on this machine is trusted"))
        } else if self.insecure_no_auth {
            Ok(Some("no API keys and --insecure-no-auth: every caller is trusted"))
        } else {
            Err(crate::error::Error::FailedPrecondition(format!(
                "refusing to serve {} without API keys: set --api-keys-file, listen on \
                 loopback or a unix socket, or pass --insecure-no-auth",
                self.listen
            )))
        }
    }

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
