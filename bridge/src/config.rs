//! Configuration, from flags and environment variables (`--help` lists them all). The
//! operator's pod spec sets the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use nubabel_contract::bridge_env;
use nubabel_contract::identity::{InvalidIdentity, SidecarIdentity};
use nubabel_contract::signing::SidecarKey;
use nubabel_opencode::ClientConfig;
use secrecy::{ExposeSecret, SecretString};

use crate::retry::Backoff;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Compact human-readable text.
    Text,
}

/// The bridge's configuration.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "nubabel-bridge",
    version,
    about = "Turns the pod's OpenCode events into signed callbacks to the callback API"
)]
pub struct Config {
    /// The pod's OpenCode server.
    #[arg(long, env = bridge_env::OPENCODE_URL, default_value = "http://127.0.0.1:4096")]
    pub opencode_url: String,

    /// OpenCode's server password (basic auth).
    #[arg(long, env = bridge_env::OPENCODE_PASSWORD, hide_env_values = true)]
    pub opencode_password: Option<SecretString>,

    /// OpenCode's basic-auth user.
    #[arg(long, env = bridge_env::OPENCODE_USERNAME, default_value = "opencode")]
    pub opencode_username: String,

    /// The callback API's base URL.
    #[arg(long, env = bridge_env::CALLBACK_URL)]
    pub callback_url: String,

    /// This sidecar fleet's callback signing key, `whsec_<base64>`.
    #[arg(long, env = bridge_env::SIGNING_KEY, hide_env_values = true)]
    pub signing_key: SecretString,

    /// This sidecar fleet, as `<namespace>/<name>`.
    #[arg(long, env = bridge_env::SIDECAR)]
    pub sidecar: String,

    /// The tenant.
    #[arg(long, env = bridge_env::ORGANIZATION_ID)]
    pub organization_id: String,

    /// The pod's name (sent in state metadata).
    #[arg(long, env = bridge_env::POD_NAME)]
    pub pod_name: Option<String>,

    /// The pod's IP (sent in state metadata).
    #[arg(long, env = bridge_env::POD_IP)]
    pub pod_ip: Option<String>,

    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = bridge_env::LISTEN_ADDR, default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,

    /// Callbacks kept while the callback API is unreachable; beyond it the oldest are dropped.
    #[arg(long, env = "NUBABEL_BRIDGE_BUFFER_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub buffer_capacity: u32,

    /// Shortest time between two interim updates of one streaming text part, in milliseconds.
    #[arg(long, env = "NUBABEL_BRIDGE_TEXT_INTERVAL_MS", default_value_t = 1000)]
    pub text_interval_ms: u64,

    /// Log format.
    #[arg(long, env = "NUBABEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Where conversations' workspaces are made (on the volume OpenCode shares); without it
    /// the bridge prepares none and follows only OpenCode's default directory.
    #[arg(long, env = bridge_env::WORKSPACES_DIR, requires = "workspace_state_dir")]
    pub workspaces_dir: Option<PathBuf>,

    /// The bridge's private copies of the workspaces' repositories (a volume OpenCode does
    /// not mount).
    #[arg(long, env = bridge_env::WORKSPACE_STATE_DIR, requires = "workspaces_dir")]
    pub workspace_state_dir: Option<PathBuf>,

    /// Seconds a workspace is kept after its last use while none of its sessions is busy.
    #[arg(long, env = bridge_env::WORKSPACE_IDLE_TTL_SECONDS, default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub workspace_idle_ttl_seconds: u64,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The signing key is not `whsec_<base64 of 32 bytes>`.
    #[error("NUBABEL_CALLBACK_SIGNING_KEY must be whsec_<base64 of 32 bytes>")]
    SigningKey,
    /// The sidecar or organization is malformed.
    #[error("invalid sidecar identity: {0}")]
    Identity(#[from] InvalidIdentity),
    /// The callback URL is not an http(s) URL.
    #[error("NUBABEL_CALLBACK_URL must be an http(s) URL, got {0:?}")]
    CallbackUrl(String),
}

/// Everything the bridge runs with, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How to reach OpenCode.
    pub opencode: ClientConfig,
    /// The callback API's base URL.
    pub callback_url: String,
    /// The signing key.
    pub signing_key: SidecarKey,
    /// Who signs.
    pub identity: SidecarIdentity,
    /// The pod's name.
    pub pod_name: Option<String>,
    /// The pod's IP.
    pub pod_ip: Option<String>,
    /// Where the probes listen.
    pub listen: SocketAddr,
    /// Buffer size.
    pub buffer_capacity: usize,
    /// Interim text interval.
    pub text_interval: Duration,
    /// Backoff between delivery attempts of one callback.
    pub delivery_backoff: Backoff,
    /// Backoff between reconnections to the event stream.
    pub reconnect_backoff: Backoff,
    /// Bound on one delivery attempt.
    pub callback_timeout: Duration,
    /// How long a stopping bridge keeps delivering what it buffered.
    pub drain_timeout: Duration,
    /// The workspaces root and the private state directory, when workspaces are prepared here.
    pub workspaces: Option<(PathBuf, PathBuf)>,
    /// How long an unused workspace is kept.
    pub workspace_idle_ttl: Duration,
    /// How often idle workspaces are looked for.
    pub workspace_sweep_interval: Duration,
}

impl Settings {
    /// Settings with the default intervals.
    pub fn new(
        opencode: ClientConfig,
        callback_url: &str,
        signing_key: SidecarKey,
        identity: SidecarIdentity,
    ) -> Result<Self, ConfigError> {
        let url = callback_url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::CallbackUrl(callback_url.to_owned()));
        }
        Ok(Self {
            opencode,
            callback_url: url.to_owned(),
            signing_key,
            identity,
            pod_name: None,
            pod_ip: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            buffer_capacity: 10_000,
            text_interval: Duration::from_secs(1),
            delivery_backoff: Backoff {
                initial: Duration::from_millis(250),
                max: Duration::from_secs(30),
            },
            reconnect_backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(10),
            },
            callback_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            workspaces: None,
            workspace_idle_ttl: Duration::from_secs(7 * 24 * 3600),
            workspace_sweep_interval: Duration::from_secs(60),
        })
    }
}

impl Config {
    /// Validates the configuration.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let key = SidecarKey::from_whsec(self.signing_key.expose_secret())
            .ok_or(ConfigError::SigningKey)?;
        let identity = SidecarIdentity::from_headers(&self.organization_id, &self.sidecar)?;
        let mut opencode = ClientConfig::new(&self.opencode_url);
        opencode.username.clone_from(&self.opencode_username);
        opencode.password = self.opencode_password.clone();
        let mut settings = Settings::new(opencode, &self.callback_url, key, identity)?;
        settings.pod_name.clone_from(&self.pod_name);
        settings.pod_ip.clone_from(&self.pod_ip);
        settings.listen = self.listen;
        settings.buffer_capacity = usize::try_from(self.buffer_capacity).unwrap_or(usize::MAX);
        settings.text_interval = Duration::from_millis(self.text_interval_ms);
        settings.workspaces = self
            .workspaces_dir
            .clone()
            .zip(self.workspace_state_dir.clone());
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use nubabel_contract::signing::{MasterKey, derive_sidecar_key};

    use super::*;

    fn whsec() -> String {
        let master = MasterKey::new(&[3u8; 32]).unwrap();
        derive_sidecar_key(
            &master,
            &SidecarIdentity::new("org-a", "team-a", "fleet").unwrap(),
        )
        .to_whsec()
    }

    #[test]
    fn the_operators_environment_names_configure_the_bridge() {
        let config = Config::try_parse_from([
            "nubabel-bridge",
            "--callback-url=http://api:8080/",
            &format!("--signing-key={}", whsec()),
            "--sidecar=team-a/fleet",
            "--organization-id=org-a",
            "--pod-name=fleet-0",
        ])
        .unwrap();
        let settings = config.settings().unwrap();
        assert_eq!(settings.callback_url, "http://api:8080");
        assert_eq!(settings.identity.namespace(), "team-a");
        assert_eq!(settings.listen, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(settings.opencode.base_url, "http://127.0.0.1:4096");
        assert_eq!(settings.pod_name.as_deref(), Some("fleet-0"));
        assert!(!format!("{config:?}").contains(&whsec()));
    }

    #[test]
    fn a_malformed_key_or_identity_is_refused_with_a_clear_message() {
        let parse = |key: &str, sidecar: &str| {
            Config::try_parse_from([
                "nubabel-bridge",
                "--callback-url=http://api",
                &format!("--signing-key={key}"),
                &format!("--sidecar={sidecar}"),
                "--organization-id=org-a",
            ])
            .unwrap()
            .settings()
        };
        assert!(matches!(
            parse("whsec_short", "team-a/fleet"),
            Err(ConfigError::SigningKey)
        ));
        assert!(matches!(
            parse(&whsec(), "fleet"),
            Err(ConfigError::Identity(_))
        ));
        let bad_url = Settings::new(
            ClientConfig::new("http://x"),
            "ftp://api",
            SidecarKey::from_whsec(&whsec()).unwrap(),
            SidecarIdentity::new("org-a", "team-a", "fleet").unwrap(),
        );
        assert!(matches!(bad_url, Err(ConfigError::CallbackUrl(_))));
    }
}
