//! Volumes as host directories: the claim provisioner and the directories of each pod's volumes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

use super::Shared;

/// Gives every pending PersistentVolumeClaim a hostPath PersistentVolume under the run
/// directory; the controller-manager's PV controller then binds them.
pub(super) async fn provision_volumes(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
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

/// Where each of a pod's volumes lives on the host.
pub(super) struct VolumeDirs {
    pub(super) dirs: HashMap<String, PathBuf>,
}

impl VolumeDirs {
    pub(super) async fn prepare(shared: &Shared, pod: &Pod, pod_dir: &Path) -> Result<Self> {
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
