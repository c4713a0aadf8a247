//! `nubabel-demo`: the quick start's main job. Inside the local stack (`nubabel-local run`), it
//! starts the callback API, the operator, a node shim, the scripted fake LLM and a Git server
//! that requires credentials (with a small repository it creates), applies a tenant's
//! `OpencodeSidecar` and a `DelegatedTask` that works on that repository, and prints the task's
//! progress, its answer and what it changed as they happen. Real OpenCode servers do the work; only the LLM is scripted, unless an API
//! key of a real provider is in the environment (`ANTHROPIC_API_KEY` or `OPENAI_API_KEY`): then
//! the sidecar names that provider's model and gets the key through a Secret.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_e2e::git_server::{GitServer, Login};
use nubabel_e2e::node_shim::HOST_IP;
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, create, kubectl, within};

/// What the scripted fake LLM is asked: its `bash` tool reads the checkout and appends a line.
const SCRIPTED_PROMPT: &str = r#"MCPCALL:bash:{"command": "cat README.md && echo '- reviewed by the agent' >> README.md", "description": "Review the README"}"#;
/// What a real model is asked.
const PROMPT: &str = "Read README.md, then append the line `- reviewed by the agent` to it.";
/// The demo repository's user and token (the Secret `demo-git` holds them).
const GIT_LOGIN: (&str, &str) = ("x-access-token", "demo-token-not-a-secret");
/// The Secret (and its key) that holds a real provider's API key.
const PROVIDER_SECRET: (&str, &str) = ("acme-llm", "api-key");
/// Overrides the model of a real provider (`<provider>/<model>`).
const MODEL_ENV: &str = "NUBABEL_DEMO_MODEL";

/// The LLM the demo's sidecar talks to.
#[derive(Debug, PartialEq, Eq)]
enum DemoLlm {
    /// The scripted fake LLM (the default).
    Fake,
    /// A real provider, with the API key found in the environment.
    Provider {
        /// OpenCode's provider id.
        id: &'static str,
        /// `<provider>/<model>`.
        model: String,
        /// The environment variable the key came from.
        key_env: &'static str,
        /// The API key.
        key: String,
    },
}

/// Picks the LLM from the environment: Anthropic's key first, then OpenAI's; empty values do
/// not count. `NUBABEL_DEMO_MODEL` replaces the provider's default model.
fn choose_llm(var: impl Fn(&str) -> Option<String>) -> DemoLlm {
    const PROVIDERS: [(&str, &str, &str); 2] = [
        (
            "ANTHROPIC_API_KEY",
            "anthropic",
            "anthropic/claude-sonnet-4-5",
        ),
        ("OPENAI_API_KEY", "openai", "openai/gpt-4.1"),
    ];
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    for (key_env, id, model) in PROVIDERS {
        if let Some(key) = set(key_env) {
            let model = set(MODEL_ENV)
                .filter(|m| m.starts_with(&format!("{id}/")))
                .unwrap_or_else(|| model.to_owned());
            return DemoLlm::Provider {
                id,
                model,
                key_env,
                key,
            };
        }
    }
    DemoLlm::Fake
}

/// Points the sidecar at a real provider: its model, and its key from [`PROVIDER_SECRET`].
fn use_provider(sidecar: &mut OpencodeSidecar, id: &str, model: &str) -> Result<()> {
    let (name, key) = PROVIDER_SECRET;
    sidecar.spec.model = model.to_owned();
    sidecar.spec.small_model = None;
    sidecar.spec.provider = Some(serde_json::from_value(serde_json::json!({
        "id": id,
        "apiKeySecretRef": {"name": name, "key": key},
    }))?);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    nubabel_e2e::install_crypto_provider();
    let keep_up = std::env::args().skip(1).any(|a| a == KEEP_UP_FLAG);
    if let Some(other) = std::env::args().skip(1).find(|a| a != KEEP_UP_FLAG) {
        bail!("unknown argument {other:?}: the demo takes only {KEEP_UP_FLAG}");
    }
    // Kept up, the demo lasts until Ctrl-C (a day at most).
    let limit = Duration::from_secs(if keep_up { 24 * 3600 } else { 300 });
    within(limit, "the demo", demo(keep_up)).await
}

/// Keeps the stack up after the task, for the web view, until Ctrl-C.
const KEEP_UP_FLAG: &str = "--keep-up";

/// Prints the web view's address and a tenant token, then waits for Ctrl-C.
async fn keep_up_for_the_web_view(system: &System, namespace: &TestNamespace) -> Result<()> {
    let token = nubabel_store::api_tokens::issue(
        system.db(),
        &nubabel_contract::identity::OrganizationId::parse("org-acme")?,
        namespace.name(),
        "demo web view",
    )
    .await?;
    println!(
        "\nThe stack stays up. Web view: {}/ui (sign in with the token below)\n\
         Tenant API token: {}\n\
         e.g. curl -H 'Authorization: Bearer {}' {}/api/tasks\n\
         Press Ctrl-C to stop.",
        system.callback_url(),
        token.token,
        token.token,
        system.callback_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn demo(keep_up: bool) -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "demo").await?;
    println!(
        "namespace {}: starting the callback API, the operator, a node and a fake LLM",
        namespace.name()
    );
    let system = System::start(&env, &namespace).await?;
    system.bind_organization("org-acme").await?;

    let git = GitServer::start_on(
        HOST_IP.into(),
        Login {
            username: GIT_LOGIN.0.to_owned(),
            password: GIT_LOGIN.1.to_owned(),
        },
    )?;
    git.create_repository(
        "hello",
        &[BTreeMap::from([
            ("README.md", "# hello\n\nA tiny repository for the demo.\n"),
            ("greet.sh", "echo hello\n"),
        ])],
    )?;
    let git_secret = Secret {
        metadata: ObjectMeta {
            name: Some("demo-git".to_owned()),
            ..ObjectMeta::default()
        },
        string_data: Some(
            [
                ("username".to_owned(), GIT_LOGIN.0.to_owned()),
                ("password".to_owned(), GIT_LOGIN.1.to_owned()),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    create(&namespace.api::<Secret>(), &git_secret).await?;
    println!(
        "Git server: {} (credentials in Secret demo-git)",
        git.url("hello")
    );

    let mut sidecar = system.sidecar_manifest("acme", "org-acme", 1)?;
    let llm = choose_llm(|name| std::env::var(name).ok());
    let prompt = if llm == DemoLlm::Fake {
        SCRIPTED_PROMPT
    } else {
        PROMPT
    };
    match llm {
        DemoLlm::Fake => println!(
            "LLM: the scripted fake (set ANTHROPIC_API_KEY or OPENAI_API_KEY for a real one)"
        ),
        DemoLlm::Provider {
            id,
            model,
            key_env,
            key,
        } => {
            let (name, secret_key) = PROVIDER_SECRET;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                string_data: Some([(secret_key.to_owned(), key)].into()),
                ..Secret::default()
            };
            create(&namespace.api::<Secret>(), &secret).await?;
            use_provider(&mut sidecar, id, &model)?;
            println!("LLM: {model}, with the key from {key_env} in Secret {name}");
        }
    }
    create(&namespace.api::<OpencodeSidecar>(), &sidecar).await?;
    println!(
        "applied OpencodeSidecar acme (organization org-acme, 1 replica); waiting for a ready pod"
    );
    let sidecars = namespace.api::<OpencodeSidecar>();
    nubabel_e2e::await_condition(
        &sidecars,
        "acme",
        "a ready sidecar pod",
        |s: Option<&OpencodeSidecar>| {
            s.and_then(|s| s.status.as_ref())
                .is_some_and(|s| s.ready_replicas >= 1)
        },
        Duration::from_secs(120),
    )
    .await
    .with_context(|| system.diagnostics())?;

    let task: DelegatedTask = serde_json::from_value(serde_json::json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "DelegatedTask",
        "metadata": {"name": "first-task"},
        "spec": {
            "organizationId": "org-acme", "sessionId": "demo-session", "prompt": prompt,
            "workspace": {"repositories": [{
                "url": git.url("hello"), "ref": "main",
                "credentialsSecretRef": {"name": "demo-git"},
            }]},
        }
    }))?;
    let tasks = namespace.api::<DelegatedTask>();
    create(&tasks, &task).await?;
    println!(
        "applied DelegatedTask first-task on {}: {prompt:?}",
        git.url("hello")
    );

    let mut last_line = String::new();
    let mut updates = watcher(
        tasks.clone(),
        watcher::Config::default().fields("metadata.name=first-task"),
    )
    .applied_objects()
    .boxed();
    let finished = loop {
        let Some(update) = updates.next().await else {
            bail!("the watch ended")
        };
        let task = update?;
        let status = task.status.clone().unwrap_or_default();
        let progress = status.progress.clone().unwrap_or_default();
        let line = format!(
            "  phase {:<9} pod {:<8} events {:>2}  tools {}/{}  last tool {}",
            status
                .phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".to_owned()),
            status.sidecar_pod.as_deref().unwrap_or("-"),
            progress.events,
            progress.tools_completed,
            progress.tools_started,
            progress.last_tool.as_deref().unwrap_or("-"),
        );
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        if status.phase.is_some_and(TaskPhase::is_finished) {
            break task;
        }
    };
    // The callback API mirrors progress about once a second; give the last update a moment.
    let mirrored = nubabel_e2e::await_condition(
        &tasks,
        "first-task",
        "the progress mirror to catch up",
        |t: Option<&DelegatedTask>| {
            t.and_then(|t| t.status.as_ref())
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.tools_completed >= 1)
        },
        Duration::from_secs(10),
    )
    .await;
    let finished = match mirrored {
        Ok(Some(task)) => {
            let progress = task
                .status
                .as_ref()
                .and_then(|s| s.progress.clone())
                .unwrap_or_default();
            println!(
                "  progress mirrored: {} events, {} tool call(s)",
                progress.events, progress.tools_completed
            );
            task
        }
        _ => finished,
    };
    let status = finished.status.unwrap_or_default();
    println!(
        "\nOpenCode session {} answered:\n{}\n",
        status.opencode_session_id.unwrap_or_default(),
        status.output.unwrap_or_default()
    );
    match &status.workspace {
        Some(workspace) => {
            println!("workspace {}:", workspace.directory);
            for change in &workspace.changes {
                println!(
                    "  repository {}: commit {} -> {}, {} file(s) changed, +{} -{}: {}",
                    change.path,
                    short(&change.commit_before),
                    short(&change.commit_after),
                    change.files_changed,
                    change.lines_added,
                    change.lines_removed,
                    change.files.join(", ")
                );
            }
        }
        None => println!("no workspace in the status"),
    }
    let listing = kubectl(["get", "ocs,dtask", "-n", namespace.name()]).await?;
    println!(
        "$ kubectl get ocs,dtask\n{}",
        String::from_utf8_lossy(&listing.stdout)
    );

    if keep_up {
        keep_up_for_the_web_view(&system, &namespace).await?;
    }
    system.shutdown().await?;
    namespace.delete().await?;
    if status.phase != Some(TaskPhase::Succeeded) {
        bail!("the task ended {:?}: {:?}", status.phase, status.error);
    }
    let changed = status
        .workspace
        .iter()
        .flat_map(|w| &w.changes)
        .any(|c| c.files_changed > 0);
    if !changed {
        bail!("the task changed nothing in its workspace");
    }
    Ok(())
}

/// The first 8 characters of a commit id.
fn short(commit: &str) -> &str {
    commit.get(..8).unwrap_or(commit)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn without_a_key_the_demo_uses_the_fake_llm() {
        assert_eq!(choose_llm(env(&[])), DemoLlm::Fake);
        assert_eq!(choose_llm(env(&[("OPENAI_API_KEY", "  ")])), DemoLlm::Fake);
    }

    #[test]
    fn a_provider_key_picks_that_provider_anthropic_first() {
        let both = env(&[("OPENAI_API_KEY", "sk-o"), ("ANTHROPIC_API_KEY", "sk-a")]);
        assert_eq!(
            choose_llm(both),
            DemoLlm::Provider {
                id: "anthropic",
                model: "anthropic/claude-sonnet-4-5".to_owned(),
                key_env: "ANTHROPIC_API_KEY",
                key: "sk-a".to_owned(),
            }
        );
        let openai = env(&[
            ("OPENAI_API_KEY", "sk-o"),
            (MODEL_ENV, "openai/gpt-4o-mini"),
        ]);
        assert_eq!(
            choose_llm(openai),
            DemoLlm::Provider {
                id: "openai",
                model: "openai/gpt-4o-mini".to_owned(),
                key_env: "OPENAI_API_KEY",
                key: "sk-o".to_owned(),
            }
        );
        // A model of another provider does not override.
        let mismatched = env(&[("OPENAI_API_KEY", "sk-o"), (MODEL_ENV, "anthropic/x")]);
        assert!(matches!(
            choose_llm(mismatched),
            DemoLlm::Provider { model, .. } if model == "openai/gpt-4.1"
        ));
    }

    #[test]
    fn a_real_provider_replaces_the_fake_and_takes_its_key_from_the_secret() {
        let mut sidecar: OpencodeSidecar = serde_json::from_value(serde_json::json!({
            "apiVersion": "nubabel.io/v1alpha1",
            "kind": "OpencodeSidecar",
            "metadata": {"name": "acme"},
            "spec": {"organizationId": "org-acme", "model": "fake/fake-model",
                     "provider": {"id": "fake", "baseURL": "http://127.0.2.1:1/v1"}}
        }))
        .unwrap();
        use_provider(&mut sidecar, "anthropic", "anthropic/claude-sonnet-4-5").unwrap();
        let spec = serde_json::to_value(&sidecar.spec).unwrap();
        assert_eq!(spec["model"], "anthropic/claude-sonnet-4-5");
        assert_eq!(
            spec["provider"],
            serde_json::json!({"id": "anthropic", "apiKeySecretRef": {"name": "acme-llm", "key": "api-key"}})
        );
    }
}
