//! The node shim: test infrastructure that plays the kubelet for the e2e suite.
//!
//! No container runtime runs here, so the shim registers a Node, keeps its heartbeat Lease
//! fresh, and runs the containers of every pod bound to that Node as local processes: the
//! image names a local program ([`ImageMap`]), each pod gets a loopback address of its own
//! (its "pod IP"), volumes become directories, and pod status (phase, IP, readiness from the
//! pod's own probes, restarts) is reported to the API server like a kubelet would. Everything
//! else (scheduling, StatefulSets, garbage collection) is the real Kubernetes code.
//!
//! Addresses: inside a pod, `localhost`, `127.0.0.1` and `0.0.0.0` mean the pod's own network
//! namespace. The shim rewrites them, in arguments and environment values, to the pod IP.
//! Services the tests run on the host must therefore listen on [`HOST_IP`], which the shim
//! never rewrites.
//!
//! Files: every volume is a directory under the shim's run directory, and a path under a
//! container's mount point is rewritten to that directory. PersistentVolumeClaims get a
//! hostPath PersistentVolume from the shim's small provisioner, so a StatefulSet pod that is
//! deleted and recreated finds its data again, as on a real cluster.
//!
//! Services: there is no cluster DNS and no kube-proxy. URLs in a pod's arguments and
//! environment whose host names a Service are rewritten to a ready pod behind it when the pod
//! starts ([`crate::service_urls`]).
//!
//! Credentials: given the API server's URL ([`ShimOptions::api_server`]), a container that
//! mounts its ServiceAccount token gets `KUBECONFIG` pointing at a kubeconfig with that token,
//! since the in-cluster path and Service address are not its own, and any other container a
//! `KUBECONFIG` that names no file instead of the test's own ([`crate::pod_credentials`]).

mod container;
mod env;
mod images;
mod launch;
mod node;
mod pod;
mod rewrite;
mod status;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use nubabel_operator::controller::fleet;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

pub use images::{ImageMap, resolve_command};

/// The loopback address host-side services of a test (callback API, fake LLM) listen on. The
/// shim rewrites `127.0.0.1`, `localhost` and `0.0.0.0` for pods, but never this address.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 1);

/// Longest grace period the shim gives a stopping pod.
const MAX_GRACE: Duration = Duration::from_secs(10);

/// What the shim offers pods beyond running them.
#[derive(Clone, Debug, Default)]
pub struct ShimOptions {
    /// The API server's URL as host processes reach it (`https://127.0.0.1:PORT`). With it,
    /// containers that mount a ServiceAccount token get a kubeconfig for it; without it they
    /// get no Kubernetes credentials.
    pub api_server: Option<String>,
    /// The namespaces whose claims this shim provisions volumes for; `None` means every
    /// namespace. Shims of concurrent tests share one cluster, and a claim's volume lives in
    /// the run directory of the shim that provisioned it, so each test's shim must provision
    /// its own claims only: a volume provisioned by another test's shim vanishes when that
    /// test ends and removes its run directory.
    pub claim_namespaces: Option<Vec<String>>,
}

/// A running node shim. Stop it with [`NodeShim::shutdown`]; dropping it aborts its tasks and
/// the supervised processes die with it.
pub struct NodeShim {
    node_name: String,
    client: Client,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pods: Arc<Mutex<HashMap<String, PodHandle>>>,
}

struct PodHandle {
    updates: watch::Sender<Pod>,
    task: JoinHandle<()>,
}

impl NodeShim {
    /// Registers Node `node_name` (Ready, labelled `kubernetes.io/hostname=<node_name>`) and
    /// starts running the pods bound to it. Pod files live under `run_dir`.
    pub async fn start(
        client: Client,
        node_name: &str,
        images: ImageMap,
        run_dir: &Path,
    ) -> Result<Self> {
        Self::start_with(client, node_name, images, run_dir, ShimOptions::default()).await
    }

    /// [`NodeShim::start`], with `options`.
    pub async fn start_with(
        client: Client,
        node_name: &str,
        images: ImageMap,
        run_dir: &Path,
        options: ShimOptions,
    ) -> Result<Self> {
        let subnet = random_subnet()?;
        node::register_node(&client, node_name, subnet).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let pods = Arc::new(Mutex::new(HashMap::new()));
        let shared = Arc::new(Shared {
            client: client.clone(),
            node_name: node_name.to_owned(),
            images,
            run_dir: run_dir.to_owned(),
            subnet,
            next_ip: std::sync::Mutex::new(2),
            options,
        });
        let tasks = vec![
            tokio::spawn(node::heartbeat(shared.clone(), shutdown_rx.clone())),
            tokio::spawn(volumes::provision_volumes(
                shared.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(watch_pods(shared, pods.clone(), shutdown_rx)),
        ];
        tracing::info!(node = node_name, "node shim is running");
        Ok(Self {
            node_name: node_name.to_owned(),
            client,
            shutdown,
            tasks,
            pods,
        })
    }

    /// The Node's name (also its `kubernetes.io/hostname` label).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// A node selector that puts pods on this shim's Node.
    pub fn node_selector(&self) -> BTreeMap<String, String> {
        [("kubernetes.io/hostname".to_owned(), self.node_name.clone())].into()
    }

    /// Stops every pod's processes and removes the Node.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let handles: Vec<PodHandle> = self.pods.lock().await.drain().map(|(_, h)| h).collect();
        for handle in handles {
            // Dropping the sender tells the pod task to stop its processes and return.
            drop(handle.updates);
            let _ = tokio::time::timeout(MAX_GRACE + Duration::from_secs(2), handle.task).await;
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes
            .delete(&self.node_name, &DeleteParams::default())
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e).context("deleting the shim's Node"),
        }
    }
}

impl Drop for NodeShim {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Shared {
    client: Client,
    node_name: String,
    images: ImageMap,
    run_dir: PathBuf,
    subnet: [u8; 3],
    next_ip: std::sync::Mutex<u8>,
    options: ShimOptions,
}

impl Shared {
    fn allocate_ip(&self) -> Result<Ipv4Addr> {
        let mut next = self
            .next_ip
            .lock()
            .map_err(|_| anyhow!("IP pool poisoned"))?;
        if *next == 255 {
            bail!("the node shim ran out of pod addresses");
        }
        let [a, b, c] = self.subnet;
        let ip = Ipv4Addr::new(a, b, c, *next);
        *next += 1;
        Ok(ip)
    }
}

/// A /24 inside 127.0.0.0/8 that is neither 127.0.0.x nor [`HOST_IP`]'s, chosen at random so
/// shims of concurrent test processes do not collide.
fn random_subnet() -> Result<[u8; 3]> {
    let mut bytes = [0u8; 2];
    getrandom(&mut bytes)?;
    Ok([127, 10 + bytes[0] % 240, bytes[1]])
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("reading /dev/urandom")
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

async fn watch_pods(
    shared: Arc<Shared>,
    pods: Arc<Mutex<HashMap<String, PodHandle>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", shared.node_name));
    let mut events = watcher(api, config).boxed();
    loop {
        let event = tokio::select! {
            next = events.try_next() => match next {
                Ok(Some(event)) => event,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "watching pods");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let Some(uid) = pod.uid() else { continue };
                let mut pods = pods.lock().await;
                if let Some(handle) = pods.get(&uid) {
                    let _ = handle.updates.send(pod);
                } else if pod.metadata.deletion_timestamp.is_none() {
                    let (updates, rx) = watch::channel(pod);
                    let task = tokio::spawn(pod::run_pod(shared.clone(), rx));
                    pods.insert(uid, PodHandle { updates, task });
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.uid() {
                    // Dropping the handle's sender stops the pod's processes.
                    pods.lock().await.remove(&uid);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

/// Waits until pod `name` reports Ready, at most `timeout`.
pub async fn await_pod_ready(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    crate::testing::await_condition(
        api,
        name,
        "the pod to be Ready",
        |pod: Option<&Pod>| pod.is_some_and(fleet::pod_ready),
        timeout,
    )
    .await?
    .with_context(|| format!("pod {name} disappeared"))
}

/// Lists the pods of a label selector, for assertions.
pub async fn pods_matching(api: &Api<Pod>, selector: &str) -> Result<Vec<Pod>> {
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}
