//! Workspaces against a real Git server that requires credentials (`git http-backend` behind
//! Basic auth): what a prepared workspace holds, what never reaches its disk, what changed in
//! it, and how each bad input ends. The routes are driven over HTTP with the operator's
//! signature.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nubabel_bridge::workspace::Workspaces;
use nubabel_bridge::workspace::routes::{WorkspaceState, router};
use nubabel_contract::signing::{RequestTarget, SidecarKey, sign_request};
use nubabel_contract::workspace::{
    CHANGES_PATH, ChangesRequest, FileSource, GitCredentials, PREPARE_PATH, PrepareFailure,
    PrepareRequest, PreparedWorkspace, RelativePath, RepositorySource, WorkspaceChanges,
    workspace_key,
};
use nubabel_e2e::git_server::{GitServer, Login};
use nubabel_e2e::within;
use serde::Serialize;
use serde::de::DeserializeOwned;
use support::sidecar_key;

#[allow(dead_code)]
mod support;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const TOKEN: &str = "tok-s3cret-4f9a";

struct Fixture {
    server: GitServer,
    bridge: String,
    http: reqwest::Client,
    key: SidecarKey,
    first: String,
    _dirs: tempfile::TempDir,
    root: std::path::PathBuf,
}

async fn fixture() -> Fixture {
    let server = GitServer::start_on(
        std::net::Ipv4Addr::LOCALHOST.into(),
        Login {
            username: "x-access-token".to_owned(),
            password: TOKEN.to_owned(),
        },
    )
    .unwrap();
    let commits = server
        .create_repository(
            "billing",
            &[
                BTreeMap::from([("README.md", "billing v1\n"), ("src/tax.txt", "rate 10\n")]),
                BTreeMap::from([("README.md", "billing v2\n")]),
            ],
        )
        .unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("workspaces");
    let key = sidecar_key();
    let app = router(WorkspaceState {
        workspaces: Arc::new(Workspaces::new(root.clone(), dirs.path().join("state"))),
        key: key.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bridge = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Fixture {
        server,
        bridge,
        http: reqwest::Client::new(),
        key,
        first: commits[0].clone(),
        _dirs: dirs,
        root,
    }
}

fn credentials(password: &str) -> Option<GitCredentials> {
    Some(GitCredentials {
        username: "x-access-token".to_owned(),
        password: password.to_owned(),
    })
}

impl Fixture {
    fn repository(&self, git_ref: Option<&str>, password: &str) -> RepositorySource {
        RepositorySource {
            url: self.server.url("billing"),
            git_ref: git_ref.map(str::to_owned),
            path: RelativePath::parse("billing").unwrap(),
            depth: Some(1),
            credentials: credentials(password),
        }
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, (u16, String)> {
        let body = serde_json::to_vec(body).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let id = format!("op-{}", rand_id());
        let signature = sign_request(&self.key, &id, now, RequestTarget::post(path), &body);
        let response = self
            .http
            .post(format!("{}{path}", self.bridge))
            .header("webhook-id", id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        if status == 200 {
            Ok(serde_json::from_str(&text).unwrap())
        } else {
            Err((status, text))
        }
    }

    async fn prepare(&self, request: &PrepareRequest) -> Result<PreparedWorkspace, PrepareFailure> {
        self.call(PREPARE_PATH, request)
            .await
            .map_err(|(status, text)| {
                assert_eq!(status, 422, "{text}");
                serde_json::from_str(&text).unwrap()
            })
    }
}

fn rand_id() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn request(session: &str, repositories: Vec<RepositorySource>) -> PrepareRequest {
    PrepareRequest {
        key: workspace_key(session),
        repositories,
        files: Vec::new(),
        max_bytes: None,
    }
}

/// Every file under `dir`, as text, for greps.
fn all_text(dir: &Path) -> String {
    let mut text = String::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(next).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else if let Ok(bytes) = std::fs::read(entry.path()) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    text
}

#[tokio::test]
async fn a_workspace_holds_the_repository_at_its_commit_with_no_credential_on_disk() {
    within(TEST_TIMEOUT, "preparing a workspace", async {
        let f = fixture().await;
        let mut req = request("conv-1", vec![f.repository(Some(&f.first), TOKEN)]);
        req.files.push(FileSource {
            path: RelativePath::parse("AGENTS.md").unwrap(),
            content: "Run the tests before you answer.\n".to_owned(),
        });
        let prepared = f.prepare(&req).await.unwrap();
        assert!(prepared.created);
        let dir = Path::new(&prepared.directory);
        assert_eq!(dir, f.root.join(workspace_key("conv-1")));
        assert_eq!(
            std::fs::read_to_string(dir.join("billing/README.md")).unwrap(),
            "billing v1\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("AGENTS.md")).unwrap(),
            "Run the tests before you answer.\n"
        );
        assert_eq!(prepared.repositories[0].commit, f.first);
        assert!(prepared.bytes > 0);

        // The server saw the credential; the workspace and the private copies never hold it.
        assert!(f.server.authorizations().iter().any(Option::is_some));
        let on_disk = all_text(f.root.parent().unwrap());
        assert!(!on_disk.contains(TOKEN), "the token reached the disk");
        let config = std::fs::read_to_string(dir.join("billing/.git/config")).unwrap();
        assert!(config.contains(&f.server.url("billing")), "{config}");

        // Another conversation's workspace is another directory.
        let other = f
            .prepare(&request("conv-2", vec![f.repository(Some("main"), TOKEN)]))
            .await
            .unwrap();
        assert_ne!(other.directory, prepared.directory);
        // `depth: 1` fetched one commit of the two on main.
        let history = std::process::Command::new("git")
            .args(["rev-list", "--count", "HEAD"])
            .current_dir(Path::new(&other.directory).join("billing"))
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&history.stdout).trim(),
            "1",
            "{}",
            String::from_utf8_lossy(&history.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(Path::new(&other.directory).join("billing/README.md")).unwrap(),
            "billing v2\n"
        );
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_turns_changes_are_measured_and_the_next_turn_finds_the_workspace_as_it_was_left() {
    within(TEST_TIMEOUT, "measuring changes", async {
        let f = fixture().await;
        let req = request("conv-1", vec![f.repository(None, TOKEN)]);
        let prepared = f.prepare(&req).await.unwrap();
        let dir = Path::new(&prepared.directory).join("billing");
        std::fs::write(dir.join("src/tax.txt"), "rate 12\nround up\n").unwrap();
        std::fs::write(dir.join("NOTES.md"), "new\n").unwrap();

        let changes: WorkspaceChanges = f
            .call(
                CHANGES_PATH,
                &ChangesRequest {
                    key: req.key.clone(),
                    since: prepared.repositories.clone(),
                },
            )
            .await
            .unwrap();
        let repo = &changes.repositories[0];
        let files: Vec<(&str, u64, u64)> = repo
            .files
            .iter()
            .map(|c| (c.path.as_str(), c.added, c.removed))
            .collect();
        assert_eq!(files, vec![("NOTES.md", 1, 0), ("src/tax.txt", 2, 1)]);
        assert!(repo.patch.contains("+round up"), "{}", repo.patch);
        assert_eq!(repo.commit_before, prepared.repositories[0].commit);
        assert_ne!(repo.now.tree, prepared.repositories[0].tree);

        // The next turn (whose request names no repository): the same workspace, edits
        // kept, nothing cloned again, its repository reported from where the turn left it.
        let again = f.prepare(&request("conv-1", Vec::new())).await.unwrap();
        assert!(!again.created);
        assert_eq!(again.directory, prepared.directory);
        assert_eq!(
            std::fs::read_to_string(dir.join("src/tax.txt")).unwrap(),
            "rate 12\nround up\n"
        );
        assert_eq!(again.repositories[0].tree, repo.now.tree);
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_inputs_fail_with_a_reason_that_names_the_repository_but_never_the_credential() {
    within(TEST_TIMEOUT, "refusing bad inputs", async {
        let f = fixture().await;
        let wrong = f
            .prepare(&request("a", vec![f.repository(None, "wrong-password")]))
            .await
            .unwrap_err();
        assert_eq!(wrong.reason, "WorkspaceUnavailable");
        assert!(
            wrong.message.contains(&f.server.url("billing")),
            "{}",
            wrong.message
        );
        assert!(
            !wrong.message.contains("wrong-password"),
            "{}",
            wrong.message
        );

        let missing = f
            .prepare(&request(
                "b",
                vec![f.repository(Some("no-such-branch"), TOKEN)],
            ))
            .await
            .unwrap_err();
        assert_eq!(missing.reason, "WorkspaceUnavailable");
        assert!(
            missing.message.contains("no-such-branch"),
            "{}",
            missing.message
        );

        let mut unreachable = f.repository(None, TOKEN);
        unreachable.url = "http://127.0.0.1:9/nothing.git".to_owned();
        let refused = f
            .prepare(&request("c", vec![unreachable]))
            .await
            .unwrap_err();
        assert_eq!(refused.reason, "WorkspaceUnavailable");

        let mut too_small = request("d", vec![f.repository(None, TOKEN)]);
        too_small.max_bytes = Some(10);
        let large = f.prepare(&too_small).await.unwrap_err();
        assert_eq!(large.reason, "WorkspaceTooLarge");
        assert!(!f.root.join(workspace_key("d")).exists());

        // Failed preparations leave nothing behind.
        for session in ["a", "b", "c", "d"] {
            assert!(!f.root.join(workspace_key(session)).exists(), "{session}");
        }
        let escaping = serde_json::json!({
            "key": workspace_key("e"),
            "files": [{"path": "../outside", "content": "x"}],
        });
        let (status, _) = f
            .call::<_, serde_json::Value>(PREPARE_PATH, &escaping)
            .await
            .unwrap_err();
        assert_eq!(status, 400);
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_idle_workspace_is_removed_unless_its_sessions_are_busy() {
    within(TEST_TIMEOUT, "sweeping idle workspaces", async {
        let dirs = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::new(dirs.path().join("ws"), dirs.path().join("state"));
        let with_file = |session: &str| PrepareRequest {
            files: vec![FileSource {
                path: RelativePath::parse("notes.md").unwrap(),
                content: "x".to_owned(),
            }],
            ..request(session, Vec::new())
        };
        let idle = workspaces.prepare(&with_file("idle")).await.unwrap();
        let busy = workspaces.prepare(&with_file("busy")).await.unwrap();
        for key in ["idle", "busy"] {
            workspaces.touch(&workspace_key(key));
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let recent = workspaces.prepare(&with_file("recent")).await.unwrap();
        workspaces.touch(&workspace_key("recent"));

        let busy_dir = std::path::PathBuf::from(&busy.directory);
        let sweep = workspaces
            .sweep(Duration::from_secs(1), |dir| {
                let busy = dir == busy_dir;
                async move { busy }
            })
            .await;
        assert_eq!((sweep.kept, sweep.removed), (2, 1), "{sweep:?}");
        assert_eq!(sweep.bytes, 2, "the two kept notes");
        assert!(!Path::new(&idle.directory).exists());
        assert!(Path::new(&busy.directory).exists());
        assert!(Path::new(&recent.directory).exists());
        // A later turn of the removed conversation starts afresh.
        assert!(
            workspaces
                .prepare(&with_file("idle"))
                .await
                .unwrap()
                .created
        );
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unsigned_or_wrongly_signed_request_is_refused() {
    within(TEST_TIMEOUT, "refusing unsigned requests", async {
        let f = fixture().await;
        let body = serde_json::to_vec(&request("x", Vec::new())).unwrap();
        let unsigned = f
            .http
            .post(format!("{}{PREPARE_PATH}", f.bridge))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(unsigned.status(), 401);
        // Signed for another route: the signature covers the path.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let signature = sign_request(
            &f.key,
            "op-1",
            now,
            RequestTarget::post(CHANGES_PATH),
            &body,
        );
        let misrouted = f
            .http
            .post(format!("{}{PREPARE_PATH}", f.bridge))
            .header("webhook-id", "op-1")
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(misrouted.status(), 401);
        assert!(!f.root.join(workspace_key("x")).exists());
        Ok(())
    })
    .await
    .unwrap();
}
