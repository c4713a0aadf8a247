//! The DelegatedTask controller: sends each task's prompt to its tenant's OpenCode fleet,
//! follows the agent until it finishes, and records the outcome in the task's status.
//!
//! One reconcile observes (the task, its fleet and pods, the session mapping, the other tasks
//! in the controller's cache), asks the pure [`plan`] for the next step, and carries it out.
//! A prompt is sent at most once per task: the chosen session and pod are recorded before
//! sending, and after any doubt (an ambiguous HTTP failure, a restart mid-send) the session's
//! messages are read to find the prompt before it is ever sent again.

pub mod plan;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use nubabel_contract::identity::SidecarIdentity;
use nubabel_crds::conditions::{self, status as cstatus, types};
use nubabel_crds::v1alpha1::{
    DelegatedTask, DelegatedTaskStatus, MAX_OUTPUT_BYTES, OpencodeSidecar, TaskError, TaskPhase,
};
use nubabel_opencode::{ClientConfig, MessageWithParts, OpencodeClient, PromptRequest, Role};
use nubabel_store::sessions::{NewMapping, SessionMapping, SessionMappings, TaskRef};
use plan::{Observed, PodLoad, Resolved, SessionLocation, Step, Target, reasons};
use sqlx::PgPool;

use crate::controller::sidecar::build::{
    OPENCODE_PORT, PASSWORD_KEY, secret_name, selector_labels,
};
use crate::controller::{Backoff, FIELD_MANAGER, MAX_EVENT_NOTE_BYTES, Shared, truncate};
use crate::metrics::ControllerMetrics;

/// The controller's name in metrics and logs.
pub const CONTROLLER_NAME: &str = "delegatedtask";

/// Guarantees a running task's agent is aborted before the task disappears.
pub const FINALIZER: &str = "nubabel.io/abort-running-task";

/// Action of the events this controller publishes.
const EVENT_ACTION: &str = "Reconcile";

/// Clock skew tolerated when matching a prompt found in OpenCode to a dispatch attempt.
const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// How often, and how far apart, a sent prompt is looked for in the session's messages
/// (`prompt_async` answers before OpenCode stores the message).
const PROMPT_LISTING_TRIES: u32 = 20;
const PROMPT_LISTING_INTERVAL: Duration = Duration::from_millis(250);
/// When a slot chosen for a task was taken by another task placed meanwhile, how soon the task
/// is planned again.
const PLACEMENT_RETRY: Duration = Duration::from_millis(500);

/// Errors of one reconcile; each has a stable category for metrics and events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The task lacks a namespace or uid.
    #[error("task has no {0}")]
    MissingMetadata(&'static str),
    /// The Kubernetes API failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),
    /// The database failed.
    #[error("database request failed: {0}")]
    Data(#[source] nubabel_store::error::Error),
    /// The sidecar's OpenCode server failed or could not be reached.
    #[error("OpenCode request to pod {pod} failed: {source}")]
    Opencode {
        /// The pod.
        pod: String,
        /// What failed.
        #[source]
        source: nubabel_opencode::Error,
    },
    /// The sidecar's Secret lacks the OpenCode password (it is being created).
    #[error("the OpenCode password of sidecar {0} is not there yet")]
    NoPassword(String),
    /// The pod has no IP yet.
    #[error("pod {0} has no IP address")]
    NoPodIp(String),
    /// Adding or removing the finalizer failed.
    #[error("finalizer update failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A stable name for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::MissingMetadata(_) => "MissingMetadata",
            Self::Kube(_) => "KubernetesApi",
            Self::Data(_) => "Database",
            Self::Opencode { .. } => "OpencodeUnreachable",
            Self::NoPassword(_) => "SidecarNotProvisioned",
            Self::NoPodIp(_) => "PodNotAddressable",
            Self::Finalizer(_) => "Finalizer",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Self::Kube(error)
    }
}

impl From<nubabel_store::error::Error> for Error {
    fn from(error: nubabel_store::error::Error) -> Self {
        Self::Data(error)
    }
}

/// What the task controller needs.
pub struct Context {
    /// Shared operator state.
    shared: Shared,
    /// Session mappings in Postgres.
    mappings: SessionMappings,
    /// The database, for task results.
    pool: PgPool,
    /// This controller's metrics.
    metrics: ControllerMetrics,
    /// Per-object error backoff.
    backoff: Backoff,
    /// Every task the controller sees, for load and queue order.
    tasks: Store<DelegatedTask>,
    /// Tasks finished here whose finish the cache may not show yet.
    just_finished: JustFinished,
    /// Pods this operator sent tasks to, which the cache may not show yet.
    placements: Placements,
}

/// The other unfinished tasks of a namespace, by uid, each with the pod the cache shows it on.
type Live = HashMap<String, Option<String>>;

/// The pod each task is placed on by this operator, by task uid, from the moment it is chosen
/// until the task finishes or goes back to the queue. Load comes from the cache, which shows a
/// placement only after its status write comes back through the watch, and tasks reconcile
/// concurrently: without this ledger, tasks created together all see the same pod free and
/// overfill it. Only the leader reconciles, so the ledger is the one place placements are
/// decided; after a restart the cache has every status written before. The ledger also keeps
/// the turns of one session apart: a session's next turn is placed only when no live task
/// of the session is.
#[derive(Clone, Default)]
struct Placements(Arc<Mutex<HashMap<String, Placement>>>);

/// Where this operator placed a task, the session (organization, `sessionId`) it serves, and
/// when.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Placement {
    namespace: String,
    pod: String,
    session: (String, String),
    at: Instant,
}

/// How long a placed task the cache has not shown yet still counts (the cache shows a new
/// task within moments; a ledger entry of a task deleted before it was ever seen must not
/// hold a slot for ever).
const UNSEEN_PLACEMENT_GRACE: Duration = Duration::from_secs(60);

/// What the cache showed when a reconcile planned, besides the task itself.
#[derive(Default)]
struct CacheView {
    /// The other unfinished tasks of the namespace, each with the pod the cache shows it on.
    live: Live,
    /// Every other unfinished task, in any namespace.
    alive: HashSet<String>,
    /// Every task the cache held, finished or not.
    known: HashSet<String>,
}

impl CacheView {
    /// Whether a task placed by this operator still holds its place: the cache shows it
    /// unfinished, or it was placed so recently that the cache may not show it yet (tasks
    /// created together reconcile before the cache has all of them).
    fn holds(&self, uid: &str, placement: &Placement) -> bool {
        self.alive.contains(uid)
            || (!self.known.contains(uid) && placement.at.elapsed() < UNSEEN_PLACEMENT_GRACE)
    }
}

impl Placements {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Placement>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tasks other than `me` on pod `namespace/pod`: those the cache shows there, and those
    /// this ledger placed there that still hold their place.
    fn occupants(
        placements: &HashMap<String, Placement>,
        view: &CacheView,
        me: &str,
        namespace: &str,
        pod: &str,
    ) -> usize {
        let cached = view
            .live
            .iter()
            .filter(|(_, cached)| cached.as_deref() == Some(pod))
            .map(|(uid, _)| uid.as_str());
        let placed = placements
            .iter()
            .filter(|(uid, p)| {
                uid.as_str() != me && p.namespace == namespace && p.pod == pod && view.holds(uid, p)
            })
            .map(|(uid, _)| uid.as_str());
        cached.chain(placed).collect::<HashSet<_>>().len()
    }

    /// Places task `uid` as `placement` unless another task of its session that still holds
    /// its place (see [`CacheView::holds`]) is placed, in any namespace, and, with a
    /// `capacity`, only if the pod has a free slot (without one: a session continuing on its
    /// pod, whatever the load).
    fn reserve(
        &self,
        uid: &str,
        placement: Placement,
        view: &CacheView,
        capacity: Option<i32>,
    ) -> Result<(), Refusal> {
        let mut placements = self.lock();
        let session_placed = placements.iter().any(|(other, p)| {
            other != uid && p.session == placement.session && view.holds(other, p)
        });
        if session_placed {
            return Err(Refusal::SessionBusy);
        }
        if let Some(capacity) = capacity {
            let taken =
                Self::occupants(&placements, view, uid, &placement.namespace, &placement.pod);
            if i32::try_from(taken).unwrap_or(i32::MAX) >= capacity {
                return Err(Refusal::PodFull);
            }
        }
        placements.insert(uid.to_owned(), placement);
        Ok(())
    }

    fn release(&self, uid: &str) {
        self.lock().remove(uid);
    }
}

/// Why the ledger did not place a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Another turn of the session was placed meanwhile.
    SessionBusy,
    /// The pod's last slot was taken meanwhile.
    PodFull,
}

/// The uids of tasks this operator finished recently, so a queued task woken by the finish
/// does not count their slot as taken while the cache catches up; dropped once the cache
/// shows the task finished.
#[derive(Clone, Default)]
struct JustFinished(Arc<Mutex<HashSet<String>>>);

impl JustFinished {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, uid: String) {
        self.lock().insert(uid);
    }

    fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    fn snapshot(&self) -> HashSet<String> {
        self.lock().clone()
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn phase(task: &DelegatedTask) -> TaskPhase {
    task.status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or(TaskPhase::Pending)
}

fn dispatched_condition_reason(task: &DelegatedTask) -> Option<String> {
    let status = task.status.as_ref()?;
    conditions::find(&status.conditions, types::DISPATCHED).map(|c| c.reason.clone())
}

/// Whether `task` holds (or may hold) a session slot on a pod.
fn occupies_pod(task: &DelegatedTask) -> Option<&str> {
    if phase(task).is_finished() || !plan::prompt_may_be_sent(task) {
        return None;
    }
    task.status.as_ref()?.sidecar_pod.as_deref()
}

fn is_older(a: &DelegatedTask, b: &DelegatedTask) -> bool {
    let key = |t: &DelegatedTask| {
        (
            t.metadata.creation_timestamp.clone().map(|t| t.0),
            t.name_any(),
        )
    };
    key(a) < key(b)
}

/// The Nubabel session of a task: its `sessionId`, or one of its own.
fn session_id(task: &DelegatedTask) -> String {
    task.spec
        .session_id
        .clone()
        .unwrap_or_else(|| format!("task-{}", task.uid().unwrap_or_default()))
}

async fn resolve_sidecar(
    api: &Api<OpencodeSidecar>,
    task: &DelegatedTask,
) -> Result<Option<Result<OpencodeSidecar, ()>>, Error> {
    if let Some(reference) = &task.spec.sidecar_ref {
        return Ok(api.get_opt(&reference.name).await?.map(Ok));
    }
    let mut serving: Vec<OpencodeSidecar> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| s.spec.organization_id == task.spec.organization_id)
        .collect();
    Ok(match serving.len() {
        0 => None,
        1 => serving.pop().map(Ok),
        _ => Some(Err(())),
    })
}

/// Reconciles one task.
pub async fn reconcile_task(task: Arc<DelegatedTask>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let namespace = task
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<DelegatedTask> = Api::namespaced(ctx.shared.client.clone(), &namespace);
    let outcome = finalizer(&api, FINALIZER, task, |event| async {
        match event {
            Finalizer::Apply(task) => apply(&task, &ctx).await,
            Finalizer::Cleanup(task) => cleanup(&task, &ctx).await,
        }
    })
    .await;
    match outcome {
        Ok(action) => Ok(action),
        Err(
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e),
        ) => Err(e),
        Err(other) => Err(Error::Finalizer(Box::new(other))),
    }
}

/// Backs off per task and reports the failure.
pub fn error_policy(task: Arc<DelegatedTask>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.category());
    tracing::warn!(task = %task.name_any(), error = %error, "task reconcile failed");
    let key = task.uid().unwrap_or_else(|| task.name_any());
    let delay = ctx.backoff.next_delay(&key);
    // Backoff never carries a running task past its deadline unseen.
    Action::requeue(match plan::deadline_left(&task, Timestamp::now()) {
        Some(left) => delay.min(left),
        None => delay,
    })
}

async fn apply(task: &DelegatedTask, ctx: &Context) -> Result<Action, Error> {
    let namespace = task
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let client = &ctx.shared.client;
    let sidecars: Api<OpencodeSidecar> = Api::namespaced(client.clone(), &namespace);
    let now = Timestamp::now();

    // Finished tasks need nothing else observed.
    let finished = phase(task).is_finished();
    if finished && let Some(uid) = task.uid() {
        ctx.just_finished.forget(&uid);
    }
    let resolved = if finished {
        None
    } else {
        resolve_sidecar(&sidecars, task).await?
    };
    let sidecar = match &resolved {
        Some(Ok(sidecar)) => Resolved::Sidecar(sidecar),
        Some(Err(())) => Resolved::Ambiguous,
        None => Resolved::NotFound,
    };
    let pods: Vec<Pod> = match &resolved {
        Some(Ok(sidecar)) => {
            let selector = selector_labels(&sidecar.name_any())
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            Api::<Pod>::namespaced(client.clone(), &namespace)
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
        }
        _ => Vec::new(),
    };

    // Tasks this operator finished count as finished even before the cache shows it.
    let just_finished = ctx.just_finished.snapshot();
    // One snapshot of the cache for the whole plan.
    let all = ctx.tasks.state();
    let others: Vec<Arc<DelegatedTask>> = all
        .iter()
        .filter(|t| t.namespace().as_deref() == Some(namespace.as_str()) && t.uid() != task.uid())
        .filter(|t| !t.uid().is_some_and(|uid| just_finished.contains(&uid)))
        .cloned()
        .collect();
    // Every unfinished task in the cache, in any namespace: a session belongs to the
    // organization, so its turns wait for each other across namespaces too.
    let alive: Vec<&Arc<DelegatedTask>> = all
        .iter()
        .filter(|t| t.uid() != task.uid() && !phase(t).is_finished())
        .filter(|t| !t.uid().is_some_and(|uid| just_finished.contains(&uid)))
        .collect();
    // Every other live task of the namespace and the pod the cache shows it on; with this
    // operator's placements, what each pod runs.
    let view = CacheView {
        live: others
            .iter()
            .filter(|t| !phase(t).is_finished())
            .filter_map(|t| Some((t.uid()?, occupies_pod(t).map(str::to_owned))))
            .collect(),
        alive: alive.iter().filter_map(|t| t.uid()).collect(),
        known: all.iter().filter_map(|t| t.uid()).collect(),
    };
    let my_uid = task.uid().unwrap_or_default();
    let loads: Vec<PodLoad> = {
        let placements = ctx.placements.lock();
        pods.iter()
            .map(|pod| PodLoad {
                name: pod.name_any(),
                ready: pod_ready(pod),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
                running_tasks: i32::try_from(Placements::occupants(
                    &placements,
                    &view,
                    &my_uid,
                    &namespace,
                    &pod.name_any(),
                ))
                .unwrap_or(i32::MAX),
            })
            .collect()
    };
    let sidecar_name = resolved
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .map(|s| s.name_any());
    let same_fleet = |t: &DelegatedTask| {
        t.status.as_ref().and_then(|s| s.sidecar.clone()) == sidecar_name
            || t.spec.sidecar_ref.as_ref().map(|r| r.name.clone()) == sidecar_name
    };
    let older_tasks_waiting = others
        .iter()
        .filter(|t| {
            phase(t) == TaskPhase::Queued
                && same_fleet(t)
                && is_older(t, task)
                && matches!(
                    dispatched_condition_reason(t).as_deref(),
                    Some(reasons::NO_CAPACITY | reasons::WAITING_FOR_OLDER_TASKS)
                )
        })
        .count();
    let my_session = session_id(task);
    let session_busy = task.spec.session_id.is_some()
        && alive.iter().any(|t| {
            session_id(t) == my_session
                && t.spec.organization_id == task.spec.organization_id
                && occupies_pod(t).is_some()
        });

    let mapping = match (&sidecar, finished) {
        (Resolved::Sidecar(_), false) => {
            let organization =
                nubabel_contract::identity::OrganizationId::parse(&task.spec.organization_id)
                    .map_err(|_| Error::MissingMetadata("valid organizationId"))?;
            ctx.mappings.get(&organization, &my_session).await?
        }
        _ => None,
    };
    let location = sidecar_name
        .as_deref()
        .and_then(|sidecar| location_in(mapping.as_ref(), &namespace, sidecar));

    let observed = Observed {
        task,
        sidecar,
        pods: &loads,
        session: location.as_ref(),
        older_tasks_waiting,
        session_busy,
        now,
    };
    let step = plan::plan(&observed);
    let requeue = plan::requeue_after(task, &step, now);
    tracing::debug!(task = %task.name_any(), ?step, "planned");

    let outcome = match step {
        Step::Wait(_) => Ok(()),
        Step::Delete => {
            Api::<DelegatedTask>::namespaced(client.clone(), &namespace)
                .delete(&task.name_any(), &DeleteParams::background())
                .await?;
            return Ok(Action::await_change());
        }
        Step::Queue { reason, message } => {
            queue(task, ctx, sidecar_name.as_deref(), reason, &message).await
        }
        Step::Finish {
            phase,
            reason,
            message,
        } => finish(task, ctx, phase, reason, &message, None).await,
        Step::Abort {
            phase,
            reason,
            message,
        } => {
            // A turn that ended while no check ran (e.g. during an error backoff) is not
            // aborted after the fact: its outcome counts.
            let ended = phase == TaskPhase::TimedOut
                && check(task, ctx, &pods).await.unwrap_or_else(|error| {
                    tracing::info!(task = %task.name_any(), %error, "no last look before the deadline abort");
                    false
                });
            if ended {
                Ok(())
            } else {
                abort(task, ctx, &pods).await;
                finish(task, ctx, phase, reason, &message, None).await
            }
        }
        Step::Dispatch(target) => {
            let sidecar = resolved
                .and_then(Result::ok)
                .ok_or(Error::MissingMetadata("sidecar"))?;
            // A new session takes a slot only if another task placed meanwhile did not take it.
            let (pod, capacity) = match &target {
                Target::Existing(location) => (location.pod.as_str(), None),
                Target::NewSession { pod } => (
                    pod.as_str(),
                    Some(
                        sidecar
                            .spec
                            .max_sessions_per_pod
                            .unwrap_or(plan::DEFAULT_MAX_SESSIONS_PER_POD),
                    ),
                ),
            };
            let placement = Placement {
                namespace: namespace.clone(),
                pod: pod.to_owned(),
                session: (task.spec.organization_id.clone(), my_session.clone()),
                at: Instant::now(),
            };
            if let Err(refusal) = ctx.placements.reserve(&my_uid, placement, &view, capacity) {
                tracing::debug!(task = %task.name_any(), pod, ?refusal, "placed meanwhile; planning again");
                return Ok(Action::requeue(PLACEMENT_RETRY));
            }
            dispatch(task, ctx, &sidecar, &pods, target, &my_session).await
        }
        Step::Check => check(task, ctx, &pods).await.map(|_| ()),
    };
    outcome?;
    ctx.backoff.reset(&task.uid().unwrap_or_default());
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// Makes sure the agent of a deleted task stops.
async fn cleanup(task: &DelegatedTask, ctx: &Context) -> Result<Action, Error> {
    if let Some(uid) = task.uid() {
        ctx.placements.release(&uid);
    }
    if !phase(task).is_finished() && plan::prompt_may_be_sent(task) {
        let namespace = task.namespace().unwrap_or_default();
        let pods = Api::<Pod>::namespaced(ctx.shared.client.clone(), &namespace)
            .list(&ListParams::default())
            .await?
            .items;
        abort(task, ctx, &pods).await;
        publish(
            ctx,
            task,
            EventType::Normal,
            reasons::CANCELLED,
            "aborted the agent of the deleted task".to_owned(),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Where a session's conversation lives, if it lives in fleet `sidecar` of `namespace`: a
/// session of the tenant last served by another fleet, or by a same-named fleet in another
/// namespace, continues nowhere here and starts a new OpenCode session.
fn location_in(
    mapping: Option<&SessionMapping>,
    namespace: &str,
    sidecar: &str,
) -> Option<SessionLocation> {
    mapping
        .filter(|m| m.sidecar_namespace == namespace && m.sidecar_name == sidecar)
        .map(|m| SessionLocation {
            opencode_session_id: m.opencode_session_id.clone(),
            pod: m.pod_name.clone(),
        })
}

async fn opencode_for(
    ctx: &Context,
    task: &DelegatedTask,
    pods: &[Pod],
    pod_name: &str,
) -> Result<OpencodeClient, Error> {
    let namespace = task.namespace().unwrap_or_default();
    let pod = pods
        .iter()
        .find(|p| p.name_any() == pod_name)
        .ok_or_else(|| Error::NoPodIp(pod_name.to_owned()))?;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or_else(|| Error::NoPodIp(pod_name.to_owned()))?;
    let sidecar = task
        .status
        .as_ref()
        .and_then(|s| s.sidecar.clone())
        .or_else(|| task.spec.sidecar_ref.as_ref().map(|r| r.name.clone()))
        .ok_or(Error::MissingMetadata("sidecar"))?;
    let secret = Api::<Secret>::namespaced(ctx.shared.client.clone(), &namespace)
        .get_opt(&secret_name(&sidecar))
        .await?;
    let password = secret
        .and_then(|s| s.data)
        .and_then(|d| {
            d.get(PASSWORD_KEY)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        })
        .ok_or_else(|| Error::NoPassword(sidecar.clone()))?;
    OpencodeClient::new(
        ClientConfig::new(format!("http://{ip}:{OPENCODE_PORT}")).with_password(password),
    )
    .map_err(|source| Error::Opencode {
        pod: pod_name.to_owned(),
        source,
    })
}

/// The user messages of a session that carry exactly `prompt`.
fn prompt_messages<'a>(
    messages: &'a [MessageWithParts],
    prompt: &'a str,
) -> Vec<&'a MessageWithParts> {
    nubabel_opencode::user_prompts(messages, prompt).collect()
}

async fn dispatch(
    task: &DelegatedTask,
    ctx: &Context,
    sidecar: &OpencodeSidecar,
    pods: &[Pod],
    target: Target,
    session: &str,
) -> Result<(), Error> {
    let namespace = task.namespace().unwrap_or_default();
    let mut status = own_status(task);
    status.sidecar = Some(sidecar.name_any());
    let resuming = plan::prompt_may_be_sent(task);
    let (pod, opencode_session) = match &target {
        Target::Existing(location) => (
            location.pod.clone(),
            Some(location.opencode_session_id.clone()),
        ),
        Target::NewSession { pod } => (pod.clone(), None),
    };
    // The client needs the sidecar recorded in status; set it before resolving the password.
    let mut with_sidecar = task.clone();
    with_sidecar.status = Some(status.clone());
    let opencode = opencode_for(ctx, &with_sidecar, pods, &pod).await?;
    let fail = |source| Error::Opencode {
        pod: pod.clone(),
        source,
    };

    // A mapped session may be gone with its pod (a restart without storage).
    let opencode_session = match opencode_session {
        Some(id) => match opencode.session(&id).await {
            Ok(_) => Some(id),
            Err(e) if e.is_not_found() && resuming => {
                // The prompt, if it was sent, went with the session: never send it again.
                return finish(
                    task,
                    ctx,
                    TaskPhase::Failed,
                    reasons::SIDECAR_POD_LOST,
                    &format!(
                        "OpenCode session {id} no longer exists on pod {pod} (the pod was \
                         restarted without storage) while the prompt was being sent"
                    ),
                    None,
                )
                .await;
            }
            Err(e) if e.is_not_found() => {
                publish(
                    ctx,
                    task,
                    EventType::Normal,
                    reasons::SESSION_LOST,
                    format!(
                        "OpenCode session {id} of session {session} no longer exists on pod \
                         {pod}; starting a new one there"
                    ),
                )
                .await;
                None
            }
            Err(e) => return Err(fail(e)),
        },
        None => None,
    };
    let opencode_session = match opencode_session {
        Some(id) => id,
        None => {
            opencode
                .create_session(Some(&task.name_any()))
                .await
                .map_err(fail)?
                .id
        }
    };

    // Record where the prompt goes, in Postgres and in status, before it is sent.
    let identity = SidecarIdentity::new(
        &sidecar.spec.organization_id,
        &namespace,
        &sidecar.name_any(),
    )
    .map_err(|_| Error::MissingMetadata("valid sidecar identity"))?;
    let task_ref = TaskRef::new(&namespace, &task.name_any())
        .map_err(|_| Error::MissingMetadata("valid task name"))?;
    ctx.mappings
        .record(&NewMapping {
            sidecar: &identity,
            session_id: session,
            opencode_session_id: &opencode_session,
            pod_name: &pod,
            task: Some(&task_ref),
        })
        .await?;
    let attempt_started = Timestamp::now();
    if !resuming || status.opencode_session_id.as_deref() != Some(opencode_session.as_str()) {
        status.attempts += 1;
    }
    status.phase = Some(TaskPhase::Pending);
    status.sidecar_pod = Some(pod.clone());
    status.opencode_session_id = Some(opencode_session.clone());
    set(
        &mut status,
        task,
        types::DISPATCHED,
        cstatus::UNKNOWN,
        reasons::DISPATCHING,
        format!("sending the prompt to OpenCode session {opencode_session} on pod {pod}"),
    );
    write_status(task, ctx, status.clone()).await?;
    let attempt_started_from_status = conditions::find(&status.conditions, types::DISPATCHED)
        .map(|c| c.last_transition_time.0)
        .unwrap_or(attempt_started);

    // Was the prompt sent already (an earlier attempt that ended in doubt)?
    let before = opencode
        .messages(&opencode_session, None)
        .await
        .map_err(fail)?;
    let since_ms = (attempt_started_from_status.as_millisecond()) - CLOCK_SKEW.as_millis() as i64;
    let known: Vec<String> = prompt_messages(&before, &task.spec.prompt)
        .iter()
        .map(|m| m.info.id.clone())
        .collect();
    let already = if resuming {
        prompt_messages(&before, &task.spec.prompt)
            .into_iter()
            .find(|m| m.info.time.created.is_some_and(|c| c >= since_ms))
            .map(|m| m.info.id.clone())
    } else {
        None
    };

    // OpenCode accepted the prompt earlier but had not listed it: never send it again.
    let accepted_before =
        resuming && dispatched_condition_reason(task).as_deref() == Some(reasons::PROMPT_SENT);
    let message_id = match already {
        Some(id) => id,
        None if accepted_before => {
            tracing::debug!(task = %task.name_any(), "the accepted prompt is not listed yet");
            return Ok(());
        }
        None => {
            let mut request = PromptRequest::text(task.spec.prompt.clone());
            if let Some(agent) = &task.spec.agent {
                request = request.with_agent(agent.clone());
            }
            let sent = opencode.prompt_async(&opencode_session, &request).await;
            // Success or not, the session's messages say whether OpenCode has the prompt;
            // `prompt_async` answers before the message is stored, so look a few times.
            let mut found = None;
            for _ in 0..PROMPT_LISTING_TRIES {
                let after = opencode
                    .messages(&opencode_session, None)
                    .await
                    .map_err(fail)?;
                found = prompt_messages(&after, &task.spec.prompt)
                    .into_iter()
                    .find(|m| !known.contains(&m.info.id))
                    .map(|m| m.info.id.clone());
                if found.is_some() {
                    break;
                }
                tokio::time::sleep(PROMPT_LISTING_INTERVAL).await;
            }
            match (found, sent) {
                (Some(id), _) => id,
                (None, Err(source)) => return Err(fail(source)),
                (None, Ok(())) => {
                    // Accepted but not listed yet: record that, so no reconcile sends it again.
                    set(
                        &mut status,
                        task,
                        types::DISPATCHED,
                        cstatus::UNKNOWN,
                        reasons::PROMPT_SENT,
                        format!(
                            "OpenCode session {opencode_session} on pod {pod} accepted the prompt; \
                             waiting for it to be listed"
                        ),
                    );
                    write_status(task, ctx, status).await?;
                    return Ok(());
                }
            }
        }
    };

    status.phase = Some(TaskPhase::Running);
    status.prompt_message_id = Some(message_id);
    status.dispatch_time = Some(Time(Timestamp::now()));
    set(
        &mut status,
        task,
        types::DISPATCHED,
        cstatus::TRUE,
        reasons::PROMPT_ACCEPTED,
        format!("OpenCode session {opencode_session} on pod {pod} has the prompt"),
    );
    set(
        &mut status,
        task,
        types::SUCCEEDED,
        cstatus::UNKNOWN,
        "Running",
        "the agent is working".to_owned(),
    );
    write_status(task, ctx, status).await?;
    publish(
        ctx,
        task,
        EventType::Normal,
        reasons::PROMPT_ACCEPTED,
        format!("sent to OpenCode session {opencode_session} on pod {pod}"),
    )
    .await;
    Ok(())
}

/// Looks at OpenCode: a finished turn ends the task. True when it did.
async fn check(task: &DelegatedTask, ctx: &Context, pods: &[Pod]) -> Result<bool, Error> {
    let status = task.status.clone().unwrap_or_default();
    let (Some(pod), Some(session)) = (
        status.sidecar_pod.clone(),
        status.opencode_session_id.clone(),
    ) else {
        return Ok(false);
    };
    let opencode = opencode_for(ctx, task, pods, &pod).await?;
    let fail = |source| Error::Opencode {
        pod: pod.clone(),
        source,
    };
    let busy = opencode
        .session_status()
        .await
        .map_err(fail)?
        .contains_key(&session);
    if busy {
        return Ok(false);
    }
    let messages = match opencode.messages(&session, None).await {
        Ok(messages) => messages,
        Err(e) if e.is_not_found() => {
            return finish(
                task,
                ctx,
                TaskPhase::Failed,
                reasons::SIDECAR_POD_LOST,
                &format!(
                    "OpenCode session {session} no longer exists on pod {pod}: the pod was \
                     restarted and the turn went with it"
                ),
                None,
            )
            .await
            .map(|()| true);
        }
        Err(e) => return Err(fail(e)),
    };
    let Some(prompt_id) = status.prompt_message_id.as_deref() else {
        return Ok(false);
    };
    let Some(start) = messages.iter().position(|m| m.info.id == prompt_id) else {
        return Ok(false);
    };
    let answers: Vec<MessageWithParts> = messages[start + 1..]
        .iter()
        .filter(|m| m.info.role == Role::Assistant)
        .cloned()
        .collect();
    let Some(last) = answers.last() else {
        return Ok(false);
    };
    if let Some(error) = &last.info.error {
        let message = error.message().unwrap_or("the agent failed").to_owned();
        return finish(
            task,
            ctx,
            TaskPhase::Failed,
            &error.name.clone(),
            &message,
            None,
        )
        .await
        .map(|()| true);
    }
    let done =
        last.info.time.completed.is_some() && last.info.finish.as_deref() != Some("tool-calls");
    if !done {
        return Ok(false);
    }
    let output = nubabel_opencode::final_assistant_text(&answers).unwrap_or_default();
    finish(
        task,
        ctx,
        TaskPhase::Succeeded,
        reasons::COMPLETED,
        "the agent finished",
        Some(output),
    )
    .await
    .map(|()| true)
}

async fn abort(task: &DelegatedTask, ctx: &Context, pods: &[Pod]) {
    let status = task.status.clone().unwrap_or_default();
    let (Some(pod), Some(session)) = (status.sidecar_pod, status.opencode_session_id) else {
        return;
    };
    match opencode_for(ctx, task, pods, &pod).await {
        Ok(opencode) => {
            if let Err(error) = opencode.abort(&session).await {
                tracing::info!(task = %task.name_any(), %error, "abort did not reach OpenCode");
            }
        }
        Err(error) => tracing::info!(task = %task.name_any(), %error, "no OpenCode to abort"),
    }
}

async fn queue(
    task: &DelegatedTask,
    ctx: &Context,
    sidecar: Option<&str>,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    if let Some(uid) = task.uid() {
        ctx.placements.release(&uid);
    }
    let mut status = own_status(task);
    let was_queued = status.phase == Some(TaskPhase::Queued);
    status.phase = Some(TaskPhase::Queued);
    status.sidecar = sidecar.map(str::to_owned);
    let changed = set(
        &mut status,
        task,
        types::DISPATCHED,
        cstatus::FALSE,
        reason,
        message.to_owned(),
    );
    if changed || !was_queued {
        write_status(task, ctx, status).await?;
        publish(ctx, task, EventType::Normal, reason, message.to_owned()).await;
    }
    Ok(())
}

async fn finish(
    task: &DelegatedTask,
    ctx: &Context,
    phase: TaskPhase,
    reason: &str,
    message: &str,
    output: Option<String>,
) -> Result<(), Error> {
    let mut status = own_status(task);
    status.phase = Some(phase);
    status.completion_time = Some(Time(Timestamp::now()));
    let succeeded = phase == TaskPhase::Succeeded;
    set(
        &mut status,
        task,
        types::SUCCEEDED,
        if succeeded {
            cstatus::TRUE
        } else {
            cstatus::FALSE
        },
        reason,
        message.to_owned(),
    );
    if status.dispatch_time.is_none() {
        set(
            &mut status,
            task,
            types::DISPATCHED,
            cstatus::FALSE,
            reason,
            message.to_owned(),
        );
    }
    status.error = (!succeeded).then(|| TaskError {
        reason: reason.to_owned(),
        message: message.to_owned(),
    });
    status.output = output.as_deref().map(bounded_output);

    if let Some(uid) = task.uid().and_then(|u| u.parse().ok()) {
        let namespace = task.namespace().unwrap_or_default();
        let name = task.name_any();
        let phase_name = format!("{phase:?}");
        nubabel_store::results::record(
            &ctx.pool,
            &nubabel_store::results::TaskResult {
                task_uid: uid,
                organization_id: &task.spec.organization_id,
                task_namespace: &namespace,
                task_name: &name,
                session_id: task.spec.session_id.as_deref(),
                phase: &phase_name,
                output: output.as_deref(),
                error_reason: (!succeeded).then_some(reason),
                error_message: (!succeeded).then_some(message),
            },
        )
        .await?;
    }
    write_status(task, ctx, status).await?;
    if let Some(uid) = task.uid() {
        ctx.placements.release(&uid);
        ctx.just_finished.insert(uid);
    }
    let type_ = if matches!(phase, TaskPhase::Succeeded | TaskPhase::Cancelled) {
        EventType::Normal
    } else {
        EventType::Warning
    };
    publish(ctx, task, type_, reason, format!("{phase:?}: {message}")).await;
    Ok(())
}

/// The final answer, cut at a character boundary to [`MAX_OUTPUT_BYTES`] with a note.
pub fn bounded_output(text: &str) -> String {
    const NOTE: &str = "\n[truncated; the whole answer is kept in the database]";
    if text.len() <= MAX_OUTPUT_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_OUTPUT_BYTES - NOTE.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{NOTE}", &text[..end])
}

/// The fields of status this controller owns (everything but the callback API's progress).
fn own_status(task: &DelegatedTask) -> DelegatedTaskStatus {
    let mut status = task.status.clone().unwrap_or_default();
    status.progress = None;
    status
}

fn set(
    status: &mut DelegatedTaskStatus,
    task: &DelegatedTask,
    type_: &str,
    value: &str,
    reason: &str,
    message: String,
) -> bool {
    // The API server of Kubernetes 1.20 turns an empty message into null under server-side
    // apply, which the schema refuses: never send one.
    let message = if message.is_empty() {
        reason.to_owned()
    } else {
        message
    };
    conditions::set_condition(
        &mut status.conditions,
        conditions::condition(
            type_,
            value,
            reason,
            message,
            task.metadata.generation,
            Time(Timestamp::now()),
        ),
    )
}

async fn write_status(
    task: &DelegatedTask,
    ctx: &Context,
    mut status: DelegatedTaskStatus,
) -> Result<(), Error> {
    status.observed_generation = task.metadata.generation;
    status.progress = None;
    let patch = serde_json::json!({
        "apiVersion": DelegatedTask::api_version(&()),
        "kind": DelegatedTask::kind(&()),
        "status": status,
    });
    Api::<DelegatedTask>::namespaced(
        ctx.shared.client.clone(),
        &task.namespace().unwrap_or_default(),
    )
    .patch_status(
        &task.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    task: &DelegatedTask,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let reference: ObjectReference = task.object_ref(&());
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, MAX_EVENT_NOTE_BYTES)),
        action: EVENT_ACTION.to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.shared.recorder.publish(&event, &reference).await {
        tracing::warn!(%error, reason, "failed to publish an event");
    }
}

/// Runs the task controller until `stop` resolves.
pub async fn run(
    shared: Shared,
    pool: PgPool,
    concurrency: u16,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let tasks = shared.watched::<DelegatedTask>();
    let controller = Controller::new(tasks, watcher::Config::default());
    let store = controller.store();
    // A pod that becomes ready (or goes away) matters to the queued and running tasks of its
    // namespace; they are few, so wake them all.
    let pod_store = store.clone();
    let pods = watcher::Config::default().labels("app.kubernetes.io/managed-by=nubabel-operator");
    let controller = controller.watches(shared.watched::<Pod>(), pods, move |pod| {
        let namespace = pod.namespace();
        pod_store
            .state()
            .iter()
            .filter(|t| t.namespace() == namespace && !phase(t).is_finished())
            .map(|t| ObjectRef::from_obj(t.as_ref()))
            .collect::<Vec<ObjectRef<DelegatedTask>>>()
    });
    // A task that finishes frees a slot: wake the queued tasks of its namespace, and the
    // queued turns of its session in any namespace, at once instead of at their next recheck
    // (finished tasks rarely change again, so this is about one wake per finish; wakes of one
    // task coalesce in the controller's queue).
    let queue_store = store.clone();
    let controller = controller.watches(
        shared.watched::<DelegatedTask>(),
        watcher::Config::default(),
        move |finished: DelegatedTask| {
            if !phase(&finished).is_finished() {
                return Vec::new();
            }
            let namespace = finished.namespace();
            queue_store
                .state()
                .iter()
                .filter(|t| phase(t) == TaskPhase::Queued)
                .filter(|t| {
                    t.namespace() == namespace
                        || (t.spec.session_id.is_some()
                            && t.spec.session_id == finished.spec.session_id
                            && t.spec.organization_id == finished.spec.organization_id)
                })
                .map(|t| ObjectRef::from_obj(t.as_ref()))
                .collect::<Vec<ObjectRef<DelegatedTask>>>()
        },
    );
    let ctx = Arc::new(Context {
        metrics: shared.metrics.controller(CONTROLLER_NAME),
        mappings: SessionMappings::new(pool.clone()),
        pool,
        backoff: Backoff::default(),
        tasks: store,
        just_finished: JustFinished::default(),
        placements: Placements::default(),
        shared,
    });
    controller
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile_task, error_policy, ctx)
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "task reconcile did not succeed");
            }
            std::future::ready(())
        })
        .await;
    tracing::info!("the task controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_output_is_cut_at_a_character_boundary_with_a_note() {
        let text = "é".repeat(MAX_OUTPUT_BYTES);
        let bounded = bounded_output(&text);
        assert!(bounded.len() <= MAX_OUTPUT_BYTES);
        assert!(bounded.ends_with("kept in the database]"));
        assert_eq!(bounded_output("short"), "short");
    }

    #[test]
    fn a_session_continues_only_in_the_fleet_and_namespace_that_served_it() {
        let mapping = SessionMapping {
            session_pk: sqlx::types::Uuid::nil(),
            organization_id: "org-a".into(),
            session_id: "chat".into(),
            opencode_session_id: "ses_1".into(),
            sidecar_namespace: "team-a".into(),
            sidecar_name: "fleet".into(),
            pod_name: "fleet-0".into(),
            task: None,
        };
        let here = location_in(Some(&mapping), "team-a", "fleet").expect("same fleet");
        assert_eq!(
            (here.opencode_session_id.as_str(), here.pod.as_str()),
            ("ses_1", "fleet-0")
        );
        // A same-named fleet in another namespace has its own pods: fleet-0 there is not the
        // pod that holds the conversation.
        assert!(location_in(Some(&mapping), "team-b", "fleet").is_none());
        assert!(location_in(Some(&mapping), "team-a", "other").is_none());
        assert!(location_in(None, "team-a", "fleet").is_none());
    }

    fn live(tasks: &[(&str, Option<&str>)]) -> Live {
        tasks
            .iter()
            .map(|(uid, pod)| ((*uid).to_owned(), pod.map(str::to_owned)))
            .collect()
    }

    fn at(namespace: &str, pod: &str) -> Placement {
        // A session of its own for each placement, so only capacity decides.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Placement {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            session: ("org".to_owned(), format!("own-{n}")),
            at: Instant::now(),
        }
    }

    fn uids(uids: &[&str]) -> HashSet<String> {
        uids.iter().map(|uid| (*uid).to_owned()).collect()
    }

    /// The cache shows `live` (this namespace's other unfinished tasks) and nothing else.
    fn view(live: Live) -> CacheView {
        let alive: HashSet<String> = live.keys().cloned().collect();
        CacheView {
            live,
            known: alive.clone(),
            alive,
        }
    }

    #[test]
    fn tasks_placed_together_never_take_more_slots_than_a_pod_has() {
        let placements = Placements::default();
        // Three tasks created together: the cache shows none of them on a pod yet.
        let fresh = live(&[("a", None), ("b", None), ("c", None)]);
        let others = |me: &str| {
            let mut others = fresh.clone();
            others.remove(me);
            view(others)
        };
        let reserve = |uid: &str, placement: Placement| {
            placements.reserve(uid, placement, &others(uid), Some(2))
        };
        assert_eq!(reserve("a", at("ns", "pod-0")), Ok(()));
        assert_eq!(reserve("b", at("ns", "pod-0")), Ok(()));
        assert_eq!(reserve("c", at("ns", "pod-0")), Err(Refusal::PodFull));
        assert_eq!(reserve("c", at("ns", "pod-1")), Ok(()));

        // A task the cache shows on the pod counts once, placed here or not; one the cache
        // shows finished (`b`) no longer counts.
        let mut cached = view(live(&[("a", Some("pod-0")), ("x", Some("pod-0"))]));
        cached.known.extend(uids(&["b", "c"]));
        assert_eq!(
            Placements::occupants(&placements.lock(), &cached, "me", "ns", "pod-0"),
            2
        );
        // A pod of the same name in another namespace is another pod.
        assert_eq!(
            placements.reserve("d", at("other", "pod-0"), &view(live(&[])), Some(1)),
            Ok(())
        );
    }

    #[test]
    fn a_task_placed_before_the_cache_shows_it_still_takes_its_slot() {
        let placements = Placements::default();
        // `a` is placed while `b` plans with a cache that does not hold `a` yet.
        assert_eq!(
            placements.reserve("a", at("ns", "pod-0"), &view(live(&[("b", None)])), Some(1)),
            Ok(())
        );
        let before_a = view(live(&[]));
        assert_eq!(
            placements.reserve("b", at("ns", "pod-0"), &before_a, Some(1)),
            Err(Refusal::PodFull)
        );
        // Once the cache holds `a` finished, its slot is free.
        let a_finished = CacheView {
            known: uids(&["a"]),
            ..CacheView::default()
        };
        assert_eq!(
            placements.reserve("b", at("ns", "pod-0"), &a_finished, Some(1)),
            Ok(())
        );
        // A placement the cache never showed (its task deleted at once) stops counting.
        let stale = Placements::default();
        let mut old = at("ns", "pod-0");
        old.at = Instant::now()
            .checked_sub(UNSEEN_PLACEMENT_GRACE + Duration::from_secs(1))
            .expect("the clock is past the grace");
        stale.lock().insert("gone".to_owned(), old);
        assert_eq!(
            stale.reserve("c", at("ns", "pod-0"), &view(live(&[])), Some(1)),
            Ok(())
        );
    }

    #[test]
    fn a_released_slot_is_free_again_and_a_continuing_session_is_always_placed() {
        let placements = Placements::default();
        let others = view(live(&[("a", None)]));
        assert_eq!(
            placements.reserve("a", at("ns", "pod-0"), &view(live(&[("b", None)])), Some(1)),
            Ok(())
        );
        assert_eq!(
            placements.reserve("b", at("ns", "pod-0"), &others, Some(1)),
            Err(Refusal::PodFull)
        );
        // The session of b lives on pod-0: it continues there whatever the load.
        assert_eq!(
            placements.reserve("b", at("ns", "pod-0"), &others, None),
            Ok(())
        );

        // Released (finished or queued again), `a` and `b` take no slot, live or not.
        placements.release("a");
        placements.release("b");
        assert_eq!(
            placements.reserve("c", at("ns", "pod-0"), &others, Some(1)),
            Ok(())
        );
    }

    #[test]
    fn turns_of_one_session_are_placed_one_at_a_time_in_any_namespace() {
        let placements = Placements::default();
        let turn = |namespace: &str, pod: &str, session: &str| Placement {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            session: ("org-a".to_owned(), session.to_owned()),
            at: Instant::now(),
        };
        let everyone = CacheView {
            alive: uids(&["one", "two", "three", "other-org"]),
            known: uids(&["one", "two", "three", "other-org"]),
            ..CacheView::default()
        };
        assert_eq!(
            placements.reserve("one", turn("ns", "pod-0", "chat"), &everyone, Some(8)),
            Ok(())
        );
        // Another turn of the session waits, on another pod, without capacity, or elsewhere.
        for placement in [
            turn("ns", "pod-1", "chat"),
            turn("ns", "pod-0", "chat"),
            turn("team-b", "pod-0", "chat"),
        ] {
            assert_eq!(
                placements.reserve("two", placement.clone(), &everyone, None),
                Err(Refusal::SessionBusy),
                "{placement:?}"
            );
        }
        // Another session, or the same sessionId of another organization, goes ahead.
        assert_eq!(
            placements.reserve("three", turn("ns", "pod-1", "other"), &everyone, Some(8)),
            Ok(())
        );
        let mut foreign = turn("ns", "pod-1", "chat");
        foreign.session.0 = "org-b".to_owned();
        assert_eq!(
            placements.reserve("other-org", foreign, &everyone, Some(8)),
            Ok(())
        );
        // Placing the same task again is no conflict with itself.
        assert_eq!(
            placements.reserve("one", turn("ns", "pod-0", "chat"), &everyone, None),
            Ok(())
        );
        // Once the cache shows the first turn finished, the next one goes.
        let one_finished = CacheView {
            alive: uids(&["two"]),
            known: uids(&["one", "two"]),
            ..CacheView::default()
        };
        assert_eq!(
            placements.reserve("two", turn("ns", "pod-0", "chat"), &one_finished, None),
            Ok(())
        );
        placements.release("two");
        placements.release("one");
        assert_eq!(
            placements.reserve("two", turn("ns", "pod-0", "chat"), &everyone, None),
            Ok(())
        );
    }
}
