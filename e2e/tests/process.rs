//! Process supervision keeps its promises: whole process groups stop, stubborn processes are
//! killed after the grace period, failures quote the log, and a SIGKILLed `nubabel-local` leaves
//! no process of its stack behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nubabel_e2e::process::{ProcessSpec, SupervisedProcess};
use nubabel_e2e::services::redis_ping;
use nubabel_e2e::within;
use tokio::io::{AsyncBufReadExt, BufReader};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `pid` is alive (a zombie counts as gone).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Pids of live processes whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
        })
        .filter(|pid| is_alive(*pid))
        .collect()
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while !check() {
        if started.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn first_line_of(log: &Path) -> Result<u32> {
    let mut pid = None;
    eventually(
        Duration::from_secs(10),
        "the child to print its pid",
        || {
            pid = std::fs::read_to_string(log).ok().and_then(|text| {
                text.lines()
                    .filter(|line| !line.starts_with("###"))
                    .find_map(|line| line.trim().parse().ok())
            });
            pid.is_some()
        },
    )
    .await?;
    pid.context("no pid")
}

#[tokio::test]
async fn stopping_a_supervised_process_stops_its_whole_process_group() -> Result<()> {
    within(TEST_TIMEOUT, "the process group test", async {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("shell.log");
        let spec = ProcessSpec::new("shell", "/bin/sh").args(["-c", "sleep 600 & echo $!; wait"]);
        let mut shell = SupervisedProcess::spawn(spec, log.clone()).await?;
        let grandchild = first_line_of(&log).await?;
        assert!(is_alive(grandchild));

        shell.stop().await?;
        assert!(!shell.is_running());
        eventually(Duration::from_secs(5), "the grandchild to exit", || {
            !is_alive(grandchild)
        })
        .await
    })
    .await
}

#[tokio::test]
async fn dropping_a_supervised_process_stops_it() -> Result<()> {
    within(TEST_TIMEOUT, "the drop test", async {
        let dir = tempfile::tempdir()?;
        let spec = ProcessSpec::new("sleeper", "/bin/sleep").arg("600");
        let sleeper = SupervisedProcess::spawn(spec, dir.path().join("sleeper.log")).await?;
        let pid = sleeper.pid().context("no pid")?;
        drop(sleeper);
        assert!(!is_alive(pid));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_process_that_ignores_its_stop_signal_is_killed_after_the_grace_period() -> Result<()> {
    within(TEST_TIMEOUT, "the grace period test", async {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("stubborn.log");
        let spec = ProcessSpec::new("stubborn", "/bin/sh")
            .args(["-c", "trap '' TERM; echo $$; while :; do sleep 1; done"])
            .stop_grace(Duration::from_secs(1));
        let mut stubborn = SupervisedProcess::spawn(spec, log.clone()).await?;
        // Once it printed, the trap is set.
        first_line_of(&log).await?;
        let started = Instant::now();
        stubborn.stop().await?;
        let took = started.elapsed();
        assert!(!stubborn.is_running());
        assert!(took >= Duration::from_secs(1), "stopped after {took:?}");
        assert!(took < Duration::from_secs(5), "stopped after {took:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_process_that_exits_before_it_is_ready_fails_with_its_log_tail() -> Result<()> {
    within(TEST_TIMEOUT, "the early exit test", async {
        let dir = tempfile::tempdir()?;
        let spec = ProcessSpec::new("crasher", "/bin/sh").args([
            "-c",
            "echo 'listen tcp: address already in use' >&2; exit 3",
        ]);
        let mut crasher = SupervisedProcess::spawn(spec, dir.path().join("crasher.log")).await?;
        let error = crasher
            .wait_until_ready(
                "a port that never opens",
                Duration::from_secs(30),
                async || bail!("not yet"),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("exit code 3"), "{error}");
        assert!(error.contains("address already in use"), "{error}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_readiness_wait_gives_up_after_its_timeout_naming_what_it_awaited() -> Result<()> {
    within(TEST_TIMEOUT, "the readiness timeout test", async {
        let dir = tempfile::tempdir()?;
        let spec = ProcessSpec::new("idler", "/bin/sleep").arg("600");
        let mut idler = SupervisedProcess::spawn(spec, dir.path().join("idler.log")).await?;
        let error = idler
            .wait_until_ready("the moon to rise", Duration::from_millis(500), async || {
                bail!("no moon")
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("the moon to rise"), "{error}");
        assert!(error.contains("no moon"), "{error}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_sigkilled_nubabel_local_leaves_no_process_of_its_stack_behind() -> Result<()> {
    within(TEST_TIMEOUT, "the SIGKILL test", async {
        // A command line no other process has, to find the command after the kill.
        let marker = format!("{}.{}", 600, std::process::id());
        let mut local = tokio::process::Command::new(env!("CARGO_BIN_EXE_nubabel-local"))
            .args(["run", "--", "sleep", &marker])
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stderr = BufReader::new(local.stderr.take().context("no stderr")?).lines();
        let mut run_dir = None;
        while let Some(line) = stderr.next_line().await? {
            if let Some(dir) = line.strip_prefix("nubabel-local: starting the stack in ") {
                run_dir = Some(dir.to_owned());
            }
            if line.starts_with("nubabel-local: the stack is ready") {
                break;
            }
        }
        let run_dir = run_dir.context("nubabel-local never said where it runs")?;
        eventually(Duration::from_secs(10), "the command to start", || {
            !processes_mentioning(&marker).is_empty()
        })
        .await?;
        assert!(
            processes_mentioning(&run_dir).len() >= 5,
            "expected etcd, the three Kubernetes components and Postgres under {run_dir}"
        );
        // Redis renames its process, so it is found by the port the command was given.
        let command_pid = processes_mentioning(&marker)
            .into_iter()
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "sleep")
            })
            .context("the command is not running")?;
        let environ = std::fs::read(format!("/proc/{command_pid}/environ"))?;
        let redis_port: u16 = String::from_utf8_lossy(&environ)
            .split('\0')
            .find_map(|entry| entry.strip_prefix("NUBABEL_TEST_REDIS_URL=redis://127.0.0.1:"))
            .context("the command has no NUBABEL_TEST_REDIS_URL")?
            .parse()?;
        redis_ping(redis_port).await?;

        local.start_kill()?;
        local.wait().await?;
        eventually(
            Duration::from_secs(10),
            "the stack to die with nubabel-local",
            || {
                processes_mentioning(&run_dir).is_empty()
                    && processes_mentioning(&marker).is_empty()
            },
        )
        .await?;
        assert!(
            redis_ping(redis_port).await.is_err(),
            "Redis outlived nubabel-local"
        );
        // Nothing tore the run directory down; remove it here.
        std::fs::remove_dir_all(&run_dir).ok();
        Ok(())
    })
    .await
}
