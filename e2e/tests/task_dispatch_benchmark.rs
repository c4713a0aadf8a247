//! The task dispatch benchmark (ignored by default; docs/task-dispatch-benchmark.md has the
//! command and the figures): many DelegatedTasks against a fleet of real OpenCode pods on the
//! node shim with the fake LLM, measuring task created → prompt accepted by OpenCode, and the
//! tasks per second the operator sustains.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use kube::api::ListParams;
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, create, within};
use task_support::task;

mod task_support;

/// Prefix of each task's marker in its prompt (followed by five digits).
const MARKER: &str = "qzx";
/// Tasks sent one at a time to the idle fleet before the load.
const IDLE_PROBES: usize = 5;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn summary(name: &str, mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "{name}: n={} p50={:.3}s p90={:.3}s p99={:.3}s max={:.3}s",
        values.len(),
        percentile(&values, 0.5),
        percentile(&values, 0.9),
        percentile(&values, 0.99),
        values.last().copied().unwrap_or_default()
    )
}

fn seconds_between(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64())
}

/// `NUBABEL_BENCH_TASKS` tasks (default 200), created `NUBABEL_BENCH_RATE` per second (default
/// 0: as fast as the API server takes them), on a fleet of `NUBABEL_BENCH_PODS` pods (default
/// 2) with `NUBABEL_BENCH_SESSIONS_PER_POD` slots each (default 16).
#[tokio::test]
#[ignore = "a benchmark: minutes of load on the local control plane"]
async fn benchmark_task_dispatch_latency_and_throughput() -> Result<()> {
    let count: usize = env_or("NUBABEL_BENCH_TASKS", 200);
    let rate: f64 = env_or("NUBABEL_BENCH_RATE", 0.0);
    let pods: i32 = env_or("NUBABEL_BENCH_PODS", 2);
    let slots: i32 = env_or("NUBABEL_BENCH_SESSIONS_PER_POD", 16);

    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "tasks-bench").await?;
    let system = System::start(&env, &namespace).await?;
    within(Duration::from_secs(1200), "the dispatch benchmark", async {
        system.bind_organization("org-bench").await?;
        let mut sidecar = system.sidecar_manifest("fleet", "org-bench", pods)?;
        sidecar.spec.max_sessions_per_pod = Some(slots);
        create(&namespace.api(), &sidecar).await?;
        system.await_fleet_ready("fleet", pods).await?;
        let tasks = namespace.api::<DelegatedTask>();

        // Warm up each pod (first prompts load OpenCode's provider and agent code).
        for i in 0..pods * 2 {
            let name = format!("warm-{i}");
            create(&tasks, &task(&name, "org-bench", Some("fleet"), None, "warm up")).await?;
        }
        wait_all_finished(&tasks, "warm-", (pods * 2) as usize, &system).await?;

        let marker = |i: usize| format!("{MARKER}{i:05}");

        // One task at a time on the idle fleet: the latency without a queue.
        let mut idle = Vec::new();
        for i in 0..IDLE_PROBES {
            let name = format!("idle-{i}");
            let mark = format!("{MARKER}9{i:04}");
            let created = SystemTime::now();
            create(&tasks, &task(&name, "org-bench", Some("fleet"), None, &format!("probe {mark}"))).await?;
            wait_all_finished(&tasks, &name, 1, &system).await?;
            let seen = system
                .fake_llm()
                .received()
                .into_iter()
                .filter(|r| r.body.to_string().contains(&mark))
                .map(|r| r.at)
                .min()
                .context("the probe's prompt never reached the LLM")?;
            idle.push(seconds_between(created, seen));
        }

        let mut created_at: HashMap<String, SystemTime> = HashMap::new();
        let started = Instant::now();
        let started_wall = SystemTime::now();
        for i in 0..count {
            if rate > 0.0 {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let name = format!("bench-{i:05}");
            let prompt = format!("load test {}", marker(i));
            created_at.insert(marker(i), SystemTime::now());
            create(&tasks, &task(&name, "org-bench", Some("fleet"), None, &prompt)).await?;
        }
        let created_in = started.elapsed().as_secs_f64();
        let finished = wait_all_finished(&tasks, "bench-", count, &system).await?;
        let all_done_in = started.elapsed().as_secs_f64();

        // Precise: task created (client clock, just before the create call) → the first LLM
        // request carrying the task's marker (OpenCode accepted the prompt and started the turn).
        let received = system.fake_llm().received();
        let mut first_seen: HashMap<String, SystemTime> = HashMap::new();
        for request in &received {
            let text = request.body.to_string();
            for (at, _) in text.match_indices(MARKER) {
                let Some(found) = text.get(at..at + MARKER.len() + 5) else {
                    continue;
                };
                if created_at.contains_key(found) {
                    first_seen
                        .entry(found.to_owned())
                        .and_modify(|t| *t = (*t).min(request.at))
                        .or_insert(request.at);
                }
            }
        }
        let to_llm: Vec<f64> = created_at
            .iter()
            .filter_map(|(m, c)| first_seen.get(m).map(|s| seconds_between(*c, *s)))
            .collect();
        let last_llm = first_seen.values().max().copied().unwrap_or(started_wall);

        // Coarse (1 s resolution): metadata.creationTimestamp → status.dispatchTime.
        let mut to_dispatch = Vec::new();
        let mut phases: HashMap<String, usize> = HashMap::new();
        for t in &finished {
            let status = t.status.clone().unwrap_or_default();
            *phases.entry(format!("{:?}", status.phase)).or_default() += 1;
            if let (Some(c), Some(d)) = (&t.metadata.creation_timestamp, &status.dispatch_time) {
                to_dispatch.push((d.0.as_millisecond() - c.0.as_millisecond()) as f64 / 1000.0);
            }
        }
        let dispatch_window = seconds_between(started_wall, last_llm);
        println!("== task dispatch benchmark ==");
        println!(
            "tasks={count} pods={pods} sessionsPerPod={slots} rate={}",
            if rate > 0.0 { format!("{rate}/s") } else { "burst".to_owned() }
        );
        println!("{}", summary("idle fleet, one task at a time: created -> first LLM request", idle));
        println!("created in {created_in:.1}s; phases {phases:?}");
        println!("{}", summary("created -> first LLM request (precise)", to_llm));
        println!("{}", summary("creationTimestamp -> dispatchTime (1 s resolution)", to_dispatch));
        println!(
            "dispatched {count} in {dispatch_window:.1}s from the first create: {:.1} tasks/s; all finished in {all_done_in:.1}s: {:.1} tasks/s",
            count as f64 / dispatch_window,
            count as f64 / all_done_in
        );
        println!("fake LLM requests: {}", received.len());
        // What happened to the tasks that did not succeed, for the write-up.
        for t in finished.iter().filter(|t| {
            t.status.as_ref().and_then(|s| s.phase) != Some(TaskPhase::Succeeded)
        }) {
            let status = t.status.clone().unwrap_or_default();
            let prompt = t.spec.prompt.clone();
            let mark = prompt.rsplit(' ').next().unwrap_or_default().to_owned();
            let requests: Vec<String> = received
                .iter()
                .filter(|r| r.body.to_string().contains(&mark))
                .map(|r| format!("{:.1}s", seconds_between(started_wall, r.at)))
                .collect();
            println!(
                "not succeeded: {} {:?} {:?} pod {:?} session {:?} dispatched {:?}; LLM requests at {requests:?}",
                t.metadata.name.clone().unwrap_or_default(),
                status.phase,
                status.error,
                status.sidecar_pod,
                status.opencode_session_id,
                status.dispatch_time.map(|d| d.0.to_string()),
            );
            if let (Some(pod), Some(session)) = (&status.sidecar_pod, &status.opencode_session_id)
                && let Ok(opencode) = system.opencode_on("fleet", pod).await
                && let Ok(messages) = opencode.messages(session, None).await
            {
                for m in messages {
                    println!(
                        "  {:?} finish {:?} completed {:?} error {:?} parts {}",
                        m.info.role,
                        m.info.finish,
                        m.info.time.completed,
                        m.info.error.as_ref().map(|e| e.name.clone()),
                        m.parts.len()
                    );
                }
            }
        }
        anyhow::ensure!(
            first_seen.len() == count,
            "only {} of {count} prompts reached the LLM",
            first_seen.len()
        );
        Ok(())
    })
    .await?;
    system.shutdown().await?;
    namespace.delete().await
}

/// Waits until `count` tasks named `prefix...` have finished; returns them.
async fn wait_all_finished(
    api: &kube::Api<DelegatedTask>,
    prefix: &str,
    count: usize,
    system: &System,
) -> Result<Vec<DelegatedTask>> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let mine: Vec<DelegatedTask> = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|t| {
                t.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .collect();
        let done = mine
            .iter()
            .filter(|t| {
                t.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(TaskPhase::is_finished)
            })
            .count();
        if done == count {
            return Ok(mine);
        }
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!("{done} of {count} {prefix} tasks finished"))
                .with_context(|| system.diagnostics());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
