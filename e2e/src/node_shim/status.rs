//! The pod status the shim reports: phase, conditions and each container's state.

use serde_json::json;

use super::container::ContainerRuntime;
use super::now;
use super::pod::PodRuntime;

impl ContainerRuntime {
    /// The container's entry in `containerStatuses` or `initContainerStatuses`.
    pub(super) fn status(&self, uid: &str, waiting_reason: &str) -> serde_json::Value {
        let terminated = |reason: &str| {
            let (code, finished) = self.last_termination.clone().unwrap_or((0, now()));
            json!({
                "exitCode": code,
                "reason": reason,
                "message": self.last_exit.clone().unwrap_or_default(),
                "startedAt": self.started_at,
                "finishedAt": finished,
            })
        };
        let mut last_state = json!({});
        let state = if self.completed {
            json!({"terminated": terminated("Completed")})
        } else if let Some(started) = &self.started_at
            && self.process.is_some()
        {
            if self.last_termination.is_some() {
                last_state = json!({"terminated": terminated("Error")});
            }
            json!({"running": {"startedAt": started}})
        } else if self.last_termination.is_some() && self.restarts <= 1 {
            // Just failed: kubectl shows Error (Init:Error for an init container).
            json!({"terminated": terminated("Error")})
        } else if self.last_termination.is_some() {
            last_state = json!({"terminated": terminated("Error")});
            json!({"waiting": {
                "reason": "CrashLoopBackOff",
                "message": self.last_exit.clone().unwrap_or_default()
            }})
        } else {
            json!({"waiting": {"reason": waiting_reason}})
        };
        json!({
            "name": self.container.name,
            "image": self.container.image.clone().unwrap_or_default(),
            "imageID": "",
            "containerID": format!("shim://{uid}/{}", self.container.name),
            "ready": self.ready || self.completed,
            "started": self.process.is_some(),
            "restartCount": self.restarts,
            "state": state,
            "lastState": last_state,
        })
    }
}

impl PodRuntime {
    pub(super) fn status(&self) -> serde_json::Value {
        let initialized = self.initialized();
        let all_ready = initialized && self.containers.iter().all(|c| c.ready);
        let ready = if all_ready { "True" } else { "False" };
        let waiting = if initialized {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let statuses: Vec<serde_json::Value> = self
            .containers
            .iter()
            .map(|c| c.status(&self.uid, waiting))
            .collect();
        let init_statuses: Vec<serde_json::Value> = self
            .init_containers
            .iter()
            .map(|c| c.status(&self.uid, "PodInitializing"))
            .collect();
        let phase = if self.failed {
            "Failed"
        } else if initialized {
            "Running"
        } else {
            "Pending"
        };
        let initialized_condition = if initialized {
            json!({"type": "Initialized", "status": "True"})
        } else {
            let pending: Vec<&str> = self
                .init_containers
                .iter()
                .filter(|c| !c.completed)
                .map(|c| c.container.name.as_str())
                .collect();
            json!({
                "type": "Initialized", "status": "False",
                "reason": "ContainersNotInitialized",
                "message": format!("containers with incomplete status: [{}]", pending.join(" "))
            })
        };
        let [a, b, c, _] = self.ip.octets();
        json!({"status": {
            "phase": phase,
            "hostIP": format!("{a}.{b}.{c}.1"),
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": self.start_time,
            "conditions": [
                initialized_condition,
                {"type": "ContainersReady", "status": ready},
                {"type": "Ready", "status": ready},
                {"type": "PodScheduled", "status": "True"}
            ],
            "initContainerStatuses": init_statuses,
            "containerStatuses": statuses,
        }})
    }
}
