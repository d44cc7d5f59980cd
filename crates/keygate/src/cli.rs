//! The command line, as SPEC.md lists it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// keygate: a credential vault and HTTPS gateway for AI agents.
///
/// Agents keep placeholder keys and send traffic through keygate
/// (HTTPS_PROXY); keygate injects the real credential for the destination.
/// Start with `keygate serve`, add a secret, create an agent, then run the
/// agent with `keygate run --token TOKEN -- CMD`.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about, long_about = None)]
pub struct Cli {
    /// Data directory (SQLite database, CA, master key, admin token).
    /// Default: $XDG_DATA_HOME/keygate, else ~/.local/share/keygate.
    #[arg(long, global = true, env = "KEYGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Admin API URL used by management commands.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:10254"
    )]
    pub admin_url: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (:10255) and the admin API (:10254) in one process.
    Serve(ServeArgs),
    /// Manage secrets (values are write-only).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Manage agents, their tokens and grants.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Run a command with the proxy, the CA bundle and their variables set.
    Run(RunArgs),
    /// Show the audit log, or verify its hash chain (`audit verify`).
    Audit(AuditArgs),
    /// The local CA.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Dashboard administration (`admin set-password`).
    #[command(subcommand)]
    Admin(AdminCmd),
    /// The master key that wraps every secret's data key (`key rotate`).
    #[command(subcommand)]
    Key(KeyCmd),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Proxy listen address (agents connect here).
    #[arg(long, env = "KEYGATE_PROXY_LISTEN", default_value = "127.0.0.1:10255")]
    pub proxy_listen: String,
    /// Admin API listen address.
    #[arg(long, env = "KEYGATE_ADMIN_LISTEN", default_value = "127.0.0.1:10254")]
    pub admin_listen: String,
    /// Database URL: sqlite://PATH or postgres://… (default: SQLite in the data dir).
    #[arg(long, env = "KEYGATE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Extra trusted root for upstream TLS (PEM file; repeatable). Web PKI
    /// roots stay trusted and verification is never switched off.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Dial ADDR:PORT whenever the destination is HOST:PORT (like curl's
    /// --connect-to); matching and certificate checks still use HOST.
    #[arg(long = "resolve", value_name = "HOST:PORT=ADDR:PORT")]
    pub resolve: Vec<String>,
    /// Exempt a CIDR from the egress guard (repeatable); keygate's own
    /// listeners stay blocked.
    #[arg(long = "allow-net", value_name = "CIDR")]
    pub allow_net: Vec<String>,
    /// Log format.
    #[arg(long, env = "KEYGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Mark dashboard session cookies `Secure`: set this when the admin
    /// listener is reached through a TLS-terminating reverse proxy.
    #[arg(long, env = "KEYGATE_ADMIN_SECURE_COOKIES")]
    pub admin_secure_cookies: bool,
    /// Seconds an agent may take to send a request head (slow clients are
    /// dropped); also how long an agent connection may stay silent before
    /// TCP keepalive probes it (every --tls-handshake-timeout seconds; an
    /// agent that misses three is dropped).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub header_read_timeout: u64,
    /// Seconds an agent may take for the TLS handshake inside a CONNECT
    /// tunnel (silent clients are dropped).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub tls_handshake_timeout: u64,
    /// Seconds allowed for each of the upstream TCP connect and TLS
    /// handshake.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Seconds allowed for the upstream's response headers (long LLM
    /// completions can take minutes).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub response_timeout: u64,
    /// Seconds a whole request may take, from its head to the last byte of
    /// the response (0: no limit, so streams may run as long as they
    /// like). A response still streaming at the limit is cut off with an
    /// error, never silently truncated.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub total_timeout: u64,
    /// Seconds an upgraded connection (WebSocket) may stay idle.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub upgrade_idle_timeout: u64,
    /// Seconds to let in-flight requests and streams finish after
    /// SIGTERM/SIGINT.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Serve plain HTTP/1.1 requests inside tunnels with keygate's own
    /// HTTP/1.1 path (faster); `false` sends every request through hyper's
    /// server and pooled client. Unusual requests (chunked uploads,
    /// Expect, Upgrade, HTTP/1.0) and HTTP/2 take hyper's path either way.
    #[arg(long, env = "KEYGATE_HTTP1_FAST_PATH", value_name = "BOOL",
          default_value_t = true, action = clap::ArgAction::Set)]
    pub http1_fast_path: bool,
    /// Worker threads for the proxy and admin listeners (default: one per
    /// CPU core but one, at least one). 1 runs everything on a single
    /// thread (the default on a machine with one or two cores).
    #[arg(long, env = "KEYGATE_WORKERS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// Microseconds to keep polling for I/O after the last work before the
    /// proxy thread sleeps (0: sleep at once). On virtual machines, where
    /// waking a sleeping thread takes tens of microseconds, 50–200 cuts
    /// the latency keygate adds to sequential requests, for up to that much
    /// CPU after each burst of work. Needs a single worker (--workers 1,
    /// the default on one or two cores).
    #[arg(long, env = "KEYGATE_BUSY_POLL_US", value_name = "MICROS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub busy_poll_us: u32,
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Add a secret. The value comes from --value-file, stdin (when not a
    /// terminal) or a hidden prompt; never from the command line.
    Add {
        name: String,
        /// Host pattern: api.example.com, *.example.com, api.example.com:8443.
        #[arg(long)]
        host: String,
        /// Path pattern: * (all), /exact, or /prefix/*.
        #[arg(long, default_value = "*")]
        path: String,
        /// Header to inject into.
        #[arg(long, default_value = "Authorization")]
        header: String,
        /// Header value template; {secret} is replaced by the value.
        #[arg(long, default_value = "Bearer {secret}")]
        format: String,
        /// Read the value from FILE ("-" for stdin).
        #[arg(long, value_name = "FILE")]
        value_file: Option<PathBuf>,
    },
    /// List secrets (never their values).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Replace a secret's value; the next request uses the new one.
    Rotate {
        name: String,
        #[arg(long, value_name = "FILE")]
        value_file: Option<PathBuf>,
    },
    /// Delete a secret and its grants.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Create an agent; prints only its token, once.
    Create {
        name: String,
        /// Grant a secret (repeatable).
        #[arg(long = "grant", value_name = "SECRET")]
        grants: Vec<String>,
    },
    /// List agents and their grants.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Grant a secret to an agent.
    Grant { name: String, secret: String },
    /// Revoke a grant; effective on the agent's next request.
    Revoke { name: String, secret: String },
    /// Delete an agent; its token stops working at once.
    Rm { name: String },
    /// Disable an agent: its token is refused (407) until enabled; grants stay.
    Disable { name: String },
    /// Enable a disabled agent.
    Enable { name: String },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Agent token (else KEYGATE_AGENT_TOKEN).
    #[arg(long, env = "KEYGATE_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Proxy URL (else KEYGATE_PROXY_URL, else http://127.0.0.1:10255).
    #[arg(long, env = "KEYGATE_PROXY_URL")]
    pub proxy: Option<String>,
    /// keygate CA certificate (else KEYGATE_CA_FILE, else <data dir>/ca.pem,
    /// else fetched from the admin API's /ca.pem).
    #[arg(long, env = "KEYGATE_CA_FILE")]
    pub ca: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub verify: Option<AuditCmd>,
    /// Only this agent's requests.
    #[arg(long)]
    pub agent: Option<String>,
    /// How many records (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Keep printing new records as they arrive.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain; exits 1 if a record was edited or deleted.
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Print the CA certificate (PEM) on stdout.
    Cert,
}

#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Set the dashboard's admin password (argon2id hash in the database).
    /// Read from stdin when it is not a terminal, else prompted twice.
    SetPassword,
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Re-wrap every secret's data key (and the token-hash key) under a new
    /// master key, without downtime.
    ///
    /// The running `keygate serve` generates a new master key, writes it to
    /// `<key file>.next` (0600), re-wraps every data key under it in one
    /// database transaction (secret values and agent tokens are unchanged),
    /// then renames it over the key file: `<data dir>/master.key`, or the
    /// file named by KEYGATE_MASTER_KEY_FILE. Requests keep flowing
    /// throughout. If keygate stops half-way, the next start finishes or
    /// undoes the rotation. The old key no longer opens anything: discard
    /// every copy of it (backups included).
    ///
    /// A key given as KEYGATE_MASTER_KEY cannot be rotated (keygate cannot
    /// change its environment): move it to a file named by
    /// KEYGATE_MASTER_KEY_FILE first.
    ///
    /// Other keygate processes sharing the same PostgreSQL database still hold
    /// the old key: restart them with the new key file, or they can no longer
    /// decrypt secrets. Prints the old and new key ids, never key material.
    Rotate {
        /// Print the result as one JSON object:
        /// {"key_id", "previous_key_id", "secrets"}.
        #[arg(long)]
        json: bool,
    },
}
