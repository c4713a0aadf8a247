//! One container of a running pod: its process, restarts with backoff, and readiness probes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::now;
use crate::process::{ProcessSpec, SupervisedProcess};

/// Longest wait between restarts of a crashing container.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(10);

/// One container of a running pod.
pub(super) struct ContainerRuntime {
    pub(super) container: Container,
    pub(super) process: Option<SupervisedProcess>,
    pub(super) spec: ProcessSpec,
    pub(super) log_path: PathBuf,
    pub(super) restarts: i32,
    pub(super) ready: bool,
    pub(super) last_probe: Option<Instant>,
    pub(super) restart_at: Option<Instant>,
    pub(super) started_at: Option<Time>,
    pub(super) last_exit: Option<String>,
    /// Exit code and end time of the last run, once one ended.
    pub(super) last_termination: Option<(i32, Time)>,
    /// An init container that ran to completion.
    pub(super) completed: bool,
}

impl ContainerRuntime {
    pub(super) fn new(
        container: &Container,
        spec: ProcessSpec,
        pod_dir: &Path,
        start: bool,
    ) -> Self {
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
    pub(super) fn reap(&mut self) -> Option<bool> {
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
    pub(super) fn back_off(&mut self) {
        self.restarts += 1;
        let backoff = Duration::from_secs(1 << self.restarts.clamp(0, 4) as u32);
        self.restart_at = Some(Instant::now() + backoff.min(MAX_RESTART_BACKOFF));
    }

    /// Starts the process when a start is due.
    pub(super) async fn start_if_due(&mut self) {
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
}

impl ContainerRuntime {
    pub(super) async fn probe(&mut self, ip: Ipv4Addr) {
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
