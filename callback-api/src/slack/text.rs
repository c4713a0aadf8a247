//! What the bot says: the acknowledgement, progress lines, the answer (split to fit Slack's
//! message size) and the endings that are not answers, in plain words.

use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};

/// Most characters the bot puts in one message (Slack truncates `text` beyond 40,000, and
/// long messages read badly well before that).
pub const MAX_MESSAGE_CHARS: usize = 3500;

/// The prompt of a Slack message: its text without mentions of users or the bot.
pub fn prompt_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<@") {
        out.push_str(&rest[..start]);
        match rest[start..].find('>') {
            Some(end) => rest = &rest[start + end + 1..],
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The acknowledgement posted as soon as a task appears.
pub fn acknowledgement(task_name: &str) -> String {
    format!(
        ":hourglass_flowing_sand: On it (task `{task_name}`). I will post the answer in this thread."
    )
}

/// The live progress line the acknowledgement is edited to.
pub fn progress(task: &DelegatedTask) -> String {
    let status = task.status.clone().unwrap_or_default();
    match status.phase {
        None | Some(TaskPhase::Pending) => ":hourglass_flowing_sand: Starting…".to_owned(),
        Some(TaskPhase::Queued) => ":hourglass_flowing_sand: Waiting for a free agent…".to_owned(),
        Some(_) => {
            let progress = status.progress.unwrap_or_default();
            let (started, finished) = (progress.tools_started, progress.tools_completed);
            let tool = progress.last_tool.as_deref().unwrap_or("a tool");
            if started == 0 {
                ":gear: Working on it…".to_owned()
            } else if started > finished {
                format!(
                    ":gear: Working on it… running `{tool}` (tools: {started} started, {finished} finished)"
                )
            } else {
                format!(
                    ":gear: Working on it… finished `{tool}` (tools: {started} started, {finished} finished)"
                )
            }
        }
    }
}

/// What the acknowledgement says once the task has ended.
pub fn ended(task: &DelegatedTask) -> String {
    let status = task.status.clone().unwrap_or_default();
    let tools = status.progress.map_or(0, |p| p.tools_completed);
    match status.phase {
        Some(TaskPhase::Succeeded) => format!(":white_check_mark: Done ({tools} tool calls)."),
        Some(TaskPhase::Cancelled) => ":no_entry_sign: Cancelled.".to_owned(),
        Some(TaskPhase::TimedOut) => ":alarm_clock: Timed out.".to_owned(),
        _ => ":x: Failed.".to_owned(),
    }
}

/// The final messages of an ended task: the answer, or what went wrong, in plain words.
pub fn final_messages(task: &DelegatedTask, output: Option<&str>) -> Vec<String> {
    let status = task.status.clone().unwrap_or_default();
    let error = status
        .error
        .as_ref()
        .map(|e| e.message.trim().to_owned())
        .filter(|m| !m.is_empty());
    let text = match status.phase {
        Some(TaskPhase::Succeeded) => match output.map(str::trim).filter(|o| !o.is_empty()) {
            Some(answer) => answer.to_owned(),
            None => "The task finished without an answer.".to_owned(),
        },
        Some(TaskPhase::Cancelled) => "The task was cancelled before it finished.".to_owned(),
        Some(TaskPhase::TimedOut) => format!(
            "The task took too long and was stopped{}.",
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
        _ => format!(
            "Sorry, the task failed{}.",
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
    };
    split(&text, MAX_MESSAGE_CHARS)
}

/// Splits `text` into pieces of at most `max` characters, at line breaks where possible.
pub fn split(text: &str, max: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.chars().count() > max {
        let limit = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let cut = rest[..limit]
            .rfind('\n')
            .filter(|&i| i > 0)
            .unwrap_or(limit);
        pieces.push(rest[..cut].trim_end().to_owned());
        rest = rest[cut..].trim_start_matches('\n');
    }
    if !rest.is_empty() || pieces.is_empty() {
        pieces.push(rest.to_owned());
    }
    pieces
}

#[cfg(test)]
mod tests {
    use nubabel_crds::v1alpha1::{DelegatedTaskStatus, TaskError, TaskProgress};

    use super::*;

    fn task(
        phase: TaskPhase,
        progress: Option<TaskProgress>,
        error: Option<&str>,
    ) -> DelegatedTask {
        let mut task: DelegatedTask = serde_json::from_value(serde_json::json!({
            "apiVersion": "nubabel.io/v1alpha1", "kind": "DelegatedTask",
            "metadata": {"name": "t"}, "spec": {"organizationId": "a", "prompt": "p"}
        }))
        .unwrap();
        task.status = Some(DelegatedTaskStatus {
            phase: Some(phase),
            progress,
            error: error.map(|m| TaskError {
                reason: "R".into(),
                message: m.into(),
            }),
            ..DelegatedTaskStatus::default()
        });
        task
    }

    #[test]
    fn mentions_are_removed_from_the_prompt() {
        assert_eq!(prompt_of("<@U0BOT> what is  2+2?"), "what is 2+2?");
        assert_eq!(
            prompt_of("hey <@U0BOT|bot>, and <@U1> too"),
            "hey , and too"
        );
        assert_eq!(prompt_of("broken <@U0"), "broken <@U0");
    }

    #[test]
    fn progress_tells_which_tool_started_and_finished() {
        let running = |started, completed| {
            progress(&task(
                TaskPhase::Running,
                Some(TaskProgress {
                    tools_started: started,
                    tools_completed: completed,
                    last_tool: Some("bash".into()),
                    ..TaskProgress::default()
                }),
                None,
            ))
        };
        assert_eq!(running(0, 0), ":gear: Working on it…");
        assert!(running(1, 0).contains("running `bash`"));
        assert!(running(1, 1).contains("finished `bash`"));
        assert!(progress(&task(TaskPhase::Queued, None, None)).contains("Waiting"));
    }

    #[test]
    fn endings_that_are_not_answers_are_told_in_plain_words() {
        let one = |t: DelegatedTask| final_messages(&t, None).join("");
        assert_eq!(
            one(task(TaskPhase::Failed, None, Some("the model refused"))),
            "Sorry, the task failed: the model refused."
        );
        assert!(one(task(TaskPhase::TimedOut, None, None)).starts_with("The task took too long"));
        assert_eq!(
            one(task(TaskPhase::Cancelled, None, None)),
            "The task was cancelled before it finished."
        );
        assert_eq!(
            final_messages(&task(TaskPhase::Succeeded, None, None), Some(" 42 ")),
            ["42"]
        );
    }

    #[test]
    fn long_answers_are_split_at_line_breaks_without_losing_text() {
        let text = format!(
            "{}\n{}\n{}",
            "a".repeat(3000),
            "b".repeat(3000),
            "c".repeat(8000)
        );
        let pieces = split(&text, MAX_MESSAGE_CHARS);
        assert!(
            pieces
                .iter()
                .all(|p| p.chars().count() <= MAX_MESSAGE_CHARS)
        );
        assert_eq!(pieces[0], "a".repeat(3000));
        assert_eq!(pieces[1], "b".repeat(3000));
        assert_eq!(pieces.concat().len(), 14000);
        assert_eq!(split("é".repeat(5).as_str(), 2), ["éé", "éé", "é"]);
    }
}
