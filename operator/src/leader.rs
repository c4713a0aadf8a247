//! Leader election on a `coordination.k8s.io/v1` Lease, so that of two or more operator
//! replicas exactly one reconciles while the others wait as standbys.
//!
//! The protocol is client-go's: a candidate takes the Lease when it is free or when its record
//! has not changed for a whole lease duration (measured on the candidate's own clock, so clock
//! skew between nodes does not matter); the leader renews it every retry period and steps down
//! when it could not renew for the renew deadline, before anyone else may take it. Every write
//! is a replace guarded by the `resourceVersion` that was read, so two candidates can never
//! both win the same round. On a graceful shutdown the leader releases the Lease, and a standby
//! takes over at its next retry instead of waiting for the lease to expire.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

/// How the Lease is held: the defaults of client-go (15 s, 10 s, 2 s) suit most clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long a Lease stays valid after its last renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps failing to renew before it steps down; shorter than
    /// `lease_duration`, so it stops before a standby may take over.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The timings cannot work: the renew deadline must lie between the retry period and the
    /// lease duration.
    #[error(
        "invalid lease timings: need retry period < renew deadline < lease duration, got {0:?}"
    )]
    InvalidTimings(Timings),
    /// Another replica holds the Lease now.
    #[error("the lease was taken over by {holder}")]
    TakenOver {
        /// The new holder.
        holder: String,
    },
    /// Renewals failed for longer than the renew deadline.
    #[error("failed to renew the lease for {0:?}")]
    RenewDeadlineExceeded(Duration),
    /// The API server refused or failed a request.
    #[error("lease request failed")]
    Api(#[source] kube::Error),
}

/// What a candidate should do with the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It holds the Lease: renew it.
    Renew,
    /// The Lease is free or expired: take it.
    Take,
    /// Someone else holds a valid Lease.
    Wait {
        /// The current holder.
        holder: String,
    },
}

/// Decides from the Lease's holder and how long its record has stood unchanged (as this
/// candidate observed it) whether to renew, take or wait.
pub fn decide(
    spec: Option<&LeaseSpec>,
    identity: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> Decision {
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|holder| !holder.is_empty());
    let Some(holder) = holder else {
        return Decision::Take;
    };
    if holder == identity {
        return Decision::Renew;
    }
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|seconds| u64::try_from(seconds).ok())
        .map_or(default_duration, Duration::from_secs);
    if unchanged_for >= duration {
        Decision::Take
    } else {
        Decision::Wait {
            holder: holder.to_owned(),
        }
    }
}

/// The result of one attempt to acquire or renew.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    Held,
    HeldBy(String),
    /// Another candidate wrote between our read and our write.
    Conflict,
}

/// The Lease record as last seen, and when it was first seen in that state.
struct Observation {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

/// One replica's candidacy for the operator's Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    observed: Option<Observation>,
}

impl LeaderElector {
    /// A candidate for Lease `namespace/name` under `identity` (the pod name).
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: Timings,
    ) -> Result<Self, Error> {
        if !(timings.retry_period < timings.renew_deadline
            && timings.renew_deadline < timings.lease_duration)
        {
            return Err(Error::InvalidTimings(timings));
        }
        Ok(Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timings,
            observed: None,
        })
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the Lease. Errors are logged and retried; cancel the
    /// future to stop waiting.
    pub async fn acquire(&mut self) {
        let mut last_holder = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        tracing::info!(%holder, "another replica leads; waiting as a standby");
                        last_holder = Some(holder);
                    }
                }
                Ok(Attempt::Conflict) => {
                    tracing::debug!("another candidate wrote the lease first");
                }
                Err(error) => tracing::warn!(error = %error, "failed to acquire the lease"),
            }
            tokio::time::sleep(self.timings.retry_period).await;
        }
    }

    /// Keeps renewing the Lease; returns why leadership was lost. The caller must stop acting
    /// as the leader as soon as this returns.
    pub async fn hold(&mut self) -> Error {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timings.retry_period).await;
            let remaining = self
                .timings
                .renew_deadline
                .saturating_sub(renewed.elapsed());
            let attempt = tokio::time::timeout(remaining, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(Attempt::Held)) => renewed = Instant::now(),
                Ok(Ok(Attempt::HeldBy(holder))) => return Error::TakenOver { holder },
                Ok(Ok(Attempt::Conflict)) => tracing::warn!("conflict while renewing the lease"),
                Ok(Err(error)) => tracing::warn!(error = %error, "failed to renew the lease"),
                Err(_) => tracing::warn!("renewing the lease timed out"),
            }
            if renewed.elapsed() >= self.timings.renew_deadline {
                return Error::RenewDeadlineExceeded(renewed.elapsed());
            }
        }
    }

    /// Gives the Lease up if this replica holds it, so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(Error::Api)? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(Error::Api)?;
        tracing::info!(identity = %self.identity, "released the lease");
        Ok(())
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(Error::Api)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.record(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
                Err(error) => Err(Error::Api(error)),
            };
        };

        let unchanged_for = self.observe(lease.spec.as_ref());
        match decide(
            lease.spec.as_ref(),
            &self.identity,
            unchanged_for,
            self.timings.lease_duration,
        ) {
            Decision::Wait { holder } => return Ok(Attempt::HeldBy(holder)),
            Decision::Renew | Decision::Take => {}
        }
        // `replace` sends the resourceVersion that was read: a concurrent writer makes it 409.
        lease.spec = Some(self.record(lease.spec.as_ref()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(error) => Err(Error::Api(error)),
        }
    }

    /// Records the Lease's state and returns how long it has stood unchanged.
    fn observe(&mut self, spec: Option<&LeaseSpec>) -> Duration {
        let record = (
            spec.and_then(|s| s.holder_identity.clone()),
            spec.and_then(|s| s.renew_time.clone()),
        );
        match &self.observed {
            Some(observation) if observation.record == record => observation.since.elapsed(),
            _ => {
                self.observed = Some(Observation {
                    record,
                    since: Instant::now(),
                });
                Duration::ZERO
            }
        }
    }

    /// The Lease spec that makes this replica the holder, keeping the acquire time and the
    /// transition count when it already was.
    fn record(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = now();
        let already_held = previous
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|holder| holder == self.identity);
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.timings.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if already_held {
                previous.and_then(|s| s.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(match previous {
                Some(_) if !already_held => transitions.saturating_add(1),
                _ => transitions,
            }),
            ..LeaseSpec::default()
        }
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{mock_client, not_found, timeout_after_1s};

    const FIFTEEN: Duration = Duration::from_secs(15);

    fn held_by(holder: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(seconds),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_or_released_lease_is_taken() {
        assert_eq!(decide(None, "a", Duration::ZERO, FIFTEEN), Decision::Take);
        let released = LeaseSpec::default();
        assert_eq!(
            decide(Some(&released), "a", Duration::ZERO, FIFTEEN),
            Decision::Take
        );
        let emptied = held_by("", 15);
        assert_eq!(
            decide(Some(&emptied), "a", Duration::ZERO, FIFTEEN),
            Decision::Take
        );
    }

    #[test]
    fn the_holder_renews_its_own_lease() {
        let spec = held_by("a", 15);
        assert_eq!(
            decide(Some(&spec), "a", Duration::from_secs(100), FIFTEEN),
            Decision::Renew
        );
    }

    #[test]
    fn a_fresh_lease_of_another_replica_is_left_alone() {
        let spec = held_by("b", 15);
        assert_eq!(
            decide(Some(&spec), "a", Duration::from_secs(14), FIFTEEN),
            Decision::Wait {
                holder: "b".to_owned()
            }
        );
    }

    #[test]
    fn a_lease_unchanged_for_its_whole_duration_is_taken_over() {
        let spec = held_by("b", 4);
        assert_eq!(
            decide(Some(&spec), "a", Duration::from_secs(4), FIFTEEN),
            Decision::Take
        );
    }

    #[tokio::test]
    async fn timings_that_would_let_two_leaders_overlap_are_refused() {
        let (client, _server) = mock_client();
        let overlapping = Timings {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert!(matches!(
            LeaderElector::new(client, "ns", "lease", "a", overlapping),
            Err(Error::InvalidTimings(_))
        ));
    }

    #[tokio::test]
    async fn taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let (client, _server) = mock_client();
        let elector = LeaderElector::new(client, "ns", "l", "a", Timings::default()).unwrap();
        let mut previous = held_by("b", 15);
        previous.lease_transitions = Some(3);
        let taken = elector.record(Some(&previous));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));

        let renewed = elector.record(Some(&taken));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }

    fn lease_json(holder: &str, resource_version: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "op", "namespace": "ops", "resourceVersion": resource_version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}
        })
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_with_this_replica_as_holder() {
        let (client, mut server) = mock_client();
        let mut elector = LeaderElector::new(client, "ops", "op", "a", Timings::default()).unwrap();
        let attempt = tokio::spawn(async move { elector.try_acquire_or_renew().await.unwrap() });
        timeout_after_1s(async {
            let get = server.next().await;
            assert_eq!(
                get.line(),
                "GET /apis/coordination.k8s.io/v1/namespaces/ops/leases/op"
            );
            get.respond(404, not_found());
            let create = server.next().await;
            assert_eq!(
                create.line(),
                "POST /apis/coordination.k8s.io/v1/namespaces/ops/leases"
            );
            assert_eq!(create.body["spec"]["holderIdentity"], "a");
            assert_eq!(create.body["spec"]["leaseDurationSeconds"], 15);
            create.echo();
        })
        .await;
        assert_eq!(attempt.await.unwrap(), Attempt::Held);
    }

    #[tokio::test]
    async fn an_expired_lease_is_replaced_guarded_by_its_resource_version() {
        let (client, mut server) = mock_client();
        let timings = Timings {
            lease_duration: Duration::from_millis(300),
            renew_deadline: Duration::from_millis(200),
            retry_period: Duration::from_millis(100),
        };
        let mut elector = LeaderElector::new(client, "ops", "op", "a", timings).unwrap();
        let attempts = tokio::spawn(async move {
            let first = elector.try_acquire_or_renew().await.unwrap();
            tokio::time::sleep(Duration::from_millis(350)).await;
            (first, elector.try_acquire_or_renew().await.unwrap())
        });
        timeout_after_1s(async {
            // Without a duration in the record, the candidate's own (300 ms) applies.
            let mut lease = lease_json("b", "7");
            lease["spec"]["leaseDurationSeconds"] = serde_json::Value::Null;
            let get = server.next().await;
            get.respond(200, lease.clone());
            let get = server.next().await;
            get.respond(200, lease);
            let replace = server.next().await;
            assert_eq!(
                replace.line(),
                "PUT /apis/coordination.k8s.io/v1/namespaces/ops/leases/op"
            );
            assert_eq!(replace.body["metadata"]["resourceVersion"], "7");
            assert_eq!(replace.body["spec"]["holderIdentity"], "a");
            assert_eq!(replace.body["spec"]["leaseTransitions"], 1);
            replace.echo();
        })
        .await;
        let (first, second) = attempts.await.unwrap();
        assert_eq!(first, Attempt::HeldBy("b".to_owned()));
        assert_eq!(second, Attempt::Held);
    }
}
