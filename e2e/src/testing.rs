//! Helpers for end-to-end tests on the local control plane: the environment, a temporary
//! namespace per test, bounded waits on conditions, typed create/apply/delete, and kubectl.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::Condition;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use nubabel_operator::controller::fleet;

use crate::control_plane::client_from_kubeconfig;
use crate::pki::random_token;
use crate::tools::ToolPaths;

/// Set to `1` to keep each test's namespace, and its system's run directory (container logs,
/// volumes), for inspection after the test.
pub const KEEP_NAMESPACES_ENV: &str = "NUBABEL_E2E_KEEP_NAMESPACES";
/// Label on every test namespace, so leftovers can be found and deleted in bulk.
pub const TEST_NAMESPACE_LABEL: &str = "nubabel.io/e2e";
/// A generous bound for waits on the local control plane.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// What an e2e test needs from its environment: a client for the cluster in `KUBECONFIG`.
#[derive(Clone)]
pub struct TestEnv {
    /// A client with the kubeconfig's current context.
    pub client: Client,
    /// The kubeconfig file.
    pub kubeconfig: PathBuf,
}

impl TestEnv {
    /// Reads `KUBECONFIG` (set by `nubabel-local run`, which `scripts/test.sh` uses).
    pub async fn from_env() -> Result<Self> {
        let kubeconfig = std::env::var_os("KUBECONFIG")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .context(
                "KUBECONFIG is not set: e2e tests run inside the local stack, via scripts/test.sh \
                 or `cargo run -p nubabel-e2e --bin nubabel-local -- run -- cargo test -p nubabel-e2e`",
            )?;
        let client = client_from_kubeconfig(&kubeconfig).await?;
        Ok(Self { client, kubeconfig })
    }
}

/// A namespace of its own for one test, named `<prefix>-<random>`. It is deleted by
/// [`TestNamespace::delete`], or when dropped (with a client of its own, since the test's runtime
/// may already be shutting down), unless `NUBABEL_E2E_KEEP_NAMESPACES=1`.
pub struct TestNamespace {
    name: String,
    client: Client,
    deleted: bool,
}

impl TestNamespace {
    /// Creates the namespace and waits until pods can be created in it (its `default`
    /// ServiceAccount exists, with a token where the cluster still issues token secrets).
    /// `prefix` must be a DNS label of at most 50 characters.
    pub async fn create(client: &Client, prefix: &str) -> Result<Self> {
        let suffix = random_token()?;
        let name = format!("{prefix}-{}", &suffix[..8]);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        create(&Api::<Namespace>::all(client.clone()), &namespace).await?;
        let test_namespace = Self {
            name,
            client: client.clone(),
            deleted: false,
        };

        // Clusters from 1.24 on no longer create token secrets for ServiceAccounts.
        let issues_token_secrets = server_minor_version(client).await? < 24;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &test_namespace.name);
        await_condition(
            &accounts,
            "default",
            "the ServiceAccount to exist (with a token secret on clusters that issue them)",
            move |account: Option<&ServiceAccount>| {
                account.is_some_and(|account| {
                    !issues_token_secrets || account.secrets.as_ref().is_some_and(|s| !s.is_empty())
                })
            },
            DEFAULT_WAIT,
        )
        .await?;
        Ok(test_namespace)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Binds the namespace to `organization` as a cluster admin does, adding it to the
    /// organizations its fleets may serve; the operator provisions a fleet only then.
    pub async fn bind_organization(&self, organization: &str) -> Result<()> {
        bind_organization(&self.client, &self.name, organization).await
    }

    /// An `Api` for namespaced resources of kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace now (it finishes terminating in the background).
    pub async fn delete(mut self) -> Result<()> {
        self.deleted = true;
        if keep_namespaces() {
            tracing::info!(namespace = %self.name, "keeping the test namespace");
            return Ok(());
        }
        delete(&Api::<Namespace>::all(self.client.clone()), &self.name).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted || keep_namespaces() {
            return;
        }
        let name = self.name.clone();
        // The test's runtime (and with it `self.client`) may be shutting down, so a thread of
        // its own builds a client from KUBECONFIG and waits for the delete to be accepted.
        let deleting = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(20), async {
                    let env = TestEnv::from_env().await?;
                    delete(&Api::<Namespace>::all(env.client), &name).await
                })
                .await
                .map_err(|_| anyhow!("deleting namespace {name} took longer than 20 s"))?
            })
        });
        match deleting.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!("deleting a test namespace: {error:#}"),
            Err(_) => tracing::warn!("the thread deleting a test namespace panicked"),
        }
    }
}

pub(crate) fn keep_namespaces() -> bool {
    std::env::var(KEEP_NAMESPACES_ENV).is_ok_and(|value| value == "1")
}

/// The API server's minor version (`"20"`, or `"24+"` on some distributions).
pub async fn server_minor_version(client: &Client) -> Result<u32> {
    let info = client.apiserver_version().await?;
    let digits: String = info
        .minor
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .with_context(|| format!("unexpected minor version {:?}", info.minor))
}

/// Waits until `condition` holds for object `name` (it sees `None` while the object does not
/// exist), at most `timeout`; the error names the object and `what` was awaited.
pub async fn await_condition<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    condition: impl Condition<K>,
    timeout: Duration,
) -> Result<Option<K>>
where
    K: Resource + Clone + Debug + Send + DeserializeOwned + 'static,
{
    let object = format!("{}/{name}", api.resource_url());
    match tokio::time::timeout(
        timeout,
        kube::runtime::wait::await_condition(api.clone(), name, condition),
    )
    .await
    {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(error)) => Err(error).with_context(|| format!("watching {object} for {what}")),
        Err(_) => bail!("timed out after {timeout:?} waiting for {object}: {what}"),
    }
}

/// Adds `organization` to the `nubabel.io/organizations` annotation of Namespace
/// `namespace`, as a cluster admin binds a namespace to a tenant. Safe to call concurrently:
/// the update is guarded by the resource version and retried on conflict.
pub async fn bind_organization(client: &Client, namespace: &str, organization: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for _ in 0..10 {
        let current = namespaces.get(namespace).await?;
        let listed = current
            .annotations()
            .get(fleet::NAMESPACE_ORGANIZATIONS_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        if fleet::namespace_binds(Some(&listed), organization) {
            return Ok(());
        }
        let value = if listed.trim().is_empty() {
            organization.to_owned()
        } else {
            format!("{listed},{organization}")
        };
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": current.resource_version(),
            "annotations": {fleet::NAMESPACE_ORGANIZATIONS_ANNOTATION: value},
        }});
        match namespaces
            .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("binding namespace {namespace}"));
            }
        }
    }
    bail!("binding namespace {namespace} to {organization} kept conflicting")
}

/// Creates `object`; the error names it.
pub async fn create<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    api.create(&PostParams::default(), object)
        .await
        .with_context(|| format!("creating {}/{}", api.resource_url(), object.name_any()))
}

/// Server-side applies `object` as `field_manager` (forcing ownership of conflicting fields).
pub async fn apply<K>(api: &Api<K>, object: &K, field_manager: &str) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(object),
    )
    .await
    .with_context(|| format!("applying {}/{name}", api.resource_url()))
}

/// Deletes object `name` with background propagation; an object that is already gone is fine.
pub async fn delete<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error).with_context(|| format!("deleting {}/{name}", api.resource_url())),
    }
}

/// Runs kubectl (the cached one from `NUBABEL_TOOLS_BIN`, else the one on PATH) against
/// `KUBECONFIG`, for at most a minute. A non-zero exit is not an error: check `status`.
pub async fn kubectl<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = ToolPaths::from_env()
        .kubectl()
        .unwrap_or_else(|_| PathBuf::from("kubectl"));
    let mut command = tokio::process::Command::new(&program);
    command.args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .map_err(|_| anyhow!("kubectl did not finish within 60 s"))?
        .with_context(|| format!("running {}", program.display()))
}
