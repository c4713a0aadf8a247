//! Configuration, from flags and environment variables (`--help` lists them all): plain
//! settings, which `startup` turns into each part's own.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};
use secrecy::SecretString;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Compact human-readable text.
    Text,
}

/// The callback API's configuration.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "nubabel-callback-api",
    version,
    about = "Receives signed sidecar callbacks, persists them and streams them to clients"
)]
pub struct Config {
    /// Address to serve the API, health, metrics and OpenAPI document on (everything but the
    /// admin API).
    #[arg(
        long,
        env = "NUBABEL_CALLBACK_API_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub http_addr: SocketAddr,

    /// Postgres URL (`postgres://user:password@host/db`).
    #[arg(long, env = "NUBABEL_DATABASE_URL", hide_env_values = true)]
    pub database_url: SecretString,

    /// Largest number of Postgres connections this replica opens.
    #[arg(long, env = "NUBABEL_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// Redis URL (`redis://host:6379/0`).
    #[arg(long, env = "NUBABEL_REDIS_URL", hide_env_values = true)]
    pub redis_url: SecretString,

    /// The master key sidecar signing keys are derived from (at least 32 bytes), shared with
    /// the operator.
    #[arg(long, env = "NUBABEL_SIGNING_MASTER_KEY", hide_env_values = true)]
    pub signing_master_key: SecretString,

    /// The key stream tokens are signed with (at least 32 bytes), shared with the token issuer.
    #[arg(long, env = "NUBABEL_STREAM_TOKEN_KEY", hide_env_values = true)]
    pub stream_token_key: SecretString,

    /// Largest callback body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "NUBABEL_CALLBACK_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// How far a callback's `webhook-timestamp` may be from this server's clock, in seconds.
    #[arg(
        long,
        env = "NUBABEL_SIGNATURE_TOLERANCE_SECONDS",
        default_value_t = 300
    )]
    pub signature_tolerance_seconds: u64,

    /// Also accept callbacks signed only over their body (`v1`), from bridges that predate
    /// request-bound `v2` signatures. Such a callback could be re-sent to another route or
    /// session of the same fleet within the time window: turn this on only while sidecar pods
    /// roll to the new bridge during an upgrade (`nubabel_callback_api_body_only_signatures_total`
    /// counts them).
    #[arg(long, env = "NUBABEL_ACCEPT_BODY_ONLY_SIGNATURES", default_value_t = false, action = clap::ArgAction::Set)]
    pub accept_body_only_signatures: bool,

    /// Most events kept per session in Redis; older ones replay from Postgres.
    #[arg(long, env = "NUBABEL_STREAM_MAX_LEN", default_value_t = 1000)]
    pub stream_max_len: usize,

    /// Most bytes of event JSON kept per session in Redis (the oldest events go first; older
    /// ones replay from Postgres). The newest event always stays, whatever its size.
    #[arg(long, env = "NUBABEL_STREAM_MAX_BYTES", default_value_t = nubabel_store::streams::DEFAULT_STREAM_MAX_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_max_bytes: u64,

    /// Seconds between SSE keep-alive comments.
    #[arg(long, env = "NUBABEL_SSE_KEEP_ALIVE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub sse_keep_alive_seconds: u64,

    /// Seconds between two checks of an open stream's token against the revocations; a revoked
    /// token's stream ends within this long.
    #[arg(long, env = "NUBABEL_STREAM_REVOCATION_CHECK_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_revocation_check_seconds: u64,

    /// Mirror progress into `DelegatedTask.status.progress` (needs Kubernetes credentials).
    #[arg(long, env = "NUBABEL_STATUS_MIRROR", default_value_t = true, action = clap::ArgAction::Set)]
    pub status_mirror: bool,

    /// Milliseconds between two status writes of one task.
    #[arg(
        long,
        env = "NUBABEL_STATUS_MIRROR_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub status_mirror_interval_ms: u64,

    /// Log format.
    #[arg(long, env = "NUBABEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Serve `POST /api/delegate`, which creates and watches DelegatedTasks (needs Kubernetes
    /// credentials).
    #[arg(long, env = "NUBABEL_DELEGATE_API", default_value_t = true, action = clap::ArgAction::Set)]
    pub delegate_api: bool,

    /// Longest a waiting `POST /api/delegate` holds the request, in seconds; then it answers
    /// 202 with the task's name and stream URL.
    #[arg(long, env = "NUBABEL_DELEGATE_MAX_WAIT_SECONDS", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub delegate_max_wait_seconds: u64,

    /// Slack bot token (`xoxb-...`); with the signing secret and a team mapping it turns the
    /// Slack bot on.
    #[arg(long, env = "NUBABEL_SLACK_BOT_TOKEN", hide_env_values = true)]
    pub slack_bot_token: Option<SecretString>,

    /// Slack signing secret, to verify `/slack/events` requests.
    #[arg(long, env = "NUBABEL_SLACK_SIGNING_SECRET", hide_env_values = true)]
    pub slack_signing_secret: Option<SecretString>,

    /// Base URL of the Slack Web API.
    #[arg(
        long,
        env = "NUBABEL_SLACK_API_URL",
        default_value = "https://slack.com/api"
    )]
    pub slack_api_url: String,

    /// Slack workspaces served, as `<team id>=<organization id>/<namespace>` (comma-separated
    /// in the environment): a mention in team T creates a task for that organization in that
    /// namespace.
    #[arg(long, env = "NUBABEL_SLACK_TEAMS", value_delimiter = ',')]
    pub slack_teams: Vec<String>,

    /// Least time between two progress edits of one Slack message, in milliseconds.
    #[arg(
        long,
        env = "NUBABEL_SLACK_PROGRESS_INTERVAL_MS",
        default_value_t = 2000
    )]
    pub slack_progress_interval_ms: u64,
    /// How often each replica looks for final answers claimed by a replica that stopped
    /// before posting them (claims older than five minutes), in seconds.
    #[arg(long, env = "NUBABEL_SLACK_FINAL_SWEEP_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub slack_final_sweep_seconds: u64,

    /// Days session events (every accepted callback) are kept; older ones are deleted, so a
    /// replay from the start begins at the oldest kept event. 0 keeps them forever.
    #[arg(long, env = "NUBABEL_RETENTION_EVENTS_DAYS", default_value_t = 30)]
    pub retention_events_days: u32,

    /// Days task results (each finished task's whole answer) and Slack thread records are kept
    /// after their last change. 0 keeps them forever.
    #[arg(long, env = "NUBABEL_RETENTION_RESULTS_DAYS", default_value_t = 90)]
    pub retention_results_days: u32,

    /// Seconds between two retention sweeps of each replica.
    #[arg(long, env = "NUBABEL_RETENTION_INTERVAL_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_interval_seconds: u64,
    /// Credential vault master keys, `<id>=<base64 of 32 bytes>` separated by commas, the
    /// current key first (`k2=...,k1=...`); older keys only decrypt. Without it, MCP
    /// connections cannot be stored or used.
    #[arg(long, env = "NUBABEL_VAULT_KEYS", hide_env_values = true)]
    pub vault_keys: Option<SecretString>,

    /// Address to serve the admin API (`/api/admin/...`) on, and nothing else. The default,
    /// loopback, keeps it out of reach of every other pod (sidecars run LLM-written code):
    /// reach it with `kubectl port-forward`, or listen on `0.0.0.0:8081` behind a
    /// NetworkPolicy that admits only the admin clients.
    #[arg(
        long,
        env = "NUBABEL_ADMIN_HTTP_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub admin_http_addr: SocketAddr,

    /// Bearer token of the admin API (`/api/admin/...`), at least 32 bytes
    /// ([`MIN_ADMIN_TOKEN_BYTES`]; a shorter one stops startup); without it the admin API
    /// answers 503.
    #[arg(long, env = "NUBABEL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,

    /// Outbound destinations exempt from the SSRF rules: CIDRs (`10.0.0.0/8`) and
    /// `host:port` entries, separated by commas.
    #[arg(long, env = "NUBABEL_EGRESS_ALLOW", value_delimiter = ',')]
    pub egress_allow: Vec<String>,

    /// Seconds before expiry at which an OAuth access token is refreshed.
    #[arg(long, env = "NUBABEL_OAUTH_REFRESH_SKEW_SECONDS", default_value_t = 60)]
    pub oauth_refresh_skew_seconds: u64,

    /// Milliseconds an MCP tool call (or listing one connection's tools) may take upstream.
    /// Keep it plus the queue timeout under the 30 s request timeout.
    #[arg(long, env = "NUBABEL_MCP_CALL_TIMEOUT_MS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=29_000))]
    pub mcp_call_timeout_ms: u64,

    /// MCP tool calls one tenant may have running at once on one replica.
    #[arg(long, env = "NUBABEL_MCP_TENANT_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub mcp_tenant_concurrency: u32,

    /// Milliseconds a tool call waits for a free slot of its tenant before it fails.
    #[arg(long, env = "NUBABEL_MCP_QUEUE_TIMEOUT_MS", default_value_t = 5_000)]
    pub mcp_queue_timeout_ms: u64,

    /// Seconds a connection's tool list is reused before it is listed upstream again.
    #[arg(long, env = "NUBABEL_MCP_TOOLS_CACHE_SECONDS", default_value_t = 60)]
    pub mcp_tools_cache_seconds: u64,

    /// Callbacks one tenant may have in flight on one replica; more get 429.
    #[arg(long, env = "NUBABEL_CALLBACK_TENANT_CONCURRENCY", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub callback_tenant_concurrency: u32,

    /// SSE streams one tenant may hold open on one replica; more get 429.
    #[arg(long, env = "NUBABEL_SSE_TENANT_STREAMS", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub sse_tenant_streams: u32,

    /// SSE streams of one tenant that may replay history (reads Postgres when Redis no longer
    /// holds it) at once on one replica; more get 429, so one tenant's reconnecting clients
    /// cannot take the database pool every tenant shares. Keep it well under the pool size.
    #[arg(long, env = "NUBABEL_SSE_TENANT_REPLAYS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub sse_tenant_replays: u32,

    /// `POST /api/delegate` requests one tenant may have waiting for their answer on one
    /// replica; past it a request is answered 202 at once (its task is created either way).
    #[arg(long, env = "NUBABEL_DELEGATE_TENANT_WAITS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub delegate_tenant_waits: u32,

    /// Seconds a client has to send a request's head; slower connections are closed.
    #[arg(long, env = "NUBABEL_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_read_timeout_seconds: u64,

    /// Most callbacks committed together in one transaction (group commit).
    #[arg(long, env = "NUBABEL_COMMIT_MAX_BATCH", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub commit_max_batch: u32,

    /// Most group commits in flight at once; each holds one Postgres connection.
    #[arg(long, env = "NUBABEL_COMMIT_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub commit_concurrency: u32,
}

/// The shortest admin token accepted: the token guards every tenant's stored credentials, so
/// it must not be guessable whatever deploys the binary (the chart asks the same).
pub const MIN_ADMIN_TOKEN_BYTES: usize = 32;

impl Config {
    /// The admin token, `None` when unset or empty (the admin API is then disabled); a token
    /// shorter than [`MIN_ADMIN_TOKEN_BYTES`] is an error, so a weak one never serves.
    pub fn admin_token(&self) -> anyhow::Result<Option<SecretString>> {
        use secrecy::ExposeSecret;
        let Some(token) = self.admin_token.as_ref() else {
            return Ok(None);
        };
        let length = token.expose_secret().len();
        if length == 0 {
            return Ok(None);
        }
        anyhow::ensure!(
            length >= MIN_ADMIN_TOKEN_BYTES,
            "NUBABEL_ADMIN_TOKEN is {length} bytes; it must be at least {MIN_ADMIN_TOKEN_BYTES} \
             (generate one with `openssl rand -hex 32`), or unset to disable the admin API"
        );
        Ok(Some(token.clone()))
    }

    /// The SSE keep-alive interval.
    pub fn sse_keep_alive(&self) -> Duration {
        Duration::from_secs(self.sse_keep_alive_seconds)
    }

    /// The interval of an open stream's revocation checks.
    pub fn stream_revocation_check(&self) -> Duration {
        Duration::from_secs(self.stream_revocation_check_seconds)
    }

    /// The minimum time between two status writes of one task.
    pub fn status_mirror_interval(&self) -> Duration {
        Duration::from_millis(self.status_mirror_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_settings_come_from_flags_and_defaults_fill_the_rest() {
        let config = Config::try_parse_from([
            "nubabel-callback-api",
            "--database-url=postgres://localhost/db",
            "--redis-url=redis://localhost",
            "--signing-master-key=0123456789abcdef0123456789abcdef",
            "--stream-token-key=fedcba9876543210fedcba9876543210",
            "--status-mirror=false",
        ])
        .unwrap();
        assert_eq!(config.max_body_bytes, 65536);
        assert_eq!(config.signature_tolerance_seconds, 300);
        assert!(!config.status_mirror);
        assert_eq!(config.sse_keep_alive(), Duration::from_secs(15));
        assert_eq!(config.stream_revocation_check(), Duration::from_secs(15));
    }

    fn parse_with_admin_token(token: &str) -> Config {
        Config::try_parse_from([
            "nubabel-callback-api",
            "--database-url=postgres://localhost/db",
            "--redis-url=redis://localhost",
            "--signing-master-key=0123456789abcdef0123456789abcdef",
            "--stream-token-key=fedcba9876543210fedcba9876543210",
            &format!("--admin-token={token}"),
        ])
        .unwrap()
    }

    #[test]
    fn an_admin_token_shorter_than_32_bytes_is_refused() {
        let error = parse_with_admin_token("short-admin-token")
            .admin_token()
            .unwrap_err();
        assert!(error.to_string().contains("at least 32"), "{error}");
        let token = "a".repeat(MIN_ADMIN_TOKEN_BYTES);
        assert!(
            parse_with_admin_token(&token)
                .admin_token()
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_missing_database_url_is_an_error() {
        let error =
            Config::try_parse_from(["nubabel-callback-api", "--redis-url=redis://x"]).unwrap_err();
        assert!(error.to_string().contains("--database-url"));
    }
}
