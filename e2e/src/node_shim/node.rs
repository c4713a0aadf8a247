//! The shim's Node: its registration, status and heartbeat Lease.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use super::Shared;

/// How often the Node's heartbeat is renewed (the node lifecycle controller allows 40 s).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Field manager of the shim's writes.
const FIELD_MANAGER: &str = "nubabel-node-shim";

pub(super) async fn register_node(client: &Client, name: &str, subnet: [u8; 3]) -> Result<()> {
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

pub(super) async fn heartbeat(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
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
