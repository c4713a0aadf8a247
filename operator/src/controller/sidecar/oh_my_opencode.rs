//! The oh-my-opencode plugin on a fleet, pure: its names as of the pinned 4.19 release, the
//! check of `spec.ohMyOpencode`, and the plugin's configuration file rendered from the spec.
//!
//! The plugin reads `oh-my-openagent.json` from OpenCode's global config directory; the pod's
//! init container writes it there (see `build`). Every agent and built-in category is mapped
//! to a model of the fleet's provider, so nothing reaches for a provider the fleet lacks.

use std::collections::BTreeMap;
use std::time::Duration;

use nubabel_crds::v1alpha1::OhMyOpencodeSpec;
use serde_json::{Map, Value, json};

/// The plugin's npm package, installed in the image's plugin directory.
pub const PACKAGE: &str = "oh-my-opencode";
/// Names the same plugin is also published under; listing either in `spec.plugins` is refused.
pub const PACKAGE_NAMES: [&str; 2] = [PACKAGE, "oh-my-openagent"];
/// The file the plugin reads its configuration from, in OpenCode's global config directory.
pub const CONFIG_FILE: &str = "oh-my-openagent.json";
/// What a task waits for its background subagents by default, in seconds.
pub const DEFAULT_BACKGROUND_WAIT_SECONDS: i64 = 600;

/// The plugin's agents (its config keys).
pub const AGENTS: [&str; 14] = [
    "sisyphus",
    "hephaestus",
    "sisyphus-junior",
    "prometheus",
    "atlas",
    "metis",
    "momus",
    "oracle",
    "librarian",
    "explore",
    "multimodal-looker",
    "OpenCode-Builder",
    "build",
    "plan",
];

/// The agent that runs a task's turn; it cannot be turned off.
pub const ORCHESTRATOR: &str = "sisyphus";

/// The plugin's built-in task categories.
pub const CATEGORIES: [&str; 8] = [
    "visual-engineering",
    "ultrabrain",
    "deep",
    "artistry",
    "quick",
    "unspecified-low",
    "unspecified-high",
    "writing",
];

/// The plugin's remote MCP servers.
pub const REMOTE_MCPS: [&str; 3] = ["context7", "websearch", "grep_app"];

/// Hooks that never make sense in a pod: update checks against npm and desktop toasts.
pub const ALWAYS_DISABLED_HOOKS: [&str; 2] = ["auto-update-checker", "startup-toast"];

/// The plugin's hooks.
pub const HOOKS: [&str; 56] = [
    "agent-usage-reminder",
    "anthropic-context-window-limit-recovery",
    "ast-grep-sg-provision",
    "atlas",
    "auto-slash-command",
    "auto-update-checker",
    "background-notification",
    "bash-file-read-guard",
    "category-skill-reminder",
    "claude-code-hooks",
    "codegraph-bootstrap",
    "comment-checker",
    "compaction-context-injector",
    "compaction-todo-preserver",
    "delegate-task-retry",
    "directory-agents-injector",
    "directory-readme-injector",
    "edit-error-recovery",
    "empty-task-response-detector",
    "fsync-skip-warning",
    "goal",
    "hashline-read-enhancer",
    "hephaestus-agents-md-injector",
    "interactive-bash-session",
    "json-error-recovery",
    "keyword-detector",
    "legacy-plugin-toast",
    "model-fallback",
    "monitor-status-injector",
    "no-hephaestus-non-gpt",
    "no-sisyphus-gpt",
    "non-interactive-env",
    "notepad-write-guard",
    "plan-format-validator",
    "preemptive-compaction",
    "prometheus-md-only",
    "question-label-truncator",
    "read-image-resizer",
    "rules-injector",
    "runtime-fallback",
    "session-notification",
    "sisyphus-junior-notepad",
    "start-work",
    "startup-toast",
    "stop-continuation-guard",
    "task-resume-info",
    "tasks-todowrite-disabler",
    "team-tool-gating",
    "think-mode",
    "todo-continuation-enforcer",
    "todo-description-override",
    "tool-output-truncator",
    "tool-pair-validator",
    "unstable-agent-babysitter",
    "webfetch-redirect-guard",
    "write-existing-file-guard",
];

/// A checked `spec.ohMyOpencode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidOhMyOpencode {
    /// Agents turned off.
    pub disabled_agents: Vec<String>,
    /// Hooks turned off, the always-off ones included.
    pub disabled_hooks: Vec<String>,
    /// Remote MCP servers turned off (those not asked for).
    pub disabled_mcps: Vec<String>,
    /// Background subagents at once per model.
    pub concurrency: Option<u32>,
    /// How deep subagents may delegate.
    pub max_depth: Option<u32>,
    /// Whether the plugin's telemetry is on.
    pub telemetry: bool,
}

/// How long a task waits for its background subagents once its own turn is over, on a fleet
/// with plugin settings `spec` (or none).
pub fn background_wait(spec: Option<&OhMyOpencodeSpec>) -> Duration {
    let seconds = spec
        .and_then(|o| o.background.as_ref())
        .and_then(|b| b.wait_seconds)
        .unwrap_or(DEFAULT_BACKGROUND_WAIT_SECONDS);
    Duration::from_secs(seconds.max(0).unsigned_abs())
}

/// Checks `spec`: the message says which name is unknown and what is known.
pub fn validate(spec: &OhMyOpencodeSpec) -> Result<ValidOhMyOpencode, String> {
    let known = |field: &str, names: &[String], known: &[&str]| match names
        .iter()
        .find(|name| !known.contains(&name.as_str()))
    {
        Some(unknown) => Err(format!(
            "{field}: {unknown:?} is not one of oh-my-opencode's: {}",
            known.join(", ")
        )),
        None => Ok(()),
    };
    known("disabledAgents", &spec.disabled_agents, &AGENTS)?;
    if spec.disabled_agents.iter().any(|a| a == ORCHESTRATOR) {
        return Err(format!(
            "disabledAgents: {ORCHESTRATOR:?} runs the tasks and cannot be turned off"
        ));
    }
    known("disabledHooks", &spec.disabled_hooks, &HOOKS)?;
    known("remoteMcps", &spec.remote_mcps, &REMOTE_MCPS)?;
    let background = spec.background.clone().unwrap_or_default();
    let mut disabled_hooks: Vec<String> = ALWAYS_DISABLED_HOOKS
        .iter()
        .map(|h| (*h).to_owned())
        .chain(spec.disabled_hooks.iter().cloned())
        .collect();
    disabled_hooks.sort();
    disabled_hooks.dedup();
    let mut disabled_agents = spec.disabled_agents.clone();
    disabled_agents.sort();
    disabled_agents.dedup();
    Ok(ValidOhMyOpencode {
        disabled_agents,
        disabled_hooks,
        disabled_mcps: REMOTE_MCPS
            .iter()
            .filter(|m| !spec.remote_mcps.iter().any(|r| r == *m))
            .map(|m| (*m).to_owned())
            .collect(),
        concurrency: background.concurrency,
        max_depth: background.max_depth,
        telemetry: spec.telemetry,
    })
}

/// The plugin's configuration file: every agent on `model`, every built-in category on
/// `model` unless `categories` (the fleet's category map) gives it another, and the fleet's
/// own categories added.
pub fn config(
    plugin: &ValidOhMyOpencode,
    model: &str,
    categories: &BTreeMap<String, String>,
) -> Value {
    let agents: Map<String, Value> = AGENTS
        .iter()
        .map(|agent| ((*agent).to_owned(), json!({ "model": model })))
        .collect();
    let mut category_models: Map<String, Value> = CATEGORIES
        .iter()
        .map(|category| ((*category).to_owned(), json!({ "model": model })))
        .collect();
    for (name, category_model) in categories {
        category_models.insert(name.clone(), json!({ "model": category_model }));
    }
    let mut background = Map::new();
    if let Some(concurrency) = plugin.concurrency {
        background.insert("defaultConcurrency".into(), json!(concurrency));
    }
    if let Some(depth) = plugin.max_depth {
        background.insert("maxDepth".into(), json!(depth));
    }
    json!({
        "telemetry": plugin.telemetry,
        "auto_update": false,
        "agents": agents,
        "categories": category_models,
        "disabled_agents": plugin.disabled_agents,
        "disabled_hooks": plugin.disabled_hooks,
        "disabled_mcps": plugin.disabled_mcps,
        "background_task": background,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: Value) -> OhMyOpencodeSpec {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn every_agent_and_category_runs_on_the_fleets_provider_and_pods_stay_quiet() {
        let plugin = validate(&spec(json!({}))).unwrap();
        let categories = BTreeMap::from([
            ("quick".to_owned(), "fake/fast-model".to_owned()),
            ("mine".to_owned(), "fake/other".to_owned()),
        ]);
        let config = config(&plugin, "fake/fake-model", &categories);
        for agent in AGENTS {
            assert_eq!(
                config["agents"][agent]["model"], "fake/fake-model",
                "{agent}"
            );
        }
        assert_eq!(config["categories"]["deep"]["model"], "fake/fake-model");
        assert_eq!(config["categories"]["quick"]["model"], "fake/fast-model");
        assert_eq!(config["categories"]["mine"]["model"], "fake/other");
        assert_eq!(config["telemetry"], false);
        assert_eq!(config["auto_update"], false);
        assert_eq!(
            config["disabled_mcps"],
            json!(["context7", "websearch", "grep_app"])
        );
        assert_eq!(
            config["disabled_hooks"],
            json!(["auto-update-checker", "startup-toast"])
        );
        assert_eq!(config["background_task"], json!({}));
        assert_eq!(
            background_wait(Some(&spec(json!({})))),
            Duration::from_secs(DEFAULT_BACKGROUND_WAIT_SECONDS.unsigned_abs())
        );
        assert_eq!(
            background_wait(None),
            background_wait(Some(&spec(json!({}))))
        );
    }

    #[test]
    fn the_spec_turns_agents_hooks_and_mcps_off_or_on_and_bounds_the_background() {
        let given = spec(json!({
            "disabledAgents": ["oracle"],
            "disabledHooks": ["comment-checker", "startup-toast"],
            "remoteMcps": ["context7"],
            "background": {"concurrency": 2, "maxDepth": 1, "waitSeconds": 30},
            "telemetry": true
        }));
        let plugin = validate(&given).unwrap();
        let config = config(&plugin, "a/b", &BTreeMap::new());
        assert_eq!(config["disabled_agents"], json!(["oracle"]));
        assert_eq!(
            config["disabled_hooks"],
            json!(["auto-update-checker", "comment-checker", "startup-toast"])
        );
        assert_eq!(config["disabled_mcps"], json!(["websearch", "grep_app"]));
        assert_eq!(
            config["background_task"],
            json!({"defaultConcurrency": 2, "maxDepth": 1})
        );
        assert_eq!(config["telemetry"], true);
        assert_eq!(background_wait(Some(&given)), Duration::from_secs(30));
    }

    #[test]
    fn unknown_names_and_turning_off_the_orchestrator_are_refused_with_what_is_known() {
        let error = validate(&spec(json!({"disabledHooks": ["no-such-hook"]}))).unwrap_err();
        assert!(
            error.contains("\"no-such-hook\"") && error.contains("comment-checker"),
            "{error}"
        );
        let error = validate(&spec(json!({"disabledAgents": ["Oracle"]}))).unwrap_err();
        assert!(error.starts_with("disabledAgents"), "{error}");
        let error = validate(&spec(json!({"remoteMcps": ["github"]}))).unwrap_err();
        assert!(error.contains("grep_app"), "{error}");
        let error = validate(&spec(json!({"disabledAgents": ["sisyphus"]}))).unwrap_err();
        assert!(error.contains("cannot be turned off"), "{error}");
    }
}
