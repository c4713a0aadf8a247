//! Version `v1alpha1` of the `nubabel.io` API group.

mod sidecar;
mod task;

pub use sidecar::*;
pub use task::*;
