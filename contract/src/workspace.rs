//! Workspaces: the directory each conversation works in on its pod, and what the operator asks
//! the pod's bridge to put there.
//!
//! The operator never builds a path inside a pod: it names a workspace by its key (derived from
//! the Nubabel session), sends what goes in it (Git repositories with their credentials, files)
//! in a signed request to the bridge, and gets back the directory the bridge made, which it then
//! hands to OpenCode as the session's project directory. The types here are that request and its
//! answers; the checks on paths and keys run on both sides.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The bridge route that prepares a workspace (`POST`, signed by the operator).
pub const PREPARE_PATH: &str = "/workspaces/prepare";
/// The bridge route that reports what changed in a workspace since a snapshot (`POST`, signed).
pub const CHANGES_PATH: &str = "/workspaces/changes";

/// Characters of a workspace key: hex of a SHA-256 prefix.
pub const KEY_LEN: usize = 32;
/// Longest relative path accepted inside a workspace, in bytes.
pub const MAX_PATH_BYTES: usize = 512;
/// Repositories one workspace may hold.
pub const MAX_REPOSITORIES: usize = 16;
/// Files one workspace request may carry.
pub const MAX_FILES: usize = 64;
/// Bytes of inline file content one request may carry in all.
pub const MAX_INLINE_BYTES: usize = 1024 * 1024;

/// The name of a conversation's workspace on its pod: hex of the first 16 bytes of
/// `SHA-256("nubabel-workspace/v1\0" + session id)`. Safe as a directory name whatever the
/// session id holds, and the same for every turn of the conversation.
pub fn workspace_key(session_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"nubabel-workspace/v1\0");
    hasher.update(session_id.as_bytes());
    hasher
        .finalize()
        .iter()
        .take(KEY_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `key` has the form [`workspace_key`] gives.
pub fn is_workspace_key(key: &str) -> bool {
    key.len() == KEY_LEN && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why a path cannot be used inside a workspace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Absolute paths name places outside the workspace.
    #[error("must be relative to the workspace, not absolute")]
    Absolute,
    /// `..` would leave the workspace.
    #[error("must not contain `..`")]
    ParentComponent,
    /// Git's own directory is not the agent's to write.
    #[error("must not name or enter a `.git` directory")]
    GitDirectory,
    /// Empty where a file is meant, too long, or with a NUL, a backslash or a control character.
    #[error("must be 1 to {MAX_PATH_BYTES} bytes without NUL, backslash or control characters")]
    Malformed,
}

/// A path inside a workspace, relative, normalized (no `.` components, no empty components),
/// that cannot leave it. The empty path is the workspace itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelativePath(String);

impl RelativePath {
    /// Checks and normalizes `value`: `./a//b/` becomes `a/b`, `.` and `` the workspace itself.
    pub fn parse(value: &str) -> Result<Self, PathError> {
        if value.len() > MAX_PATH_BYTES || value.chars().any(|c| c == '\\' || c.is_control()) {
            return Err(PathError::Malformed);
        }
        if value.starts_with('/') {
            return Err(PathError::Absolute);
        }
        let mut parts = Vec::new();
        for part in value.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(PathError::ParentComponent),
                ".git" => return Err(PathError::GitDirectory),
                other => parts.push(other),
            }
        }
        Ok(Self(parts.join("/")))
    }

    /// The normalized path; empty for the workspace itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the workspace itself.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `other` is this path or lies under it.
    pub fn contains(&self, other: &Self) -> bool {
        self.is_root()
            || other.0 == self.0
            || other
                .0
                .strip_prefix(&self.0)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl TryFrom<String> for RelativePath {
    type Error = PathError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<RelativePath> for String {
    fn from(path: RelativePath) -> Self {
        path.0
    }
}

impl fmt::Display for RelativePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// HTTPS credentials for one repository, sent only to the bridge that clones it and never
/// written to disk there.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitCredentials {
    /// The user (for a token, often anything non-empty, e.g. `x-access-token`).
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitCredentials")
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// One repository to clone into the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySource {
    /// `https://` or `http://` URL, without credentials.
    pub url: String,
    /// Branch, tag or commit; the remote's default branch when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Where in the workspace the checkout goes.
    pub path: RelativePath,
    /// Commits of history to fetch; all of it when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// Credentials, when the server asks for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<GitCredentials>,
}

/// One file to write into the workspace (instructions, `AGENTS.md`, fixtures).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileSource {
    /// Where the file goes.
    pub path: RelativePath,
    /// Its content.
    pub content: String,
}

/// The body of [`PREPARE_PATH`]: make workspace `key` hold these sources. A workspace that
/// exists is left as it is (the conversation's earlier turns changed it); only its directory and
/// state are returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareRequest {
    /// The workspace, as [`workspace_key`] names it.
    pub key: String,
    /// Repositories, cloned in order.
    #[serde(default)]
    pub repositories: Vec<RepositorySource>,
    /// Files, written after the repositories.
    #[serde(default)]
    pub files: Vec<FileSource>,
    /// Largest size the workspace may reach when prepared, in bytes; no limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// Why a workspace could not be prepared, as the bridge answers it (HTTP 422).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareFailure {
    /// `WorkspaceUnavailable` (a repository could not be fetched), `WorkspaceTooLarge`, or
    /// `InvalidWorkspace` (a request the bridge refuses).
    pub reason: String,
    /// What happened, naming the repository and the cause, never a credential.
    pub message: String,
}

/// One repository of a prepared workspace, as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryState {
    /// Where it is in the workspace.
    pub path: RelativePath,
    /// The commit checked out (`HEAD`).
    pub commit: String,
    /// The tree of the whole working copy, tracked and untracked files alike (ignored ones
    /// aside): the point [`CHANGES_PATH`] measures changes from.
    pub tree: String,
}

/// The answer of [`PREPARE_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedWorkspace {
    /// The workspace's absolute directory on the pod: OpenCode's project directory for the
    /// conversation.
    pub directory: String,
    /// Whether this request created it (false: an earlier turn did).
    pub created: bool,
    /// Its repositories, in the order they were cloned.
    pub repositories: Vec<RepositoryState>,
    /// Its size on disk, in bytes.
    pub bytes: u64,
}

/// The body of [`CHANGES_PATH`]: what changed in workspace `key` since these snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangesRequest {
    /// The workspace.
    pub key: String,
    /// The state of each repository the turn started from.
    pub since: Vec<RepositoryState>,
}

/// Lines added and removed in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileChange {
    /// The file, relative to its repository.
    pub path: String,
    /// Lines added (0 for a binary file).
    pub added: u64,
    /// Lines removed (0 for a binary file).
    pub removed: u64,
}

/// What changed in one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryChanges {
    /// The repository, and its state now.
    pub now: RepositoryState,
    /// The commit the turn started from.
    pub commit_before: String,
    /// Files changed, in path order.
    pub files: Vec<FileChange>,
    /// The whole change as a unified diff (binary files named, not included).
    pub patch: String,
}

/// The answer of [`CHANGES_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceChanges {
    /// Per repository, in the order asked.
    pub repositories: Vec<RepositoryChanges>,
    /// The workspace's size on disk now, in bytes.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_key_is_stable_per_session_and_a_safe_directory_name() {
        let key = workspace_key("conversation-1");
        assert_eq!(key, workspace_key("conversation-1"));
        assert_ne!(key, workspace_key("conversation-2"));
        assert!(is_workspace_key(&key), "{key}");
        assert!(is_workspace_key(&workspace_key("../../etc\0")));
        assert!(!is_workspace_key("../x"));
        assert!(!is_workspace_key(&key.to_uppercase()));
        assert!(!is_workspace_key(&key[1..]));
    }

    #[test]
    fn paths_are_normalized_and_never_leave_the_workspace() {
        let ok = |p: &str| RelativePath::parse(p).unwrap().as_str().to_owned();
        assert_eq!(ok("a/b"), "a/b");
        assert_eq!(ok("./a//b/"), "a/b");
        assert_eq!(ok("."), "");
        assert_eq!(ok(""), "");
        assert_eq!(ok("docs/AGENTS.md"), "docs/AGENTS.md");
        assert_eq!(ok("a/.gitignore"), "a/.gitignore");
        let err = |p: &str| RelativePath::parse(p).unwrap_err();
        assert_eq!(err("/etc/passwd"), PathError::Absolute);
        assert_eq!(err("../x"), PathError::ParentComponent);
        assert_eq!(err("a/../../x"), PathError::ParentComponent);
        assert_eq!(err("a/.git/config"), PathError::GitDirectory);
        assert_eq!(err(".git"), PathError::GitDirectory);
        assert_eq!(err("a\\..\\b"), PathError::Malformed);
        assert_eq!(err("a\0b"), PathError::Malformed);
        assert_eq!(err(&"a".repeat(MAX_PATH_BYTES + 1)), PathError::Malformed);
    }

    #[test]
    fn a_path_contains_itself_and_what_lies_under_it_only() {
        let p = |s: &str| RelativePath::parse(s).unwrap();
        assert!(p("a").contains(&p("a")));
        assert!(p("a").contains(&p("a/b")));
        assert!(!p("a").contains(&p("ab")));
        assert!(!p("a/b").contains(&p("a")));
        assert!(p(".").contains(&p("anything")));
    }

    #[test]
    fn a_path_refused_on_the_wire_fails_deserialization() {
        let parsed: Result<FileSource, _> =
            serde_json::from_str(r#"{"path": "../escape", "content": "x"}"#);
        assert!(parsed.is_err());
        let parsed: FileSource =
            serde_json::from_str(r#"{"path": "./notes.md", "content": "x"}"#).unwrap();
        assert_eq!(parsed.path.as_str(), "notes.md");
    }

    #[test]
    fn credentials_never_print() {
        let credentials = GitCredentials {
            username: "x-access-token".to_owned(),
            password: "s3cret-token".to_owned(),
        };
        let printed = format!("{credentials:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
    }
}
