//! The SSRF guard on outbound requests: inward addresses are refused unless allowlisted, also
//! behind a hostname and after a redirect; redirects stay on the request's origin, or are not
//! followed at all; an allowlisted name is reachable on its allowlisted port only.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use axum::{
    Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, Method as HttpMethod, StatusCode, Uri, header},
    response::IntoResponse,
    routing::any,
};
use nubabel_callback_api::egress::{Allowlist, Egress, EgressError, Redirects, refusal};
use reqwest::Method;
use url::Url;

/// A request a [`Landing`] server received.
#[derive(Debug, Clone)]
pub struct Landed {
    pub method: String,
    pub path: String,
    pub api_key: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
}

/// A plain-http server on 127.0.0.1: `/redirect?to=<url>` answers 307 to `to` (any method);
/// every other path is recorded and answered `200 ok`.
pub struct Landing {
    pub port: u16,
    landed: Arc<Mutex<Vec<Landed>>>,
}

impl Landing {
    pub async fn start() -> Result<Self> {
        let landed = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route(
                "/redirect",
                any(|Query(query): Query<HashMap<String, String>>| async move {
                    let to = query.get("to").cloned().unwrap_or_default();
                    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
                }),
            )
            .fallback(
                |State(landed): State<Arc<Mutex<Vec<Landed>>>>,
                 method: HttpMethod,
                 uri: Uri,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let text = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    landed.lock().unwrap().push(Landed {
                        method: method.to_string(),
                        path: uri.path().to_owned(),
                        api_key: text("x-api-key"),
                        authorization: text("authorization"),
                        body: String::from_utf8_lossy(&body).into_owned(),
                    });
                    "ok"
                },
            )
            .with_state(Arc::clone(&landed));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, landed })
    }

    /// `http://127.0.0.1:<port>/redirect?to=<to>`.
    pub fn redirect_to(&self, to: &str) -> Url {
        Url::parse_with_params(
            &format!("http://127.0.0.1:{}/redirect", self.port),
            [("to", to)],
        )
        .unwrap()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request recorded so far.
    pub fn landed(&self) -> Vec<Landed> {
        self.landed.lock().unwrap().clone()
    }
}

/// A plain-http server on 127.0.0.1: `/ok`, and `/redirect?to=<url>` (307).
pub async fn start_redirector() -> Result<u16> {
    Ok(Landing::start().await?.port)
}

fn egress(allow: &[String]) -> Egress {
    Egress::new(Allowlist::parse(allow).unwrap()).unwrap()
}

async fn get_status(egress: &Egress, url: &str) -> Result<StatusCode, String> {
    let request = egress
        .request(Method::GET, Url::parse(url).unwrap(), Redirects::SameOrigin)
        .map_err(|e| e.to_string())?;
    match request.timeout(Duration::from_secs(5)).send().await {
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
        let refused = egress.request(Method::GET, Url::parse(url).unwrap(), Redirects::SameOrigin);
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
    assert!(error.contains("allowlisted on port"), "{error}");
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
    // Allowlisting the target too does not make another origin the request's own.
    let both = egress(&[
        format!("127.0.0.1:{upstream}"),
        format!("127.0.0.1:{inward}"),
    ]);
    let url = Url::parse_with_params(
        &format!("http://127.0.0.1:{upstream}/redirect"),
        [("to", format!("http://127.0.0.1:{inward}/ok").as_str())],
    )?;
    let error = get_status(&both, url.as_str()).await.unwrap_err();
    assert!(error.contains("another origin"), "{error}");
    Ok(())
}

/// POSTs `body` with an `x-api-key` and an `Authorization` header to `url`.
async fn post_with_credentials(
    egress: &Egress,
    url: Url,
    redirects: Redirects,
) -> Result<StatusCode, EgressError> {
    let response = egress
        .request(Method::POST, url, redirects)?
        .header("x-api-key", "key-1")
        .header(header::AUTHORIZATION, "Bearer token-1")
        .body("refresh_token=rt-1&client_secret=cs-1")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match response {
        Ok(response) => Ok(response.status()),
        Err(error) => Err(refusal(&error)
            .cloned()
            .unwrap_or_else(|| panic!("not a refusal: {error:?}"))),
    }
}

#[tokio::test]
async fn a_redirect_to_another_origin_is_refused_and_no_credential_reaches_it() -> Result<()> {
    let origin = Landing::start().await?;
    let other = Landing::start().await?;
    let egress = egress(&["127.0.0.0/8".to_owned()]);
    let error = post_with_credentials(
        &egress,
        origin.redirect_to(&other.url("/landing")),
        Redirects::SameOrigin,
    )
    .await
    .unwrap_err();
    assert_eq!(
        error,
        EgressError::CrossOriginRedirect {
            from: origin.url(""),
            to: other.url(""),
        }
    );
    assert!(other.landed().is_empty(), "{:?}", other.landed());
    Ok(())
}

#[tokio::test]
async fn a_redirect_on_the_same_origin_is_followed_with_the_credentials_and_body() -> Result<()> {
    let origin = Landing::start().await?;
    let egress = egress(&["127.0.0.0/8".to_owned()]);
    let status = post_with_credentials(
        &egress,
        origin.redirect_to(&origin.url("/landing")),
        Redirects::SameOrigin,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let landed = origin.landed();
    assert_eq!(landed.len(), 1, "{landed:?}");
    assert_eq!(landed[0].method, "POST");
    assert_eq!(landed[0].path, "/landing");
    assert_eq!(landed[0].api_key.as_deref(), Some("key-1"));
    assert_eq!(landed[0].authorization.as_deref(), Some("Bearer token-1"));
    assert_eq!(landed[0].body, "refresh_token=rt-1&client_secret=cs-1");
    Ok(())
}

#[tokio::test]
async fn a_request_that_refuses_redirects_follows_none_even_on_its_origin() -> Result<()> {
    let origin = Landing::start().await?;
    let egress = egress(&["127.0.0.0/8".to_owned()]);
    let error = post_with_credentials(
        &egress,
        origin.redirect_to(&origin.url("/landing")),
        Redirects::Refused,
    )
    .await
    .unwrap_err();
    assert_eq!(error, EgressError::RedirectNotFollowed(origin.url("")));
    assert!(
        error.to_string().contains("must answer directly"),
        "{error}"
    );
    assert!(origin.landed().is_empty());
    Ok(())
}

#[tokio::test]
async fn a_host_port_entry_admits_no_other_port_of_that_host() -> Result<()> {
    let allowed = Landing::start().await?;
    // Another port of the same host, never accepting: a connection would wait in its backlog.
    let other = std::net::TcpListener::bind("127.0.0.1:0")?;
    other.set_nonblocking(true)?;
    let other_port = other.local_addr()?.port();
    let egress = egress(&[format!("localhost:{}", allowed.port)]);

    let error = get_status(&egress, &format!("https://localhost:{other_port}/"))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        format!(
            "egress refused: localhost is allowlisted on port {} only, not on {other_port}",
            allowed.port
        )
    );
    assert_eq!(
        other.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "no connection reached the other port"
    );
    // The allowlisted port itself still works.
    assert_eq!(
        get_status(&egress, &format!("http://localhost:{}/ok", allowed.port)).await,
        Ok(StatusCode::OK)
    );
    Ok(())
}
