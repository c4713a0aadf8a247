//! `GET /api/tasks/{name}/changes` on real Postgres: a tenant reads what its finished task
//! changed, patch included; another tenant's token, or none, reads nothing.

use anyhow::Result;
use nubabel_contract::identity::OrganizationId;
use nubabel_contract::workspace::{FileChange, RelativePath, RepositoryChanges, RepositoryState};
use nubabel_store::{api_tokens, changes, results};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{spawn_app, unique};

#[tokio::test]
async fn a_tenant_reads_its_tasks_changes_and_no_other_tenant_does() -> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org-a");
    let uid = uuid::Uuid::new_v4();
    results::record(
        &app.db,
        &results::TaskResult {
            task_uid: uid,
            organization_id: &org,
            task_namespace: "tenants",
            task_name: "fix-billing",
            session_id: Some("conv"),
            phase: "Succeeded",
            output: Some("done"),
            error_reason: None,
            error_message: None,
        },
    )
    .await?;
    changes::record(
        &app.db,
        uid,
        &[RepositoryChanges {
            now: RepositoryState {
                path: RelativePath::parse("billing")?,
                commit: "c2".to_owned(),
                tree: "t2".to_owned(),
            },
            commit_before: "c1".to_owned(),
            files: vec![FileChange {
                path: "tax.rs".to_owned(),
                added: 2,
                removed: 1,
            }],
            patch: "+rounded\n-truncated\n".to_owned(),
        }],
    )
    .await?;
    let own = api_tokens::issue(&app.db, &OrganizationId::parse(&org)?, "tenants", "").await?;
    let other_org = unique("org-b");
    let other =
        api_tokens::issue(&app.db, &OrganizationId::parse(&other_org)?, "tenants", "").await?;
    let get = |name: &str, token: Option<&str>| {
        let mut request = app
            .client
            .get(format!("{}/api/tasks/{name}/changes", app.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let answer = get("fix-billing", Some(own.token.as_str())).await?;
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value = answer.json().await?;
    assert_eq!(body["uid"], uid.to_string());
    let repository = &body["repositories"][0];
    assert_eq!(repository["path"], "billing");
    assert_eq!(
        (
            repository["commit_before"].as_str(),
            repository["commit_after"].as_str()
        ),
        (Some("c1"), Some("c2"))
    );
    assert_eq!(repository["files"][0]["added"], 2);
    assert_eq!(repository["patch"], "+rounded\n-truncated\n");

    for (name, token, status) in [
        (
            "fix-billing",
            Some(other.token.as_str()),
            StatusCode::NOT_FOUND,
        ),
        ("fix-billing", None, StatusCode::UNAUTHORIZED),
        (
            "no-such-task",
            Some(own.token.as_str()),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let answer = get(name, token).await?;
        assert_eq!(answer.status(), status, "{name} {token:?}");
        let body: Value = answer.json().await?;
        assert!(
            body["error"].is_object() || body["error"].is_string(),
            "{body}"
        );
        assert!(!body.to_string().contains("rounded"), "{body}");
    }
    Ok(())
}
