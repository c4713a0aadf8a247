//! A conversation's workspace: what the task's spec asks for (pure: [`request`]), the
//! credentials read from the task's namespace, and the signed call that has the pod's bridge
//! prepare it. Credentials travel in that request's body only; nothing here logs or records
//! them.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, Client};
use nubabel_contract::identity::SidecarIdentity;
use nubabel_contract::signing::{MasterKey, RequestTarget, derive_sidecar_key, sign_request};
use nubabel_contract::workspace::{
    CHANGES_PATH, ChangesRequest, FileSource, GitCredentials, PREPARE_PATH, PrepareFailure,
    PrepareRequest, PreparedWorkspace, RelativePath, RepositorySource, RepositoryState,
    WorkspaceChanges, workspace_key,
};
use nubabel_crds::v1alpha1::{
    DelegatedTask, MAX_CHANGED_FILES_LISTED, OpencodeSidecar, RepositoryChangeStatus,
    RepositoryStatus, WorkspaceSpec, WorkspaceStatus,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::controller::fleet;
use crate::quantity::ParsedQuantity;

/// Failure reasons a workspace gives a task.
pub mod reasons {
    /// A repository or its credentials could not be had.
    pub const UNAVAILABLE: &str = "WorkspaceUnavailable";
    /// A path or URL of the spec cannot be used.
    pub const INVALID: &str = "InvalidWorkspace";
}

/// Secret keys of Git credentials.
pub const USERNAME_KEY: &str = "username";
/// Secret key of the Git password or token.
pub const PASSWORD_KEY: &str = "password";

/// Why the workspace could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// It never can, as asked: the task fails with this reason.
    #[error("{}: {}", .0.reason, .0.message)]
    Refused(PrepareFailure),
    /// The bridge could not be reached or answered out of turn: worth another try.
    #[error("the bridge of pod {pod} did not prepare the workspace: {message}")]
    Unreachable {
        /// The pod.
        pod: String,
        /// What happened.
        message: String,
    },
    /// Reading a Secret failed for another reason than its absence.
    #[error("reading Secret {name}: {source}")]
    ReadSecret {
        /// The Secret.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

fn refused(reason: &str, message: String) -> WorkspaceError {
    WorkspaceError::Refused(PrepareFailure {
        reason: reason.to_owned(),
        message,
    })
}

/// The bridge request for the task's conversation `session_id`, given the credentials read
/// from the Secrets the spec names (by Secret name).
pub fn request(
    task: &DelegatedTask,
    fleet: &OpencodeSidecar,
    session_id: &str,
    credentials: &BTreeMap<String, GitCredentials>,
) -> Result<PrepareRequest, WorkspaceError> {
    let spec = sources(task, fleet);
    let settings = fleet.spec.workspaces.clone().unwrap_or_default();
    let max_bytes = match &settings.size_limit {
        Some(limit) => Some(
            ParsedQuantity::parse(&limit.0)
                .map(|q| u64::try_from(q.whole_units()).unwrap_or(u64::MAX))
                .map_err(|e| {
                    refused(
                        reasons::INVALID,
                        format!("the sidecar's workspaces.sizeLimit: {e}"),
                    )
                })?,
        ),
        None => None,
    };
    let path = |what: &str, value: &str| {
        RelativePath::parse(value)
            .map_err(|error| refused(reasons::INVALID, format!("{what} path {value:?} {error}")))
    };
    let mut repositories = Vec::new();
    for repository in &spec.repositories {
        let at = path(
            &format!("repository {}", repository.url),
            repository.path.as_deref().unwrap_or("."),
        )?;
        let credentials = match &repository.credentials_secret_ref {
            Some(secret) => Some(credentials.get(&secret.name).cloned().ok_or_else(|| {
                refused(
                    reasons::UNAVAILABLE,
                    format!(
                        "repository {}: Secret {} does not exist or lacks the keys {USERNAME_KEY} and {PASSWORD_KEY}",
                        repository.url, secret.name
                    ),
                )
            })?),
            None => None,
        };
        repositories.push(RepositorySource {
            url: repository.url.clone(),
            git_ref: repository.git_ref.clone(),
            path: at,
            depth: repository.depth,
            credentials,
        });
    }
    let files = spec
        .files
        .iter()
        .map(|file| {
            Ok(FileSource {
                path: path("file", &file.path)?,
                content: file.content.clone(),
            })
        })
        .collect::<Result<Vec<_>, WorkspaceError>>()?;
    Ok(PrepareRequest {
        key: workspace_key(session_id),
        repositories,
        files,
        max_bytes,
    })
}

/// What the conversation's workspace holds: the task's own `spec.workspace`, or the fleet's
/// defaults.
pub fn sources(task: &DelegatedTask, fleet: &OpencodeSidecar) -> WorkspaceSpec {
    task.spec
        .workspace
        .clone()
        .or_else(|| {
            fleet
                .spec
                .workspaces
                .as_ref()
                .and_then(|w| w.defaults.clone())
        })
        .unwrap_or_default()
}

/// The workspace as the task's status records it.
pub fn status(prepared: &PreparedWorkspace) -> WorkspaceStatus {
    WorkspaceStatus {
        directory: prepared.directory.clone(),
        created: prepared.created,
        bytes: i64::try_from(prepared.bytes).unwrap_or(i64::MAX),
        repositories: prepared
            .repositories
            .iter()
            .map(|r| RepositoryStatus {
                path: r.path.to_string(),
                commit: r.commit.clone(),
                tree: r.tree.clone(),
            })
            .collect(),
        changes: Vec::new(),
    }
}

/// Reads the credentials Secrets the task's repositories name; an absent Secret (or one
/// without both keys) is left out, for [`request`] to refuse.
pub async fn read_credentials(
    client: &Client,
    task: &DelegatedTask,
    fleet: &OpencodeSidecar,
    namespace: &str,
) -> Result<BTreeMap<String, GitCredentials>, WorkspaceError> {
    let names: Vec<String> = sources(task, fleet)
        .repositories
        .iter()
        .filter_map(|r| r.credentials_secret_ref.as_ref())
        .map(|s| s.name.clone())
        .collect();
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let mut found = BTreeMap::new();
    for name in names {
        let secret = api
            .get_opt(&name)
            .await
            .map_err(|source| WorkspaceError::ReadSecret {
                name: name.clone(),
                source,
            })?;
        let mut data = secret.and_then(|s| s.data).unwrap_or_default();
        let value = |data: &mut BTreeMap<String, k8s_openapi::ByteString>, key: &str| {
            data.remove(key)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        };
        if let (Some(username), Some(password)) = (
            value(&mut data, USERNAME_KEY),
            value(&mut data, PASSWORD_KEY),
        ) {
            found.insert(name, GitCredentials { username, password });
        }
    }
    Ok(found)
}

/// Calls the bridges of fleet pods, signing as the operator with each fleet's key.
#[derive(Clone)]
pub struct Bridges {
    http: reqwest::Client,
    master: MasterKey,
}

impl Bridges {
    /// Bridges reached with this master key (the fleets' keys derive from it). Fails only when
    /// the HTTP client cannot be built.
    pub fn new(master: MasterKey) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            // A fetch may take minutes; the bridge bounds each one at five.
            .timeout(std::time::Duration::from_secs(330))
            .connect_timeout(std::time::Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http, master })
    }

    /// Has the bridge of `pod` (of fleet `identity`) prepare the workspace.
    pub async fn prepare(
        &self,
        identity: &SidecarIdentity,
        pod: &Pod,
        request: &PrepareRequest,
    ) -> Result<PreparedWorkspace, WorkspaceError> {
        self.call(identity, pod, PREPARE_PATH, &request.key, request)
            .await
    }

    /// Asks the bridge of `pod` what changed in the workspace since the given states.
    pub async fn changes(
        &self,
        identity: &SidecarIdentity,
        pod: &Pod,
        request: &ChangesRequest,
    ) -> Result<WorkspaceChanges, WorkspaceError> {
        self.call(identity, pod, CHANGES_PATH, &request.key, request)
            .await
    }

    /// One signed `POST` of `body` to `path` on the bridge of `pod`.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        identity: &SidecarIdentity,
        pod: &Pod,
        path: &str,
        key: &str,
        body: &B,
    ) -> Result<T, WorkspaceError> {
        let pod_name = kube::ResourceExt::name_any(pod);
        let unreachable = |message: String| WorkspaceError::Unreachable {
            pod: pod_name.clone(),
            message,
        };
        let base = fleet::bridge_url(pod).ok_or_else(|| unreachable("no pod IP".to_owned()))?;
        let body = serde_json::to_vec(body).map_err(|e| unreachable(e.to_string()))?;
        let signing_key = derive_sidecar_key(&self.master, identity);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let id = format!("ws-{key}-{now}");
        let signature = sign_request(&signing_key, &id, now, RequestTarget::post(path), &body);
        let response = self
            .http
            .post(format!("{base}{path}"))
            .header("webhook-id", id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        match status.as_u16() {
            200 => serde_json::from_str(&text).map_err(|e| unreachable(e.to_string())),
            422 => Err(WorkspaceError::Refused(
                serde_json::from_str(&text).map_err(|e| unreachable(e.to_string()))?,
            )),
            400 => Err(refused(reasons::INVALID, text)),
            other => Err(unreachable(format!(
                "HTTP {other}: {}",
                text.chars().take(300).collect::<String>()
            ))),
        }
    }
}

/// The states a turn started from, as the bridge takes them back; `None` when the status
/// records no repository (or one whose path no longer parses).
pub fn since(status: &WorkspaceStatus) -> Option<Vec<RepositoryState>> {
    if status.repositories.is_empty() {
        return None;
    }
    status
        .repositories
        .iter()
        .map(|r| {
            Some(RepositoryState {
                path: RelativePath::parse(&r.path).ok()?,
                commit: r.commit.clone(),
                tree: r.tree.clone(),
            })
        })
        .collect()
}

/// The bounded summary of a turn's changes that the task's status shows.
pub fn change_summary(changes: &WorkspaceChanges) -> Vec<RepositoryChangeStatus> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    changes
        .repositories
        .iter()
        .map(|r| RepositoryChangeStatus {
            path: r.now.path.to_string(),
            commit_before: r.commit_before.clone(),
            commit_after: r.now.commit.clone(),
            files_changed: count(r.files.len() as u64),
            lines_added: count(r.files.iter().map(|f| f.added).sum()),
            lines_removed: count(r.files.iter().map(|f| f.removed).sum()),
            files: r
                .files
                .iter()
                .take(MAX_CHANGED_FILES_LISTED)
                .map(|f| f.path.clone())
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(workspace: serde_json::Value) -> DelegatedTask {
        DelegatedTask::new(
            "t",
            serde_json::from_value(serde_json::json!({
                "organizationId": "o", "prompt": "p", "workspace": workspace
            }))
            .unwrap(),
        )
    }

    fn fleet(workspaces: serde_json::Value) -> OpencodeSidecar {
        OpencodeSidecar::new(
            "fleet",
            serde_json::from_value(serde_json::json!({
                "organizationId": "o", "model": "a/b", "workspaces": workspaces
            }))
            .unwrap(),
        )
    }

    fn credentials() -> BTreeMap<String, GitCredentials> {
        BTreeMap::from([(
            "git".to_owned(),
            GitCredentials {
                username: "u".to_owned(),
                password: "p".to_owned(),
            },
        )])
    }

    #[test]
    fn the_spec_becomes_a_request_with_the_credentials_of_the_named_secret() {
        let t = task(serde_json::json!({
            "repositories": [{"url": "https://h/r.git", "ref": "v1", "path": "./r", "depth": 1,
                              "credentialsSecretRef": {"name": "git"}}],
            "files": [{"path": "AGENTS.md", "content": "x"}]
        }));
        let r = request(&t, &fleet(serde_json::json!({})), "conv", &credentials()).unwrap();
        assert_eq!(r.key, workspace_key("conv"));
        assert_eq!(r.repositories[0].path.as_str(), "r");
        assert_eq!(r.repositories[0].git_ref.as_deref(), Some("v1"));
        assert_eq!(r.repositories[0].credentials, credentials().remove("git"));
        assert_eq!(r.files[0].path.as_str(), "AGENTS.md");
        let empty = request(
            &task(serde_json::json!(null)),
            &fleet(serde_json::json!({})),
            "conv",
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(empty.repositories.is_empty() && empty.files.is_empty());
        assert_eq!(empty.max_bytes, None);
    }

    #[test]
    fn the_fleet_gives_the_size_limit_and_the_sources_of_a_task_that_names_none() {
        let limited = fleet(serde_json::json!({
            "sizeLimit": "1Mi",
            "defaults": {"files": [{"path": "AGENTS.md", "content": "fleet-wide"}]}
        }));
        let r = request(
            &task(serde_json::json!(null)),
            &limited,
            "c",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(r.max_bytes, Some(1024 * 1024));
        assert_eq!(r.files[0].content, "fleet-wide");
        let own = task(serde_json::json!({"files": [{"path": "x.md", "content": "own"}]}));
        let r = request(&own, &limited, "c", &BTreeMap::new()).unwrap();
        assert_eq!(r.files.len(), 1);
        assert_eq!(
            r.files[0].content, "own",
            "the task's own workspace wins whole"
        );
    }

    #[test]
    fn a_change_summary_counts_every_file_and_names_the_first_twenty() {
        use nubabel_contract::workspace::{FileChange, RepositoryChanges};
        let files = (0..25)
            .map(|i| FileChange {
                path: format!("f{i:02}"),
                added: 2,
                removed: 1,
            })
            .collect();
        let changes = WorkspaceChanges {
            repositories: vec![RepositoryChanges {
                now: RepositoryState {
                    path: RelativePath::parse("billing").unwrap(),
                    commit: "after".to_owned(),
                    tree: "t2".to_owned(),
                },
                commit_before: "before".to_owned(),
                files,
                patch: String::new(),
            }],
            bytes: 0,
        };
        let summary = change_summary(&changes);
        assert_eq!(summary[0].files_changed, 25);
        assert_eq!((summary[0].lines_added, summary[0].lines_removed), (50, 25));
        assert_eq!(summary[0].files.len(), MAX_CHANGED_FILES_LISTED);
        assert_eq!(
            (
                summary[0].commit_before.as_str(),
                summary[0].commit_after.as_str()
            ),
            ("before", "after")
        );
        assert_eq!(summary[0].path, "billing");
    }

    #[test]
    fn an_escaping_path_or_a_missing_secret_is_refused_with_a_reason() {
        let escaping = task(serde_json::json!({"files": [{"path": "../x", "content": ""}]}));
        let Err(WorkspaceError::Refused(f)) = request(
            &escaping,
            &fleet(serde_json::json!({})),
            "c",
            &BTreeMap::new(),
        ) else {
            panic!("accepted");
        };
        assert_eq!(f.reason, reasons::INVALID);
        assert!(f.message.contains(".."), "{}", f.message);
        let missing = task(serde_json::json!({"repositories": [
            {"url": "https://h/r.git", "credentialsSecretRef": {"name": "nope"}}]}));
        let Err(WorkspaceError::Refused(f)) =
            request(&missing, &fleet(serde_json::json!({})), "c", &credentials())
        else {
            panic!("accepted");
        };
        assert_eq!(f.reason, reasons::UNAVAILABLE);
        assert!(f.message.contains("nope") && f.message.contains("https://h/r.git"));
    }
}
