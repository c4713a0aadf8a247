//! Step 2 of the sidecar pipeline, pure: turns an `OpencodeSidecar` and what was observed of
//! its children into a [`ValidSidecar`] with every default applied, or into an error the user
//! must fix in the spec. Nothing here talks to the API server.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use nubabel_contract::identity::{InvalidIdentity, SidecarIdentity};
use nubabel_crds::v1alpha1::{
    CategorySpec, ContainerResources, DEFAULT_WORKSPACE_IDLE_TTL_SECONDS, EgressRule,
    OpencodeSidecar, PermissionsSpec, SecretKeyRef, StorageSpec,
};
use sha2::{Digest, Sha256};

use super::Settings;
use super::dereference::Observed;
use super::oh_my_opencode::{self, ValidOhMyOpencode};
use crate::controller::fleet;
use crate::quantity::{InvalidQuantity, ParsedQuantity};

/// Longest `OpencodeSidecar` name: the StatefulSet controller labels pods with
/// `<name>-<10-character hash>`, and label values stop at 63 characters.
pub const MAX_NAME_LEN: usize = 52;

/// A spec the operator cannot run. Each variant has a [`reason`](Error::reason) for the
/// Degraded condition and the Warning event; the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a namespace, name or uid (the API server always sets them).
    #[error("metadata.{0} is missing")]
    MissingMetadata(&'static str),
    /// The name cannot name the StatefulSet and the Service.
    #[error(
        "metadata.name {0:?} must be a DNS label of at most {MAX_NAME_LEN} characters that starts with a letter"
    )]
    InvalidName(String),
    /// The organization id cannot be bound into a signing key.
    #[error("spec.organizationId is invalid")]
    InvalidOrganization(#[source] InvalidIdentity),
    /// The organization id differs from the one the fleet was created for.
    #[error(
        "spec.organizationId is immutable: this fleet serves {recorded:?}, not {requested:?}; \
         set it back, or create a new OpencodeSidecar for the other organization"
    )]
    OrganizationChanged {
        /// The organization the fleet was created for.
        recorded: String,
        /// The organization the spec asks for now.
        requested: String,
    },
    /// No cluster admin bound the namespace to the organization.
    #[error(
        "namespace {namespace} is not bound to organization {organization:?}, so the fleet gets \
         no keys: a cluster admin binds it with `kubectl annotate namespace {namespace} \
         nubabel.io/organizations={organization}` (a comma-separated list for several)"
    )]
    NamespaceNotBound {
        /// The fleet's namespace.
        namespace: String,
        /// The organization the spec names.
        organization: String,
    },
    /// A model is not `<provider>/<model>`.
    #[error(
        "spec.{field} must be <provider>/<model>, e.g. anthropic/claude-sonnet-4-5; got {value:?}"
    )]
    InvalidModel {
        /// `model`, `smallModel` or `categories.<name>.model`.
        field: String,
        /// The value given.
        value: String,
    },
    /// The provider id or base URL is unusable.
    #[error("spec.provider: {0}")]
    InvalidProvider(String),
    /// A plugin would have to be downloaded when the pod starts.
    #[error(
        "spec.plugins: {0:?} must be an npm package name without a version (installed in the image) or a file:/// path"
    )]
    InvalidPlugin(String),
    /// `spec.ohMyOpencode` names something the plugin does not have, or the plugin is listed
    /// in `spec.plugins`.
    #[error("spec.ohMyOpencode: {0}")]
    InvalidOhMyOpencode(String),
    /// A quantity does not parse.
    #[error("{field}: {source}")]
    InvalidQuantity {
        /// Where the quantity is.
        field: String,
        /// Why it does not parse.
        #[source]
        source: InvalidQuantity,
    },
    /// A limit is below its request, so the pod could never be admitted.
    #[error(
        "spec.resources.{container}: the {resource} limit {limit} is below the request {request}"
    )]
    LimitBelowRequest {
        /// The container.
        container: &'static str,
        /// The resource (`cpu`, `memory`, ...).
        resource: String,
        /// The request given.
        request: String,
        /// The limit given.
        limit: String,
    },
    /// An egress rule names no network.
    #[error("spec.egress: {0:?} is not a CIDR such as 10.0.0.0/8")]
    InvalidEgress(String),
    /// A `bashDeny` pattern is empty or starts with a character that would order it before
    /// the base rule.
    #[error(
        "spec.permissions.bashDeny: {0:?} must start with a letter, a digit, `.`, `/` or `_` and hold no control characters"
    )]
    InvalidPermissions(String),
}

impl Error {
    /// The PascalCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingMetadata(_) => "MissingMetadata",
            Self::InvalidName(_) => "InvalidName",
            Self::InvalidOrganization(_) => "InvalidOrganization",
            Self::OrganizationChanged { .. } => "OrganizationChanged",
            Self::NamespaceNotBound { .. } => "NamespaceNotBound",
            Self::InvalidModel { .. } => "InvalidModel",
            Self::InvalidProvider(_) => "InvalidProvider",
            Self::InvalidPlugin(_) => "InvalidPlugin",
            Self::InvalidOhMyOpencode(_) => "InvalidOhMyOpencode",
            Self::InvalidQuantity { .. } => "InvalidQuantity",
            Self::LimitBelowRequest { .. } => "LimitBelowRequest",
            Self::InvalidEgress(_) => "InvalidEgress",
            Self::InvalidPermissions(_) => "InvalidPermissions",
        }
    }
}

/// How OpenCode reaches its model.
#[derive(Clone, Debug, PartialEq)]
pub struct Provider {
    /// The provider id in OpenCode's config.
    pub id: String,
    /// Where the API key is.
    pub api_key: Option<SecretKeyRef>,
    /// An OpenAI-compatible endpoint.
    pub base_url: Option<String>,
}

/// Requests and limits of the pod's three containers, complete.
#[derive(Clone, Debug, PartialEq)]
pub struct PodResources {
    /// The `opencode` container.
    pub opencode: ResourceRequirements,
    /// The `bridge` container.
    pub bridge: ResourceRequirements,
    /// The init container that prepares the data volume.
    pub prepare: ResourceRequirements,
}

/// An `OpencodeSidecar` that can be built, with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSidecar {
    /// Name of the object, and of the StatefulSet, Service, NetworkPolicy and PDB.
    pub name: String,
    /// Namespace of the object and all its children.
    pub namespace: String,
    /// The generation this was validated from.
    pub generation: Option<i64>,
    /// The controller reference every child carries.
    pub owner: OwnerReference,
    /// Tenant, namespace and name, as bound into the callback signing key.
    pub identity: SidecarIdentity,
    /// The organization id as a label value (hashed when it is not label-safe).
    pub organization_label: String,
    /// Desired pods.
    pub replicas: i32,
    /// Image of the `opencode` container.
    pub image: String,
    /// `<provider>/<model>`.
    pub model: String,
    /// `<provider>/<model>` for titles and summaries.
    pub small_model: String,
    /// The model's provider.
    pub provider: Provider,
    /// Task categories and their `<provider>/<model>`, all of the fleet's provider.
    pub categories: BTreeMap<String, String>,
    /// What the agent may do (defaults applied when the config is built).
    pub permissions: PermissionsSpec,
    /// Seconds the bridge keeps an unused workspace.
    pub workspace_idle_ttl_seconds: i64,
    /// Plugins as `file://` URLs (oh-my-opencode's included when it is on).
    pub plugins: Vec<String>,
    /// The oh-my-opencode plugin, when the fleet runs it.
    pub oh_my_opencode: Option<ValidOhMyOpencode>,
    /// Whether OpenCode's language servers are on.
    pub lsp: bool,
    /// Requests and limits.
    pub resources: PodResources,
    /// A volume claim per pod, or an emptyDir when absent.
    pub storage: Option<StorageSpec>,
    /// Extra destinations the pods may reach.
    pub egress: Vec<EgressRule>,
    /// Node selector of the pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pods.
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the pods.
    pub priority_class_name: Option<String>,
}

/// Operator defaults for one container: `(resource, request, limit)`.
type Defaults = &'static [(&'static str, &'static str, &'static str)];

/// OpenCode takes about 315 MB idle and 520-870 MB under work; tools it runs (bash, git, rg)
/// come on top. The request covers a working server, the limit its measured peak with room.
pub const OPENCODE_DEFAULTS: Defaults = &[("cpu", "250m", "2"), ("memory", "768Mi", "1536Mi")];
/// The bridge only relays events.
pub const BRIDGE_DEFAULTS: Defaults = &[("cpu", "10m", "200m"), ("memory", "32Mi", "128Mi")];
/// The init container only creates directories.
pub const PREPARE_DEFAULTS: Defaults = &[("cpu", "10m", "100m"), ("memory", "16Mi", "64Mi")];

/// Validates `sidecar` against what was observed of its children.
pub fn validate(
    sidecar: &OpencodeSidecar,
    observed: &Observed,
    settings: &Settings,
) -> Result<ValidSidecar, Error> {
    let name = sidecar.name_any();
    let namespace = sidecar
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    if !is_dns_label(&name, MAX_NAME_LEN) {
        return Err(Error::InvalidName(name));
    }
    let owner = sidecar
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    let spec = &sidecar.spec;

    let identity = SidecarIdentity::new(&spec.organization_id, &namespace, &name)
        .map_err(Error::InvalidOrganization)?;
    if let Some(recorded) = &observed.recorded_organization
        && recorded != &spec.organization_id
    {
        return Err(Error::OrganizationChanged {
            recorded: recorded.clone(),
            requested: spec.organization_id.clone(),
        });
    }
    if settings.require_namespace_binding
        && !fleet::namespace_binds(
            observed.namespace_organizations.as_deref(),
            &spec.organization_id,
        )
    {
        return Err(Error::NamespaceNotBound {
            namespace: namespace.clone(),
            organization: spec.organization_id.clone(),
        });
    }

    let model = model_ref("model", &spec.model)?;
    let small_model = match &spec.small_model {
        Some(small) => model_ref("smallModel", small)?,
        None => model.clone(),
    };
    let provider = provider(spec.provider.as_ref(), &model)?;
    let categories = categories(&spec.categories, &provider.id)?;
    let permissions = spec.permissions.clone().unwrap_or_default();
    if let Some(bad) = permissions
        .bash_deny
        .iter()
        .find(|p| !is_command_pattern(p))
    {
        return Err(Error::InvalidPermissions(bad.clone()));
    }
    if let Some(listed) = spec.plugins.iter().find(|p| {
        oh_my_opencode::PACKAGE_NAMES
            .iter()
            .any(|name| p.as_str() == *name || p.contains(&format!("/node_modules/{name}")))
    }) {
        return Err(Error::InvalidOhMyOpencode(format!(
            "{listed:?} is in spec.plugins: turn the plugin on with spec.ohMyOpencode (`{{}}` for its defaults), which also configures it"
        )));
    }
    let oh_my_opencode = spec
        .oh_my_opencode
        .as_ref()
        .map(oh_my_opencode::validate)
        .transpose()
        .map_err(Error::InvalidOhMyOpencode)?;
    let mut plugins: Vec<String> = spec
        .plugins
        .iter()
        .map(|plugin| plugin_url(plugin, &settings.plugin_dir))
        .collect::<Result<_, _>>()?;
    if oh_my_opencode.is_some() {
        plugins.push(plugin_url(oh_my_opencode::PACKAGE, &settings.plugin_dir)?);
    }

    let requested = spec.resources.as_ref();
    let resources = PodResources {
        opencode: container_resources(
            "opencode",
            requested.and_then(|r| r.opencode.as_ref()),
            OPENCODE_DEFAULTS,
        )?,
        bridge: container_resources(
            "bridge",
            requested.and_then(|r| r.bridge.as_ref()),
            BRIDGE_DEFAULTS,
        )?,
        prepare: container_resources("prepare", None, PREPARE_DEFAULTS)?,
    };
    if let Some(limit) = spec.workspaces.as_ref().and_then(|w| w.size_limit.as_ref()) {
        ParsedQuantity::parse(&limit.0).map_err(|source| Error::InvalidQuantity {
            field: "spec.workspaces.sizeLimit".to_owned(),
            source,
        })?;
    }
    if let Some(storage) = &spec.storage {
        ParsedQuantity::parse(&storage.size.0).map_err(|source| Error::InvalidQuantity {
            field: "spec.storage.size".to_owned(),
            source,
        })?;
    }
    for rule in &spec.egress {
        for cidr in std::iter::once(&rule.cidr).chain(&rule.except) {
            if !is_cidr(cidr) {
                return Err(Error::InvalidEgress(cidr.clone()));
            }
        }
    }

    Ok(ValidSidecar {
        organization_label: label_safe(&spec.organization_id),
        name,
        namespace,
        generation: sidecar.metadata.generation,
        owner,
        identity,
        replicas: spec.replicas.max(0),
        image: spec
            .image
            .clone()
            .filter(|image| !image.trim().is_empty())
            .unwrap_or_else(|| settings.default_image.clone()),
        model,
        small_model,
        provider,
        categories,
        permissions,
        workspace_idle_ttl_seconds: spec
            .workspaces
            .as_ref()
            .and_then(|w| w.idle_ttl_seconds)
            .unwrap_or(DEFAULT_WORKSPACE_IDLE_TTL_SECONDS),
        plugins,
        oh_my_opencode,
        lsp: spec.lsp,
        resources,
        storage: spec.storage.clone(),
        egress: spec.egress.clone(),
        node_selector: spec.node_selector.clone(),
        tolerations: spec.tolerations.clone(),
        priority_class_name: spec.priority_class_name.clone(),
    })
}

/// Whether a `bashDeny` pattern sorts after `*` (OpenCode's permission map is written in key
/// order, and the base rule must come first) and is printable.
fn is_command_pattern(pattern: &str) -> bool {
    pattern
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_'))
        && !pattern.chars().any(char::is_control)
}

/// The category map, each model checked and of the fleet's provider (the only one configured).
fn categories(
    categories: &BTreeMap<String, CategorySpec>,
    provider_id: &str,
) -> Result<BTreeMap<String, String>, Error> {
    categories
        .iter()
        .map(|(name, category)| {
            let field = format!("categories.{name}.model");
            let model = model_ref(&field, &category.model)?;
            if model.split_once('/').map(|(p, _)| p) != Some(provider_id) {
                return Err(Error::InvalidModel {
                    field,
                    value: format!("{model} (the fleet's provider is {provider_id})"),
                });
            }
            Ok((name.clone(), model))
        })
        .collect()
}

fn model_ref(field: &str, value: &str) -> Result<String, Error> {
    match value.split_once('/') {
        Some((provider, model))
            if is_provider_id(provider)
                && !model.is_empty()
                && !model.contains(char::is_whitespace) =>
        {
            Ok(value.to_owned())
        }
        _ => Err(Error::InvalidModel {
            field: field.to_owned(),
            value: value.to_owned(),
        }),
    }
}

fn is_provider_id(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn provider(
    spec: Option<&nubabel_crds::v1alpha1::ProviderSpec>,
    model: &str,
) -> Result<Provider, Error> {
    let model_provider = model.split_once('/').map_or(model, |(p, _)| p);
    let id = spec
        .and_then(|p| p.id.clone())
        .unwrap_or_else(|| model_provider.to_owned());
    if !is_provider_id(&id) {
        return Err(Error::InvalidProvider(format!(
            "id {id:?} must be letters, digits, '-', '_' or '.'"
        )));
    }
    if id != model_provider {
        return Err(Error::InvalidProvider(format!(
            "id {id:?} must match the provider of spec.model ({model_provider:?})"
        )));
    }
    let base_url = spec.and_then(|p| p.base_url.clone());
    if let Some(url) = &base_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(Error::InvalidProvider(format!(
            "baseURL {url:?} must start with http:// or https://"
        )));
    }
    Ok(Provider {
        id,
        api_key: spec.and_then(|p| p.api_key_secret_ref.clone()),
        base_url,
    })
}

/// An npm package name (`oh-my-opencode`, `@scope/name`) maps to its install in the image's
/// plugin directory; a `file:///` URL is kept. Anything else would be fetched at start.
fn plugin_url(plugin: &str, plugin_dir: &str) -> Result<String, Error> {
    if let Some(path) = plugin.strip_prefix("file://") {
        return if path.starts_with('/') && !path.contains("/../") {
            Ok(plugin.to_owned())
        } else {
            Err(Error::InvalidPlugin(plugin.to_owned()))
        };
    }
    let segment = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
            })
    };
    let valid = match plugin.strip_prefix('@') {
        Some(scoped) => scoped
            .split_once('/')
            .is_some_and(|(scope, name)| segment(scope) && segment(name)),
        None => segment(plugin),
    };
    if valid && plugin.len() <= 214 {
        Ok(format!(
            "file://{}/node_modules/{plugin}",
            plugin_dir.trim_end_matches('/')
        ))
    } else {
        Err(Error::InvalidPlugin(plugin.to_owned()))
    }
}

/// Merges the spec's requests and limits over the operator's defaults. Every resource with a
/// request gets a limit. A default limit below a spec request is raised to it, and a default
/// request above a spec limit is lowered to it; only a limit below a request that were both
/// given in the spec is an error.
fn container_resources(
    container: &'static str,
    spec: Option<&ContainerResources>,
    defaults: Defaults,
) -> Result<ResourceRequirements, Error> {
    // (value, given in the spec)
    let mut requests: BTreeMap<String, (String, bool)> = BTreeMap::new();
    let mut limits: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for (resource, request, limit) in defaults {
        requests.insert((*resource).to_owned(), ((*request).to_owned(), false));
        limits.insert((*resource).to_owned(), ((*limit).to_owned(), false));
    }
    if let Some(spec) = spec {
        for (kind, given, target) in [
            ("requests", &spec.requests, &mut requests),
            ("limits", &spec.limits, &mut limits),
        ] {
            for (resource, Quantity(value)) in given {
                ParsedQuantity::parse(value).map_err(|source| Error::InvalidQuantity {
                    field: format!("spec.resources.{container}.{kind}.{resource}"),
                    source,
                })?;
                target.insert(resource.clone(), (value.clone(), true));
            }
        }
    }

    for (resource, (request, request_given)) in &mut requests {
        let Some((limit, limit_given)) = limits.get_mut(resource) else {
            limits.insert(resource.clone(), (request.clone(), false));
            continue;
        };
        let limit_value = parse_known(limit)?;
        let request_value = parse_known(request)?;
        if limit_value >= request_value {
            continue;
        }
        match (*request_given, *limit_given) {
            (true, true) => {
                return Err(Error::LimitBelowRequest {
                    container,
                    resource: resource.clone(),
                    request: request.clone(),
                    limit: limit.clone(),
                });
            }
            (_, false) => *limit = request.clone(),
            (false, true) => *request = limit.clone(),
        }
    }

    let to_map = |map: BTreeMap<String, (String, bool)>| {
        map.into_iter()
            .map(|(resource, (value, _))| (resource, Quantity(value)))
            .collect()
    };
    Ok(ResourceRequirements {
        requests: Some(to_map(requests)),
        limits: Some(to_map(limits)),
        ..ResourceRequirements::default()
    })
}

fn parse_known(value: &str) -> Result<ParsedQuantity, Error> {
    ParsedQuantity::parse(value).map_err(|source| Error::InvalidQuantity {
        field: "spec.resources".to_owned(),
        source,
    })
}

/// An RFC 1035 label: starts with a letter, then letters, digits and `-`, ends alphanumeric.
fn is_dns_label(name: &str, max: usize) -> bool {
    name.len() <= max
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => prefix <= 32,
        Ok(IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

/// The organization id as a label value: itself when label-safe, else a digest of it, so a
/// label never fails validation and still tells tenants apart.
pub fn label_safe(value: &str) -> String {
    let safe = value.len() <= 63
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if safe {
        return value.to_owned();
    }
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("sha256-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::sidecar::test_support::{settings, sidecar};

    fn valid(spec: serde_json::Value) -> Result<ValidSidecar, Error> {
        validate(&sidecar(spec), &Observed::default(), &settings())
    }

    fn quantity(map: &Option<BTreeMap<String, Quantity>>, key: &str) -> String {
        map.as_ref().and_then(|m| m.get(key)).unwrap().0.clone()
    }

    #[test]
    fn a_minimal_spec_gets_the_operator_defaults() {
        let v = valid(
            serde_json::json!({"organizationId": "org-a", "model": "anthropic/claude-sonnet-4-5"}),
        )
        .unwrap();
        assert_eq!(v.image, settings().default_image);
        assert_eq!(v.replicas, 1);
        assert_eq!(v.small_model, "anthropic/claude-sonnet-4-5");
        assert_eq!(v.provider.id, "anthropic");
        assert_eq!(quantity(&v.resources.opencode.requests, "memory"), "768Mi");
        assert_eq!(quantity(&v.resources.opencode.limits, "memory"), "1536Mi");
        assert_eq!(quantity(&v.resources.bridge.limits, "cpu"), "200m");
        assert_eq!(v.organization_label, "org-a");
    }

    #[test]
    fn a_fleet_runs_only_where_its_namespace_is_bound_to_its_organization() {
        let required = Settings {
            require_namespace_binding: true,
            ..settings()
        };
        let spec = serde_json::json!({"organizationId": "org-a", "model": "a/b"});
        let bound_to = |annotation: Option<&str>| {
            let observed = Observed {
                namespace_organizations: annotation.map(str::to_owned),
                ..Observed::default()
            };
            validate(&sidecar(spec.clone()), &observed, &required)
        };
        assert!(bound_to(Some("org-a")).is_ok());
        assert!(bound_to(Some("org-z, org-a ,")).is_ok());
        for refused in [None, Some(""), Some("org-b"), Some("org-a-x"), Some("org")] {
            let error = bound_to(refused).unwrap_err();
            assert_eq!(error.reason(), "NamespaceNotBound", "{refused:?}");
            let message = error.to_string();
            assert!(
                message.contains("team-a") && message.contains("nubabel.io/organizations=org-a"),
                "{message}"
            );
        }
        // Where binding is not required, the annotation is not consulted.
        assert!(validate(&sidecar(spec), &Observed::default(), &settings()).is_ok());
    }

    #[test]
    fn a_limit_below_its_request_is_a_validation_error() {
        let error = valid(serde_json::json!({
            "organizationId": "org-a", "model": "a/b",
            "resources": {"opencode": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}
        }))
        .unwrap_err();
        assert_eq!(error.reason(), "LimitBelowRequest");
        assert!(
            error
                .to_string()
                .contains("memory limit 1Gi is below the request 2Gi")
        );
    }

    #[test]
    fn an_unparsable_quantity_is_a_validation_error_naming_the_field() {
        let error = valid(serde_json::json!({
            "organizationId": "org-a", "model": "a/b",
            "resources": {"bridge": {"limits": {"cpu": "lots"}}}
        }))
        .unwrap_err();
        assert_eq!(error.reason(), "InvalidQuantity");
        assert!(
            error
                .to_string()
                .contains("spec.resources.bridge.limits.cpu")
        );
    }

    #[test]
    fn a_spec_request_above_the_default_limit_raises_the_limit() {
        let v = valid(serde_json::json!({
            "organizationId": "org-a", "model": "a/b",
            "resources": {"opencode": {"requests": {"memory": "3Gi"}}}
        }))
        .unwrap();
        assert_eq!(quantity(&v.resources.opencode.limits, "memory"), "3Gi");
    }

    #[test]
    fn a_spec_limit_below_the_default_request_lowers_the_request() {
        let v = valid(serde_json::json!({
            "organizationId": "org-a", "model": "a/b",
            "resources": {"opencode": {"limits": {"memory": "512Mi", "ephemeral-storage": "2Gi"}}}
        }))
        .unwrap();
        assert_eq!(quantity(&v.resources.opencode.requests, "memory"), "512Mi");
        assert_eq!(quantity(&v.resources.opencode.limits, "memory"), "512Mi");
        assert_eq!(
            quantity(&v.resources.opencode.limits, "ephemeral-storage"),
            "2Gi"
        );
    }

    #[test]
    fn a_resource_requested_without_a_limit_gets_its_request_as_limit() {
        let v = valid(serde_json::json!({
            "organizationId": "org-a", "model": "a/b",
            "resources": {"opencode": {"requests": {"ephemeral-storage": "1Gi"}}}
        }))
        .unwrap();
        assert_eq!(
            quantity(&v.resources.opencode.limits, "ephemeral-storage"),
            "1Gi"
        );
    }

    #[test]
    fn a_changed_organization_is_refused() {
        let observed = Observed {
            recorded_organization: Some("org-old".to_owned()),
            ..Observed::default()
        };
        let error = validate(
            &sidecar(serde_json::json!({"organizationId": "org-new", "model": "a/b"})),
            &observed,
            &settings(),
        )
        .unwrap_err();
        assert_eq!(error.reason(), "OrganizationChanged");
        assert!(error.to_string().contains("org-old"));
    }

    #[test]
    fn a_bash_deny_pattern_must_order_after_the_base_rule() {
        for good in ["git push*", "./deploy.sh*", "/usr/bin/curl *", "_x"] {
            assert!(is_command_pattern(good), "{good}");
        }
        for bad in ["", "*", " rm", "!x", "(x)", "a\nb"] {
            let error = valid(serde_json::json!({
                "organizationId": "o", "model": "a/b", "permissions": {"bashDeny": [bad]}
            }))
            .unwrap_err();
            assert_eq!(error.reason(), "InvalidPermissions", "{bad:?}");
        }
    }

    #[test]
    fn category_models_must_be_models_of_the_fleets_provider() {
        let v = valid(serde_json::json!({
            "organizationId": "o", "model": "a/b", "categories": {"quick": {"model": "a/fast"}}
        }))
        .unwrap();
        assert_eq!(
            v.categories.get("quick").map(String::as_str),
            Some("a/fast")
        );
        for bad in ["fast", "other/fast"] {
            let error = valid(serde_json::json!({
                "organizationId": "o", "model": "a/b", "categories": {"quick": {"model": bad}}
            }))
            .unwrap_err();
            assert_eq!(error.reason(), "InvalidModel", "{bad}");
            assert!(
                error.to_string().contains("categories.quick.model"),
                "{error}"
            );
        }
    }

    #[test]
    fn models_must_name_their_provider() {
        for bad in ["claude", "/model", "a/"] {
            let error =
                valid(serde_json::json!({"organizationId": "o", "model": bad})).unwrap_err();
            assert_eq!(error.reason(), "InvalidModel", "{bad}");
        }
        let error = valid(serde_json::json!({
            "organizationId": "o", "model": "a/b", "provider": {"id": "other"}
        }))
        .unwrap_err();
        assert_eq!(error.reason(), "InvalidProvider");
    }

    #[test]
    fn plugins_resolve_to_the_image_and_downloads_are_refused() {
        let v = valid(serde_json::json!({
            "organizationId": "o", "model": "a/b",
            "plugins": ["@acme/tools", "file:///opt/x/index.js"],
            "ohMyOpencode": {}
        }))
        .unwrap();
        assert_eq!(
            v.plugins,
            [
                "file:///opt/opencode/plugins/node_modules/@acme/tools",
                "file:///opt/x/index.js",
                "file:///opt/opencode/plugins/node_modules/oh-my-opencode",
            ]
        );
        assert!(v.oh_my_opencode.is_some());
        // oh-my-opencode is turned on (and configured) in one place only.
        for listed in [
            "oh-my-opencode",
            "oh-my-openagent",
            "file:///opt/opencode/plugins/node_modules/oh-my-opencode",
        ] {
            let error = valid(serde_json::json!({
                "organizationId": "o", "model": "a/b", "plugins": [listed]
            }))
            .unwrap_err();
            assert_eq!(error.reason(), "InvalidOhMyOpencode", "{listed}");
        }
        let error = valid(serde_json::json!({
            "organizationId": "o", "model": "a/b", "ohMyOpencode": {"disabledHooks": ["nope"]}
        }))
        .unwrap_err();
        assert_eq!(error.reason(), "InvalidOhMyOpencode");
        for bad in ["tools@1.2", "https://x/y.js", "../p", "file://relative"] {
            let error =
                valid(serde_json::json!({"organizationId": "o", "model": "a/b", "plugins": [bad]}))
                    .unwrap_err();
            assert_eq!(error.reason(), "InvalidPlugin", "{bad}");
        }
    }

    #[test]
    fn names_that_cannot_name_a_statefulset_and_service_are_refused() {
        let mut long = sidecar(serde_json::json!({"organizationId": "o", "model": "a/b"}));
        long.metadata.name = Some("a".repeat(53));
        assert_eq!(
            validate(&long, &Observed::default(), &settings())
                .unwrap_err()
                .reason(),
            "InvalidName"
        );
        let mut digit = long.clone();
        digit.metadata.name = Some("1tenant".to_owned());
        assert!(validate(&digit, &Observed::default(), &settings()).is_err());
    }

    #[test]
    fn egress_rules_must_be_cidrs() {
        let ok = valid(serde_json::json!({
            "organizationId": "o", "model": "a/b",
            "egress": [{"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}, {"cidr": "fd00::/8"}]
        }));
        assert!(ok.is_ok());
        let error = valid(serde_json::json!({
            "organizationId": "o", "model": "a/b", "egress": [{"cidr": "10.0.0.0/33"}]
        }))
        .unwrap_err();
        assert_eq!(error.reason(), "InvalidEgress");
    }

    #[test]
    fn label_unsafe_organizations_are_hashed_into_the_label() {
        assert_eq!(label_safe("org_1.a"), "org_1.a");
        let hashed = label_safe("Acme Inc/EU");
        assert!(hashed.starts_with("sha256-"));
        assert_eq!(hashed.len(), 7 + 32);
        assert_ne!(hashed, label_safe("Acme Inc/US"));
        assert!(label_safe(&"x".repeat(64)).starts_with("sha256-"));
    }
}
