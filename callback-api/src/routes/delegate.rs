//! `POST /api/delegate`: Nubabel's `delegate_task` over HTTP. The request becomes a
//! `DelegatedTask` in the tenant's namespace; by default the request waits for the task to end
//! and answers like the seed's blocking `/delegate`.
//!
//! Callers present a tenant API token (`Authorization: Bearer nbt_...`, see `tokens.rs`); the
//! token fixes the organization and the namespace, so a token of A cannot create tasks for B.

use std::time::Duration;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, Client, ResourceExt, api::PostParams, runtime::wait::await_condition};
use nubabel_contract::{identity::OrganizationId, stream_token};
use nubabel_crds::v1alpha1::{
    DelegatedTask, DelegatedTaskSpec, MAX_PROMPT_BYTES, NotifySpec, OpencodeSidecar, TaskPhase,
};
use nubabel_store::{
    api_tokens::{self, TokenGrant},
    sessions::validate_nubabel_session_id,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::unix_now,
    error::{ApiError, ErrorBody},
    extract::ApiQuery,
    state::AppState,
};

/// Label naming what created a task (`delegate-api`, `slack`).
pub const CREATED_BY_LABEL: &str = "nubabel.io/created-by";
/// Label with the task's organization (when it is a valid label value).
pub const ORGANIZATION_LABEL: &str = "nubabel.io/organization";
/// Label with a digest of the task's session id (session ids need not be valid label values).
pub const SESSION_LABEL: &str = "nubabel.io/session-hash";
/// Header that makes a repeated request return the task the first one created.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Lifetime of the stream tokens handed out with a task (the most a stream token may have).
const STREAM_TOKEN_SECONDS: i64 = 3600;
/// Longest `category`, skill name or `userId` accepted.
const MAX_NAME_LEN: usize = 253;
/// Most skills in one request.
const MAX_SKILLS: usize = 64;

/// The delegate route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(delegate))
}

/// Body of `POST /api/delegate`, as the seed's `delegate_task` sends it.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DelegateRequest {
    /// The kind of work (e.g. `quick`, `deep`); the fleet's `categories` map it to a model, and
    /// a category the fleet does not list fails the task (`UnknownCategory`).
    #[serde(default)]
    pub category: Option<String>,
    /// Skills to load into the agent.
    #[serde(default)]
    pub load_skills: Option<Vec<String>>,
    /// What to ask the agent.
    pub prompt: String,
    /// The Nubabel session: the same id continues the same conversation. Without it, a new
    /// session id is made up and returned.
    #[serde(default)]
    pub session_id: Option<String>,
    /// The tenant; must be the token's.
    #[serde(rename = "organizationId")]
    pub organization_id: String,
    /// The Nubabel user who asked.
    #[serde(default, rename = "userId")]
    pub user_id: Option<String>,
    /// Free-form context (an object), passed on with the task.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
}

/// Query parameters of `POST /api/delegate`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DelegateQuery {
    /// Wait for the task to end (default `true`, as the seed's `/delegate`); `false` answers
    /// 202 at once.
    pub wait: Option<bool>,
    /// Longest wait in seconds (capped by the server's maximum, 900 by default); then the
    /// answer is 202 with the task's name and stream URL.
    pub timeout: Option<u64>,
}

/// The answer when the task has ended: the seed's delegate response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DelegateResult {
    /// The agent's final answer, or what went wrong.
    pub output: String,
    /// `success` or `failed` (failed, timed out or cancelled).
    pub status: String,
    /// Where and how the task ran.
    pub metadata: DelegateMetadata,
}

/// Metadata of an ended task.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegateMetadata {
    /// The model of the sidecar the task ran on.
    pub model: Option<String>,
    /// The OpenCode session on the sidecar pod.
    pub opencode_session_id: Option<String>,
    /// The Nubabel session (pass it as `session_id` to continue the conversation).
    pub nubabel_session_id: String,
    /// The DelegatedTask's name.
    pub task_name: String,
    /// Its namespace.
    pub namespace: String,
    /// The phase it ended in: Succeeded, Failed, Cancelled or TimedOut.
    pub phase: String,
    /// Why it did not succeed (a CamelCase reason), if it did not.
    pub error_reason: Option<String>,
}

/// The answer when the task is still running (not waiting, or the wait ran out).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegateAccepted {
    /// `accepted`.
    pub status: String,
    /// The DelegatedTask's name.
    pub task_name: String,
    /// Its namespace.
    pub namespace: String,
    /// The Nubabel session.
    pub nubabel_session_id: String,
    /// The task's phase when answering, if it has one yet.
    pub phase: Option<String>,
    /// The session's SSE stream (relative to this API); events appear once the task runs.
    pub stream_url: String,
    /// A stream token for that session, valid for an hour (`Authorization: Bearer` or
    /// `?access_token=`).
    pub stream_token: String,
}

/// Creates a DelegatedTask and (by default) waits for its answer.
#[utoipa::path(
    post,
    path = "/api/delegate",
    tag = "delegate",
    params(DelegateQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "Repeating a request with the same key returns the task the first one created"),
    ),
    request_body = DelegateRequest,
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The task ended (succeeded or not)", body = DelegateResult),
        (status = 202, description = "The task runs (not waiting, or the wait ran out)", body = DelegateAccepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API token", body = ErrorBody),
        (status = 403, description = "organizationId is not the token's organization", body = ErrorBody),
        (status = 404, description = "The delegate API is turned off on this server", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid (the message names it)", body = ErrorBody),
        (status = 503, description = "Postgres or Kubernetes unavailable", body = ErrorBody),
    )
)]
async fn delegate(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DelegateQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let grant = authenticate(&state, &headers).await?;
    let client = state
        .kube
        .clone()
        .map(|k| k.0)
        .ok_or(ApiError::NotConfigured(
            "the delegate API is turned off on this server",
        ))?;
    if !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let request: DelegateRequest = parse(&body)?;
    if request.organization_id != grant.organization_id {
        return Err(ApiError::Forbidden(
            "organizationId: the API token belongs to another organization".into(),
        ));
    }
    let new = validate(request)?;
    let idempotency_key = headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 255)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Idempotency-Key must be 1 to 255 visible characters".into(),
                    )
                })
        })
        .transpose()?;
    let mut task = build_task(&new, "delegate-", "delegate-api");
    if let Some(key) = idempotency_key {
        task.metadata.generate_name = None;
        task.metadata.name = Some(idempotent_name(&grant.organization_id, key));
    }
    let api: Api<DelegatedTask> = Api::namespaced(client.clone(), &grant.namespace);
    let task = create_or_reuse(&api, &task, &grant).await?;
    let name = task.name_any();
    let session_id = task.spec.session_id.clone().unwrap_or_default();
    tracing::info!(namespace = %grant.namespace, task = %name, organization = %grant.organization_id, "task created for /api/delegate");

    if !query.wait.unwrap_or(true) {
        return accepted(&state, &grant, &task);
    }
    // A tenant at its limit of waiting requests gets the task and its stream at once.
    let Ok(_waiting) = state.limits.delegate_waits.acquire(&grant.organization_id) else {
        return accepted(&state, &grant, &task);
    };
    let wait = query
        .timeout
        .map_or(state.settings.delegate_max_wait, Duration::from_secs)
        .min(state.settings.delegate_max_wait);
    let ended = tokio::time::timeout(
        wait,
        await_condition(api.clone(), &name, |task: Option<&DelegatedTask>| {
            task.is_none_or(|t| t.phase().is_finished())
        }),
    )
    .await;
    match ended {
        Err(_) => {
            let latest = api.get_opt(&name).await.ok().flatten().unwrap_or(task);
            accepted(&state, &grant, &latest)
        }
        Ok(Err(error)) => Err(ApiError::Unavailable(anyhow::anyhow!(
            "watching task {name}: {error}"
        ))),
        Ok(Ok(None)) => Err(ApiError::Unprocessable(format!(
            "task {name} was deleted before it ended"
        ))),
        Ok(Ok(Some(ended))) => {
            let result = result_of(&state, &client, &ended, session_id).await;
            Ok((StatusCode::OK, Json(result)).into_response())
        }
    }
}

/// The tenant of the request's API token.
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<TokenGrant, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("missing API token (Authorization: Bearer ...)".into())
    })?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::Unauthorized("authorization must be a Bearer token".into()))?;
    api_tokens::authenticate(&state.db, token)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("unknown or revoked API token".into()))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn parse(body: &[u8]) -> Result<DelegateRequest, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::Unprocessable(inner.to_string())
        } else {
            ApiError::Unprocessable(format!("{path}: {inner}"))
        }
    })
}

/// A validated request for a task: what [`build_task`] turns into a `DelegatedTask`.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    /// Where the task is created.
    pub namespace: String,
    /// The tenant.
    pub organization_id: String,
    /// Who asked.
    pub user_id: Option<String>,
    /// The conversation.
    pub session_id: String,
    /// What to ask.
    pub prompt: String,
    /// The kind of work.
    pub category: Option<String>,
    /// Skills to load.
    pub load_skills: Vec<String>,
    /// Free-form context.
    pub context: Option<Value>,
    /// Where to report.
    pub notify: Option<NotifySpec>,
}

fn validate(request: DelegateRequest) -> Result<NewTask, ApiError> {
    let invalid = |message: &str| ApiError::Unprocessable(message.to_owned());
    if request.prompt.trim().is_empty() {
        return Err(invalid("prompt: must not be empty"));
    }
    if request.prompt.len() > MAX_PROMPT_BYTES as usize {
        return Err(ApiError::Unprocessable(format!(
            "prompt: must be at most {MAX_PROMPT_BYTES} bytes"
        )));
    }
    OrganizationId::parse(&request.organization_id)
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let session_id = match request.session_id {
        Some(id) => {
            validate_nubabel_session_id("session_id", &id)
                .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
            id
        }
        None => format!("delegate-{}", uuid::Uuid::new_v4()),
    };
    let short = |field: &str, value: &str| {
        if value.is_empty() || value.len() > MAX_NAME_LEN || value.chars().any(char::is_control) {
            Err(ApiError::Unprocessable(format!(
                "{field}: must be 1 to {MAX_NAME_LEN} bytes without control characters"
            )))
        } else {
            Ok(())
        }
    };
    if let Some(category) = &request.category {
        short("category", category)?;
    }
    if let Some(user) = &request.user_id {
        short("userId", user)?;
    }
    let load_skills = request.load_skills.unwrap_or_default();
    if load_skills.len() > MAX_SKILLS {
        return Err(ApiError::Unprocessable(format!(
            "load_skills: at most {MAX_SKILLS} skills"
        )));
    }
    for (i, skill) in load_skills.iter().enumerate() {
        short(&format!("load_skills[{i}]"), skill)?;
    }
    match &request.context {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => return Err(invalid("context: must be an object")),
    }
    Ok(NewTask {
        namespace: String::new(),
        organization_id: request.organization_id,
        user_id: request.user_id,
        session_id,
        prompt: request.prompt,
        category: request.category,
        load_skills,
        context: request.context.filter(|c| !c.is_null()),
        notify: None,
    })
}

/// A label-safe digest of `value`.
fn label_digest(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn idempotent_name(organization_id: &str, key: &str) -> String {
    format!(
        "delegate-{}",
        label_digest(&format!("{organization_id}\0{key}"))
    )
}

fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric())
}

/// The `DelegatedTask` for `new`, named by the API server from `prefix`.
pub fn build_task(new: &NewTask, prefix: &str, created_by: &str) -> DelegatedTask {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(CREATED_BY_LABEL.to_owned(), created_by.to_owned());
    if is_label_value(&new.organization_id) {
        labels.insert(ORGANIZATION_LABEL.to_owned(), new.organization_id.clone());
    }
    labels.insert(SESSION_LABEL.to_owned(), label_digest(&new.session_id));
    let mut task = DelegatedTask::new(
        "",
        DelegatedTaskSpec {
            sidecar_ref: None,
            organization_id: new.organization_id.clone(),
            user_id: new.user_id.clone(),
            session_id: Some(new.session_id.clone()),
            prompt: new.prompt.clone(),
            category: new.category.clone(),
            load_skills: new.load_skills.clone(),
            agent: None,
            context: new.context.clone(),
            timeout_seconds: nubabel_crds::v1alpha1::DEFAULT_TIMEOUT_SECONDS,
            pending_timeout_seconds: None,
            cancel: false,
            ttl_seconds_after_finished: None,
            notify: new.notify.clone(),
            workspace: None,
        },
    );
    task.metadata = ObjectMeta {
        generate_name: Some(prefix.to_owned()),
        namespace: (!new.namespace.is_empty()).then(|| new.namespace.clone()),
        labels: Some(labels),
        ..ObjectMeta::default()
    };
    task
}

/// Creates `task`; with a fixed name that exists already, returns the existing task when it
/// belongs to the same organization.
async fn create_or_reuse(
    api: &Api<DelegatedTask>,
    task: &DelegatedTask,
    grant: &TokenGrant,
) -> Result<DelegatedTask, ApiError> {
    match api.create(&PostParams::default(), task).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let name = task.metadata.name.clone().unwrap_or_default();
            let existing = api.get(&name).await.map_err(kube_error)?;
            if existing.spec.organization_id != grant.organization_id {
                return Err(ApiError::Forbidden(
                    "Idempotency-Key: used by another organization".into(),
                ));
            }
            Ok(existing)
        }
        Err(error) => Err(kube_error(error)),
    }
}

/// Creates `task` through `client`.
pub async fn create_task(
    client: &Client,
    namespace: &str,
    task: &DelegatedTask,
) -> Result<DelegatedTask, ApiError> {
    Api::<DelegatedTask>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), task)
        .await
        .map_err(kube_error)
}

fn kube_error(error: kube::Error) -> ApiError {
    match error {
        // The API server's validation names the field (e.g. spec.prompt).
        kube::Error::Api(status) if status.code == 422 => ApiError::Unprocessable(status.message),
        kube::Error::Api(status) if status.code >= 500 => ApiError::Unavailable(anyhow::anyhow!(
            "kubernetes answered {}: {}",
            status.code,
            status.message
        )),
        kube::Error::Api(status) => ApiError::Internal(anyhow::anyhow!(
            "kubernetes answered {}: {}",
            status.code,
            status.message
        )),
        other => ApiError::Unavailable(anyhow::anyhow!("calling kubernetes: {other}")),
    }
}

/// The 202 answer for a running task.
fn accepted(
    state: &AppState,
    grant: &TokenGrant,
    task: &DelegatedTask,
) -> Result<Response, ApiError> {
    let session_id = task.spec.session_id.clone().unwrap_or_default();
    let organization = OrganizationId::parse(&grant.organization_id)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored token organization: {e}")))?;
    let token = stream_token::issue(
        &state.keys.stream_token,
        &organization,
        Some(&session_id),
        stream_token::Validity::starting_at(unix_now(), STREAM_TOKEN_SECONDS),
    );
    let body = DelegateAccepted {
        status: "accepted".into(),
        task_name: task.name_any(),
        namespace: grant.namespace.clone(),
        stream_url: format!("/api/sidecar/sessions/{}/stream", encode_path(&session_id)),
        nubabel_session_id: session_id,
        phase: task.reported_phase().map(|p| p.as_str().to_owned()),
        stream_token: token,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Percent-encodes a path segment (session ids may hold `:` or `/`).
fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The seed's answer for an ended task.
async fn result_of(
    state: &AppState,
    client: &Client,
    task: &DelegatedTask,
    session_id: String,
) -> DelegateResult {
    let status = task.status.clone().unwrap_or_default();
    let succeeded = status.phase == Some(TaskPhase::Succeeded);
    let full_output = match task.uid().and_then(|uid| uid.parse().ok()) {
        Some(uid) => nubabel_store::results::output(&state.db, uid)
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let output = if succeeded {
        full_output.or(status.output.clone()).unwrap_or_default()
    } else {
        status
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .or(full_output)
            .unwrap_or_else(|| "the task did not succeed".into())
    };
    let model = match (&status.sidecar, task.namespace()) {
        (Some(sidecar), Some(namespace)) => {
            Api::<OpencodeSidecar>::namespaced(client.clone(), &namespace)
                .get_opt(sidecar)
                .await
                .ok()
                .flatten()
                .map(|s| s.spec.model)
        }
        _ => None,
    };
    DelegateResult {
        output,
        status: if succeeded { "success" } else { "failed" }.into(),
        metadata: DelegateMetadata {
            model,
            opencode_session_id: status.opencode_session_id.clone(),
            nubabel_session_id: session_id,
            task_name: task.name_any(),
            namespace: task.namespace().unwrap_or_default(),
            phase: status
                .phase
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            error_reason: status.error.map(|e| e.reason),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> Result<NewTask, ApiError> {
        validate(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn the_seeds_request_body_becomes_a_task_spec() {
        let new = request(serde_json::json!({
            "category": "quick", "load_skills": ["git"], "prompt": "hi",
            "session_id": "s-1", "organizationId": "acme", "userId": "u-1",
            "context": {"channel": "web"}
        }))
        .unwrap();
        let task = build_task(
            &NewTask {
                namespace: "tenants".into(),
                ..new
            },
            "delegate-",
            "delegate-api",
        );
        assert_eq!(task.metadata.generate_name.as_deref(), Some("delegate-"));
        assert_eq!(task.metadata.namespace.as_deref(), Some("tenants"));
        let labels = task.metadata.labels.unwrap();
        assert_eq!(labels[ORGANIZATION_LABEL], "acme");
        assert_eq!(labels[SESSION_LABEL].len(), 40);
        assert_eq!(task.spec.session_id.as_deref(), Some("s-1"));
        assert_eq!(task.spec.load_skills, ["git"]);
        assert_eq!(task.spec.category.as_deref(), Some("quick"));
        assert_eq!(task.spec.user_id.as_deref(), Some("u-1"));
        assert_eq!(task.spec.context.unwrap()["channel"], "web");
    }

    #[test]
    fn bad_fields_are_named() {
        let message = |body: Value| request(body).unwrap_err().to_string();
        assert_eq!(
            message(serde_json::json!({"prompt": " ", "organizationId": "a"})),
            "prompt: must not be empty"
        );
        assert!(
            message(serde_json::json!({"prompt": "x", "organizationId": "a", "context": [1]}))
                .starts_with("context:")
        );
        assert!(
            message(serde_json::json!({"prompt": "x", "organizationId": "a", "session_id": ""}))
                .starts_with("session_id:")
        );
        assert!(
            message(serde_json::json!({"prompt": "x", "organizationId": "a", "load_skills": [""]}))
                .starts_with("load_skills[0]:")
        );
        assert!(
            message(serde_json::json!({"prompt": "x", "organizationId": "a b"}))
                .starts_with("organizationId:")
        );
    }

    #[test]
    fn missing_or_mistyped_fields_name_their_path() {
        let error = parse(br#"{"prompt": 3, "organizationId": "a"}"#).unwrap_err();
        assert!(
            matches!(&error, ApiError::Unprocessable(m) if m.starts_with("prompt:")),
            "{error}"
        );
        let error = parse(br#"{"organizationId": "a"}"#).unwrap_err();
        assert!(
            error.to_string().contains("missing field `prompt`"),
            "{error}"
        );
        assert!(matches!(parse(b"{nope"), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn a_session_id_without_one_is_made_up_and_stream_urls_encode_it() {
        let new = request(serde_json::json!({"prompt": "x", "organizationId": "a"})).unwrap();
        assert!(new.session_id.starts_with("delegate-"));
        assert_eq!(encode_path("slack:T1:C2:17.5"), "slack%3AT1%3AC2%3A17.5");
    }

    #[test]
    fn idempotent_names_differ_by_organization_and_are_valid_object_names() {
        let a = idempotent_name("acme", "k1");
        assert_eq!(a, idempotent_name("acme", "k1"));
        assert_ne!(a, idempotent_name("other", "k1"));
        assert!(nubabel_contract::identity::validate_object_name("name", &a).is_ok());
        assert!(!is_label_value("slack:T1"));
        assert!(is_label_value("org-a"));
    }
}
