//! Step 5 of the sidecar pipeline: computes the status from the applied StatefulSet and its
//! pods (pure), says which condition changes deserve an event (pure), and writes the status
//! with server-side apply when it changed.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use nubabel_crds::conditions::{condition, find, set_condition, status, types};
use nubabel_crds::v1alpha1::{OpencodeSidecar, OpencodeSidecarStatus, SidecarPodStatus};

use crate::controller::FIELD_MANAGER;
use crate::controller::fleet::{pod_ready, selector_string};

/// Condition reasons of `OpencodeSidecar`.
pub mod reasons {
    /// Every desired pod is ready.
    pub const ALL_REPLICAS_READY: &str = "AllReplicasReady";
    /// Some desired pods are not ready.
    pub const REPLICAS_NOT_READY: &str = "ReplicasNotReady";
    /// `spec.replicas` is 0: no pods, storage kept.
    pub const SUSPENDED: &str = "Suspended";
    /// Pods are being added or removed.
    pub const SCALING: &str = "Scaling";
    /// Pods are being replaced with the current template.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// Every pod exists with the current template; some are still starting.
    pub const STARTING: &str = "PodsStarting";
    /// Nothing left to do.
    pub const COMPLETE: &str = "Complete";
    /// No problem.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// The operator waits for a corrected spec.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Writing the status failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to write the status")]
pub struct Error(#[source] pub kube::Error);

fn now_time() -> Time {
    Time(jiff::Timestamp::now())
}

/// The status of a fleet whose children were applied.
pub fn fleet_status(
    previous: Option<&OpencodeSidecarStatus>,
    name: &str,
    generation: Option<i64>,
    desired: i32,
    stateful_set: &StatefulSet,
    pods: &[Pod],
    now: Time,
) -> OpencodeSidecarStatus {
    let mut next = previous.cloned().unwrap_or_default();
    let sts = stateful_set.status.clone().unwrap_or_default();
    let ready = sts.ready_replicas.unwrap_or(0);
    let updated = sts.updated_replicas.unwrap_or(0);
    let rolled_out = match (sts.observed_generation, stateful_set.metadata.generation) {
        (Some(observed), Some(current)) => observed >= current,
        _ => false,
    };

    next.replicas = sts.replicas;
    next.ready_replicas = ready;
    next.selector = Some(selector_string(name));
    next.observed_generation = generation;
    next.pods = pod_statuses(previous, pods);

    let set = |conditions: &mut Vec<Condition>, type_, status_, reason, message: String| {
        set_condition(
            conditions,
            condition(type_, status_, reason, message, generation, now.clone()),
        );
    };
    let counts = format!("{ready}/{desired} pods ready");
    let conditions = &mut next.conditions;
    if desired == 0 {
        set(
            conditions,
            types::READY,
            status::FALSE,
            reasons::SUSPENDED,
            "scaled to 0 pods; their storage is kept".to_owned(),
        );
    } else if ready >= desired {
        set(
            conditions,
            types::READY,
            status::TRUE,
            reasons::ALL_REPLICAS_READY,
            counts.clone(),
        );
    } else {
        set(
            conditions,
            types::READY,
            status::FALSE,
            reasons::REPLICAS_NOT_READY,
            counts.clone(),
        );
    }

    let (progressing, reason, message) = if sts.replicas != desired {
        (
            status::TRUE,
            reasons::SCALING,
            format!("{} of {desired} pods exist", sts.replicas),
        )
    } else if !rolled_out || (desired > 0 && updated < desired) {
        (
            status::TRUE,
            reasons::ROLLING_OUT,
            format!("{updated}/{desired} pods run the current template"),
        )
    } else if ready < desired {
        (status::TRUE, reasons::STARTING, counts)
    } else if desired == 0 {
        (status::FALSE, reasons::SUSPENDED, "no pods run".to_owned())
    } else {
        (status::FALSE, reasons::COMPLETE, counts)
    };
    set(conditions, types::PROGRESSING, progressing, reason, message);
    set(
        conditions,
        types::DEGRADED,
        status::FALSE,
        reasons::AS_EXPECTED,
        // NB: never an empty message: server-side apply on 1.20 turns "" into null, which the
        // schema (message: string, required) then refuses.
        "the fleet runs its current spec".to_owned(),
    );
    next
}

fn pod_statuses(previous: Option<&OpencodeSidecarStatus>, pods: &[Pod]) -> Vec<SidecarPodStatus> {
    let mut statuses: Vec<SidecarPodStatus> = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let name = pod.metadata.name.clone()?;
            let status = pod.status.as_ref();
            let ready = pod_ready(pod);
            // Sessions are counted by the task controller; keep its figure for a known pod.
            let active_sessions = previous
                .and_then(|p| p.pods.iter().find(|p| p.name == name))
                .map_or(0, |p| p.active_sessions);
            Some(SidecarPodStatus {
                ip: status.and_then(|s| s.pod_ip.clone()),
                name,
                ready,
                active_sessions,
            })
        })
        .collect();
    statuses.sort_by(|a, b| a.name.cmp(&b.name));
    statuses
}

/// The status of a fleet whose spec was refused: Degraded with what to fix, everything else
/// as it was (the running pods keep running the last valid spec).
pub fn invalid_spec_status(
    previous: Option<&OpencodeSidecarStatus>,
    name: &str,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: Time,
) -> OpencodeSidecarStatus {
    let mut next = previous.cloned().unwrap_or_default();
    next.selector = Some(selector_string(name));
    next.observed_generation = generation;
    set_condition(
        &mut next.conditions,
        condition(
            types::DEGRADED,
            status::TRUE,
            reason,
            message,
            generation,
            now.clone(),
        ),
    );
    set_condition(
        &mut next.conditions,
        condition(
            types::PROGRESSING,
            status::FALSE,
            reasons::INVALID_SPEC,
            "waiting for a corrected spec",
            generation,
            now.clone(),
        ),
    );
    if find(&next.conditions, types::READY).is_none() {
        set_condition(
            &mut next.conditions,
            condition(
                types::READY,
                status::UNKNOWN,
                reasons::INVALID_SPEC,
                "unknown until the spec is corrected",
                generation,
                now,
            ),
        );
    }
    next
}

/// The status after a transient failure: Degraded with the error's category, the rest kept;
/// `observedGeneration` stays, since the generation was not carried out.
pub fn failed_status(
    previous: Option<&OpencodeSidecarStatus>,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: Time,
) -> OpencodeSidecarStatus {
    let mut next = previous.cloned().unwrap_or_default();
    set_condition(
        &mut next.conditions,
        condition(
            types::DEGRADED,
            status::TRUE,
            reason,
            message,
            generation,
            now,
        ),
    );
    next
}

/// A user-visible change worth a Kubernetes event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Normal or Warning.
    pub type_: EventType,
    /// PascalCase reason.
    pub reason: &'static str,
    /// What happened.
    pub note: String,
}

/// The events the move from `previous` to `next` conditions deserves. Degraded becoming True
/// is left out: the error path publishes its own Warning.
pub fn transitions(previous: &[Condition], next: &[Condition]) -> Vec<Transition> {
    let changed = |type_: &str| {
        let after = find(next, type_)?;
        let before = find(previous, type_);
        let same = before.is_some_and(|b| b.status == after.status && b.reason == after.reason);
        (!same).then_some((before, after))
    };
    let mut events = Vec::new();
    if let Some((_, ready)) = changed(types::READY) {
        match (ready.status.as_str(), ready.reason.as_str()) {
            (status::TRUE, _) => events.push(Transition {
                type_: EventType::Normal,
                reason: "FleetReady",
                note: ready.message.clone(),
            }),
            (status::FALSE, reasons::SUSPENDED) => events.push(Transition {
                type_: EventType::Normal,
                reason: "FleetSuspended",
                note: ready.message.clone(),
            }),
            _ => {}
        }
    }
    if let Some((_, progressing)) = changed(types::PROGRESSING)
        && progressing.status == status::TRUE
    {
        let reason = match progressing.reason.as_str() {
            reasons::SCALING => Some("Scaling"),
            reasons::ROLLING_OUT => Some("RollingOut"),
            _ => None,
        };
        if let Some(reason) = reason {
            events.push(Transition {
                type_: EventType::Normal,
                reason,
                note: progressing.message.clone(),
            });
        }
    }
    if let Some((Some(before), after)) = changed(types::DEGRADED)
        && before.status == status::TRUE
        && after.status == status::FALSE
    {
        events.push(Transition {
            type_: EventType::Normal,
            reason: "Recovered",
            note: format!("the {} problem is resolved", before.reason),
        });
    }
    events
}

/// Writes `next` unless it equals what the object already shows (a write would trigger
/// another reconcile for nothing). Returns whether it wrote.
pub async fn write(
    api: &Api<OpencodeSidecar>,
    sidecar: &OpencodeSidecar,
    next: &OpencodeSidecarStatus,
) -> Result<bool, Error> {
    if sidecar.status.as_ref() == Some(next) {
        return Ok(false);
    }
    let name = sidecar.metadata.name.as_deref().unwrap_or_default();
    let body = serde_json::json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "OpencodeSidecar",
        "status": next,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error)?;
    Ok(true)
}

/// The current time, for condition stamps.
pub fn now() -> Time {
    now_time()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).unwrap())
    }

    fn sts(generation: i64, observed: i64, replicas: i32, ready: i32, updated: i32) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn pod(name: &str, ip: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_owned),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: if ready { "True" } else { "False" }.to_owned(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn get<'a>(status: &'a OpencodeSidecarStatus, type_: &str) -> &'a Condition {
        find(&status.conditions, type_).unwrap()
    }

    #[test]
    fn a_fully_ready_fleet_is_ready_and_done() {
        let s = fleet_status(
            None,
            "t",
            Some(3),
            2,
            &sts(4, 4, 2, 2, 2),
            &[
                pod("t-1", Some("10.0.0.2"), true),
                pod("t-0", Some("10.0.0.1"), true),
            ],
            at(10),
        );
        assert_eq!(s.replicas, 2);
        assert_eq!(s.ready_replicas, 2);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/instance=t,app.kubernetes.io/name=opencode-sidecar")
        );
        assert_eq!(
            s.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["t-0", "t-1"]
        );
        assert_eq!(s.pods[0].ip.as_deref(), Some("10.0.0.1"));
        assert!(s.pods[0].ready);
        assert_eq!(get(&s, types::READY).status, status::TRUE);
        assert_eq!(get(&s, types::PROGRESSING).reason, reasons::COMPLETE);
        assert_eq!(get(&s, types::DEGRADED).status, status::FALSE);
        assert_eq!(get(&s, types::READY).observed_generation, Some(3));
        assert!(s.conditions.iter().all(|c| !c.message.is_empty()));
    }

    #[test]
    fn pending_pods_leave_the_fleet_not_ready_and_progressing() {
        let s = fleet_status(
            None,
            "t",
            Some(1),
            3,
            &sts(1, 1, 3, 0, 3),
            &[pod("t-0", None, false)],
            at(10),
        );
        assert_eq!(get(&s, types::READY).reason, reasons::REPLICAS_NOT_READY);
        assert_eq!(get(&s, types::READY).message, "0/3 pods ready");
        assert_eq!(get(&s, types::PROGRESSING).reason, reasons::STARTING);
        assert_eq!(s.pods[0].ip, None);
    }

    #[test]
    fn a_replica_change_reads_as_scaling_and_zero_as_suspended() {
        let scaling = fleet_status(None, "t", Some(2), 3, &sts(2, 2, 1, 1, 1), &[], at(10));
        assert_eq!(get(&scaling, types::PROGRESSING).reason, reasons::SCALING);
        let suspended = fleet_status(None, "t", Some(3), 0, &sts(3, 3, 0, 0, 0), &[], at(10));
        assert_eq!(get(&suspended, types::READY).reason, reasons::SUSPENDED);
        assert_eq!(get(&suspended, types::PROGRESSING).status, status::FALSE);
    }

    #[test]
    fn an_unobserved_statefulset_generation_is_rolling_out() {
        let s = fleet_status(None, "t", Some(2), 1, &sts(5, 4, 1, 1, 1), &[], at(10));
        assert_eq!(get(&s, types::PROGRESSING).reason, reasons::ROLLING_OUT);
    }

    #[test]
    fn the_same_state_later_keeps_transition_times_and_session_counts() {
        let first = fleet_status(
            None,
            "t",
            Some(1),
            1,
            &sts(1, 1, 1, 1, 1),
            &[pod("t-0", None, true)],
            at(10),
        );
        let mut with_sessions = first.clone();
        with_sessions.pods[0].active_sessions = 2;
        let later = fleet_status(
            Some(&with_sessions),
            "t",
            Some(1),
            1,
            &sts(1, 1, 1, 1, 1),
            &[pod("t-0", None, true)],
            at(99),
        );
        assert_eq!(later, with_sessions);
        assert_eq!(get(&later, types::READY).last_transition_time, at(10));
    }

    #[test]
    fn an_invalid_spec_marks_degraded_and_keeps_the_rest() {
        let running = fleet_status(
            None,
            "t",
            Some(1),
            1,
            &sts(1, 1, 1, 1, 1),
            &[pod("t-0", None, true)],
            at(10),
        );
        let s = invalid_spec_status(
            Some(&running),
            "t",
            Some(2),
            "LimitBelowRequest",
            "fix it",
            at(20),
        );
        assert_eq!(get(&s, types::DEGRADED).status, status::TRUE);
        assert_eq!(get(&s, types::DEGRADED).reason, "LimitBelowRequest");
        assert_eq!(get(&s, types::DEGRADED).message, "fix it");
        assert_eq!(get(&s, types::PROGRESSING).reason, reasons::INVALID_SPEC);
        assert_eq!(get(&s, types::READY).status, status::TRUE);
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.pods, running.pods);
        let fresh = invalid_spec_status(None, "t", Some(1), "InvalidModel", "fix it", at(20));
        assert!(fresh.conditions.iter().all(|c| !c.message.is_empty()));
    }

    #[test]
    fn a_transient_failure_marks_degraded_without_claiming_the_generation() {
        let running = fleet_status(None, "t", Some(1), 1, &sts(1, 1, 1, 1, 1), &[], at(10));
        let s = failed_status(Some(&running), Some(2), "Apply", "boom", at(20));
        assert_eq!(get(&s, types::DEGRADED).reason, "Apply");
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn becoming_ready_scaling_suspending_and_recovering_are_events() {
        let starting = fleet_status(None, "t", Some(1), 1, &sts(1, 1, 1, 0, 1), &[], at(10));
        let ready = fleet_status(
            Some(&starting),
            "t",
            Some(1),
            1,
            &sts(1, 1, 1, 1, 1),
            &[],
            at(20),
        );
        assert_eq!(
            transitions(&starting.conditions, &ready.conditions)
                .iter()
                .map(|t| t.reason)
                .collect::<Vec<_>>(),
            ["FleetReady"]
        );
        let scaling = fleet_status(
            Some(&ready),
            "t",
            Some(2),
            3,
            &sts(2, 2, 1, 1, 1),
            &[],
            at(30),
        );
        assert!(
            transitions(&ready.conditions, &scaling.conditions)
                .iter()
                .any(|t| t.reason == "Scaling")
        );
        let suspended = fleet_status(
            Some(&ready),
            "t",
            Some(3),
            0,
            &sts(3, 3, 0, 0, 0),
            &[],
            at(40),
        );
        assert!(
            transitions(&ready.conditions, &suspended.conditions)
                .iter()
                .any(|t| t.reason == "FleetSuspended")
        );
        let degraded = invalid_spec_status(Some(&ready), "t", Some(4), "InvalidModel", "x", at(50));
        assert!(transitions(&ready.conditions, &degraded.conditions).is_empty());
        let recovered = fleet_status(
            Some(&degraded),
            "t",
            Some(5),
            1,
            &sts(1, 1, 1, 1, 1),
            &[],
            at(60),
        );
        assert_eq!(
            transitions(&degraded.conditions, &recovered.conditions)
                .iter()
                .map(|t| t.reason)
                .collect::<Vec<_>>(),
            ["Recovered"]
        );
        assert!(transitions(&ready.conditions, &ready.conditions).is_empty());
    }
}
