//! `POST /api/delegate` against the real API server: who may create tasks, what a bad body
//! gets, and the task a good request creates. (Running tasks to the end is e2e/tests/delegate.rs.)

use anyhow::Result;
use kube::ResourceExt;
use nubabel_callback_api::tokens::{TokenCommand, run_with};
use nubabel_contract::identity::OrganizationId;
use nubabel_crds::v1alpha1::DelegatedTask;
use nubabel_e2e::{TestEnv, TestNamespace};
use nubabel_store::api_tokens;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_configured, unique};

async fn app_with_delegate() -> Result<(TestEnv, TestApp)> {
    let env = TestEnv::from_env().await?;
    nubabel_e2e::crds::install_crds(&env.client).await?;
    let app = spawn_app_configured(|config| config.delegate_api = true).await?;
    Ok((env, app))
}

async fn delegate(
    app: &TestApp,
    token: Option<&str>,
    query: &str,
    body: &Value,
) -> Result<(StatusCode, Value)> {
    let mut request = app
        .client
        .post(format!("{}/api/delegate{query}", app.address))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn body(org: &str) -> Value {
    json!({
        "category": "quick", "load_skills": ["git"], "prompt": "say hi",
        "session_id": "conversation-1", "organizationId": org, "userId": "u-1",
        "context": {"source": "test"},
    })
}

#[tokio::test]
async fn only_a_live_token_of_the_named_organization_may_delegate() -> Result<()> {
    let (env, app) = app_with_delegate().await?;
    let namespace = TestNamespace::create(&env.client, "delegate-auth").await?;
    let org_a = unique("org-a");
    let org_b = unique("org-b");
    let token_a = api_tokens::issue(
        &app.db,
        &OrganizationId::parse(&org_a)?,
        namespace.name(),
        "a",
    )
    .await?;
    let revoked = api_tokens::issue(
        &app.db,
        &OrganizationId::parse(&org_a)?,
        namespace.name(),
        "old",
    )
    .await?;
    assert!(api_tokens::revoke(&app.db, revoked.id).await?);

    let cases = [
        (None, &org_a, StatusCode::UNAUTHORIZED, "missing API token"),
        (
            Some("nbt_not-a-token"),
            &org_a,
            StatusCode::UNAUTHORIZED,
            "unknown or revoked",
        ),
        (
            Some(revoked.token.as_str()),
            &org_a,
            StatusCode::UNAUTHORIZED,
            "unknown or revoked",
        ),
        (
            Some(token_a.token.as_str()),
            &org_b,
            StatusCode::FORBIDDEN,
            "organizationId",
        ),
    ];
    for (token, org, status, message) in cases {
        let (got, answer) = delegate(&app, token, "?wait=false", &body(org)).await?;
        assert_eq!(got, status, "{answer}");
        let text = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{text}");
    }
    // Nothing was created by the refused requests.
    let tasks = namespace.api::<DelegatedTask>();
    assert!(tasks.list(&Default::default()).await?.items.is_empty());

    // The good token creates a task in its namespace, with the request's fields.
    let (status, answer) =
        delegate(&app, Some(&token_a.token), "?wait=false", &body(&org_a)).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["namespace"], namespace.name());
    assert_eq!(answer["nubabelSessionId"], "conversation-1");
    assert_eq!(
        answer["streamUrl"],
        "/api/sidecar/sessions/conversation-1/stream"
    );
    let name = answer["taskName"].as_str().unwrap();
    assert!(name.starts_with("delegate-"), "{name}");
    let task = tasks.get(name).await?;
    assert_eq!(task.spec.organization_id, org_a);
    assert_eq!(task.spec.session_id.as_deref(), Some("conversation-1"));
    assert_eq!(task.spec.prompt, "say hi");
    assert_eq!(task.spec.load_skills, ["git"]);
    assert_eq!(task.spec.user_id.as_deref(), Some("u-1"));
    assert_eq!(task.labels()["nubabel.io/created-by"], "delegate-api");
    assert_eq!(task.labels()["nubabel.io/organization"], org_a);

    // The stream token reads that session's stream (404 until the operator maps it), not 401.
    let stream = app
        .client
        .get(format!(
            "{}{}",
            app.address,
            answer["streamUrl"].as_str().unwrap()
        ))
        .bearer_auth(answer["streamToken"].as_str().unwrap())
        .send()
        .await?;
    assert_eq!(stream.status(), StatusCode::NOT_FOUND);
    namespace.delete().await
}

#[tokio::test]
async fn bad_bodies_are_refused_naming_the_field() -> Result<()> {
    let (env, app) = app_with_delegate().await?;
    let namespace = TestNamespace::create(&env.client, "delegate-bad").await?;
    let org = unique("org");
    let token =
        api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, namespace.name(), "").await?;
    let mut no_prompt = body(&org);
    no_prompt.as_object_mut().unwrap().remove("prompt");
    let mut list_context = body(&org);
    list_context["context"] = json!([1, 2]);
    let mut numeric_skills = body(&org);
    numeric_skills["load_skills"] = json!([1]);
    // OpenCode's id space: a caller naming another conversation's `ses_` id is refused.
    let mut opencode_id = body(&org);
    opencode_id["session_id"] = json!("ses_4b1f0c");
    for (body, field) in [
        (no_prompt, "prompt"),
        (list_context, "context"),
        (numeric_skills, "load_skills[0]"),
        (opencode_id, "session_id"),
    ] {
        let (status, answer) = delegate(&app, Some(&token.token), "?wait=false", &body).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{message} should name {field}");
    }
    let malformed = app
        .client
        .post(format!("{}/api/delegate", app.address))
        .bearer_auth(&token.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    namespace.delete().await
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_task() -> Result<()> {
    let (env, app) = app_with_delegate().await?;
    let namespace = TestNamespace::create(&env.client, "delegate-idem").await?;
    let org = unique("org");
    let token =
        api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, namespace.name(), "").await?;
    let mut names = Vec::new();
    for _ in 0..2 {
        let answer: Value = app
            .client
            .post(format!("{}/api/delegate?wait=false", app.address))
            .bearer_auth(&token.token)
            .header("idempotency-key", "request-42")
            .json(&body(&org))
            .send()
            .await?
            .json()
            .await?;
        names.push(answer["taskName"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(names[0], names[1]);
    let tasks = namespace
        .api::<DelegatedTask>()
        .list(&Default::default())
        .await?;
    assert_eq!(tasks.items.len(), 1);
    namespace.delete().await
}

#[tokio::test]
async fn a_wait_that_runs_out_answers_202_with_the_task_and_its_stream() -> Result<()> {
    // No operator runs here, so the task never ends.
    let (env, app) = app_with_delegate().await?;
    let namespace = TestNamespace::create(&env.client, "delegate-wait").await?;
    let org = unique("org");
    let token =
        api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, namespace.name(), "").await?;
    let started = std::time::Instant::now();
    let mut request = body(&org);
    request.as_object_mut().unwrap().remove("session_id");
    let (status, answer) = delegate(&app, Some(&token.token), "?timeout=2", &request).await?;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert!(
        waited >= std::time::Duration::from_secs(2) && waited < std::time::Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(answer["status"], "accepted");
    // Without a session_id, one is made up, and the stream URL names it.
    let session = answer["nubabelSessionId"].as_str().unwrap();
    assert!(session.starts_with("delegate-"), "{session}");
    assert_eq!(
        answer["streamUrl"],
        format!("/api/sidecar/sessions/{session}/stream")
    );
    namespace.delete().await
}

#[tokio::test]
async fn a_tenant_at_its_limit_of_waiting_requests_gets_202_at_once_and_others_still_wait()
-> Result<()> {
    let env = TestEnv::from_env().await?;
    nubabel_e2e::crds::install_crds(&env.client).await?;
    let app = spawn_app_configured(|config| {
        config.delegate_api = true;
        config.delegate_tenant_waits = 1;
    })
    .await?;
    let namespace = TestNamespace::create(&env.client, "delegate-waits").await?;
    let (org, other) = (unique("org"), unique("org"));
    let token =
        api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, namespace.name(), "").await?;
    let other_token = api_tokens::issue(
        &app.db,
        &OrganizationId::parse(&other)?,
        namespace.name(),
        "",
    )
    .await?;
    let without_session = |org: &str| {
        let mut request = body(org);
        request.as_object_mut().unwrap().remove("session_id");
        request
    };
    // The first request holds the tenant's only waiting place for 4 s.
    let first_request = without_session(&org);
    let first = delegate(&app, Some(&token.token), "?timeout=4", &first_request);
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let started = std::time::Instant::now();
        let answer = delegate(
            &app,
            Some(&token.token),
            "?timeout=4",
            &without_session(&org),
        )
        .await;
        (answer, started.elapsed())
    };
    let third = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let started = std::time::Instant::now();
        let answer = delegate(
            &app,
            Some(&other_token.token),
            "?timeout=2",
            &without_session(&other),
        )
        .await;
        (answer, started.elapsed())
    };
    let (first, (second, second_took), (third, third_took)) = tokio::join!(first, second, third);
    let ((first_status, _), (second_status, answer), (third_status, _)) = (first?, second?, third?);
    assert_eq!(first_status, StatusCode::ACCEPTED);
    // The second was created and answered at once, with its stream to follow.
    assert_eq!(second_status, StatusCode::ACCEPTED, "{answer}");
    assert!(
        second_took < std::time::Duration::from_secs(2),
        "{second_took:?}"
    );
    assert_eq!(answer["status"], "accepted");
    // Another tenant still waits its whole timeout.
    assert_eq!(third_status, StatusCode::ACCEPTED);
    assert!(
        third_took >= std::time::Duration::from_secs(2),
        "{third_took:?}"
    );
    namespace.delete().await
}

#[tokio::test]
async fn a_waiting_request_outlasts_the_30_second_limit_of_other_requests() -> Result<()> {
    let (env, app) = app_with_delegate().await?;
    let namespace = TestNamespace::create(&env.client, "delegate-long").await?;
    let org = unique("org");
    let token =
        api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, namespace.name(), "").await?;
    let started = std::time::Instant::now();
    let (status, answer) = delegate(&app, Some(&token.token), "?timeout=32", &body(&org)).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(32));
    namespace.delete().await
}

#[tokio::test]
async fn the_token_command_issues_lists_and_revokes() -> Result<()> {
    let (_env, app) = app_with_delegate().await?;
    let created = run_with(
        &app.db,
        TokenCommand::Create {
            organization: "acme".into(),
            namespace: "tenants".into(),
            name: "ci".into(),
        },
    )
    .await?;
    let token = created
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_owned();
    let id = created
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .parse()?;
    let grant = api_tokens::authenticate(&app.db, &token).await?.unwrap();
    assert_eq!(
        (grant.organization_id.as_str(), grant.namespace.as_str()),
        ("acme", "tenants")
    );
    // Postgres holds the token's SHA-256, not the token.
    let rows: Vec<(Vec<u8>, String, String)> =
        sqlx::query_as("select token_sha256, name, organization_id from api_tokens")
            .fetch_all(&app.db)
            .await?;
    let digest: Vec<u8> = sqlx::query_scalar("select sha256($1::bytea)")
        .bind(token.as_bytes())
        .fetch_one(&app.db)
        .await?;
    assert_eq!(rows, [(digest, "ci".to_owned(), "acme".to_owned())]);
    let listed = run_with(&app.db, TokenCommand::List).await?;
    assert!(listed.contains("acme\ttenants\tci\tfalse"), "{listed}");
    assert!(!listed.contains(&token));
    run_with(&app.db, TokenCommand::Revoke { id }).await?;
    assert_eq!(api_tokens::authenticate(&app.db, &token).await?, None);
    assert!(
        run_with(&app.db, TokenCommand::Revoke { id })
            .await
            .is_err()
    );
    let bad = run_with(
        &app.db,
        TokenCommand::Create {
            organization: "acme".into(),
            namespace: "Not_A_Namespace".into(),
            name: String::new(),
        },
    )
    .await
    .unwrap_err();
    assert!(bad.to_string().starts_with("--namespace"), "{bad}");
    Ok(())
}
