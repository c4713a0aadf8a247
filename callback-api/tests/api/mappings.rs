//! Session mappings as the operator records and reads them.

use anyhow::Result;
use nubabel_store::{
    Error,
    sessions::{NewMapping, SessionMappings, TaskRef},
};

use crate::helpers::{sidecar, spawn_app, unique};

#[tokio::test]
async fn the_newest_mapping_of_a_session_is_current_and_older_ones_still_resolve() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let first = app.register(&tenant, "conversation-1", "ses_first").await?;
    let mappings = SessionMappings::new(app.db.clone());
    let task = TaskRef::new(tenant.namespace(), "second-turn")?;
    mappings
        .record(&NewMapping {
            sidecar: &tenant,
            session_id: "conversation-1",
            opencode_session_id: "ses_second",
            pod_name: "fleet-1",
            task: Some(&task),
        })
        .await?;

    let current = mappings
        .get(tenant.organization_id(), "conversation-1")
        .await?
        .expect("mapping");
    assert_eq!(current.session_pk, first.session_pk);
    assert_eq!(
        (
            current.opencode_session_id.as_str(),
            current.pod_name.as_str()
        ),
        ("ses_second", "fleet-1")
    );
    assert_eq!(current.task, Some(task));
    // Another tenant does not see it.
    let other = sidecar(&unique("org"));
    assert_eq!(
        mappings
            .get(other.organization_id(), "conversation-1")
            .await?,
        None
    );
    // A late callback naming the first OpenCode session still reaches the conversation.
    let response = app
        .callback(
            &tenant,
            "ses_first",
            "progress",
            &unique("msg"),
            &crate::helpers::progress(0),
        )
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(app.count("sessions").await?, 1);
    Ok(())
}

#[tokio::test]
async fn an_opencode_session_cannot_serve_two_conversations() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    app.register(&tenant, "conversation-1", "ses_shared")
        .await?;
    let error = app
        .register(&tenant, "conversation-2", "ses_shared")
        .await
        .unwrap_err();
    assert!(
        matches!(error.downcast_ref::<Error>(), Some(Error::MappingConflict(id)) if id == "ses_shared"),
        "{error:?}"
    );
    // Recording the same mapping again is fine.
    app.register(&tenant, "conversation-1", "ses_shared")
        .await?;
    assert_eq!(app.count("session_mappings").await?, 1);
    Ok(())
}

#[tokio::test]
async fn invalid_ids_are_refused_before_anything_is_written() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let mappings = SessionMappings::new(app.db.clone());
    let long = "x".repeat(254);
    for (session_id, opencode_session_id, pod_name) in [
        ("", "ses_a", "pod"),
        ("s\n1", "ses_a", "pod"),
        ("s1", &long[..], "pod"),
        ("s1", "ses_a", "Pod_0"),
    ] {
        let result = mappings
            .record(&NewMapping {
                sidecar: &tenant,
                session_id,
                opencode_session_id,
                pod_name,
                task: None,
            })
            .await;
        assert!(
            matches!(result, Err(Error::Invalid(_))),
            "{session_id:?} {opencode_session_id:.10} {pod_name}"
        );
    }
    assert_eq!(app.count("sessions").await?, 0);
    Ok(())
}
