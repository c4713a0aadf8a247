//! The web view at `/ui` on real Postgres and the real API server: signing in with a tenant
//! token, what a signed-out or revoked browser gets, the security headers, an answer holding
//! HTML shown as text, another tenant's task not found, and cancelling from the page.

use anyhow::Result;
use nubabel_callback_api::web::CONTENT_SECURITY_POLICY;
use nubabel_contract::identity::OrganizationId;
use nubabel_crds::v1alpha1::DelegatedTask;
use nubabel_e2e::TestNamespace;
use nubabel_store::{api_tokens, results};
use reqwest::{StatusCode, header};

use crate::task_reads::{app_with_tasks, delegate, set_phase, two_tenants};

/// The sign-in form's encoding (tokens need no escaping in it).
const FORM: &str = "application/x-www-form-urlencoded";

/// A client that shows redirects instead of following them.
fn browser() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

#[tokio::test]
async fn signing_in_sets_a_strict_cookie_and_a_bad_or_revoked_token_gets_the_sign_in_page()
-> Result<()> {
    let (env, app) = app_with_tasks().await?;
    let namespace = TestNamespace::create(&env.client, "web-sign-in").await?;
    let org = OrganizationId::parse(&crate::helpers::unique("org"))?;
    let issued = api_tokens::issue(&app.db, &org, namespace.name(), "").await?;
    let http = browser()?;
    let url = |path: &str| format!("{}{path}", app.address);

    let signed_out = http.get(url("/ui/tasks")).send().await?;
    assert_eq!(signed_out.status(), StatusCode::SEE_OTHER);
    assert_eq!(signed_out.headers()[header::LOCATION], "/ui/sign-in");
    let page = http.get(url("/ui/sign-in")).send().await?;
    assert_eq!(
        page.headers()[header::CONTENT_SECURITY_POLICY],
        CONTENT_SECURITY_POLICY
    );
    assert_eq!(page.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(page.text().await?.contains("<label for=\"token\">"));

    let wrong = http
        .post(url("/ui/sign-in"))
        .header(header::CONTENT_TYPE, FORM)
        .body("token=nbt_wrong")
        .send()
        .await?;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(header::SET_COOKIE).is_none());
    assert!(
        wrong
            .text()
            .await?
            .contains("unknown, revoked or malformed")
    );

    let cross_site = http
        .post(url("/ui/sign-in"))
        .header("sec-fetch-site", "cross-site")
        .header(header::CONTENT_TYPE, FORM)
        .body(format!("token={}", issued.token))
        .send()
        .await?;
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);

    let good = http
        .post(url("/ui/sign-in"))
        .header(header::CONTENT_TYPE, FORM)
        .body(format!("token={}", issued.token))
        .send()
        .await?;
    assert_eq!(good.status(), StatusCode::SEE_OTHER);
    let cookie = good.headers()[header::SET_COOKIE].to_str()?.to_owned();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("Path=/ui"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let list = http
        .get(url("/ui/tasks"))
        .header(header::COOKIE, &pair)
        .send()
        .await?;
    assert_eq!(list.status(), StatusCode::OK);
    assert!(list.text().await?.contains("No tasks yet."));

    api_tokens::revoke(&app.db, issued.id).await?;
    let revoked = http
        .get(url("/ui/tasks"))
        .header(header::COOKIE, &pair)
        .send()
        .await?;
    assert_eq!(revoked.status(), StatusCode::SEE_OTHER);
    assert_eq!(revoked.headers()[header::LOCATION], "/ui/sign-in");
    let rows = http
        .get(url("/ui/tasks/rows"))
        .header(header::COOKIE, &pair)
        .send()
        .await?;
    assert_eq!(rows.status(), StatusCode::UNAUTHORIZED);
    namespace.delete().await
}

#[tokio::test]
async fn a_task_page_shows_an_answer_holding_html_as_text_and_cancels_from_its_button() -> Result<()>
{
    let (env, app) = app_with_tasks().await?;
    let namespace = TestNamespace::create(&env.client, "web-task").await?;
    let ((org, token), (_, other)) = two_tenants(&app, namespace.name()).await?;
    let http = browser()?;
    let url = |path: &str| format!("{}{path}", app.address);
    let as_tenant = |token: &str| format!("nubabel_token={token}");

    let answered = delegate(&app, &token, &org, "s-1", "u-1", "say hi").await?;
    let tasks = namespace.api::<DelegatedTask>();
    set_phase(&tasks, &answered, "Succeeded").await?;
    let uid = tasks.get(&answered).await?.metadata.uid.unwrap().parse()?;
    results::record(
        &app.db,
        &results::TaskResult {
            task_uid: uid,
            organization_id: &org,
            task_namespace: namespace.name(),
            task_name: &answered,
            session_id: Some("s-1"),
            phase: "Succeeded",
            output: Some("**Done**: <script>alert(1)</script><img src=x onerror=alert(2)>"),
            error_reason: None,
            error_message: None,
        },
    )
    .await?;
    let page = http
        .get(url(&format!("/ui/tasks/{answered}")))
        .header(header::COOKIE, as_tenant(&token))
        .send()
        .await?;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await?;
    assert!(
        html.contains("<strong>Done</strong>: &lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script>alert"));
    assert!(
        !html.contains("id=\"cancel\""),
        "a finished task has no cancel button"
    );

    let theirs = http
        .get(url(&format!("/ui/tasks/{answered}")))
        .header(header::COOKIE, as_tenant(&other))
        .send()
        .await?;
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
    let list = http
        .get(url("/ui/tasks/rows"))
        .header(header::COOKIE, as_tenant(&other))
        .send()
        .await?
        .text()
        .await?;
    assert!(!list.contains(&answered), "{list}");

    let running = delegate(&app, &token, &org, "s-2", "u-1", "work").await?;
    set_phase(&tasks, &running, "Running").await?;
    let cancel = |name: &str, site: &'static str| {
        http.post(url(&format!("/ui/tasks/{name}/cancel")))
            .header(header::COOKIE, as_tenant(&token))
            .header("sec-fetch-site", site)
            .send()
    };
    assert_eq!(
        cancel(&running, "cross-site").await?.status(),
        StatusCode::FORBIDDEN
    );
    assert!(!tasks.get(&running).await?.spec.cancel);
    let done = cancel(&running, "same-origin").await?;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert!(tasks.get(&running).await?.spec.cancel);
    let ended = cancel(&answered, "same-origin").await?;
    assert_eq!(ended.status(), StatusCode::CONFLICT);
    assert!(ended.text().await?.contains("already ended: Succeeded"));
    namespace.delete().await
}
