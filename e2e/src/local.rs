//! What `nubabel-local` does: start the stack in a run directory, run a command inside it or
//! keep it up, and tear it all down on exit, failure, SIGINT or SIGTERM.

use std::cell::Cell;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::process::{self, SIGTERM};
use crate::stack::LocalStack;
use crate::tools::ToolPaths;

/// How long the command may take to exit after a forwarded signal before it is killed.
const COMMAND_GRACE: Duration = Duration::from_secs(30);

/// Starts the stack, runs `command` inside it, tears the stack down and returns the exit code
/// to leave with (the command's, or 128 + signal).
///
/// The command gets SIGTERM if this process dies; that is tied to the calling thread, so call
/// this from the main thread of a current-thread runtime.
pub async fn run_command_in_stack(command: &[OsString], keep_dir: bool) -> Result<u8> {
    let (program, args) = command.split_first().context("no command to run")?;
    let mut signals = TerminationSignals::new()?;
    let run_dir = RunDir::create(keep_dir)?;
    let stack = start_stack(&run_dir, &mut signals).await?;

    let mut std_command = std::process::Command::new(program);
    std_command.args(args).envs(stack.env());
    process::exit_with_calling_thread(&mut std_command, SIGTERM);
    let started = Instant::now();
    let mut child = tokio::process::Command::from(std_command)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let status = tokio::select! {
        status = child.wait() => status.context("waiting for the command")?,
        signal = signals.recv() => {
            eprintln!("nubabel-local: {} received; passing it on to the command", signal.name);
            if let Some(pid) = child.id() {
                let _ = process::send_signal(pid, signal.number);
            }
            match tokio::time::timeout(COMMAND_GRACE, child.wait()).await {
                Ok(status) => status.context("waiting for the command")?,
                Err(_) => {
                    child.kill().await.context("killing the command")?;
                    child.wait().await.context("waiting for the command")?
                }
            }
        }
    };
    eprintln!(
        "nubabel-local: the command finished ({}) after {:.1} s",
        process::describe_exit(status),
        started.elapsed().as_secs_f64()
    );

    teardown(stack).await;
    Ok(exit_code(status))
}

/// Starts the stack, prints `export` lines for a shell, and keeps it up until SIGINT or
/// SIGTERM (or until a control-plane component dies).
pub async fn run_stack_until_signal(keep_dir: bool) -> Result<()> {
    let mut signals = TerminationSignals::new()?;
    let run_dir = RunDir::create(keep_dir)?;
    let mut stack = start_stack(&run_dir, &mut signals).await?;
    for (key, value) in stack.env() {
        println!("export {key}='{}'", value.to_string_lossy());
    }
    eprintln!("nubabel-local: the stack is up; stop it with Ctrl-C or SIGTERM");

    let mut health_checks = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            signal = signals.recv() => {
                eprintln!("nubabel-local: {} received", signal.name);
                break Ok(());
            }
            _ = health_checks.tick() => {
                if let Err(error) = stack.ensure_running() {
                    break Err(error);
                }
            }
        }
    };
    teardown(stack).await;
    outcome
}

async fn start_stack(run_dir: &RunDir, signals: &mut TerminationSignals) -> Result<LocalStack> {
    let tool_paths = ToolPaths::from_env();
    // Missing binaries are reported before anything starts.
    tool_paths.kube_apiserver()?;
    tool_paths.kube_controller_manager()?;
    tool_paths.kube_scheduler()?;
    tool_paths.kubectl()?;
    eprintln!(
        "nubabel-local: starting the stack in {}",
        run_dir.path().display()
    );
    let started = Instant::now();
    let stack = tokio::select! {
        stack = LocalStack::start(run_dir.path(), &tool_paths) => stack,
        // Dropping the half-started stack stops whatever had started.
        signal = signals.recv() => bail!("{} received while starting the stack", signal.name),
    };
    let stack = match stack {
        Ok(stack) => stack,
        Err(error) => {
            run_dir.keep_after_failure();
            return Err(error);
        }
    };
    eprintln!(
        "nubabel-local: the stack is ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (part, took) in stack.startup_timings() {
        eprintln!("nubabel-local:   {part}: {:.1} s", took.as_secs_f64());
    }
    Ok(stack)
}

async fn teardown(stack: LocalStack) {
    let started = Instant::now();
    if let Err(error) = stack.shutdown().await {
        eprintln!("nubabel-local: stopping the stack: {error:#}");
    }
    eprintln!(
        "nubabel-local: the stack is down after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The exit code a shell would report: the code itself, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}

/// The temporary run directory: removed when dropped, unless it is to be kept.
struct RunDir {
    dir: Option<TempDir>,
    path: PathBuf,
    keep: Cell<bool>,
}

impl RunDir {
    fn create(keep: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nubabel-local-")
            .tempdir()
            .context("creating the run directory")?;
        Ok(Self {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            keep: Cell::new(keep),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the logs of a stack that failed to start.
    fn keep_after_failure(&self) {
        self.keep.set(true);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take()
            && self.keep.get()
        {
            eprintln!(
                "nubabel-local: kept the run directory {}",
                dir.keep().display()
            );
        }
    }
}

/// A termination signal that arrived.
struct ReceivedSignal {
    name: &'static str,
    number: i32,
}

/// SIGINT and SIGTERM, listened to from the start so that they always lead to a teardown.
struct TerminationSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl TerminationSignals {
    fn new() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    async fn recv(&mut self) -> ReceivedSignal {
        tokio::select! {
            _ = self.interrupt.recv() => ReceivedSignal { name: "SIGINT", number: process::SIGINT },
            _ = self.terminate.recv() => ReceivedSignal { name: "SIGTERM", number: SIGTERM },
        }
    }
}
