//! Carries out the steps that talk to a fleet's OpenCode: sending a task's prompt, looking at
//! its turn, aborting its agent. Every choice on the way is the planner's ([`plan`]); this
//! module does the I/O in the order that keeps a prompt sent at most once: the session and pod
//! are recorded (Postgres, then status) before the prompt is sent, and the session's messages
//! are read before any send.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::runtime::events::{EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use nubabel_contract::identity::SidecarIdentity;
use nubabel_crds::v1alpha1::{
    DelegatedTask, OpencodeSidecar, SubagentStatus, TaskPhase, WorkspaceStatus,
};
use nubabel_opencode::{OpencodeClient, Session, SessionStatus};
use nubabel_store::sessions::{NewMapping, SessionMappings, TaskRef};

use super::error::Error;
use super::plan::{self, Delivery, Ending, GoneSession, Target, Turn, reasons};
use super::status;
use super::subagents::{self, Subagent, TreeTurn};
use super::turn::{self, Skills};
use super::workspace::{self, Bridges, WorkspaceError};
use crate::controller::{fleet, report};
use nubabel_contract::workspace::{ChangesRequest, WorkspaceChanges, workspace_key};

/// How often, and how far apart, a sent prompt is looked for in the session's messages
/// (`prompt_async` answers before OpenCode stores the message).
const PROMPT_LISTING_TRIES: u32 = 20;
const PROMPT_LISTING_INTERVAL: Duration = Duration::from_millis(250);

/// What came of a dispatch.
#[derive(Debug)]
pub enum Dispatched {
    /// OpenCode has the prompt; the task runs.
    Running,
    /// OpenCode accepted the prompt but has not listed it yet; it is never sent again.
    AwaitingListing,
    /// The task ends without running (its session went with its pod mid-dispatch).
    Ended(Ending),
}

/// What the steps that talk to OpenCode need.
pub struct Dispatcher {
    /// The Kubernetes client (fleet Secrets, task status).
    client: Client,
    /// Events on tasks.
    recorder: Recorder,
    /// Session mappings in Postgres.
    mappings: SessionMappings,
    /// The fleets' bridges, which prepare workspaces.
    bridges: Bridges,
}

impl Dispatcher {
    /// A dispatcher over these clients.
    pub fn new(
        client: Client,
        recorder: Recorder,
        mappings: SessionMappings,
        bridges: Bridges,
    ) -> Self {
        Self {
            client,
            recorder,
            mappings,
            bridges,
        }
    }

    /// Publishes an event on `task`.
    pub async fn publish(
        &self,
        task: &DelegatedTask,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        report::publish(&self.recorder, &task.object_ref(&()), type_, reason, note).await;
    }

    /// A client of the OpenCode server on pod `pod_name` of fleet `sidecar`.
    async fn opencode(
        &self,
        task: &DelegatedTask,
        sidecar: &str,
        pods: &[Pod],
        pod_name: &str,
    ) -> Result<OpencodeClient, Error> {
        let pod = pods
            .iter()
            .find(|p| p.name_any() == pod_name)
            .ok_or_else(|| fleet::AccessError::NoPodIp(pod_name.to_owned()))?;
        let namespace = task.namespace().unwrap_or_default();
        Ok(fleet::opencode(&self.client, &namespace, sidecar, pod).await?)
    }

    /// The OpenCode server of the pod the task was sent to, with that pod's name and session.
    async fn opencode_of_turn(
        &self,
        task: &DelegatedTask,
        pods: &[Pod],
    ) -> Result<Option<(OpencodeClient, String, String)>, Error> {
        let status = task.status.clone().unwrap_or_default();
        let (Some(pod), Some(session)) = (status.sidecar_pod, status.opencode_session_id) else {
            return Ok(None);
        };
        let sidecar = status
            .sidecar
            .or_else(|| task.spec.sidecar_ref.as_ref().map(|r| r.name.clone()))
            .ok_or(Error::MissingMetadata("sidecar"))?;
        let mut opencode = self.opencode(task, &sidecar, pods, &pod).await?;
        if let Some(workspace) = status.workspace {
            opencode = opencode.in_directory(workspace.directory);
        }
        Ok(Some((opencode, pod, session)))
    }

    /// Sends the task's prompt to `target` on fleet `sidecar` (or finishes sending it after an
    /// interruption), continuing the Nubabel session `session_id`.
    pub async fn dispatch(
        &self,
        task: &DelegatedTask,
        sidecar: &OpencodeSidecar,
        pods: &[Pod],
        target: Target,
        session_id: &str,
    ) -> Result<Dispatched, Error> {
        let sidecar_name = sidecar.name_any();
        let (pod, mapped_session) = match target {
            Target::Existing(location) => (location.pod, Some(location.opencode_session_id)),
            Target::NewSession { pod } => (pod, None),
        };
        // What the turn sends, then the conversation's own directory: nothing is sent when
        // either cannot be had as the task asks.
        let skills = self.skills(task, sidecar).await?;
        let request = match turn::prompt_request(task, sidecar, &skills) {
            Ok(request) => request,
            Err(refusal) => {
                return Ok(Dispatched::Ended(Ending::without_output(
                    TaskPhase::Failed,
                    refusal.reason,
                    refusal.message,
                )));
            }
        };
        let workspace = match self.workspace(task, sidecar, pods, &pod, session_id).await {
            Ok(workspace) => workspace,
            Err(WorkspaceError::Refused(refusal)) => {
                return Ok(Dispatched::Ended(plan::workspace_refused(
                    &refusal.reason,
                    &refusal.message,
                )));
            }
            Err(other) => return Err(other.into()),
        };
        let opencode = self
            .opencode(task, &sidecar_name, pods, &pod)
            .await?
            .in_directory(workspace.directory.clone());
        let failed = |source| Error::Opencode {
            pod: pod.clone(),
            source,
        };

        // A mapped session may be gone with its pod (a restart without storage).
        let existing = match mapped_session {
            Some(id) => match opencode.session(&id).await {
                Ok(_) => Some(id),
                Err(e) if e.is_not_found() => {
                    match plan::when_session_gone(task, session_id, &id, &pod) {
                        GoneSession::Fail(ending) => return Ok(Dispatched::Ended(ending)),
                        GoneSession::StartNew { note } => {
                            self.publish(task, EventType::Normal, reasons::SESSION_LOST, note)
                                .await;
                            None
                        }
                    }
                }
                Err(e) => return Err(failed(e)),
            },
            None => None,
        };
        let opencode_session = match existing {
            Some(id) => id,
            None => {
                opencode
                    .create_session(Some(&task.name_any()))
                    .await
                    .map_err(failed)?
                    .id
            }
        };

        // Record where the prompt goes, in Postgres and in status, before it is sent.
        self.record_mapping(task, sidecar, session_id, &opencode_session, &pod)
            .await?;
        let status = status::dispatching(
            task,
            &sidecar_name,
            &pod,
            &opencode_session,
            plan::is_new_attempt(task, &opencode_session),
            workspace,
        );
        status::write(&self.client, task, status.clone()).await?;
        let attempt_started = status::attempt_started(&status).unwrap_or_else(Timestamp::now);

        // Was the prompt sent already (an earlier attempt that ended in doubt)?
        let before = opencode
            .messages(&opencode_session, None)
            .await
            .map_err(failed)?;
        let message_id = match plan::prompt_delivery(task, &before, attempt_started) {
            Delivery::Listed(id) => id,
            Delivery::AwaitListing => {
                tracing::debug!(task = %task.name_any(), "the accepted prompt is not listed yet");
                return Ok(Dispatched::AwaitingListing);
            }
            Delivery::Send { earlier } => {
                let sent = opencode.prompt_async(&opencode_session, &request).await;
                // Success or not, the session's messages say whether OpenCode has the prompt.
                let text = turn::prompt_text(task);
                let listed = self
                    .await_listing(&opencode, &opencode_session, &text, &earlier)
                    .await
                    .map_err(failed)?;
                match (listed, sent) {
                    (Some(id), _) => id,
                    (None, Err(source)) => return Err(failed(source)),
                    (None, Ok(())) => {
                        let status = status::prompt_sent(status, task, &pod, &opencode_session);
                        status::write(&self.client, task, status).await?;
                        return Ok(Dispatched::AwaitingListing);
                    }
                }
            }
        };

        let status = status::running(status, task, &pod, &opencode_session, message_id);
        status::write(&self.client, task, status).await?;
        self.publish(
            task,
            EventType::Normal,
            reasons::PROMPT_ACCEPTED,
            format!("sent to OpenCode session {opencode_session} on pod {pod}"),
        )
        .await;
        Ok(Dispatched::Running)
    }

    /// The conversation's workspace on `pod`: the one this attempt already recorded (its
    /// state is where the turn's changes count from), or the bridge's answer.
    async fn workspace(
        &self,
        task: &DelegatedTask,
        sidecar: &OpencodeSidecar,
        pods: &[Pod],
        pod: &str,
        session_id: &str,
    ) -> Result<WorkspaceStatus, WorkspaceError> {
        let recorded = task.status.as_ref().and_then(|s| {
            (s.sidecar_pod.as_deref() == Some(pod))
                .then(|| s.workspace.clone())
                .flatten()
        });
        if let Some(recorded) = recorded {
            return Ok(recorded);
        }
        let namespace = task.namespace().unwrap_or_default();
        let credentials =
            workspace::read_credentials(&self.client, task, sidecar, &namespace).await?;
        let request = workspace::request(task, sidecar, session_id, &credentials)?;
        let identity = SidecarIdentity::new(
            &sidecar.spec.organization_id,
            &namespace,
            &sidecar.name_any(),
        )
        .map_err(|e| WorkspaceError::Unreachable {
            pod: pod.to_owned(),
            message: e.to_string(),
        })?;
        let pod_object = pods.iter().find(|p| p.name_any() == pod).ok_or_else(|| {
            WorkspaceError::Unreachable {
                pod: pod.to_owned(),
                message: "the pod is gone".to_owned(),
            }
        })?;
        let prepared = self
            .bridges
            .prepare(&identity, pod_object, &request)
            .await?;
        Ok(workspace::status(&prepared))
    }

    /// The skills of `fleet` the task may need: the entries of the ConfigMap its spec names,
    /// read only when the task loads any.
    async fn skills(&self, task: &DelegatedTask, fleet: &OpencodeSidecar) -> Result<Skills, Error> {
        if task.spec.load_skills.is_empty() {
            return Ok(Skills::Found(Default::default()));
        }
        let Some(reference) = &fleet.spec.skills_config_map_ref else {
            return Ok(Skills::NotConfigured);
        };
        let namespace = fleet.namespace().unwrap_or_default();
        let found = Api::<ConfigMap>::namespaced(self.client.clone(), &namespace)
            .get_opt(&reference.name)
            .await?;
        Ok(match found {
            Some(config_map) => Skills::Found(config_map.data.unwrap_or_default()),
            None => Skills::Missing(reference.name.clone()),
        })
    }

    /// What the task's turn changed in its workspace's repositories, when it has any; a
    /// bridge that cannot tell is logged and the task finishes without the summary.
    pub async fn changes(&self, task: &DelegatedTask, pods: &[Pod]) -> Option<WorkspaceChanges> {
        let status = task.status.as_ref()?;
        let workspace = status.workspace.as_ref()?;
        let since = workspace::since(workspace)?;
        let pod = pods
            .iter()
            .find(|p| Some(p.name_any()) == status.sidecar_pod)?;
        let namespace = task.namespace().unwrap_or_default();
        let identity = SidecarIdentity::new(
            &task.spec.organization_id,
            &namespace,
            status.sidecar.as_deref()?,
        )
        .ok()?;
        let request = ChangesRequest {
            key: workspace_key(&plan::session_id(task)),
            since,
        };
        match self.bridges.changes(&identity, pod, &request).await {
            Ok(changes) => Some(changes),
            Err(error) => {
                tracing::info!(task = %task.name_any(), %error, "the turn's changes are unknown");
                None
            }
        }
    }

    async fn record_mapping(
        &self,
        task: &DelegatedTask,
        sidecar: &OpencodeSidecar,
        session_id: &str,
        opencode_session: &str,
        pod: &str,
    ) -> Result<(), Error> {
        let namespace = task.namespace().unwrap_or_default();
        let identity = SidecarIdentity::new(
            &sidecar.spec.organization_id,
            &namespace,
            &sidecar.name_any(),
        )
        .map_err(|_| Error::InvalidIdentity {
            what: "sidecar identity",
            value: format!(
                "{}/{namespace}/{}",
                sidecar.spec.organization_id,
                sidecar.name_any()
            ),
        })?;
        let task_ref =
            TaskRef::new(&namespace, &task.name_any()).map_err(|_| Error::InvalidIdentity {
                what: "task name",
                value: task.name_any(),
            })?;
        self.mappings
            .record(&NewMapping {
                sidecar: &identity,
                session_id,
                opencode_session_id: opencode_session,
                pod_name: pod,
                task: Some(&task_ref),
            })
            .await?;
        Ok(())
    }

    /// Looks for the sent prompt in the session's messages a few times.
    async fn await_listing(
        &self,
        opencode: &OpencodeClient,
        opencode_session: &str,
        prompt: &str,
        earlier: &[String],
    ) -> Result<Option<String>, nubabel_opencode::Error> {
        for _ in 0..PROMPT_LISTING_TRIES {
            let messages = opencode.messages(opencode_session, None).await?;
            if let Some(id) = plan::newly_listed(&messages, prompt, earlier) {
                return Ok(Some(id));
            }
            tokio::time::sleep(PROMPT_LISTING_INTERVAL).await;
        }
        Ok(None)
    }

    /// Looks at the task's turn in OpenCode, its subagents included: how it ended, if it did,
    /// and the subagents as they are. Subagents still working when the turn may not wait for
    /// them any longer (`background_wait` after it answered) are aborted here.
    pub async fn check(
        &self,
        task: &DelegatedTask,
        pods: &[Pod],
        background_wait: Duration,
    ) -> Result<Checked, Error> {
        let Some((opencode, pod, session)) = self.opencode_of_turn(task, pods).await? else {
            return Ok(Checked::default());
        };
        let failed = |source| Error::Opencode {
            pod: pod.clone(),
            source,
        };
        let statuses = opencode.session_status().await.map_err(failed)?;
        let busy = statuses.contains_key(&session);
        let prompt_id = task
            .status
            .as_ref()
            .and_then(|s| s.prompt_message_id.as_deref());
        let children = opencode.children(&session).await.map_err(failed)?;
        // A busy session has not ended its turn: its messages are read only to date its
        // subagents, when it has any.
        let messages = if busy && children.is_empty() {
            Vec::new()
        } else {
            match opencode.messages(&session, None).await {
                Ok(messages) => messages,
                Err(e) if e.is_not_found() => {
                    return Ok(Checked::seen(Some(plan::turn_lost(&session, &pod)), &[]));
                }
                Err(e) => return Err(failed(e)),
            }
        };
        // Subagents since the turn's prompt, by OpenCode's own clock.
        let since = prompt_id
            .and_then(|id| messages.iter().find(|m| m.info.id == id))
            .and_then(|m| m.info.time.created)
            .or_else(|| turn_started_ms(task));
        let mut found = self
            .subagents(&opencode, children, since, &statuses)
            .await
            .map_err(failed)?;
        if busy {
            return Ok(Checked::seen(None, &found));
        }
        let turn = prompt_id.map_or(Turn::InProgress, |id| plan::turn_outcome(&messages, id));
        let ending = match subagents::tree_turn(
            turn,
            subagents::parent_done_ms(&messages),
            &found,
            Timestamp::now().as_millisecond(),
            background_wait,
        ) {
            TreeTurn::InProgress => None,
            TreeTurn::Ended(ending) => Some(ending),
            TreeTurn::EndedAborting { ending, abort } => {
                for subagent in found
                    .iter_mut()
                    .filter(|s| abort.contains(&s.status.session_id))
                {
                    if let Err(error) = opencode.abort(&subagent.status.session_id).await {
                        tracing::info!(task = %task.name_any(), %error, "abort of a subagent did not reach OpenCode");
                    }
                    subagent.status.state = subagents::states::ABORTED.to_owned();
                }
                Some(ending)
            }
        };
        Ok(Checked::seen(ending, &found))
    }

    /// The subagents of a session's current turn, from its `children`: those created since
    /// `since_ms` and the sessions under them, oldest first, at most
    /// [`subagents::MAX_SESSIONS`].
    async fn subagents(
        &self,
        opencode: &OpencodeClient,
        children: Vec<Session>,
        since_ms: Option<i64>,
        statuses: &HashMap<String, SessionStatus>,
    ) -> Result<Vec<Subagent>, nubabel_opencode::Error> {
        let mut found = Vec::new();
        for child in descendants(opencode, children, since_ms).await? {
            let messages = opencode.messages(&child.id, None).await?;
            found.push(subagents::subagent(
                &child,
                &messages,
                statuses.contains_key(&child.id),
            ));
        }
        Ok(found)
    }

    /// Stops the task's agent, if it was sent anywhere; a failure is logged, never fatal.
    pub async fn abort(&self, task: &DelegatedTask, pods: &[Pod]) {
        match self.opencode_of_turn(task, pods).await {
            Ok(Some((opencode, _, session))) => {
                if let Err(error) = opencode.abort(&session).await {
                    tracing::info!(task = %task.name_any(), %error, "abort did not reach OpenCode");
                }
                // Then the subagents the turn started, which an abort of their parent leaves
                // running when they work in the background.
                let children = match opencode.children(&session).await {
                    Ok(children) => descendants(&opencode, children, turn_started_ms(task)).await,
                    Err(error) => Err(error),
                };
                let working = match (opencode.session_status().await, children) {
                    (Ok(statuses), Ok(children)) => children
                        .into_iter()
                        .filter(|c| statuses.contains_key(&c.id))
                        .collect(),
                    (Err(error), _) | (_, Err(error)) => {
                        tracing::info!(task = %task.name_any(), %error, "the subagents to abort could not be listed");
                        Vec::new()
                    }
                };
                for child in working {
                    if let Err(error) = opencode.abort(&child.id).await {
                        tracing::info!(task = %task.name_any(), %error, "abort of a subagent did not reach OpenCode");
                    }
                }
            }
            Ok(None) => {}
            Err(error) => tracing::info!(task = %task.name_any(), %error, "no OpenCode to abort"),
        }
    }
}

/// What a look at a running task found.
#[derive(Debug, Default)]
pub struct Checked {
    /// How the turn ended, if it did.
    pub ending: Option<Ending>,
    /// Its subagents, as they are.
    pub subagents: Vec<SubagentStatus>,
}

impl Checked {
    fn seen(ending: Option<Ending>, found: &[Subagent]) -> Self {
        Self {
            ending,
            subagents: found.iter().map(|s| s.status.clone()).collect(),
        }
    }
}

/// When the task's current turn began (Unix ms), with room for the pod's clock: subagent
/// sessions older than that belong to earlier turns of the conversation.
fn turn_started_ms(task: &DelegatedTask) -> Option<i64> {
    let started = status::attempt_started(task.status.as_ref()?)?;
    let skew = i64::try_from(plan::CLOCK_SKEW.as_millis()).unwrap_or(0);
    Some(started.as_millisecond().saturating_sub(skew))
}

/// A session's `children` created since `since_ms` and the sessions under them, breadth
/// first, at most [`subagents::MAX_SESSIONS`].
async fn descendants(
    opencode: &OpencodeClient,
    children: Vec<Session>,
    since_ms: Option<i64>,
) -> Result<Vec<Session>, nubabel_opencode::Error> {
    let mut found: Vec<Session> = Vec::new();
    let mut parents: VecDeque<String> = VecDeque::new();
    let mut level = children;
    loop {
        for child in level {
            let earlier = matches!((child.time.created, since_ms), (Some(c), Some(s)) if c < s);
            if earlier || found.iter().any(|f| f.id == child.id) {
                continue;
            }
            if found.len() >= subagents::MAX_SESSIONS {
                return Ok(found);
            }
            parents.push_back(child.id.clone());
            found.push(child);
        }
        let Some(parent) = parents.pop_front() else {
            return Ok(found);
        };
        level = opencode.children(&parent).await?;
    }
}
