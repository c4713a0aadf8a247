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

/// A Postgres server of its own: `initdb` into a temporary directory, trust authentication,
/// listening on a free `127.0.0.1` port only, durability traded for speed (`fsync=off`).
/// When the harness runs as root, Postgres runs as Debian's `postgres` user (it refuses root).
#[derive(Debug)]
pub struct PrivatePostgres {
    // Declared before the directory so that it stops before its data is removed.
    server: SupervisedProcess,
    port: u16,
    bin_dir: PathBuf,
    _own_dir: Option<TempDir>,
}

impl PrivatePostgres {
    /// Starts a server with its data and log in a new temporary directory, removed on drop.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nubabel-postgres-")
            .tempdir()
            .context("creating a temporary directory for Postgres")?;
        let mut postgres = Self::start_in(dir.path()).await?;
        postgres._own_dir = Some(dir);
        Ok(postgres)
    }

    /// Starts a server with its data in `dir/postgres` and its log in `dir/postgres.log`.
    pub async fn start_in(dir: &Path) -> Result<Self> {
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
        let server = SupervisedProcess::spawn(spec, log_path).await?;
        let mut postgres = Self {
            server,
            port,
            bin_dir,
            _own_dir: None,
        };
        postgres.wait_until_accepting().await?;
        tracing::info!(port, "private Postgres is ready");
        Ok(postgres)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        self.server.log_path()
    }

    /// Stops the server (fast shutdown): connections fail until [`PrivatePostgres::restart`].
    pub async fn stop(&mut self) -> Result<()> {
        self.server.stop().await
    }

    /// Starts the server again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.server.restart().await?;
        self.wait_until_accepting().await
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        create_database_on(&self.url(), name).await
    }

    async fn wait_until_accepting(&mut self) -> Result<()> {
        let pg_isready = self.bin_dir.join("pg_isready");
        let port = self.port.to_string();
        self.server
            .wait_until_ready(
                "Postgres to accept connections",
                READY_TIMEOUT,
                async || {
                    let output = Command::new(&pg_isready)
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
                },
            )
            .await
    }
}

/// A Redis server of its own on a free `127.0.0.1` port, with no persistence.
#[derive(Debug)]
pub struct PrivateRedis {
    server: SupervisedProcess,
    port: u16,
    _own_dir: Option<TempDir>,
}

impl PrivateRedis {
    /// Starts a server with its working directory in a new temporary directory.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nubabel-redis-")
            .tempdir()
            .context("creating a temporary directory for Redis")?;
        let mut redis = Self::start_in(dir.path()).await?;
        redis._own_dir = Some(dir);
        Ok(redis)
    }

    /// Starts a server working in `dir/redis`, logging to `dir/redis.log`.
    pub async fn start_in(dir: &Path) -> Result<Self> {
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
        let server = SupervisedProcess::spawn(spec, dir.join("redis.log")).await?;
        let mut redis = Self {
            server,
            port,
            _own_dir: None,
        };
        redis.wait_until_answering().await?;
        tracing::info!(port, "private Redis is ready");
        Ok(redis)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        self.server.log_path()
    }

    /// Stops the server: connections fail until [`PrivateRedis::restart`].
    pub async fn stop(&mut self) -> Result<()> {
        self.server.stop().await
    }

    /// Starts the server again on the same port (empty: it keeps nothing on disk).
    pub async fn restart(&mut self) -> Result<()> {
        self.server.restart().await?;
        self.wait_until_answering().await
    }

    async fn wait_until_answering(&mut self) -> Result<()> {
        let port = self.port;
        self.server
            .wait_until_ready("Redis to answer PING", READY_TIMEOUT, async || {
                redis_ping(port).await
            })
            .await
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
static SHARED_SERVER_URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
/// Kept here (not in the once-cell) so that the exit handler can stop it.
static SHARED_POSTGRES: Mutex<Option<PrivatePostgres>> = Mutex::new(None);

async fn test_server_url() -> Result<String> {
    if let Some(url) = std::env::var(TEST_DATABASE_URL_ENV)
        .ok()
        .filter(|url| !url.is_empty())
    {
        return Ok(url);
    }
    let url = SHARED_SERVER_URL
        .get_or_try_init(|| async {
            let postgres = PrivatePostgres::start().await?;
            let url = postgres.url();
            *SHARED_POSTGRES
                .lock()
                .map_err(|_| anyhow!("the shared Postgres lock was poisoned"))? = Some(postgres);
            process::run_at_exit(stop_shared_postgres)?;
            Ok::<_, anyhow::Error>(url)
        })
        .await?;
    Ok(url.clone())
}

/// Stops the shared server and removes its data when the test binary exits; without this the
/// parent-death signal would still kill it, but its directory would stay behind.
extern "C" fn stop_shared_postgres() {
    let postgres = match SHARED_POSTGRES.lock() {
        Ok(mut slot) => slot.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    drop(postgres);
}

/// The Redis server for tests: the one from NUBABEL_TEST_REDIS_URL when set, otherwise a
/// PrivateRedis started once per test process. Tests share it, so each should use keys (or a
/// stream name) of its own.
pub async fn test_redis_url() -> Result<String> {
    if let Some(url) = std::env::var(TEST_REDIS_URL_ENV)
        .ok()
        .filter(|url| !url.is_empty())
    {
        return Ok(url);
    }
    let url = SHARED_REDIS_URL
        .get_or_try_init(|| async {
            let redis = PrivateRedis::start().await?;
            let url = redis.url();
            *SHARED_REDIS
                .lock()
                .map_err(|_| anyhow!("the shared Redis lock was poisoned"))? = Some(redis);
            process::run_at_exit(stop_shared_redis)?;
            Ok::<_, anyhow::Error>(url)
        })
        .await?;
    Ok(url.clone())
}

static SHARED_REDIS_URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
static SHARED_REDIS: Mutex<Option<PrivateRedis>> = Mutex::new(None);

extern "C" fn stop_shared_redis() {
    let redis = match SHARED_REDIS.lock() {
        Ok(mut slot) => slot.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    drop(redis);
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
