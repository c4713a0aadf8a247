//! In-cluster credentials for the node shim's pods.
//!
//! On a real node a pod that mounts its ServiceAccount token finds it at
//! `/var/run/secrets/kubernetes.io/serviceaccount` and the API server at the
//! `KUBERNETES_SERVICE_HOST` address. The shim's pods are host processes: that path is shared by
//! the whole machine and the Service address is not routed. kube-rs reads `KUBECONFIG` before
//! the in-cluster files, so the shim gives such a container a kubeconfig of its own that holds
//! the mounted token and CA and names the real API server. The token is the one the
//! ServiceAccount admission plugin mounted (the pod's ServiceAccount's token Secret, 1.20's
//! default), so RBAC applies to the pod exactly as it would in a cluster.
//!
//! The shim's processes inherit the test's environment, whose `KUBECONFIG` is the cluster
//! admin's. A container without a token therefore gets `KUBECONFIG` naming a file that does not
//! exist: kube-rs then finds no kubeconfig and no in-cluster environment, as a pod without a
//! token has no credentials.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;

/// Where Kubernetes mounts a pod's ServiceAccount token, CA and namespace.
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The kubeconfig of a container whose token volume is at `token_dir` (a host directory
/// holding `token` and `ca.crt`), for the API server at `server`, with `namespace` as the
/// context's namespace (what the in-cluster `namespace` file gives). `None` when the volume
/// holds no token.
pub fn kubeconfig_for(
    token_dir: &Path,
    server: &str,
    namespace: &str,
    user: &str,
) -> Result<Option<String>> {
    let token_path = token_dir.join("token");
    if !token_path.is_file() {
        return Ok(None);
    }
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading {}", token_path.display()))?;
    let ca_path = token_dir.join("ca.crt");
    let ca = std::fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": server,
            "certificate-authority-data": ca_data,
        }}],
        "users": [{"name": user, "user": {"token": token.trim()}}],
        "contexts": [{"name": "in-cluster", "context": {
            "cluster": "in-cluster",
            "user": user,
            "namespace": namespace,
        }}],
        "current-context": "in-cluster",
    });
    // JSON is YAML, which every kubeconfig reader accepts.
    Ok(Some(serde_json::to_string_pretty(&config)?))
}

/// File name, in the pod's directory, that `KUBECONFIG` names for containers without a token;
/// it is never created.
pub const NO_CREDENTIALS: &str = "no-service-account-token.kubeconfig";

/// The `KUBECONFIG` of container `container` of a pod: a kubeconfig written to `pod_dir` when
/// `mounts` (mount path, host directory) include the ServiceAccount token volume, otherwise a
/// path in `pod_dir` that does not exist.
pub fn kubeconfig_path(
    mounts: &[(String, PathBuf)],
    pod_dir: &Path,
    container: &str,
    server: &str,
    namespace: &str,
    service_account: &str,
) -> Result<PathBuf> {
    let no_credentials = pod_dir.join(NO_CREDENTIALS);
    let Some((_, dir)) = mounts
        .iter()
        .find(|(path, _)| path == SERVICE_ACCOUNT_MOUNT)
    else {
        return Ok(no_credentials);
    };
    let user = format!("system:serviceaccount:{namespace}:{service_account}");
    let Some(config) = kubeconfig_for(dir, server, namespace, &user)? else {
        return Ok(no_credentials);
    };
    let path = pod_dir.join(format!("{container}.kubeconfig"));
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mounted_token_becomes_a_kubeconfig_for_the_real_server() {
        let dir = tempfile::tempdir().unwrap();
        let pod_dir = tempfile::tempdir().unwrap();
        let mounts = vec![(SERVICE_ACCOUNT_MOUNT.to_owned(), dir.path().to_owned())];

        // No token in the volume: a kubeconfig path that does not exist.
        let none = kubeconfig_path(
            &mounts,
            pod_dir.path(),
            "c",
            "https://127.0.0.1:6443",
            "ns",
            "sa",
        )
        .unwrap();
        assert_eq!(none, pod_dir.path().join(NO_CREDENTIALS));
        assert!(!none.exists());

        std::fs::write(dir.path().join("token"), "abc.def.ghi\n").unwrap();
        std::fs::write(dir.path().join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let path = kubeconfig_path(
            &mounts,
            pod_dir.path(),
            "c",
            "https://127.0.0.1:6443",
            "ns",
            "sa",
        )
        .unwrap();
        let config = kube::config::Kubeconfig::read_from(&path).unwrap();
        let cluster = config.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert!(cluster.certificate_authority_data.is_some());
        let context = config.contexts[0].context.as_ref().unwrap();
        assert_eq!(context.namespace.as_deref(), Some("ns"));
        assert_eq!(context.user.as_deref(), Some("system:serviceaccount:ns:sa"));
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(raw["users"][0]["user"]["token"], "abc.def.ghi");

        // A container without the mount gets nothing.
        let other = vec![("/data".to_owned(), dir.path().to_owned())];
        assert_eq!(
            kubeconfig_path(&other, pod_dir.path(), "c", "https://x", "ns", "sa").unwrap(),
            pod_dir.path().join(NO_CREDENTIALS)
        );
    }
}
