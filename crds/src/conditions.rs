//! Condition types, reasons and the helper that updates a condition list.
//!
//! Conditions follow `metav1.Condition`: one per type, `lastTransitionTime` kept unless the
//! status flips, `observedGeneration` set to the generation the writer acted on.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types of both resources.
pub mod types {
    /// The sidecar fleet has its desired number of ready pods.
    pub const READY: &str = "Ready";
    /// The operator is moving the fleet towards its desired state.
    pub const PROGRESSING: &str = "Progressing";
    /// The fleet or its spec has a problem the operator cannot fix alone.
    pub const DEGRADED: &str = "Degraded";
    /// The task's prompt was accepted by an OpenCode server.
    pub const DISPATCHED: &str = "Dispatched";
    /// The task finished successfully (False once it finished otherwise).
    pub const SUCCEEDED: &str = "Succeeded";
}

/// The three condition statuses.
pub mod status {
    /// The condition holds.
    pub const TRUE: &str = "True";
    /// The condition does not hold.
    pub const FALSE: &str = "False";
    /// Not known yet.
    pub const UNKNOWN: &str = "Unknown";
}

/// Sets the condition of `new.type_` in `conditions`, keeping its `lastTransitionTime` when the
/// status did not change. Returns whether anything other than the generation changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let changed = existing.status != new.status
                || existing.reason != new.reason
                || existing.message != new.message;
            let last_transition_time = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time
            };
            *existing = Condition {
                last_transition_time,
                ..new
            };
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Builds a condition stamped with `now` and `generation`.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now,
    }
}

/// Looks up a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn a_new_condition_is_appended() {
        let mut list = Vec::new();
        let changed = set_condition(
            &mut list,
            condition(
                types::READY,
                status::TRUE,
                "AllReady",
                "ok",
                Some(1),
                at(10),
            ),
        );
        assert!(changed);
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn same_status_keeps_the_transition_time_but_takes_the_new_reason() {
        let mut list = vec![condition(
            types::READY,
            status::FALSE,
            "Scaling",
            "1/3",
            Some(1),
            at(10),
        )];
        let changed = set_condition(
            &mut list,
            condition(
                types::READY,
                status::FALSE,
                "Scaling",
                "2/3",
                Some(2),
                at(20),
            ),
        );
        assert!(changed);
        assert_eq!(list[0].last_transition_time, at(10));
        assert_eq!(list[0].message, "2/3");
        assert_eq!(list[0].observed_generation, Some(2));
    }

    #[test]
    fn a_status_flip_moves_the_transition_time() {
        let mut list = vec![condition(
            types::READY,
            status::FALSE,
            "Scaling",
            "1/3",
            Some(1),
            at(10),
        )];
        set_condition(
            &mut list,
            condition(
                types::READY,
                status::TRUE,
                "AllReady",
                "3/3",
                Some(1),
                at(30),
            ),
        );
        assert_eq!(list[0].last_transition_time, at(30));
    }

    #[test]
    fn an_identical_condition_reports_no_change() {
        let c = condition(
            types::READY,
            status::TRUE,
            "AllReady",
            "3/3",
            Some(1),
            at(10),
        );
        let mut list = vec![c.clone()];
        assert!(!set_condition(
            &mut list,
            Condition {
                last_transition_time: at(50),
                ..c
            }
        ));
        assert_eq!(list[0].last_transition_time, at(10));
    }
}
