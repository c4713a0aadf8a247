//! Supervised child processes: each runs in its own process group with its output in a log
//! file, is stopped with a signal and a grace period, and never outlives the harness.
//!
//! Every supervised child is forked from one long-lived spawner thread. On Linux the child asks
//! the kernel for SIGKILL when its parent goes away (`PR_SET_PDEATHSIG`), but the kernel means
//! the *thread* that forked it: a child forked from a tokio worker or a test thread would be
//! killed as soon as that thread ends (a `#[tokio::test]` runtime is dropped at the end of
//! every test). The spawner thread is started on first use and lives until the process exits,
//! so the signal fires exactly when the harness process dies, including by SIGKILL.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

use sys::signal_process_group;

/// How often readiness probes and exit checks poll.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often a stopping process is checked; most exit within milliseconds of the signal.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Upper bound for one readiness probe, so a hanging probe cannot eat the whole timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of a process log quoted in errors.
pub const LOG_TAIL_LINES: usize = 40;

/// SIGTERM: the usual polite stop request.
pub const SIGTERM: i32 = libc::SIGTERM;
/// SIGINT: Postgres's "fast shutdown" (SIGTERM waits for every client to disconnect).
pub const SIGINT: i32 = libc::SIGINT;

/// A user and group to run a child as (e.g. `postgres`, which refuses to run as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric primary group id.
    pub gid: u32,
}

/// What to run and how; kept by [`SupervisedProcess`] so a stopped process can be started again
/// the same way.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Short name used in logs and errors (`etcd`, `kube-apiserver`).
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables on top of the harness's own.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; the harness's own when unset.
    pub current_dir: Option<PathBuf>,
    /// Run as this user instead of the harness's own.
    pub user: Option<UserIds>,
    /// Signal that asks the process to stop; SIGKILL follows after `stop_grace`.
    pub stop_signal: i32,
    /// How long a stop request may take before SIGKILL.
    pub stop_grace: Duration,
}

impl ProcessSpec {
    /// A spec with no arguments that stops on SIGTERM with a 10 s grace period.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
            user: None,
            stop_signal: SIGTERM,
            stop_grace: Duration::from_secs(10),
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// Runs the child as another user (needs root).
    pub fn run_as(mut self, user: Option<UserIds>) -> Self {
        self.user = user;
        self
    }

    /// Sets the signal that asks the child to stop.
    pub fn stop_signal(mut self, signal: i32) -> Self {
        self.stop_signal = signal;
        self
    }

    /// Sets how long a stop request may take before SIGKILL.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// The command line, for logs.
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|part| part.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the spec to completion under supervision (output to `log_path`), failing with the
    /// log's tail when it exits non-zero or runs longer than `timeout`.
    pub async fn run_to_completion(&self, log_path: &Path, timeout: Duration) -> Result<()> {
        let mut process = SupervisedProcess::spawn(self.clone(), log_path.to_path_buf()).await?;
        let started = Instant::now();
        loop {
            if let Some(status) = process.poll_exit()? {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "{} failed ({}); last lines of {}:\n{}",
                    self.name,
                    describe_exit(status),
                    log_path.display(),
                    process.log_tail(LOG_TAIL_LINES)
                );
            }
            if started.elapsed() >= timeout {
                process.stop().await?;
                bail!(
                    "{} did not finish within {timeout:?}; last lines of {}:\n{}",
                    self.name,
                    log_path.display(),
                    process.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// A running (or stopped) child in its own process group, with stdout and stderr appended to a
/// log file. Dropping it stops the whole group (signal, grace period, then SIGKILL).
#[derive(Debug)]
pub struct SupervisedProcess {
    spec: ProcessSpec,
    log_path: PathBuf,
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
}

impl SupervisedProcess {
    /// Starts `spec` with its output appended to `log_path`.
    pub async fn spawn(spec: ProcessSpec, log_path: PathBuf) -> Result<Self> {
        let child = spawn_child(&spec, &log_path).await?;
        tracing::debug!(name = %spec.name, pid = child.id(), log = %log_path.display(), "started");
        Ok(Self {
            spec,
            log_path,
            child: Some(child),
            last_exit: None,
        })
    }

    /// The spec's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The spec this process was started from.
    pub fn spec(&self) -> &ProcessSpec {
        &self.spec
    }

    /// The process id (also its process group id) while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log (at most the last 64 KiB of it).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.poll_exit(), Ok(None))
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn poll_exit(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(self.last_exit);
        };
        let status = child
            .try_wait()
            .with_context(|| format!("checking whether {} is still running", self.spec.name))?;
        if let Some(status) = status {
            self.finish(status);
        }
        Ok(status)
    }

    /// Fails with the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.poll_exit()? {
            None => Ok(()),
            Some(status) => Err(self.exited_error(status, "while it was expected to run")),
        }
    }

    /// Polls `probe` until it succeeds, the process exits, or `timeout` passes; the error names
    /// `what` was awaited, the probe's last complaint and the tail of the process's log.
    pub async fn wait_until_ready<F>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: F,
    ) -> Result<()>
    where
        F: AsyncFnMut() -> Result<()>,
    {
        let started = Instant::now();
        loop {
            if let Some(status) = self.poll_exit()? {
                return Err(self.exited_error(status, &format!("before {what}")));
            }
            let last_complaint = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                Ok(Ok(())) => {
                    tracing::debug!(name = %self.spec.name, elapsed = ?started.elapsed(), "{what}");
                    return Ok(());
                }
                Ok(Err(error)) => format!("{error:#}"),
                Err(_) => format!("the probe took longer than {PROBE_TIMEOUT:?}"),
            };
            if started.elapsed() >= timeout {
                bail!(
                    "{} not ready within {timeout:?}: waited for {what}; last probe: {last_complaint}; \
                     last lines of {}:\n{}",
                    self.spec.name,
                    self.log_path.display(),
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the process group: the spec's stop signal, then SIGKILL after the grace period.
    /// Stopping a stopped process does nothing.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(pid) = self.signal_stop()? else {
            return Ok(());
        };
        let deadline = Instant::now() + self.spec.stop_grace;
        while self.poll_exit()?.is_none() {
            if Instant::now() >= deadline {
                self.kill_and_reap(pid)?;
                break;
            }
            tokio::time::sleep(STOP_POLL_INTERVAL).await;
        }
        // Members of the group that outlived their leader get no grace.
        let _ = signal_process_group(pid, libc::SIGKILL);
        Ok(())
    }

    /// Stops the process and starts it again from the same spec, appending to the same log.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        let child = spawn_child(&self.spec, &self.log_path).await?;
        self.child = Some(child);
        self.last_exit = None;
        Ok(())
    }

    /// The blocking form of [`SupervisedProcess::stop`], for `Drop` and exit handlers.
    pub fn stop_blocking(&mut self) {
        let pid = match self.signal_stop() {
            Ok(Some(pid)) => pid,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(name = %self.spec.name, "stopping: {error:#}");
                return;
            }
        };
        let deadline = Instant::now() + self.spec.stop_grace;
        loop {
            match self.poll_exit() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(STOP_POLL_INTERVAL),
                _ => {
                    if let Err(error) = self.kill_and_reap(pid) {
                        tracing::warn!(name = %self.spec.name, "killing: {error:#}");
                    }
                    break;
                }
            }
        }
        let _ = signal_process_group(pid, libc::SIGKILL);
    }

    /// Sends the stop signal to the group; `None` when the process had already exited.
    fn signal_stop(&mut self) -> Result<Option<u32>> {
        let Some(pid) = self.pid() else {
            return Ok(None);
        };
        if self.poll_exit()?.is_some() {
            // The leader is gone, but its group may not be.
            let _ = signal_process_group(pid, libc::SIGKILL);
            return Ok(None);
        }
        tracing::debug!(name = %self.spec.name, pid, "stopping");
        if let Err(error) = signal_process_group(pid, self.spec.stop_signal) {
            // ESRCH: it exited between the check and the signal.
            if error.raw_os_error() != Some(libc::ESRCH) {
                return Err(error).with_context(|| format!("signalling {}", self.spec.name));
            }
        }
        Ok(Some(pid))
    }

    fn kill_and_reap(&mut self, pid: u32) -> Result<()> {
        tracing::warn!(name = %self.spec.name, pid, grace = ?self.spec.stop_grace, "did not stop in time; SIGKILL");
        let _ = signal_process_group(pid, libc::SIGKILL);
        if let Some(child) = self.child.as_mut() {
            // SIGKILL cannot be ignored, so this wait is short.
            let status = child
                .wait()
                .with_context(|| format!("reaping {}", self.spec.name))?;
            self.finish(status);
        }
        Ok(())
    }

    fn finish(&mut self, status: ExitStatus) {
        self.child = None;
        self.last_exit = Some(status);
    }

    fn exited_error(&self, status: ExitStatus, when: &str) -> anyhow::Error {
        anyhow!(
            "{} exited ({}) {when}; last lines of {}:\n{}",
            self.spec.name,
            describe_exit(status),
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }
}

impl Drop for SupervisedProcess {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// "exit code 1" or "killed by signal 9".
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// The last `lines` lines of a log file, reading at most its last 64 KiB.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(could not read {}: {error})", path.display()),
    }
}

/// A loopback port that was free a moment ago (bound, then released for the child to take).
pub fn free_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding a free loopback port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// Succeeds once something accepts TCP connections on `127.0.0.1:port`.
pub async fn tcp_accepts(port: u16) -> Result<()> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    Ok(())
}

/// Makes a child started with `command` receive `signal` when the calling thread exits, and
/// fail to start if the harness is already gone. Use it only from a thread that lives as long
/// as the harness (a current-thread runtime's main thread, or the spawner thread).
pub fn exit_with_calling_thread(command: &mut Command, signal: i32) {
    let parent_pid = std::process::id();
    // SAFETY: the closure runs between fork and exec and only calls the async-signal-safe
    // `prctl` and `getppid`, allocating nothing (see `sys::die_with_parent`).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || sys::die_with_parent(parent_pid, signal));
    }
}

/// Sends `signal` to the single process `pid`.
pub fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    sys::send_signal(pid, signal)
}

/// Runs `handler` when the process exits normally (`exit` or a return from `main`), which is
/// how a test binary ends; used to stop servers shared by all tests of one binary.
pub fn run_at_exit(handler: extern "C" fn()) -> Result<()> {
    sys::at_exit(handler).context("registering an exit handler")
}

/// The effective user id of the harness.
pub fn effective_uid() -> u32 {
    sys::effective_uid()
}

/// One request to the spawner thread.
struct SpawnRequest {
    command: Command,
    reply: tokio::sync::oneshot::Sender<io::Result<Child>>,
}

/// The channel to the spawner thread, started on first use and alive until the process exits.
static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

fn spawner() -> Result<mpsc::Sender<SpawnRequest>> {
    let mut slot = SPAWNER
        .lock()
        .map_err(|_| anyhow!("the spawner lock was poisoned"))?;
    if let Some(sender) = slot.as_ref() {
        return Ok(sender.clone());
    }
    let (sender, requests) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("nubabel-spawner".into())
        .spawn(move || {
            // The static keeps a sender alive, so this loop (and the thread) ends with the process.
            for SpawnRequest { mut command, reply } in requests {
                let _ = reply.send(command.spawn());
            }
        })
        .context("starting the process spawner thread")?;
    *slot = Some(sender.clone());
    Ok(sender)
}

async fn spawn_child(spec: &ProcessSpec, log_path: &Path) -> Result<Child> {
    if !spec.program.exists() {
        bail!("{}: {} does not exist", spec.name, spec.program.display());
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    writeln!(
        log,
        "### nubabel-e2e: starting at unix time {}: {}",
        since_epoch.as_secs(),
        spec.command_line()
    )?;
    let stderr_log = log.try_clone()?;

    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr_log))
        // Its own group: a terminal's Ctrl-C does not reach it, and teardown can signal every
        // process it started.
        .process_group(0);
    if let Some(dir) = &spec.current_dir {
        command.current_dir(dir);
    }
    if let Some(user) = spec.user {
        // std sets the group, drops supplementary groups and then the user, before pre_exec
        // runs: the parent-death signal must be set after the switch, which clears it.
        command.uid(user.uid).gid(user.gid);
    }
    exit_with_calling_thread(&mut command, libc::SIGKILL);

    let (reply, child) = tokio::sync::oneshot::channel();
    spawner()?
        .send(SpawnRequest { command, reply })
        .map_err(|_| anyhow!("the process spawner thread is gone"))?;
    child
        .await
        .map_err(|_| anyhow!("the process spawner thread dropped the request"))?
        .with_context(|| format!("starting {}", spec.command_line()))
}

/// The few libc calls the supervisor needs; the only `unsafe` code of the crate.
#[allow(unsafe_code)]
mod sys {
    use std::io;

    /// Asks for `signal` when the forking thread exits; run between fork and exec.
    pub(super) fn die_with_parent(parent_pid: u32, signal: i32) -> io::Result<()> {
        // SAFETY: prctl with PR_SET_PDEATHSIG only reads its integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died between fork and prctl; then no signal would ever come.
        // SAFETY: getppid has no preconditions.
        let current_parent = unsafe { libc::getppid() };
        if u32::try_from(current_parent).ok() != Some(parent_pid) {
            // No allocation here: this runs in a forked child of a multi-threaded process.
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    }

    /// Sends `signal` to every process in the group led by `pid`.
    pub(super) fn signal_process_group(pid: u32, signal: i32) -> io::Result<()> {
        let group = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        if group <= 1 {
            // kill(0) or kill(-1) would signal far more than one group.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "refusing to signal group <= 1",
            ));
        }
        // SAFETY: kill only reads its integer arguments; a negative pid names a process group.
        let rc = unsafe { libc::kill(-group, signal) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `signal` to the single process `pid`.
    pub(super) fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        if pid <= 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "refusing to signal pid <= 1",
            ));
        }
        // SAFETY: kill only reads its integer arguments.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn at_exit(handler: extern "C" fn()) -> io::Result<()> {
        // SAFETY: `handler` is a plain function that lives as long as the program.
        let rc = unsafe { libc::atexit(handler) };
        if rc != 0 {
            return Err(io::Error::other("atexit refused the handler"));
        }
        Ok(())
    }

    pub(super) fn effective_uid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }
}
