//! Per-tenant limits: how many callbacks one tenant may have in flight, how many SSE streams it
//! may hold open, how many of those may be replaying history (the reads that fall back to
//! Postgres) at once, and how many `POST /api/delegate` requests it may have waiting, on one
//! replica. Past the callback, stream or replay limit a request gets 429 with `Retry-After` before
//! anything is read or written, so one tenant's burst or leak cannot take the connections and
//! commit slots every other tenant shares; past the wait limit a delegate request is answered
//! 202 at once instead of waiting (its task is created either way).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::metrics::{counter::Counter, family::Family};

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
        })
    }

    /// Takes one unit for `tenant`, or refuses with 429 when it holds `max` already.
    pub fn acquire(self: &Arc<Self>, tenant: &str) -> Result<Permit, ApiError> {
        {
            let mut held = self.lock();
            let count = held.entry(tenant.to_owned()).or_insert(0);
            if *count >= self.max {
                drop(held);
                self.refused
                    .get_or_create(&LimitLabels {
                        limit: self.what.as_str(),
                    })
                    .inc();
                return Err(ApiError::TooManyRequests(match self.what {
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
                }));
            }
            *count += 1;
        }
        Ok(Permit {
            limit: Arc::clone(self),
            tenant: tenant.to_owned(),
        })
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
        let mut held = self.limit.lock();
        if let Some(count) = held.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.tenant);
            }
        }
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

    #[test]
    fn a_tenant_with_nothing_held_leaves_no_entry() {
        let limit = TenantLimit::new(Limited::Callbacks, 1, Family::default());
        drop(limit.acquire("a").unwrap());
        assert!(limit.lock().is_empty());
    }
}
