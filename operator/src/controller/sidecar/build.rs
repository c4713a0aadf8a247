//! Step 3 of the sidecar pipeline, pure: renders a [`ValidSidecar`] into its children
//! (ServiceAccount, Secret, headless Service, NetworkPolicy, StatefulSet and, where the cluster
//! serves `policy/v1`, a PodDisruptionBudget), ready for server-side apply.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret, SecretKeySelector,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nubabel_crds::v1alpha1::{PermissionAction, PermissionsSpec};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use nubabel_contract::bridge_env;

use super::Settings;
use super::oh_my_opencode;
use super::validate::ValidSidecar;
use crate::config::Labels;
use crate::controller::fleet::{
    self, BRIDGE_CONTAINER, BRIDGE_PORT, BRIDGE_STATE_DIR, BRIDGE_STATE_SUBPATH,
    CONFIG_HASH_ANNOTATION, DATA_MOUNT, MCP_SERVER_NAME, MCP_TIMEOUT_MS, MCP_TOKEN_ENV,
    MCP_TOKEN_KEY, OPENCODE_CONTAINER, OPENCODE_DATA_SUBPATHS, OPENCODE_PORT,
    ORGANIZATION_ANNOTATION, PASSWORD_KEY, POD_NAME_ENV, PREPARE_CONTAINER, PROVIDER_API_KEY_ENV,
    RUN_AS_USER, SIGNING_KEY, WORKSPACE_DIR, WORKSPACES_DIR, secret_name, selector_labels,
};

/// Labels of every child and pod.
pub fn labels(v: &ValidSidecar) -> BTreeMap<String, String> {
    fleet::child_labels(&v.name, &v.organization_label)
}

/// The secrets a fleet's pods share: kept across reconciles, never regenerated.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretMaterial {
    /// The OpenCode server password (HTTP Basic, user `opencode`).
    pub password: String,
    /// The bridge's callback signing key, `whsec_<base64>`.
    pub callback_key: String,
    /// OpenCode's bearer token for the MCP gateway, `nmcp_<base64url>`.
    pub mcp_token: String,
}

impl std::fmt::Debug for SecretMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretMaterial([redacted])")
    }
}

/// Every child of a sidecar, rendered.
#[derive(Clone, Debug)]
pub struct Children {
    /// The pods' identity; its token is never mounted.
    pub service_account: ServiceAccount,
    /// Password and signing key.
    pub secret: Secret,
    /// The headless Service that names the pods.
    pub service: Service,
    /// Ingress from the operator only; egress to DNS, the callback API and `spec.egress`.
    pub network_policy: NetworkPolicy,
    /// The fleet.
    pub stateful_set: StatefulSet,
    /// At most one pod down at a time, where `policy/v1` is served.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
}

/// Renders every child.
pub fn build(
    v: &ValidSidecar,
    settings: &Settings,
    material: &SecretMaterial,
    with_pod_disruption_budget: bool,
) -> Children {
    let config = opencode_config(v, settings).to_string();
    let config_hash = config_hash(&config, material);
    Children {
        service_account: service_account(v),
        secret: secret(v, material),
        service: service(v),
        network_policy: network_policy(v, settings),
        stateful_set: stateful_set(v, settings, &config, &config_hash),
        pod_disruption_budget: with_pod_disruption_budget.then(|| pod_disruption_budget(v)),
    }
}

fn metadata(v: &ValidSidecar, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(v.namespace.clone()),
        labels: Some(labels(v)),
        owner_references: Some(vec![v.owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn service_account(v: &ValidSidecar) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(v, secret_name(&v.name)),
        // OpenCode runs code an LLM writes: it gets no Kubernetes credentials.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

fn secret(v: &ValidSidecar, material: &SecretMaterial) -> Secret {
    let mut metadata = metadata(v, secret_name(&v.name));
    metadata.annotations = Some(
        [(
            ORGANIZATION_ANNOTATION.to_owned(),
            v.identity.organization_id().as_str().to_owned(),
        )]
        .into(),
    );
    Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(
            [
                (
                    PASSWORD_KEY.to_owned(),
                    ByteString(material.password.clone().into_bytes()),
                ),
                (
                    SIGNING_KEY.to_owned(),
                    ByteString(material.callback_key.clone().into_bytes()),
                ),
                (
                    MCP_TOKEN_KEY.to_owned(),
                    ByteString(material.mcp_token.clone().into_bytes()),
                ),
            ]
            .into(),
        ),
        ..Secret::default()
    }
}

fn service(v: &ValidSidecar) -> Service {
    Service {
        metadata: metadata(v, v.name.clone()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(&v.name)),
            ports: Some(vec![
                service_port("opencode", OPENCODE_PORT),
                service_port("bridge", BRIDGE_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

fn peer(namespace_labels: &Labels, pod_labels: &Labels) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(namespace_labels.clone()),
            ..LabelSelector::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(pod_labels.clone()),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    }
}

fn network_policy(v: &ValidSidecar, settings: &Settings) -> NetworkPolicy {
    let dns = NetworkPolicyEgressRule {
        ports: Some(vec![
            NetworkPolicyPort {
                port: Some(IntOrString::Int(53)),
                protocol: Some("UDP".to_owned()),
                ..NetworkPolicyPort::default()
            },
            tcp(53),
        ]),
        to: None,
    };
    let callback_api = NetworkPolicyEgressRule {
        ports: None,
        to: Some(vec![peer(
            &settings.operator_namespace_labels,
            &settings.callback_api_pod_labels,
        )]),
    };
    let allowed = v.egress.iter().map(|rule| NetworkPolicyEgressRule {
        ports: (!rule.ports.is_empty()).then(|| rule.ports.iter().copied().map(tcp).collect()),
        to: Some(vec![NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: rule.cidr.clone(),
                except: (!rule.except.is_empty()).then(|| rule.except.clone()),
            }),
            ..NetworkPolicyPeer::default()
        }]),
    });
    NetworkPolicy {
        metadata: metadata(v, v.name.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![peer(
                    &settings.operator_namespace_labels,
                    &settings.operator_pod_labels,
                )]),
                ports: Some(vec![tcp(OPENCODE_PORT), tcp(BRIDGE_PORT)]),
            }]),
            egress: Some([dns, callback_api].into_iter().chain(allowed).collect()),
        }),
    }
}

fn pod_disruption_budget(v: &ValidSidecar) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(v, v.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// OpenCode's configuration, passed whole in `OPENCODE_CONFIG_CONTENT`. Each concern is one
/// key of the map, so new ones are one more insert.
pub fn opencode_config(v: &ValidSidecar, settings: &Settings) -> Value {
    let mut config = Map::new();
    config.insert("model".into(), json!(v.model));
    config.insert("small_model".into(), json!(v.small_model));
    if let Some(provider) = provider_config(v) {
        config.insert(
            "provider".into(),
            json!({ v.provider.id.clone(): provider }),
        );
    }
    config.insert("permission".into(), permission_config(&v.permissions));
    config.insert("autoupdate".into(), json!(false));
    config.insert("share".into(), json!("disabled"));
    if !v.plugins.is_empty() {
        config.insert("plugin".into(), json!(v.plugins));
    }
    if v.lsp {
        // Every language server OpenCode knows that is on PATH; none is downloaded.
        config.insert("lsp".into(), json!(true));
    }
    config.insert(
        "mcp".into(),
        json!({ MCP_SERVER_NAME: mcp_gateway_config(v, settings) }),
    );
    Value::Object(config)
}

/// OpenCode's `permission` config: `*` first, then one entry per permission, so each specific
/// entry wins over `*` (OpenCode applies the last matching rule). Nobody answers OpenCode's
/// questions in a pod: asking is always denied.
fn permission_config(permissions: &PermissionsSpec) -> Value {
    let action = |a: Option<PermissionAction>, default: &str| match a {
        Some(PermissionAction::Allow) => "allow".to_owned(),
        Some(PermissionAction::Deny) => "deny".to_owned(),
        None => default.to_owned(),
    };
    let bash_action = action(permissions.bash, "allow");
    let bash = if permissions.bash_deny.is_empty() {
        json!(bash_action)
    } else {
        // Validation keeps every pattern sorting after `*`, so the base rule stays first.
        let mut rules = Map::new();
        rules.insert("*".into(), json!(bash_action));
        for pattern in &permissions.bash_deny {
            rules.insert(pattern.clone(), json!("deny"));
        }
        Value::Object(rules)
    };
    json!({
        "*": "allow",
        "question": "deny",
        "bash": bash,
        "edit": action(permissions.edit, "allow"),
        "webfetch": action(permissions.webfetch, "allow"),
        "websearch": action(permissions.websearch, "allow"),
        "external_directory": action(permissions.external_directory, "deny"),
    })
}

/// The callback API's MCP gateway as a remote MCP server: the fleet's token by `{env:...}`
/// substitution (so it never appears in the pod spec), the fleet's identity, and the pod's
/// name, which lets the gateway record a tool call against the pod's working session.
fn mcp_gateway_config(v: &ValidSidecar, settings: &Settings) -> Value {
    json!({
        "type": "remote",
        "url": format!("{}/mcp", settings.callback_url.trim_end_matches('/')),
        "headers": {
            "Authorization": format!("Bearer {{env:{MCP_TOKEN_ENV}}}"),
            "x-nubabel-organization": v.identity.organization_id().as_str(),
            "x-nubabel-sidecar": format!("{}/{}", v.namespace, v.name),
            "x-nubabel-pod": format!("{{env:{POD_NAME_ENV}}}"),
        },
        // A 401 means a wrong token, not a login to start: no OAuth flow in a pod.
        "oauth": false,
        "timeout": MCP_TIMEOUT_MS,
        "enabled": true,
    })
}

/// The provider entry: the API key by `{env:...}` substitution (OpenCode resolves it in
/// `OPENCODE_CONFIG_CONTENT` too, so the key never appears in the pod spec) and, for an
/// OpenAI-compatible endpoint, the adapter and the models used.
fn provider_config(v: &ValidSidecar) -> Option<Value> {
    let mut options = Map::new();
    if v.provider.api_key.is_some() {
        options.insert(
            "apiKey".into(),
            json!(format!("{{env:{PROVIDER_API_KEY_ENV}}}")),
        );
    }
    let mut provider = Map::new();
    if let Some(base_url) = &v.provider.base_url {
        options.insert("baseURL".into(), json!(base_url));
        provider.insert("npm".into(), json!("@ai-sdk/openai-compatible"));
        let prefix = format!("{}/", v.provider.id);
        let models: Map<String, Value> = [&v.model, &v.small_model]
            .into_iter()
            .chain(v.categories.values())
            .filter_map(|model| model.strip_prefix(&prefix))
            .map(|model| (model.to_owned(), json!({"tool_call": true})))
            .collect();
        provider.insert("models".into(), Value::Object(models));
    }
    if options.is_empty() && provider.is_empty() {
        return None;
    }
    provider.insert("options".into(), Value::Object(options));
    Some(Value::Object(provider))
}

/// A digest of what the pods read at start but the pod template does not show: the config
/// and the Secret's values. It goes on the pod template, so any change rolls the pods.
pub fn config_hash(config: &str, material: &SecretMaterial) -> String {
    let mut hasher = Sha256::new();
    for part in [
        config,
        &material.password,
        &material.callback_key,
        &material.mcp_token,
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// `HOME` and the XDG directories, all on the data volume, so sessions, config OpenCode
/// writes and caches survive a restart when the volume does.
pub const STATE_DIRS: [(&str, &str); 5] = [
    ("HOME", "/data/home"),
    ("XDG_DATA_HOME", "/data/xdg/data"),
    ("XDG_CONFIG_HOME", "/data/xdg/config"),
    ("XDG_CACHE_HOME", "/data/xdg/cache"),
    ("XDG_STATE_HOME", "/data/xdg/state"),
];

fn opencode_env(v: &ValidSidecar, config: &str) -> Vec<EnvVar> {
    let secret = secret_name(&v.name);
    let mut env_vars = vec![
        env("OPENCODE_CONFIG_CONTENT", config),
        env("OPENCODE_DISABLE_MODELS_FETCH", "1"),
        env("OPENCODE_DISABLE_AUTOUPDATE", "1"),
        env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1"),
        env("OPENCODE_DISABLE_SHARE", "1"),
        // Nothing is installed in a pod: any npm install OpenCode starts (for a project's own
        // `.opencode` directory) fails at once instead of waiting for an unreachable registry.
        env("npm_config_offline", "true"),
        env_from_secret("OPENCODE_SERVER_PASSWORD", &secret, PASSWORD_KEY),
        env_from_secret(MCP_TOKEN_ENV, &secret, MCP_TOKEN_KEY),
        env_from_field(POD_NAME_ENV, "metadata.name"),
    ];
    env_vars.extend(STATE_DIRS.iter().map(|(name, path)| env(name, *path)));
    if let Some(key) = &v.provider.api_key {
        env_vars.push(env_from_secret(PROVIDER_API_KEY_ENV, &key.name, &key.key));
    }
    env_vars
}

fn bridge_env(v: &ValidSidecar, settings: &Settings) -> Vec<EnvVar> {
    let secret = secret_name(&v.name);
    vec![
        env(
            bridge_env::OPENCODE_URL,
            format!("http://127.0.0.1:{OPENCODE_PORT}"),
        ),
        env_from_secret(bridge_env::OPENCODE_PASSWORD, &secret, PASSWORD_KEY),
        env(bridge_env::CALLBACK_URL, settings.callback_url.clone()),
        env_from_secret(bridge_env::SIGNING_KEY, &secret, SIGNING_KEY),
        env(bridge_env::SIDECAR, format!("{}/{}", v.namespace, v.name)),
        env(
            bridge_env::ORGANIZATION_ID,
            v.identity.organization_id().as_str(),
        ),
        env(bridge_env::LISTEN_ADDR, format!("0.0.0.0:{BRIDGE_PORT}")),
        env_from_field(bridge_env::POD_NAME, "metadata.name"),
        env_from_field(bridge_env::POD_IP, "status.podIP"),
        env(bridge_env::WORKSPACES_DIR, WORKSPACES_DIR),
        env(bridge_env::WORKSPACE_STATE_DIR, BRIDGE_STATE_DIR),
        env(
            bridge_env::WORKSPACE_IDLE_TTL_SECONDS,
            v.workspace_idle_ttl_seconds.to_string(),
        ),
    ]
}

/// The restricted Pod Security profile, plus a read-only root filesystem.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        ..VolumeMount::default()
    }
}

/// Directory `sub_path` of the data volume, mounted at `path`.
fn data_mount(sub_path: &str, path: &str) -> VolumeMount {
    VolumeMount {
        sub_path: Some(sub_path.to_owned()),
        ..mount("data", path)
    }
}

/// What the `opencode` container sees of the data volume.
fn opencode_data_mounts() -> Vec<VolumeMount> {
    OPENCODE_DATA_SUBPATHS
        .iter()
        .map(|sub| data_mount(sub, &format!("{DATA_MOUNT}/{sub}")))
        .collect()
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn empty_dir(name: &str, size_limit: Option<&str>) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: size_limit.map(|s| Quantity(s.to_owned())),
            medium: None,
        }),
        ..Volume::default()
    }
}

fn containers(
    v: &ValidSidecar,
    settings: &Settings,
    config: &str,
) -> (Container, Container, Container) {
    let prepare = Container {
        name: PREPARE_CONTAINER.to_owned(),
        image: Some(v.image.clone()),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), prepare_script()]),
        env: Some(prepare_env(v)),
        volume_mounts: Some(vec![mount("data", DATA_MOUNT)]),
        resources: Some(v.resources.prepare.clone()),
        security_context: Some(restricted_security_context()),
        ..Container::default()
    };
    let opencode = Container {
        name: OPENCODE_CONTAINER.to_owned(),
        image: Some(v.image.clone()),
        command: Some(vec!["opencode".to_owned()]),
        args: Some(
            [
                "serve",
                "--port",
                &OPENCODE_PORT.to_string(),
                "--hostname",
                "0.0.0.0",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        working_dir: Some(WORKSPACE_DIR.to_owned()),
        ports: Some(vec![port("opencode", OPENCODE_PORT)]),
        env: Some(opencode_env(v, config)),
        volume_mounts: Some(
            opencode_data_mounts()
                .into_iter()
                .chain([mount("tmp", "/tmp")])
                .collect(),
        ),
        resources: Some(v.resources.opencode.clone()),
        security_context: Some(restricted_security_context()),
        ..Container::default()
    };
    let bridge = Container {
        name: BRIDGE_CONTAINER.to_owned(),
        image: Some(settings.bridge_image.clone()),
        ports: Some(vec![port("bridge", BRIDGE_PORT)]),
        env: Some(bridge_env(v, settings)),
        // The workspaces OpenCode works in, and the bridge's private copies of their
        // repositories, which OpenCode never mounts.
        volume_mounts: Some(vec![
            data_mount("workspaces", WORKSPACES_DIR),
            data_mount(BRIDGE_STATE_SUBPATH, BRIDGE_STATE_DIR),
        ]),
        // The bridge is ready when OpenCode answers its health check and callbacks flow.
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".to_owned()),
                port: IntOrString::Int(BRIDGE_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: Some(v.resources.bridge.clone()),
        security_context: Some(restricted_security_context()),
        ..Container::default()
    };
    (prepare, opencode, bridge)
}

/// The init container's environment: the plugin configuration it writes, when there is one.
fn prepare_env(v: &ValidSidecar) -> Vec<EnvVar> {
    v.oh_my_opencode
        .as_ref()
        .map(|plugin| {
            let config = oh_my_opencode::config(plugin, &v.model, &v.categories);
            env(OH_MY_OPENCODE_CONFIG_ENV, config.to_string())
        })
        .into_iter()
        .collect()
}

/// What the init container does to the data volume before OpenCode starts:
/// - creates the working directories and HOME (a fresh volume is empty);
/// - marks OpenCode's global config directory as having its plugin SDK, which OpenCode would
///   otherwise try to install from npm before loading any plugin (with no registry in reach,
///   the first request waited about 71 s for npm to give up);
/// - writes oh-my-opencode's configuration there, or removes one an earlier spec left.
pub fn prepare_script() -> String {
    let mut directories = vec![
        WORKSPACE_DIR.to_owned(),
        WORKSPACES_DIR.to_owned(),
        format!("{DATA_MOUNT}/{BRIDGE_STATE_SUBPATH}"),
    ];
    directories.extend(STATE_DIRS.iter().map(|(_, path)| (*path).to_owned()));
    let config_home = STATE_DIRS
        .iter()
        .find_map(|(name, path)| (*name == "XDG_CONFIG_HOME").then_some(*path))
        .unwrap_or("/data/xdg/config");
    let config_dir = format!("{config_home}/opencode");
    let plugin_config = format!("{config_dir}/{}", oh_my_opencode::CONFIG_FILE);
    [
        "set -e".to_owned(),
        format!("mkdir -p {} {config_dir}/node_modules", directories.join(" ")),
        format!("printf '%s' '{PLUGIN_SDK_LOCK}' > {config_dir}/package-lock.json"),
        format!(
            "if [ -n \"${OH_MY_OPENCODE_CONFIG_ENV}\" ]; then printf '%s' \"${OH_MY_OPENCODE_CONFIG_ENV}\" > {plugin_config}; else rm -f {plugin_config}; fi"
        ),
    ]
    .join("\n")
}

/// A lock file listing OpenCode's plugin SDK as installed, so OpenCode does not install it.
const PLUGIN_SDK_LOCK: &str = r#"{"packages":{"":{"dependencies":{"@opencode-ai/plugin":"*"}}}}"#;
/// The init container's variable holding oh-my-opencode's configuration.
const OH_MY_OPENCODE_CONFIG_ENV: &str = "NUBABEL_OH_MY_OPENCODE_CONFIG";

fn stateful_set(
    v: &ValidSidecar,
    settings: &Settings,
    config: &str,
    config_hash: &str,
) -> StatefulSet {
    let (prepare, opencode, bridge) = containers(v, settings, config);
    let mut volumes = vec![empty_dir("tmp", Some("1Gi"))];
    let claims = match &v.storage {
        Some(storage) => Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".to_owned()),
                labels: Some(labels(v)),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                storage_class_name: storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_owned(), storage.size.clone())].into()),
                    limits: None,
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }]),
        None => {
            volumes.insert(0, empty_dir("data", None));
            None
        }
    };
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(v)),
            annotations: Some([(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned())].into()),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(secret_name(&v.name)),
            automount_service_account_token: Some(false),
            // Service links would add a dozen env vars per Service in the namespace.
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                fs_group_change_policy: Some("OnRootMismatch".to_owned()),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            init_containers: Some(vec![prepare]),
            containers: vec![opencode, bridge],
            volumes: Some(volumes),
            node_selector: (!v.node_selector.is_empty()).then(|| v.node_selector.clone()),
            tolerations: (!v.tolerations.is_empty()).then(|| v.tolerations.clone()),
            priority_class_name: v.priority_class_name.clone(),
            // OpenCode exits about 2 s after SIGTERM.
            termination_grace_period_seconds: Some(30),
            ..PodSpec::default()
        }),
    };
    StatefulSet {
        metadata: metadata(v, v.name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(v.replicas),
            service_name: Some(v.name.clone()),
            pod_management_policy: Some("Parallel".to_owned()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..LabelSelector::default()
            },
            template,
            volume_claim_templates: claims,
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// All containers of a pod spec, init containers first.
pub fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fleet::{ORGANIZATION_LABEL, instance_of, selector_string};
    use crate::controller::sidecar::test_support::{material, settings, valid_sidecar};

    fn built(spec: serde_json::Value) -> Children {
        build(&valid_sidecar(spec), &settings(), &material(), true)
    }

    fn minimal() -> Children {
        built(json!({"organizationId": "org-a", "model": "anthropic/claude-sonnet-4-5"}))
    }

    fn pod_spec(children: &Children) -> &PodSpec {
        children
            .stateful_set
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .unwrap()
    }

    fn container<'a>(children: &'a Children, name: &str) -> &'a Container {
        all_containers(pod_spec(children))
            .find(|c| c.name == name)
            .unwrap()
    }

    fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
        container.env.iter().flatten().find(|e| e.name == name)
    }

    #[test]
    fn every_child_is_owned_by_the_sidecar_and_labelled() {
        let c = minimal();
        let metas = [
            &c.service_account.metadata,
            &c.secret.metadata,
            &c.service.metadata,
            &c.network_policy.metadata,
            &c.stateful_set.metadata,
            &c.pod_disruption_budget.as_ref().unwrap().metadata,
        ];
        for meta in metas {
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "OpencodeSidecar");
            assert_eq!(owners[0].controller, Some(true));
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels["app.kubernetes.io/name"], "opencode-sidecar");
            assert_eq!(labels["app.kubernetes.io/instance"], "tenant-a");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "nubabel-operator");
            assert_eq!(labels["nubabel.io/organization"], "org-a");
            assert_eq!(meta.namespace.as_deref(), Some("team-a"));
        }
    }

    #[test]
    fn the_selector_leaves_out_the_organization() {
        let c = minimal();
        let spec = c.stateful_set.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert!(!selector.contains_key(ORGANIZATION_LABEL));
        assert_eq!(selector, &selector_labels("tenant-a"));
        assert_eq!(
            selector_string("tenant-a"),
            "app.kubernetes.io/instance=tenant-a,app.kubernetes.io/name=opencode-sidecar"
        );
        assert_eq!(instance_of(selector), Some("tenant-a"));
    }

    #[test]
    fn the_statefulset_runs_opencode_and_the_bridge_in_parallel() {
        let c = minimal();
        let spec = c.stateful_set.spec.as_ref().unwrap();
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(spec.service_name.as_deref(), Some("tenant-a"));
        assert_eq!(spec.replicas, Some(1));
        let names: Vec<_> = pod_spec(&c)
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["opencode", "bridge"]);
        let opencode = container(&c, "opencode");
        assert_eq!(
            opencode.args.as_ref().unwrap().join(" "),
            "serve --port 4096 --hostname 0.0.0.0"
        );
        assert_eq!(opencode.working_dir.as_deref(), Some(WORKSPACE_DIR));
        assert_eq!(opencode.image.as_deref(), Some("example.org/opencode:test"));
        assert_eq!(
            container(&c, "bridge").image.as_deref(),
            Some("example.org/bridge:test")
        );
    }

    #[test]
    fn every_container_has_requests_and_limits() {
        let c = minimal();
        for container in all_containers(pod_spec(&c)) {
            let resources = container.resources.as_ref().unwrap();
            for resource in ["cpu", "memory"] {
                assert!(
                    resources.requests.as_ref().unwrap().contains_key(resource),
                    "{} has no {resource} request",
                    container.name
                );
                assert!(
                    resources.limits.as_ref().unwrap().contains_key(resource),
                    "{} has no {resource} limit",
                    container.name
                );
            }
        }
        let opencode = container(&c, "opencode").resources.as_ref().unwrap();
        assert_eq!(opencode.limits.as_ref().unwrap()["memory"].0, "1536Mi");
    }

    #[test]
    fn every_container_meets_the_restricted_pod_security_profile() {
        let c = minimal();
        let pod = pod_spec(&c);
        let pod_security = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        for container in all_containers(pod) {
            let sc = container.security_context.as_ref().unwrap();
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{}",
                container.name
            );
            assert_eq!(sc.run_as_non_root, Some(true));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_owned()][..])
            );
            assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        }
        assert_eq!(
            c.service_account.automount_service_account_token,
            Some(false)
        );
    }

    #[test]
    fn opencode_is_configured_by_env_with_its_state_on_the_data_volume() {
        let c = minimal();
        let opencode = container(&c, "opencode");
        for (name, value) in [
            ("OPENCODE_DISABLE_MODELS_FETCH", "1"),
            ("OPENCODE_DISABLE_AUTOUPDATE", "1"),
            ("OPENCODE_DISABLE_LSP_DOWNLOAD", "1"),
            ("OPENCODE_DISABLE_SHARE", "1"),
            ("npm_config_offline", "true"),
            ("HOME", "/data/home"),
            ("XDG_DATA_HOME", "/data/xdg/data"),
            ("XDG_CONFIG_HOME", "/data/xdg/config"),
            ("XDG_CACHE_HOME", "/data/xdg/cache"),
            ("XDG_STATE_HOME", "/data/xdg/state"),
        ] {
            assert_eq!(
                env_value(opencode, name).and_then(|e| e.value.as_deref()),
                Some(value),
                "{name}"
            );
        }
        let password = env_value(opencode, "OPENCODE_SERVER_PASSWORD").unwrap();
        let reference = password
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!(reference.name, "tenant-a-sidecar");
        assert_eq!(reference.key, PASSWORD_KEY);
        assert!(password.value.is_none());
        let mounts: Vec<_> = opencode
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.name.as_str(),
                    m.sub_path.as_deref(),
                    m.mount_path.as_str(),
                )
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("data", Some("home"), "/data/home"),
                ("data", Some("xdg"), "/data/xdg"),
                ("data", Some("workspace"), "/data/workspace"),
                ("data", Some("workspaces"), "/data/workspaces"),
                ("tmp", None, "/tmp"),
            ]
        );
        for (_, path) in STATE_DIRS {
            assert!(
                mounts.iter().any(|(_, _, mount)| path.starts_with(mount)),
                "{path} is on a mount"
            );
        }

        let config: Value = serde_json::from_str(
            env_value(opencode, "OPENCODE_CONFIG_CONTENT")
                .and_then(|e| e.value.as_deref())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            config,
            opencode_config(
                &valid_sidecar(json!({
                    "organizationId": "org-a", "model": "anthropic/claude-sonnet-4-5"
                })),
                &settings()
            )
        );
    }

    #[test]
    fn the_bridges_state_is_on_the_data_volume_where_only_the_bridge_mounts_it() {
        let c = minimal();
        let bridge = container(&c, "bridge");
        let state = bridge
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == BRIDGE_STATE_DIR)
            .unwrap();
        assert_eq!(
            (state.name.as_str(), state.sub_path.as_deref()),
            ("data", Some(BRIDGE_STATE_SUBPATH))
        );
        let opencode = container(&c, "opencode");
        for m in opencode.volume_mounts.iter().flatten() {
            assert!(
                m.name != "data"
                    || m.sub_path
                        .as_deref()
                        .is_some_and(|s| s != BRIDGE_STATE_SUBPATH),
                "opencode mounts {m:?}"
            );
        }
    }

    #[test]
    fn permissions_come_from_the_spec_with_the_base_rule_first() {
        let config = opencode_config(
            &valid_sidecar(json!({
                "organizationId": "o", "model": "a/b",
                "permissions": {"bash": "allow", "bashDeny": ["git push*"], "webfetch": "deny",
                                "externalDirectory": "allow", "edit": "deny", "websearch": "deny"},
                "workspaces": {"idleTtlSeconds": 3600}
            })),
            &settings(),
        );
        let permission = &config["permission"];
        assert_eq!(
            permission["bash"],
            json!({"*": "allow", "git push*": "deny"})
        );
        assert_eq!(
            serde_json::to_string(&permission["bash"]).unwrap(),
            r#"{"*":"allow","git push*":"deny"}"#,
            "the base rule is written first"
        );
        assert_eq!(permission["webfetch"], "deny");
        assert_eq!(permission["edit"], "deny");
        assert_eq!(permission["websearch"], "deny");
        let c = build(
            &valid_sidecar(json!({
                "organizationId": "o", "model": "a/b", "workspaces": {"idleTtlSeconds": 3600}
            })),
            &settings(),
            &material(),
            false,
        );
        let ttl = env_value(
            container(&c, "bridge"),
            bridge_env::WORKSPACE_IDLE_TTL_SECONDS,
        );
        assert_eq!(ttl.and_then(|e| e.value.as_deref()), Some("3600"));
        assert_eq!(permission["external_directory"], "allow");
        assert_eq!(permission["question"], "deny");
        assert!(
            serde_json::to_string(permission)
                .unwrap()
                .starts_with(r#"{"*":"allow""#),
            "`*` comes before every specific permission"
        );
    }

    #[test]
    fn the_opencode_config_denies_questions_and_turns_off_updates_and_sharing() {
        let mut config = opencode_config(
            &valid_sidecar(json!({
                "organizationId": "o", "model": "anthropic/claude-sonnet-4-5",
                "smallModel": "anthropic/claude-haiku-4-5", "ohMyOpencode": {}
            })),
            &settings(),
        );
        config.as_object_mut().unwrap().remove("mcp");
        assert!(
            opencode_config(
                &valid_sidecar(json!({"organizationId": "o", "model": "a/b", "lsp": true})),
                &settings()
            )["lsp"]
                == json!(true)
        );
        assert_eq!(
            config,
            json!({
                "model": "anthropic/claude-sonnet-4-5",
                "small_model": "anthropic/claude-haiku-4-5",
                "permission": {
                    "*": "allow", "question": "deny", "bash": "allow", "edit": "allow",
                    "webfetch": "allow", "websearch": "allow", "external_directory": "deny"
                },
                "autoupdate": false,
                "share": "disabled",
                "plugin": ["file:///opt/opencode/plugins/node_modules/oh-my-opencode"]
            })
        );
    }

    #[test]
    fn the_init_container_prepares_the_volume_and_writes_the_plugins_configuration() {
        let script = prepare_script();
        for expected in [
            "mkdir -p /data/workspace /data/workspaces /data/bridge /data/home",
            "/data/xdg/config/opencode/node_modules",
            r#"> /data/xdg/config/opencode/package-lock.json"#,
            "@opencode-ai/plugin",
            "rm -f /data/xdg/config/opencode/oh-my-openagent.json",
        ] {
            assert!(script.contains(expected), "{expected} in {script}");
        }
        let plain = build(
            &valid_sidecar(json!({"organizationId": "o", "model": "a/b"})),
            &settings(),
            &material(),
            false,
        );
        let prepare = &pod_spec(&plain).init_containers.as_ref().unwrap()[0];
        assert_eq!(prepare.command.as_ref().unwrap()[..2], ["sh", "-c"]);
        assert!(env_value(prepare, OH_MY_OPENCODE_CONFIG_ENV).is_none());
        let with_plugin = build(
            &valid_sidecar(json!({
                "organizationId": "o", "model": "a/b", "categories": {"quick": {"model": "a/fast"}},
                "ohMyOpencode": {"disabledAgents": ["oracle"]}
            })),
            &settings(),
            &material(),
            false,
        );
        let prepare = &pod_spec(&with_plugin).init_containers.as_ref().unwrap()[0];
        let config: Value = serde_json::from_str(
            env_value(prepare, OH_MY_OPENCODE_CONFIG_ENV)
                .and_then(|e| e.value.as_deref())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(config["agents"]["sisyphus"]["model"], "a/b");
        assert_eq!(config["categories"]["quick"]["model"], "a/fast");
        assert_eq!(config["disabled_agents"], json!(["oracle"]));
        // A configuration change rolls the pods: it is part of the pod template.
        assert_ne!(
            pod_spec(&plain).init_containers,
            pod_spec(&with_plugin).init_containers
        );
    }

    #[test]
    fn an_openai_compatible_provider_gets_the_adapter_its_models_categories_included_and_the_key_by_env()
     {
        let v = valid_sidecar(json!({
            "organizationId": "o", "model": "llm/big", "smallModel": "llm/small",
            "provider": {"baseURL": "http://llm.internal/v1", "apiKeySecretRef": {"name": "llm", "key": "api-key"}},
            "categories": {"quick": {"model": "llm/fast"}}
        }));
        let config = opencode_config(&v, &settings());
        assert_eq!(
            config["provider"],
            json!({"llm": {
                "npm": "@ai-sdk/openai-compatible",
                "models": {"big": {"tool_call": true}, "small": {"tool_call": true}, "fast": {"tool_call": true}},
                "options": {"baseURL": "http://llm.internal/v1", "apiKey": "{env:NUBABEL_PROVIDER_API_KEY}"}
            }})
        );
        let c = build(&v, &settings(), &material(), false);
        let key = env_value(container(&c, "opencode"), PROVIDER_API_KEY_ENV).unwrap();
        let reference = key
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!(
            (reference.name.as_str(), reference.key.as_str()),
            ("llm", "api-key")
        );
    }

    #[test]
    fn the_bridge_knows_its_sidecar_callback_url_and_pod_identity() {
        let c = minimal();
        let bridge = container(&c, "bridge");
        let value = |name| env_value(bridge, name).and_then(|e| e.value.clone());
        assert_eq!(
            value("OPENCODE_URL").as_deref(),
            Some("http://127.0.0.1:4096")
        );
        assert_eq!(value("NUBABEL_SIDECAR").as_deref(), Some("team-a/tenant-a"));
        assert_eq!(value("NUBABEL_ORGANIZATION_ID").as_deref(), Some("org-a"));
        assert_eq!(
            value("NUBABEL_CALLBACK_URL").as_deref(),
            Some("http://callback.test:8080")
        );
        let field = |name| {
            env_value(bridge, name)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.clone())
        };
        assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
        assert_eq!(field("POD_IP").as_deref(), Some("status.podIP"));
        let key = env_value(bridge, "NUBABEL_CALLBACK_SIGNING_KEY")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|f| f.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!(key.key, SIGNING_KEY);
        let probe = bridge
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        assert_eq!(probe.port, IntOrString::Int(BRIDGE_PORT));
    }

    #[test]
    fn without_storage_the_data_volume_is_an_empty_dir() {
        let c = minimal();
        let spec = c.stateful_set.spec.as_ref().unwrap();
        assert!(spec.volume_claim_templates.is_none());
        let data = pod_spec(&c)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "data")
            .unwrap();
        assert!(data.empty_dir.is_some());
    }

    #[test]
    fn storage_becomes_a_claim_template_named_like_the_data_volume() {
        let c = built(json!({
            "organizationId": "o", "model": "a/b",
            "storage": {"size": "10Gi", "storageClassName": "fast"}
        }));
        let spec = c.stateful_set.spec.as_ref().unwrap();
        let claims = spec.volume_claim_templates.as_ref().unwrap();
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let claim = claims[0].spec.as_ref().unwrap();
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
            "10Gi"
        );
        assert!(
            !pod_spec(&c)
                .volumes
                .iter()
                .flatten()
                .any(|v| v.name == "data")
        );
    }

    #[test]
    fn the_mcp_gateway_is_a_remote_mcp_server_with_the_token_by_env_and_the_fleet_identity() {
        let c = minimal();
        let opencode = container(&c, "opencode");
        let config: Value = serde_json::from_str(
            env_value(opencode, "OPENCODE_CONFIG_CONTENT")
                .and_then(|e| e.value.as_deref())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["mcp"],
            json!({"nubabel": {
                "type": "remote",
                "url": "http://callback.test:8080/mcp",
                "headers": {
                    "Authorization": "Bearer {env:NUBABEL_MCP_TOKEN}",
                    "x-nubabel-organization": "org-a",
                    "x-nubabel-sidecar": "team-a/tenant-a",
                    "x-nubabel-pod": "{env:NUBABEL_POD_NAME}",
                },
                "oauth": false,
                "timeout": 30000,
                "enabled": true,
            }})
        );
        // The token itself is only in the Secret, never in the pod spec.
        assert!(
            !serde_json::to_string(&c.stateful_set)
                .unwrap()
                .contains(&material().mcp_token)
        );
        let token = env_value(opencode, MCP_TOKEN_ENV).unwrap();
        let reference = token
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!(
            (reference.name.as_str(), reference.key.as_str()),
            ("tenant-a-sidecar", MCP_TOKEN_KEY)
        );
        let pod = env_value(opencode, POD_NAME_ENV).unwrap();
        assert_eq!(
            pod.value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .unwrap()
                .field_path,
            "metadata.name"
        );
    }

    #[test]
    fn the_secret_holds_the_password_the_key_and_the_organization() {
        let c = minimal();
        let data = c.secret.data.as_ref().unwrap();
        assert_eq!(data[PASSWORD_KEY].0, b"opencode-password-1");
        assert_eq!(data[SIGNING_KEY].0, material().callback_key.as_bytes());
        assert_eq!(data[MCP_TOKEN_KEY].0, material().mcp_token.as_bytes());
        assert_eq!(
            c.secret.metadata.annotations.as_ref().unwrap()[ORGANIZATION_ANNOTATION],
            "org-a"
        );
    }

    #[test]
    fn the_network_policy_admits_only_the_operator_and_allows_dns_callbacks_and_spec_egress() {
        let c = built(json!({
            "organizationId": "o", "model": "a/b",
            "egress": [{"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"], "ports": [443]}]
        }));
        let spec = c.network_policy.spec.as_ref().unwrap();
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_owned(), "Egress".to_owned()][..])
        );
        let ingress = spec.ingress.as_ref().unwrap();
        assert_eq!(ingress.len(), 1);
        let from = &ingress[0].from.as_ref().unwrap()[0];
        assert_eq!(
            from.pod_selector.as_ref().unwrap().match_labels,
            Some(settings().operator_pod_labels)
        );
        assert_eq!(
            from.namespace_selector.as_ref().unwrap().match_labels,
            Some(settings().operator_namespace_labels)
        );
        let egress = spec.egress.as_ref().unwrap();
        assert_eq!(egress.len(), 3);
        assert!(egress[0].to.is_none());
        assert_eq!(egress[0].ports.as_ref().unwrap().len(), 2);
        assert_eq!(
            egress[1].to.as_ref().unwrap()[0]
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels,
            Some(settings().callback_api_pod_labels)
        );
        let block = egress[2].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap();
        assert_eq!(block.cidr, "0.0.0.0/0");
        assert_eq!(
            block.except.as_deref(),
            Some(&["169.254.169.254/32".to_owned()][..])
        );
        assert_eq!(
            egress[2].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(443))
        );
    }

    #[test]
    fn the_pod_disruption_budget_is_left_out_where_policy_v1_is_not_served() {
        let c = build(
            &valid_sidecar(json!({"organizationId": "o", "model": "a/b"})),
            &settings(),
            &material(),
            false,
        );
        assert!(c.pod_disruption_budget.is_none());
        let with = minimal();
        let pdb = with.pod_disruption_budget.unwrap().spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    }

    #[test]
    fn a_config_change_changes_the_pod_template_hash_and_a_replica_change_does_not() {
        let hash = |spec| {
            built(spec)
                .stateful_set
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[CONFIG_HASH_ANNOTATION]
                .clone()
        };
        let base = hash(json!({"organizationId": "o", "model": "a/b"}));
        assert_eq!(base.len(), 32);
        assert_ne!(base, hash(json!({"organizationId": "o", "model": "a/c"})));
        assert_eq!(
            base,
            hash(json!({"organizationId": "o", "model": "a/b", "replicas": 3}))
        );
        let rotated = SecretMaterial {
            password: "other".to_owned(),
            ..material()
        };
        assert_ne!(config_hash("{}", &material()), config_hash("{}", &rotated));
    }

    #[test]
    fn placement_comes_from_the_spec() {
        let c = built(json!({
            "organizationId": "o", "model": "a/b",
            "nodeSelector": {"pool": "agents"},
            "tolerations": [{"key": "agents", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "low"
        }));
        let pod = pod_spec(&c);
        assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "agents");
        assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
        assert_eq!(pod.priority_class_name.as_deref(), Some("low"));
    }
}
