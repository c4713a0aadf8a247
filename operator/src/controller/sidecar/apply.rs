//! Step 4 of the sidecar pipeline: server-side applies every child, forcing the operator's
//! ownership of the fields it renders and leaving every other field to its writer.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::Children;
use crate::controller::FIELD_MANAGER;

/// Applying a child failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to apply {kind} {name}")]
pub struct Error {
    /// The child's kind.
    pub kind: &'static str,
    /// The child's name.
    pub name: String,
    /// The API error.
    #[source]
    pub source: kube::Error,
}

impl Error {
    /// Whether the API server refused the object itself (422, 400): retrying the same object
    /// cannot help, the spec must change. An immutable field is the usual cause.
    pub fn is_rejection(&self) -> bool {
        matches!(&self.source, kube::Error::Api(status) if status.code == 422 || status.code == 400)
    }

    /// The API server's message, for the Degraded condition.
    pub fn api_message(&self) -> Option<&str> {
        match &self.source {
            kube::Error::Api(status) => Some(status.message.as_str()),
            _ => None,
        }
    }
}

/// What applying returned that later steps read.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The StatefulSet as the API server has it, with its status.
    pub stateful_set: StatefulSet,
}

/// Applies every child in an order that lets each one work at once: the identity and Secret
/// before the pods that mount them, the NetworkPolicy before the pods it isolates.
pub async fn apply(
    client: &Client,
    namespace: &str,
    children: &Children,
) -> Result<Applied, Error> {
    // No `..`: a new kind of child fails to compile until it is applied here.
    let Children {
        service_account,
        secret,
        service,
        network_policy,
        stateful_set,
        pod_disruption_budget,
    } = children;
    apply_one(client, namespace, "ServiceAccount", service_account).await?;
    apply_one(client, namespace, "Secret", secret).await?;
    apply_one(client, namespace, "Service", service).await?;
    apply_one(client, namespace, "NetworkPolicy", network_policy).await?;
    let stateful_set = apply_one(client, namespace, "StatefulSet", stateful_set).await?;
    if let Some(budget) = pod_disruption_budget {
        apply_one(client, namespace, "PodDisruptionBudget", budget).await?;
    }
    Ok(Applied { stateful_set })
}

async fn apply_one<K>(
    client: &Client,
    namespace: &str,
    kind: &'static str,
    object: &K,
) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.name_any();
    // k8s-openapi writes apiVersion and kind, which an apply body needs.
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error { kind, name, source })
}
