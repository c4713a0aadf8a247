//! Fleets with the real oh-my-opencode plugin (the release the image bakes in, from the plugin
//! directory `scripts/install-deps.sh` fills) on real OpenCode, the scripted fake LLM calling
//! the plugin's `task` tool: tasks run as Sisyphus, subagents belong to their task (stream,
//! status, its end), a background subagent holds its task until it is done, and a cancel takes
//! it down too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_e2e::fake_llm::message_text;
use nubabel_e2e::system::{FAKE_PROVIDER, System};
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use serde_json::{Value, json};
use task_support::{await_phase, await_running, request_texts, task, with};

mod task_support;

const LIMIT: Duration = Duration::from_secs(300);

/// A fleet of `replicas` pods running the plugin, with categories `deep` and `quick` on models
/// of their own and the skills ConfigMap `skills`.
fn plugin_fleet(system: &System, name: &str, org: &str, replicas: i32) -> Result<OpencodeSidecar> {
    let mut fleet = serde_json::to_value(system.sidecar_manifest(name, org, replicas)?)?;
    fleet["spec"]["ohMyOpencode"] = json!({});
    fleet["spec"]["categories"] = json!({
        "deep": {"model": format!("{FAKE_PROVIDER}/deep-model")},
        "quick": {"model": format!("{FAKE_PROVIDER}/fast-model")},
    });
    fleet["spec"]["skillsConfigMapRef"] = json!({"name": "skills"});
    Ok(serde_json::from_value(fleet)?)
}

async fn skills(namespace: &TestNamespace) -> Result<()> {
    create(
        &namespace.api::<ConfigMap>(),
        &serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "skills"},
            "data": {"release-notes": "Write release notes in the past tense. SKILL-MARKER-77"},
        }))?,
    )
    .await?;
    Ok(())
}

/// The prompt that makes the fake LLM call the plugin's `task` tool with `arguments`.
fn delegate(arguments: Value) -> String {
    format!("MCPCALL:task:{arguments}")
}

/// The text of a request's first user message: what its session was asked.
fn asked(request: &Value) -> String {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["role"] == "user")
        .map(message_text)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_task_runs_as_sisyphus_and_its_foreground_subagent_belongs_to_it() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "omo-sync").await?;
    let system = System::start(&env, &namespace).await?;
    // The sidecar image carries Pyright; the local stack puts it on PATH for the pods.
    nubabel_e2e::tools::find_on_path("pyright-langserver").context(
        "pyright-langserver is not on PATH: run through scripts/test.sh, or put the \
         NUBABEL_LSP_BIN that scripts/install-deps.sh prints on PATH",
    )?;
    within(LIMIT, "a task delegating to a foreground subagent", async {
        system.bind_organization("org-omo").await?;
        skills(&namespace).await?;
        let mut fleet = plugin_fleet(&system, "fleet", "org-omo", 1)?;
        fleet.spec.lsp = true;
        create(&namespace.api(), &fleet).await?;
        system.await_fleet_ready("fleet", 1).await?;
        let tasks = namespace.api::<DelegatedTask>();

        let prompt = delegate(json!({
            "prompt": "TOOLCALL child-marker-1", "category": "quick", "load_skills": [],
            "run_in_background": false, "description": "child work"
        }));
        create(
            &tasks,
            &with(
                task("sync", "org-omo", Some("fleet"), Some("omo-chat"), &prompt),
                json!({"category": "deep", "loadSkills": ["release-notes"]}),
            ),
        )
        .await?;
        let done = await_phase(&tasks, "sync", TaskPhase::Succeeded, &system).await?;
        let status = done.status.clone().unwrap();
        let parent = status.opencode_session_id.clone().unwrap();

        // The task's own turn: Sisyphus, on the task's category model, with the skill.
        let requests = system.fake_llm().requests_containing("child-marker-1");
        let own = requests
            .iter()
            .find(|r| asked(r).starts_with("MCPCALL:task"))
            .context("the task's turn never reached the LLM")?;
        assert_eq!(own["model"], "deep-model", "the task's category model");
        let instructions = request_texts(own, Some("system"));
        assert!(
            instructions.contains("SKILL-MARKER-77"),
            "the skill reached the agent"
        );
        assert!(
            instructions.contains("Sisyphus"),
            "the orchestrator runs the task"
        );
        let opencode = system.opencode_of_task(&done).await?;
        let messages = opencode.messages(&parent, None).await?;
        assert!(
            messages.iter().any(|m| m
                .info
                .agent
                .as_deref()
                .is_some_and(|a| a.starts_with("Sisyphus"))),
            "the task's messages are Sisyphus's"
        );

        // The subagent: on the model the fleet maps its category to, it ran the bash tool.
        let child = requests
            .iter()
            .find(|r| asked(r).starts_with("TOOLCALL child-marker-1"))
            .context("the subagent never reached the LLM")?;
        assert_eq!(child["model"], "fast-model", "the plugin's category model");
        let output = status.output.clone().unwrap_or_default();
        assert!(
            output.contains("Sisyphus-Junior"),
            "the parent's answer: {output}"
        );
        assert!(
            output.contains("hello-from-tool"),
            "the subagent's tool output: {output}"
        );

        // Its status and stream: attributed to the task, marked as the subagent's.
        assert_eq!(status.subagents.len(), 1, "{:?}", status.subagents);
        let subagent = &status.subagents[0];
        assert_eq!(subagent.parent_session_id, parent);
        assert_eq!(subagent.agent.as_deref(), Some("Sisyphus-Junior"));
        assert_eq!(subagent.state, "Idle");
        assert!(subagent.tools_started >= 1, "{subagent:?}");
        let token = system.stream_token("org-omo", Some("omo-chat"))?;
        let events = system
            .read_session_stream("omo-chat", &token, |e| e.type_() == "session_idle")
            .await?;
        let from_child: Vec<&Value> = events
            .iter()
            .map(|e| &e.data["data"])
            .filter(|d| d["opencodeSessionId"] == subagent.session_id.as_str())
            .collect();
        assert!(
            from_child.iter().any(|d| d["type"] == "subagent_started"),
            "{events:?}"
        );
        assert!(
            from_child.iter().any(|d| d["type"] == "tool_execute_end"
                && d["tool"] == "bash"
                && d["agent"] == "Sisyphus-Junior"
                && d["parentSessionId"] == parent.as_str()),
            "{from_child:?}"
        );
        assert!(
            from_child.iter().any(|d| d["type"] == "subagent_idle"),
            "{from_child:?}"
        );

        // The next turn of the conversation continues the task's session, not the subagent's.
        create(
            &tasks,
            &task(
                "again",
                "org-omo",
                Some("fleet"),
                Some("omo-chat"),
                "again-marker",
            ),
        )
        .await?;
        let again = await_phase(&tasks, "again", TaskPhase::Succeeded, &system).await?;
        let again = again.status.unwrap();
        assert_eq!(again.opencode_session_id.as_deref(), Some(parent.as_str()));
        assert!(again.subagents.is_empty(), "{:?}", again.subagents);

        // The fleet's language servers check what the agent writes: Pyright's error comes
        // back in the write tool's answer.
        let typed = "def total(x: int) -> str:\n    return x\n";
        let prompt = format!(
            "MCPCALL:write:{}",
            json!({"filePath": "typed.py", "content": typed})
        );
        create(
            &tasks,
            &task("lsp", "org-omo", Some("fleet"), Some("omo-chat"), &prompt),
        )
        .await?;
        let checked = await_phase(&tasks, "lsp", TaskPhase::Succeeded, &system).await?;
        let output = checked.status.unwrap().output.unwrap_or_default();
        assert!(output.contains("LSP errors detected"), "{output}");
        assert!(
            output.contains("is not assignable to return type \"str\""),
            "Pyright's diagnostic: {output}"
        );
        Ok(())
    })
    .await
    .with_context(|| system.diagnostics())
}

#[tokio::test]
async fn a_background_subagent_holds_its_task_until_done_and_a_cancel_aborts_it() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "omo-bg").await?;
    let system = System::start(&env, &namespace).await?;
    within(LIMIT, "tasks with background subagents", async {
        system.bind_organization("org-bg").await?;
        skills(&namespace).await?;
        create(
            &namespace.api(),
            &plugin_fleet(&system, "fleet", "org-bg", 1)?,
        )
        .await?;
        system.await_fleet_ready("fleet", 1).await?;
        let tasks = namespace.api::<DelegatedTask>();

        // A subagent in the background for about 8 s: the task's own turn ends in about 2.
        let prompt = delegate(json!({
            "prompt": "SLOW:8 bg-marker", "category": "quick", "load_skills": [],
            "run_in_background": true, "description": "slow child"
        }));
        create(&tasks, &task("bg", "org-bg", Some("fleet"), None, &prompt)).await?;
        let running = await_running(&tasks, "bg", &system).await?;
        let parent = running.status.unwrap().opencode_session_id.unwrap();
        let done = await_phase(&tasks, "bg", TaskPhase::Succeeded, &system).await?;
        let status = done.status.clone().unwrap();
        let child_requests: Vec<SystemTime> = system
            .fake_llm()
            .received()
            .into_iter()
            .filter(|r| asked(&r.body).starts_with("SLOW:8 bg-marker"))
            .map(|r| r.at)
            .collect();
        ensure!(
            !child_requests.is_empty(),
            "the subagent never reached the LLM"
        );
        // The subagent streamed 8 tokens a second apart after its request: the task ended after.
        let child_done = child_requests
            .iter()
            .max()
            .unwrap()
            .checked_add(Duration::from_secs(8))
            .unwrap();
        let completed = status.completion_time.clone().unwrap().0;
        let completed = SystemTime::UNIX_EPOCH
            + Duration::from_millis(completed.as_millisecond().unsigned_abs());
        assert!(
            completed + Duration::from_secs(1) >= child_done,
            "the task ended before its background subagent finished"
        );
        // Its answer is the one given to the subagent's result, not to its launch.
        let output = status.output.clone().unwrap_or_default();
        assert!(output.contains("BACKGROUND TASK COMPLETED"), "{output}");
        assert_eq!(status.subagents.len(), 1, "{:?}", status.subagents);
        assert_eq!(status.subagents[0].state, "Idle");
        assert_eq!(status.subagents[0].parent_session_id, parent);

        // A long background subagent, and the task cancelled while it works.
        let prompt = delegate(json!({
            "prompt": "SLOW:120 bg-cancel-marker", "category": "quick", "load_skills": [],
            "run_in_background": true, "description": "endless child"
        }));
        create(
            &tasks,
            &task("bg-cancel", "org-bg", Some("fleet"), None, &prompt),
        )
        .await?;
        let working = await_condition(
            &tasks,
            "bg-cancel",
            "a subagent working in the background",
            |t: Option<&DelegatedTask>| {
                t.and_then(|t| t.status.as_ref())
                    .is_some_and(|s| s.subagents.iter().any(|a| a.state == "Running"))
            },
            Duration::from_secs(90),
        )
        .await?
        .context("the task disappeared")?;
        let child = working.status.clone().unwrap().subagents[0]
            .session_id
            .clone();
        let opencode = system.opencode_of_task(&working).await?;
        assert!(opencode.session_status().await?.contains_key(&child));
        tasks
            .patch(
                "bg-cancel",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"cancel": true}})),
            )
            .await?;
        await_phase(&tasks, "bg-cancel", TaskPhase::Cancelled, &system).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while opencode.session_status().await?.contains_key(&child) {
            ensure!(
                Instant::now() < deadline,
                "the subagent still works after its task was cancelled"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    })
    .await
    .with_context(|| system.diagnostics())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Pod start → Ready → first prompt on a fleet with the plugin, one fresh pod at a time
/// (`NUBABEL_BENCH_PODS`, default 5); docs/oh-my-opencode-benchmark.md has the figures.
#[tokio::test]
#[ignore = "a benchmark: one fresh plugin pod after another"]
async fn benchmark_plugin_pod_start_to_first_prompt() -> Result<()> {
    let rounds: usize = std::env::var("NUBABEL_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "omo-bench").await?;
    let system = System::start(&env, &namespace).await?;
    within(Duration::from_secs(300 * rounds as u64), "the plugin start benchmark", async {
        system.bind_organization("org-bench").await?;
        skills(&namespace).await?;
        let pods = namespace.api::<Pod>();
        let tasks = namespace.api::<DelegatedTask>();
        let (mut to_ready, mut to_prompt) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let name = format!("fleet-{round}");
            create(&namespace.api(), &plugin_fleet(&system, &name, "org-bench", 1)?).await?;
            // The pod's start: when the test first sees it (the shim starts it at once).
            let pod = format!("{name}-0");
            let started = loop {
                if pods.get_opt(&pod).await?.is_some() {
                    break Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            system.await_fleet_ready(&name, 1).await?;
            let ready = started.elapsed().as_secs_f64();
            let marker = format!("bench-first-{round}");
            let sent = SystemTime::now();
            create(&tasks, &task(&marker, "org-bench", Some(&name), None, &marker)).await?;
            await_phase(&tasks, &marker, TaskPhase::Succeeded, &system).await?;
            let seen = system
                .fake_llm()
                .received()
                .into_iter()
                .filter(|r| r.body.to_string().contains(&marker))
                .map(|r| r.at)
                .min()
                .context("the prompt never reached the LLM")?;
            let prompt = ready
                + seen
                    .duration_since(sent)
                    .map_or(0.0, |d| d.as_secs_f64());
            println!("pod {pod}: start -> Ready {ready:.2}s, start -> first prompt at the LLM {prompt:.2}s");
            to_ready.push(ready);
            to_prompt.push(prompt);
            namespace
                .api::<OpencodeSidecar>()
                .delete(&name, &DeleteParams::default())
                .await?;
            let selector = nubabel_operator::controller::fleet::selector_string(&name);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !pods.list(&ListParams::default().labels(&selector)).await?.items.is_empty() {
                ensure!(Instant::now() < deadline, "the pods of {name} stay");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        for (what, mut values) in [("start -> Ready", to_ready), ("start -> first prompt", to_prompt)] {
            values.sort_by(f64::total_cmp);
            println!(
                "{what}: n={} median={:.2}s max={:.2}s",
                values.len(),
                percentile(&values, 0.5),
                values.last().copied().unwrap_or_default()
            );
        }
        Ok(())
    })
    .await
    .with_context(|| system.diagnostics())
}
