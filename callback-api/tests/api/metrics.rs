//! What `/metrics` exports stays bounded whatever clients send.

use std::collections::BTreeSet;

use anyhow::Result;
use reqwest::Method;

use crate::helpers::spawn_app;

/// The `method` label values in a Prometheus text exposition.
fn method_labels(exposition: &str) -> BTreeSet<String> {
    exposition
        .split("method=\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(value, _)| value.to_owned()))
        .collect()
}

#[tokio::test]
async fn invented_http_methods_share_one_other_label() -> Result<()> {
    let app = spawn_app().await?;
    for i in 0..40 {
        let method = Method::from_bytes(format!("INVENTED{i}").as_bytes())?;
        for path in [
            "/healthz",
            "/metrics",
            "/api/sidecar/sessions/s-1/progress",
            "/x",
        ] {
            app.client
                .request(method.clone(), format!("{}{path}", app.address))
                .send()
                .await?;
        }
    }
    app.client
        .request(
            Method::from_bytes(b"PURGE")?,
            format!("{}/healthz", app.address),
        )
        .send()
        .await?;
    app.client
        .get(format!("{}/healthz", app.address))
        .send()
        .await?;

    let exposition = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await?
        .text()
        .await?;
    let methods = method_labels(&exposition);
    let allowed: BTreeSet<String> = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
    ]
    .map(str::to_owned)
    .into();
    assert!(methods.is_subset(&allowed), "{methods:?}");
    assert!(methods.contains("other"), "{exposition}");
    assert!(methods.contains("GET"), "{exposition}");
    Ok(())
}
