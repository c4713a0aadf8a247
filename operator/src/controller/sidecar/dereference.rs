//! Step 1 of the sidecar pipeline: reads what already exists and must be kept, namely the
//! sidecar's Secret (its OpenCode password is generated once and never replaced, and it
//! records the organization the fleet was created for), and which organizations a cluster
//! admin bound the fleet's namespace to.

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;

use crate::controller::fleet::{
    NAMESPACE_ORGANIZATIONS_ANNOTATION, ORGANIZATION_ANNOTATION, PASSWORD_KEY, secret_name,
};

/// Reading the sidecar's children failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The fleet's Namespace could not be read.
    #[error("failed to read Namespace {name}")]
    ReadNamespace {
        /// The namespace.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The Secret could not be read.
    #[error("failed to read Secret {name}")]
    ReadSecret {
        /// The Secret's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What exists of a sidecar's children and must survive the reconcile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The organization the fleet was created for, as recorded on its Secret.
    pub recorded_organization: Option<String>,
    /// The OpenCode server password already in the Secret.
    pub password: Option<String>,
    /// The namespace's `nubabel.io/organizations` annotation, when it was read and is set.
    pub namespace_organizations: Option<String>,
}

impl Observed {
    /// Extracts what matters from the sidecar's Secret, when it exists.
    pub fn from_secret(secret: Option<&Secret>) -> Self {
        let Some(secret) = secret else {
            return Self::default();
        };
        let recorded_organization = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ORGANIZATION_ANNOTATION))
            .cloned();
        let password = secret
            .data
            .as_ref()
            .and_then(|data| data.get(PASSWORD_KEY))
            .and_then(|value| String::from_utf8(value.0.clone()).ok())
            .filter(|password| !password.is_empty());
        Self {
            recorded_organization,
            password,
            namespace_organizations: None,
        }
    }
}

/// The organizations annotation of `namespace`, if it has one.
pub fn namespace_organizations(namespace: &Namespace) -> Option<String> {
    namespace
        .metadata
        .annotations
        .as_ref()?
        .get(NAMESPACE_ORGANIZATIONS_ANNOTATION)
        .cloned()
}

/// Reads the organizations `namespace` is bound to, when `namespaces` is given (binding is
/// required), and the Secret of sidecar `name` in the namespace of `secrets`.
pub async fn observe(
    namespaces: Option<&Api<Namespace>>,
    namespace: &str,
    secrets: &Api<Secret>,
    name: &str,
) -> Result<Observed, Error> {
    let namespace_organizations = match namespaces {
        Some(namespaces) => namespaces
            .get_opt(namespace)
            .await
            .map_err(|source| Error::ReadNamespace {
                name: namespace.to_owned(),
                source,
            })?
            .as_ref()
            .and_then(namespace_organizations),
        None => None,
    };
    let secret_name = secret_name(name);
    let secret = secrets
        .get_opt(&secret_name)
        .await
        .map_err(|source| Error::ReadSecret {
            name: secret_name,
            source,
        })?;
    Ok(Observed {
        namespace_organizations,
        ..Observed::from_secret(secret.as_ref())
    })
}
