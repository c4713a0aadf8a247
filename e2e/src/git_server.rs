//! A real Git server for tests: `git http-backend` (smart HTTP, protocol v2) behind HTTP Basic
//! authentication, serving bare repositories it creates from files, on a loopback (or node
//! shim host) address. Every request's `Authorization` header is recorded so tests can prove
//! which requests carried a credential.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::AsyncWriteExt;

/// The user and password every request must present.
#[derive(Debug, Clone)]
pub struct Login {
    /// The user.
    pub username: String,
    /// The password (a token).
    pub password: String,
}

struct Shared {
    root: PathBuf,
    login: Login,
    authorizations: Mutex<Vec<Option<String>>>,
}

/// A running Git server; dropping it stops the server and removes its repositories.
pub struct GitServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    _root: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for GitServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitServer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Runs `git` with the test's identity and no user configuration.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !output.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

impl GitServer {
    /// Starts a server on a free port of `ip` that requires `login`.
    pub fn start_on(ip: IpAddr, login: Login) -> Result<Self> {
        let root = tempfile::tempdir().context("a directory for the Git server")?;
        let listener = std::net::TcpListener::bind((ip, 0))
            .with_context(|| format!("binding the Git server to a port on {ip}"))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            root: root.path().to_path_buf(),
            login,
            authorizations: Mutex::new(Vec::new()),
        });
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the Git server's runtime")?;
        let app = Router::new()
            .fallback(serve)
            .with_state(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("git-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .context("starting the Git server thread")?;
        Ok(Self {
            address,
            shared,
            _root: root,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Creates bare repository `name` (served at `/<name>.git`) with one commit per entry of
    /// `commits`, each a map of file path to content; returns the commit ids, oldest first.
    pub fn create_repository(
        &self,
        name: &str,
        commits: &[BTreeMap<&str, &str>],
    ) -> Result<Vec<String>> {
        let work = self.shared.root.join(format!("{name}.work"));
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "-q", "-b", "main"])?;
        let mut ids = Vec::new();
        for (n, files) in commits.iter().enumerate() {
            for (path, content) in files {
                let file = work.join(path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(file, content)?;
            }
            git(&work, &["add", "-A"])?;
            git(&work, &["commit", "-q", "-m", &format!("commit {n}")])?;
            ids.push(git(&work, &["rev-parse", "HEAD"])?);
        }
        let bare = self.shared.root.join(format!("{name}.git"));
        git(
            &self.shared.root,
            &[
                "clone",
                "-q",
                "--bare",
                &work.to_string_lossy(),
                &bare.to_string_lossy(),
            ],
        )?;
        git(&bare, &["config", "http.receivepack", "false"])?;
        Ok(ids)
    }

    /// The clone URL of repository `name`, without credentials.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}.git", self.address)
    }

    /// The `Authorization` header of every request so far (`None` where there was none).
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.shared
            .authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        drop(self.thread.take());
    }
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let expected = format!(
        "Basic {}",
        BASE64.encode(format!(
            "{}:{}",
            shared.login.username, shared.login.password
        ))
    );
    headers
        .get(header::AUTHORIZATION)
        .is_some_and(|value| value.as_bytes() == expected.as_bytes())
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    shared
        .authorizations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(authorization);
    if !authorized(&shared, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"git\"")],
            "authentication required",
        )
            .into_response();
    }
    match http_backend(&shared, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Runs `git http-backend` as a CGI program for one request.
async fn http_backend(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let header_value = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", &shared.login.username)
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header_value(header::CONTENT_TYPE))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env(
            "GIT_PROTOCOL",
            header_value(header::HeaderName::from_static("git-protocol")),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if header_value(header::CONTENT_ENCODING) == "gzip" {
        command.env("HTTP_CONTENT_ENCODING", "gzip");
    }
    let mut child = command.spawn().context("starting git http-backend")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&body).await?;
    }
    let output = child.wait_with_output().await?;
    cgi_response(&output.stdout)
}

/// Turns CGI output (headers, a blank line, the body) into a response.
fn cgi_response(output: &[u8]) -> Result<Response> {
    let split = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| output.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
        .context("git http-backend wrote no header block")?;
    let (head, body) = (&output[..split.0], &output[split.0 + split.1..]);
    let mut builder = Response::builder();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
            builder = builder.status(code);
        } else {
            builder = builder.header(name.trim(), value);
        }
    }
    Ok(builder.body(Body::from(body.to_vec()))?)
}
