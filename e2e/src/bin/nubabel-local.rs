//! `nubabel-local`: runs the local stack (Kubernetes control plane, Postgres, Redis) around a
//! command, or keeps it up until interrupted.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use nubabel_e2e::local::{run_command_in_stack, run_stack_until_signal};
use tracing_subscriber::EnvFilter;

/// The local stack: real etcd, kube-apiserver, kube-controller-manager and kube-scheduler
/// (v1.20.2), a private Postgres and a private Redis, on loopback ports.
#[derive(Debug, Parser)]
#[command(name = "nubabel-local", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the stack, run CMD with KUBECONFIG, NUBABEL_TEST_DATABASE_URL,
    /// NUBABEL_TEST_REDIS_URL and NUBABEL_LOCAL_DIR set, tear the stack down, and exit with
    /// CMD's status.
    Run {
        /// Keep the run directory (logs, data, kubeconfig) after teardown.
        #[arg(long)]
        keep_dir: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Start the stack, print the environment to use it, and keep it up until SIGINT or SIGTERM.
    Up {
        /// Keep the run directory (logs, data, kubeconfig) after teardown.
        #[arg(long)]
        keep_dir: bool,
    },
}

// One thread on purpose: children get a parent-death signal tied to the thread that forks them,
// and the main thread lives exactly as long as this program.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube's client logs every refused readiness probe as an error.
            EnvFilter::try_from_env("NUBABEL_LOCAL_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client=off")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let outcome: Result<u8> = match Cli::parse().command {
        Command::Run { keep_dir, command } => run_command_in_stack(&command, keep_dir).await,
        Command::Up { keep_dir } => run_stack_until_signal(keep_dir).await.map(|()| 0),
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("nubabel-local: {error:#}");
            ExitCode::FAILURE
        }
    }
}
