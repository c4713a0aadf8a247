//! The OpencodeSidecar controller on the real control plane: the built operator binary runs
//! with the ServiceAccount and RBAC of `operator/rbac.yaml`, scoped to the test's namespace,
//! against kube-apiserver and kube-controller-manager 1.20 (which create the pods and collect
//! garbage). No kubelet runs, so pods stay Pending and fleets never become Ready here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Resource, ResourceExt};
use nubabel_e2e::control_plane::write_kubeconfig;
use nubabel_e2e::process::{ProcessSpec, SupervisedProcess};
use nubabel_e2e::{
    DEFAULT_WAIT, TestEnv, TestNamespace, await_condition, create, delete, kubectl, within,
};
use serde_json::json;
use tempfile::TempDir;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
const MASTER_KEY: &str = "e2e-signing-master-key-0123456789abcdef";
const CRDS: [&str; 2] = ["opencodesidecars.nubabel.io", "delegatedtasks.nubabel.io"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the operator binary (a no-op when it is current) and returns its path;
/// `NUBABEL_OPERATOR_BIN` names a prebuilt one instead (the benchmark uses a release build).
async fn operator_binary() -> Result<PathBuf> {
    if let Some(binary) = std::env::var_os("NUBABEL_OPERATOR_BIN") {
        return Ok(PathBuf::from(binary));
    }
    let root = workspace_root();
    let output = tokio::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "nubabel-operator",
            "--bin",
            "nubabel-operator",
        ])
        .current_dir(&root)
        .output()
        .await
        .context("running cargo build")?;
    ensure!(
        output.status.success(),
        "building the operator failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("debug/nubabel-operator"))
}

fn sidecar_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("nubabel.io", "v1alpha1", "OpencodeSidecar"),
        "opencodesidecars",
    )
}

/// Installs the committed CRDs and the operator's ClusterRole (idempotent; tests race on it).
async fn install_crds_and_rbac(namespace: &str) -> Result<()> {
    let root = workspace_root();
    let crds = root.join("crds");
    let rbac = root.join("operator/rbac.yaml");
    for attempt in 1..=3 {
        let applied = kubectl([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=nubabel-e2e",
            "-f",
            crds.to_str().unwrap(),
            "-n",
            namespace,
            "-f",
            rbac.to_str().unwrap(),
        ])
        .await?;
        if applied.status.success() {
            break;
        }
        ensure!(
            attempt < 3,
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    let mut wait = vec![
        "wait".to_owned(),
        "--for=condition=Established".to_owned(),
        "--timeout=60s".to_owned(),
    ];
    wait.extend(CRDS.iter().map(|crd| format!("crd/{crd}")));
    let waited = kubectl(&wait).await?;
    ensure!(
        waited.status.success(),
        "CRDs not established: {}",
        String::from_utf8_lossy(&waited.stderr)
    );
    Ok(())
}

/// A test namespace with one or more operator replicas watching it.
struct Fleet {
    env: TestEnv,
    namespace: TestNamespace,
    operators: Vec<SupervisedProcess>,
    /// The health and metrics port of each operator.
    ports: Vec<u16>,
    binding: String,
    _dir: TempDir,
}

impl Fleet {
    async fn start(prefix: &str, replicas: usize) -> Result<Self> {
        let env = TestEnv::from_env().await?;
        let namespace = TestNamespace::create(&env.client, prefix).await?;
        let ns = namespace.name().to_owned();
        install_crds_and_rbac(&ns).await?;

        // The operator's own identity, bound to exactly the RBAC in operator/rbac.yaml.
        let accounts: Api<ServiceAccount> = namespace.api();
        create(
            &accounts,
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("nubabel-operator".into()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            },
        )
        .await?;
        let subject = Subject {
            kind: "ServiceAccount".into(),
            name: "nubabel-operator".into(),
            namespace: Some(ns.clone()),
            api_group: None,
        };
        let binding = format!("nubabel-operator-{ns}");
        create(
            &Api::<ClusterRoleBinding>::all(env.client.clone()),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(binding.clone()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: "nubabel-operator".into(),
                },
                subjects: Some(vec![subject.clone()]),
            },
        )
        .await?;
        // Secrets only in the fleet's namespace, as operator/rbac.yaml says to bind them.
        create(
            &namespace.api::<RoleBinding>(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some("nubabel-operator-secrets".into()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: "nubabel-operator-secrets".into(),
                },
                subjects: Some(vec![subject.clone()]),
            },
        )
        .await?;
        create(
            &namespace.api::<RoleBinding>(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some("nubabel-operator-leader-election".into()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "nubabel-operator-leader-election".into(),
                },
                subjects: Some(vec![subject]),
            },
        )
        .await?;
        let token = accounts
            .create_token_request(
                "nubabel-operator",
                &PostParams::default(),
                &TokenRequest {
                    metadata: ObjectMeta::default(),
                    spec: TokenRequestSpec {
                        audiences: vec![],
                        expiration_seconds: Some(3600),
                        bound_object_ref: None,
                    },
                    status: None,
                },
            )
            .await?
            .status
            .context("the token request has no status")?
            .token;

        let dir = tempfile::Builder::new()
            .prefix("nubabel-operator-e2e-")
            .tempdir()?;
        let admin = kube::config::Kubeconfig::read_from(&env.kubeconfig)?;
        let cluster = admin.clusters[0]
            .cluster
            .as_ref()
            .context("no cluster in the kubeconfig")?;
        let ca = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            cluster
                .certificate_authority_data
                .as_deref()
                .context("no CA data")?,
        )?;
        let kubeconfig = dir.path().join("operator.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            cluster.server.as_deref().context("no server")?,
            &ca,
            "nubabel-operator",
            &token,
        )?;

        let binary = operator_binary().await?;
        let mut operators = Vec::new();
        let mut ports = Vec::new();
        for index in 0..replicas {
            let identity = format!("operator-{index}");
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            ports.push(port);
            let http_addr = format!("127.0.0.1:{port}");
            let spec = ProcessSpec::new(identity.clone(), &binary)
                .args([
                    "--http-addr",
                    &http_addr,
                    "--watch-namespace",
                    &ns,
                    "--operator-namespace",
                    &ns,
                    "--lease-duration-seconds",
                    "4",
                    "--lease-renew-deadline-seconds",
                    "3",
                    "--lease-retry-period-seconds",
                    "1",
                    "--sidecar-image",
                    "example.org/opencode:e2e",
                    "--bridge-image",
                    "example.org/bridge:e2e",
                ])
                .env("KUBECONFIG", &kubeconfig)
                .env("NUBABEL_SIGNING_MASTER_KEY", MASTER_KEY)
                .env("POD_NAME", &identity)
                .env("RUST_LOG", "info,nubabel_operator=debug")
                .stop_signal(libc::SIGKILL)
                .stop_grace(Duration::ZERO);
            operators.push(
                SupervisedProcess::spawn(spec, dir.path().join(format!("{identity}.log"))).await?,
            );
        }
        Ok(Self {
            env,
            namespace,
            operators,
            ports,
            binding,
            _dir: dir,
        })
    }

    fn ns(&self) -> &str {
        self.namespace.name()
    }

    fn sidecars(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.env.client.clone(), self.ns(), &sidecar_resource())
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        self.namespace.api()
    }

    /// Creates sidecar `name`, binding the namespace to its organization first.
    async fn create_sidecar(&self, name: &str, spec: serde_json::Value) -> Result<DynamicObject> {
        if let Some(organization) = spec["organizationId"].as_str() {
            self.namespace.bind_organization(organization).await?;
        }
        self.create_unbound_sidecar(name, spec).await
    }

    /// Creates sidecar `name` without touching the namespace's binding.
    async fn create_unbound_sidecar(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<DynamicObject> {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "nubabel.io/v1alpha1",
            "kind": "OpencodeSidecar",
            "metadata": {"name": name},
            "spec": spec,
        }))?;
        create(&self.sidecars(), &object).await
    }

    async fn patch_spec(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        self.sidecars()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await?;
        Ok(())
    }

    /// The operators' logs, for failure messages.
    fn logs(&self) -> String {
        self.operators
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn finish(mut self) -> Result<()> {
        for operator in &mut self.operators {
            operator.stop().await?;
        }
        delete(
            &Api::<ClusterRoleBinding>::all(self.env.client.clone()),
            &self.binding,
        )
        .await?;
        self.namespace.delete().await
    }
}

/// Runs `body` with the fleet, and adds the operators' logs to any failure.
async fn with_fleet<F>(prefix: &str, replicas: usize, body: F) -> Result<()>
where
    F: AsyncFnOnce(&Fleet) -> Result<()>,
{
    let fleet = Fleet::start(prefix, replicas).await?;
    let outcome = within(TEST_TIMEOUT, prefix, body(&fleet)).await;
    let logs = fleet.logs();
    fleet.finish().await?;
    outcome.with_context(|| format!("operator logs:\n{logs}"))
}

fn controlled_by(meta: &ObjectMeta, owner: &DynamicObject) -> bool {
    meta.owner_references.iter().flatten().any(|r| {
        r.kind == "OpencodeSidecar"
            && r.name == owner.name_any()
            && Some(&r.uid) == owner.uid().as_ref()
            && r.controller == Some(true)
    })
}

fn condition<'a>(object: &'a DynamicObject, type_: &str) -> Option<&'a serde_json::Value> {
    object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn sts_replicas(sts: Option<&StatefulSet>) -> Option<i32> {
    sts.and_then(|s| s.spec.as_ref()).and_then(|s| s.replicas)
}

async fn pod_count(fleet: &Fleet, name: &str) -> Result<usize> {
    let pods = fleet
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count())
}

/// Polls `probe` until it holds, at most `timeout`: for state no single watch shows.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if probe().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn has_event(fleet: &Fleet, name: &str, type_: &str, reason: &str) -> Result<bool> {
    let events = fleet.api::<Event>().list(&ListParams::default()).await?;
    Ok(events.items.iter().any(|e| {
        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            && e.type_.as_deref() == Some(type_)
            && e.reason.as_deref() == Some(reason)
    }))
}

#[tokio::test]
async fn a_sidecar_gets_its_owned_children_and_the_controller_manager_creates_its_pods()
-> Result<()> {
    with_fleet("ocs-children", 1, async |fleet| {
        let sidecar = fleet
            .create_sidecar("tenant-a", json!({"organizationId": "org-a", "replicas": 2, "model": "anthropic/claude-sonnet-4-5"}))
            .await?;

        let sts = await_condition(&fleet.api::<StatefulSet>(), "tenant-a", "the StatefulSet", |s: Option<&StatefulSet>| s.is_some(), DEFAULT_WAIT)
            .await?
            .unwrap();
        assert!(controlled_by(&sts.metadata, &sidecar));
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        let pod = spec.template.spec.as_ref().unwrap();
        let names: Vec<_> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["opencode", "bridge"]);
        assert!(pod.containers.iter().all(|c| c.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some()));

        let service = fleet.api::<Service>().get("tenant-a").await?;
        assert!(controlled_by(&service.metadata, &sidecar));
        assert_eq!(service.spec.unwrap().cluster_ip.as_deref(), Some("None"));
        let policy = fleet.api::<NetworkPolicy>().get("tenant-a").await?;
        assert!(controlled_by(&policy.metadata, &sidecar));
        let account = fleet.api::<ServiceAccount>().get("tenant-a-sidecar").await?;
        assert!(controlled_by(&account.metadata, &sidecar));
        assert_eq!(account.automount_service_account_token, Some(false));
        let secret = fleet.api::<Secret>().get("tenant-a-sidecar").await?;
        assert!(controlled_by(&secret.metadata, &sidecar));
        let data = secret.data.clone().unwrap();
        let password = data["opencode-password"].clone();
        assert_eq!(password.0.len(), 43);
        assert!(String::from_utf8(data["callback-signing-key"].0.clone())?.starts_with("whsec_"));

        // kube-controller-manager turns the StatefulSet into pods (Pending: no kubelet here).
        eventually("2 pods", DEFAULT_WAIT, || async { Ok(pod_count(fleet, "tenant-a").await? == 2) }).await?;
        let status = await_condition(&fleet.sidecars(), "tenant-a", "status with 2 pods", |o: Option<&DynamicObject>| {
            o.is_some_and(|o| o.data["status"]["pods"].as_array().is_some_and(|p| p.len() == 2) && o.data["status"]["replicas"] == 2)
        }, DEFAULT_WAIT)
        .await?
        .unwrap();
        assert_eq!(status.data["status"]["observedGeneration"], 1);
        assert_eq!(status.data["status"]["selector"], "app.kubernetes.io/instance=tenant-a,app.kubernetes.io/name=opencode-sidecar");
        assert_eq!(condition(&status, "Ready").unwrap()["reason"], "ReplicasNotReady");
        assert_eq!(condition(&status, "Degraded").unwrap()["status"], "False");

        // Kubernetes 1.20 serves no policy/v1: the operator skipped the budget, and says so nowhere.
        let budgets = kubectl(["get", "poddisruptionbudgets", "-n", fleet.ns(), "-o", "name"]).await?;
        assert!(budgets.status.success());
        assert!(budgets.stdout.is_empty());

        // A config change rolls the pods; the password survives it.
        let hash = |sts: &StatefulSet| sts.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()["nubabel.io/config-hash"].clone();
        let before = hash(&sts);
        fleet.patch_spec("tenant-a", json!({"model": "anthropic/claude-haiku-4-5"})).await?;
        await_condition(&fleet.api::<StatefulSet>(), "tenant-a", "a new config hash", move |s: Option<&StatefulSet>| s.is_some_and(|s| hash(s) != before), DEFAULT_WAIT).await?;
        let kept = fleet.api::<Secret>().get("tenant-a-sidecar").await?;
        assert_eq!(kept.data.unwrap()["opencode-password"], password);
        assert!(has_event(fleet, "tenant-a", "Normal", "Provisioned").await?);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn kubectl_scale_resizes_the_fleet_and_zero_suspends_it_keeping_its_storage() -> Result<()> {
    with_fleet("ocs-scale", 1, async |fleet| {
        fleet
            .create_sidecar("tenant-b", json!({"organizationId": "org-b", "replicas": 1, "model": "a/b", "storage": {"size": "1Gi"}}))
            .await?;
        await_condition(&fleet.api::<StatefulSet>(), "tenant-b", "1 replica", |s: Option<&StatefulSet>| sts_replicas(s) == Some(1), DEFAULT_WAIT).await?;

        let scaled = kubectl(["scale", "ocs", "tenant-b", "--replicas=3", "-n", fleet.ns()]).await?;
        ensure!(scaled.status.success(), "kubectl scale: {}", String::from_utf8_lossy(&scaled.stderr));
        await_condition(&fleet.api::<StatefulSet>(), "tenant-b", "3 replicas", |s: Option<&StatefulSet>| sts_replicas(s) == Some(3), DEFAULT_WAIT).await?;
        eventually("3 pods", DEFAULT_WAIT, || async { Ok(pod_count(fleet, "tenant-b").await? == 3) }).await?;
        await_condition(&fleet.sidecars(), "tenant-b", "status.replicas 3", |o: Option<&DynamicObject>| o.is_some_and(|o| o.data["status"]["replicas"] == 3), DEFAULT_WAIT).await?;

        // The scale subresource is what an HPA reads: replicas and the pods' selector.
        let scale = kubectl(["get", "--raw", &format!("/apis/nubabel.io/v1alpha1/namespaces/{}/opencodesidecars/tenant-b/scale", fleet.ns())]).await?;
        let scale: serde_json::Value = serde_json::from_slice(&scale.stdout)?;
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"]["selector"], "app.kubernetes.io/instance=tenant-b,app.kubernetes.io/name=opencode-sidecar");

        let suspended = kubectl(["scale", "ocs", "tenant-b", "--replicas=0", "-n", fleet.ns()]).await?;
        ensure!(suspended.status.success());
        await_condition(&fleet.api::<StatefulSet>(), "tenant-b", "0 replicas", |s: Option<&StatefulSet>| sts_replicas(s) == Some(0), DEFAULT_WAIT).await?;
        eventually("no pods", DEFAULT_WAIT, || async { Ok(pod_count(fleet, "tenant-b").await? == 0) }).await?;
        // Suspended follows spec.replicas at once; status.replicas follows the pods going away.
        let status = await_condition(&fleet.sidecars(), "tenant-b", "Ready=False Suspended with no replicas", |o: Option<&DynamicObject>| {
            o.is_some_and(|o| {
                condition(o, "Ready").is_some_and(|c| c["reason"] == "Suspended") && o.data["status"]["replicas"] == 0
            })
        }, DEFAULT_WAIT).await?.unwrap();
        assert_eq!(status.data["status"]["replicas"], 0);
        let claims = fleet.api::<PersistentVolumeClaim>().list(&ListParams::default()).await?;
        let mut names: Vec<_> = claims.items.iter().map(|c| c.name_any()).collect();
        names.sort();
        assert_eq!(names, ["data-tenant-b-0", "data-tenant-b-1", "data-tenant-b-2"]);
        assert!(has_event(fleet, "tenant-b", "Normal", "FleetSuspended").await?);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_invalid_spec_yields_degraded_and_a_warning_event_and_changes_no_child() -> Result<()> {
    with_fleet("ocs-invalid", 1, async |fleet| {
        fleet.create_sidecar("tenant-c", json!({"organizationId": "org-c", "model": "a/b"})).await?;
        let before = await_condition(&fleet.api::<StatefulSet>(), "tenant-c", "the StatefulSet", |s: Option<&StatefulSet>| s.is_some(), DEFAULT_WAIT).await?.unwrap();
        await_condition(&fleet.sidecars(), "tenant-c", "a first status", |o: Option<&DynamicObject>| o.is_some_and(|o| o.data["status"]["observedGeneration"] == 1), DEFAULT_WAIT).await?;

        fleet
            .patch_spec("tenant-c", json!({"replicas": 4, "resources": {"opencode": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}}))
            .await?;
        let status = await_condition(&fleet.sidecars(), "tenant-c", "Degraded=True", |o: Option<&DynamicObject>| {
            o.and_then(|o| condition(o, "Degraded")).is_some_and(|c| c["status"] == "True")
        }, DEFAULT_WAIT).await?.unwrap();
        let degraded = condition(&status, "Degraded").unwrap();
        assert_eq!(degraded["reason"], "LimitBelowRequest");
        assert!(degraded["message"].as_str().unwrap().contains("memory limit 1Gi is below the request 2Gi"));
        eventually("a LimitBelowRequest warning", DEFAULT_WAIT, || has_event(fleet, "tenant-c", "Warning", "LimitBelowRequest")).await?;
        let after = fleet.api::<StatefulSet>().get("tenant-c").await?;
        assert_eq!(after.metadata.generation, before.metadata.generation);
        assert_eq!(sts_replicas(Some(&after)), Some(1));

        // The organization is immutable: a change is refused the same way.
        fleet.patch_spec("tenant-c", json!({"resources": null, "organizationId": "org-other"})).await?;
        await_condition(&fleet.sidecars(), "tenant-c", "Degraded OrganizationChanged", |o: Option<&DynamicObject>| {
            o.and_then(|o| condition(o, "Degraded")).is_some_and(|c| c["reason"] == "OrganizationChanged")
        }, DEFAULT_WAIT).await?;
        let secret = fleet.api::<Secret>().get("tenant-c-sidecar").await?;
        assert_eq!(secret.annotations()["nubabel.io/organization-id"], "org-c");

        // Fixing the spec recovers.
        fleet.patch_spec("tenant-c", json!({"organizationId": "org-c"})).await?;
        await_condition(&fleet.api::<StatefulSet>(), "tenant-c", "4 replicas", |s: Option<&StatefulSet>| sts_replicas(s) == Some(4), DEFAULT_WAIT).await?;
        await_condition(&fleet.sidecars(), "tenant-c", "Degraded=False", |o: Option<&DynamicObject>| {
            o.and_then(|o| condition(o, "Degraded")).is_some_and(|c| c["status"] == "False")
        }, DEFAULT_WAIT).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_fleet_in_a_namespace_not_bound_to_its_organization_gets_no_keys_until_an_admin_binds_it()
-> Result<()> {
    with_fleet("ocs-binding", 1, async |fleet| {
        // The namespace serves org-own; a fleet naming another tenant's organization is refused.
        fleet.namespace.bind_organization("org-own").await?;
        fleet
            .create_unbound_sidecar(
                "claimer",
                json!({"organizationId": "org-victim", "model": "a/b"}),
            )
            .await?;
        let status = await_condition(
            &fleet.sidecars(),
            "claimer",
            "Degraded NamespaceNotBound",
            |o: Option<&DynamicObject>| {
                o.and_then(|o| condition(o, "Degraded"))
                    .is_some_and(|c| c["status"] == "True" && c["reason"] == "NamespaceNotBound")
            },
            DEFAULT_WAIT,
        )
        .await?
        .unwrap();
        let message = condition(&status, "Degraded").unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains(&format!("kubectl annotate namespace {}", fleet.ns())),
            "{message}"
        );
        eventually("a NamespaceNotBound warning", DEFAULT_WAIT, || {
            has_event(fleet, "claimer", "Warning", "NamespaceNotBound")
        })
        .await?;
        // Nothing was written: no Secret with keys, no pods.
        assert!(
            fleet
                .api::<Secret>()
                .get_opt("claimer-sidecar")
                .await?
                .is_none()
        );
        assert!(
            fleet
                .api::<StatefulSet>()
                .get_opt("claimer")
                .await?
                .is_none()
        );

        // A cluster admin binds the namespace to the organization too: the fleet provisions
        // on its next retry, without any change to the OpencodeSidecar.
        fleet.namespace.bind_organization("org-victim").await?;
        let secret = await_condition(
            &fleet.api::<Secret>(),
            "claimer-sidecar",
            "the fleet's Secret",
            |s: Option<&Secret>| s.is_some(),
            DEFAULT_WAIT,
        )
        .await?
        .unwrap();
        assert!(
            secret
                .data
                .as_ref()
                .is_some_and(|d| d.contains_key("callback-signing-key"))
        );
        await_condition(
            &fleet.sidecars(),
            "claimer",
            "Degraded=False",
            |o: Option<&DynamicObject>| {
                o.and_then(|o| condition(o, "Degraded"))
                    .is_some_and(|c| c["status"] == "False")
            },
            DEFAULT_WAIT,
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn deleting_the_sidecar_garbage_collects_its_children() -> Result<()> {
    with_fleet("ocs-delete", 1, async |fleet| {
        fleet
            .create_sidecar(
                "tenant-d",
                json!({"organizationId": "org-d", "model": "a/b"}),
            )
            .await?;
        await_condition(
            &fleet.api::<StatefulSet>(),
            "tenant-d",
            "the StatefulSet",
            |s: Option<&StatefulSet>| s.is_some(),
            DEFAULT_WAIT,
        )
        .await?;
        await_condition(
            &fleet.api::<Secret>(),
            "tenant-d-sidecar",
            "the Secret",
            |s: Option<&Secret>| s.is_some(),
            DEFAULT_WAIT,
        )
        .await?;

        delete(&fleet.sidecars(), "tenant-d").await?;
        await_condition(
            &fleet.api::<StatefulSet>(),
            "tenant-d",
            "the StatefulSet gone",
            |s: Option<&StatefulSet>| s.is_none(),
            DEFAULT_WAIT,
        )
        .await?;
        await_condition(
            &fleet.api::<Service>(),
            "tenant-d",
            "the Service gone",
            |s: Option<&Service>| s.is_none(),
            DEFAULT_WAIT,
        )
        .await?;
        await_condition(
            &fleet.api::<Secret>(),
            "tenant-d-sidecar",
            "the Secret gone",
            |s: Option<&Secret>| s.is_none(),
            DEFAULT_WAIT,
        )
        .await?;
        await_condition(
            &fleet.api::<NetworkPolicy>(),
            "tenant-d",
            "the NetworkPolicy gone",
            |s: Option<&NetworkPolicy>| s.is_none(),
            DEFAULT_WAIT,
        )
        .await?;
        await_condition(
            &fleet.api::<ServiceAccount>(),
            "tenant-d-sidecar",
            "the ServiceAccount gone",
            |s: Option<&ServiceAccount>| s.is_none(),
            DEFAULT_WAIT,
        )
        .await?;
        Ok(())
    })
    .await
}

fn holder(lease: Option<&Lease>) -> Option<String> {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn killing_the_active_operator_hands_the_lease_to_the_standby_which_carries_on() -> Result<()>
{
    let mut fleet = Fleet::start("ocs-lease", 2).await?;
    let outcome = within(TEST_TIMEOUT, "the lease handover", async {
        let fleet = &mut fleet;
        let leases = fleet.api::<Lease>();
        let lease = await_condition(
            &leases,
            "nubabel-operator",
            "a leader",
            |l: Option<&Lease>| holder(l).is_some(),
            DEFAULT_WAIT,
        )
        .await?;
        let leader = holder(lease.as_ref()).unwrap();
        fleet
            .create_sidecar(
                "tenant-e",
                json!({"organizationId": "org-e", "model": "a/b"}),
            )
            .await?;
        await_condition(
            &fleet.api::<StatefulSet>(),
            "tenant-e",
            "the first StatefulSet",
            |s: Option<&StatefulSet>| s.is_some(),
            DEFAULT_WAIT,
        )
        .await?;

        // SIGKILL: no release, so the standby must wait for the lease to expire (4 s).
        let index: usize = leader.trim_start_matches("operator-").parse()?;
        let killed_at = Instant::now();
        fleet.operators[index].stop().await?;
        let standby = format!("operator-{}", 1 - index);
        let expected = standby.clone();
        await_condition(
            &leases,
            "nubabel-operator",
            "the standby to lead",
            move |l: Option<&Lease>| holder(l).as_deref() == Some(expected.as_str()),
            DEFAULT_WAIT,
        )
        .await?;
        let handover = killed_at.elapsed();
        eprintln!("lease handover took {handover:?}");

        fleet
            .create_sidecar(
                "tenant-f",
                json!({"organizationId": "org-f", "model": "a/b"}),
            )
            .await?;
        await_condition(
            &fleet.api::<StatefulSet>(),
            "tenant-f",
            "a StatefulSet from the new leader",
            |s: Option<&StatefulSet>| s.is_some(),
            DEFAULT_WAIT,
        )
        .await?;
        fleet.patch_spec("tenant-e", json!({"replicas": 2})).await?;
        await_condition(
            &fleet.api::<StatefulSet>(),
            "tenant-e",
            "the first fleet rescaled",
            |s: Option<&StatefulSet>| sts_replicas(s) == Some(2),
            DEFAULT_WAIT,
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    })
    .await;
    let logs = fleet.logs();
    fleet.finish().await?;
    outcome.with_context(|| format!("operator logs:\n{logs}"))
}

/// One line of `/metrics`, e.g. the reconcile counter.
async fn metric(port: u16, line_prefix: &str) -> Result<f64> {
    let body = reqwest_free_get(port, "/metrics").await?;
    body.lines()
        .find(|line| line.starts_with(line_prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no {line_prefix} in /metrics"))
}

/// A plain HTTP/1.0 GET on loopback, without an HTTP client dependency.
async fn reqwest_free_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

fn memory_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Time from `OpencodeSidecar` creation to its StatefulSet, and the operator's memory, with
/// `NUBABEL_BENCH_SIDECARS` (default 500) tenants. Run it alone, ideally with a release build:
/// `NUBABEL_OPERATOR_BIN=target/release/nubabel-operator ... cargo test -p nubabel-e2e
/// --test sidecar -- --ignored --nocapture benchmark`.
#[tokio::test]
#[ignore = "a benchmark: minutes of load on the local control plane"]
async fn benchmark_time_to_statefulset_and_operator_memory_with_many_tenants() -> Result<()> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let count: usize = std::env::var("NUBABEL_BENCH_SIDECARS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500);
    let fleet = Fleet::start("ocs-bench", 1).await?;
    let outcome = async {
        let pid = fleet.operators[0]
            .pid()
            .context("the operator is not running")?;
        let port = fleet.ports[0];
        eventually("the operator's metrics", DEFAULT_WAIT, || async {
            Ok(metric(port, "nubabel_operator_leader ")
                .await
                .is_ok_and(|v| v == 1.0))
        })
        .await?;
        let idle_rss = memory_kib(pid, "VmRSS:")?;

        // Record when each StatefulSet first appears, from a watch started before any create.
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let watch = watcher(fleet.api::<StatefulSet>(), watcher::Config::default())
            .applied_objects()
            .for_each(move |sts| {
                if let Ok(sts) = sts {
                    let _ = seen_tx.send((sts.name_any(), Instant::now()));
                }
                std::future::ready(())
            });
        let watch = tokio::spawn(watch);

        // One fleet on an idle operator first: the latency without a queue.
        let probe_at = Instant::now();
        fleet
            .create_sidecar(
                "probe",
                json!({"organizationId": "org-probe", "model": "a/b"}),
            )
            .await?;
        await_condition(
            &fleet.api::<StatefulSet>(),
            "probe",
            "the probe's StatefulSet",
            |s: Option<&StatefulSet>| s.is_some(),
            DEFAULT_WAIT,
        )
        .await?;
        let idle_latency = probe_at.elapsed();

        let started = Instant::now();
        let mut created = std::collections::HashMap::new();
        for index in 0..count {
            let name = format!("tenant-{index:04}");
            let at = Instant::now();
            fleet
                .create_sidecar(
                    &name,
                    json!({"organizationId": format!("org-{index}"), "model": "a/b"}),
                )
                .await?;
            created.insert(name, at);
        }
        let create_time = started.elapsed();

        let mut latencies = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while seen.len() < count {
            let (name, at) = tokio::time::timeout_at(deadline.into(), seen_rx.recv())
                .await
                .context("StatefulSets did not all appear within 10 min")?
                .context("the watch ended")?;
            if let Some(created_at) = created.get(&name)
                && seen.insert(name)
            {
                latencies.push(at.saturating_duration_since(*created_at));
            }
        }
        let all_applied = started.elapsed();
        watch.abort();
        latencies.sort();

        // Let the controller-manager create the pods and the operator see them settle.
        eventually("every pod", Duration::from_secs(600), || async {
            let pods = fleet.api::<Pod>().list(&ListParams::default()).await?;
            Ok(pods.items.len() >= count)
        })
        .await?;
        let runs_settled = metric(port, "nubabel_operator_reconcile_runs_total").await?;
        let settle = Duration::from_secs(30);
        let settle_start = Instant::now();
        eventually("30 s of quiet", settle + Duration::from_secs(5), || async {
            Ok(settle_start.elapsed() >= settle)
        })
        .await?;
        let runs_after = metric(port, "nubabel_operator_reconcile_runs_total").await?;
        let rss = memory_kib(pid, "VmRSS:")?;
        let peak = memory_kib(pid, "VmHWM:")?;
        let failures = reqwest_free_get(port, "/metrics")
            .await?
            .lines()
            .filter(|l| l.starts_with("nubabel_operator_reconcile_failures_total"))
            .map(str::to_owned)
            .collect::<Vec<_>>();

        let duration_sum = metric(port, "nubabel_operator_reconcile_duration_seconds_sum").await?;
        let duration_count =
            metric(port, "nubabel_operator_reconcile_duration_seconds_count").await?;
        println!("sidecars: {count}");
        println!("idle operator, one CR created -> StatefulSet applied: {idle_latency:?}");
        println!(
            "mean reconcile duration under load: {:.0} ms",
            1000.0 * duration_sum / duration_count
        );
        println!(
            "created all CRs in {create_time:?} ({:.0}/s)",
            count as f64 / create_time.as_secs_f64()
        );
        println!("all StatefulSets applied {all_applied:?} after the first create");
        println!(
            "CR created -> StatefulSet applied: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.9),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or_default()
        );
        println!(
            "operator RSS: idle {} MiB, with {count} fleets {} MiB, peak {} MiB",
            idle_rss / 1024,
            rss / 1024,
            peak / 1024
        );
        println!(
            "reconciles: {runs_settled} until the pods existed, {} more in the next {settle:?}",
            runs_after - runs_settled
        );
        println!("failures: {failures:?}");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let logs = fleet.logs();
    fleet.finish().await?;
    outcome.with_context(|| format!("operator logs:\n{logs}"))
}

/// Whether the operator's ServiceAccount of `fleet` may `get` Secrets in `namespace`, as the
/// API server's authorizer answers.
async fn operator_may_get_secrets(fleet: &Fleet, namespace: &str) -> Result<bool> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{}:nubabel-operator",
                fleet.namespace.name()
            )),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                resource: Some("secrets".into()),
                verb: Some("get".into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = Api::<SubjectAccessReview>::all(fleet.env.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

#[tokio::test]
async fn the_operator_reconciles_under_namespace_scoped_secret_rbac_and_cannot_read_other_namespaces_secrets()
-> Result<()> {
    with_fleet("ocs-rbac", 1, async |fleet| {
        fleet
            .create_sidecar("tenant-a", json!({"organizationId": "org-a", "replicas": 1, "model": "anthropic/claude-sonnet-4-5"}))
            .await?;
        // The fleet's Secret is written (and read back) under the scoped grant.
        await_condition(&fleet.api::<StatefulSet>(), "tenant-a", "the StatefulSet", |s: Option<&StatefulSet>| s.is_some(), DEFAULT_WAIT).await?;
        fleet.api::<Secret>().get("tenant-a-sidecar").await?;
        ensure!(operator_may_get_secrets(fleet, fleet.namespace.name()).await?);
        for other in ["default", "kube-system"] {
            ensure!(
                !operator_may_get_secrets(fleet, other).await?,
                "the operator may read Secrets in {other}"
            );
        }
        Ok(())
    })
    .await
}
