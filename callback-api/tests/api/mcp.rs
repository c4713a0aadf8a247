//! The MCP gateway: `/mcp` and the REST form against local upstream MCP servers, with
//! connections registered in the vault, on real Postgres and Redis.

use std::time::Duration;

use nubabel_callback_api::config::Config;
use nubabel_contract::{
    identity::{OrganizationId, SidecarIdentity},
    signing::{MasterKey, derive_mcp_token, derive_mcp_token_generation},
};
use nubabel_e2e::mcp_upstream::McpUpstream;
use nubabel_store::{
    connections::{self, AuthKind, Connection, Credentials, NewConnection, Secrets},
    vault::Keyring,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, MASTER_KEY, TestApp, VAULT_KEYS, sidecar, spawn_app_with, unique,
};

/// Loopback upstreams are allowed, as every test's upstream listens there.
fn allow_loopback(config: &mut Config) {
    config.egress_allow = vec!["127.0.0.0/8".to_owned()];
}

async fn app_with(configure: impl FnOnce(&mut Config)) -> TestApp {
    let database_url = nubabel_e2e::fresh_database().await.unwrap();
    let redis_url = nubabel_e2e::test_redis_url().await.unwrap();
    spawn_app_with(&database_url, &redis_url, |config| {
        allow_loopback(config);
        configure(config);
    })
    .await
    .unwrap()
}

/// Registers `provider` for `org`, authenticating with a static bearer `token`.
async fn connect(
    app: &TestApp,
    org: &str,
    provider: &str,
    upstream: &McpUpstream,
    token: &str,
) -> Connection {
    let keyring = Keyring::parse(VAULT_KEYS).unwrap();
    connections::create(
        &app.db,
        &keyring,
        &NewConnection {
            organization_id: &OrganizationId::parse(org).unwrap(),
            provider,
            upstream_url: &upstream.url().parse().unwrap(),
            credentials: &Credentials {
                auth_kind: AuthKind::Bearer,
                secrets: Secrets::Bearer {
                    token: token.to_owned().into(),
                },
                token_expires_at: None,
            },
        },
    )
    .await
    .unwrap()
}

fn mcp_token(sidecar: &SidecarIdentity) -> String {
    let master = MasterKey::new(MASTER_KEY.as_bytes()).unwrap();
    derive_mcp_token(&master, sidecar).expose().to_owned()
}

/// A `/mcp` POST as the sidecar's OpenCode sends it.
async fn post_mcp(
    app: &TestApp,
    sidecar: &SidecarIdentity,
    extra: &[(&str, &str)],
    body: &Value,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/mcp", app.address))
        .bearer_auth(mcp_token(sidecar))
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("x-nubabel-organization", sidecar.organization_id().as_str())
        .header(
            "x-nubabel-sidecar",
            format!("{}/{}", sidecar.namespace(), sidecar.name()),
        );
    if !extra
        .iter()
        .any(|(name, _)| *name == "mcp-protocol-version")
    {
        request = request.header("mcp-protocol-version", "2025-11-25");
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.json(body).send().await.unwrap()
}

async fn rpc(app: &TestApp, sidecar: &SidecarIdentity, method: &str, params: Value) -> Value {
    let response = post_mcp(
        app,
        sidecar,
        &[],
        &json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    response.json().await.unwrap()
}

async fn call(app: &TestApp, sidecar: &SidecarIdentity, name: &str, arguments: Value) -> Value {
    rpc(
        app,
        sidecar,
        "tools/call",
        json!({"name": name, "arguments": arguments}),
    )
    .await
}

fn tool_names(answer: &Value) -> Vec<String> {
    answer["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn initialize_negotiates_the_revision_and_the_session_needs_no_id() {
    let app = app_with(|_| {}).await;
    let a = sidecar("org-a");
    let response = post_mcp(
        &app,
        &a,
        &[],
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {"roots": {}},
                   "clientInfo": {"name": "opencode", "version": "1.18.33"}}}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers().get("mcp-session-id").is_none(),
        "stateless: no session id"
    );
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["id"], 0);
    assert_eq!(answer["result"]["protocolVersion"], "2025-11-25");
    assert_eq!(
        answer["result"]["capabilities"]["tools"],
        json!({"listChanged": false})
    );

    let older = rpc(
        &app,
        &a,
        "initialize",
        json!({"protocolVersion": "2025-03-26"}),
    )
    .await;
    assert_eq!(older["result"]["protocolVersion"], "2025-03-26");
    let unknown = rpc(
        &app,
        &a,
        "initialize",
        json!({"protocolVersion": "2024-01-01"}),
    )
    .await;
    assert_eq!(unknown["result"]["protocolVersion"], "2025-11-25");

    let initialized = post_mcp(
        &app,
        &a,
        &[],
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(initialized.status(), StatusCode::ACCEPTED);
    assert_eq!(rpc(&app, &a, "ping", json!({})).await["result"], json!({}));
    let missing = rpc(&app, &a, "resources/list", json!({})).await;
    assert_eq!(missing["error"]["code"], -32601);
}

#[tokio::test]
async fn the_endpoint_admits_only_a_sidecar_with_its_own_token() {
    let app = app_with(|_| {}).await;
    let a = sidecar("org-a");
    let b = sidecar("org-b");
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
    let url = format!("{}/mcp", app.address);

    let anonymous = app.client.post(&url).json(&ping).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // B's token presented with A's identity headers.
    let forged = app
        .client
        .post(&url)
        .bearer_auth(mcp_token(&b))
        .header("x-nubabel-organization", "org-a")
        .header("x-nubabel-sidecar", "ns-org-a/fleet")
        .json(&ping)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    let body: Value = forged.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MCP token"),
        "{body}"
    );

    let browser = post_mcp(&app, &a, &[("origin", "http://evil.example")], &ping).await;
    assert_eq!(browser.status(), StatusCode::FORBIDDEN);
    let future = post_mcp(&app, &a, &[("mcp-protocol-version", "2099-01-01")], &ping).await;
    assert_eq!(future.status(), StatusCode::BAD_REQUEST);

    let batch = post_mcp(&app, &a, &[], &json!([ping])).await;
    assert_eq!(batch.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        batch.json::<Value>().await.unwrap()["error"]["code"],
        -32600
    );
    let get = app.client.get(&url).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_sidecar_lists_and_calls_exactly_its_own_tenants_tools() {
    let app = app_with(|_| {}).await;
    let upstream_a = McpUpstream::start().unwrap();
    let upstream_b = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream_a, "token-of-a").await;
    connect(&app, "org-b", "beta", &upstream_b, "token-of-b").await;
    let a = sidecar("org-a");
    let b = sidecar("org-b");

    let listed = rpc(&app, &a, "tools/list", json!({})).await;
    assert_eq!(
        tool_names(&listed),
        ["alpha_echo", "alpha_slow", "alpha_fail"]
    );
    assert_eq!(
        listed["result"]["tools"][1]["inputSchema"]["required"],
        json!(["ms"]),
        "the upstream's input schema is passed on"
    );
    assert_eq!(
        tool_names(&rpc(&app, &b, "tools/list", json!({})).await),
        ["beta_echo", "beta_slow", "beta_fail"]
    );

    let answer = call(&app, &a, "alpha_echo", json!({"text": "hi"})).await;
    let result = &answer["result"];
    assert_eq!(result.get("isError"), None, "{answer}");
    assert_eq!(
        result["structuredContent"]["arguments"],
        json!({"text": "hi"})
    );
    assert_eq!(
        result["structuredContent"]["authorization"],
        "Bearer token-of-a"
    );

    // A names B's tool: the same answer as for a tool that does not exist, and B's upstream
    // never hears of it.
    let crossing = call(&app, &a, "beta_echo", json!({})).await;
    assert_eq!(crossing["error"]["code"], -32602, "{crossing}");
    assert_eq!(crossing["error"]["message"], "unknown tool: beta_echo");
    assert!(upstream_b.requests_for("tools/call").is_empty());
    assert_eq!(upstream_a.requests_for("tools/call").len(), 1);
}

#[tokio::test]
async fn calls_follow_the_upstream_session_over_json_and_sse_and_close_it() {
    let app = app_with(|_| {}).await;
    let upstream = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream, "token-of-a").await;
    let a = sidecar("org-a");
    for sse in [false, true] {
        upstream.answer_with_sse(sse);
        let answer = call(&app, &a, "alpha_echo", json!({"sse": sse})).await;
        assert_eq!(
            answer["result"]["structuredContent"]["arguments"]["sse"], sse,
            "{answer}"
        );
    }
    let calls = upstream.requests_for("tools/call");
    assert_eq!(calls.len(), 2);
    for request in &calls {
        assert_eq!(
            request.session_id.as_deref(),
            Some(nubabel_e2e::mcp_upstream::UPSTREAM_SESSION_ID)
        );
        assert_eq!(request.protocol_version.as_deref(), Some("2025-11-25"));
        assert_eq!(request.authorization.as_deref(), Some("Bearer token-of-a"));
    }
    assert_eq!(upstream.requests_for("notifications/initialized").len(), 2);
    assert_eq!(upstream.requests_for("DELETE").len(), 2);

    let failed = call(&app, &a, "alpha_fail", json!({})).await;
    assert_eq!(failed["result"]["isError"], true);
    assert_eq!(
        failed["result"]["content"][0]["text"],
        "the tool failed on purpose"
    );
}

#[tokio::test]
async fn an_upstream_401_is_retried_once_then_reported_as_a_tool_error_without_the_secret() {
    let app = app_with(|_| {}).await;
    let upstream = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream, "secret-token-a").await;
    upstream.refuse_all(true);
    let answer = call(&app, &sidecar("org-a"), "alpha_echo", json!({})).await;
    let result = &answer["result"];
    assert_eq!(result["isError"], true, "{answer}");
    let text = result["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("refused the stored credentials"), "{text}");
    assert!(!answer.to_string().contains("secret-token-a"));
    // Re-authorization finds the same static token, so it is not sent again.
    assert_eq!(upstream.requests_for("initialize").len(), 1);
}

#[tokio::test]
async fn after_an_upstream_401_a_refreshed_oauth_token_is_used_for_one_retry() {
    let app = app_with(|_| {}).await;
    let upstream = McpUpstream::start().unwrap();
    let endpoint = crate::oauth::TokenEndpoint::start(crate::oauth::TokenMode::Rotate)
        .await
        .unwrap();
    let keyring = Keyring::parse(VAULT_KEYS).unwrap();
    // The stored access token is not expired, but the upstream has revoked it.
    let expires = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(3600))
        .unwrap();
    connections::create(
        &app.db,
        &keyring,
        &NewConnection {
            organization_id: &OrganizationId::parse("org-a").unwrap(),
            provider: "alpha",
            upstream_url: &upstream.url().parse().unwrap(),
            credentials: &Credentials {
                auth_kind: AuthKind::OAuth2 {
                    token_url: endpoint.url.parse().unwrap(),
                    client_id: "client-1".to_owned(),
                },
                secrets: Secrets::OAuth2 {
                    access_token: "at-0".to_owned().into(),
                    refresh_token: Some("rt-0".to_owned().into()),
                    client_secret: Some("client-secret-1".to_owned().into()),
                },
                token_expires_at: Some(expires),
            },
        },
    )
    .await
    .unwrap();
    upstream.accept_only(Some("Bearer at-1"));

    let answer = call(&app, &sidecar("org-a"), "alpha_echo", json!({})).await;
    assert_eq!(answer["result"].get("isError"), None, "{answer}");
    assert_eq!(
        answer["result"]["structuredContent"]["authorization"],
        "Bearer at-1"
    );
    assert_eq!(endpoint.count(), 1);
    let attempts: Vec<Option<String>> = upstream
        .requests_for("initialize")
        .into_iter()
        .map(|r| r.authorization)
        .collect();
    assert_eq!(
        attempts,
        [
            Some("Bearer at-0".to_owned()),
            Some("Bearer at-1".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_call_slower_than_the_timeout_ends_with_an_error_result() {
    let app = app_with(|config| config.mcp_call_timeout_ms = 300).await;
    let upstream = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream, "token-of-a").await;
    let started = std::time::Instant::now();
    let answer = call(&app, &sidecar("org-a"), "alpha_slow", json!({"ms": 3000})).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answer["result"]["isError"], true);
    assert_eq!(
        answer["result"]["content"][0]["text"],
        "the tool call timed out after 300 ms"
    );
}

#[tokio::test]
async fn the_tenant_limit_bounds_concurrent_calls_and_the_rest_fail_after_waiting() {
    let app = app_with(|config| {
        config.mcp_tenant_concurrency = 2;
        config.mcp_queue_timeout_ms = 300;
    })
    .await;
    let upstream = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream, "token-of-a").await;
    let other = McpUpstream::start().unwrap();
    connect(&app, "org-b", "beta", &other, "token-of-b").await;
    let a = sidecar("org-a");
    let calls = (0..4).map(|_| call(&app, &a, "alpha_slow", json!({"ms": 1500})));
    // Another tenant's call runs meanwhile: the limit is per tenant.
    let (answers, b_answer) = tokio::join!(futures::future::join_all(calls), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        call(&app, &sidecar("org-b"), "beta_echo", json!({})).await
    });
    let busy: Vec<&Value> = answers
        .iter()
        .filter(|a| a["result"]["isError"] == true)
        .collect();
    assert_eq!(busy.len(), 2, "{answers:?}");
    for answer in busy {
        let text = answer["result"]["content"][0]["text"].as_str().unwrap();
        assert!(
            text.contains("too many tool calls") && text.contains("limit 2"),
            "{text}"
        );
    }
    assert_eq!(upstream.peak_concurrent_calls(), 2);
    assert_eq!(b_answer["result"].get("isError"), None, "{b_answer}");
    // Counted by outcome: three calls ran (two of A, one of B), two found no slot.
    let metrics = reqwest::get(format!("{}/metrics", app.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (outcome, count) in [("success", 3), ("busy", 2)] {
        let line = format!(
            r#"nubabel_callback_api_mcp_tool_calls_total{{via="mcp",outcome="{outcome}"}} {count}"#
        );
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains(
        r#"nubabel_callback_api_mcp_tool_call_duration_seconds_count{via="mcp",outcome="busy"} 2"#
    ));
}

async fn post_state(app: &TestApp, sidecar: &SidecarIdentity, session: &str, state: &str) {
    let response = app
        .callback(
            sidecar,
            session,
            "update",
            &unique("state"),
            &json!({"state": state}),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

async fn recorded_calls(app: &TestApp, session: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "select e.body from session_events e join sessions s on s.id = e.session_pk
         where s.session_id = $1 and e.event_type = 'mcp_tool_call' order by e.seq",
    )
    .bind(session)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_call_is_recorded_as_progress_of_the_pods_working_session_only_when_unambiguous() {
    let app = app_with(|_| {}).await;
    let upstream = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream, "token-of-a").await;
    let a = sidecar("org-a");
    app.register(&a, "conversation-1", "ses_one").await.unwrap();
    app.register(&a, "conversation-2", "ses_two").await.unwrap();
    post_state(&app, &a, "conversation-1", "busy").await;
    post_state(&app, &a, "conversation-2", "idle").await;

    let pod = [("x-nubabel-pod", "fleet-0")];
    let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                      "params": {"name": "alpha_echo", "arguments": {}}});
    let answer: Value = post_mcp(&app, &a, &pod, &body).await.json().await.unwrap();
    assert!(answer["result"]["content"].is_array(), "{answer}");
    let recorded = recorded_calls(&app, "conversation-1").await;
    assert_eq!(recorded.len(), 1);
    let event = &recorded[0];
    assert_eq!(event["tool"], "alpha_echo");
    assert_eq!(event["provider"], "alpha");
    assert_eq!(event["outcome"], "success");
    assert_eq!(event["via"], "mcp");
    assert!(event["durationMs"].is_u64());
    let (last_tool, events): (Option<String>, i64) = sqlx::query_as(
        "select last_tool, progress_events from sessions where session_id = 'conversation-1'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(last_tool.as_deref(), Some("alpha_echo"));
    assert_eq!(events, 1);

    // A failing call is recorded with its outcome and message.
    call(&app, &a, "alpha_fail", json!({})).await;
    let recorded = recorded_calls(&app, "conversation-1").await;
    assert_eq!(recorded[1]["outcome"], "tool_error");
    assert_eq!(recorded[1]["error"], "the tool failed on purpose");

    // Two working sessions: the call cannot be told apart, so it is not recorded...
    post_state(&app, &a, "conversation-2", "busy").await;
    post_mcp(&app, &a, &pod, &body).await;
    assert_eq!(recorded_calls(&app, "conversation-1").await.len(), 2);
    assert!(recorded_calls(&app, "conversation-2").await.is_empty());
    // ...unless the caller names its session.
    let named = json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call",
                       "params": {"name": "alpha_echo", "arguments": {},
                                  "_meta": {"nubabel.io/sessionId": "ses_two"}}});
    post_mcp(&app, &a, &pod, &named).await;
    assert_eq!(recorded_calls(&app, "conversation-2").await.len(), 1);
    // Another tenant cannot name A's session: it resolves only within the caller's tenant.
    let b = sidecar("org-b");
    connect(&app, "org-b", "beta", &upstream, "token-of-b").await;
    let crossing = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                          "params": {"name": "beta_echo", "arguments": {},
                                     "_meta": {"nubabel.io/sessionId": "conversation-2"}}});
    post_mcp(&app, &b, &[], &crossing).await;
    assert_eq!(recorded_calls(&app, "conversation-2").await.len(), 1);
}

async fn invoke(app: &TestApp, sidecar: &SidecarIdentity, body: &Value) -> reqwest::Response {
    let body = serde_json::to_vec(body).unwrap();
    let path = "/api/sidecar/mcp/invoke";
    let headers = app.signed_headers(
        sidecar,
        path,
        &unique("invoke"),
        crate::helpers::now(),
        &body,
    );
    app.post_raw(path, headers, body).await.unwrap()
}

#[tokio::test]
async fn a_tool_name_with_nul_is_an_unknown_tool_not_an_internal_error() {
    let app = app_with(|_| {}).await;
    let upstream = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream, "token-of-a").await;
    let a = sidecar("org-a");
    for name in ["al\u{0}pha_echo", "alpha\u{0}_echo"] {
        let answer = call(&app, &a, name, json!({})).await;
        assert_eq!(answer["error"]["code"], -32602, "{name:?}: {answer}");
    }
}

#[tokio::test]
async fn a_replayed_rest_call_is_refused_and_runs_the_tool_once() {
    let app = app_with(|_| {}).await;
    let upstream = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream, "token-of-a").await;
    let a = sidecar("org-a");
    app.register(&a, "conversation-r", "ses_replayed")
        .await
        .unwrap();
    let body = serde_json::to_vec(&json!({"organizationId": "org-a", "provider": "alpha",
        "toolName": "echo", "args": {"n": 1}, "sessionId": "conversation-r"}))
    .unwrap();
    let path = "/api/sidecar/mcp/invoke";
    let captured = app.signed_headers(&a, path, &unique("invoke"), crate::helpers::now(), &body);
    let first = app
        .post_raw(path, captured.clone(), body.clone())
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let replayed = app.post_raw(path, captured, body).await.unwrap();
    assert_eq!(replayed.status(), StatusCode::CONFLICT);
    let error: Value = replayed.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("at most once"),
        "{error}"
    );
    assert_eq!(recorded_calls(&app, "conversation-r").await.len(), 1);
}

#[tokio::test]
async fn the_rest_form_runs_the_same_call_and_refuses_to_name_another_tenant() {
    let app = app_with(|_| {}).await;
    let upstream_a = McpUpstream::start().unwrap();
    let upstream_b = McpUpstream::start().unwrap();
    connect(&app, "org-a", "alpha", &upstream_a, "token-of-a").await;
    connect(&app, "org-b", "beta", &upstream_b, "token-of-b").await;
    let a = sidecar("org-a");
    app.register(&a, "conversation-1", "ses_one").await.unwrap();

    let response = invoke(
        &app,
        &a,
        &json!({"organizationId": "org-a", "provider": "alpha",
        "toolName": "echo", "args": {"n": 1}, "sessionId": "conversation-1"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["outcome"], "success");
    assert_eq!(
        body["result"]["structuredContent"]["arguments"],
        json!({"n": 1})
    );
    assert_eq!(
        body["result"]["structuredContent"]["authorization"],
        "Bearer token-of-a"
    );
    let recorded = recorded_calls(&app, "conversation-1").await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0]["via"], "rest");

    let failed: Value = invoke(
        &app,
        &a,
        &json!({"organizationId": "org-a", "provider": "alpha", "toolName": "fail"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(failed["success"], false);
    assert_eq!(failed["error"], "the tool failed on purpose");

    // Naming B: 403, and B's upstream hears nothing.
    let response = invoke(
        &app,
        &a,
        &json!({"organizationId": "org-b", "provider": "beta", "toolName": "echo"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("organizationId"),
        "{body}"
    );
    // B's provider under A's own organization: no such connection for A.
    let response = invoke(
        &app,
        &a,
        &json!({"organizationId": "org-a", "provider": "beta", "toolName": "echo"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(upstream_b.requests().is_empty());

    let response = invoke(
        &app,
        &a,
        &json!({"organizationId": "org-a", "provider": "Alpha!", "toolName": "echo"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let response = invoke(
        &app,
        &a,
        &json!({"organizationId": "org-a", "provider": "alpha"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(response.text().await.unwrap().contains("toolName"));
}

#[tokio::test]
async fn an_upstream_redirect_to_another_origin_is_not_followed_with_the_api_key() {
    let app = app_with(|_| {}).await;
    let elsewhere = McpUpstream::start().unwrap();
    let redirector = crate::egress::Landing::start().await.unwrap();
    let keyring = Keyring::parse(VAULT_KEYS).unwrap();
    connections::create(
        &app.db,
        &keyring,
        &NewConnection {
            organization_id: &OrganizationId::parse("org-a").unwrap(),
            provider: "alpha",
            upstream_url: &redirector.redirect_to(&elsewhere.url()),
            credentials: &Credentials {
                auth_kind: AuthKind::ApiKey {
                    header: "x-api-key".to_owned(),
                },
                secrets: Secrets::ApiKey {
                    key: "key-of-a".to_owned().into(),
                },
                token_expires_at: None,
            },
        },
    )
    .await
    .unwrap();

    let listed = rpc(&app, &sidecar("org-a"), "tools/list", json!({})).await;
    assert_eq!(tool_names(&listed), Vec::<String>::new(), "{listed}");
    assert!(
        elsewhere.requests().is_empty(),
        "the other origin was called: {:?}",
        elsewhere.requests()
    );
}

/// A `ping` to `/mcp` as `sidecar` with generation `generation` of its token; the status.
async fn ping_with_generation(
    app: &TestApp,
    sidecar: &SidecarIdentity,
    generation: u32,
) -> StatusCode {
    let master = MasterKey::new(MASTER_KEY.as_bytes()).unwrap();
    let token = derive_mcp_token_generation(&master, sidecar, generation);
    app.client
        .post(format!("{}/mcp", app.address))
        .bearer_auth(token.expose())
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .header("x-nubabel-organization", sidecar.organization_id().as_str())
        .header(
            "x-nubabel-sidecar",
            format!("{}/{}", sidecar.namespace(), sidecar.name()),
        )
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap()
        .status()
}

/// Retires the generations of `sidecar`'s MCP token below `below`; status and JSON.
async fn retire(app: &TestApp, sidecar: &SidecarIdentity, body: &Value) -> (StatusCode, Value) {
    let response = app
        .client
        .post(format!(
            "{}/api/admin/organizations/{}/fleets/{}/{}/mcp-token/retire",
            app.admin_address,
            sidecar.organization_id().as_str(),
            sidecar.namespace(),
            sidecar.name()
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn a_fleets_mcp_token_rotates_with_both_generations_valid_until_the_old_one_is_retired() {
    let app = app_with(|_| {}).await;
    let fleet = sidecar(&unique("org"));
    let neighbour = sidecar(&unique("org"));

    // While the pods roll to generation 1, pods still on generation 0 keep working.
    for generation in [0, 1, 2] {
        assert_eq!(
            ping_with_generation(&app, &fleet, generation).await,
            StatusCode::OK,
            "generation {generation}"
        );
    }
    // The rollout is done: the old generation is retired and refused from now on.
    let (status, floor) = retire(&app, &fleet, &json!({"below": 1})).await;
    assert_eq!(status, StatusCode::OK, "{floor}");
    assert_eq!(floor["lowestAcceptedGeneration"], 1);
    assert_eq!(
        ping_with_generation(&app, &fleet, 0).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(ping_with_generation(&app, &fleet, 1).await, StatusCode::OK);
    // A floor is never lowered, and another fleet's tokens are untouched.
    let (_, floor) = retire(&app, &fleet, &json!({"below": 0})).await;
    assert_eq!(floor["lowestAcceptedGeneration"], 1);
    assert_eq!(
        ping_with_generation(&app, &fleet, 0).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ping_with_generation(&app, &neighbour, 0).await,
        StatusCode::OK
    );
    // Malformed requests say why.
    let (status, _) = retire(&app, &fleet, &json!({"below": -1})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = retire(&app, &fleet, &json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}
