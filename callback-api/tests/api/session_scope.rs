//! Which sessions a callback may address: only those its own fleet was given, by ids that
//! name exactly one session.

use anyhow::Result;
use nubabel_contract::identity::SidecarIdentity;
use reqwest::StatusCode;

use crate::helpers::{opencode_session_id, progress, sidecar, spawn_app, unique};

#[tokio::test]
async fn a_fleet_reaches_only_the_sessions_it_was_given_even_within_its_tenant() -> Result<()> {
    let app = spawn_app().await?;
    let owner = sidecar(&unique("org"));
    let org = owner.organization_id().as_str();
    let mapping = app
        .register(&owner, &unique("s"), &opencode_session_id())
        .await?;
    // Fleets of the same tenant: a sibling in the same namespace and one in another.
    let sibling = SidecarIdentity::new(org, owner.namespace(), "other")?;
    let elsewhere = SidecarIdentity::new(org, "ns-elsewhere", owner.name())?;

    for id in [&mapping.session_id, &mapping.opencode_session_id] {
        for (caller, label) in [(&sibling, "sibling"), (&elsewhere, "elsewhere")] {
            let response = app
                .callback(caller, id, "progress", &unique("msg"), &progress(0))
                .await?;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{label} via {id}");
        }
        let response = app
            .callback(&owner, id, "progress", &unique("msg"), &progress(0))
            .await?;
        assert_eq!(response.status(), StatusCode::OK, "owner via {id}");
    }
    assert_eq!(app.count("session_events").await?, 2);

    // Once the session is given to the sibling too, the sibling reaches it.
    app.register(&sibling, &mapping.session_id, &opencode_session_id())
        .await?;
    let response = app
        .callback(
            &sibling,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &progress(0),
        )
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn a_conversation_cannot_take_an_opencode_session_id_and_divert_its_callbacks() -> Result<()>
{
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let victim = app.register(&tenant, &unique("s"), "ses_victim").await?;

    // A Nubabel session named like the victim's OpenCode session is refused outright.
    let error = app
        .register(&tenant, "ses_victim", "ses_attacker")
        .await
        .unwrap_err();
    assert!(error.to_string().contains("ses_"), "{error:#}");
    assert_eq!(app.count("sessions").await?, 1);

    // Callbacks naming the OpenCode id still reach the victim's conversation.
    let response = app
        .callback(
            &tenant,
            "ses_victim",
            "progress",
            &unique("msg"),
            &progress(0),
        )
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let landed: uuid::Uuid = sqlx::query_scalar("select session_pk from session_events")
        .fetch_one(&app.db)
        .await?;
    assert_eq!(landed, victim.session_pk);
    Ok(())
}
