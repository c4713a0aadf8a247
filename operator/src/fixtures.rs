//! A mocked API server for reconcile tests, in the style of kube-rs's controller-rs: the
//! client talks to a `tower-test` handle, and each test answers the requests it expects, in
//! order, inside a hard timeout.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use tower_test::mock::{Handle, SendResponse};

use crate::controller::sidecar::{Context, test_support::settings};
use crate::controller::{Capabilities, Shared};
use crate::metrics::Metrics;

/// The server side of the mocked client.
pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

/// One request the code under test made, waiting for its answer.
pub struct Exchange {
    /// GET, PATCH, POST, ...
    pub method: http::Method,
    /// The path without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The JSON body (`Null` when empty).
    pub body: serde_json::Value,
    respond: SendResponse<Response<Body>>,
}

impl Exchange {
    /// Answers with `code` and `body`.
    pub fn respond(self, code: u16, body: serde_json::Value) {
        let response = Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.respond.send_response(response);
    }

    /// Answers with the request body, as a server-side apply that changed nothing else would.
    pub fn echo(self) {
        let body = self.body.clone();
        self.respond(200, body);
    }

    /// `method path`, for assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

impl ApiServerVerifier {
    /// The next request.
    pub async fn next(&mut self) -> Exchange {
        let (request, respond) = self.0.next_request().await.expect("the client hung up");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        Exchange {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            body: if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
            respond,
        }
    }
}

/// A 404 Status body.
pub fn not_found() -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "not found", "reason": "NotFound", "code": 404
    })
}

/// A Status body for an error `code`.
pub fn failure(code: u16, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "reason": "Failure", "code": code
    })
}

/// A client over a mocked API server.
pub fn mock_client() -> (Client, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServerVerifier(handle))
}

impl Context {
    /// A sidecar controller context over a mocked API server.
    pub fn test(capabilities: Capabilities) -> (Arc<Self>, ApiServerVerifier) {
        let (client, verifier) = mock_client();
        let shared = Shared::new(
            client,
            "operator-0",
            Arc::new(Metrics::default()),
            capabilities,
        );
        (Arc::new(Self::new(shared, settings())), verifier)
    }
}

/// Fails the test if `future` takes longer than a second.
pub async fn timeout_after_1s<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(1), future)
        .await
        .expect("the scenario did not finish within 1 s")
}
