//! The bridge's environment: the names the operator sets in every sidecar pod and the bridge
//! reads its configuration from.

/// The pod's OpenCode server.
pub const OPENCODE_URL: &str = "OPENCODE_URL";
/// OpenCode's server password (basic auth).
pub const OPENCODE_PASSWORD: &str = "OPENCODE_SERVER_PASSWORD";
/// OpenCode's basic-auth user.
pub const OPENCODE_USERNAME: &str = "OPENCODE_SERVER_USERNAME";
/// The callback API's base URL.
pub const CALLBACK_URL: &str = "NUBABEL_CALLBACK_URL";
/// The fleet's callback signing key, `whsec_<base64>`.
pub const SIGNING_KEY: &str = "NUBABEL_CALLBACK_SIGNING_KEY";
/// The fleet, as `<namespace>/<name>`.
pub const SIDECAR: &str = "NUBABEL_SIDECAR";
/// The tenant.
pub const ORGANIZATION_ID: &str = "NUBABEL_ORGANIZATION_ID";
/// The pod's name.
pub const POD_NAME: &str = "POD_NAME";
/// The pod's IP.
pub const POD_IP: &str = "POD_IP";
/// Where the bridge serves `/healthz`, `/readyz` and `/metrics`.
pub const LISTEN_ADDR: &str = "NUBABEL_BRIDGE_ADDR";
/// The directory the bridge makes conversations' workspaces in (on the data volume OpenCode
/// shares); without it the bridge prepares no workspaces.
pub const WORKSPACES_DIR: &str = "NUBABEL_WORKSPACES_DIR";
/// The bridge's private directory for its copies of the workspaces' repositories, on a
/// directory of the data volume only the bridge mounts; required with [`WORKSPACES_DIR`].
pub const WORKSPACE_STATE_DIR: &str = "NUBABEL_WORKSPACE_STATE_DIR";
/// Seconds a workspace is kept after its last use while none of its sessions is busy.
pub const WORKSPACE_IDLE_TTL_SECONDS: &str = "NUBABEL_WORKSPACE_IDLE_TTL_SECONDS";
