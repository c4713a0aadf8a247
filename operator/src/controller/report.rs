//! What every controller reports the same way: Kubernetes events on its objects, and the end
//! of its run loop.

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

use super::{MAX_EVENT_NOTE_BYTES, truncate};

/// Action of the events the controllers publish.
const EVENT_ACTION: &str = "Reconcile";

/// Publishes an event on `reference`; a failure is logged, never fatal.
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, MAX_EVENT_NOTE_BYTES)),
        action: EVENT_ACTION.to_owned(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, reference).await {
        tracing::warn!(%error, reason, "failed to publish an event");
    }
}

/// Drives a controller's reconcile results until the controller stops (failures are reported
/// by its error policy already).
pub async fn run_to_end<T, E: std::fmt::Display>(
    controller: &'static str,
    results: impl Stream<Item = Result<T, E>>,
) {
    results
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, controller, "reconcile did not succeed");
            }
            std::future::ready(())
        })
        .await;
    tracing::info!(controller, "controller stopped");
}
