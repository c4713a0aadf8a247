//! Conversations' workspaces on this pod: a directory per workspace key under the workspaces
//! root (on the data volume OpenCode shares), with the repositories and files the operator
//! asks for.
//!
//! Each repository is fetched into a private bare repository under the state directory (a
//! directory of the data volume only the bridge mounts), and checked out from there into the workspace, where the
//! agent gets a `.git` of its own with the remote's URL and no credential. The private copy's
//! configuration is the bridge's alone, so measuring what the agent changed (a tree of the
//! whole working copy, compared with the one the turn started from) never runs anything the
//! agent could have configured. A workspace is built under a temporary name and renamed into
//! place, so a half-prepared one is never seen and two requests for one key race harmlessly.

pub mod git;
pub mod routes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nubabel_contract::workspace::{
    ChangesRequest, FileChange, FileSource, PrepareFailure, PrepareRequest, PreparedWorkspace,
    RelativePath, RepositoryChanges, RepositorySource, RepositoryState, WorkspaceChanges,
    is_workspace_key, workspace_key,
};

use self::git::{GitError, Invocation, line, run};

/// Bound on fetching one repository.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on each local git step (checkout, snapshot, diff).
const LOCAL_TIMEOUT: Duration = Duration::from_secs(120);
/// The file in a workspace's private state whose modification time is its last use.
const LAST_USED_FILE: &str = "last-used";
/// The file in a workspace's private state listing its repositories' paths.
const REPOSITORIES_FILE: &str = "repositories.json";
/// Largest patch returned, in bytes; a longer one is cut and says so.
const MAX_PATCH_BYTES: usize = 4 * 1024 * 1024;

/// Failure reasons, as the task's status shows them.
pub mod reasons {
    /// A repository could not be fetched or checked out.
    pub const UNAVAILABLE: &str = "WorkspaceUnavailable";
    /// The workspace is larger than the fleet allows.
    pub const TOO_LARGE: &str = "WorkspaceTooLarge";
    /// The request itself cannot be carried out (overlapping paths, a symlink in the way).
    pub const INVALID: &str = "InvalidWorkspace";
}

/// What an idle sweep left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Workspaces kept.
    pub kept: u64,
    /// Workspaces removed.
    pub removed: u64,
    /// Bytes the kept ones hold.
    pub bytes: u64,
}

/// Where workspaces and the bridge's private copies of their repositories live.
#[derive(Debug, Clone)]
pub struct Workspaces {
    /// The workspaces, one directory per key.
    root: PathBuf,
    /// The private bare repositories, one directory per key.
    state: PathBuf,
}

fn failure(reason: &str, message: impl Into<String>) -> PrepareFailure {
    PrepareFailure {
        reason: reason.to_owned(),
        message: message.into(),
    }
}

impl Workspaces {
    /// Workspaces under `root`, private repositories under `state`.
    pub fn new(root: PathBuf, state: PathBuf) -> Self {
        Self { root, state }
    }

    fn directory(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn private_repository(state: &Path, path: &RelativePath) -> PathBuf {
        state.join(format!("{}.git", &workspace_key(path.as_str())[..16]))
    }

    /// Makes workspace `request.key` hold what the request names, or, when it exists, leaves
    /// it as it is; returns its directory and the state each repository is in now.
    pub async fn prepare(
        &self,
        request: &PrepareRequest,
    ) -> Result<PreparedWorkspace, PrepareFailure> {
        check_request(request)?;
        let directory = self.directory(&request.key);
        let state = self.state.join(&request.key);
        if !directory.exists() {
            self.create(request, &directory, &state).await?;
        } else {
            return existing(directory, &state, false).await;
        }
        existing(directory, &state, true).await
    }

    async fn create(
        &self,
        request: &PrepareRequest,
        directory: &Path,
        state: &Path,
    ) -> Result<(), PrepareFailure> {
        let nonce = format!("{:016x}", crate::random::u64());
        let partial = self.root.join(format!(".{}.{nonce}.partial", request.key));
        let partial_state = self.state.join(format!(".{}.{nonce}.partial", request.key));
        let built = self.build(request, &partial, &partial_state).await;
        let placed = match built {
            Ok(()) => place(&partial, directory, &partial_state, state),
            Err(failure) => Err(failure),
        };
        if placed.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
            let _ = std::fs::remove_dir_all(&partial_state);
        }
        placed
    }

    async fn build(
        &self,
        request: &PrepareRequest,
        directory: &Path,
        state: &Path,
    ) -> Result<(), PrepareFailure> {
        for dir in [directory, state] {
            std::fs::create_dir_all(dir).map_err(|e| {
                failure(
                    reasons::UNAVAILABLE,
                    format!("creating the workspace failed: {e}"),
                )
            })?;
        }
        for repository in &request.repositories {
            clone(repository, directory, state).await?;
            check_size(directory, request.max_bytes)?;
        }
        let paths: Vec<&RelativePath> = request.repositories.iter().map(|r| &r.path).collect();
        let listing = serde_json::to_vec(&paths).unwrap_or_default();
        std::fs::write(state.join(REPOSITORIES_FILE), listing).map_err(|e| {
            failure(
                reasons::UNAVAILABLE,
                format!("recording the workspace failed: {e}"),
            )
        })?;
        for file in &request.files {
            write_file(directory, file)?;
        }
        check_size(directory, request.max_bytes)
    }

    /// Records that workspace `key` was used now; its idle time counts from here.
    pub fn touch(&self, key: &str) {
        let state = self.state.join(key);
        if state.exists() {
            let _ = std::fs::write(state.join(LAST_USED_FILE), b"");
        }
    }

    /// Removes every workspace unused for longer than `idle_ttl` whose sessions `is_busy` does
    /// not report busy (it gets the workspace's directory); returns what is left.
    pub async fn sweep<F, Fut>(&self, idle_ttl: Duration, is_busy: F) -> Sweep
    where
        F: Fn(PathBuf) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut sweep = Sweep::default();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return sweep;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_workspace_key(&name) {
                continue;
            }
            let state = self.state.join(&name);
            let last_used = std::fs::metadata(state.join(LAST_USED_FILE))
                .or_else(|_| std::fs::metadata(entry.path()))
                .and_then(|m| m.modified())
                .ok();
            let idle = last_used
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|idle| idle > idle_ttl);
            if idle && !is_busy(entry.path()).await {
                let removed = std::fs::remove_dir_all(entry.path()).is_ok();
                let _ = std::fs::remove_dir_all(&state);
                if removed {
                    tracing::info!(key = name, "removed an idle workspace");
                    sweep.removed += 1;
                    continue;
                }
            }
            sweep.kept += 1;
            sweep.bytes += disk_usage(&entry.path());
        }
        sweep
    }

    /// What changed in each repository of workspace `request.key` since the given states.
    pub async fn changes(
        &self,
        request: &ChangesRequest,
    ) -> Result<WorkspaceChanges, PrepareFailure> {
        if !is_workspace_key(&request.key) {
            return Err(failure(reasons::INVALID, "malformed workspace key"));
        }
        let directory = self.directory(&request.key);
        let state = self.state.join(&request.key);
        if !directory.exists() {
            return Err(failure(reasons::UNAVAILABLE, "the workspace is gone"));
        }
        let mut repositories = Vec::new();
        for since in &request.since {
            let private = Self::private_repository(&state, &since.path);
            let now = snapshot(&private, &directory, &since.path).await?;
            repositories.push(compare(&private, since, now).await?);
        }
        Ok(WorkspaceChanges {
            repositories,
            bytes: disk_usage(&directory),
        })
    }
}

/// A prepared workspace as it is now.
async fn existing(
    directory: PathBuf,
    state: &Path,
    created: bool,
) -> Result<PreparedWorkspace, PrepareFailure> {
    // The repositories it was made with: a later turn's request is not read, so a
    // conversation's workspace never changes under it between turns.
    let mut repositories = Vec::new();
    for path in recorded_repositories(state) {
        let private = Workspaces::private_repository(state, &path);
        repositories.push(snapshot(&private, &directory, &path).await?);
    }
    Ok(PreparedWorkspace {
        directory: directory.to_string_lossy().into_owned(),
        created,
        repositories,
        bytes: disk_usage(&directory),
    })
}

/// Refuses what cannot be carried out, before anything is written.
fn check_request(request: &PrepareRequest) -> Result<(), PrepareFailure> {
    if !is_workspace_key(&request.key) {
        return Err(failure(reasons::INVALID, "malformed workspace key"));
    }
    let paths: Vec<&RelativePath> = request.repositories.iter().map(|r| &r.path).collect();
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            if a.contains(b) || b.contains(a) {
                return Err(failure(
                    reasons::INVALID,
                    format!("repositories at {a} and {b} overlap"),
                ));
            }
        }
    }
    for repository in &request.repositories {
        let url = repository.url.as_str();
        let Some((_, rest)) = url
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "https" | "http"))
        else {
            return Err(failure(
                reasons::INVALID,
                format!("repository {url}: only http(s) URLs are cloned"),
            ));
        };
        if rest
            .split('/')
            .next()
            .is_some_and(|host| host.contains('@'))
        {
            return Err(failure(
                reasons::INVALID,
                "a repository URL must not carry credentials; name a Secret instead",
            ));
        }
        if let Some(git_ref) = &repository.git_ref
            && (git_ref.starts_with('-')
                || git_ref.contains(char::is_whitespace)
                || git_ref.is_empty())
        {
            return Err(failure(
                reasons::INVALID,
                format!("repository {url}: ref {git_ref:?} is not a branch, tag or commit"),
            ));
        }
    }
    Ok(())
}

fn place(
    partial: &Path,
    directory: &Path,
    partial_state: &Path,
    state: &Path,
) -> Result<(), PrepareFailure> {
    // The state first: a workspace in place always has its private copies.
    let _ = std::fs::remove_dir_all(state);
    std::fs::rename(partial_state, state)
        .map_err(|e| failure(reasons::UNAVAILABLE, format!("placing the workspace: {e}")))?;
    match std::fs::rename(partial, directory) {
        Ok(()) => Ok(()),
        // Another request for the same key placed it first; theirs stands.
        Err(_) if directory.exists() => {
            let _ = std::fs::remove_dir_all(partial);
            Ok(())
        }
        Err(e) => Err(failure(
            reasons::UNAVAILABLE,
            format!("placing the workspace: {e}"),
        )),
    }
}

fn unavailable(repository: &RepositorySource) -> impl Fn(GitError) -> PrepareFailure + '_ {
    move |error| {
        let at = repository
            .git_ref
            .as_deref()
            .map(|r| format!(" at {r}"))
            .unwrap_or_default();
        failure(
            reasons::UNAVAILABLE,
            format!("fetching {}{at}: {error}", repository.url),
        )
    }
}

/// Fetches `repository` into its private copy and checks it out into the workspace.
async fn clone(
    repository: &RepositorySource,
    directory: &Path,
    state: &Path,
) -> Result<(), PrepareFailure> {
    let private = Workspaces::private_repository(state, &repository.path);
    let work_tree = directory.join(repository.path.as_str());
    refuse_symlinks(directory, &repository.path)?;
    std::fs::create_dir_all(&work_tree)
        .map_err(|e| failure(reasons::INVALID, format!("{}: {e}", repository.path)))?;
    let unavailable = unavailable(repository);
    let private_str = private.to_string_lossy().into_owned();
    run(
        &Invocation::default(),
        &["init", "-q", "--bare", &private_str],
    )
    .await
    .map_err(&unavailable)?;
    let in_private = Invocation {
        git_dir: Some(&private),
        timeout: Some(FETCH_TIMEOUT),
        credentials: repository
            .credentials
            .as_ref()
            .map(|c| (repository.url.as_str(), c)),
        ..Invocation::default()
    };
    let depth = repository.depth.map(|d| format!("--depth={d}"));
    let git_ref = repository.git_ref.as_deref().unwrap_or("HEAD");
    let mut fetch = vec!["fetch", "-q", "--no-tags", "--no-write-fetch-head"];
    if let Some(depth) = &depth {
        fetch.push(depth);
    }
    let refspec = format!("+{git_ref}:refs/nubabel/base");
    fetch.extend(["--", &repository.url, &refspec]);
    let fetched = run(&in_private, &fetch).await;
    if let Err(error) = fetched {
        // A commit that is not a ref tip cannot be a refspec source on every server: fetch it
        // by id.
        if !looks_like_commit(git_ref) {
            return Err(unavailable(error));
        }
        let mut by_id = vec!["fetch", "-q", "--no-tags"];
        if let Some(depth) = &depth {
            by_id.push(depth);
        }
        by_id.extend(["--", &repository.url, git_ref]);
        run(&in_private, &by_id).await.map_err(&unavailable)?;
        run(
            &in_private,
            &["update-ref", "refs/nubabel/base", "FETCH_HEAD"],
        )
        .await
        .map_err(&unavailable)?;
    }
    let commit = line(
        &run(
            &in_private,
            &["rev-parse", "--verify", "refs/nubabel/base^{commit}"],
        )
        .await
        .map_err(&unavailable)?,
    );
    // The agent's own repository: fetched from the private copy, checked out, pointing at the
    // real remote.
    let local = Invocation {
        dir: Some(&work_tree),
        timeout: Some(LOCAL_TIMEOUT),
        ..Invocation::default()
    };
    run(&local, &["init", "-q"]).await.map_err(&unavailable)?;
    let local_fetch = Invocation {
        dir: Some(&work_tree),
        timeout: Some(LOCAL_TIMEOUT),
        allow_local: true,
        ..Invocation::default()
    };
    // The same depth again: a shallow copy's history must be marked shallow here too, or the
    // agent's `git log` stops at a missing parent.
    let mut local_args = vec!["fetch", "-q", "--no-tags"];
    if let Some(depth) = &depth {
        local_args.push(depth);
    }
    local_args.extend(["--", &private_str, "refs/nubabel/base"]);
    run(&local_fetch, &local_args).await.map_err(&unavailable)?;
    run(&local, &["checkout", "-q", "--detach", &commit])
        .await
        .map_err(&unavailable)?;
    run(&local, &["remote", "add", "origin", &repository.url])
        .await
        .map_err(&unavailable)?;
    Ok(())
}

/// The repositories a workspace was made with, in order, from its private state.
fn recorded_repositories(state: &Path) -> Vec<RelativePath> {
    std::fs::read(state.join(REPOSITORIES_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn looks_like_commit(git_ref: &str) -> bool {
    (7..=64).contains(&git_ref.len()) && git_ref.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The state of the repository at `path` now: its checked-out commit and a tree of its whole
/// working copy, written into the private copy only.
async fn snapshot(
    private: &Path,
    directory: &Path,
    path: &RelativePath,
) -> Result<RepositoryState, PrepareFailure> {
    let work_tree = directory.join(path.as_str());
    let index = private.join("nubabel-snapshot-index");
    let _ = std::fs::remove_file(&index);
    let broken = |error: GitError| {
        failure(
            reasons::UNAVAILABLE,
            format!("reading the repository at {path}: {error}"),
        )
    };
    let private_invocation = Invocation {
        git_dir: Some(private),
        work_tree: Some(&work_tree),
        index_file: Some(&index),
        timeout: Some(LOCAL_TIMEOUT),
        ..Invocation::default()
    };
    run(&private_invocation, &["add", "-A", "--", "."])
        .await
        .map_err(broken)?;
    let tree = line(
        &run(&private_invocation, &["write-tree"])
            .await
            .map_err(broken)?,
    );
    let _ = std::fs::remove_file(&index);
    // The agent may have committed: its HEAD, read with the bridge's configuration on top.
    let local = Invocation {
        dir: Some(&work_tree),
        timeout: Some(LOCAL_TIMEOUT),
        ..Invocation::default()
    };
    let commit = match run(&local, &["rev-parse", "--verify", "-q", "HEAD"]).await {
        Ok(out) => line(&out),
        Err(_) => String::new(),
    };
    Ok(RepositoryState {
        path: path.clone(),
        commit,
        tree,
    })
}

/// The files changed between `since` and `now`, with the patch.
async fn compare(
    private: &Path,
    since: &RepositoryState,
    now: RepositoryState,
) -> Result<RepositoryChanges, PrepareFailure> {
    let broken = |error: GitError| {
        failure(
            reasons::UNAVAILABLE,
            format!("comparing the repository at {}: {error}", since.path),
        )
    };
    let invocation = Invocation {
        git_dir: Some(private),
        timeout: Some(LOCAL_TIMEOUT),
        ..Invocation::default()
    };
    let numstat = run(
        &invocation,
        &[
            "diff-tree",
            "-r",
            "--numstat",
            "-z",
            "--no-renames",
            &since.tree,
            &now.tree,
        ],
    )
    .await
    .map_err(broken)?;
    let patch = run(
        &invocation,
        &[
            "diff-tree",
            "-r",
            "-p",
            "--no-renames",
            "--no-ext-diff",
            "--no-textconv",
            &since.tree,
            &now.tree,
        ],
    )
    .await
    .map_err(broken)?;
    Ok(RepositoryChanges {
        commit_before: since.commit.clone(),
        files: parse_numstat(&numstat),
        patch: bounded_patch(&patch),
        now,
    })
}

/// Parses `git diff --numstat -z`: `added\tremoved\tpath\0` per file (`-` counts for binary).
pub fn parse_numstat(output: &[u8]) -> Vec<FileChange> {
    String::from_utf8_lossy(output)
        .split('\0')
        .filter_map(|record| {
            let mut fields = record.splitn(3, '\t');
            let added = fields.next()?;
            let removed = fields.next()?;
            let path = fields.next()?;
            Some(FileChange {
                path: path.to_owned(),
                added: added.parse().unwrap_or(0),
                removed: removed.parse().unwrap_or(0),
            })
        })
        .collect()
}

fn bounded_patch(patch: &[u8]) -> String {
    if patch.len() <= MAX_PATCH_BYTES {
        return String::from_utf8_lossy(patch).into_owned();
    }
    let mut text = String::from_utf8_lossy(&patch[..MAX_PATCH_BYTES]).into_owned();
    text.push_str("\n[the patch is cut here: it is longer than 4 MiB]\n");
    text
}

/// Refuses a path whose existing ancestors (or itself) are symlinks: a checked-out repository
/// may hold a link that points out of the workspace.
fn refuse_symlinks(directory: &Path, path: &RelativePath) -> Result<(), PrepareFailure> {
    let mut current = directory.to_path_buf();
    for part in path.as_str().split('/').filter(|p| !p.is_empty()) {
        current.push(part);
        if std::fs::symlink_metadata(&current).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(failure(
                reasons::INVALID,
                format!("{path}: {part} is a symbolic link"),
            ));
        }
    }
    Ok(())
}

fn write_file(directory: &Path, file: &FileSource) -> Result<(), PrepareFailure> {
    if file.path.is_root() {
        return Err(failure(reasons::INVALID, "a file needs a path"));
    }
    refuse_symlinks(directory, &file.path)?;
    let target = directory.join(file.path.as_str());
    let written = target
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&target, &file.content));
    written.map_err(|e| failure(reasons::INVALID, format!("writing {}: {e}", file.path)))
}

fn check_size(directory: &Path, max_bytes: Option<u64>) -> Result<(), PrepareFailure> {
    let Some(limit) = max_bytes else {
        return Ok(());
    };
    let bytes = disk_usage(directory);
    if bytes > limit {
        return Err(failure(
            reasons::TOO_LARGE,
            format!("the workspace holds {bytes} bytes, more than the {limit} the fleet allows"),
        ));
    }
    Ok(())
}

/// Bytes of the regular files under `dir` (symlinks not followed).
pub fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    total += entry.metadata().map_or(0, |m| m.len());
                }
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numstat_records_become_file_changes_with_binary_files_at_zero() {
        let parsed = parse_numstat(b"3\t1\tsrc/lib.rs\0-\t-\tlogo.png\0");
        assert_eq!(
            parsed,
            vec![
                FileChange {
                    path: "src/lib.rs".to_owned(),
                    added: 3,
                    removed: 1
                },
                FileChange {
                    path: "logo.png".to_owned(),
                    added: 0,
                    removed: 0
                },
            ]
        );
        assert!(parse_numstat(b"").is_empty());
    }

    fn request(repositories: Vec<RepositorySource>) -> PrepareRequest {
        PrepareRequest {
            key: workspace_key("s"),
            repositories,
            files: Vec::new(),
            max_bytes: None,
        }
    }

    fn repository(url: &str, path: &str) -> RepositorySource {
        RepositorySource {
            url: url.to_owned(),
            git_ref: None,
            path: RelativePath::parse(path).unwrap(),
            depth: None,
            credentials: None,
        }
    }

    #[test]
    fn requests_that_cannot_be_carried_out_are_refused_before_anything_is_written() {
        let refused = |r: PrepareRequest| check_request(&r).unwrap_err().message;
        assert!(refused(request(vec![repository("file:///etc", "a")])).contains("http(s)"));
        assert!(refused(request(vec![repository("ssh://h/r", "a")])).contains("http(s)"));
        assert!(refused(request(vec![repository("https://u:p@h/r", "a")])).contains("credentials"));
        assert!(
            refused(request(vec![
                repository("https://h/a", "x"),
                repository("https://h/b", "x/y")
            ]))
            .contains("overlap")
        );
        let mut bad_ref = repository("https://h/r", "a");
        bad_ref.git_ref = Some("--upload-pack=evil".to_owned());
        assert!(refused(request(vec![bad_ref])).contains("not a branch"));
        let mut bad_key = request(Vec::new());
        bad_key.key = "../x".to_owned();
        assert!(refused(bad_key).contains("key"));
        assert!(
            check_request(&request(vec![
                repository("https://h/a", "a"),
                repository("https://h/b", "b")
            ]))
            .is_ok()
        );
    }

    #[test]
    fn a_file_is_never_written_through_a_symbolic_link() {
        let dir = std::env::temp_dir().join(format!("nubabel-ws-link-{}", std::process::id()));
        let outside = dir.join("outside");
        let workspace = dir.join("ws");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(&workspace).unwrap();
        std::os::unix::fs::symlink(&outside, workspace.join("docs")).unwrap();
        let file = FileSource {
            path: RelativePath::parse("docs/AGENTS.md").unwrap(),
            content: "x".to_owned(),
        };
        let refused = write_file(&workspace, &file).unwrap_err();
        assert_eq!(refused.reason, reasons::INVALID);
        assert!(!outside.join("AGENTS.md").exists());
        let fine = FileSource {
            path: RelativePath::parse("notes/a.md").unwrap(),
            content: "hello".to_owned(),
        };
        write_file(&workspace, &fine).unwrap();
        assert_eq!(
            std::fs::read_to_string(workspace.join("notes/a.md")).unwrap(),
            "hello"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
