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

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Node, PersistentVolume, PersistentVolumeClaim, Pod, Probe, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::process::{ProcessSpec, SupervisedProcess};

/// The loopback address host-side services of a test (callback API, fake LLM) listen on. The
/// shim rewrites `127.0.0.1`, `localhost` and `0.0.0.0` for pods, but never this address.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 1);

/// How often each pod's containers and probes are checked.
const POD_TICK: Duration = Duration::from_millis(250);
/// How often the Node's heartbeat is renewed (the node lifecycle controller allows 40 s).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Longest wait between restarts of a crashing container.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(10);
/// Longest grace period the shim gives a stopping pod.
const MAX_GRACE: Duration = Duration::from_secs(10);
/// Field manager of the shim's writes.
const FIELD_MANAGER: &str = "nubabel-node-shim";

/// Which local program runs each container image.
#[derive(Clone, Debug, Default)]
pub struct ImageMap {
    programs: Vec<(String, PathBuf)>,
}

impl ImageMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs images whose repository name (the last path segment, without tag or digest)
    /// equals or contains `name` with `program`. Earlier entries win.
    pub fn with(mut self, name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        self.programs.push((name.into(), program.into()));
        self
    }

    /// The program for `image`, if any.
    pub fn resolve(&self, image: &str) -> Option<&Path> {
        self.resolve_entry(image).map(|(_, program)| program)
    }

    /// The key and program of the entry that runs `image`, if any.
    pub fn resolve_entry(&self, image: &str) -> Option<(&str, &Path)> {
        let repository = image.split('@').next().unwrap_or(image);
        let last = repository.rsplit('/').next().unwrap_or(repository);
        let name = last.split(':').next().unwrap_or(last);
        self.programs
            .iter()
            .find(|(key, _)| name == key)
            .or_else(|| {
                self.programs
                    .iter()
                    .find(|(key, _)| name.contains(key.as_str()))
            })
            .map(|(key, program)| (key.as_str(), program.as_path()))
    }
}

/// How the shim runs a container: the program, and the arguments that come before the
/// container's `args`.
///
/// Without `command`, the image's mapped program runs (the image's entrypoint). With one, the
/// mapped program runs when `command[0]`'s file name is the program's file name or the image
/// map's key (`opencode` for an image mapped to `.../bin/opencode`); any other `command[0]`
/// is a tool the image carries (`mkdir`, `sh`), run from the host: an absolute path that
/// exists on the host as is, anything else by its file name on the host's `PATH`.
pub fn resolve_command(
    images: &ImageMap,
    image: &str,
    command: &[String],
    find_on_path: impl Fn(&str) -> Option<PathBuf>,
) -> Result<(PathBuf, Vec<String>)> {
    let mapped = images.resolve_entry(image);
    let Some((first, rest)) = command.split_first() else {
        let (_, program) = mapped.with_context(|| {
            format!("no local program for image {image:?} and the container has no command")
        })?;
        return Ok((program.to_owned(), Vec::new()));
    };
    let rest = rest.to_vec();
    let base = Path::new(first)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((key, program)) = mapped {
        let program_name = program.file_name().map(|n| n.to_string_lossy());
        if base == key || program_name.as_deref() == Some(base.as_str()) {
            return Ok((program.to_owned(), rest));
        }
    }
    if first.starts_with('/') && Path::new(first).is_file() {
        return Ok((PathBuf::from(first), rest));
    }
    let program = find_on_path(&base).with_context(|| {
        format!(
            "command {first:?} of image {image:?} is neither the image's mapped program nor \
             found on the host's PATH"
        )
    })?;
    Ok((program, rest))
}

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
        register_node(&client, node_name, subnet).await?;
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
            tokio::spawn(heartbeat(shared.clone(), shutdown_rx.clone())),
            tokio::spawn(provision_volumes(shared.clone(), shutdown_rx.clone())),
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

async fn register_node(client: &Client, name: &str, subnet: [u8; 3]) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nubabel.io/node-shim": "true"
            }
        }
    }))?;
    nodes
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&node),
        )
        .await
        .with_context(|| format!("registering Node {name}"))?;
    patch_node_status(client, name, subnet).await
}

async fn patch_node_status(client: &Client, name: &str, subnet: [u8; 3]) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let stamp = jiff::Timestamp::now().to_string();
    let [a, b, c] = subnet;
    let status = json!({
        "status": {
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "1Ti"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "1Ti"},
            "addresses": [
                {"type": "InternalIP", "address": format!("{a}.{b}.{c}.1")},
                {"type": "Hostname", "address": name}
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "node shim is running pods as local processes",
                "lastHeartbeatTime": stamp, "lastTransitionTime": stamp
            }],
            "nodeInfo": {
                "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux", "architecture": "amd64",
                "containerRuntimeVersion": "nubabel-node-shim://1", "osImage": "local processes",
                "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": ""
            }
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("updating the status of Node {name}"))?;
    Ok(())
}

async fn heartbeat(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    let mut interval = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(shared.node_name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(shared.node_name.clone()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(jiff::Timestamp::now())),
                ..LeaseSpec::default()
            }),
        };
        let renewed = leases
            .patch(
                &shared.node_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await;
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "renewing the node lease");
        }
        if let Err(e) = patch_node_status(&shared.client, &shared.node_name, shared.subnet).await {
            tracing::warn!(error = %e, "renewing the node status");
        }
    }
}

/// Gives every pending PersistentVolumeClaim a hostPath PersistentVolume under the run
/// directory; the controller-manager's PV controller then binds them.
async fn provision_volumes(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let claims: Api<PersistentVolumeClaim> = Api::all(shared.client.clone());
    let volumes: Api<PersistentVolume> = Api::all(shared.client.clone());
    let mut events = watcher(claims, watcher::Config::default())
        .applied_objects()
        .boxed();
    loop {
        let claim = tokio::select! {
            next = events.next() => match next {
                Some(Ok(claim)) => claim,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "watching claims");
                    continue;
                }
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let bound = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_ref())
            .is_some();
        let ours = shared
            .options
            .claim_namespaces
            .as_ref()
            .is_none_or(|namespaces| {
                namespaces
                    .iter()
                    .any(|n| Some(n.as_str()) == claim.metadata.namespace.as_deref())
            });
        if bound || !ours || claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if let Err(e) = provision(&shared, &volumes, &claim).await {
            tracing::warn!(claim = %claim.name_any(), error = %format!("{e:#}"), "provisioning a volume");
        }
    }
}

async fn provision(
    shared: &Shared,
    volumes: &Api<PersistentVolume>,
    claim: &PersistentVolumeClaim,
) -> Result<()> {
    let namespace = claim.namespace().unwrap_or_default();
    let uid = claim.uid().context("claim without uid")?;
    let name = format!("shim-{uid}");
    let path = shared.run_dir.join("volumes").join(&name);
    std::fs::create_dir_all(&path)?;
    let spec = claim.spec.clone().unwrap_or_default();
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map_or_else(|| "1Gi".to_owned(), |q| q.0.clone());
    let volume: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"nubabel.io/node-shim": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".to_owned()]),
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": spec.storage_class_name.unwrap_or_default(),
            "hostPath": {"path": path.to_string_lossy()},
            "claimRef": {"namespace": namespace, "name": claim.name_any(), "uid": uid}
        }
    }))?;
    match volumes.create(&PostParams::default(), &volume).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
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
                    let task = tokio::spawn(run_pod(shared.clone(), rx));
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

/// One container of a running pod.
struct ContainerRuntime {
    container: Container,
    process: Option<SupervisedProcess>,
    spec: ProcessSpec,
    log_path: PathBuf,
    restarts: i32,
    ready: bool,
    last_probe: Option<Instant>,
    restart_at: Option<Instant>,
    started_at: Option<Time>,
    last_exit: Option<String>,
    /// Exit code and end time of the last run, once one ended.
    last_termination: Option<(i32, Time)>,
    /// An init container that ran to completion.
    completed: bool,
}

impl ContainerRuntime {
    fn new(container: &Container, spec: ProcessSpec, pod_dir: &Path, start: bool) -> Self {
        Self {
            container: container.clone(),
            process: None,
            log_path: pod_dir.join(format!("{}.log", container.name)),
            spec,
            restarts: 0,
            ready: false,
            last_probe: None,
            restart_at: start.then(Instant::now),
            started_at: None,
            last_exit: None,
            last_termination: None,
            completed: false,
        }
    }

    /// Reaps the process if it exited; returns whether it succeeded.
    fn reap(&mut self) -> Option<bool> {
        let process = self.process.as_mut()?;
        let status = process.poll_exit().ok()??;
        let message = crate::process::describe_exit(status);
        tracing::info!(container = %self.container.name, %message, "container exited");
        let code = status
            .code()
            .or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s))
            .unwrap_or(-1);
        self.last_exit = Some(message);
        self.last_termination = Some((code, now()));
        self.process = None;
        self.ready = false;
        Some(status.success())
    }

    /// Schedules the next start after a failure, with the kubelet's doubling backoff.
    fn back_off(&mut self) {
        self.restarts += 1;
        let backoff = Duration::from_secs(1 << self.restarts.clamp(0, 4) as u32);
        self.restart_at = Some(Instant::now() + backoff.min(MAX_RESTART_BACKOFF));
    }

    /// Starts the process when a start is due.
    async fn start_if_due(&mut self) {
        if self.process.is_some() || self.restart_at.is_none_or(|at| at > Instant::now()) {
            return;
        }
        match SupervisedProcess::spawn(self.spec.clone(), self.log_path.clone()).await {
            Ok(process) => {
                self.process = Some(process);
                self.started_at = Some(now());
                self.restart_at = None;
                self.last_probe = None;
            }
            Err(e) => {
                self.last_exit = Some(format!("{e:#}"));
                self.last_termination = Some((128, now()));
                self.restarts += 1;
                self.restart_at = Some(Instant::now() + MAX_RESTART_BACKOFF);
            }
        }
    }

    /// The container's entry in `containerStatuses` or `initContainerStatuses`.
    fn status(&self, uid: &str, waiting_reason: &str) -> serde_json::Value {
        let terminated = |reason: &str| {
            let (code, finished) = self.last_termination.clone().unwrap_or((0, now()));
            json!({
                "exitCode": code,
                "reason": reason,
                "message": self.last_exit.clone().unwrap_or_default(),
                "startedAt": self.started_at,
                "finishedAt": finished,
            })
        };
        let mut last_state = json!({});
        let state = if self.completed {
            json!({"terminated": terminated("Completed")})
        } else if let Some(started) = &self.started_at
            && self.process.is_some()
        {
            if self.last_termination.is_some() {
                last_state = json!({"terminated": terminated("Error")});
            }
            json!({"running": {"startedAt": started}})
        } else if self.last_termination.is_some() && self.restarts <= 1 {
            // Just failed: kubectl shows Error (Init:Error for an init container).
            json!({"terminated": terminated("Error")})
        } else if self.last_termination.is_some() {
            last_state = json!({"terminated": terminated("Error")});
            json!({"waiting": {
                "reason": "CrashLoopBackOff",
                "message": self.last_exit.clone().unwrap_or_default()
            }})
        } else {
            json!({"waiting": {"reason": waiting_reason}})
        };
        json!({
            "name": self.container.name,
            "image": self.container.image.clone().unwrap_or_default(),
            "imageID": "",
            "containerID": format!("shim://{uid}/{}", self.container.name),
            "ready": self.ready || self.completed,
            "started": self.process.is_some(),
            "restartCount": self.restarts,
            "state": state,
            "lastState": last_state,
        })
    }
}

async fn run_pod(shared: Arc<Shared>, mut updates: watch::Receiver<Pod>) {
    let pod = updates.borrow().clone();
    let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    match PodRuntime::start(&shared, &pod).await {
        Ok(mut runtime) => {
            runtime.run(&shared, &mut updates).await;
            runtime.stop_all().await;
            if let Err(e) = runtime.finish_deletion(&shared).await {
                tracing::debug!(pod = %key, error = %format!("{e:#}"), "completing pod deletion");
            }
        }
        Err(e) => {
            tracing::warn!(pod = %key, error = %format!("{e:#}"), "pod could not start");
            let message = format!("{e:#}");
            let _ = report_failed_start(&shared, &pod, &message).await;
        }
    }
}

async fn report_failed_start(shared: &Shared, pod: &Pod, message: &str) -> Result<()> {
    let api: Api<Pod> =
        Api::namespaced(shared.client.clone(), &pod.namespace().unwrap_or_default());
    let status = json!({"status": {
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False", "reason": "ShimStartFailed", "message": message}]
    }});
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    Ok(())
}

struct PodRuntime {
    name: String,
    namespace: String,
    uid: String,
    ip: Ipv4Addr,
    start_time: Time,
    /// Run in order, each to completion, before `containers` start.
    init_containers: Vec<ContainerRuntime>,
    containers: Vec<ContainerRuntime>,
    /// `restartPolicy: Never`: a failed init container fails the pod.
    never_restart: bool,
    /// The pod failed for good (only with `restartPolicy: Never`).
    failed: bool,
    last_reported: Option<serde_json::Value>,
}

impl PodRuntime {
    async fn start(shared: &Shared, pod: &Pod) -> Result<Self> {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.uid().context("pod without uid")?;
        let ip = shared.allocate_ip()?;
        let pod_dir = shared
            .run_dir
            .join("pods")
            .join(format!("{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(&pod_dir)?;
        let spec = pod.spec.clone().context("pod without spec")?;
        let mounts = VolumeDirs::prepare(shared, pod, &pod_dir).await?;

        let mut init_containers = Vec::new();
        for (index, container) in spec.init_containers.iter().flatten().enumerate() {
            let process_spec = container_process(shared, pod, container, ip, &mounts, &pod_dir)
                .await
                .with_context(|| format!("preparing init container {}", container.name))?;
            init_containers.push(ContainerRuntime::new(
                container,
                process_spec,
                &pod_dir,
                index == 0,
            ));
        }
        let mut containers = Vec::new();
        for container in &spec.containers {
            let process_spec = container_process(shared, pod, container, ip, &mounts, &pod_dir)
                .await
                .with_context(|| format!("preparing container {}", container.name))?;
            containers.push(ContainerRuntime::new(
                container,
                process_spec,
                &pod_dir,
                init_containers.is_empty(),
            ));
        }
        tracing::info!(pod = %format!("{namespace}/{name}"), %ip, "starting pod");
        Ok(Self {
            name,
            namespace,
            uid,
            ip,
            start_time: now(),
            init_containers,
            containers,
            never_restart: spec.restart_policy.as_deref() == Some("Never"),
            failed: false,
            last_reported: None,
        })
    }

    fn api(&self, shared: &Shared) -> Api<Pod> {
        Api::namespaced(shared.client.clone(), &self.namespace)
    }

    async fn run(&mut self, shared: &Shared, updates: &mut watch::Receiver<Pod>) {
        let mut tick = tokio::time::interval(POD_TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = updates.changed() => {
                    if changed.is_err() {
                        return; // The pod is gone from the API server, or the shim stops.
                    }
                }
            }
            let deleting = updates.borrow().metadata.deletion_timestamp.is_some();
            if deleting {
                return;
            }
            self.supervise().await;
            if let Err(e) = self.report(shared).await {
                tracing::debug!(pod = %self.name, error = %format!("{e:#}"), "reporting pod status");
            }
        }
    }

    fn initialized(&self) -> bool {
        self.init_containers.iter().all(|c| c.completed)
    }

    /// Runs the init containers in order, then starts what should run, restarts what crashed
    /// (with backoff) and runs due probes.
    async fn supervise(&mut self) {
        if self.failed {
            return;
        }
        if !self.initialized() {
            self.supervise_init().await;
            if !self.initialized() {
                return;
            }
            for runtime in &mut self.containers {
                runtime.restart_at = Some(Instant::now());
            }
        }
        let ip = self.ip;
        for runtime in &mut self.containers {
            if runtime.reap().is_some() {
                runtime.back_off();
            }
            runtime.start_if_due().await;
            if runtime.process.is_some() {
                runtime.probe(ip).await;
            }
        }
    }

    /// Advances the init containers: the first incomplete one runs; when it succeeds the next
    /// starts at once, when it fails it is retried with backoff (or the pod fails, with
    /// `restartPolicy: Never`).
    async fn supervise_init(&mut self) {
        while let Some(index) = self.init_containers.iter().position(|c| !c.completed) {
            let runtime = &mut self.init_containers[index];
            match runtime.reap() {
                Some(true) => {
                    runtime.completed = true;
                    if let Some(next) = self.init_containers.get_mut(index + 1) {
                        next.restart_at = Some(Instant::now());
                    }
                    continue;
                }
                Some(false) if self.never_restart => {
                    self.failed = true;
                    return;
                }
                Some(false) => runtime.back_off(),
                None => {}
            }
            if runtime.restart_at.is_none() && runtime.process.is_none() {
                runtime.restart_at = Some(Instant::now());
            }
            runtime.start_if_due().await;
            return;
        }
    }

    fn status(&self) -> serde_json::Value {
        let initialized = self.initialized();
        let all_ready = initialized && self.containers.iter().all(|c| c.ready);
        let ready = if all_ready { "True" } else { "False" };
        let waiting = if initialized {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let statuses: Vec<serde_json::Value> = self
            .containers
            .iter()
            .map(|c| c.status(&self.uid, waiting))
            .collect();
        let init_statuses: Vec<serde_json::Value> = self
            .init_containers
            .iter()
            .map(|c| c.status(&self.uid, "PodInitializing"))
            .collect();
        let phase = if self.failed {
            "Failed"
        } else if initialized {
            "Running"
        } else {
            "Pending"
        };
        let initialized_condition = if initialized {
            json!({"type": "Initialized", "status": "True"})
        } else {
            let pending: Vec<&str> = self
                .init_containers
                .iter()
                .filter(|c| !c.completed)
                .map(|c| c.container.name.as_str())
                .collect();
            json!({
                "type": "Initialized", "status": "False",
                "reason": "ContainersNotInitialized",
                "message": format!("containers with incomplete status: [{}]", pending.join(" "))
            })
        };
        let [a, b, c, _] = self.ip.octets();
        json!({"status": {
            "phase": phase,
            "hostIP": format!("{a}.{b}.{c}.1"),
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": self.start_time,
            "conditions": [
                initialized_condition,
                {"type": "ContainersReady", "status": ready},
                {"type": "Ready", "status": ready},
                {"type": "PodScheduled", "status": "True"}
            ],
            "initContainerStatuses": init_statuses,
            "containerStatuses": statuses,
        }})
    }

    /// Patches the pod status when it changed since the last report.
    async fn report(&mut self, shared: &Shared) -> Result<()> {
        let status = self.status();
        if self.last_reported.as_ref() == Some(&status) {
            return Ok(());
        }
        self.api(shared)
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        self.last_reported = Some(status);
        Ok(())
    }

    async fn stop_all(&mut self) {
        for runtime in self.init_containers.iter_mut().chain(&mut self.containers) {
            if let Some(mut process) = runtime.process.take() {
                let _ = process.stop().await;
            }
        }
    }

    /// Completes a graceful deletion the way a kubelet does: once the processes are gone,
    /// the pod object is removed for good.
    async fn finish_deletion(&self, shared: &Shared) -> Result<()> {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api(shared).delete(&self.name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl ContainerRuntime {
    async fn probe(&mut self, ip: Ipv4Addr) {
        let Some(probe) = self.container.readiness_probe.clone() else {
            self.ready = true;
            return;
        };
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64)
            .min(Duration::from_secs(1));
        if self.last_probe.is_some_and(|at| at.elapsed() < period) {
            return;
        }
        self.last_probe = Some(Instant::now());
        self.ready = run_probe(&probe, &self.container, ip).await;
    }
}

async fn run_probe(probe: &Probe, container: &Container, ip: Ipv4Addr) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let port_of = |port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| match port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => Some(*p as u16),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port as u16),
    };
    if let Some(http) = &probe.http_get {
        let Some(port) = port_of(&http.port) else {
            return false;
        };
        let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
        return tokio::time::timeout(timeout, http_get_ok(ip, port, &path))
            .await
            .unwrap_or(false);
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = port_of(&tcp.port) else {
            return false;
        };
        return tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ip, port)))
            .await
            .is_ok_and(|c| c.is_ok());
    }
    // Exec probes would need the container's filesystem; none of the project's pods use one.
    false
}

async fn http_get_ok(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect((ip, port)).await else {
        return false;
    };
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.20\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 64];
    let Ok(n) = stream.read(&mut head).await else {
        return false;
    };
    let line = String::from_utf8_lossy(&head[..n]);
    let code: Option<u16> = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    code.is_some_and(|c| (200..400).contains(&c))
}

/// Where each of a pod's volumes lives on the host.
struct VolumeDirs {
    dirs: HashMap<String, PathBuf>,
}

impl VolumeDirs {
    async fn prepare(shared: &Shared, pod: &Pod, pod_dir: &Path) -> Result<Self> {
        let namespace = pod.namespace().unwrap_or_default();
        let mut dirs = HashMap::new();
        for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let dir = if let Some(claim) = &volume.persistent_volume_claim {
                claim_dir(shared, &namespace, &claim.claim_name).await?
            } else {
                let dir = pod_dir.join("volumes").join(&volume.name);
                std::fs::create_dir_all(&dir)?;
                if let Some(secret) = &volume.secret {
                    let name = secret.secret_name.clone().unwrap_or_default();
                    let api: Api<Secret> = Api::namespaced(shared.client.clone(), &namespace);
                    if let Some(secret) = api.get_opt(&name).await? {
                        for (key, value) in secret.data.unwrap_or_default() {
                            std::fs::write(dir.join(key), value.0)?;
                        }
                    }
                } else if let Some(map) = &volume.config_map {
                    let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &namespace);
                    if let Some(map) = api.get_opt(&map.name).await? {
                        for (key, value) in map.data.unwrap_or_default() {
                            std::fs::write(dir.join(key), value)?;
                        }
                    }
                }
                dir
            };
            dirs.insert(volume.name.clone(), dir);
        }
        Ok(Self { dirs })
    }
}

/// The host directory of a bound claim: its PersistentVolume's hostPath.
async fn claim_dir(shared: &Shared, namespace: &str, claim: &str) -> Result<PathBuf> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(shared.client.clone(), namespace);
    let volumes: Api<PersistentVolume> = Api::all(shared.client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let volume_name = claims
            .get_opt(claim)
            .await?
            .and_then(|c| c.spec)
            .and_then(|s| s.volume_name);
        if let Some(volume_name) = volume_name
            && let Some(path) = volumes
                .get_opt(&volume_name)
                .await?
                .and_then(|v| v.spec)
                .and_then(|s| s.host_path)
                .map(|h| PathBuf::from(h.path))
        {
            std::fs::create_dir_all(&path)?;
            return Ok(path);
        }
        if Instant::now() > deadline {
            bail!("claim {namespace}/{claim} was not bound within 30 s");
        }
    }
}

/// Builds the local process of one container: program from the image, `$(VAR)`-expanded
/// arguments and environment, pod-local addresses and mount paths rewritten.
async fn container_process(
    shared: &Shared,
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
    volumes: &VolumeDirs,
    pod_dir: &Path,
) -> Result<ProcessSpec> {
    let image = container.image.clone().unwrap_or_default();

    // Longest mount path first, so /data/xdg wins over /data.
    let mut mounts: Vec<(String, PathBuf)> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let dir = volumes.dirs.get(&m.name)?;
            let dir = match &m.sub_path {
                Some(sub) if !sub.is_empty() => dir.join(sub),
                _ => dir.clone(),
            };
            let path = m.mount_path.trim_end_matches('/');
            (!path.is_empty()).then(|| (path.to_owned(), dir))
        })
        .collect();
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    for (_, dir) in &mounts {
        std::fs::create_dir_all(dir)?;
    }
    let rewrite = |value: &str| rewrite_value(value, ip, &mounts);

    let namespace = pod.namespace().unwrap_or_default();
    let env = resolve_env(shared, pod, container, ip).await?;
    let mut expanded_env: Vec<(String, String)> = Vec::new();
    for (key, value) in env {
        let value = rewrite(&expand(&value, &expanded_env));
        expanded_env.push((key, value));
    }
    if let Some(server) = &shared.options.api_server
        && !expanded_env.iter().any(|(k, _)| k == "KUBECONFIG")
    {
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let path = crate::pod_credentials::kubeconfig_path(
            &mounts,
            pod_dir,
            &container.name,
            server,
            &namespace,
            &account,
        )?;
        expanded_env.push(("KUBECONFIG".to_owned(), path.to_string_lossy().into_owned()));
    }
    let command: Vec<String> = container
        .command
        .iter()
        .flatten()
        .map(|part| expand(part, &expanded_env))
        .collect();
    let (program, leading) =
        resolve_command(&shared.images, &image, &command, crate::tools::find_on_path)?;
    let argv: Vec<String> = leading
        .iter()
        .map(|arg| rewrite(arg))
        .chain(
            container
                .args
                .iter()
                .flatten()
                .map(|arg| rewrite(&expand(arg, &expanded_env))),
        )
        .collect();
    // Service URLs, resolved once for the arguments and the environment together.
    let values: Vec<String> = argv
        .iter()
        .cloned()
        .chain(expanded_env.iter().map(|(_, v)| v.clone()))
        .collect();
    let mut values = crate::service_urls::rewrite_all(&shared.client, &namespace, &values).await?;
    let env_values = values.split_off(argv.len());
    let argv = values;
    let expanded_env: Vec<(String, String)> = expanded_env
        .into_iter()
        .zip(env_values)
        .map(|((key, _), value)| (key, value))
        .collect();
    let mut spec = ProcessSpec::new(container.name.clone(), program)
        .stop_grace(pod_grace(pod))
        .env("NUBABEL_NODE_SHIM", "1")
        .args(argv.into_iter().map(OsString::from));
    for (key, value) in expanded_env {
        spec = spec.env(key, value);
    }
    let workdir = match &container.working_dir {
        Some(dir) => PathBuf::from(rewrite(dir)),
        None => pod_dir.join("rootfs"),
    };
    // A working dir outside every mount lands in the pod's own scratch space.
    let workdir = if workdir.starts_with(&shared.run_dir) {
        workdir
    } else {
        pod_dir
            .join("rootfs")
            .join(workdir.strip_prefix("/").unwrap_or(&workdir))
    };
    std::fs::create_dir_all(&workdir)?;
    Ok(spec.current_dir(workdir))
}

fn pod_grace(pod: &Pod) -> Duration {
    let seconds = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .max(0) as u64;
    Duration::from_secs(seconds).min(MAX_GRACE)
}

/// The container's environment in declaration order, with every `valueFrom` resolved.
async fn resolve_env(
    shared: &Shared,
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>> {
    let namespace = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(shared.client.clone(), &namespace);
    let maps: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &namespace);
    let mut env = Vec::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(secret_ref) = &source.secret_ref
            && let Some(secret) = secrets.get_opt(&secret_ref.name).await?
        {
            for (k, v) in secret.data.unwrap_or_default() {
                env.push((
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v.0).into_owned(),
                ));
            }
        }
        if let Some(map_ref) = &source.config_map_ref
            && let Some(map) = maps.get_opt(&map_ref.name).await?
        {
            for (k, v) in map.data.unwrap_or_default() {
                env.push((format!("{prefix}{k}"), v));
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = env_value(var, pod, ip, &secrets, &maps).await? {
            env.push((var.name.clone(), value));
        }
    }
    Ok(env)
}

async fn env_value(
    var: &EnvVar,
    pod: &Pod,
    ip: Ipv4Addr,
    secrets: &Api<Secret>,
    maps: &Api<ConfigMap>,
) -> Result<Option<String>> {
    let Some(from) = &var.value_from else {
        return Ok(Some(var.value.clone().unwrap_or_default()));
    };
    if let Some(key) = &from.secret_key_ref {
        let secret = secrets.get_opt(&key.name).await?;
        let value = secret.and_then(|s| s.data).and_then(|d| {
            d.get(&key.key)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        });
        return match value {
            Some(v) => Ok(Some(v)),
            None if key.optional == Some(true) => Ok(None),
            None => bail!(
                "secret key {}/{} of env {} is missing",
                key.name,
                key.key,
                var.name
            ),
        };
    }
    if let Some(key) = &from.config_map_key_ref {
        let value = maps
            .get_opt(&key.name)
            .await?
            .and_then(|m| m.data)
            .and_then(|d| d.get(&key.key).cloned());
        return match value {
            Some(v) => Ok(Some(v)),
            None if key.optional == Some(true) => Ok(None),
            None => bail!(
                "config map key {}/{} of env {} is missing",
                key.name,
                key.key,
                var.name
            ),
        };
    }
    if let Some(field) = &from.field_ref {
        let meta = &pod.metadata;
        let value = match field.field_path.as_str() {
            "metadata.name" => meta.name.clone(),
            "metadata.namespace" => meta.namespace.clone(),
            "metadata.uid" => meta.uid.clone(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone()),
            "status.podIP" => Some(ip.to_string()),
            "status.hostIP" => {
                let [a, b, c, _] = ip.octets();
                Some(format!("{a}.{b}.{c}.1"))
            }
            path => {
                let label = path
                    .strip_prefix("metadata.labels['")
                    .and_then(|rest| rest.strip_suffix("']"));
                label.and_then(|l| meta.labels.as_ref().and_then(|m| m.get(l).cloned()))
            }
        };
        return Ok(Some(value.unwrap_or_default()));
    }
    // resourceFieldRef: the shim enforces no limits, so report none.
    Ok(Some(String::new()))
}

/// Kubernetes `$(VAR)` expansion against the variables defined so far; `$$` escapes.
fn expand(value: &str, defined: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(stripped) = tail.strip_prefix("$$") {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = defined.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Rewrites pod-local addresses to the pod IP and mount paths to host directories.
fn rewrite_value(value: &str, ip: Ipv4Addr, mounts: &[(String, PathBuf)]) -> String {
    let ip = ip.to_string();
    let out = value
        .replace("0.0.0.0", &ip)
        .replace("127.0.0.1", &ip)
        .replace("localhost", &ip);
    replace_path_prefixes(&out, mounts)
}

/// Replaces each mount path (`mounts` is sorted longest first) with its host directory where
/// it starts a path (at the start of the value or after `=`, `:`, whitespace or a quote) and
/// is followed by `/`, the end, or a non-path character. One pass: a host directory that was
/// put in is never rewritten again (a run directory under `/tmp` next to a `/tmp` mount).
fn replace_path_prefixes(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    let bytes = value.as_bytes();
    'scan: while i < value.len() {
        let starts_path =
            i == 0 || matches!(bytes[i - 1], b'=' | b':' | b' ' | b'"' | b'\'' | b',');
        if starts_path {
            for (prefix, dir) in mounts {
                if !value[i..].starts_with(prefix.as_str()) {
                    continue;
                }
                let after = value[i + prefix.len()..].chars().next();
                if after.is_none_or(|c| {
                    c == '/' || !(c.is_alphanumeric() || c == '-' || c == '_' || c == '.')
                }) {
                    out.push_str(&dir.to_string_lossy());
                    i += prefix.len();
                    continue 'scan;
                }
            }
        }
        let ch = value[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Waits until pod `name` reports Ready, at most `timeout`.
pub async fn await_pod_ready(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    crate::testing::await_condition(
        api,
        name,
        "the pod to be Ready",
        |pod: Option<&Pod>| {
            pod.and_then(|p| p.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_resolve_by_repository_name_ignoring_registry_and_tag() {
        let map = ImageMap::new()
            .with("nubabel-bridge", "/bin/bridge")
            .with("opencode", "/bin/opencode");
        assert_eq!(
            map.resolve("ghcr.io/nubabel/nubabel-bridge:0.1.0"),
            Some(Path::new("/bin/bridge"))
        );
        assert_eq!(
            map.resolve("ghcr.io/nubabel/opencode-sidecar:1.18.33"),
            Some(Path::new("/bin/opencode"))
        );
        assert_eq!(map.resolve("busybox"), None);
    }

    #[test]
    fn commands_run_the_mapped_program_or_a_host_tool() {
        let map = ImageMap::new()
            .with("opencode", "/opt/oc/bin/opencode")
            .with("nubabel-bridge", "/work/target/debug/nubabel-bridge");
        let on_path = |name: &str| Some(PathBuf::from(format!("/usr/bin/{name}")));
        let strings = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        let image = "ghcr.io/nubabel/opencode:1.18.33";

        // command[0] names the mapped program by its file name, or by the map's key.
        let (program, leading) =
            resolve_command(&map, image, &strings(&["opencode", "x"]), on_path).unwrap();
        assert_eq!(program, Path::new("/opt/oc/bin/opencode"));
        assert_eq!(leading, strings(&["x"]));
        let (program, _) =
            resolve_command(&map, image, &strings(&["/usr/local/bin/opencode"]), on_path).unwrap();
        assert_eq!(program, Path::new("/opt/oc/bin/opencode"));
        let bridge = "e2e.local/nubabel-bridge:dev";
        let (program, _) =
            resolve_command(&map, bridge, &strings(&["nubabel-bridge"]), on_path).unwrap();
        assert_eq!(program, Path::new("/work/target/debug/nubabel-bridge"));

        // Any other command is a tool of the image, taken from the host's PATH.
        let (program, leading) =
            resolve_command(&map, image, &strings(&["mkdir", "-p", "/data/a"]), on_path).unwrap();
        assert_eq!(program, Path::new("/usr/bin/mkdir"));
        assert_eq!(leading, strings(&["-p", "/data/a"]));
        let (program, _) = resolve_command(
            &map,
            "busybox:1.36",
            &strings(&["sh", "-c", "true"]),
            on_path,
        )
        .unwrap();
        assert_eq!(program, Path::new("/usr/bin/sh"));
        let nowhere = |_: &str| None;
        assert!(resolve_command(&map, image, &strings(&["no-such-tool"]), nowhere).is_err());

        // Without a command the image's program runs, and an unmapped image has none.
        let (program, leading) = resolve_command(&map, bridge, &[], on_path).unwrap();
        assert_eq!(program, Path::new("/work/target/debug/nubabel-bridge"));
        assert!(leading.is_empty());
        assert!(resolve_command(&map, "busybox:1.36", &[], on_path).is_err());
    }

    #[test]
    fn mount_paths_are_rewritten_once() {
        let ip = Ipv4Addr::new(127, 20, 1, 5);
        let mounts = vec![
            (
                "/data".to_owned(),
                PathBuf::from("/tmp/run/pod/volumes/data"),
            ),
            ("/tmp".to_owned(), PathBuf::from("/tmp/run/pod/volumes/tmp")),
        ];
        assert_eq!(
            rewrite_value("/data/home", ip, &mounts),
            "/tmp/run/pod/volumes/data/home"
        );
        // An emptyDir at /tmp is a directory of its own; TMPDIR changes only where the
        // container sets it.
        assert_eq!(
            rewrite_value("/tmp", ip, &mounts),
            "/tmp/run/pod/volumes/tmp"
        );
        assert_eq!(
            rewrite_value("/tmp/x:/data", ip, &mounts),
            "/tmp/run/pod/volumes/tmp/x:/tmp/run/pod/volumes/data"
        );
    }

    #[test]
    fn variables_expand_like_kubernetes() {
        let defined = vec![("A".to_owned(), "x".to_owned())];
        assert_eq!(expand("$(A)-$(B)-$$(A)", &defined), "x-$(B)-$(A)");
    }

    #[test]
    fn pod_local_addresses_and_mount_paths_are_rewritten() {
        let ip = Ipv4Addr::new(127, 20, 1, 5);
        let mounts = vec![("/data".to_owned(), PathBuf::from("/tmp/run/v/data"))];
        assert_eq!(
            rewrite_value("--hostname 0.0.0.0", ip, &mounts),
            "--hostname 127.20.1.5"
        );
        assert_eq!(
            rewrite_value("http://127.0.0.1:4096", ip, &mounts),
            "http://127.20.1.5:4096"
        );
        assert_eq!(
            rewrite_value("/data/home", ip, &mounts),
            "/tmp/run/v/data/home"
        );
        assert_eq!(rewrite_value("/database", ip, &mounts), "/database");
        assert_eq!(
            rewrite_value(&format!("http://{HOST_IP}:8080"), ip, &mounts),
            format!("http://{HOST_IP}:8080")
        );
    }
}
