//! The web view in a real headless Chromium, against the whole stack: the callback API serving
//! `/ui`, the operator running tasks on real OpenCode with the scripted fake LLM. Signs in with
//! a tenant token, sees a new task appear in the live list, cancels a running task from its
//! page, watches a queued task's progress (tool calls) arrive without reloading, reads its
//! answer, and checks that an answer holding `<script>` shows as text and never runs.
//! Screenshots go to target/web-screenshots/.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use nubabel_contract::identity::OrganizationId;
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::system::{System, workspace_root};
use nubabel_e2e::webdriver::Browser;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use nubabel_store::api_tokens;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(420);
const SEEN: Duration = Duration::from_secs(60);
const ORG: &str = "org-web";

fn screenshot_path(name: &str) -> PathBuf {
    workspace_root()
        .join("target/web-screenshots")
        .join(format!("{name}.png"))
}

async fn delegate(system: &System, token: &str, session: &str, prompt: &str) -> Result<String> {
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/api/delegate?wait=false", system.callback_url()))
        .bearer_auth(token)
        .json(&json!({"prompt": prompt, "session_id": session, "organizationId": ORG, "userId": "ada"}))
        .send()
        .await?
        .json()
        .await?;
    Ok(answer["taskName"]
        .as_str()
        .with_context(|| format!("no task in {answer}"))?
        .to_owned())
}

async fn await_phase(
    system: &System,
    tasks: &kube::Api<DelegatedTask>,
    name: &str,
    what: &str,
    condition: impl Fn(TaskPhase) -> bool + Send + 'static,
) -> Result<DelegatedTask> {
    let found = await_condition(
        tasks,
        name,
        what,
        move |t: Option<&DelegatedTask>| t.is_some_and(|t| condition(t.phase())),
        SEEN,
    )
    .await
    .with_context(|| system.diagnostics())?;
    found.context("task gone")
}

#[tokio::test]
async fn a_tenant_follows_and_cancels_tasks_in_a_real_browser_and_no_answer_runs_script()
-> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "web").await?;
    let system = System::start(&env, &namespace).await?;
    let browser = Browser::start(1100, 900).await?;
    let outcome = within(LIMIT, "following tasks in the browser", async {
        system.bind_organization(ORG).await?;
        // One slot: a second task waits in Queued while the first runs.
        let mut sidecar = system.sidecar_manifest("fleet", ORG, 1)?;
        sidecar.spec.max_sessions_per_pod = Some(1);
        create(&namespace.api(), &sidecar).await?;
        system.await_fleet_ready("fleet", 1).await?;
        let token = api_tokens::issue(
            system.db(),
            &OrganizationId::parse(ORG)?,
            namespace.name(),
            "web",
        )
        .await?
        .token;
        let ui = format!("{}/ui", system.callback_url());
        let tasks = namespace.api::<DelegatedTask>();

        // Signed out, the view sends the browser to the sign-in page; a wrong token stays there.
        browser.goto(&format!("{ui}/tasks")).await?;
        assert!(browser.url().await?.ends_with("/ui/sign-in"));
        browser.type_into("#token", "nbt_wrong").await?;
        browser.click("form.sign-in button").await?;
        browser
            .wait_for("#sign-in-problem", "the refusal", SEEN, |t| t.contains("unknown"))
            .await?;
        browser.type_into("#token", &token).await?;
        browser.click("form.sign-in button").await?;
        browser
            .wait_for("h1", "the task list", SEEN, |t| t == "Tasks")
            .await?;
        browser
            .wait_for("#task-rows", "an empty list", SEEN, |t| t.contains("No tasks yet"))
            .await?;

        // A task created now appears in the open list without a reload.
        let long = delegate(&system, &token, "web-long", "SLOW:120 a long job to cancel").await?;
        browser
            .wait_for("#task-rows", "the new task", SEEN, |t| t.contains(&long))
            .await?;
        await_phase(&system, &tasks, &long, "Running", |p| p == TaskPhase::Running).await?;

        // A second task queues behind it; its page is open while it waits.
        let watched = delegate(&system, &token, "web-tool", "TOOLCALL then report").await?;
        await_phase(&system, &tasks, &watched, "Queued", |p| p == TaskPhase::Queued).await?;
        browser
            .wait_for("#task-rows", "the queued task", SEEN, |t| t.contains(&watched))
            .await?;

        // Cancel the long one from its page.
        browser.goto(&format!("{ui}/tasks/{long}")).await?;
        browser
            .wait_for("#task-phase", "Running", SEEN, |t| t == "Running")
            .await?;
        browser.click("#cancel").await?;
        browser
            .wait_for("#task-phase", "Cancelled", SEEN, |t| t == "Cancelled")
            .await?;
        assert!(browser.find("#cancel").await?.is_none(), "no cancel button once ended");

        // The queued task's page, opened before it runs, follows it to the end live.
        browser.goto(&format!("{ui}/tasks/{watched}")).await?;
        browser.execute("window.notReloaded = true;").await?;
        let first_phase = browser.text("#task-phase").await?;
        browser
            .wait_for("#activity", "the tool call starting", SEEN, |t| {
                t.contains("Tool bash started")
            })
            .await?;
        let activity = browser
            .wait_for("#activity", "the tool call ending", SEEN, |t| {
                t.contains("Tool bash finished")
            })
            .await?;
        browser
            .wait_for("#task-phase", "Succeeded", SEEN, |t| t == "Succeeded")
            .await?;
        let answer = browser
            .wait_for("#answer", "the answer", SEEN, |t| !t.is_empty())
            .await?;
        assert!(answer.contains("hello-from-tool"), "{answer}");
        assert_eq!(
            browser.execute("return window.notReloaded === true;").await?,
            true,
            "the page updated in place (it was {first_phase} when opened; activity {activity:?})"
        );
        assert_ne!(first_phase, "Succeeded", "the page was open before the task ended");
        // The live part (phase, progress, activity, answer) in view.
        browser
            .execute("document.getElementById('task-live').scrollIntoView();")
            .await?;
        browser.screenshot(&screenshot_path("task-page")).await?;

        // An answer holding HTML and script: shown as text, nothing runs.
        let hostile = delegate(
            &system,
            &token,
            "web-script",
            "Echo <script>document.title='pwned';window.pwned=1</script> <img src=x onerror=\"window.pwned=2\"> and **bold**",
        )
        .await?;
        await_phase(&system, &tasks, &hostile, "Succeeded", |p| p == TaskPhase::Succeeded).await?;
        browser.goto(&format!("{ui}/tasks/{hostile}")).await?;
        let answer = browser
            .wait_for("#answer", "the answer", SEEN, |t| !t.is_empty())
            .await?;
        assert!(answer.contains("<script>document.title='pwned'"), "{answer}");
        assert!(answer.contains("<img src=x onerror="), "{answer}");
        assert!(browser.find("#answer strong").await?.is_some(), "Markdown renders");
        assert!(browser.find("#answer script, #answer img").await?.is_none());
        assert_eq!(browser.execute("return window.pwned === undefined;").await?, true);
        assert!(!browser.title().await?.contains("pwned"));

        // The list, with every task and its phase.
        browser.goto(&format!("{ui}/tasks")).await?;
        let rows = browser
            .wait_for("#task-rows", "all three tasks", SEEN, |t| {
                t.contains(&hostile) && t.contains("Cancelled") && t.contains("Succeeded")
            })
            .await?;
        assert!(rows.contains("<script>"), "the prompt shows as text: {rows}");
        assert_eq!(browser.execute("return window.pwned === undefined;").await?, true);
        browser.screenshot(&screenshot_path("task-list")).await?;
        Ok(())
    })
    .await;
    if outcome.is_err() {
        let _ = browser.screenshot(&screenshot_path("failure")).await;
    }
    browser.quit().await?;
    outcome?;
    system.shutdown().await?;
    namespace.delete().await
}
