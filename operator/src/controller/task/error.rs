//! What can go wrong in one reconcile of a task, each with a stable category for metrics and
//! event reasons.

use super::workspace::WorkspaceError;
use crate::controller::fleet::AccessError;

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The task lacks a namespace or uid.
    #[error("task has no {0}")]
    MissingMetadata(&'static str),
    /// A name the task or its fleet carries is not a valid identity (the API server's schema
    /// normally keeps these out).
    #[error("invalid {what}: {value:?}")]
    InvalidIdentity {
        /// Which name.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// The Kubernetes API failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),
    /// The database failed.
    #[error("database request failed: {0}")]
    Data(#[source] nubabel_store::error::Error),
    /// The fleet's OpenCode server could not be reached (no password or pod IP yet).
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The sidecar's OpenCode server failed or could not be reached.
    #[error("OpenCode request to pod {pod} failed: {source}")]
    Opencode {
        /// The pod.
        pod: String,
        /// What failed.
        #[source]
        source: nubabel_opencode::Error,
    },
    /// The conversation's workspace could not be prepared this time (the bridge was not
    /// reached, or a Secret could not be read); a refusal ends the task instead.
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
    /// Adding or removing the finalizer failed.
    #[error("finalizer update failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A stable name for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::MissingMetadata(_) => "MissingMetadata",
            Self::InvalidIdentity { .. } => "InvalidIdentity",
            Self::Kube(_) | Self::Access(AccessError::ReadSecret { .. }) => "KubernetesApi",
            Self::Data(_) => "Database",
            Self::Opencode { .. } | Self::Access(AccessError::Client { .. }) => {
                "OpencodeUnreachable"
            }
            Self::Access(AccessError::NoPassword(_)) => "SidecarNotProvisioned",
            Self::Access(AccessError::NoPodIp(_)) => "PodNotAddressable",
            Self::Workspace(WorkspaceError::ReadSecret { .. }) => "KubernetesApi",
            Self::Workspace(_) => "BridgeUnreachable",
            Self::Finalizer(_) => "Finalizer",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Self::Kube(error)
    }
}

impl From<nubabel_store::error::Error> for Error {
    fn from(error: nubabel_store::error::Error) -> Self {
        Self::Data(error)
    }
}
