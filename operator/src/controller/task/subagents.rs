//! A task's subagents, pure: the sessions an agent's `task` tool creates under the task's
//! session (oh-my-opencode's Sisyphus delegating, in the foreground or in the background),
//! what each one shows, and when the whole tree's turn is over.
//!
//! A subagent is never the task: its going idle does not end the turn. The turn ends when the
//! task's own session has answered, no subagent of it still works, and the session has
//! answered after the last subagent finished (a background subagent's result reaches its
//! parent as a new message, so the parent speaks again). Past the fleet's background wait, the
//! subagents still working are aborted and the task ends with the answer it has.

use std::time::Duration;

use nubabel_crds::v1alpha1::{MAX_SUBAGENTS, SubagentStatus, TaskPhase};
use nubabel_opencode::{MessageWithParts, Part, Role, Session, ToolStatus};

use super::plan::{Ending, Turn};

/// How long the tree may stay quiet after a subagent finished before its parent answered:
/// a background result is delivered to the parent within moments.
pub const PARENT_REPLY_GRACE: Duration = Duration::from_secs(15);
/// Subagent sessions looked at, at most, per look (deeper delegation counts too).
pub const MAX_SESSIONS: usize = MAX_SUBAGENTS;

/// States a subagent is reported in.
pub mod states {
    /// Its session works.
    pub const RUNNING: &str = "Running";
    /// Its work is done.
    pub const IDLE: &str = "Idle";
    /// Its last answer failed.
    pub const FAILED: &str = "Failed";
    /// It was aborted.
    pub const ABORTED: &str = "Aborted";
}

/// One subagent as a look at OpenCode found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subagent {
    /// What the task's status shows.
    pub status: SubagentStatus,
    /// When it last did anything (Unix ms): its newest message's completion or creation.
    pub last_activity_ms: Option<i64>,
}

impl Subagent {
    /// Whether it still works.
    pub fn running(&self) -> bool {
        self.status.state == states::RUNNING
    }
}

/// Reads a subagent from its session, its messages and whether OpenCode lists it as working.
pub fn subagent(session: &Session, messages: &[MessageWithParts], busy: bool) -> Subagent {
    let agent = messages
        .iter()
        .rev()
        .find_map(|m| m.info.agent.clone())
        .or_else(|| session.title.as_deref().and_then(agent_in_title));
    let tools = messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter_map(|p| match p {
            Part::Tool(tool) => Some(tool.state.status),
            _ => None,
        });
    let (mut started, mut completed) = (0, 0);
    for status in tools {
        if matches!(
            status,
            ToolStatus::Running | ToolStatus::Completed | ToolStatus::Error
        ) {
            started += 1;
        }
        if matches!(status, ToolStatus::Completed | ToolStatus::Error) {
            completed += 1;
        }
    }
    let last_error = messages
        .iter()
        .rev()
        .find(|m| m.info.role == Role::Assistant)
        .and_then(|m| m.info.error.as_ref());
    let state = match (busy, last_error) {
        (true, _) => states::RUNNING,
        (false, Some(error)) if error.name == "MessageAbortedError" => states::ABORTED,
        (false, Some(_)) => states::FAILED,
        (false, None) => states::IDLE,
    };
    Subagent {
        status: SubagentStatus {
            session_id: session.id.clone(),
            parent_session_id: session.parent_id.clone().unwrap_or_default(),
            agent,
            title: session.title.clone(),
            state: state.to_owned(),
            tools_started: started,
            tools_completed: completed,
        },
        last_activity_ms: messages
            .iter()
            .filter_map(|m| m.info.time.completed.or(m.info.time.created))
            .max(),
    }
}

/// The agent named in a title the plugin gives a subagent: `say hi (@Sisyphus-Junior subagent)`.
fn agent_in_title(title: &str) -> Option<String> {
    let (_, rest) = title.rsplit_once("(@")?;
    let name = rest.strip_suffix(" subagent)")?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// What the tree says of the task's turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeTurn {
    /// Not over.
    InProgress,
    /// Over.
    Ended(Ending),
    /// Over once these subagent sessions, still working, are aborted.
    EndedAborting {
        /// How the task ends.
        ending: Ending,
        /// The sessions to abort.
        abort: Vec<String>,
    },
}

/// Decides the turn from the task's own session (`parent`, and `parent_done_ms`, when its
/// last answer completed) and its subagents, at `now_ms`; `background_wait` bounds how long a
/// finished parent waits for subagents still working.
pub fn tree_turn(
    parent: Turn,
    parent_done_ms: Option<i64>,
    subagents: &[Subagent],
    now_ms: i64,
    background_wait: Duration,
) -> TreeTurn {
    let Turn::Ended(mut ending) = parent else {
        return TreeTurn::InProgress;
    };
    let running: Vec<&Subagent> = subagents.iter().filter(|s| s.running()).collect();
    let since = |at: Option<i64>| {
        Duration::from_millis(
            now_ms
                .saturating_sub(at.unwrap_or(now_ms))
                .max(0)
                .unsigned_abs(),
        )
    };
    if !running.is_empty() {
        // A failed turn does not wait for its helpers.
        if ending.phase == TaskPhase::Succeeded && since(parent_done_ms) < background_wait {
            return TreeTurn::InProgress;
        }
        let abort: Vec<String> = running
            .iter()
            .map(|s| s.status.session_id.clone())
            .collect();
        if ending.phase == TaskPhase::Succeeded {
            ending.message = format!(
                "the agent finished; {} background subagent(s) still working after {} s were aborted: {}",
                abort.len(),
                background_wait.as_secs(),
                abort.join(", ")
            );
        }
        return TreeTurn::EndedAborting { ending, abort };
    }
    let last_subagent = subagents.iter().filter_map(|s| s.last_activity_ms).max();
    let unanswered = match (last_subagent, parent_done_ms) {
        (Some(subagent), Some(parent)) => subagent > parent,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if unanswered && since(last_subagent) < PARENT_REPLY_GRACE {
        return TreeTurn::InProgress;
    }
    TreeTurn::Ended(ending)
}

/// When the parent's last answer after its prompt completed.
pub fn parent_done_ms(messages: &[MessageWithParts]) -> Option<i64> {
    messages
        .iter()
        .rev()
        .find(|m| m.info.role == Role::Assistant)
        .and_then(|m| m.info.time.completed)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::controller::task::plan::reasons;

    fn message(value: serde_json::Value) -> MessageWithParts {
        serde_json::from_value(value).unwrap()
    }

    fn session(id: &str, title: &str) -> Session {
        serde_json::from_value(json!({"id": id, "title": title, "parentID": "ses_parent"})).unwrap()
    }

    fn done(at: i64) -> Subagent {
        Subagent {
            status: SubagentStatus {
                session_id: "ses_child".into(),
                state: states::IDLE.into(),
                ..SubagentStatus::default()
            },
            last_activity_ms: Some(at),
        }
    }

    fn working() -> Subagent {
        let mut s = done(0);
        s.status.state = states::RUNNING.into();
        s
    }

    fn answered() -> Turn {
        Turn::Ended(Ending {
            phase: TaskPhase::Succeeded,
            reason: reasons::COMPLETED.to_owned(),
            message: "the agent finished".to_owned(),
            output: Some("done".to_owned()),
        })
    }

    const WAIT: Duration = Duration::from_secs(600);

    #[test]
    fn a_subagent_shows_its_agent_tools_and_state() {
        let messages = [
            message(
                json!({"info": {"id": "m1", "sessionID": "ses_child", "role": "user",
                "agent": "Sisyphus-Junior", "time": {"created": 10}}, "parts": []}),
            ),
            message(
                json!({"info": {"id": "m2", "sessionID": "ses_child", "role": "assistant",
                "time": {"created": 11, "completed": 15}},
                "parts": [
                    {"id": "p1", "type": "tool", "tool": "bash", "state": {"status": "completed"}},
                    {"id": "p2", "type": "tool", "tool": "read", "state": {"status": "running"}}
                ]}),
            ),
        ];
        let child = subagent(
            &session("ses_child", "say hi (@Sisyphus-Junior subagent)"),
            &messages,
            false,
        );
        assert_eq!(child.status.agent.as_deref(), Some("Sisyphus-Junior"));
        assert_eq!(
            (child.status.tools_started, child.status.tools_completed),
            (2, 1)
        );
        assert_eq!(child.status.state, states::IDLE);
        assert_eq!(child.status.parent_session_id, "ses_parent");
        assert_eq!(child.last_activity_ms, Some(15));
        assert!(subagent(&session("ses_child", "x"), &messages, true).running());
        // Without messages yet, the title names the agent.
        let fresh = subagent(&session("ses_child", "look (@oracle subagent)"), &[], true);
        assert_eq!(fresh.status.agent.as_deref(), Some("oracle"));
        let aborted = [message(
            json!({"info": {"id": "m", "sessionID": "s", "role": "assistant",
            "error": {"name": "MessageAbortedError", "data": {}}, "time": {"created": 1}}, "parts": []}),
        )];
        assert_eq!(
            subagent(&session("s", "t"), &aborted, false).status.state,
            states::ABORTED
        );
    }

    #[test]
    fn a_turn_without_subagents_ends_when_its_session_answered() {
        assert_eq!(
            tree_turn(answered(), Some(100), &[], 200, WAIT),
            TreeTurn::Ended(match answered() {
                Turn::Ended(e) => e,
                Turn::InProgress => unreachable!(),
            })
        );
        assert_eq!(
            tree_turn(Turn::InProgress, None, &[], 200, WAIT),
            TreeTurn::InProgress
        );
    }

    #[test]
    fn a_foreground_subagent_finished_before_the_parent_answered() {
        // The parent's answer came after the subagent's last message.
        assert!(matches!(
            tree_turn(answered(), Some(100), &[done(90)], 101, WAIT),
            TreeTurn::Ended(_)
        ));
    }

    #[test]
    fn a_background_subagent_keeps_the_turn_open_until_the_parent_answers_its_result() {
        // The parent answered at 100 and the subagent still works.
        assert_eq!(
            tree_turn(answered(), Some(100), &[working()], 5_000, WAIT),
            TreeTurn::InProgress
        );
        // It finished at 6000; the parent has not answered since: wait, within the grace.
        assert_eq!(
            tree_turn(answered(), Some(100), &[done(6_000)], 6_500, WAIT),
            TreeTurn::InProgress
        );
        // The parent answered its result at 7000.
        assert!(matches!(
            tree_turn(answered(), Some(7_000), &[done(6_000)], 7_100, WAIT),
            TreeTurn::Ended(_)
        ));
        // A parent that never answers does not hold the task past the grace.
        let late = 6_000 + i64::try_from(PARENT_REPLY_GRACE.as_millis()).unwrap() + 1;
        assert!(matches!(
            tree_turn(answered(), Some(100), &[done(6_000)], late, WAIT),
            TreeTurn::Ended(_)
        ));
    }

    #[test]
    fn past_the_background_wait_the_working_subagents_are_aborted_and_named() {
        let now = 100 + i64::try_from(WAIT.as_millis()).unwrap() + 1;
        let TreeTurn::EndedAborting { ending, abort } =
            tree_turn(answered(), Some(100), &[working(), done(50)], now, WAIT)
        else {
            panic!("not ended");
        };
        assert_eq!(abort, ["ses_child"]);
        assert_eq!(ending.phase, TaskPhase::Succeeded);
        assert_eq!(ending.output.as_deref(), Some("done"));
        assert!(ending.message.contains("ses_child"), "{}", ending.message);
        // A failed turn takes its subagents down at once.
        let failed = Turn::Ended(Ending::without_output(
            TaskPhase::Failed,
            "APIError",
            "boom".to_owned(),
        ));
        let TreeTurn::EndedAborting { ending, abort } =
            tree_turn(failed, Some(100), &[working()], 200, WAIT)
        else {
            panic!("not ended");
        };
        assert_eq!((ending.phase, abort.len()), (TaskPhase::Failed, 1));
    }
}
