//! The fleet contract: what an `OpencodeSidecar`'s children are called and labelled, the ports
//! and Secret keys its pods expose, and how to reach a pod's OpenCode server.
//!
//! The sidecar controller builds fleets to this contract; the task controller and the e2e
//! suite reach them through it. Neither controller imports the other.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, Client, ResourceExt};
use nubabel_opencode::{ClientConfig, OpencodeClient};

/// Name of the OpenCode container.
pub const OPENCODE_CONTAINER: &str = "opencode";
/// Name of the event bridge container.
pub const BRIDGE_CONTAINER: &str = "bridge";
/// Name of the init container that creates the directories on the data volume.
pub const PREPARE_CONTAINER: &str = "prepare-data";
/// OpenCode's HTTP port.
pub const OPENCODE_PORT: i32 = 4096;
/// The bridge's port (readiness and status).
pub const BRIDGE_PORT: i32 = 8081;
/// Where the data volume is mounted.
pub const DATA_MOUNT: &str = "/data";
/// OpenCode's working directory, the default project.
pub const WORKSPACE_DIR: &str = "/data/workspace";
/// The user the containers run as; the data volume is group-owned by it too.
pub const RUN_AS_USER: i64 = 10001;

/// Secret key of the OpenCode server password.
pub const PASSWORD_KEY: &str = "opencode-password";
/// Secret key of the bridge's callback signing key (`whsec_...`).
pub const SIGNING_KEY: &str = "callback-signing-key";
/// Secret key of the fleet's bearer token for the callback API's MCP gateway (`nmcp_...`).
pub const MCP_TOKEN_KEY: &str = "mcp-token";
/// Env var of the `opencode` container holding the MCP token.
pub const MCP_TOKEN_ENV: &str = "NUBABEL_MCP_TOKEN";
/// Env var of the `opencode` container holding its pod's name (sent as `x-nubabel-pod`).
pub const POD_NAME_ENV: &str = "NUBABEL_POD_NAME";
/// The name OpenCode knows the gateway by; its tools reach the model as `nubabel_<tool>`.
pub const MCP_SERVER_NAME: &str = "nubabel";
/// Milliseconds OpenCode waits for an MCP request to the gateway (its default is 5 s, shorter
/// than an upstream call may take; the gateway answers within its 30 s request timeout).
pub const MCP_TIMEOUT_MS: u64 = 30_000;
/// Annotation on a Namespace, set by a cluster admin, listing the organizations (comma
/// separated) whose fleets may run there. Without it a fleet gets no keys.
pub const NAMESPACE_ORGANIZATIONS_ANNOTATION: &str = "nubabel.io/organizations";
/// Whether a namespace's organizations annotation (comma separated, blanks ignored) names
/// `organization`.
pub fn namespace_binds(annotation: Option<&str>, organization: &str) -> bool {
    annotation.is_some_and(|list| list.split(',').any(|entry| entry.trim() == organization))
}

/// Annotation on the Secret recording the organization the fleet was created for.
pub const ORGANIZATION_ANNOTATION: &str = "nubabel.io/organization-id";
/// Pod-template annotation whose change rolls the pods when the configuration changes.
pub const CONFIG_HASH_ANNOTATION: &str = "nubabel.io/config-hash";
/// Env var of the `opencode` container holding the provider's API key.
pub const PROVIDER_API_KEY_ENV: &str = "NUBABEL_PROVIDER_API_KEY";

/// `app.kubernetes.io/name` of every sidecar object.
pub const APP_NAME: &str = "opencode-sidecar";
/// `app.kubernetes.io/managed-by` of every child.
pub const MANAGED_BY: &str = "nubabel-operator";
/// Label key of the tenant.
pub const ORGANIZATION_LABEL: &str = "nubabel.io/organization";
const NAME_LABEL: &str = "app.kubernetes.io/name";
const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Label selector of every child the operator manages, for its watches.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=nubabel-operator";

/// The Secret and ServiceAccount of sidecar `name`.
pub fn secret_name(name: &str) -> String {
    format!("{name}-sidecar")
}

/// The labels that select a fleet's pods: stable for the object's life (never the
/// organization, whose label value could change form).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    [
        (NAME_LABEL.to_owned(), APP_NAME.to_owned()),
        (INSTANCE_LABEL.to_owned(), name.to_owned()),
    ]
    .into()
}

/// The selector as text, for `status.selector` (the scale subresource and HPAs read it).
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The sidecar an owned object or pod belongs to, from its instance label.
pub fn instance_of(labels: &BTreeMap<String, String>) -> Option<&str> {
    (labels.get(NAME_LABEL).map(String::as_str) == Some(APP_NAME))
        .then(|| labels.get(INSTANCE_LABEL).map(String::as_str))
        .flatten()
}

/// Labels of every child and pod of fleet `name` serving the organization whose label value is
/// `organization_label`.
pub fn child_labels(name: &str, organization_label: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(name);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels.insert(ORGANIZATION_LABEL.to_owned(), organization_label.to_owned());
    labels
}

/// Whether a pod takes work: it reports Ready and is not being deleted.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The URL of a pod's OpenCode server, once the pod has an IP.
pub fn opencode_url(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    Some(format!("http://{ip}:{OPENCODE_PORT}"))
}

/// The base URL of a pod's bridge (readiness, workspaces), once the pod has an IP.
pub fn bridge_url(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    Some(format!("http://{ip}:{BRIDGE_PORT}"))
}

/// Where the bridge makes conversations' workspaces: on the data volume, beside OpenCode's state.
pub const WORKSPACES_DIR: &str = "/data/workspaces";
/// Where the bridge keeps its private state (its copies of the workspaces' repositories).
pub const BRIDGE_STATE_DIR: &str = "/var/lib/nubabel-bridge";
/// The directory of the data volume that holds the bridge's private state: mounted by the
/// bridge alone, so it lasts as long as the volume and OpenCode never sees it.
pub const BRIDGE_STATE_SUBPATH: &str = "bridge";
/// The directories of the data volume the `opencode` container mounts, each at
/// `/data/<subpath>`: its state (HOME, XDG), its default directory and the workspaces; never
/// the bridge's state.
pub const OPENCODE_DATA_SUBPATHS: [&str; 4] = ["home", "xdg", "workspace", "workspaces"];

/// Reaching a fleet pod's OpenCode server failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The fleet's Secret could not be read.
    #[error("reading the Secret of sidecar {sidecar} failed: {source}")]
    ReadSecret {
        /// The fleet.
        sidecar: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The fleet's Secret lacks the OpenCode password (it is being created).
    #[error("the OpenCode password of sidecar {0} is not there yet")]
    NoPassword(String),
    /// The pod has no IP yet.
    #[error("pod {0} has no IP address")]
    NoPodIp(String),
    /// The client could not be built.
    #[error("OpenCode client for pod {pod}: {source}")]
    Client {
        /// The pod.
        pod: String,
        /// Why.
        #[source]
        source: nubabel_opencode::Error,
    },
}

/// The OpenCode server password of fleet `sidecar` in `namespace`, from its Secret.
pub async fn opencode_password(
    client: &Client,
    namespace: &str,
    sidecar: &str,
) -> Result<String, AccessError> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(&secret_name(sidecar))
        .await
        .map_err(|source| AccessError::ReadSecret {
            sidecar: sidecar.to_owned(),
            source,
        })?;
    secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(PASSWORD_KEY))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .ok_or_else(|| AccessError::NoPassword(sidecar.to_owned()))
}

/// A client of the OpenCode server on `pod`, a pod of fleet `sidecar` in `namespace`.
pub async fn opencode(
    client: &Client,
    namespace: &str,
    sidecar: &str,
    pod: &Pod,
) -> Result<OpencodeClient, AccessError> {
    let url = opencode_url(pod).ok_or_else(|| AccessError::NoPodIp(pod.name_any()))?;
    let password = opencode_password(client, namespace, sidecar).await?;
    OpencodeClient::new(ClientConfig::new(url).with_password(password)).map_err(|source| {
        AccessError::Client {
            pod: pod.name_any(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn pod(ready: &str, ip: Option<&str>) -> Pod {
        Pod {
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_owned),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: ready.to_owned(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn a_pod_takes_work_only_while_ready_and_not_being_deleted() {
        assert!(pod_ready(&pod("True", None)));
        assert!(!pod_ready(&pod("False", None)));
        assert!(!pod_ready(&Pod::default()));
        let mut deleting = pod("True", None);
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert!(!pod_ready(&deleting));
    }

    #[test]
    fn a_pods_opencode_is_reached_on_its_ip_at_the_fleet_port() {
        assert_eq!(
            opencode_url(&pod("True", Some("10.0.0.7"))).as_deref(),
            Some("http://10.0.0.7:4096")
        );
        assert_eq!(opencode_url(&pod("True", None)), None);
    }

    #[test]
    fn a_fleets_pods_are_selected_by_name_and_carry_its_tenant() {
        let labels = child_labels("acme", "org-a");
        assert_eq!(instance_of(&labels), Some("acme"));
        assert_eq!(
            labels.get(ORGANIZATION_LABEL).map(String::as_str),
            Some("org-a")
        );
        assert_eq!(
            selector_string("acme"),
            "app.kubernetes.io/instance=acme,app.kubernetes.io/name=opencode-sidecar"
        );
        assert!(MANAGED_SELECTOR.ends_with(MANAGED_BY));
    }
}
