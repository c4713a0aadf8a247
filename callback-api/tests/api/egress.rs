//! The SSRF guard on outbound requests: inward addresses are refused unless allowlisted, also
//! behind a hostname and after a redirect.

use std::collections::HashMap;

use anyhow::Result;
use axum::{
    Router,
    extract::Query,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use nubabel_callback_api::egress::{Allowlist, Egress, EgressError, refusal};
use reqwest::Method;
use url::Url;

/// A plain-http server on 127.0.0.1: `/ok`, and `/redirect?to=<url>` (307).
pub async fn start_redirector() -> Result<u16> {
    let app = Router::new().route("/ok", get(|| async { "ok" })).route(
        "/redirect",
        get(|Query(query): Query<HashMap<String, String>>| async move {
            let to = query.get("to").cloned().unwrap_or_default();
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

fn egress(allow: &[String]) -> Egress {
    Egress::new(Allowlist::parse(allow).unwrap()).unwrap()
}

async fn get_status(egress: &Egress, url: &str) -> Result<StatusCode, String> {
    let request = egress
        .request(Method::GET, Url::parse(url).unwrap())
        .map_err(|e| e.to_string())?;
    match request.send().await {
        Ok(response) => Ok(response.status()),
        Err(error) => Err(refusal(&error)
            .map(ToString::to_string)
            .unwrap_or_else(|| format!("not a refusal: {error:?}"))),
    }
}

#[tokio::test]
async fn inward_literal_addresses_are_refused_before_any_connection() {
    let egress = egress(&[]);
    for url in [
        "https://127.0.0.1/",
        "https://[::1]/",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.1.2.3/",
        "https://192.168.0.10/",
        "https://[::ffff:10.0.0.1]/",
    ] {
        let refused = egress.request(Method::GET, Url::parse(url).unwrap());
        assert!(
            matches!(refused, Err(EgressError::Forbidden { .. })),
            "{url} was not refused"
        );
    }
}

#[tokio::test]
async fn plain_http_is_refused_unless_allowlisted() -> Result<()> {
    let port = start_redirector().await?;
    let url = format!("http://127.0.0.1:{port}/ok");
    let error = get_status(&egress(&[]), &url).await.unwrap_err();
    assert!(error.contains("must use https"), "{error}");
    let allowed = egress(&["127.0.0.0/8".to_owned()]);
    assert_eq!(get_status(&allowed, &url).await, Ok(StatusCode::OK));
    Ok(())
}

#[tokio::test]
async fn a_hostname_resolving_to_loopback_is_refused_unless_allowlisted() -> Result<()> {
    let port = start_redirector().await?;
    let error = get_status(&egress(&[]), &format!("https://localhost:{port}/ok"))
        .await
        .unwrap_err();
    assert!(
        error.contains("localhost resolves to") && error.contains("loopback"),
        "{error}"
    );
    let allowed = egress(&[format!("localhost:{port}")]);
    assert_eq!(
        get_status(&allowed, &format!("http://localhost:{port}/ok")).await,
        Ok(StatusCode::OK)
    );
    // The entry names one port only.
    let error = get_status(&allowed, &format!("http://localhost:{}/ok", port + 1))
        .await
        .unwrap_err();
    assert!(error.contains("must use https"), "{error}");
    Ok(())
}

#[tokio::test]
async fn a_redirect_from_an_allowed_upstream_to_an_inward_address_is_refused() -> Result<()> {
    let upstream = start_redirector().await?;
    let inward = start_redirector().await?;
    let allowed = egress(&[format!("127.0.0.1:{upstream}")]);
    for target in [
        format!("http://127.0.0.1:{inward}/ok"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "https://10.0.0.1/".to_owned(),
        "https://[::1]/".to_owned(),
        format!("https://localhost:{inward}/ok"),
    ] {
        let url = Url::parse_with_params(
            &format!("http://127.0.0.1:{upstream}/redirect"),
            [("to", target.as_str())],
        )?;
        let error = get_status(&allowed, url.as_str()).await.unwrap_err();
        assert!(error.starts_with("egress refused"), "{target}: {error}");
    }
    // Allowlisting the target too lets the redirect through.
    let both = egress(&[
        format!("127.0.0.1:{upstream}"),
        format!("127.0.0.1:{inward}"),
    ]);
    let url = Url::parse_with_params(
        &format!("http://127.0.0.1:{upstream}/redirect"),
        [("to", format!("http://127.0.0.1:{inward}/ok").as_str())],
    )?;
    assert_eq!(get_status(&both, url.as_str()).await, Ok(StatusCode::OK));
    Ok(())
}
