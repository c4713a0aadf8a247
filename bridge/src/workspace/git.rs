//! Running `git` for the workspaces, safely: no configuration but what the bridge sets (neither
//! the system's nor a `~/.gitconfig`, which the agent could write), no prompts, no redirects,
//! credentials only in the environment of the one fetch that needs them, and error text with
//! every credential cut out.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use nubabel_contract::workspace::GitCredentials;
use tokio::process::Command;

/// Longest stretch of git's error output quoted in a failure, in characters.
const MAX_QUOTED_ERROR_CHARS: usize = 400;

/// A git command that failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git could not be started.
    #[error("git could not be started: {0}")]
    Spawn(#[source] std::io::Error),
    /// git ran longer than allowed.
    #[error("git {command} did not finish within {seconds} s")]
    Timeout {
        /// The subcommand.
        command: String,
        /// The limit.
        seconds: u64,
    },
    /// git exited with an error.
    #[error("git {command} failed: {stderr}")]
    Failed {
        /// The subcommand.
        command: String,
        /// The end of what it wrote to stderr, credentials removed.
        stderr: String,
    },
}

/// How a git command runs: where, against which repository, with which credentials.
#[derive(Clone, Default)]
pub struct Invocation<'a> {
    /// The working directory.
    pub dir: Option<&'a Path>,
    /// `--git-dir`, when the repository is not found from the working directory.
    pub git_dir: Option<&'a Path>,
    /// `--work-tree`, with `git_dir`.
    pub work_tree: Option<&'a Path>,
    /// `GIT_INDEX_FILE`.
    pub index_file: Option<&'a Path>,
    /// Credentials for requests to URLs under `credentials_scope`.
    pub credentials: Option<(&'a str, &'a GitCredentials)>,
    /// Bound on the whole command.
    pub timeout: Option<Duration>,
    /// Whether a repository on a local path may be fetched from (the bridge's private copy);
    /// otherwise only http(s) remotes are.
    pub allow_local: bool,
}

/// Runs `git <args>` as `invocation` says and returns its stdout.
pub async fn run(invocation: &Invocation<'_>, args: &[&str]) -> Result<Vec<u8>, GitError> {
    let subcommand = args.first().copied().unwrap_or_default().to_owned();
    let mut command = Command::new("git");
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut config: Vec<(String, OsString)> = vec![
        // Nothing in a repository runs a program of its choosing.
        ("core.hooksPath".into(), "/dev/null".into()),
        ("core.fsmonitor".into(), "false".into()),
        (
            "protocol.file.allow".into(),
            if invocation.allow_local {
                "always"
            } else {
                "never"
            }
            .into(),
        ),
        ("protocol.ext.allow".into(), "never".into()),
        ("http.followRedirects".into(), "false".into()),
        ("credential.helper".into(), "".into()),
        ("advice.detachedHead".into(), "false".into()),
        ("user.name".into(), "nubabel".into()),
        ("user.email".into(), "nubabel@localhost".into()),
    ];
    let mut secrets = Vec::new();
    if let Some((scope, credentials)) = invocation.credentials {
        let basic = BASE64.encode(format!("{}:{}", credentials.username, credentials.password));
        config.push((
            format!("http.{scope}.extraHeader"),
            format!("Authorization: Basic {basic}").into(),
        ));
        secrets.push(basic);
        secrets.push(credentials.password.clone());
    }
    command.env("GIT_CONFIG_COUNT", config.len().to_string());
    for (i, (key, value)) in config.into_iter().enumerate() {
        command.env(format!("GIT_CONFIG_KEY_{i}"), key);
        command.env(format!("GIT_CONFIG_VALUE_{i}"), value);
    }
    if let Some(index) = invocation.index_file {
        command.env("GIT_INDEX_FILE", index);
    }
    if let Some(dir) = invocation.dir {
        command.current_dir(dir);
    }
    if let Some(git_dir) = invocation.git_dir {
        command.arg("--git-dir").arg(git_dir);
    }
    if let Some(work_tree) = invocation.work_tree {
        command.arg("--work-tree").arg(work_tree);
    }
    command.args(args);
    let child = command.spawn().map_err(GitError::Spawn)?;
    let output = match invocation.timeout {
        Some(limit) => tokio::time::timeout(limit, child.wait_with_output())
            .await
            .map_err(|_| GitError::Timeout {
                command: subcommand.clone(),
                seconds: limit.as_secs(),
            })?,
        None => child.wait_with_output().await,
    }
    .map_err(GitError::Spawn)?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(GitError::Failed {
        command: subcommand,
        stderr: quoted_error(&String::from_utf8_lossy(&output.stderr), &secrets),
    })
}

/// The last lines of git's error output, one line, each secret replaced.
pub fn quoted_error(stderr: &str, secrets: &[String]) -> String {
    let mut text = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("hint:"))
        .collect::<Vec<_>>()
        .join("; ");
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret.as_str(), "[redacted]");
    }
    let count = text.chars().count();
    if count > MAX_QUOTED_ERROR_CHARS {
        text = text.chars().skip(count - MAX_QUOTED_ERROR_CHARS).collect();
    }
    text
}

/// stdout as one trimmed line.
pub fn line(stdout: &[u8]) -> String {
    String::from_utf8_lossy(stdout).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_error_is_one_line_without_hints_or_secrets() {
        let stderr = "hint: try this\nfatal: could not read from https://h/r: token tok-123 refused\n\nerror: dGVzdA==\n";
        let quoted = quoted_error(stderr, &["tok-123".to_owned(), "dGVzdA==".to_owned()]);
        assert_eq!(
            quoted,
            "fatal: could not read from https://h/r: token [redacted] refused; error: [redacted]"
        );
    }

    #[test]
    fn a_long_error_keeps_its_end() {
        let stderr = format!("{}END", "x".repeat(1000));
        let quoted = quoted_error(&stderr, &[]);
        assert_eq!(quoted.chars().count(), MAX_QUOTED_ERROR_CHARS);
        assert!(quoted.ends_with("END"));
    }

    #[tokio::test]
    async fn git_reads_no_configuration_of_the_environment() {
        let dir = std::env::temp_dir().join(format!("nubabel-git-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let invocation = Invocation {
            dir: Some(&dir),
            ..Invocation::default()
        };
        run(&invocation, &["init", "-q"]).await.unwrap();
        let hooks = run(&invocation, &["config", "core.hooksPath"])
            .await
            .unwrap();
        assert_eq!(line(&hooks), "/dev/null");
        let origin = run(&invocation, &["config", "--show-origin", "user.name"])
            .await
            .unwrap();
        assert!(
            line(&origin).starts_with("command line:"),
            "{}",
            line(&origin)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
