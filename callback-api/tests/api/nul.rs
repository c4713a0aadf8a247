//! NUL characters: valid JSON that Postgres cannot store. Events carrying them are stored with
//! U+FFFD in their place, so a pod's queue never stalls on one; names that carry them are
//! unknown (4xx), never a 5xx.

use anyhow::Result;
use nubabel_store::results::{self, TaskResult};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{opencode_session_id, sidecar, spawn_app, unique};

#[tokio::test]
async fn events_with_nul_are_stored_with_a_replacement_and_the_next_event_follows() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let session = &mapping.session_id;
    // `find -print0` output, a key with a NUL, a message part whose last line has one.
    let events = [
        (
            "progress",
            json!({"progress": {"type": "tool_execute_end", "tool": "ba\u{0}sh",
                                "output": "a.txt\u{0}b.txt\u{0}", "k\u{0}ey": ["\u{0}"]}}),
        ),
        (
            "progress",
            json!({"progress": {"type": "message_part", "text": "done\u{0}here"}}),
        ),
        (
            "update",
            json!({"state": "busy", "metadata": {"raw\u{0}": "x\u{0}y"}}),
        ),
        ("update", json!({"state": "idle"})),
    ];
    for (i, (action, body)) in events.iter().enumerate() {
        let response = app
            .callback(&tenant, session, action, &unique("msg"), body)
            .await?;
        assert_eq!(response.status(), StatusCode::OK, "event {i}");
        assert_eq!(response.json::<Value>().await?["sequence"], i + 1);
    }

    let bodies: Vec<Value> =
        sqlx::query_scalar("select body from session_events where session_pk = $1 order by seq")
            .bind(mapping.session_pk)
            .fetch_all(&app.db)
            .await?;
    assert_eq!(
        bodies[0],
        json!({"type": "tool_execute_end", "tool": "ba\u{FFFD}sh",
               "output": "a.txt\u{FFFD}b.txt\u{FFFD}", "k\u{FFFD}ey": ["\u{FFFD}"]})
    );
    assert_eq!(
        bodies[2],
        json!({"state": "busy", "metadata": {"raw\u{FFFD}": "x\u{FFFD}y"}})
    );
    let (last_tool, last_message, state): (Option<String>, Option<String>, Option<String>) =
        sqlx::query_as("select last_tool, last_message, state from sessions where id = $1")
            .bind(mapping.session_pk)
            .fetch_one(&app.db)
            .await?;
    assert_eq!(last_tool.as_deref(), Some("ba\u{FFFD}sh"));
    assert_eq!(last_message.as_deref(), Some("done\u{FFFD}here"));
    assert_eq!(state.as_deref(), Some("idle"));
    Ok(())
}

#[tokio::test]
async fn a_task_result_with_nul_is_stored_with_a_replacement() -> Result<()> {
    let app = spawn_app().await?;
    let uid = Uuid::new_v4();
    results::record(
        &app.db,
        &TaskResult {
            task_uid: uid,
            organization_id: "org-a",
            task_namespace: "team-a",
            task_name: "task",
            session_id: None,
            phase: "Failed",
            output: Some("binary\u{0}output"),
            error_reason: Some("AgentError"),
            error_message: Some("bad\u{0}"),
        },
    )
    .await?;
    assert_eq!(
        results::output(&app.db, uid).await?.as_deref(),
        Some("binary\u{FFFD}output")
    );
    Ok(())
}

#[tokio::test]
async fn a_provider_path_with_nul_is_not_found() -> Result<()> {
    let app = spawn_app().await?;
    let path = "/api/admin/organizations/org-a/connections/li%00near";
    for (method, body) in [
        (Method::GET, None),
        (
            Method::PATCH,
            Some(json!({"upstreamUrl": "https://mcp.example.com/"})),
        ),
        (Method::DELETE, None),
    ] {
        let (status, answer) = app.admin(method.clone(), path, body.as_ref()).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}: {answer}");
        assert_eq!(answer["error"]["code"], "not_found", "{method}");
    }
    Ok(())
}
