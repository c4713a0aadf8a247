//! The DelegatedTask controller: sends each task's prompt to its tenant's OpenCode fleet,
//! follows the agent until it finishes, and records the outcome in the task's status.
//!
//! One reconcile is a pipeline: [`observe`] reads the task's world (fleet, pods, session
//! mapping, the cache's other tasks), the pure [`plan`] picks the one next step with the
//! placement [`ledger`] held, and the step is carried out: [`dispatch`] for what talks to
//! OpenCode, [`status`] for what is written. A prompt is sent at most once per task: the
//! chosen session and pod are recorded before sending, and after any doubt (an ambiguous HTTP
//! failure, a restart mid-send) the session's messages are read before it is ever sent again.

pub mod dispatch;
pub mod error;
pub mod ledger;
pub mod observe;
pub mod plan;
pub mod status;
pub mod subagents;
pub mod turn;
pub mod workspace;

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use nubabel_crds::v1alpha1::{DelegatedTask, SubagentStatus, TaskPhase};
use nubabel_store::sessions::SessionMappings;
use sqlx::PgPool;

use self::dispatch::{Checked, Dispatched, Dispatcher};
pub use self::error::Error;
use self::ledger::{JustFinished, Placements};
use self::observe::Observation;
use self::plan::{Ending, Step, reasons};
use crate::controller::sidecar::oh_my_opencode;
use crate::controller::{Backoff, Shared, fleet, report};
use crate::metrics::ControllerMetrics;

/// The controller's name in metrics and logs.
pub const CONTROLLER_NAME: &str = "delegatedtask";

/// Guarantees a running task's agent is aborted before the task disappears.
pub const FINALIZER: &str = "nubabel.io/abort-running-task";

/// What the task controller needs.
pub struct Context {
    /// The Kubernetes client.
    client: Client,
    /// The steps that talk to OpenCode.
    dispatcher: Dispatcher,
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
    /// Pods this operator placed tasks on, which the cache may not show yet.
    placements: Placements,
}

/// Reconciles one task.
pub async fn reconcile_task(task: Arc<DelegatedTask>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let namespace = task
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<DelegatedTask> = Api::namespaced(ctx.client.clone(), &namespace);
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

/// Observe, plan (placing the task when it dispatches), carry out.
async fn apply(task: &DelegatedTask, ctx: &Context) -> Result<Action, Error> {
    if task.phase().is_finished()
        && let Some(uid) = task.uid()
    {
        ctx.just_finished.forget(&uid);
    }
    // One snapshot of the cache for the whole plan.
    let cached = ctx.tasks.state();
    let observation = observe::observe(
        task,
        &ctx.client,
        &ctx.mappings,
        &cached,
        &ctx.just_finished.snapshot(),
    )
    .await?;
    let step = ctx
        .placements
        .decide(|ledger| observation.plan(task, ledger));
    let requeue = plan::requeue_after(task, &step, observation.now);
    tracing::debug!(task = %task.name_any(), ?step, "planned");
    if step == Step::Delete {
        Api::<DelegatedTask>::namespaced(ctx.client.clone(), &observation.namespace)
            .delete(&task.name_any(), &DeleteParams::background())
            .await?;
        return Ok(Action::await_change());
    }
    carry_out(task, ctx, &observation, step).await?;
    ctx.backoff.reset(&observation.uid);
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

async fn carry_out(
    task: &DelegatedTask,
    ctx: &Context,
    observation: &Observation,
    step: Step,
) -> Result<(), Error> {
    let pods = &observation.pods;
    let background_wait = oh_my_opencode::background_wait(
        observation
            .fleet
            .fleet()
            .and_then(|f| f.spec.oh_my_opencode.as_ref()),
    );
    match step {
        Step::Wait(_) | Step::Delete => Ok(()),
        Step::Queue { reason, message } => {
            let sidecar = observation.fleet.fleet().map(ResourceExt::name_any);
            queue(task, ctx, sidecar.as_deref(), reason, &message).await
        }
        Step::Finish {
            phase,
            reason,
            message,
        } => {
            finish(
                task,
                ctx,
                pods,
                Ending::without_output(phase, reason, message),
            )
            .await
        }
        Step::Abort {
            phase,
            reason,
            message,
        } => {
            // A turn that ended while no check ran (e.g. during an error backoff) is not
            // aborted after the fact: its outcome counts.
            if phase == TaskPhase::TimedOut {
                match ctx.dispatcher.check(task, pods, background_wait).await {
                    Ok(Checked {
                        ending: Some(ending),
                        subagents,
                    }) => return finish(&with_subagents(task, subagents), ctx, pods, ending).await,
                    Ok(Checked { ending: None, .. }) => {}
                    Err(error) => {
                        tracing::info!(task = %task.name_any(), %error, "no last look before the deadline abort");
                    }
                }
            }
            ctx.dispatcher.abort(task, pods).await;
            finish(
                task,
                ctx,
                pods,
                Ending::without_output(phase, reason, message),
            )
            .await
        }
        Step::Dispatch(target) => {
            // The planner dispatches only to a fleet it found.
            let Some(sidecar) = observation.fleet.fleet() else {
                return Ok(());
            };
            let session = &observation.session.session_id;
            match ctx
                .dispatcher
                .dispatch(task, sidecar, pods, target, session)
                .await?
            {
                Dispatched::Running | Dispatched::AwaitingListing => Ok(()),
                Dispatched::Ended(ending) => finish(task, ctx, pods, ending).await,
            }
        }
        Step::Check => {
            let checked = ctx.dispatcher.check(task, pods, background_wait).await?;
            let seen = with_subagents(task, checked.subagents);
            match checked.ending {
                Some(ending) => finish(&seen, ctx, pods, ending).await,
                None if seen.status != task.status => {
                    status::write(&ctx.client, task, status::own_status(&seen)).await?;
                    Ok(())
                }
                None => Ok(()),
            }
        }
    }
}

/// `task` as last seen, with its subagents as they are now.
fn with_subagents(task: &DelegatedTask, subagents: Vec<SubagentStatus>) -> DelegatedTask {
    let mut seen = task.clone();
    seen.status.get_or_insert_with(Default::default).subagents = subagents;
    seen
}

/// Makes sure the agent of a deleted task stops.
async fn cleanup(task: &DelegatedTask, ctx: &Context) -> Result<Action, Error> {
    if let Some(uid) = task.uid() {
        ctx.placements.release(&uid);
    }
    if !task.phase().is_finished() && plan::prompt_may_be_sent(task) {
        let namespace = task.namespace().unwrap_or_default();
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
            .list(&ListParams::default())
            .await?
            .items;
        ctx.dispatcher.abort(task, &pods).await;
        ctx.dispatcher
            .publish(
                task,
                EventType::Normal,
                reasons::CANCELLED,
                "aborted the agent of the deleted task".to_owned(),
            )
            .await;
    }
    Ok(Action::await_change())
}

/// Puts the task back in the queue of fleet `sidecar`, giving up any place it had.
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
    if let Some(next) = status::queued(task, sidecar, reason, message) {
        status::write(&ctx.client, task, next).await?;
        ctx.dispatcher
            .publish(task, EventType::Normal, reason, message.to_owned())
            .await;
    }
    Ok(())
}

/// Ends the task: its result in Postgres (the whole answer and what it changed in its
/// workspace), then its status, its slot freed.
async fn finish(
    task: &DelegatedTask,
    ctx: &Context,
    pods: &[Pod],
    ending: Ending,
) -> Result<(), Error> {
    let succeeded = ending.phase == TaskPhase::Succeeded;
    let changes = ctx.dispatcher.changes(task, pods).await;
    let mut finished = status::finished(task, &ending);
    if let (Some(changes), Some(workspace)) = (&changes, finished.workspace.as_mut()) {
        workspace.changes = workspace::change_summary(changes);
        workspace.bytes = i64::try_from(changes.bytes).unwrap_or(i64::MAX);
    }
    if let Some(uid) = task.uid().and_then(|u| u.parse().ok()) {
        let namespace = task.namespace().unwrap_or_default();
        let name = task.name_any();
        nubabel_store::results::record(
            &ctx.pool,
            &nubabel_store::results::TaskResult {
                task_uid: uid,
                organization_id: &task.spec.organization_id,
                task_namespace: &namespace,
                task_name: &name,
                session_id: task.spec.session_id.as_deref(),
                phase: ending.phase.as_str(),
                output: ending.output.as_deref(),
                error_reason: (!succeeded).then_some(ending.reason.as_str()),
                error_message: (!succeeded).then_some(ending.message.as_str()),
            },
        )
        .await?;
        if let Some(changes) = &changes {
            nubabel_store::changes::record(&ctx.pool, uid, &changes.repositories).await?;
        }
    }
    status::write(&ctx.client, task, finished).await?;
    if let Some(uid) = task.uid() {
        ctx.placements.release(&uid);
        ctx.just_finished.insert(uid);
    }
    let type_ = if matches!(ending.phase, TaskPhase::Succeeded | TaskPhase::Cancelled) {
        EventType::Normal
    } else {
        EventType::Warning
    };
    let note = format!("{}: {}", ending.phase, ending.message);
    ctx.dispatcher
        .publish(task, type_, &ending.reason, note)
        .await;
    Ok(())
}

/// Runs the task controller until `stop` resolves.
pub async fn run(
    shared: Shared,
    pool: PgPool,
    bridges: workspace::Bridges,
    concurrency: u16,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let tasks = shared.watched::<DelegatedTask>();
    let controller = Controller::new(tasks, watcher::Config::default());
    let store = controller.store();
    // A pod that becomes ready (or goes away) matters to the queued and running tasks of its
    // namespace; they are few, so wake them all.
    let pod_store = store.clone();
    let pods = watcher::Config::default().labels(fleet::MANAGED_SELECTOR);
    let controller = controller.watches(shared.watched::<Pod>(), pods, move |pod| {
        let namespace = pod.namespace();
        pod_store
            .state()
            .iter()
            .filter(|t| t.namespace() == namespace && !t.phase().is_finished())
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
            if !finished.phase().is_finished() {
                return Vec::new();
            }
            let namespace = finished.namespace();
            queue_store
                .state()
                .iter()
                .filter(|t| t.phase() == TaskPhase::Queued)
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
    let mappings = SessionMappings::new(pool.clone());
    let ctx = Arc::new(Context {
        client: shared.client.clone(),
        dispatcher: Dispatcher::new(
            shared.client.clone(),
            shared.recorder.clone(),
            mappings.clone(),
            bridges,
        ),
        mappings,
        metrics: shared.metrics.controller(CONTROLLER_NAME),
        pool,
        backoff: Backoff::default(),
        tasks: store,
        just_finished: JustFinished::default(),
        placements: Placements::default(),
    });
    let results = controller
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile_task, error_policy, ctx);
    report::run_to_end(CONTROLLER_NAME, results).await;
}
