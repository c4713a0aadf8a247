//! A pod's lifecycle: its containers started in order, supervised, stopped and deleted.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use super::container::ContainerRuntime;
use super::launch::container_process;
use super::volumes::VolumeDirs;
use super::{Shared, now};

/// How often each pod's containers and probes are checked.
const POD_TICK: Duration = Duration::from_millis(250);

pub(super) async fn run_pod(shared: Arc<Shared>, mut updates: watch::Receiver<Pod>) {
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

pub(super) struct PodRuntime {
    pub(super) name: String,
    pub(super) namespace: String,
    pub(super) uid: String,
    pub(super) ip: Ipv4Addr,
    pub(super) start_time: Time,
    /// Run in order, each to completion, before `containers` start.
    pub(super) init_containers: Vec<ContainerRuntime>,
    pub(super) containers: Vec<ContainerRuntime>,
    /// `restartPolicy: Never`: a failed init container fails the pod.
    pub(super) never_restart: bool,
    /// The pod failed for good (only with `restartPolicy: Never`).
    pub(super) failed: bool,
    pub(super) last_reported: Option<serde_json::Value>,
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

    pub(super) fn initialized(&self) -> bool {
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
