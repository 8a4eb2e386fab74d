//! The command line as a client of a running server: which server, with which key, and
//! each command's arguments (`rolecheck model|tenants|grant|revoke|set|check|roles|
//! members|token|changes|import|export`).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// `rolecheck model …`.
#[derive(Subcommand, Debug, Clone)]
pub enum ModelCommand {
    /// Check a model file as SetModel would: every problem with its line and place, one
    /// per line; exits 1 when there is one. Sets nothing.
    Check {
        /// The model file (TOML).
        file: PathBuf,
    },
    /// Check a model file, then set it on the server (SetModel, scope `write`): every
    /// tenant is judged by it from the revision printed. Exits 1 when the file has a
    /// problem or the server refuses.
    Apply {
        /// The model file (TOML); an empty file removes the model.
        file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print the server's model file (GetModel, scope `check`) and, on stderr, the
    /// revision that set it.
    Show {
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Which rolecheck server a command talks to, and with which key.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server: `http://host:port`, `https://host:port` or `unix:/path`.
    #[arg(long, env = "ROLECHECK_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// A file holding the API key to present.
    #[arg(long, env = "ROLECHECK_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// CA certificate(s) for an `https` server (else the system roots).
    #[arg(long)]
    pub server_ca: Option<PathBuf>,
    /// A client certificate for mTLS (with --server-cert-key).
    #[arg(long, requires = "server_cert_key")]
    pub server_cert: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, requires = "server_cert")]
    pub server_cert_key: Option<PathBuf>,
}

/// How a command prints what it got.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Output {
    /// Columns for people: aligned with a header on a terminal, tab-separated otherwise.
    #[default]
    Table,
    /// One JSON document (one per line for `changes --follow`).
    Json,
}

/// The server, the key, and how to print.
#[derive(Args, Debug, Clone)]
pub struct Client {
    #[command(flatten)]
    pub server: ServerArgs,
    /// How to print the answer.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The tenant a command is about: `--tenant`, else the application tenant.
#[derive(Args, Debug, Clone)]
pub struct TenantArg {
    /// The tenant; without it, the application tenant (application-wide roles).
    #[arg(long, short = 't', default_value = "")]
    pub tenant: String,
}

/// `rolecheck tenants …`.
#[derive(Subcommand, Debug, Clone)]
pub enum TenantsCommand {
    /// Create a tenant (scope `write`).
    Create {
        /// The tenant's id.
        id: String,
        /// Its display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        client: Client,
    },
    /// Print a tenant (scope `check`).
    Get {
        /// The tenant's id.
        id: String,
        #[command(flatten)]
        client: Client,
    },
    /// Print every tenant, every page (scope `check`).
    List {
        #[command(flatten)]
        client: Client,
    },
    /// Delete a tenant and every membership in it (scope `write`).
    Delete {
        /// The tenant's id.
        id: String,
        #[command(flatten)]
        client: Client,
    },
}

/// `rolecheck grant USER ROLE... [--tenant T] [--expires-at RFC3339]`.
#[derive(Args, Debug, Clone)]
pub struct GrantArgs {
    /// The user.
    pub user: String,
    /// The roles to give (at least one).
    #[arg(required = true)]
    pub roles: Vec<String>,
    #[command(flatten)]
    pub tenant: TenantArg,
    /// When the roles expire (RFC 3339, e.g. 2027-01-31T00:00:00Z); never without it.
    #[arg(long)]
    pub expires_at: Option<String>,
    #[command(flatten)]
    pub client: Client,
}

/// `rolecheck revoke USER [ROLE...] [--tenant T]`.
#[derive(Args, Debug, Clone)]
pub struct RevokeArgs {
    /// The user.
    pub user: String,
    /// The roles to take away; none: every role the user holds in the tenant.
    pub roles: Vec<String>,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub client: Client,
}

/// `rolecheck set USER [ROLE...] [--tenant T] [--expires-at RFC3339]`.
#[derive(Args, Debug, Clone)]
pub struct SetArgs {
    /// The user.
    pub user: String,
    /// The user's roles in the tenant from now on; none removes the user from it.
    pub roles: Vec<String>,
    #[command(flatten)]
    pub tenant: TenantArg,
    /// When the roles expire (RFC 3339); never without it.
    #[arg(long)]
    pub expires_at: Option<String>,
    #[command(flatten)]
    pub client: Client,
}

/// `rolecheck check USER ROLE [--tenant T] [--permission]`.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// The user.
    pub user: String,
    /// The role (or, with --permission, the permission) asked about.
    pub role: String,
    #[command(flatten)]
    pub tenant: TenantArg,
    /// Ask a permission the model defines instead of a role.
    #[arg(long)]
    pub permission: bool,
    #[command(flatten)]
    pub client: Client,
}

/// `rolecheck roles USER`.
#[derive(Args, Debug, Clone)]
pub struct RolesArgs {
    /// The user.
    pub user: String,
    /// Add the roles held by implication and the permissions (under the model).
    #[arg(long)]
    pub expand: bool,
    #[command(flatten)]
    pub client: Client,
}

/// `rolecheck members TENANT`.
#[derive(Args, Debug, Clone)]
pub struct MembersArgs {
    /// The tenant; "" for the application tenant.
    pub tenant: String,
    #[command(flatten)]
    pub client: Client,
}

/// `rolecheck token …`.
#[derive(Subcommand, Debug, Clone)]
pub enum TokenCommand {
    /// Mint a signed access token for a user (Issue, scope `issue`); prints the token.
    Issue {
        /// The user.
        user: String,
        /// Lifetime, e.g. 5m or 1h (default: the server's --token-ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Only these tenants in the token (repeatable; "" for the application tenant).
        #[arg(long = "tenant", short = 't')]
        tenants: Vec<String>,
        #[command(flatten)]
        client: Client,
    },
}

/// `rolecheck changes [--follow]`.
#[derive(Args, Debug, Clone)]
pub struct ChangesArgs {
    /// Only changes after this revision.
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Only changes in this tenant (not with --follow).
    #[arg(long, short = 't')]
    pub tenant: Option<String>,
    /// Only changes to this user (not with --follow).
    #[arg(long)]
    pub user: Option<String>,
    /// Keep printing every change as it commits, until interrupted (Watch: scope `audit`
    /// or `follow`).
    #[arg(long, conflicts_with_all = ["tenant", "user"])]
    pub follow: bool,
    #[command(flatten)]
    pub client: Client,
}

/// The file format of `import` and `export`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// JSON Lines: one user per line, in the token's shape:
    /// `{"user_id": "1", "authorization": {"acme": {"roles": ["admin"]}}}`.
    Jsonl,
    /// CSV: `user_id,tenant_id,role[,expires_at]`, one membership per row (an empty
    /// tenant_id is the application tenant; a header row is optional).
    Csv,
}

/// `rolecheck import FILE`.
#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// The file to import; `-` reads standard input.
    pub file: PathBuf,
    /// The file's format; by default from its name (`.csv` is CSV, anything else JSON
    /// Lines).
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// Set each listed user's roles in each listed tenant to exactly the file's (else the
    /// file's roles are added to what the user holds).
    #[arg(long)]
    pub replace: bool,
    /// Create the tenants the file names that do not exist (else a user naming one is
    /// skipped and reported).
    #[arg(long)]
    pub create_tenants: bool,
    /// Check the whole file first (and that its tenants exist) and import nothing unless
    /// every line is good.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub client: Client,
}

/// `rolecheck export [FILE]`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// Where to write; standard output without it.
    pub file: Option<PathBuf>,
    /// The format; by default from the file's name (`.csv` is CSV, anything else JSON
    /// Lines).
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// The admin commands.
#[derive(Subcommand, Debug, Clone)]
pub enum Admin {
    /// Create, read, list and delete a server's tenants.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Give a user roles in a tenant (Grant); exits 0 with the revision it committed at.
    Grant(GrantArgs),
    /// Take roles from a user in a tenant, or every role with none named (Revoke).
    Revoke(RevokeArgs),
    /// Set a user's roles in a tenant to exactly these; none removes the user (SetRoles).
    Set(SetArgs),
    /// Does the user hold the role (or have the permission) in the tenant: exits 0 when
    /// allowed, 1 when denied.
    Check(CheckArgs),
    /// A user's authorization object: their roles in every tenant (GetAuthorization).
    Roles(RolesArgs),
    /// The members of a tenant and their roles, every page (ListMembers).
    Members(MembersArgs),
    /// Mint access tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit trail (ListChanges); with --follow, every change as it commits (Watch).
    Changes(ChangesArgs),
    /// Import memberships from a file (Import, scope `write`): whole users in batches,
    /// each at one revision; bad lines are reported and skipped. Safe to run again.
    Import(ImportArgs),
    /// Export every membership at one revision, printed on stderr (Export, scope
    /// `audit`), in the format `import` reads.
    Export(ExportArgs),
}
