//! A real OpenCode server (`opencode serve`) for tests: its own git-initialised project
//! directory, isolated `HOME` and `XDG_*` directories, the offline settings, basic auth, and
//! configuration by `OPENCODE_CONFIG_CONTENT` alone (a provider `fake` pointing at a fake LLM),
//! as the sidecar pods run it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake_llm::FakeLlm;
use crate::process::{self, ProcessSpec, SupervisedProcess};
use crate::tools;

/// The OpenCode release the harness and the images use.
pub const OPENCODE_VERSION: &str = "1.18.33";
/// Environment variable naming the `opencode` binary (`scripts/install-deps.sh` prints it).
pub const OPENCODE_BIN_ENV: &str = "NUBABEL_OPENCODE_BIN";
/// The basic-auth user OpenCode expects.
pub const OPENCODE_USERNAME: &str = "opencode";
/// The model every test server uses.
pub const FAKE_MODEL: &str = "fake/fake-model";

/// A fresh server takes 5 to 8 s to answer; builds running next to it slow it down.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The `opencode` binary: `$NUBABEL_OPENCODE_BIN`, else the cache `scripts/install-deps.sh` fills.
pub fn opencode_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(OPENCODE_BIN_ENV).filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let path = tools::cache_root().join(format!("opencode-{OPENCODE_VERSION}/bin/opencode"));
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{} is missing: run scripts/install-deps.sh or set {OPENCODE_BIN_ENV}",
            path.display()
        )
    }
}

/// The oh-my-opencode release the harness and the sidecar image use.
pub const OH_MY_OPENCODE_VERSION: &str = "4.19.4";
/// Environment variable naming the directory plugins are installed in (`scripts/install-deps.sh`
/// prints it); laid out as the image's plugin directory, `<dir>/node_modules/<name>`.
pub const PLUGIN_DIR_ENV: &str = "NUBABEL_PLUGIN_DIR";

/// The plugin directory: `$NUBABEL_PLUGIN_DIR`, else the cache `scripts/install-deps.sh` fills
/// (which may not exist; only fleets with plugins need it).
pub fn plugin_dir() -> PathBuf {
    match std::env::var_os(PLUGIN_DIR_ENV).filter(|value| !value.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => tools::cache_root().join(format!(
            "opencode-plugins-oh-my-opencode-{OH_MY_OPENCODE_VERSION}"
        )),
    }
}

/// The OpenCode configuration of a test server: provider `fake` (OpenAI-compatible) at
/// `llm_base_url`, used for both the model and the small model (titles), every permission
/// allowed except the blocking `question` tool, and nothing that needs the network.
pub fn fake_llm_config(llm_base_url: &str) -> Value {
    json!({
        "provider": {
            "fake": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake LLM",
                "options": {
                    "baseURL": llm_base_url,
                    "apiKey": "sk-fake",
                    "timeout": 300_000,
                },
                "models": {
                    "fake-model": {
                        "name": "Fake Model",
                        "tool_call": true,
                        "limit": {"context": 128_000, "output": 4096},
                    },
                },
            },
        },
        "model": FAKE_MODEL,
        "small_model": FAKE_MODEL,
        "permission": {"*": "allow", "question": "deny"},
        "autoupdate": false,
        "share": "disabled",
        // Per-step git snapshots cost about 2 s per turn and tests never revert.
        "snapshot": false,
    })
}

/// How to start a test server.
#[derive(Debug, Clone)]
pub struct OpencodeConfig {
    /// The whole `OPENCODE_CONFIG_CONTENT`.
    pub config: Value,
    /// The server password (basic auth, user `opencode`).
    pub password: String,
}

impl OpencodeConfig {
    /// The usual test configuration against a fake LLM at `llm_base_url`.
    pub fn with_fake_llm(llm_base_url: &str) -> Self {
        Self {
            config: fake_llm_config(llm_base_url),
            password: format!("test-password-{}", std::process::id()),
        }
    }
}

/// A running `opencode serve` on a free loopback port. Dropping it stops the server and
/// removes its directories.
#[derive(Debug)]
pub struct OpencodeServer {
    // Declared before the directory so that it stops before its files are removed.
    process: SupervisedProcess,
    port: u16,
    password: String,
    project_dir: PathBuf,
    _dir: TempDir,
}

impl OpencodeServer {
    /// Starts a server and waits until `/global/health` answers and the project's instance is
    /// loaded (the first request into a directory pays about a second of bootstrap).
    pub async fn start(config: OpencodeConfig) -> Result<Self> {
        let bin = opencode_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("nubabel-opencode-")
            .tempdir()
            .context("creating a temporary directory for OpenCode")?;
        let project_dir = dir.path().join("project");
        std::fs::create_dir_all(&project_dir)?;
        init_git_repository(&project_dir, dir.path()).await?;

        let port = process::free_loopback_port()?;
        let state = |name: &str| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            Ok(path)
        };
        let spec = ProcessSpec::new("opencode", bin)
            .args(["serve", "--hostname", "127.0.0.1", "--print-logs"])
            .args(["--port", &port.to_string()])
            .current_dir(&project_dir)
            .env("HOME", state("home")?)
            .env("XDG_DATA_HOME", state("xdg/data")?)
            .env("XDG_CONFIG_HOME", state("xdg/config")?)
            .env("XDG_CACHE_HOME", state("xdg/cache")?)
            .env("XDG_STATE_HOME", state("xdg/state")?)
            .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
            .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
            .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
            .env("OPENCODE_DISABLE_SHARE", "1")
            .env("npm_config_fetch_retries", "0")
            .env("OPENCODE_SERVER_PASSWORD", &config.password)
            .env("OPENCODE_CONFIG_CONTENT", config.config.to_string());
        let process = SupervisedProcess::spawn(spec, dir.path().join("opencode.log")).await?;
        let mut server = Self {
            process,
            port,
            password: config.password,
            project_dir,
            _dir: dir,
        };
        let authorization = server.authorization();
        server
            .process
            .wait_until_ready("/global/health to answer", START_TIMEOUT, async || {
                let (status, body) = get(port, "/global/health", &authorization).await?;
                if status == 200 && body.contains("\"healthy\":true") {
                    Ok(())
                } else {
                    bail!("/global/health answered {status}: {body}")
                }
            })
            .await?;
        server
            .process
            .wait_until_ready(
                "the project instance to load",
                START_TIMEOUT,
                async || match get(port, "/session", &authorization).await? {
                    (200, _) => Ok(()),
                    (status, body) => bail!("/session answered {status}: {body}"),
                },
            )
            .await?;
        tracing::info!(port, "OpenCode is ready");
        Ok(server)
    }

    /// Starts a fake LLM and a server configured to use it.
    pub async fn start_with_fake_llm() -> Result<(FakeLlm, Self)> {
        let llm = FakeLlm::start()?;
        let server = Self::start(OpencodeConfig::with_fake_llm(&llm.base_url())).await?;
        Ok((llm, server))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server password (user `opencode`).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The project directory (the server's working directory, a git repository).
    pub fn project_dir(&self) -> &Path {
        &self.project_dir
    }

    /// The server's log (stdout and stderr, with `--print-logs`).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(process::LOG_TAIL_LINES)
    }

    /// Stops the server (SIGTERM; it exits in about 2 s).
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop().await
    }

    fn authorization(&self) -> String {
        let credentials = format!("{OPENCODE_USERNAME}:{}", self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }
}

/// A fake LLM and a server using it, shared by every test of one test binary (a server costs
/// about 315 MB and several seconds to start). Tests keep apart by using their own sessions.
#[derive(Debug)]
pub struct SharedOpencode {
    /// The fake LLM the server talks to.
    pub llm: FakeLlm,
    /// The server.
    pub server: OpencodeServer,
}

static SHARED: tokio::sync::OnceCell<(String, String)> = tokio::sync::OnceCell::const_new();
static SHARED_PARTS: Mutex<Option<SharedOpencode>> = Mutex::new(None);

/// The shared server's base URL and password, starting it on first use; it is stopped when the
/// test binary exits. Use [`with_shared`] to reach the fake LLM's recorded requests.
pub async fn shared_opencode() -> Result<(String, String)> {
    let endpoint = SHARED
        .get_or_try_init(|| async {
            let (llm, server) = OpencodeServer::start_with_fake_llm().await?;
            let endpoint = (server.base_url(), server.password().to_owned());
            *SHARED_PARTS
                .lock()
                .map_err(|_| anyhow!("the shared OpenCode lock was poisoned"))? =
                Some(SharedOpencode { llm, server });
            process::run_at_exit(stop_shared_opencode)?;
            Ok::<_, anyhow::Error>(endpoint)
        })
        .await?;
    Ok(endpoint.clone())
}

/// Runs `f` on the shared server and fake LLM (started by [`shared_opencode`]).
pub fn with_shared<T>(f: impl FnOnce(&SharedOpencode) -> T) -> Result<T> {
    let parts = SHARED_PARTS
        .lock()
        .map_err(|_| anyhow!("the shared OpenCode lock was poisoned"))?;
    let shared = parts
        .as_ref()
        .context("the shared OpenCode server is not started: call shared_opencode first")?;
    Ok(f(shared))
}

extern "C" fn stop_shared_opencode() {
    let shared = match SHARED_PARTS.lock() {
        Ok(mut slot) => slot.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    drop(shared);
}

/// `git init` with one empty commit, so OpenCode sees a project with a stable id.
async fn init_git_repository(project_dir: &Path, log_dir: &Path) -> Result<()> {
    let git = tools::find_on_path("git").context("git not found on PATH")?;
    let log = log_dir.join("git.log");
    let run = |args: &[&str]| {
        ProcessSpec::new("git", &git)
            .args([
                "-c",
                "user.name=nubabel-e2e",
                "-c",
                "user.email=e2e@nubabel.invalid",
            ])
            .args(args.iter().copied())
            .current_dir(project_dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
    };
    run(&["init", "-q"])
        .run_to_completion(&log, Duration::from_secs(30))
        .await?;
    run(&["commit", "-q", "--allow-empty", "-m", "init"])
        .run_to_completion(&log, Duration::from_secs(30))
        .await
}

/// A minimal HTTP/1.1 GET on loopback (status and body), so the harness needs no HTTP client.
async fn get(port: u16, path: &str, authorization: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {authorization}\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no HTTP status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_configuration_points_model_and_small_model_at_the_fake_provider() {
        let config = fake_llm_config("http://127.0.0.1:1/v1");
        assert_eq!(
            config["provider"]["fake"]["options"]["baseURL"],
            "http://127.0.0.1:1/v1"
        );
        assert_eq!(config["model"], FAKE_MODEL);
        assert_eq!(config["small_model"], FAKE_MODEL);
        assert_eq!(config["permission"]["question"], "deny");
        assert_eq!(config["share"], "disabled");
    }
}
