//! The tenant read API on real Postgres and the real API server: listing newest first, paging,
//! filters, one task in full, cancelling, a session's turns and events; another tenant's token
//! sees none of it (404), and a revoked one nothing at all (401).

use std::time::Duration;

use anyhow::Result;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use nubabel_contract::identity::OrganizationId;
use nubabel_crds::v1alpha1::DelegatedTask;
use nubabel_e2e::{TestEnv, TestNamespace};
use nubabel_store::{api_tokens, results};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, opencode_session_id, progress, sidecar, spawn_app_configured, unique,
};

pub async fn app_with_tasks() -> Result<(TestEnv, TestApp)> {
    let env = TestEnv::from_env().await?;
    nubabel_e2e::crds::install_crds(&env.client).await?;
    let app = spawn_app_configured(|config| config.delegate_api = true).await?;
    Ok((env, app))
}

/// Creates a task through `/api/delegate` and returns its name.
pub async fn delegate(
    app: &TestApp,
    token: &str,
    org: &str,
    session: &str,
    user: &str,
    prompt: &str,
) -> Result<String> {
    let answer: Value = app
        .client
        .post(format!("{}/api/delegate?wait=false", app.address))
        .bearer_auth(token)
        .json(&json!({"prompt": prompt, "session_id": session, "organizationId": org, "userId": user}))
        .send()
        .await?
        .json()
        .await?;
    Ok(answer["taskName"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no task name in {answer}"))?
        .to_owned())
}

/// Two tenants sharing `namespace`: (organization, API token) of each.
pub async fn two_tenants(
    app: &TestApp,
    namespace: &str,
) -> Result<((String, String), (String, String))> {
    let mut tenants = Vec::new();
    for prefix in ["org-a", "org-b"] {
        let org = unique(prefix);
        let issued =
            api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, namespace, "").await?;
        tenants.push((org, issued.token));
    }
    let theirs = tenants.pop().unwrap_or_default();
    let ours = tenants.pop().unwrap_or_default();
    Ok((ours, theirs))
}

/// Writes `phase` into the task's status, as the operator would.
pub async fn set_phase(api: &Api<DelegatedTask>, name: &str, phase: &str) -> Result<()> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": phase, "output": "short"}})),
    )
    .await?;
    Ok(())
}

async fn get(app: &TestApp, path: &str, token: &str) -> Result<(StatusCode, Value)> {
    let response = app
        .client
        .get(format!("{}{path}", app.address))
        .bearer_auth(token)
        .send()
        .await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn names(list: &Value) -> Vec<String> {
    list["tasks"]
        .as_array()
        .map(|tasks| {
            tasks
                .iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_tenant_lists_its_own_tasks_newest_first_in_pages_and_by_filter() -> Result<()> {
    let (env, app) = app_with_tasks().await?;
    let namespace = TestNamespace::create(&env.client, "reads-list").await?;
    let ((org, token), (other_org, other)) = two_tenants(&app, namespace.name()).await?;
    let first = delegate(&app, &token, &org, "s-1", "u-1", "first").await?;
    // Creation times have one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = delegate(&app, &token, &org, "s-1", "u-2", "second").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = delegate(&app, &token, &org, "s-2", "u-1", "third").await?;
    let theirs = delegate(&app, &other, &other_org, "s-1", "u-1", "theirs").await?;
    set_phase(&namespace.api(), &second, "Succeeded").await?;

    let (status, all) = get(&app, "/api/tasks", &token).await?;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(
        names(&all),
        [third.as_str(), second.as_str(), first.as_str()]
    );
    assert_eq!(all["tasks"][0]["prompt_excerpt"], "third");
    assert_eq!(all["tasks"][1]["phase"], "Succeeded");
    assert_eq!(all["tasks"][2]["phase"], "Pending");
    assert_eq!(all["next_cursor"], Value::Null);
    assert_eq!(
        names(&get(&app, "/api/tasks", &other).await?.1),
        [theirs.as_str()]
    );

    let (_, page_one) = get(&app, "/api/tasks?limit=2", &token).await?;
    assert_eq!(names(&page_one), [third.as_str(), second.as_str()]);
    let cursor = page_one["next_cursor"].as_str().unwrap();
    let (_, page_two) = get(&app, &format!("/api/tasks?limit=2&cursor={cursor}"), &token).await?;
    assert_eq!(names(&page_two), [first.as_str()]);
    assert_eq!(page_two["next_cursor"], Value::Null);

    for (query, expected) in [
        ("phase=Succeeded", vec![second.as_str()]),
        ("phase=pending", vec![third.as_str(), first.as_str()]),
        ("session=s-1", vec![second.as_str(), first.as_str()]),
        ("user=u-1", vec![third.as_str(), first.as_str()]),
        ("session=s-1&user=u-1", vec![first.as_str()]),
        ("session=nobody", Vec::<&str>::new()),
    ] {
        let (status, list) = get(&app, &format!("/api/tasks?{query}"), &token).await?;
        assert_eq!(status, StatusCode::OK, "{query}: {list}");
        assert_eq!(names(&list), expected, "{query}");
    }
    let (_, turns) = get(&app, "/api/sessions/s-1/turns", &token).await?;
    assert_eq!(names(&turns), [second.as_str(), first.as_str()]);

    for (query, field) in [
        ("phase=Done", "phase"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("cursor=garbage", "cursor"),
    ] {
        let (status, answer) = get(&app, &format!("/api/tasks?{query}"), &token).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(field), "{query}: {message}");
    }
    let revoked =
        api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, namespace.name(), "").await?;
    api_tokens::revoke(&app.db, revoked.id).await?;
    assert_eq!(
        get(&app, "/api/tasks", &revoked.token).await?.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.client
            .get(format!("{}/api/tasks", app.address))
            .send()
            .await?
            .status(),
        StatusCode::UNAUTHORIZED
    );
    namespace.delete().await
}

#[tokio::test]
async fn one_task_reads_in_full_even_after_its_object_is_gone_and_only_for_its_tenant() -> Result<()>
{
    let (env, app) = app_with_tasks().await?;
    let namespace = TestNamespace::create(&env.client, "reads-get").await?;
    let ((org, token), (_, other)) = two_tenants(&app, namespace.name()).await?;
    let name = delegate(&app, &token, &org, "s-1", "u-1", "summarise <b>this</b>").await?;
    let tasks: Api<DelegatedTask> = namespace.api();
    set_phase(&tasks, &name, "Succeeded").await?;
    let uid: uuid::Uuid = tasks.get(&name).await?.metadata.uid.unwrap().parse()?;
    let whole = "The whole answer, longer than the status keeps.";
    results::record(
        &app.db,
        &results::TaskResult {
            task_uid: uid,
            organization_id: &org,
            task_namespace: namespace.name(),
            task_name: &name,
            session_id: Some("s-1"),
            phase: "Succeeded",
            output: Some(whole),
            error_reason: None,
            error_message: None,
        },
    )
    .await?;

    let (status, task) = get(&app, &format!("/api/tasks/{name}"), &token).await?;
    assert_eq!(status, StatusCode::OK, "{task}");
    assert_eq!(task["phase"], "Succeeded");
    assert_eq!(task["prompt"], "summarise <b>this</b>");
    assert_eq!(task["answer"], whole);
    assert_eq!(task["user_id"], "u-1");
    assert_eq!(task["live"], true);
    assert!(task["created_at"].is_string());

    let (status, answer) = get(&app, &format!("/api/tasks/{name}"), &other).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(
        get(&app, "/api/tasks/no-such-task", &token).await?.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&app, "/api/tasks/Not%20A%20Name", &token).await?.0,
        StatusCode::NOT_FOUND
    );

    tasks.delete(&name, &Default::default()).await?;
    nubabel_e2e::await_condition(
        &tasks,
        &name,
        "deletion",
        |t: Option<&DelegatedTask>| t.is_none(),
        Duration::from_secs(30),
    )
    .await?;
    let (status, stored) = get(&app, &format!("/api/tasks/{name}"), &token).await?;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert_eq!(stored["live"], false);
    assert_eq!(stored["answer"], whole);
    assert_eq!(
        get(&app, &format!("/api/tasks/{name}"), &other).await?.0,
        StatusCode::NOT_FOUND
    );
    namespace.delete().await
}

#[tokio::test]
async fn cancel_sets_spec_cancel_and_a_finished_task_answers_409_with_its_phase() -> Result<()> {
    let (env, app) = app_with_tasks().await?;
    let namespace = TestNamespace::create(&env.client, "reads-cancel").await?;
    let ((org, token), (_, other)) = two_tenants(&app, namespace.name()).await?;
    let running = delegate(&app, &token, &org, "s-1", "u-1", "work").await?;
    let finished = delegate(&app, &token, &org, "s-2", "u-1", "done").await?;
    let tasks: Api<DelegatedTask> = namespace.api();
    set_phase(&tasks, &running, "Running").await?;
    set_phase(&tasks, &finished, "Succeeded").await?;
    let cancel = |name: &str, token: &str| {
        app.client
            .post(format!("{}/api/tasks/{name}/cancel", app.address))
            .bearer_auth(token)
            .send()
    };

    let refused = cancel(&running, &other).await?;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert!(!tasks.get(&running).await?.spec.cancel);

    let accepted = cancel(&running, &token).await?;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let body: Value = accepted.json().await?;
    assert_eq!(body["task"]["cancel_requested"], true);
    assert!(tasks.get(&running).await?.spec.cancel);
    // Asking again while the operator stops it is the same request.
    assert_eq!(
        cancel(&running, &token).await?.status(),
        StatusCode::ACCEPTED
    );

    let ended = cancel(&finished, &token).await?;
    assert_eq!(ended.status(), StatusCode::CONFLICT);
    let body: Value = ended.json().await?;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("already ended: Succeeded"), "{message}");
    assert!(!tasks.get(&finished).await?.spec.cancel);

    assert_eq!(
        cancel("no-such-task", &token).await?.status(),
        StatusCode::NOT_FOUND
    );
    namespace.delete().await
}

#[tokio::test]
async fn a_sessions_events_come_in_pages_that_resume_after_the_last_sequence() -> Result<()> {
    let (_env, app) = app_with_tasks().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let session = unique("s");
    app.register(&tenant, &session, &opencode_session_id())
        .await?;
    for i in 0..5 {
        let answer = app
            .callback(&tenant, &session, "progress", &unique("msg"), &progress(i))
            .await?;
        assert!(answer.status().is_success());
    }
    let organization = OrganizationId::parse(&org)?;
    let token = api_tokens::issue(&app.db, &organization, tenant.namespace(), "")
        .await?
        .token;
    let other = api_tokens::issue(
        &app.db,
        &OrganizationId::parse(&unique("org-b"))?,
        tenant.namespace(),
        "",
    )
    .await?
    .token;

    let seqs = |page: &Value| -> Vec<i64> {
        page["events"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["seq"].as_i64()).collect())
            .unwrap_or_default()
    };
    let path = format!("/api/sessions/{session}/events");
    let (status, first) = get(&app, &format!("{path}?limit=3"), &token).await?;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(seqs(&first), [1, 2, 3]);
    assert_eq!(first["events"][0]["type"], "tool_execute_start");
    assert_eq!(first["events"][0]["body"]["tool"], "tool-0");
    let after = first["next_after"].as_i64().unwrap();
    let (_, rest) = get(&app, &format!("{path}?limit=3&after={after}"), &token).await?;
    assert_eq!(seqs(&rest), [4, 5]);
    let (_, none) = get(&app, &format!("{path}?after=5"), &token).await?;
    assert_eq!(seqs(&none), Vec::<i64>::new());
    assert_eq!(none["next_after"], 5);

    assert_eq!(get(&app, &path, &other).await?.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&app, &format!("{path}?after=-1"), &token).await?.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&app, &format!("{path}?limit=501"), &token).await?.0,
        StatusCode::BAD_REQUEST
    );
    Ok(())
}

#[tokio::test]
async fn a_task_applied_by_hand_without_labels_is_listed_and_filtered_too() -> Result<()> {
    let (env, app) = app_with_tasks().await?;
    let namespace = TestNamespace::create(&env.client, "reads-unlabelled").await?;
    let ((org, token), (_, other)) = two_tenants(&app, namespace.name()).await?;
    let task = DelegatedTask::new(
        "by-hand",
        serde_json::from_value(json!({"organizationId": org, "prompt": "hi", "sessionId": "s-9"}))?,
    );
    namespace
        .api::<DelegatedTask>()
        .create(&Default::default(), &task)
        .await?;
    assert_eq!(
        names(&get(&app, "/api/tasks", &token).await?.1),
        ["by-hand"]
    );
    assert_eq!(
        names(&get(&app, "/api/tasks?session=s-9", &token).await?.1),
        ["by-hand"]
    );
    assert!(names(&get(&app, "/api/tasks", &other).await?.1).is_empty());
    namespace.delete().await
}
