//! The DelegatedTask state machine, pure: from what the reconciler observed (the task, its
//! sidecar fleet, the pods' load, the session mapping, the clock) to the one next step, and,
//! while a step talks to OpenCode, from the session's messages to what they mean (whether the
//! prompt is there already, whether the turn ended and how).
//!
//! Everything that talks to the API server, Postgres or OpenCode happens elsewhere; this
//! module only decides, so every transition is a unit test.

use std::time::Duration;

use jiff::Timestamp;
use nubabel_crds::conditions::types;
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_opencode::{MessageWithParts, Role};
use nubabel_store::sessions::validate_nubabel_session_id;

/// Sessions one pod works on at once when the sidecar does not say.
pub const DEFAULT_MAX_SESSIONS_PER_POD: i32 = 4;

/// How often a running task is checked even without a watch event (the callback API's
/// progress writes normally wake it much sooner).
pub const RUNNING_RECHECK: Duration = Duration::from_secs(5);

/// How often a queued task looks for capacity again (pod and task changes also wake it).
pub const QUEUED_RECHECK: Duration = Duration::from_secs(10);

/// Reasons of the conditions and events of a task.
pub mod reasons {
    /// `spec.sessionId` cannot name a Nubabel session.
    pub const INVALID_SESSION_ID: &str = "InvalidSessionId";
    /// The task names a sidecar that does not exist, or no sidecar serves its organization.
    pub const SIDECAR_NOT_FOUND: &str = "SidecarNotFound";
    /// The named sidecar serves another organization.
    pub const ORGANIZATION_MISMATCH: &str = "OrganizationMismatch";
    /// Several sidecars serve the organization and the task names none.
    pub const AMBIGUOUS_SIDECAR: &str = "AmbiguousSidecar";
    /// No ready pod has a free session slot.
    pub const NO_CAPACITY: &str = "NoCapacity";
    /// An older task of the same fleet waits for capacity first.
    pub const WAITING_FOR_OLDER_TASKS: &str = "WaitingForOlderTasks";
    /// Another task of the same session is still running.
    pub const SESSION_BUSY: &str = "SessionBusy";
    /// The prompt is being sent.
    pub const DISPATCHING: &str = "Dispatching";
    /// OpenCode accepted the prompt.
    pub const PROMPT_ACCEPTED: &str = "PromptAccepted";
    /// OpenCode accepted the prompt but has not listed it in the session yet; it is never sent
    /// again.
    pub const PROMPT_SENT: &str = "PromptSent";
    /// The agent finished.
    pub const COMPLETED: &str = "Completed";
    /// The task ran past `timeoutSeconds`.
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    /// The task waited for capacity past `pendingTimeoutSeconds`.
    pub const PENDING_DEADLINE_EXCEEDED: &str = "PendingDeadlineExceeded";
    /// `spec.cancel` was set.
    pub const CANCELLED: &str = "Cancelled";
    /// The pod that ran the task is gone, and with it the turn.
    pub const SIDECAR_POD_LOST: &str = "SidecarPodLost";
    /// The session's OpenCode session is gone (its pod restarted without storage); the turn
    /// starts a new one.
    pub const SESSION_LOST: &str = "SessionLost";
}

/// A pod of the task's fleet as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLoad {
    /// The pod's name.
    pub name: String,
    /// Whether it is ready to take work.
    pub ready: bool,
    /// Tasks it is running now.
    pub running_tasks: i32,
    /// Whether it is being deleted (its processes are stopping).
    pub terminating: bool,
    /// When this pod (this incarnation of the name) was created.
    pub created: Option<Timestamp>,
}

/// Where a Nubabel session lives, from the data layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLocation {
    /// The OpenCode session id.
    pub opencode_session_id: String,
    /// The pod that holds it.
    pub pod: String,
}

/// How the fleet was resolved for the task.
#[derive(Clone, Copy, Debug)]
pub enum Resolved<'a> {
    /// The sidecar the task runs on.
    Sidecar(&'a OpencodeSidecar),
    /// The task names no existing sidecar and none serves its organization.
    NotFound,
    /// Several sidecars serve the organization; the task must name one.
    Ambiguous,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The task.
    pub task: &'a DelegatedTask,
    /// Its fleet.
    pub sidecar: Resolved<'a>,
    /// The fleet's pods with their load.
    pub pods: &'a [PodLoad],
    /// Where the task's session lives, when it has lived anywhere.
    pub session: Option<&'a SessionLocation>,
    /// How many older tasks of the same fleet wait for capacity (first come, first served per
    /// tenant: a task takes a slot only when they cannot all have one).
    pub older_tasks_waiting: usize,
    /// Whether another task of the same session is running.
    pub session_busy: bool,
    /// Now.
    pub now: Timestamp,
}

/// Where a task's prompt goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Continue an existing OpenCode session on the pod that holds it.
    Existing(SessionLocation),
    /// Start a new OpenCode session on this pod.
    NewSession {
        /// The pod.
        pod: String,
    },
}

/// The next step for a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do; look again after the delay (`None`: only when something changes).
    Wait(Option<Duration>),
    /// Wait for capacity, in phase Queued.
    Queue {
        /// Why.
        reason: &'static str,
        /// In words.
        message: String,
    },
    /// Send the prompt (or finish sending it after an interruption).
    Dispatch(Target),
    /// The prompt was sent: see what OpenCode says.
    Check,
    /// Stop the running agent, then end in `phase`.
    Abort {
        /// The phase to end in.
        phase: TaskPhase,
        /// Why.
        reason: &'static str,
        /// In words.
        message: String,
    },
    /// End now, with nothing to abort.
    Finish {
        /// The phase to end in.
        phase: TaskPhase,
        /// Why.
        reason: &'static str,
        /// In words.
        message: String,
    },
    /// The task finished long enough ago: delete it.
    Delete,
}

/// The Nubabel session of a task: its `sessionId`, or one of its own.
pub fn session_id(task: &DelegatedTask) -> String {
    task.spec
        .session_id
        .clone()
        .unwrap_or_else(|| format!("task-{}", task.metadata.uid.as_deref().unwrap_or_default()))
}

/// Whether the prompt may already be with OpenCode: a session and pod were chosen, so a
/// prompt may have been sent even if the reconciler stopped before recording it.
pub fn prompt_may_be_sent(task: &DelegatedTask) -> bool {
    task.status.as_ref().is_some_and(|s| {
        s.dispatch_time.is_some() || (s.opencode_session_id.is_some() && s.sidecar_pod.is_some())
    })
}

/// The task's Dispatched condition, once it has one.
fn dispatched_condition(
    task: &DelegatedTask,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    nubabel_crds::conditions::find(&task.status.as_ref()?.conditions, types::DISPATCHED)
}

/// The reason of the task's Dispatched condition, once it has one.
pub fn dispatched_reason(task: &DelegatedTask) -> Option<&str> {
    dispatched_condition(task).map(|c| c.reason.as_str())
}

/// When sending began, for a task whose prompt OpenCode accepted but has not listed yet.
fn prompt_sent_since(
    task: &DelegatedTask,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    dispatched_condition(task)
        .filter(|c| c.reason == reasons::PROMPT_SENT)
        .map(|c| &c.last_transition_time)
}

fn seconds_since(
    then: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    now: Timestamp,
) -> i64 {
    now.as_second() - then.0.as_second()
}

/// Decides the next step.
pub fn plan(observed: &Observed<'_>) -> Step {
    let task = observed.task;
    let status = task.status.clone().unwrap_or_default();
    let phase = task.phase();
    let now = observed.now;

    if phase.is_finished() {
        return match (
            task.spec.ttl_seconds_after_finished,
            &status.completion_time,
        ) {
            (Some(ttl), Some(done)) => {
                let left = ttl - seconds_since(done, now);
                if left <= 0 {
                    Step::Delete
                } else {
                    Step::Wait(Some(Duration::from_secs(left.unsigned_abs())))
                }
            }
            _ => Step::Wait(None),
        };
    }

    let sent = prompt_may_be_sent(task);
    if task.spec.cancel {
        let message = "spec.cancel was set".to_owned();
        return if sent {
            Step::Abort {
                phase: TaskPhase::Cancelled,
                reason: reasons::CANCELLED,
                message,
            }
        } else {
            Step::Finish {
                phase: TaskPhase::Cancelled,
                reason: reasons::CANCELLED,
                message,
            }
        };
    }

    if let Some(dispatched) = &status.dispatch_time {
        let elapsed = seconds_since(dispatched, now);
        let left = task.spec.timeout_seconds - elapsed;
        if left <= 0 {
            return Step::Abort {
                phase: TaskPhase::TimedOut,
                reason: reasons::DEADLINE_EXCEEDED,
                message: format!(
                    "the task ran longer than its timeoutSeconds ({} s)",
                    task.spec.timeout_seconds
                ),
            };
        }
        let pod_name = status.sidecar_pod.as_deref().unwrap_or("?");
        let pod = observed.pods.iter().find(|p| p.name == pod_name);
        let lost = match pod {
            None => Some(format!("sidecar pod {pod_name} is gone")),
            Some(p) if p.terminating => Some(format!("sidecar pod {pod_name} is being deleted")),
            // A StatefulSet recreates a pod under the same name: a pod younger than the
            // dispatch is not the one that had the prompt.
            Some(p)
                if p.created
                    .is_some_and(|c| c.as_second() > dispatched.0.as_second()) =>
            {
                Some(format!("sidecar pod {pod_name} was replaced"))
            }
            Some(_) => None,
        };
        if let Some(what) = lost {
            let storage = match observed.sidecar {
                Resolved::Sidecar(sidecar) if sidecar.spec.storage.is_some() => {
                    "; the session is kept on its storage, but the turn in flight was \
                     interrupted: send a new task with the same sessionId to continue"
                }
                _ => {
                    " and the turn went with it (the fleet has no storage, so its sessions \
                      lived on an emptyDir)"
                }
            };
            return Step::Finish {
                phase: TaskPhase::Failed,
                reason: reasons::SIDECAR_POD_LOST,
                message: format!("{what}{storage}"),
            };
        }
        return Step::Check;
    }

    // Not dispatched yet (or interrupted while dispatching).
    if let Some(session_id) = &task.spec.session_id
        && let Err(invalid) = validate_nubabel_session_id("spec.sessionId", session_id)
    {
        return Step::Finish {
            phase: TaskPhase::Failed,
            reason: reasons::INVALID_SESSION_ID,
            message: invalid.to_string(),
        };
    }
    let sidecar = match observed.sidecar {
        Resolved::Sidecar(sidecar) => sidecar,
        Resolved::NotFound => {
            let message = match &task.spec.sidecar_ref {
                Some(r) => format!(
                    "OpencodeSidecar {} does not exist in this namespace",
                    r.name
                ),
                None => format!(
                    "no OpencodeSidecar in this namespace serves organization {}",
                    task.spec.organization_id
                ),
            };
            return Step::Finish {
                phase: TaskPhase::Failed,
                reason: reasons::SIDECAR_NOT_FOUND,
                message,
            };
        }
        Resolved::Ambiguous => {
            return Step::Finish {
                phase: TaskPhase::Failed,
                reason: reasons::AMBIGUOUS_SIDECAR,
                message: format!(
                    "several OpencodeSidecars serve organization {}; set spec.sidecarRef",
                    task.spec.organization_id
                ),
            };
        }
    };
    if sidecar.spec.organization_id != task.spec.organization_id {
        return Step::Finish {
            phase: TaskPhase::Failed,
            reason: reasons::ORGANIZATION_MISMATCH,
            message: format!(
                "OpencodeSidecar serves organization {}, the task belongs to {}",
                sidecar.spec.organization_id, task.spec.organization_id
            ),
        };
    }

    if sent {
        // OpenCode took the prompt but never listed it: it is never sent again, so without a
        // deadline of its own such a task would wait forever. Count from when sending began.
        if let Some(since) = prompt_sent_since(task)
            && seconds_since(since, now) >= task.spec.timeout_seconds
        {
            return Step::Abort {
                phase: TaskPhase::TimedOut,
                reason: reasons::DEADLINE_EXCEEDED,
                message: format!(
                    "OpenCode accepted the prompt but did not list it within timeoutSeconds ({} s)",
                    task.spec.timeout_seconds
                ),
            };
        }
        // Interrupted between choosing a session and recording the dispatch: finish it on the
        // same session and pod, where the prompt may already be.
        if let (Some(session), Some(pod)) = (&status.opencode_session_id, &status.sidecar_pod) {
            return Step::Dispatch(Target::Existing(SessionLocation {
                opencode_session_id: session.clone(),
                pod: pod.clone(),
            }));
        }
    }

    if let Some(pending_timeout) = task.spec.pending_timeout_seconds {
        let created = task.metadata.creation_timestamp.as_ref();
        if created.is_some_and(|c| seconds_since(c, now) >= pending_timeout) {
            return Step::Finish {
                phase: TaskPhase::TimedOut,
                reason: reasons::PENDING_DEADLINE_EXCEEDED,
                message: format!("no capacity within pendingTimeoutSeconds ({pending_timeout} s)"),
            };
        }
    }

    if observed.session_busy {
        return Step::Queue {
            reason: reasons::SESSION_BUSY,
            message: "another task of this session is still running".to_owned(),
        };
    }
    let capacity = sidecar
        .spec
        .max_sessions_per_pod
        .unwrap_or(DEFAULT_MAX_SESSIONS_PER_POD);
    let free_slots: usize = observed
        .pods
        .iter()
        .filter(|p| p.ready)
        .map(|p| usize::try_from(capacity - p.running_tasks).unwrap_or(0))
        .sum();
    if observed.older_tasks_waiting > 0 && observed.older_tasks_waiting >= free_slots {
        return Step::Queue {
            reason: reasons::WAITING_FOR_OLDER_TASKS,
            message: format!(
                "{} older task(s) of this organization wait for the {free_slots} free slot(s) first",
                observed.older_tasks_waiting
            ),
        };
    }

    // Continuity: the session's own pod, when it still serves.
    if let Some(location) = observed.session
        && observed
            .pods
            .iter()
            .any(|p| p.name == location.pod && p.ready)
    {
        return Step::Dispatch(Target::Existing(location.clone()));
    }

    let least_loaded = observed
        .pods
        .iter()
        .filter(|p| p.ready && p.running_tasks < capacity)
        .min_by(|a, b| {
            a.running_tasks
                .cmp(&b.running_tasks)
                .then_with(|| a.name.cmp(&b.name))
        });
    match least_loaded {
        Some(pod) => Step::Dispatch(Target::NewSession {
            pod: pod.name.clone(),
        }),
        None => {
            let ready = observed.pods.iter().filter(|p| p.ready).count();
            Step::Queue {
                reason: reasons::NO_CAPACITY,
                message: format!(
                    "{ready} ready pod(s), each running {capacity} task(s) at most, none free"
                ),
            }
        }
    }
}

/// Time left until a dispatched task's deadline (at least a second), `None` before dispatch.
pub fn deadline_left(task: &DelegatedTask, now: Timestamp) -> Option<Duration> {
    let dispatched = task.status.as_ref()?.dispatch_time.as_ref()?;
    let left = task.spec.timeout_seconds - seconds_since(dispatched, now);
    Some(Duration::from_secs(left.max(1).unsigned_abs()))
}

/// When a task in `step` should be looked at again at the latest.
pub fn requeue_after(task: &DelegatedTask, step: &Step, now: Timestamp) -> Option<Duration> {
    match step {
        Step::Wait(delay) => *delay,
        Step::Queue { .. } => {
            let pending_left = task.spec.pending_timeout_seconds.and_then(|limit| {
                let created = task.metadata.creation_timestamp.as_ref()?;
                Some(Duration::from_secs(
                    (limit - seconds_since(created, now)).max(1).unsigned_abs(),
                ))
            });
            Some(pending_left.map_or(QUEUED_RECHECK, |left| left.min(QUEUED_RECHECK)))
        }
        Step::Check | Step::Dispatch(_) => {
            Some(deadline_left(task, now).map_or(RUNNING_RECHECK, |left| left.min(RUNNING_RECHECK)))
        }
        Step::Abort { .. } | Step::Finish { .. } | Step::Delete => None,
    }
}

/// How a task ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ending {
    /// The phase it ends in.
    pub phase: TaskPhase,
    /// Why: a reason of [`reasons`], or the name of OpenCode's error.
    pub reason: String,
    /// In words.
    pub message: String,
    /// The agent's answer, when it finished.
    pub output: Option<String>,
}

impl Ending {
    /// An end without an answer.
    pub fn without_output(phase: TaskPhase, reason: &str, message: String) -> Self {
        Self {
            phase,
            reason: reason.to_owned(),
            message,
            output: None,
        }
    }
}

/// Clock skew tolerated when matching a prompt found in OpenCode to a dispatch attempt.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// What to do when the OpenCode session a task was to continue no longer exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GoneSession {
    /// The prompt may have gone with it: end the task, never send the prompt again.
    Fail(Ending),
    /// Nothing was sent to it for this task: start a new session on the same pod.
    StartNew {
        /// The event note saying so.
        note: String,
    },
}

/// Decides about the OpenCode session `opencode_session` on `pod`, where the task's session
/// `session_id` lives, when it is gone (its pod restarted without storage) before the prompt
/// was known to be there.
pub fn when_session_gone(
    task: &DelegatedTask,
    session_id: &str,
    opencode_session: &str,
    pod: &str,
) -> GoneSession {
    if prompt_may_be_sent(task) {
        return GoneSession::Fail(Ending::without_output(
            TaskPhase::Failed,
            reasons::SIDECAR_POD_LOST,
            format!(
                "OpenCode session {opencode_session} no longer exists on pod {pod} (the pod was \
                 restarted without storage) while the prompt was being sent"
            ),
        ));
    }
    GoneSession::StartNew {
        note: format!(
            "OpenCode session {opencode_session} of session {session_id} no longer exists on pod \
             {pod}; starting a new one there"
        ),
    }
}

/// Whether sending the prompt into `opencode_session` is a new attempt, rather than finishing
/// an interrupted one on the same session.
pub fn is_new_attempt(task: &DelegatedTask, opencode_session: &str) -> bool {
    !prompt_may_be_sent(task)
        || task
            .status
            .as_ref()
            .and_then(|s| s.opencode_session_id.as_deref())
            != Some(opencode_session)
}

/// Whether the task's prompt must be sent, from its OpenCode session's messages read before
/// sending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The session lists the prompt already (an attempt that ended in doubt sent it): its
    /// message id.
    Listed(String),
    /// OpenCode accepted the prompt before but has not listed it yet: wait, never send again.
    AwaitListing,
    /// Send it. The ids of the messages already carrying the same text (earlier turns) are
    /// not the prompt once it is sent.
    Send {
        /// Messages with the prompt's text from before this attempt.
        earlier: Vec<String>,
    },
}

/// Decides whether to send the task's prompt; `attempt_started` is when the current dispatch
/// attempt began (the Dispatched condition's transition), `messages` the session's messages.
pub fn prompt_delivery(
    task: &DelegatedTask,
    messages: &[MessageWithParts],
    attempt_started: Timestamp,
) -> Delivery {
    let prompt_text = super::turn::prompt_text(task);
    let prompts: Vec<&MessageWithParts> =
        nubabel_opencode::user_prompts(messages, &prompt_text).collect();
    if prompt_may_be_sent(task) {
        let skew_ms = i64::try_from(CLOCK_SKEW.as_millis()).unwrap_or(i64::MAX);
        let since_ms = attempt_started.as_millisecond().saturating_sub(skew_ms);
        let sent = prompts
            .iter()
            .find(|m| m.info.time.created.is_some_and(|c| c >= since_ms));
        if let Some(sent) = sent {
            return Delivery::Listed(sent.info.id.clone());
        }
        if dispatched_reason(task) == Some(reasons::PROMPT_SENT) {
            return Delivery::AwaitListing;
        }
    }
    Delivery::Send {
        earlier: prompts.iter().map(|m| m.info.id.clone()).collect(),
    }
}

/// The id of the prompt `prompt` once the session lists it: a user message with its text that
/// was not there before sending.
pub fn newly_listed(
    messages: &[MessageWithParts],
    prompt: &str,
    earlier: &[String],
) -> Option<String> {
    nubabel_opencode::user_prompts(messages, prompt)
        .find(|m| !earlier.contains(&m.info.id))
        .map(|m| m.info.id.clone())
}

/// What a session's messages say of the turn that began with message `prompt_id`, once the
/// session is idle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Not ended (or not visible yet).
    InProgress,
    /// Ended, and how.
    Ended(Ending),
}

/// Reads the turn's outcome from the session's messages: the last assistant message after
/// the prompt decides. A turn ends when that message failed, or completed with anything but
/// a request for tool calls (the agent goes on after those).
pub fn turn_outcome(messages: &[MessageWithParts], prompt_id: &str) -> Turn {
    let Some(start) = messages.iter().position(|m| m.info.id == prompt_id) else {
        return Turn::InProgress;
    };
    let answers: Vec<MessageWithParts> = messages[start + 1..]
        .iter()
        .filter(|m| m.info.role == Role::Assistant)
        .cloned()
        .collect();
    let Some(last) = answers.last() else {
        return Turn::InProgress;
    };
    if let Some(error) = &last.info.error {
        let message = error.message().unwrap_or("the agent failed").to_owned();
        return Turn::Ended(Ending {
            phase: TaskPhase::Failed,
            reason: error.name.clone(),
            message,
            output: None,
        });
    }
    let done =
        last.info.time.completed.is_some() && last.info.finish.as_deref() != Some("tool-calls");
    if !done {
        return Turn::InProgress;
    }
    Turn::Ended(Ending {
        phase: TaskPhase::Succeeded,
        reason: reasons::COMPLETED.to_owned(),
        message: "the agent finished".to_owned(),
        output: Some(nubabel_opencode::final_assistant_text(&answers).unwrap_or_default()),
    })
}

/// The end of a turn whose OpenCode session `opencode_session` vanished from `pod` while it
/// ran: the pod was restarted and the turn went with it.
/// The end of a task whose workspace cannot be had as its spec asks.
pub fn workspace_refused(reason: &str, message: &str) -> Ending {
    Ending::without_output(
        TaskPhase::Failed,
        reason,
        format!("the workspace could not be prepared: {message}"),
    )
}

/// The end of a task whose turn is gone with its pod.
pub fn turn_lost(opencode_session: &str, pod: &str) -> Ending {
    Ending::without_output(
        TaskPhase::Failed,
        reasons::SIDECAR_POD_LOST,
        format!(
            "OpenCode session {opencode_session} no longer exists on pod {pod}: the pod was \
             restarted and the turn went with it"
        ),
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use nubabel_crds::v1alpha1::{
        DelegatedTaskSpec, DelegatedTaskStatus, OpencodeSidecarSpec, SidecarRef,
    };

    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn time(second: i64) -> Time {
        Time(at(second))
    }

    fn task() -> DelegatedTask {
        let mut task = DelegatedTask::new(
            "t",
            serde_json::from_value::<DelegatedTaskSpec>(serde_json::json!({
                "organizationId": "org-a",
                "prompt": "hi",
                "sessionId": "s-1",
                "sidecarRef": {"name": "fleet"}
            }))
            .unwrap(),
        );
        task.metadata.creation_timestamp = Some(time(0));
        task
    }

    fn sidecar(org: &str) -> OpencodeSidecar {
        OpencodeSidecar::new(
            "fleet",
            serde_json::from_value::<OpencodeSidecarSpec>(serde_json::json!({
                "organizationId": org,
                "model": "fake/fake-model",
                "maxSessionsPerPod": 2
            }))
            .unwrap(),
        )
    }

    fn pod(name: &str, ready: bool, running: i32) -> PodLoad {
        PodLoad {
            name: name.to_owned(),
            ready,
            running_tasks: running,
            terminating: false,
            created: Some(at(-100)),
        }
    }

    fn observe<'a>(
        task: &'a DelegatedTask,
        sidecar: &'a OpencodeSidecar,
        pods: &'a [PodLoad],
    ) -> Observed<'a> {
        Observed {
            task,
            sidecar: Resolved::Sidecar(sidecar),
            pods,
            session: None,
            older_tasks_waiting: 0,
            session_busy: false,
            now: at(10),
        }
    }

    fn running(mut task: DelegatedTask, dispatched: i64) -> DelegatedTask {
        task.status = Some(DelegatedTaskStatus {
            phase: Some(TaskPhase::Running),
            sidecar_pod: Some("fleet-0".to_owned()),
            opencode_session_id: Some("ses_1".to_owned()),
            dispatch_time: Some(time(dispatched)),
            ..DelegatedTaskStatus::default()
        });
        task
    }

    #[test]
    fn a_prompt_accepted_but_never_listed_times_out_at_the_deadline() {
        let (mut task, fleet) = (interrupted(reasons::PROMPT_SENT, 5), sidecar("org-a"));
        task.spec.timeout_seconds = 30;
        let pods = [pod("fleet-0", true, 1)];
        let mut observed = observe(&task, &fleet, &pods);
        observed.now = at(34);
        assert!(matches!(
            plan(&observed),
            Step::Dispatch(Target::Existing(_))
        ));
        observed.now = at(35);
        assert!(matches!(
            plan(&observed),
            Step::Abort {
                phase: TaskPhase::TimedOut,
                reason: reasons::DEADLINE_EXCEEDED,
                ..
            }
        ));
    }

    #[test]
    fn a_new_task_goes_to_the_least_loaded_ready_pod() {
        let (task, fleet) = (task(), sidecar("org-a"));
        let pods = [
            pod("fleet-0", true, 1),
            pod("fleet-1", true, 0),
            pod("fleet-2", false, 0),
        ];
        assert_eq!(
            plan(&observe(&task, &fleet, &pods)),
            Step::Dispatch(Target::NewSession {
                pod: "fleet-1".to_owned()
            })
        );
    }

    #[test]
    fn a_task_with_a_known_session_reuses_the_same_opencode_session_and_pod() {
        let (task, fleet) = (task(), sidecar("org-a"));
        let pods = [pod("fleet-0", true, 1), pod("fleet-1", true, 0)];
        let location = SessionLocation {
            opencode_session_id: "ses_1".to_owned(),
            pod: "fleet-0".to_owned(),
        };
        let observed = Observed {
            session: Some(&location),
            ..observe(&task, &fleet, &pods)
        };
        assert_eq!(
            plan(&observed),
            Step::Dispatch(Target::Existing(location.clone()))
        );
    }

    #[test]
    fn a_known_session_on_a_pod_that_is_gone_starts_anew_elsewhere() {
        let (task, fleet) = (task(), sidecar("org-a"));
        let pods = [pod("fleet-1", true, 0)];
        let location = SessionLocation {
            opencode_session_id: "ses_1".to_owned(),
            pod: "fleet-0".to_owned(),
        };
        let observed = Observed {
            session: Some(&location),
            ..observe(&task, &fleet, &pods)
        };
        assert_eq!(
            plan(&observed),
            Step::Dispatch(Target::NewSession {
                pod: "fleet-1".to_owned()
            })
        );
    }

    #[test]
    fn a_full_fleet_queues_the_task() {
        let (task, fleet) = (task(), sidecar("org-a"));
        let pods = [pod("fleet-0", true, 2), pod("fleet-1", false, 0)];
        assert!(matches!(
            plan(&observe(&task, &fleet, &pods)),
            Step::Queue {
                reason: reasons::NO_CAPACITY,
                ..
            }
        ));
    }

    #[test]
    fn a_younger_task_waits_while_older_queued_ones_need_every_free_slot() {
        let (task, fleet) = (task(), sidecar("org-a"));
        // Two slots free (capacity 2), two older tasks waiting: they go first.
        let pods = [pod("fleet-0", true, 0), pod("fleet-1", true, 2)];
        let observed = Observed {
            older_tasks_waiting: 2,
            ..observe(&task, &fleet, &pods)
        };
        assert!(matches!(
            plan(&observed),
            Step::Queue {
                reason: reasons::WAITING_FOR_OLDER_TASKS,
                ..
            }
        ));
        // One older task waiting and two free slots: there is room for both at once.
        let observed = Observed {
            older_tasks_waiting: 1,
            ..observe(&task, &fleet, &pods)
        };
        assert_eq!(
            plan(&observed),
            Step::Dispatch(Target::NewSession {
                pod: "fleet-0".to_owned()
            })
        );
    }

    #[test]
    fn a_second_turn_waits_while_the_first_turn_of_its_session_runs() {
        let (task, fleet) = (task(), sidecar("org-a"));
        let pods = [pod("fleet-0", true, 0)];
        let observed = Observed {
            session_busy: true,
            ..observe(&task, &fleet, &pods)
        };
        assert!(matches!(
            plan(&observed),
            Step::Queue {
                reason: reasons::SESSION_BUSY,
                ..
            }
        ));
    }

    #[test]
    fn a_task_for_another_organizations_sidecar_fails() {
        let (task, fleet) = (task(), sidecar("org-b"));
        let pods = [pod("fleet-0", true, 0)];
        assert!(matches!(
            plan(&observe(&task, &fleet, &pods)),
            Step::Finish {
                phase: TaskPhase::Failed,
                reason: reasons::ORGANIZATION_MISMATCH,
                ..
            }
        ));
    }

    #[test]
    fn a_session_id_in_opencodes_id_space_fails_the_task_before_dispatch() {
        let (mut task, fleet) = (task(), sidecar("org-a"));
        task.spec.session_id = Some("ses_3f2a".to_owned());
        let pods = [pod("fleet-0", true, 0)];
        match plan(&observe(&task, &fleet, &pods)) {
            Step::Finish {
                phase: TaskPhase::Failed,
                reason,
                message,
            } => {
                assert_eq!(reason, reasons::INVALID_SESSION_ID);
                assert!(message.contains("spec.sessionId"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_task_without_a_sidecar_fails_naming_it() {
        let (task, fleet) = (task(), sidecar("org-a"));
        let observed = Observed {
            sidecar: Resolved::NotFound,
            ..observe(&task, &fleet, &[])
        };
        match plan(&observed) {
            Step::Finish {
                phase: TaskPhase::Failed,
                reason,
                message,
            } => {
                assert_eq!(reason, reasons::SIDECAR_NOT_FOUND);
                assert!(message.contains("fleet"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_task_naming_no_sidecar_fails_when_several_serve_its_organization() {
        let (task, fleet) = (task(), sidecar("org-a"));
        let observed = Observed {
            sidecar: Resolved::Ambiguous,
            ..observe(&task, &fleet, &[])
        };
        assert!(matches!(
            plan(&observed),
            Step::Finish {
                phase: TaskPhase::Failed,
                reason: reasons::AMBIGUOUS_SIDECAR,
                ..
            }
        ));
    }

    #[test]
    fn a_running_task_past_its_deadline_is_aborted_as_timed_out() {
        let mut task = running(task(), 0);
        task.spec.timeout_seconds = 5;
        let fleet = sidecar("org-a");
        let pods = [pod("fleet-0", true, 1)];
        assert!(matches!(
            plan(&observe(&task, &fleet, &pods)),
            Step::Abort {
                phase: TaskPhase::TimedOut,
                reason: reasons::DEADLINE_EXCEEDED,
                ..
            }
        ));
    }

    #[test]
    fn a_running_task_within_its_deadline_is_checked_again_before_the_deadline() {
        let mut task = running(task(), 8);
        task.spec.timeout_seconds = 4;
        let fleet = sidecar("org-a");
        let pods = [pod("fleet-0", true, 1)];
        let step = plan(&observe(&task, &fleet, &pods));
        assert_eq!(step, Step::Check);
        assert_eq!(
            requeue_after(&task, &step, at(10)),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn error_backoff_is_capped_at_the_time_left_before_the_deadline() {
        let mut task = running(task(), 0);
        task.spec.timeout_seconds = 30;
        assert_eq!(deadline_left(&task, at(10)), Some(Duration::from_secs(20)));
        assert_eq!(deadline_left(&task, at(40)), Some(Duration::from_secs(1)));
        assert_eq!(deadline_left(&super::tests::task(), at(10)), None);
    }

    #[test]
    fn cancelling_a_running_task_aborts_it_and_a_queued_one_just_ends() {
        let fleet = sidecar("org-a");
        let pods = [pod("fleet-0", true, 1)];
        let mut task_running = running(task(), 5);
        task_running.spec.cancel = true;
        assert!(matches!(
            plan(&observe(&task_running, &fleet, &pods)),
            Step::Abort {
                phase: TaskPhase::Cancelled,
                ..
            }
        ));
        let mut queued = task();
        queued.spec.cancel = true;
        assert!(matches!(
            plan(&observe(&queued, &fleet, &pods)),
            Step::Finish {
                phase: TaskPhase::Cancelled,
                ..
            }
        ));
    }

    #[test]
    fn a_running_task_whose_pod_disappeared_fails_saying_so() {
        let task = running(task(), 5);
        let fleet = sidecar("org-a");
        let pods = [pod("fleet-1", true, 0)];
        assert!(matches!(
            plan(&observe(&task, &fleet, &pods)),
            Step::Finish {
                phase: TaskPhase::Failed,
                reason: reasons::SIDECAR_POD_LOST,
                ..
            }
        ));
    }

    #[test]
    fn a_running_task_whose_pod_is_deleted_or_replaced_fails_saying_which() {
        let task = running(task(), 5);
        let fleet = sidecar("org-a");
        let deleting = [PodLoad {
            terminating: true,
            ..pod("fleet-0", false, 1)
        }];
        let replaced = [PodLoad {
            created: Some(at(7)),
            ..pod("fleet-0", true, 0)
        }];
        for (pods, what) in [(&deleting, "is being deleted"), (&replaced, "was replaced")] {
            match plan(&observe(&task, &fleet, pods)) {
                Step::Finish {
                    phase: TaskPhase::Failed,
                    reason: reasons::SIDECAR_POD_LOST,
                    message,
                } => {
                    assert!(message.contains(what), "{message}");
                    assert!(message.contains("no storage"), "{message}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // The same pod, created before the dispatch, keeps the task running.
        let same = [PodLoad {
            created: Some(at(5)),
            ..pod("fleet-0", true, 1)
        }];
        assert_eq!(plan(&observe(&task, &fleet, &same)), Step::Check);
    }

    #[test]
    fn an_interrupted_dispatch_resumes_on_the_recorded_session_never_a_new_one() {
        let mut task = task();
        task.status = Some(DelegatedTaskStatus {
            sidecar_pod: Some("fleet-0".to_owned()),
            opencode_session_id: Some("ses_9".to_owned()),
            ..DelegatedTaskStatus::default()
        });
        let fleet = sidecar("org-a");
        let pods = [pod("fleet-0", true, 2), pod("fleet-1", true, 0)];
        assert_eq!(
            plan(&observe(&task, &fleet, &pods)),
            Step::Dispatch(Target::Existing(SessionLocation {
                opencode_session_id: "ses_9".to_owned(),
                pod: "fleet-0".to_owned()
            }))
        );
    }

    #[test]
    fn a_finished_task_is_deleted_after_its_ttl() {
        let mut task = task();
        task.spec.ttl_seconds_after_finished = Some(30);
        task.status = Some(DelegatedTaskStatus {
            phase: Some(TaskPhase::Succeeded),
            completion_time: Some(time(0)),
            ..DelegatedTaskStatus::default()
        });
        let fleet = sidecar("org-a");
        let step = plan(&observe(&task, &fleet, &[]));
        assert_eq!(step, Step::Wait(Some(Duration::from_secs(20))));
        let later = Observed {
            now: at(31),
            ..observe(&task, &fleet, &[])
        };
        assert_eq!(plan(&later), Step::Delete);
    }

    #[test]
    fn a_queued_task_times_out_after_its_pending_timeout() {
        let mut task = task();
        task.spec.pending_timeout_seconds = Some(10);
        task.spec.sidecar_ref = Some(SidecarRef {
            name: "fleet".to_owned(),
        });
        let fleet = sidecar("org-a");
        let pods = [pod("fleet-0", true, 2)];
        assert!(matches!(
            plan(&observe(&task, &fleet, &pods)),
            Step::Finish {
                phase: TaskPhase::TimedOut,
                reason: reasons::PENDING_DEADLINE_EXCEEDED,
                ..
            }
        ));
    }

    /// A message of the session, as OpenCode lists it.
    fn message(id: &str, role: &str, created_ms: i64, text: &str) -> MessageWithParts {
        serde_json::from_value(serde_json::json!({
            "info": {"id": id, "sessionID": "ses_1", "role": role, "time": {"created": created_ms}},
            "parts": [{"type": "text", "id": format!("prt_{id}"), "text": text}]
        }))
        .unwrap()
    }

    fn answer(
        id: &str,
        finish: Option<&str>,
        error: Option<serde_json::Value>,
        text: &str,
    ) -> MessageWithParts {
        let mut info = serde_json::json!({
            "id": id, "sessionID": "ses_1", "role": "assistant",
            "time": {"created": 1, "completed": finish.map(|_| 2)}
        });
        if let Some(finish) = finish {
            info["finish"] = finish.into();
        }
        if let Some(error) = error {
            info["error"] = error;
        }
        serde_json::from_value(serde_json::json!({
            "info": info,
            "parts": [{"type": "text", "id": format!("prt_{id}"), "text": text}]
        }))
        .unwrap()
    }

    /// A task whose dispatch to ses_1 on fleet-0 began at second `since` and was interrupted
    /// (reason `reason`).
    fn interrupted(reason: &str, since: i64) -> DelegatedTask {
        let mut task = task();
        let mut status = DelegatedTaskStatus {
            sidecar_pod: Some("fleet-0".to_owned()),
            opencode_session_id: Some("ses_1".to_owned()),
            ..DelegatedTaskStatus::default()
        };
        status
            .conditions
            .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Dispatched".to_owned(),
                status: "Unknown".to_owned(),
                reason: reason.to_owned(),
                message: "sending".to_owned(),
                last_transition_time: time(since),
                observed_generation: None,
            });
        task.status = Some(status);
        task
    }

    #[test]
    fn a_new_task_sends_its_prompt_even_when_an_earlier_turn_had_the_same_text() {
        let earlier = [message("msg_1", "user", at(-60).as_millisecond(), "hi")];
        assert_eq!(
            prompt_delivery(&task(), &earlier, at(0)),
            Delivery::Send {
                earlier: vec!["msg_1".to_owned()]
            }
        );
        // Once sent, the new message is the prompt; the earlier one never is.
        let after = [
            earlier[0].clone(),
            message("msg_2", "assistant", at(-59).as_millisecond(), "hello"),
            message("msg_3", "user", at(1).as_millisecond(), "hi"),
        ];
        assert_eq!(
            newly_listed(&after, "hi", &["msg_1".to_owned()]).as_deref(),
            Some("msg_3")
        );
        assert_eq!(newly_listed(&earlier, "hi", &["msg_1".to_owned()]), None);
    }

    #[test]
    fn an_interrupted_dispatch_finds_its_prompt_and_never_sends_it_twice() {
        let task = interrupted(reasons::DISPATCHING, 0);
        // Sent by the interrupted attempt (within the clock skew of its start): listed.
        let sent = [message("msg_9", "user", at(-3).as_millisecond(), "hi")];
        assert_eq!(
            prompt_delivery(&task, &sent, at(0)),
            Delivery::Listed("msg_9".to_owned())
        );
        // A message with the same text from well before the attempt is an earlier turn.
        let old = [message("msg_1", "user", at(-60).as_millisecond(), "hi")];
        assert_eq!(
            prompt_delivery(&task, &old, at(0)),
            Delivery::Send {
                earlier: vec!["msg_1".to_owned()]
            }
        );
        // Accepted before but not listed yet: wait, never send again.
        let accepted = interrupted(reasons::PROMPT_SENT, 0);
        assert_eq!(
            prompt_delivery(&accepted, &old, at(0)),
            Delivery::AwaitListing
        );
        assert_eq!(
            prompt_delivery(&accepted, &[], at(0)),
            Delivery::AwaitListing
        );
    }

    #[test]
    fn a_retry_on_the_recorded_session_is_the_same_attempt() {
        let task = interrupted(reasons::DISPATCHING, 0);
        assert!(!is_new_attempt(&task, "ses_1"));
        assert!(is_new_attempt(&task, "ses_2"));
        assert!(is_new_attempt(&self::task(), "ses_1"));
    }

    #[test]
    fn a_session_gone_mid_dispatch_fails_the_task_and_a_stale_mapping_starts_anew() {
        match when_session_gone(
            &interrupted(reasons::DISPATCHING, 0),
            "s-1",
            "ses_1",
            "fleet-0",
        ) {
            GoneSession::Fail(ending) => {
                assert_eq!(ending.phase, TaskPhase::Failed);
                assert_eq!(ending.reason, reasons::SIDECAR_POD_LOST);
                assert!(
                    ending.message.contains("while the prompt was being sent"),
                    "{}",
                    ending.message
                );
            }
            other => panic!("{other:?}"),
        }
        match when_session_gone(&task(), "s-1", "ses_1", "fleet-0") {
            GoneSession::StartNew { note } => assert!(note.contains("of session s-1"), "{note}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_turn_ends_when_its_last_answer_completes_without_asking_for_tools() {
        let prompt = message("msg_p", "user", 0, "hi");
        let before = message("msg_0", "assistant", 0, "an earlier turn");
        let tools = answer("msg_a", Some("tool-calls"), None, "");
        let streaming = answer("msg_b", None, None, "hal");
        let done = answer("msg_b", Some("stop"), None, "the answer");
        let turn = |messages: &[MessageWithParts]| turn_outcome(messages, "msg_p");
        assert_eq!(turn(std::slice::from_ref(&before)), Turn::InProgress);
        assert_eq!(turn(&[before.clone(), prompt.clone()]), Turn::InProgress);
        assert_eq!(turn(&[prompt.clone(), tools.clone()]), Turn::InProgress);
        assert_eq!(
            turn(&[prompt.clone(), tools.clone(), streaming]),
            Turn::InProgress
        );
        match turn(&[before, prompt, tools, done]) {
            Turn::Ended(ending) => {
                assert_eq!(ending.phase, TaskPhase::Succeeded);
                assert_eq!(ending.reason, reasons::COMPLETED);
                assert_eq!(ending.output.as_deref(), Some("the answer"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_turn_whose_last_answer_failed_ends_with_opencodes_error() {
        let prompt = message("msg_p", "user", 0, "hi");
        let failed = answer(
            "msg_a",
            None,
            Some(serde_json::json!({"name": "APIError", "data": {"message": "bad request"}})),
            "",
        );
        assert_eq!(
            turn_outcome(&[prompt, failed], "msg_p"),
            Turn::Ended(Ending::without_output(
                TaskPhase::Failed,
                "APIError",
                "bad request".to_owned()
            ))
        );
        let lost = turn_lost("ses_1", "fleet-0");
        assert_eq!(lost.reason, reasons::SIDECAR_POD_LOST);
    }
}
