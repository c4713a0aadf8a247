//! The node shim plays the kubelet well enough for the suite: pods bound to its Node run as
//! local processes on their own loopback address, with their env, volumes and probes, and
//! their status reaches the API server; the scheduler and the StatefulSet controller are real.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Patch, PatchParams};
use nubabel_e2e::node_shim::{ImageMap, NodeShim, await_pod_ready, pods_matching};
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

fn python() -> std::path::PathBuf {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .expect("python3 is installed")
}

async fn start_shim(env: &TestEnv, run_dir: &std::path::Path, name: &str) -> Result<NodeShim> {
    NodeShim::start(
        env.client.clone(),
        name,
        ImageMap::new().with("python", python()),
        run_dir,
    )
    .await
}

/// A container that serves its working directory over HTTP on port 8000, bound to 0.0.0.0
/// (which the shim turns into the pod IP), with a readiness probe on that port.
fn web_container(extra: serde_json::Value) -> serde_json::Value {
    let mut container = json!({
        "name": "web",
        "image": "docker.io/library/python:3.11",
        "command": ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    });
    if let (Some(base), Some(more)) = (container.as_object_mut(), extra.as_object()) {
        base.extend(more.clone());
    }
    container
}

async fn http_get(url: &str) -> Result<String> {
    let output = tokio::process::Command::new("curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "GET {url} failed");
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test]
async fn a_pod_bound_to_the_shim_runs_with_its_env_and_volumes_and_becomes_ready() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "shim-pod").await?;
    let run_dir = tempfile::tempdir()?;
    let shim = start_shim(&env, run_dir.path(), &format!("{}-node", namespace.name())).await?;
    within(LIMIT, "running a pod on the shim", async {
        let secrets = namespace.api::<Secret>();
        create(
            &secrets,
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "creds"},
                "stringData": {"token": "s3cret"}
            }))?,
        )
        .await?;
        // The container writes what it sees into its volume, then serves that volume.
        let script = "import os,http.server,socketserver,functools\n\
            open('/work/seen.txt','w').write(os.environ['TOKEN']+' '+os.environ['POD']+' '+os.environ['GREETING']+' '+os.getcwd())\n\
            h=functools.partial(http.server.SimpleHTTPRequestHandler,directory='/work')\n\
            socketserver.TCPServer.allow_reuse_address=True\n\
            socketserver.TCPServer(('0.0.0.0',8000),h).serve_forever()\n";
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web"},
            "spec": {
                "nodeName": shim.node_name(),
                "automountServiceAccountToken": false,
                "volumes": [{"name": "work", "emptyDir": {}}],
                "containers": [web_container(json!({
                    "command": ["python3", "-c", script],
                    "workingDir": "/work",
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                    "env": [
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "WHO", "value": "world"},
                        {"name": "GREETING", "value": "hello-$(WHO)"}
                    ]
                }))]
            }
        }))?;
        let pods = namespace.api::<Pod>();
        create(&pods, &pod).await?;
        let ready = await_pod_ready(&pods, "web", Duration::from_secs(60)).await?;
        let status = ready.status.context("no status")?;
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let ip = status.pod_ip.context("no pod IP")?;
        assert!(ip.starts_with("127.") && !ip.starts_with("127.0.0."), "pod IP {ip}");

        let seen = http_get(&format!("http://{ip}:8000/seen.txt")).await?;
        let parts: Vec<&str> = seen.split(' ').collect();
        assert_eq!(&parts[..3], ["s3cret", "web", "hello-world"], "the container saw {seen}");
        assert!(parts[3].starts_with(run_dir.path().to_str().unwrap()), "cwd {}", parts[3]);
        Ok(())
    })
    .await?;
    shim.shutdown().await?;
    namespace.delete().await
}

#[tokio::test]
async fn a_statefulset_is_scheduled_onto_the_shim_and_scaled_down_again() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "shim-sts").await?;
    let run_dir = tempfile::tempdir()?;
    let shim = start_shim(&env, run_dir.path(), &format!("{}-node", namespace.name())).await?;
    within(LIMIT, "running a StatefulSet on the shim", async {
        let statefulset: StatefulSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "serviceName": "web",
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "nodeSelector": shim.node_selector(),
                        "automountServiceAccountToken": false,
                        "terminationGracePeriodSeconds": 2,
                        "containers": [web_container(json!({}))]
                    }
                }
            }
        }))?;
        let statefulsets = namespace.api::<StatefulSet>();
        create(&statefulsets, &statefulset).await?;
        let pods = namespace.api::<Pod>();
        let first = await_pod_ready(&pods, "web-0", Duration::from_secs(60)).await?;
        let second = await_pod_ready(&pods, "web-1", Duration::from_secs(60)).await?;
        let ip0 = first.status.and_then(|s| s.pod_ip).context("no IP")?;
        let ip1 = second.status.and_then(|s| s.pod_ip).context("no IP")?;
        assert_ne!(ip0, ip1, "each pod has an address of its own");
        http_get(&format!("http://{ip1}:8000/")).await?;
        await_condition(
            &statefulsets,
            "web",
            "the StatefulSet to count 2 ready replicas",
            |s: Option<&StatefulSet>| {
                s.and_then(|s| s.status.as_ref())
                    .and_then(|s| s.ready_replicas)
                    == Some(2)
            },
            Duration::from_secs(30),
        )
        .await?;

        statefulsets
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 0}})),
            )
            .await?;
        for name in ["web-0", "web-1"] {
            await_condition(
                &pods,
                name,
                "the pod to be gone",
                |p: Option<&Pod>| p.is_none(),
                Duration::from_secs(60),
            )
            .await?;
        }
        assert!(pods_matching(&pods, "app=web").await?.is_empty());
        assert!(
            http_get(&format!("http://{ip1}:8000/")).await.is_err(),
            "the process was stopped"
        );
        Ok(())
    })
    .await?;
    shim.shutdown().await?;
    namespace.delete().await
}

#[tokio::test]
async fn init_containers_run_in_order_and_a_failing_one_is_retried_with_backoff() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "shim-init").await?;
    let run_dir = tempfile::tempdir()?;
    let shim = start_shim(&env, run_dir.path(), &format!("{}-node", namespace.name())).await?;
    within(LIMIT, "running init containers on the shim", async {
        // `sh` and `mkdir` come from the host's PATH (the image maps to no program). The
        // second init container fails on its first run only: it counts its runs in the volume.
        let flaky = "n=$(cat /work/runs 2>/dev/null || echo 0); echo $((n+1)) > /work/runs; \
                     echo second >> /work/order; [ \"$n\" -ge 1 ]";
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web"},
            "spec": {
                "nodeName": shim.node_name(),
                "automountServiceAccountToken": false,
                "volumes": [{"name": "work", "emptyDir": {}}],
                "initContainers": [
                    {"name": "first", "image": "busybox:1.36",
                     "command": ["mkdir", "-p", "/work/made/by/init"],
                     "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
                    {"name": "second", "image": "busybox:1.36",
                     "command": ["sh", "-c", flaky],
                     "volumeMounts": [{"name": "work", "mountPath": "/work"}]}
                ],
                "containers": [web_container(json!({
                    "command": ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0",
                                "--directory", "/work"],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}]
                }))]
            }
        }))?;
        let pods = namespace.api::<Pod>();
        create(&pods, &pod).await?;

        // The failure shows in the pod's status while the pod waits, not yet initialized.
        let failed = await_condition(
            &pods,
            "web",
            "the second init container to have failed once",
            |p: Option<&Pod>| {
                p.and_then(|p| p.status.as_ref())
                    .and_then(|s| s.init_container_statuses.as_ref())
                    .and_then(|s| s.iter().find(|c| c.name == "second"))
                    .is_some_and(|c| c.restart_count >= 1)
            },
            Duration::from_secs(30),
        )
        .await?
        .context("the pod disappeared")?;
        let status = failed.status.context("no status")?;
        let init = status.init_container_statuses.unwrap_or_default();
        let second = init.iter().find(|c| c.name == "second").unwrap();
        let failure = second
            .state
            .as_ref()
            .and_then(|s| s.terminated.clone())
            .or_else(|| {
                second
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.clone())
            });
        assert_eq!(
            failure.as_ref().map(|t| (t.exit_code, t.reason.as_deref())),
            Some((1, Some("Error"))),
            "{second:?}"
        );
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let initialized = status.conditions.unwrap_or_default();
        assert!(
            initialized
                .iter()
                .any(|c| c.type_ == "Initialized" && c.status == "False"),
            "{initialized:?}"
        );
        assert!(
            init[0]
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code == 0)
        );

        // After its backoff the retry succeeds and the app container starts.
        let ready = await_pod_ready(&pods, "web", Duration::from_secs(60)).await?;
        let status = ready.status.context("no status")?;
        let init = status.init_container_statuses.unwrap_or_default();
        assert!(
            init.iter().all(|c| {
                c.state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .is_some_and(|t| t.exit_code == 0 && t.reason.as_deref() == Some("Completed"))
            }),
            "{init:?}"
        );
        let ip = status.pod_ip.context("no pod IP")?;
        assert_eq!(
            http_get(&format!("http://{ip}:8000/order")).await?,
            "second\nsecond\n"
        );
        assert_eq!(http_get(&format!("http://{ip}:8000/runs")).await?, "2\n");
        // The first init container's directory exists in the volume the app serves.
        http_get(&format!("http://{ip}:8000/made/by/init/")).await?;
        Ok(())
    })
    .await?;
    shim.shutdown().await?;
    namespace.delete().await
}
