//! Everything a task's plan looks at: its fleet and the fleet's pods (API server), where its
//! session lives (Postgres), and what the controller's cache shows of the other tasks. The
//! reads are I/O; turning them, with the placement ledger, into the planner's input is pure.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use nubabel_contract::identity::OrganizationId;
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_store::sessions::{SessionMapping, SessionMappings};

use super::error::Error;
use super::ledger::{CacheView, Ledger, Placement, SessionKey};
use super::plan::{self, Observed, PodLoad, Resolved, SessionLocation, Step, Target, reasons};
use crate::controller::fleet;

/// How the task's fleet was found.
#[derive(Clone, Debug)]
pub enum FleetLookup {
    /// The fleet the task runs on.
    Found(Box<OpencodeSidecar>),
    /// The task names no existing fleet and none serves its organization.
    NotFound,
    /// Several fleets serve the organization; the task must name one.
    Ambiguous,
}

impl FleetLookup {
    /// The found fleet.
    pub fn fleet(&self) -> Option<&OpencodeSidecar> {
        match self {
            Self::Found(sidecar) => Some(sidecar),
            Self::NotFound | Self::Ambiguous => None,
        }
    }

    fn resolved(&self) -> Resolved<'_> {
        match self {
            Self::Found(sidecar) => Resolved::Sidecar(sidecar),
            Self::NotFound => Resolved::NotFound,
            Self::Ambiguous => Resolved::Ambiguous,
        }
    }
}

/// What the other tasks in the controller's cache mean for one task.
#[derive(Clone, Debug, Default)]
pub struct Neighbourhood {
    /// Which other tasks are live and where.
    pub view: CacheView,
    /// How many older tasks of the same fleet wait for capacity.
    pub older_tasks_waiting: usize,
    /// Whether the cache shows another turn of the task's session holding a slot.
    pub session_running: bool,
}

/// What one reconcile observed of a task's world.
#[derive(Clone, Debug)]
pub struct Observation {
    /// The task's namespace.
    pub namespace: String,
    /// The task's uid.
    pub uid: String,
    /// The Nubabel session it continues or starts.
    pub session: SessionKey,
    /// Its fleet (nothing is looked up for a finished task).
    pub fleet: FleetLookup,
    /// The fleet's pods.
    pub pods: Vec<Pod>,
    /// Where the session lives, if in this fleet.
    pub location: Option<SessionLocation>,
    /// The other tasks.
    pub neighbourhood: Neighbourhood,
    /// When it was observed.
    pub now: Timestamp,
}

/// Observes `task`: `cached` is one snapshot of the controller's cache, `just_finished` the
/// tasks this operator finished that the cache may not show finished yet.
pub async fn observe(
    task: &DelegatedTask,
    client: &Client,
    mappings: &SessionMappings,
    cached: &[Arc<DelegatedTask>],
    just_finished: &HashSet<String>,
) -> Result<Observation, Error> {
    let namespace = task
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let finished = task.phase().is_finished();
    let fleet = if finished {
        FleetLookup::NotFound
    } else {
        find_fleet(&Api::namespaced(client.clone(), &namespace), task).await?
    };
    let pods = match &fleet {
        FleetLookup::Found(sidecar) => {
            Api::<Pod>::namespaced(client.clone(), &namespace)
                .list(&ListParams::default().labels(&fleet::selector_string(&sidecar.name_any())))
                .await?
                .items
        }
        FleetLookup::NotFound | FleetLookup::Ambiguous => Vec::new(),
    };
    let session = session_key(task);
    let location = match fleet.fleet() {
        Some(sidecar) => {
            let organization = OrganizationId::parse(&session.organization_id).map_err(|_| {
                Error::InvalidIdentity {
                    what: "organizationId",
                    value: session.organization_id.clone(),
                }
            })?;
            let mapping = mappings.get(&organization, &session.session_id).await?;
            location_in(mapping.as_ref(), &namespace, &sidecar.name_any())
        }
        None => None,
    };
    let fleet_name = fleet.fleet().map(ResourceExt::name_any);
    Ok(Observation {
        neighbourhood: neighbourhood(task, fleet_name.as_deref(), cached, just_finished),
        uid: task.uid().unwrap_or_default(),
        namespace,
        session,
        fleet,
        pods,
        location,
        now: Timestamp::now(),
    })
}

impl Observation {
    /// Plans the task's next step with `ledger`, and places the task when the step dispatches
    /// it: each pod's load and the session's business come from the cache and the ledger
    /// together, so the plan is the only decision and no other reconcile comes between.
    pub fn plan(&self, task: &DelegatedTask, ledger: &mut Ledger) -> Step {
        let view = &self.neighbourhood.view;
        let loads: Vec<PodLoad> = self
            .pods
            .iter()
            .map(|pod| PodLoad {
                name: pod.name_any(),
                ready: fleet::pod_ready(pod),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
                running_tasks: i32::try_from(ledger.occupants(
                    view,
                    &self.uid,
                    &self.namespace,
                    &pod.name_any(),
                ))
                .unwrap_or(i32::MAX),
            })
            .collect();
        let session_busy = task.spec.session_id.is_some()
            && (self.neighbourhood.session_running
                || ledger.session_placed(view, &self.uid, &self.session));
        let step = plan::plan(&Observed {
            task,
            sidecar: self.fleet.resolved(),
            pods: &loads,
            session: self.location.as_ref(),
            older_tasks_waiting: self.neighbourhood.older_tasks_waiting,
            session_busy,
            now: self.now,
        });
        if let Step::Dispatch(target) = &step {
            let pod = match target {
                Target::Existing(location) => &location.pod,
                Target::NewSession { pod } => pod,
            };
            ledger.place(
                &self.uid,
                Placement {
                    namespace: self.namespace.clone(),
                    pod: pod.clone(),
                    session: self.session.clone(),
                    at: Instant::now(),
                },
            );
        }
        step
    }
}

/// Finds the task's fleet: the one it names, or the only one serving its organization.
async fn find_fleet(
    api: &Api<OpencodeSidecar>,
    task: &DelegatedTask,
) -> Result<FleetLookup, kube::Error> {
    if let Some(reference) = &task.spec.sidecar_ref {
        return Ok(api
            .get_opt(&reference.name)
            .await?
            .map_or(FleetLookup::NotFound, |s| FleetLookup::Found(Box::new(s))));
    }
    let mut serving: Vec<OpencodeSidecar> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| s.spec.organization_id == task.spec.organization_id)
        .collect();
    Ok(match (serving.pop(), serving.is_empty()) {
        (None, _) => FleetLookup::NotFound,
        (Some(sidecar), true) => FleetLookup::Found(Box::new(sidecar)),
        (Some(_), false) => FleetLookup::Ambiguous,
    })
}

/// The session a task serves.
pub fn session_key(task: &DelegatedTask) -> SessionKey {
    SessionKey {
        organization_id: task.spec.organization_id.clone(),
        session_id: plan::session_id(task),
    }
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

/// Whether `task` holds (or may hold) a session slot on a pod: the pod's name.
pub fn occupied_pod(task: &DelegatedTask) -> Option<&str> {
    if task.phase().is_finished() || !plan::prompt_may_be_sent(task) {
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

/// What the cache's other tasks mean for `task` in fleet `fleet_name` (pure).
pub fn neighbourhood(
    task: &DelegatedTask,
    fleet_name: Option<&str>,
    cached: &[Arc<DelegatedTask>],
    just_finished: &HashSet<String>,
) -> Neighbourhood {
    // Tasks this operator finished count as finished even before the cache shows it.
    let counts = |t: &&Arc<DelegatedTask>| {
        t.uid() != task.uid() && !t.uid().is_some_and(|uid| just_finished.contains(&uid))
    };
    let in_namespace: Vec<&Arc<DelegatedTask>> = cached
        .iter()
        .filter(|t| t.namespace() == task.namespace())
        .filter(counts)
        .collect();
    // Every unfinished task in the cache, in any namespace: a session belongs to the
    // organization, so its turns wait for each other across namespaces too.
    let live: Vec<&Arc<DelegatedTask>> = cached
        .iter()
        .filter(counts)
        .filter(|t| !t.phase().is_finished())
        .collect();
    let view = CacheView {
        pods_of_live_neighbours: in_namespace
            .iter()
            .filter(|t| !t.phase().is_finished())
            .filter_map(|t| Some((t.uid()?, occupied_pod(t).map(str::to_owned))))
            .collect(),
        live: live.iter().filter_map(|t| t.uid()).collect(),
        known: cached.iter().filter_map(|t| t.uid()).collect(),
    };
    let same_fleet = |t: &DelegatedTask| {
        t.status.as_ref().and_then(|s| s.sidecar.as_deref()) == fleet_name
            || t.spec.sidecar_ref.as_ref().map(|r| r.name.as_str()) == fleet_name
    };
    let older_tasks_waiting = in_namespace
        .iter()
        .filter(|t| {
            t.phase() == TaskPhase::Queued
                && same_fleet(t)
                && is_older(t, task)
                && matches!(
                    plan::dispatched_reason(t),
                    Some(reasons::NO_CAPACITY | reasons::WAITING_FOR_OLDER_TASKS)
                )
        })
        .count();
    let session = session_key(task);
    let session_running = live
        .iter()
        .any(|t| session_key(t) == session && occupied_pod(t).is_some());
    Neighbourhood {
        view,
        older_tasks_waiting,
        session_running,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use nubabel_crds::v1alpha1::{DelegatedTaskStatus, OpencodeSidecarSpec};

    use super::*;

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

    fn task(name: &str, namespace: &str, session: &str) -> DelegatedTask {
        let mut task = DelegatedTask::new(
            name,
            serde_json::from_value(serde_json::json!({
                "organizationId": "org-a",
                "prompt": "hi",
                "sessionId": session,
                "sidecarRef": {"name": "fleet"}
            }))
            .unwrap(),
        );
        task.metadata.namespace = Some(namespace.to_owned());
        task.metadata.uid = Some(format!("uid-{name}"));
        task.metadata.creation_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        task
    }

    fn ready_pod(name: &str) -> Pod {
        let mut pod = Pod {
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: "True".to_owned(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        pod.metadata.name = Some(name.to_owned());
        pod
    }

    fn observation(
        task: &DelegatedTask,
        cached: &[Arc<DelegatedTask>],
        pods: &[&str],
    ) -> Observation {
        let fleet = OpencodeSidecar::new(
            "fleet",
            serde_json::from_value::<OpencodeSidecarSpec>(serde_json::json!({
                "organizationId": "org-a",
                "model": "fake/fake-model",
                "maxSessionsPerPod": 1
            }))
            .unwrap(),
        );
        Observation {
            namespace: task.namespace().unwrap(),
            uid: task.uid().unwrap(),
            session: session_key(task),
            fleet: FleetLookup::Found(Box::new(fleet)),
            pods: pods.iter().map(|p| ready_pod(p)).collect(),
            location: None,
            neighbourhood: neighbourhood(task, Some("fleet"), cached, &HashSet::new()),
            now: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn tasks_planned_together_take_the_free_slots_once_and_queue_for_the_rest() {
        let tasks: Vec<Arc<DelegatedTask>> = ["a", "b", "c"]
            .iter()
            .map(|name| Arc::new(task(name, "ns", &format!("chat-{name}"))))
            .collect();
        // The cache shows all three, none placed yet; each pod has one slot.
        let mut ledger = Ledger::default();
        let steps: Vec<Step> = tasks
            .iter()
            .map(|t| observation(t, &tasks, &["fleet-0", "fleet-1"]).plan(t, &mut ledger))
            .collect();
        assert_eq!(
            steps[..2],
            [
                Step::Dispatch(Target::NewSession {
                    pod: "fleet-0".to_owned()
                }),
                Step::Dispatch(Target::NewSession {
                    pod: "fleet-1".to_owned()
                }),
            ]
        );
        assert!(
            matches!(&steps[2], Step::Queue { reason, .. } if *reason == reasons::NO_CAPACITY),
            "{:?}",
            steps[2]
        );
    }

    #[test]
    fn turns_of_one_session_planned_together_run_one_at_a_time_in_any_namespace() {
        let first = Arc::new(task("first", "ns", "chat"));
        let second = Arc::new(task("second", "team-b", "chat"));
        let cached = [first.clone(), second.clone()];
        let mut ledger = Ledger::default();
        let step = observation(&first, &cached, &["fleet-0"]).plan(&first, &mut ledger);
        assert!(matches!(step, Step::Dispatch(_)), "{step:?}");
        // The cache does not show the first turn placed yet; the ledger does.
        let step =
            observation(&second, &cached, &["fleet-0", "fleet-1"]).plan(&second, &mut ledger);
        assert!(
            matches!(&step, Step::Queue { reason, .. } if *reason == reasons::SESSION_BUSY),
            "{step:?}"
        );
        // Planning the first turn again is no conflict with itself.
        let again = observation(&first, &cached, &["fleet-0"]).plan(&first, &mut ledger);
        assert!(matches!(again, Step::Dispatch(_)), "{again:?}");
    }

    #[test]
    fn the_cache_shows_a_running_turn_of_the_session_and_older_tasks_waiting() {
        let mut running = task("running", "other-ns", "chat");
        running.status = Some(DelegatedTaskStatus {
            phase: Some(TaskPhase::Running),
            sidecar: Some("fleet".to_owned()),
            sidecar_pod: Some("fleet-0".to_owned()),
            opencode_session_id: Some("ses_1".to_owned()),
            dispatch_time: Some(Time(Timestamp::UNIX_EPOCH)),
            ..DelegatedTaskStatus::default()
        });
        let mut older = task("older", "ns", "other");
        older.status = Some(DelegatedTaskStatus {
            phase: Some(TaskPhase::Queued),
            sidecar: Some("fleet".to_owned()),
            ..DelegatedTaskStatus::default()
        });
        crate::controller::task::status::set_condition(
            older.status.as_mut().unwrap(),
            &task("older", "ns", "other"),
            nubabel_crds::conditions::types::DISPATCHED,
            nubabel_crds::conditions::status::FALSE,
            reasons::NO_CAPACITY,
            "full".to_owned(),
        );
        let mut me = task("me", "ns", "chat");
        me.metadata.creation_timestamp = Some(Time(Timestamp::from_second(10).unwrap()));
        let cached = [Arc::new(running), Arc::new(older), Arc::new(me.clone())];
        let seen = neighbourhood(&me, Some("fleet"), &cached, &HashSet::new());
        assert!(seen.session_running);
        assert_eq!(seen.older_tasks_waiting, 1);
        // The running turn is in another namespace: it takes no slot of this namespace's pods.
        assert!(
            seen.view
                .pods_of_live_neighbours
                .values()
                .all(Option::is_none)
        );
        // Once this operator finished it, it counts as finished before the cache shows it.
        let finished: HashSet<String> = ["uid-running".to_owned()].into();
        assert!(!neighbourhood(&me, Some("fleet"), &cached, &finished).session_running);
    }
}
