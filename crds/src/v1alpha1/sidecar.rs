//! `OpencodeSidecar`: one tenant's fleet of OpenCode server pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;

/// The desired state of a tenant's OpenCode sidecar fleet.
// NB: the printcolumn(...) lists repeat keys by design, which clippy reads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nubabel.io",
    version = "v1alpha1",
    kind = "OpencodeSidecar",
    plural = "opencodesidecars",
    singular = "opencodesidecar",
    shortname = "ocs",
    category = "nubabel",
    namespaced,
    status = "OpencodeSidecarStatus",
    doc = "A tenant's fleet of OpenCode server pods (`opencode serve` plus the event bridge), with resource limits and a scale subresource.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Organization",
        type_ = "string",
        json_path = ".spec.organizationId",
        description = "The tenant this fleet serves"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired number of sidecar pods"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Sidecar pods ready to take tasks"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model",
        priority = "1",
        description = "The LLM the sidecars use"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct OpencodeSidecarSpec {
    /// The Nubabel organization (tenant) this fleet serves. Tasks of other organizations are
    /// never dispatched to it. Immutable: the operator refuses a change.
    #[schemars(length(min = 1, max = 253))]
    pub organization_id: String,

    /// Number of sidecar pods. 0 suspends the fleet and keeps its storage. Changed by
    /// `kubectl scale` and HorizontalPodAutoscalers through the scale subresource.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Container image with the `opencode` binary, git, bash and ripgrep. Defaults to the
    /// image the operator is configured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// The model OpenCode uses, as `<provider>/<model>`, e.g. `anthropic/claude-sonnet-4-5`.
    #[schemars(length(min = 3))]
    pub model: String,

    /// A smaller model for titles and summaries, as `<provider>/<model>`. Defaults to `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub small_model: Option<String>,

    /// How to reach the model's provider: its API key and, for OpenAI-compatible endpoints,
    /// the base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderSpec>,

    /// Models for task categories, by category name (e.g. `quick`, `deep`): a task's
    /// `category` runs its turn on that entry's model. A task naming a category this map does
    /// not list fails `UnknownCategory` before anything is sent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub categories: BTreeMap<String, CategorySpec>,

    /// The skills tasks may load (`loadSkills`): a ConfigMap in this namespace whose keys are
    /// skill names and whose values are the skills' instructions (a `SKILL.md` body). A task's
    /// skills reach the agent as extra system instructions for its turn; a task naming a skill
    /// the ConfigMap lacks (or naming any skill when there is none) fails `UnknownSkill` before
    /// anything is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skills_config_map_ref: Option<ConfigMapRef>,

    /// Conversations' workspaces on this fleet's pods: their size limit, how long an idle one
    /// is kept, and what a task's workspace holds when the task does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspaces: Option<FleetWorkspaces>,

    /// What the agent may do, as OpenCode's permissions. Nobody answers OpenCode's questions
    /// in a pod, so each is `allow` or `deny`. Without it: everything is allowed except
    /// reading or writing outside the conversation's workspace (`externalDirectory: deny`)
    /// and asking questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<PermissionsSpec>,

    /// OpenCode plugins to load, by npm package name (installed in the image's plugin
    /// directory) or `file:///` path; nothing is installed when a pod starts. oh-my-opencode
    /// is turned on with `ohMyOpencode`, not here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,

    /// Runs the agent with the oh-my-opencode plugin (4.19, baked into the image): tasks go to
    /// its Sisyphus orchestrator, which can delegate to subagents (`oracle`, `librarian`,
    /// `explore`, category workers), in the foreground or in the background. Every agent and
    /// every built-in category of the plugin runs on the fleet's `model`; `categories` entries
    /// give a category its own model. Subagents' sessions belong to their task: their
    /// progress is in its stream and in `status.subagents`, and the task ends when they have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oh_my_opencode: Option<OhMyOpencodeSpec>,

    /// Turns on OpenCode's language servers: those the image carries (Pyright in the sidecar
    /// image) check each file the agent writes or edits, and their errors come back in the
    /// tool's answer, so the agent sees them. Off unless set (a server costs memory per
    /// conversation).
    #[serde(default)]
    pub lsp: bool,

    /// Resource requests and limits per container. Every container gets limits: what is not
    /// set here comes from the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SidecarResources>,

    /// How many OpenCode sessions one pod works on at once. Tasks beyond the fleet's capacity
    /// wait in phase Queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_sessions_per_pod: Option<i32>,

    /// Persistent storage for OpenCode's data (sessions, messages, snapshots). Without it,
    /// sessions live on an emptyDir and do not survive a pod restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,

    /// Where the sidecar pods may connect besides the callback API and DNS, e.g. the LLM
    /// provider and git hosts. Without rules, no other egress is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,

    /// Node labels the sidecar pods must run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the sidecar pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// PriorityClass of the sidecar pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Generation of the fleet's MCP gateway token (0 when unset). Raising it gives the fleet
    /// a new token and rolls its pods one by one; the gateway accepts every generation until
    /// an administrator retires the older ones (docs/callback-api.md, "Rotating a fleet's MCP
    /// token").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_token_generation: Option<u32>,
}

fn default_replicas() -> i32 {
    1
}

/// Default of `workspaces.idleTtlSeconds`: a week.
pub const DEFAULT_WORKSPACE_IDLE_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// How a fleet keeps its conversations' workspaces.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetWorkspaces {
    /// Largest a workspace may be once its repositories and files are in, e.g. `2Gi`; a larger
    /// one is removed and its task fails `WorkspaceTooLarge`. No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::quantity")]
    pub size_limit: Option<Quantity>,
    /// Seconds a workspace is kept after its conversation's last turn (counted from the end of
    /// the last turn that used it, while none of its sessions is busy); then the bridge removes
    /// it, and a later turn of the conversation starts from a fresh checkout. Default a week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60))]
    pub idle_ttl_seconds: Option<i64>,
    /// What a conversation's workspace holds when its first task has no `spec.workspace`
    /// (Secrets are read in the fleet's namespace, which is the task's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<super::task::WorkspaceSpec>,
}

/// Whether the agent may use a kind of tool.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PermissionAction {
    /// Without asking.
    Allow,
    /// Never: the tool call fails and the agent is told why.
    Deny,
}

/// The agent's permissions, each defaulting as documented.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionsSpec {
    /// Shell commands (the `bash` tool). Default `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bash: Option<PermissionAction>,
    /// Shell commands refused even where `bash` allows them, as patterns with `*` wildcards,
    /// e.g. `git push*`. Each starts with a letter, a digit, `.`, `/` or `_`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bash_deny: Vec<String>,
    /// Editing and writing files. Default `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<PermissionAction>,
    /// Fetching URLs (`webfetch`). Default `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webfetch: Option<PermissionAction>,
    /// Searching the web (`websearch`). Default `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websearch: Option<PermissionAction>,
    /// Reading or writing outside the conversation's workspace directory. Default `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_directory: Option<PermissionAction>,
}

/// How the oh-my-opencode plugin runs on a fleet. Names are checked against the plugin's
/// 4.19 agents, hooks and remote MCP servers; an unknown one is refused (`InvalidOhMyOpencode`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OhMyOpencodeSpec {
    /// Agents to turn off, e.g. `oracle`, `multimodal-looker` (`sisyphus` cannot be: it runs
    /// the tasks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled_agents: Vec<String>,

    /// The plugin's hooks to turn off, e.g. `comment-checker`, `todo-continuation-enforcer`.
    /// `auto-update-checker` and `startup-toast` are always off in a pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled_hooks: Vec<String>,

    /// The plugin's remote MCP servers to turn on (`context7`, `websearch`, `grep_app`). They
    /// are off unless listed here: a pod reaches only what `egress` allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_mcps: Vec<String>,

    /// Background subagents (`run_in_background`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<BackgroundSpec>,

    /// Send the plugin's anonymous usage telemetry. Off unless set.
    #[serde(default)]
    pub telemetry: bool,
}

/// Limits of background subagents.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackgroundSpec {
    /// Background subagents running at once per model (the plugin's `defaultConcurrency`;
    /// its default is 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: Option<u32>,

    /// How deep subagents may delegate further (the plugin's `maxDepth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub max_depth: Option<u32>,

    /// How long a task whose own turn is over waits for its background subagents, in
    /// seconds (default 600). Past it they are aborted and the task ends with the answer it
    /// has, saying which were aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub wait_seconds: Option<i64>,
}

/// What one task category runs on.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CategorySpec {
    /// The model, as `<provider>/<model>`, of the fleet's provider.
    #[schemars(length(min = 3))]
    pub model: String,
}

/// A ConfigMap in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The LLM provider of a sidecar fleet.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    /// The provider's id in OpenCode's config. Defaults to the part of `model` before the
    /// first `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,

    /// The Secret key holding the provider's API key, in the sidecar's namespace. It reaches
    /// the `opencode` container as an environment variable and nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Base URL of an OpenAI-compatible endpoint, e.g. `https://llm.internal/v1`. When set,
    /// the provider is configured through OpenCode's OpenAI-compatible adapter.
    #[serde(
        default,
        rename = "baseURL",
        alias = "baseUrl",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_url: Option<String>,
}

/// A key of a Secret in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Resource requests and limits of the sidecar pod's containers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarResources {
    /// The `opencode` container (the agent and the tools it runs). OpenCode takes about
    /// 315 MB idle and up to about 870 MB under work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opencode: Option<ContainerResources>,

    /// The `bridge` container that forwards OpenCode's events to the callback API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<ContainerResources>,
}

/// Requests and limits of one container, by resource name (`cpu`, `memory`,
/// `ephemeral-storage`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerResources {
    /// The resources the scheduler reserves for the container.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "schema::resource_list")]
    pub requests: BTreeMap<String, Quantity>,
    /// The most the container may use. Must not be below the request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "schema::resource_list")]
    pub limits: BTreeMap<String, Quantity>,
}

/// Persistent storage of a sidecar pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each pod's volume, e.g. `10Gi`.
    #[schemars(schema_with = "schema::quantity")]
    pub size: Quantity,
    /// StorageClass of the volume claims. Defaults to the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// One destination the sidecar pods may connect to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Destination network in CIDR notation, e.g. `0.0.0.0/0` or `10.20.0.0/16`.
    #[schemars(length(min = 1, max = 64))]
    pub cidr: String,
    /// Networks inside `cidr` that stay forbidden, e.g. the cloud metadata address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
    /// TCP ports allowed to that network. Empty allows every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub ports: Vec<i32>,
}

/// The observed state of a sidecar fleet.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpencodeSidecarStatus {
    /// Number of sidecar pods that exist.
    #[serde(default)]
    pub replicas: i32,

    /// Number of sidecar pods ready to take tasks.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the sidecar pods, for the scale subresource and autoscalers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Every sidecar pod, with its address, readiness and load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<SidecarPodStatus>,

    /// Ready, Progressing and Degraded, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One sidecar pod as the operator sees it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPodStatus {
    /// Name of the pod.
    pub name: String,
    /// The pod's IP address, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Whether the pod's OpenCode server and bridge are ready.
    #[serde(default)]
    pub ready: bool,
    /// OpenCode sessions the pod is working on now.
    #[serde(default)]
    pub active_sessions: i32,
}
