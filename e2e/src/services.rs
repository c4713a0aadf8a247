//! Private Postgres and Redis servers for tests: Debian's binaries on free loopback ports with
//! their data in a temporary directory, so no test depends on a server someone else started.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::process::{self, ProcessSpec, SupervisedProcess, UserIds};
use crate::tools;

/// Environment variable naming a Postgres server for tests (a URL with rights to create
/// databases); `nubabel-local` sets it.
pub const TEST_DATABASE_URL_ENV: &str = "NUBABEL_TEST_DATABASE_URL";
/// Environment variable naming a Redis server for tests; `nubabel-local` sets it.
pub const TEST_REDIS_URL_ENV: &str = "NUBABEL_TEST_REDIS_URL";

const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A server of a test's own: its process on a free `127.0.0.1` port, with its files in a
/// directory, stopped and restarted on the same port. `K` is the kind of server: how it starts,
/// the URL clients use and when it is ready.
#[derive(Debug)]
pub struct PrivateServer<K> {
    // Declared before the directory so that it stops before its data is removed.
    process: SupervisedProcess,
    port: u16,
    kind: K,
    _own_dir: Option<TempDir>,
}

/// A Postgres server of its own ([`Postgres`]).
pub type PrivatePostgres = PrivateServer<Postgres>;
/// A Redis server of its own ([`Redis`]).
pub type PrivateRedis = PrivateServer<Redis>;

/// What one kind of [`PrivateServer`] does its own way.
pub trait ServerKind: Sized {
    /// The server's name in messages and in its temporary directory's name.
    const NAME: &'static str;
    /// What every start waits for, as the timeout message names it.
    const READINESS: &'static str;
    /// Starts a server with its files under `dir` (with [`PrivateServer::launch`]).
    fn start_in(dir: &Path) -> impl Future<Output = Result<PrivateServer<Self>>>;
    /// The URL clients connect to the server on `port` with.
    fn url(port: u16) -> String;
    /// Succeeds once the server on `port` accepts clients.
    fn probe(&self, port: u16) -> impl Future<Output = Result<()>> + Send;
}

impl<K: ServerKind> PrivateServer<K> {
    /// Starts a server with its files and log in a new temporary directory, removed on drop.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("nubabel-{}-", K::NAME.to_lowercase()))
            .tempdir()
            .with_context(|| format!("creating a temporary directory for {}", K::NAME))?;
        let mut server = K::start_in(dir.path()).await?;
        server._own_dir = Some(dir);
        Ok(server)
    }

    /// Starts a server with its files under `dir` (`dir/postgres` and `dir/postgres.log`, or
    /// `dir/redis` and `dir/redis.log`).
    pub async fn start_in(dir: &Path) -> Result<Self> {
        K::start_in(dir).await
    }

    /// The URL clients connect with (`postgres://postgres@127.0.0.1:PORT/postgres`,
    /// `redis://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        K::url(self.port)
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// Stops the server (Postgres with a fast shutdown): connections fail until
    /// [`PrivateServer::restart`].
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop().await
    }

    /// Starts the server again on the same port, with what it keeps on disk: Postgres its
    /// data, Redis nothing.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.restart().await?;
        self.wait_until_ready().await
    }

    /// Runs `spec`, the server listening on `port`, logging to `log_path`, and waits until it
    /// is ready.
    async fn launch(kind: K, spec: ProcessSpec, port: u16, log_path: PathBuf) -> Result<Self> {
        let process = SupervisedProcess::spawn(spec, log_path).await?;
        let mut server = Self {
            process,
            port,
            kind,
            _own_dir: None,
        };
        server.wait_until_ready().await?;
        tracing::info!(port, "private {} is ready", K::NAME);
        Ok(server)
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let port = self.port;
        let kind = &self.kind;
        self.process
            .wait_until_ready(K::READINESS, READY_TIMEOUT, async || kind.probe(port).await)
            .await
    }
}

impl PrivatePostgres {
    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        create_database_on(&self.url(), name).await
    }
}

/// Postgres: `initdb` into the server's directory, trust authentication, listening on
/// `127.0.0.1` only, durability traded for speed (`fsync=off`). When the harness runs as root,
/// Postgres runs as Debian's `postgres` user (it refuses root).
#[derive(Debug)]
pub struct Postgres {
    pg_isready: PathBuf,
}

impl ServerKind for Postgres {
    const NAME: &'static str = "Postgres";
    const READINESS: &'static str = "Postgres to accept connections";

    /// Data in `dir/postgres`, log in `dir/postgres.log`.
    async fn start_in(dir: &Path) -> Result<PrivatePostgres> {
        let bin_dir = tools::postgres_bin_dir()?;
        let user = server_user().await?;
        let home = dir.join("postgres");
        let data_dir = home.join("data");
        prepare_owned_dir(dir, &home, user)?;

        let log_path = dir.join("postgres.log");
        ProcessSpec::new("initdb", bin_dir.join("initdb"))
            .args(["--pgdata".as_ref(), data_dir.as_os_str()])
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .current_dir(&home)
            .run_as(user)
            .run_to_completion(&log_path, INITDB_TIMEOUT)
            .await?;

        let port = process::free_loopback_port()?;
        let spec = ProcessSpec::new("postgres", bin_dir.join("postgres"))
            .args(["-D".as_ref(), data_dir.as_os_str()])
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // TCP only: no socket in /var/run/postgresql next to the system's own server.
            .args(["-c", "unix_socket_directories="])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            // Every test binary may hold a pool of its own.
            .args(["-c", "max_connections=300"])
            .current_dir(&home)
            .run_as(user)
            // SIGTERM would wait for every client to disconnect; SIGINT is "fast shutdown".
            .stop_signal(process::SIGINT);
        let kind = Self {
            pg_isready: bin_dir.join("pg_isready"),
        };
        PrivateServer::launch(kind, spec, port, log_path).await
    }

    fn url(port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    async fn probe(&self, port: u16) -> Result<()> {
        let port = port.to_string();
        let output = Command::new(&self.pg_isready)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-t", "2"])
            .kill_on_drop(true)
            .output()
            .await
            .context("running pg_isready")?;
        if output.status.success() {
            Ok(())
        } else {
            bail!(
                "pg_isready: {}",
                String::from_utf8_lossy(&output.stdout).trim()
            )
        }
    }
}

/// Redis with no persistence.
#[derive(Debug)]
pub struct Redis;

impl ServerKind for Redis {
    const NAME: &'static str = "Redis";
    const READINESS: &'static str = "Redis to answer PING";

    /// Working directory `dir/redis`, log in `dir/redis.log`.
    async fn start_in(dir: &Path) -> Result<PrivateRedis> {
        let work_dir = dir.join("redis");
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let port = process::free_loopback_port()?;
        let spec = ProcessSpec::new("redis-server", tools::redis_server()?)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir".as_ref(), work_dir.as_os_str()])
            // Loopback only, so the protection that refuses remote clients adds nothing.
            .args([
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ]);
        PrivateServer::launch(Self, spec, port, dir.join("redis.log")).await
    }

    fn url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}")
    }

    async fn probe(&self, port: u16) -> Result<()> {
        redis_ping(port).await
    }
}

/// Sends `PING` to the Redis server on `127.0.0.1:port` and expects `+PONG`.
pub async fn redis_ping(port: u16) -> Result<()> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to Redis on port {port}"))?;
    stream.write_all(b"PING\r\n").await?;
    let mut reply = Vec::new();
    let mut buffer = [0_u8; 64];
    while !reply.ends_with(b"\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            bail!("Redis closed the connection after PING");
        }
        reply.extend_from_slice(&buffer[..read]);
    }
    if reply.starts_with(b"+PONG") {
        Ok(())
    } else {
        bail!(
            "Redis answered PING with {:?}",
            String::from_utf8_lossy(&reply).trim()
        )
    }
}

/// A fresh, uniquely named database on the test Postgres server: the server from
/// NUBABEL_TEST_DATABASE_URL when set, otherwise a PrivatePostgres started once per test process.
pub async fn fresh_database() -> Result<String> {
    let server_url = test_server_url().await?;
    create_database_on(&server_url, &unique_database_name()).await
}

/// Creates database `name` (lowercase letters, digits and `_`) on the server at `server_url` and
/// returns the new database's URL.
pub async fn create_database_on(server_url: &str, name: &str) -> Result<String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!("database name {name:?} must be 1 to 63 of [a-z0-9_]");
    }
    run_sql(server_url, &format!("CREATE DATABASE \"{name}\"")).await?;
    database_url(server_url, name)
}

/// Runs `sql` with psql against `url` and returns what it prints (unaligned, tuples only), or
/// psql's complaint.
pub async fn run_sql(url: &str, sql: &str) -> Result<String> {
    let psql = match tools::postgres_bin_dir() {
        Ok(dir) if dir.join("psql").is_file() => dir.join("psql"),
        _ => tools::find_on_path("psql").context("psql not found: run scripts/install-deps.sh")?,
    };
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-d", url, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("psql did not finish within 30 s running {sql:?}"))?
    .context("running psql")?;
    if !output.status.success() {
        bail!(
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `server_url` with its database (the URL path) replaced by `name`; the query string is kept.
pub fn database_url(server_url: &str, name: &str) -> Result<String> {
    let authority_start = server_url
        .find("://")
        .map(|index| index + 3)
        .with_context(|| format!("{server_url:?} is not a URL"))?;
    let (without_query, query) = match server_url.find('?') {
        Some(index) => server_url.split_at(index),
        None => (server_url, ""),
    };
    let authority_end = without_query[authority_start..]
        .find('/')
        .map_or(without_query.len(), |index| authority_start + index);
    Ok(format!("{}/{name}{query}", &without_query[..authority_end]))
}

/// A database name no other test (in this or another process) uses.
fn unique_database_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!(
        "test_{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The server every `fresh_database` of this process uses when no URL is given.
static SHARED_POSTGRES: SharedServer<Postgres> = SharedServer::new();

async fn test_server_url() -> Result<String> {
    SHARED_POSTGRES
        .url(TEST_DATABASE_URL_ENV, stop_shared_postgres)
        .await
}

extern "C" fn stop_shared_postgres() {
    SHARED_POSTGRES.stop();
}

/// The Redis server for tests: the one from NUBABEL_TEST_REDIS_URL when set, otherwise a
/// PrivateRedis started once per test process. Tests share it, so each should use keys (or a
/// stream name) of its own.
pub async fn test_redis_url() -> Result<String> {
    SHARED_REDIS
        .url(TEST_REDIS_URL_ENV, stop_shared_redis)
        .await
}

static SHARED_REDIS: SharedServer<Redis> = SharedServer::new();

extern "C" fn stop_shared_redis() {
    SHARED_REDIS.stop();
}

/// A private server the tests of one process share, started on first use.
struct SharedServer<K> {
    url: tokio::sync::OnceCell<String>,
    /// Kept here (not in the once-cell) so that the exit handler can stop it.
    server: Mutex<Option<PrivateServer<K>>>,
}

impl<K: ServerKind> SharedServer<K> {
    const fn new() -> Self {
        Self {
            url: tokio::sync::OnceCell::const_new(),
            server: Mutex::new(None),
        }
    }

    /// The URL in environment variable `env` when set, otherwise the shared server's, started
    /// on first use with `stop_at_exit` (which calls [`SharedServer::stop`]) registered.
    async fn url(&self, env: &str, stop_at_exit: extern "C" fn()) -> Result<String> {
        if let Some(url) = std::env::var(env).ok().filter(|url| !url.is_empty()) {
            return Ok(url);
        }
        let url = self
            .url
            .get_or_try_init(|| async {
                let server = PrivateServer::<K>::start().await?;
                let url = server.url();
                *self
                    .server
                    .lock()
                    .map_err(|_| anyhow!("the shared {} lock was poisoned", K::NAME))? =
                    Some(server);
                process::run_at_exit(stop_at_exit)?;
                Ok::<_, anyhow::Error>(url)
            })
            .await?;
        Ok(url.clone())
    }

    /// Stops the shared server and removes its data when the test binary exits; without this
    /// the parent-death signal would still kill it, but its directory would stay behind.
    fn stop(&self) {
        let server = match self.server.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(server);
    }
}

/// Debian's `postgres` user when running as root (initdb and postgres refuse root), else none.
async fn server_user() -> Result<Option<UserIds>> {
    if process::effective_uid() != 0 {
        return Ok(None);
    }
    let id = async |flag: &str| -> Result<u32> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .await
            .context("running id")?;
        if !output.status.success() {
            bail!(
                "running as root, Postgres needs the `postgres` user (Debian's postgresql \
                 package creates it): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("parsing the output of id")
    };
    Ok(Some(UserIds {
        uid: id("-u").await?,
        gid: id("-g").await?,
    }))
}

/// Creates `home` (mode 0700) owned by `user`, and lets `user` traverse `parent` to reach it.
fn prepare_owned_dir(parent: &Path, home: &Path, user: Option<UserIds>) -> Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
    if let Some(user) = user {
        let mode = std::fs::metadata(parent)?.permissions().mode();
        // Search permission only: the rest of the run directory stays private.
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o011))
            .with_context(|| format!("opening {} to the postgres user", parent.display()))?;
        std::os::unix::fs::chown(home, Some(user.uid), Some(user.gid))
            .with_context(|| format!("handing {} to the postgres user", home.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_the_path_and_keeps_the_query() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5/postgres", "t1").unwrap(),
            "postgres://postgres@127.0.0.1:5/t1"
        );
        assert_eq!(
            database_url("postgres://u:p@h:5/db?sslmode=disable", "t2").unwrap(),
            "postgres://u:p@h:5/t2?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://u@h:5", "t3").unwrap(),
            "postgres://u@h:5/t3"
        );
        assert_eq!(
            database_url("postgres://u@h:5?x=1", "t4").unwrap(),
            "postgres://u@h:5/t4?x=1"
        );
    }

    #[test]
    fn unique_database_names_are_valid_and_distinct() {
        let first = unique_database_name();
        let second = unique_database_name();
        assert_ne!(first, second);
        assert!(first.len() <= 63);
    }

    #[tokio::test]
    async fn create_database_on_rejects_names_that_need_quoting() {
        let error = create_database_on("postgres://x@127.0.0.1:1/postgres", "Robert\"; DROP")
            .await
            .unwrap_err();
        assert!(error.to_string().contains("must be"));
    }
}
