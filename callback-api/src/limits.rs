//! Per-tenant limits: how many callbacks one tenant may have in flight, how many SSE streams it
//! may hold open, how many of those may be replaying history (the reads that fall back to
//! Postgres) at once, and how many `POST /api/delegate` requests it may have waiting, on one
//! replica. Past the callback, stream or replay limit a request gets 429 with `Retry-After` before
//! anything is read or written, so one tenant's burst or leak cannot take the connections and
//! commit slots every other tenant shares; a live stream that has to catch up from Postgres
//! waits for a replay share instead (it was answered 200 long ago); past the wait limit a
//! delegate request is answered 202 at once instead of waiting (its task is created either
//! way).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::Notify;

use crate::{error::ApiError, metrics::LimitLabels};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Sidecar callbacks being processed.
    Callbacks,
    /// Open SSE streams.
    Streams,
    /// SSE streams replaying the events before their live start.
    Replays,
    /// `POST /api/delegate` requests waiting for their task's answer.
    DelegateWaits,
}

impl Limited {
    fn as_str(self) -> &'static str {
        match self {
            Self::Callbacks => "callbacks",
            Self::Streams => "streams",
            Self::Replays => "replays",
            Self::DelegateWaits => "delegate_waits",
        }
    }
}

/// A count per tenant with a ceiling.
pub struct TenantLimit {
    what: Limited,
    max: usize,
    held: Mutex<HashMap<String, usize>>,
    refused: Family<LimitLabels, Counter>,
    /// Woken whenever a unit is given back, for those waiting for one.
    released: Notify,
}

impl std::fmt::Debug for TenantLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantLimit")
            .field("what", &self.what)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// One unit of a tenant's limit, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<TenantLimit>,
    tenant: String,
}

impl TenantLimit {
    /// A limit of `max` per tenant; refusals are counted in `refused`.
    pub fn new(what: Limited, max: usize, refused: Family<LimitLabels, Counter>) -> Arc<Self> {
        Arc::new(Self {
            what,
            max,
            held: Mutex::new(HashMap::new()),
            refused,
            released: Notify::new(),
        })
    }

    /// Takes one unit for `tenant`, or refuses with 429 when it holds `max` already.
    pub fn acquire(self: &Arc<Self>, tenant: &str) -> Result<Permit, ApiError> {
        self.try_take(tenant).ok_or_else(|| {
            self.count_refusal();
            ApiError::TooManyRequests(match self.what {
                Limited::Callbacks => format!(
                    "this organization already has {} callbacks in flight; retry shortly",
                    self.max
                ),
                Limited::Streams => format!(
                    "this organization already has {} streams open; close one or retry later",
                    self.max
                ),
                Limited::Replays => format!(
                    "this organization already has {} streams replaying past events; retry shortly",
                    self.max
                ),
                Limited::DelegateWaits => format!(
                    "this organization already has {} delegate requests waiting",
                    self.max
                ),
            })
        })
    }

    /// Takes one unit for `tenant`, waiting for one to be given back while it holds `max`
    /// (for work already under way, which cannot be answered 429). A wait counts as one
    /// refusal.
    pub async fn acquire_waiting(self: &Arc<Self>, tenant: &str) -> Permit {
        let mut counted = false;
        loop {
            // Registered before the look, so a unit given back in between is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(permit) = self.try_take(tenant) {
                return permit;
            }
            if !counted {
                self.count_refusal();
                counted = true;
            }
            released.await;
        }
    }

    fn try_take(self: &Arc<Self>, tenant: &str) -> Option<Permit> {
        let mut held = self.lock();
        let count = held.entry(tenant.to_owned()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Permit {
            limit: Arc::clone(self),
            tenant: tenant.to_owned(),
        })
    }

    fn count_refusal(&self) {
        self.refused
            .get_or_create(&LimitLabels {
                limit: self.what.as_str(),
            })
            .inc();
    }

    /// Units `tenant` holds now.
    pub fn held(&self, tenant: &str) -> usize {
        self.lock().get(tenant).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Every update is one map operation, so a poisoned map is still consistent.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut held = self.limit.lock();
            if let Some(count) = held.get_mut(&self.tenant) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    held.remove(&self.tenant);
                }
            }
        }
        self.limit.released.notify_waiters();
    }
}

/// The limits of one replica.
#[derive(Debug, Clone)]
pub struct TenantLimits {
    /// Callbacks in flight per tenant.
    pub callbacks: Arc<TenantLimit>,
    /// Open SSE streams per tenant.
    pub streams: Arc<TenantLimit>,
    /// SSE streams replaying past events per tenant.
    pub replays: Arc<TenantLimit>,
    /// Waiting delegate requests per tenant.
    pub delegate_waits: Arc<TenantLimit>,
}

impl TenantLimits {
    /// Limits of `callbacks` in flight, `streams` open, `replays` of them replaying and
    /// `delegate_waits` waiting per tenant.
    pub fn new(
        callbacks: usize,
        streams: usize,
        replays: usize,
        delegate_waits: usize,
        refused: &Family<LimitLabels, Counter>,
    ) -> Self {
        Self {
            callbacks: TenantLimit::new(Limited::Callbacks, callbacks, refused.clone()),
            streams: TenantLimit::new(Limited::Streams, streams, refused.clone()),
            replays: TenantLimit::new(Limited::Replays, replays, refused.clone()),
            delegate_waits: TenantLimit::new(
                Limited::DelegateWaits,
                delegate_waits,
                refused.clone(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_gets_its_units_back_and_never_takes_another_tenants() {
        let refused = Family::default();
        let limit = TenantLimit::new(Limited::Streams, 2, refused.clone());
        let a1 = limit.acquire("a").unwrap();
        let _a2 = limit.acquire("a").unwrap();
        let error = limit.acquire("a").unwrap_err();
        assert!(matches!(error, ApiError::TooManyRequests(_)));
        assert!(error.to_string().contains("2 streams open"), "{error}");
        let _b = limit.acquire("b").unwrap();
        assert_eq!((limit.held("a"), limit.held("b")), (2, 1));

        drop(a1);
        let _a3 = limit.acquire("a").unwrap();
        assert_eq!(
            refused
                .get_or_create(&LimitLabels { limit: "streams" })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn a_waiting_acquire_gets_the_unit_given_back_and_counts_one_refusal() {
        let refused = Family::default();
        let limit = TenantLimit::new(Limited::Replays, 1, refused.clone());
        let held = limit.acquire("a").unwrap();
        let waiting = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.acquire_waiting("a").await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "took a unit the tenant did not have"
        );
        // Another tenant is not held up.
        let _b = limit.acquire_waiting("b").await;
        drop(held);
        let permit = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(limit.held("a"), 1);
        drop(permit);
        assert_eq!(limit.held("a"), 0);
        assert_eq!(
            refused
                .get_or_create(&LimitLabels { limit: "replays" })
                .get(),
            1
        );
    }

    #[test]
    fn a_tenant_with_nothing_held_leaves_no_entry() {
        let limit = TenantLimit::new(Limited::Callbacks, 1, Family::default());
        drop(limit.acquire("a").unwrap());
        assert!(limit.lock().is_empty());
    }
}
