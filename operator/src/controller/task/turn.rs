//! What a task's turn sends to OpenCode, pure: the prompt's text with the caller's context, the
//! model its category picks, and the instructions of the skills it loads; or why the task
//! cannot run as it asks (a category or skill the fleet does not have).

use std::collections::BTreeMap;

use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar};
use nubabel_opencode::{ModelRef, PromptRequest};

/// Failure reasons of a turn that cannot be sent as asked.
pub mod reasons {
    /// `spec.category` is not in the fleet's `categories`.
    pub const UNKNOWN_CATEGORY: &str = "UnknownCategory";
    /// A `spec.loadSkills` entry is not in the fleet's skills ConfigMap.
    pub const UNKNOWN_SKILL: &str = "UnknownSkill";
}

/// The line that introduces the caller's context after the prompt.
pub const CONTEXT_HEADING: &str = "Context from the requester (JSON):";

/// The fleet's skills: their instructions by name, or why there are none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skills {
    /// The fleet names no skills ConfigMap.
    NotConfigured,
    /// The ConfigMap the fleet names does not exist.
    Missing(String),
    /// The ConfigMap's entries.
    Found(BTreeMap<String, String>),
}

/// The text of the task's prompt message: the prompt, then, when the task carries context,
/// [`CONTEXT_HEADING`] and the context as pretty JSON in a fenced block. Whether OpenCode has
/// the prompt is decided by finding exactly this text.
pub fn prompt_text(task: &DelegatedTask) -> String {
    match &task.spec.context {
        Some(context) if !context.is_null() => {
            let json =
                serde_json::to_string_pretty(context).unwrap_or_else(|_| context.to_string());
            format!(
                "{}\n\n{CONTEXT_HEADING}\n```json\n{json}\n```",
                task.spec.prompt
            )
        }
        _ => task.spec.prompt.clone(),
    }
}

/// Why a turn cannot be sent as the task asks: the task fails with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// One of [`reasons`].
    pub reason: &'static str,
    /// In words.
    pub message: String,
}

fn refused(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// The prompt request of the task's turn on `fleet`, or why a task that asks for a category or
/// skill the fleet does not have cannot run.
pub fn prompt_request(
    task: &DelegatedTask,
    fleet: &OpencodeSidecar,
    skills: &Skills,
) -> Result<PromptRequest, Refusal> {
    let mut request = PromptRequest::text(prompt_text(task));
    if let Some(agent) = &task.spec.agent {
        request = request.with_agent(agent.clone());
    }
    if let Some(category) = &task.spec.category {
        let model = fleet
            .spec
            .categories
            .get(category)
            .and_then(|c| ModelRef::parse(&c.model))
            .ok_or_else(|| {
                let known: Vec<&str> = fleet.spec.categories.keys().map(String::as_str).collect();
                refused(
                    reasons::UNKNOWN_CATEGORY,
                    format!(
                        "category {category:?} is not one of sidecar {}'s categories ({})",
                        kube::ResourceExt::name_any(fleet),
                        if known.is_empty() {
                            "it has none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })?;
        request = request.with_model(model);
    }
    if !task.spec.load_skills.is_empty() {
        request.system = Some(skill_instructions(&task.spec.load_skills, skills)?);
    }
    Ok(request)
}

/// The system instructions that load `names`, each skill's body in a `<skill>` element.
fn skill_instructions(names: &[String], skills: &Skills) -> Result<String, Refusal> {
    let found = match skills {
        Skills::Found(found) => found,
        Skills::NotConfigured => {
            return Err(refused(
                reasons::UNKNOWN_SKILL,
                format!(
                    "skills {names:?} were asked for, but the sidecar has no skillsConfigMapRef"
                ),
            ));
        }
        Skills::Missing(name) => {
            return Err(refused(
                reasons::UNKNOWN_SKILL,
                format!("the sidecar's skills ConfigMap {name} does not exist"),
            ));
        }
    };
    let mut text =
        String::from("The following skills are loaded for this task. Follow their instructions.\n");
    for name in names {
        let body = found.get(name).ok_or_else(|| {
            refused(
                reasons::UNKNOWN_SKILL,
                format!(
                    "skill {name:?} is not in the sidecar's skills ({})",
                    found.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        text.push_str(&format!(
            "\n<skill name=\"{name}\">\n{}\n</skill>\n",
            body.trim_end()
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(spec: serde_json::Value) -> DelegatedTask {
        let mut full = serde_json::json!({"organizationId": "o", "prompt": "fix it"});
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        DelegatedTask::new("t", serde_json::from_value(full).unwrap())
    }

    fn fleet() -> OpencodeSidecar {
        OpencodeSidecar::new(
            "fleet",
            serde_json::from_value(serde_json::json!({
                "organizationId": "o", "model": "fake/main",
                "categories": {"quick": {"model": "fake/fast"}}
            }))
            .unwrap(),
        )
    }

    fn skills() -> Skills {
        Skills::Found(BTreeMap::from([(
            "git".to_owned(),
            "Commit small steps.\n".to_owned(),
        )]))
    }

    #[test]
    fn context_follows_the_prompt_as_fenced_json_and_a_task_without_one_sends_the_prompt_alone() {
        let plain = task(serde_json::json!({}));
        assert_eq!(prompt_text(&plain), "fix it");
        let with = task(serde_json::json!({"context": {"ticket": "PAY-1"}}));
        assert_eq!(
            prompt_text(&with),
            "fix it\n\nContext from the requester (JSON):\n```json\n{\n  \"ticket\": \"PAY-1\"\n}\n```"
        );
    }

    #[test]
    fn a_category_picks_its_model_and_an_unknown_one_ends_the_task() {
        let request = prompt_request(
            &task(serde_json::json!({"category": "quick"})),
            &fleet(),
            &skills(),
        )
        .unwrap();
        assert_eq!(request.model, ModelRef::parse("fake/fast"));
        let plain = prompt_request(&task(serde_json::json!({})), &fleet(), &skills()).unwrap();
        assert_eq!(plain.model, None);
        let ending = prompt_request(
            &task(serde_json::json!({"category": "deep"})),
            &fleet(),
            &skills(),
        )
        .unwrap_err();
        assert_eq!(ending.reason, reasons::UNKNOWN_CATEGORY);
        assert!(ending.message.contains("\"deep\"") && ending.message.contains("quick"));
    }

    #[test]
    fn skills_become_system_instructions_and_an_unknown_one_ends_the_task() {
        let request = prompt_request(
            &task(serde_json::json!({"loadSkills": ["git"]})),
            &fleet(),
            &skills(),
        )
        .unwrap();
        let system = request.system.unwrap();
        assert!(
            system.contains("<skill name=\"git\">\nCommit small steps.\n</skill>"),
            "{system}"
        );
        for (skills, needle) in [
            (skills(), "\"lint\" is not in"),
            (Skills::NotConfigured, "no skillsConfigMapRef"),
            (Skills::Missing("sk".to_owned()), "sk does not exist"),
        ] {
            let ending = prompt_request(
                &task(serde_json::json!({"loadSkills": ["lint"]})),
                &fleet(),
                &skills,
            )
            .unwrap_err();
            assert_eq!(ending.reason, reasons::UNKNOWN_SKILL);
            assert!(ending.message.contains(needle), "{}", ending.message);
        }
        let none = prompt_request(
            &task(serde_json::json!({})),
            &fleet(),
            &Skills::NotConfigured,
        )
        .unwrap();
        assert_eq!(none.system, None);
    }
}
