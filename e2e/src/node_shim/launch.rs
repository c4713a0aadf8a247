//! A container turned into a local process: program, arguments, environment, working directory.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;

use super::env::resolve_env;
use super::images::resolve_command;
use super::rewrite::{expand, rewrite_value};
use super::volumes::VolumeDirs;
use super::{MAX_GRACE, Shared};
use crate::process::ProcessSpec;

/// Builds the local process of one container: program from the image, `$(VAR)`-expanded
/// arguments and environment, pod-local addresses and mount paths rewritten.
pub(super) async fn container_process(
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
