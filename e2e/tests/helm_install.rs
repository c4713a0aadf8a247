//! `helm install`, `helm upgrade` and `helm uninstall` of the chart on the local control plane.
//!
//! The node shim runs the release's pods as local processes: the chart's operator and
//! callback-api images are the workspace's binaries, the bridge image `nubabel-bridge`, the
//! OpenCode image the real `opencode`. The pods get in-cluster credentials from their mounted
//! ServiceAccount tokens (so the chart's RBAC is what they run under), URLs naming Services
//! reach the Services' ready pods, and Postgres and Redis are reached through forwarders on the
//! host address pods use. The DelegatedTask flow then runs against the installed release.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_e2e::fake_llm::FakeLlm;
use nubabel_e2e::forward::TcpForwarder;
use nubabel_e2e::node_shim::{HOST_IP, NodeShim, ShimOptions};
use nubabel_e2e::pki::random_token;
use nubabel_e2e::system::{
    OPERATOR_BIN_ENV, fake_llm_sidecar, pod_log_tails, sidecar_images, workspace_binary,
    workspace_root,
};
use nubabel_e2e::tools::ToolPaths;
use nubabel_e2e::{
    TestEnv, TestNamespace, await_condition, create, fresh_database, kubectl, test_redis_url,
    within,
};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(600);
const ROLLOUT_WAIT: Duration = Duration::from_secs(120);
const TASK_WAIT: Duration = Duration::from_secs(120);
/// Names a prebuilt callback API binary instead of the workspace's debug build.
const CALLBACK_API_BIN_ENV: &str = "NUBABEL_CALLBACK_API_BIN";
const UPGRADED_LOG_LEVEL: &str = "info,nubabel_operator=trace";

fn chart_dir() -> PathBuf {
    workspace_root().join("charts/nubabel-opencode-operator")
}

/// Runs helm (with the stack's `KUBECONFIG`); stdout, or an error with stderr.
async fn helm(args: &[String]) -> Result<String> {
    let program = ToolPaths::from_env().helm()?;
    let mut command = tokio::process::Command::new(&program);
    command.args(args).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .context("helm timed out")??;
    ensure!(
        output.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| (*p).to_owned()).collect()
}

/// The API server's URL from the test's kubeconfig.
fn api_server(kubeconfig: &Path) -> Result<String> {
    kube::config::Kubeconfig::read_from(kubeconfig)?
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .context("no server in the kubeconfig")
}

/// A forwarder on [`HOST_IP`] to the `127.0.0.1` port `url` names, and the URL through it.
async fn forward(url: &str) -> Result<(TcpForwarder, String)> {
    let port: u16 = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .with_context(|| format!("{url} names no port"))?;
    let forwarder = TcpForwarder::start(
        SocketAddr::new(IpAddr::V4(HOST_IP), 0),
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await?;
    let forwarded = forwarder.forwarded_url(url)?;
    Ok((forwarder, forwarded))
}

fn task(name: &str, organization: &str, sidecar: &str, prompt: &str) -> DelegatedTask {
    serde_json::from_value(json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "DelegatedTask",
        "metadata": {"name": name},
        "spec": {
            "organizationId": organization,
            "prompt": prompt,
            "timeoutSeconds": 120,
            "sidecarRef": {"name": sidecar},
        },
    }))
    .unwrap()
}

/// The test's installation: what runs outside the cluster, and the release's names.
struct Installation {
    env: TestEnv,
    release: String,
    system_ns: String,
    tenant_ns: String,
    run_dir: tempfile::TempDir,
    fake_llm: FakeLlm,
    shim: Option<NodeShim>,
    _forwarders: Vec<TcpForwarder>,
}

impl Installation {
    fn operator(&self) -> String {
        format!("{}-operator", self.release)
    }

    fn callback_api(&self) -> String {
        format!("{}-callback-api", self.release)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.env.client.clone(), &self.system_ns)
    }

    fn system_pods(&self) -> Api<Pod> {
        Api::namespaced(self.env.client.clone(), &self.system_ns)
    }

    fn node_selector(&self) -> BTreeMap<String, String> {
        self.shim
            .as_ref()
            .map(NodeShim::node_selector)
            .unwrap_or_default()
    }

    /// The pods' logs and the release's Deployments, for failure messages.
    async fn diagnostics(&self) -> String {
        let deployments = kubectl(["-n", &self.system_ns, "get", "deploy,rs,pods", "-o", "wide"])
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("{deployments}\n{}", pod_log_tails(self.run_dir.path(), 30))
    }

    /// Waits until Deployment `name` has rolled out: its generation observed, every replica
    /// updated and ready, none left over, and the Available condition true.
    async fn await_rollout(&self, name: &str) -> Result<Deployment> {
        let rolled = await_condition(
            &self.deployments(),
            name,
            "the Deployment to roll out",
            |d: Option<&Deployment>| {
                d.is_some_and(|d| {
                    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let Some(status) = d.status.as_ref() else {
                        return false;
                    };
                    let available = status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Available" && c.status == "True");
                    status.observed_generation >= d.metadata.generation
                        && status.updated_replicas == Some(wanted)
                        && status.ready_replicas == Some(wanted)
                        && status.replicas == Some(wanted)
                        && available
                })
            },
            ROLLOUT_WAIT,
        )
        .await;
        match rolled {
            Ok(Some(d)) => Ok(d),
            Ok(None) => bail!("Deployment {name} disappeared"),
            Err(e) => bail!("{e:#}\n{}", self.diagnostics().await),
        }
    }

    /// The running pods of a component (`operator` or `callback-api`) of the release.
    async fn component_pods(&self, component: &str) -> Result<Vec<Pod>> {
        let selector = format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
            self.release
        );
        Ok(self
            .system_pods()
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// Runs a TOOLCALL task on sidecar `fleet` and checks its outcome and mirrored progress.
    async fn run_task(&self, name: &str, marker: &str) -> Result<()> {
        let tasks: Api<DelegatedTask> = Api::namespaced(self.env.client.clone(), &self.tenant_ns);
        create(
            &tasks,
            &task(name, "org-helm", "fleet", &format!("TOOLCALL {marker}")),
        )
        .await?;
        let finished = await_condition(
            &tasks,
            name,
            "the task to finish",
            |t: Option<&DelegatedTask>| {
                t.and_then(|t| t.status.as_ref())
                    .and_then(|s| s.phase)
                    .is_some_and(TaskPhase::is_finished)
            },
            TASK_WAIT,
        )
        .await;
        let finished = match finished {
            Ok(Some(t)) => t,
            Ok(None) => bail!("task {name} disappeared"),
            Err(e) => bail!("{e:#}\n{}", self.diagnostics().await),
        };
        let status = finished.status.clone().unwrap_or_default();
        ensure!(
            status.phase == Some(TaskPhase::Succeeded),
            "task {name} ended {:?}: {:?}\n{}",
            status.phase,
            status.error,
            self.diagnostics().await
        );
        let output = status.output.unwrap_or_default();
        ensure!(
            output.contains("hello-from-tool"),
            "task {name}'s output lacks the tool's: {output}"
        );
        ensure!(
            !self.fake_llm.requests_containing(marker).is_empty(),
            "the fake LLM never saw {marker}"
        );

        // The installed callback API received the bridge's callbacks and mirrored the tool
        // call into the status, with its own field manager.
        let mirrored = await_condition(
            &tasks,
            name,
            "status.progress to show the tool call",
            |t: Option<&DelegatedTask>| {
                t.and_then(|t| t.status.as_ref())
                    .and_then(|s| s.progress.as_ref())
                    .is_some_and(|p| {
                        p.tools_completed >= 1 && p.last_tool.as_deref() == Some("bash")
                    })
            },
            Duration::from_secs(30),
        )
        .await;
        let mirrored = match mirrored {
            Ok(Some(t)) => t,
            Ok(None) => bail!("task {name} disappeared"),
            Err(e) => bail!("{e:#}\n{}", self.diagnostics().await),
        };
        let by_callback_api = mirrored.managed_fields().iter().any(|f| {
            f.manager.as_deref() == Some(nubabel_callback_api::mirror::FIELD_MANAGER)
                && f.fields_v1
                    .as_ref()
                    .is_some_and(|fields| fields.0["f:status"].get("f:progress").is_some())
        });
        ensure!(
            by_callback_api,
            "status.progress was not written by the callback API: {:?}",
            mirrored.managed_fields()
        );
        Ok(())
    }
}

/// Every object left in `namespaces` or cluster-wide that belongs to `release`, by its
/// `app.kubernetes.io/instance` label or a name that contains the release's name.
async fn leftovers(release: &str, namespaces: &[&str]) -> Result<Vec<String>> {
    let namespaced = "deployments,replicasets,pods,services,endpoints,serviceaccounts,secrets,\
                      configmaps,roles,rolebindings,leases,networkpolicies,\
                      poddisruptionbudgets,horizontalpodautoscalers";
    let mut lists = Vec::new();
    for namespace in namespaces {
        lists.push(strings(&["-n", namespace, "get", namespaced, "-o", "json"]));
    }
    lists.push(strings(&[
        "get",
        "clusterroles,clusterrolebindings",
        "-o",
        "json",
    ]));
    let mut found = Vec::new();
    for args in lists {
        let output = kubectl(&args).await?;
        ensure!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        let list: Value = serde_json::from_slice(&output.stdout)?;
        for item in list["items"].as_array().into_iter().flatten() {
            let name = item["metadata"]["name"].as_str().unwrap_or_default();
            let labelled =
                item["metadata"]["labels"]["app.kubernetes.io/instance"].as_str() == Some(release);
            if labelled || name.contains(release) {
                found.push(format!(
                    "{} {}/{name}",
                    item["kind"].as_str().unwrap_or_default(),
                    item["metadata"]["namespace"].as_str().unwrap_or("-")
                ));
            }
        }
    }
    Ok(found)
}

#[tokio::test]
async fn helm_install_runs_tasks_and_upgrade_and_uninstall_behave() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let system = TestNamespace::create(&env.client, "helm-system").await?;
    let tenant = TestNamespace::create(&env.client, "helm-tenant").await?;
    let release = format!("nb-{}", &random_token()?[..8]);

    let operator_bin = workspace_binary("nubabel-operator", OPERATOR_BIN_ENV)?;
    let callback_api_bin = workspace_binary("nubabel-callback-api", CALLBACK_API_BIN_ENV)?;
    let bridge_bin = workspace_binary("nubabel-bridge", nubabel_e2e::system::BRIDGE_BIN_ENV)?;
    // The chart's repositories: operator, callback-api, bridge and opencode.
    let images = sidecar_images()?
        .with("operator", operator_bin)
        .with("callback-api", callback_api_bin)
        .with("bridge", bridge_bin);
    let run_dir = tempfile::Builder::new().prefix("nubabel-helm-").tempdir()?;
    let shim = NodeShim::start_with(
        env.client.clone(),
        &format!("{}-node", system.name()),
        images,
        run_dir.path(),
        ShimOptions {
            api_server: Some(api_server(&env.kubeconfig)?),
            claim_namespaces: Some(vec![system.name().to_owned(), tenant.name().to_owned()]),
        },
    )
    .await?;
    let (database_forwarder, database_url) = forward(&fresh_database().await?).await?;
    let (redis_forwarder, redis_url) = forward(&test_redis_url().await?).await?;
    let installation = Installation {
        env: env.clone(),
        release: release.clone(),
        system_ns: system.name().to_owned(),
        tenant_ns: tenant.name().to_owned(),
        run_dir,
        fake_llm: FakeLlm::start_on(IpAddr::V4(HOST_IP))?,
        shim: Some(shim),
        _forwarders: vec![database_forwarder, redis_forwarder],
    };

    let outcome = within(LIMIT, "installing, upgrading and uninstalling", async {
        let node = installation
            .node_selector()
            .into_values()
            .next()
            .context("no node")?;
        let set =
            |key: &str, value: &str| vec!["--set-string".to_owned(), format!("{key}={value}")];
        let mut install = strings(&["install", &release]);
        install.push(chart_dir().to_string_lossy().into_owned());
        install.extend(strings(&["-n", system.name(), "-f"]));
        install.push(
            chart_dir()
                .join("values-local.yaml")
                .to_string_lossy()
                .into_owned(),
        );
        let master_key = format!("{}{}", random_token()?, random_token()?);
        let stream_token_key = format!("{}{}", random_token()?, random_token()?);
        for (key, value) in [
            ("database.url", database_url.as_str()),
            ("redis.url", redis_url.as_str()),
            ("signing.masterKey", master_key.as_str()),
            ("streamToken.key", stream_token_key.as_str()),
            ("operator.watchNamespace", tenant.name()),
            (
                "operator.nodeSelector.kubernetes\\.io/hostname",
                node.as_str(),
            ),
            (
                "callbackApi.nodeSelector.kubernetes\\.io/hostname",
                node.as_str(),
            ),
        ] {
            install.extend(set(key, value));
        }
        helm(&install).await?;

        // Both Deployments become available on the shim.
        let operator = installation.await_rollout(&installation.operator()).await?;
        let callback_api = installation
            .await_rollout(&installation.callback_api())
            .await?;

        // The operator runs under the chart's ServiceAccount: its kubeconfig holds that
        // account's token, which may not list Secrets (the chart grants get by name only).
        let operator_pod = installation.component_pods("operator").await?;
        ensure!(operator_pod.len() == 1, "operator pods: {operator_pod:?}");
        let operator_pod = operator_pod[0].clone();
        let kubeconfig = installation
            .run_dir
            .path()
            .join("pods")
            .join(format!(
                "{}_{}_{}",
                system.name(),
                operator_pod.name_any(),
                operator_pod.uid().unwrap_or_default()
            ))
            .join("operator.kubeconfig");
        let kubeconfig = kubeconfig.to_string_lossy().into_owned();
        let whoami = kubectl([
            "--kubeconfig",
            &kubeconfig,
            "-n",
            tenant.name(),
            "get",
            "secrets",
        ])
        .await?;
        let refusal = String::from_utf8_lossy(&whoami.stderr);
        ensure!(
            !whoami.status.success()
                && refusal.contains(&format!(
                    "system:serviceaccount:{}:{}",
                    system.name(),
                    installation.operator()
                )),
            "the operator's credentials are not its ServiceAccount's: {refusal}"
        );

        // The leader holds the release's Lease.
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), system.name());
        let holder_is = |pod: String| {
            move |l: Option<&Lease>| {
                l.and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(pod.as_str())
            }
        };
        await_condition(
            &leases,
            &installation.operator(),
            "the operator to lead",
            holder_is(operator_pod.name_any()),
            Duration::from_secs(60),
        )
        .await?;

        // The DelegatedTask flow against the release, in a namespace bound to the tenant.
        tenant.bind_organization("org-helm").await?;
        let sidecars: Api<OpencodeSidecar> = Api::namespaced(env.client.clone(), tenant.name());
        create(
            &sidecars,
            &fake_llm_sidecar(
                tenant.name(),
                "fleet",
                "org-helm",
                1,
                &installation.fake_llm,
                &installation.node_selector(),
            )?,
        )
        .await?;
        installation
            .run_task("before-upgrade", "marker-install")
            .await?;

        // Without cluster DNS, the Service URL the chart gives the operator reached it as the
        // callback API pod's address, which it passed on to the sidecar's bridge.
        let callback_pod = installation.component_pods("callback-api").await?;
        let callback_ip = callback_pod
            .first()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.pod_ip.clone())
            .context("no callback API pod IP")?;
        let sidecar_pods: Api<Pod> = Api::namespaced(env.client.clone(), tenant.name());
        let bridge_url = sidecar_pods
            .get("fleet-0")
            .await?
            .spec
            .into_iter()
            .flat_map(|s| s.containers)
            .flat_map(|c| c.env.unwrap_or_default())
            .find(|e| e.name == "NUBABEL_CALLBACK_URL")
            .and_then(|e| e.value);
        ensure!(
            bridge_url == Some(format!("http://{callback_ip}:8080")),
            "the bridge's callback URL is {bridge_url:?}"
        );

        // helm upgrade with another operator log level: the operator rolls, the callback API
        // (whose pods do not use the value) keeps its pods.
        let callback_pods: Vec<String> = installation
            .component_pods("callback-api")
            .await?
            .iter()
            .filter_map(|p| p.uid())
            .collect();
        let mut upgrade = strings(&["upgrade", &release]);
        upgrade.push(chart_dir().to_string_lossy().into_owned());
        upgrade.extend(strings(&["-n", system.name(), "--reuse-values"]));
        // `--set` splits on commas; `\,` keeps one in the value.
        upgrade.extend(set(
            "operator.logLevel",
            &UPGRADED_LOG_LEVEL.replace(',', "\\,"),
        ));
        helm(&upgrade).await?;
        let upgraded = installation.await_rollout(&installation.operator()).await?;
        ensure!(
            upgraded.metadata.generation > operator.metadata.generation,
            "the operator Deployment did not change"
        );
        let new_pods = installation.component_pods("operator").await?;
        ensure!(
            new_pods.len() == 1,
            "operator pods after the upgrade: {new_pods:?}"
        );
        let new_pod = new_pods[0].clone();
        ensure!(
            new_pod.uid() != operator_pod.uid(),
            "the operator pod was not replaced"
        );
        let log_level = new_pod
            .spec
            .as_ref()
            .and_then(|s| s.containers[0].env.as_ref())
            .and_then(|env| env.iter().find(|e| e.name == "RUST_LOG"))
            .and_then(|e| e.value.clone());
        ensure!(
            log_level.as_deref() == Some(UPGRADED_LOG_LEVEL),
            "the new operator pod has RUST_LOG {log_level:?}"
        );
        let callback_after = installation
            .deployments()
            .get(&installation.callback_api())
            .await?;
        ensure!(
            callback_after.metadata.generation == callback_api.metadata.generation,
            "the callback API Deployment changed"
        );
        let callback_pods_after: Vec<String> = installation
            .component_pods("callback-api")
            .await?
            .iter()
            .filter_map(|p| p.uid())
            .collect();
        ensure!(
            callback_pods_after == callback_pods,
            "the callback API pods changed: {callback_pods:?} -> {callback_pods_after:?}"
        );
        await_condition(
            &leases,
            &installation.operator(),
            "the new operator pod to lead",
            holder_is(new_pod.name_any()),
            Duration::from_secs(60),
        )
        .await?;
        installation
            .run_task("after-upgrade", "marker-upgrade")
            .await?;

        // The tenant's resources go while the operator still runs (its finalizers), then
        // helm uninstall removes every object of the release; the CRDs stay.
        let tasks: Api<DelegatedTask> = Api::namespaced(env.client.clone(), tenant.name());
        for name in ["before-upgrade", "after-upgrade"] {
            tasks.delete(name, &DeleteParams::default()).await?;
            await_condition(
                &tasks,
                name,
                "the task to go",
                |t: Option<&DelegatedTask>| t.is_none(),
                Duration::from_secs(60),
            )
            .await?;
        }
        sidecars.delete("fleet", &DeleteParams::default()).await?;
        await_condition(
            &sidecars,
            "fleet",
            "the sidecar to go",
            |s: Option<&OpencodeSidecar>| s.is_none(),
            Duration::from_secs(60),
        )
        .await?;

        let mut uninstall = strings(&["uninstall", &release]);
        uninstall.extend(strings(&["-n", system.name()]));
        helm(&uninstall).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let left = leftovers(&release, &[system.name(), tenant.name()]).await?;
            if left.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("helm uninstall left objects behind: {left:#?}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for crd in ["opencodesidecars.nubabel.io", "delegatedtasks.nubabel.io"] {
            let got = kubectl(["get", "crd", crd]).await?;
            ensure!(got.status.success(), "CRD {crd} is gone after uninstall");
        }
        Ok(())
    })
    .await;

    let mut installation = installation;
    if outcome.is_err() {
        let _ = helm(&strings(&["uninstall", &release, "-n", system.name()])).await;
    }
    if let Some(shim) = installation.shim.take() {
        shim.shutdown().await?;
    }
    if let Err(e) = outcome {
        // The pods' whole logs, for a look after the test.
        let kept = installation.run_dir.keep();
        bail!("{e:#}\n(pod logs kept in {})", kept.display());
    }
    tenant.delete().await?;
    system.delete().await
}
