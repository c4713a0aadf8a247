//! Operator configuration, from flags and environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use secrecy::SecretString;

/// How log lines are written.
#[derive(Clone, Debug, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Compact human-readable text.
    Text,
}

/// The operator's configuration.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "nubabel-operator",
    version,
    about = "Runs OpenCode sidecar fleets and delegated tasks on Kubernetes"
)]
pub struct Config {
    /// Address of the health and metrics server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long,
        env = "NUBABEL_OPERATOR_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub http_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "NUBABEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Image of the `opencode` container when an `OpencodeSidecar` names none.
    #[arg(
        long,
        env = "NUBABEL_SIDECAR_IMAGE",
        default_value = "ghcr.io/nubabel/opencode:1.18.33"
    )]
    pub sidecar_image: String,

    /// Image of the `bridge` container in every sidecar pod.
    #[arg(
        long,
        env = "NUBABEL_BRIDGE_IMAGE",
        default_value = "ghcr.io/nubabel/bridge:0.1.0"
    )]
    pub bridge_image: String,

    /// Where bridges send their signed callbacks (the callback API's in-cluster URL).
    #[arg(
        long,
        env = "NUBABEL_CALLBACK_URL",
        default_value = "http://nubabel-callback-api.nubabel-system.svc:8080"
    )]
    pub callback_url: String,

    /// Labels of the callback API's pods: sidecar pods may connect to them (NetworkPolicy).
    #[arg(
        long,
        env = "NUBABEL_CALLBACK_API_POD_LABELS",
        default_value = "app.kubernetes.io/name=nubabel-callback-api",
        value_parser = parse_labels
    )]
    pub callback_api_pod_labels: Labels,

    /// Master key shared with the callback API, from which each sidecar's callback signing key
    /// is derived (at least 32 bytes).
    #[arg(long, env = "NUBABEL_SIGNING_MASTER_KEY", hide_env_values = true)]
    pub signing_master_key: SecretString,

    /// Directory in the sidecar image where plugins are installed (`npm install --prefix`).
    #[arg(
        long,
        env = "NUBABEL_PLUGIN_DIR",
        default_value = "/opt/opencode/plugins"
    )]
    pub plugin_dir: String,

    /// Namespace the operator (and the callback API) runs in.
    #[arg(
        long,
        env = "NUBABEL_OPERATOR_NAMESPACE",
        default_value = "nubabel-system"
    )]
    pub operator_namespace: String,

    /// Labels that select the operator's namespace in NetworkPolicies. Defaults to
    /// `kubernetes.io/metadata.name=<operator namespace>` (set automatically from 1.21 on; on
    /// older clusters, label the namespace).
    #[arg(long, env = "NUBABEL_OPERATOR_NAMESPACE_LABELS", value_parser = parse_labels)]
    pub operator_namespace_labels: Option<Labels>,

    /// Labels of the operator's pods: the only ones allowed to reach sidecar pods.
    #[arg(
        long,
        env = "NUBABEL_OPERATOR_POD_LABELS",
        default_value = "app.kubernetes.io/name=nubabel-operator",
        value_parser = parse_labels
    )]
    pub operator_pod_labels: Labels,

    /// Provision a fleet only in a namespace a cluster admin bound to its organization (the
    /// namespace's `nubabel.io/organizations` annotation lists it). Turn off only where
    /// everyone who can create an OpencodeSidecar may act for every organization.
    #[arg(
        long,
        env = "NUBABEL_REQUIRE_NAMESPACE_BINDING",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub require_namespace_binding: bool,

    /// Watch only this namespace (a namespace-scoped install); all namespaces when unset.
    #[arg(long, env = "NUBABEL_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Reconciles running at once, per controller.
    #[arg(
        long,
        env = "NUBABEL_RECONCILE_CONCURRENCY",
        default_value_t = 8,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub reconcile_concurrency: u16,

    /// Elect one active replica through a Lease; turn off only when exactly one runs.
    #[arg(
        long,
        env = "NUBABEL_LEADER_ELECT",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "NUBABEL_LEASE_NAME", default_value = "nubabel-operator")]
    pub lease_name: String,

    /// Namespace of the leader-election Lease (defaults to the operator namespace).
    #[arg(long, env = "NUBABEL_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a leader's Lease stays valid without renewal, in seconds.
    #[arg(long, env = "NUBABEL_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u16,

    /// How long the leader keeps trying to renew before it steps down, in seconds.
    #[arg(
        long,
        env = "NUBABEL_LEASE_RENEW_DEADLINE_SECONDS",
        default_value_t = 10
    )]
    pub lease_renew_deadline_seconds: u16,

    /// How often candidates try to acquire and the leader renews, in seconds.
    #[arg(long, env = "NUBABEL_LEASE_RETRY_PERIOD_SECONDS", default_value_t = 2)]
    pub lease_retry_period_seconds: u16,

    /// This replica's identity (the pod name, from the downward API); events and the Lease
    /// carry it. Defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Postgres URL of the data layer (session mappings, task results): the same database as
    /// the callback API's. Without it only the OpencodeSidecar controller runs.
    #[arg(long, env = "NUBABEL_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,

    /// Most connections the operator opens to Postgres.
    #[arg(long, env = "NUBABEL_DATABASE_MAX_CONNECTIONS", default_value_t = 4)]
    pub database_max_connections: u32,
}

/// A set of Kubernetes labels, parsed from `key=value,key=value`.
pub type Labels = BTreeMap<String, String>;

/// Parses `key=value` pairs separated by commas.
pub fn parse_labels(text: &str) -> Result<Labels, String> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => Err(format!("{pair:?} is not key=value")),
        })
        .collect()
}

impl Config {
    /// The identity of this replica, for the Lease and for events.
    pub fn identity(&self) -> String {
        self.pod_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|name| name.trim().to_owned())
                .ok()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| format!("nubabel-operator-{}", std::process::id()))
        })
    }

    /// Labels selecting the operator's namespace.
    pub fn operator_namespace_selector(&self) -> Labels {
        self.operator_namespace_labels.clone().unwrap_or_else(|| {
            [(
                "kubernetes.io/metadata.name".to_owned(),
                self.operator_namespace.clone(),
            )]
            .into()
        })
    }

    /// The Lease timings.
    pub fn lease_timings(&self) -> crate::leader::Timings {
        crate::leader::Timings {
            lease_duration: Duration::from_secs(self.lease_duration_seconds.into()),
            renew_deadline: Duration::from_secs(self.lease_renew_deadline_seconds.into()),
            retry_period: Duration::from_secs(self.lease_retry_period_seconds.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_from_comma_separated_pairs() {
        let labels = parse_labels("a=1, b.io/c = two,").unwrap();
        assert_eq!(labels.get("a").map(String::as_str), Some("1"));
        assert_eq!(labels.get("b.io/c").map(String::as_str), Some("two"));
        assert!(parse_labels("novalue").is_err());
    }

    #[test]
    fn the_operator_namespace_is_selected_by_its_name_label_by_default() {
        let config = Config::parse_from([
            "nubabel-operator",
            "--signing-master-key",
            "0123456789abcdef0123456789abcdef",
            "--operator-namespace",
            "ops",
        ]);
        assert_eq!(
            config.operator_namespace_selector(),
            [("kubernetes.io/metadata.name".to_owned(), "ops".to_owned())].into()
        );
        assert!(config.leader_elect);
        assert_eq!(config.reconcile_concurrency, 8);
    }
}
