//! The retention sweep every replica runs: deletes rows older than the configured retention
//! (`nubabel_store::retention`) and counts them.

use std::{sync::Arc, time::Duration};

use nubabel_store::retention::{self, RetentionPolicy, Swept};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use crate::{config::Config, metrics::Metrics, metrics::TableLabels};

const SECONDS_PER_DAY: u64 = 24 * 3600;

/// The retention the configuration asks for (0 days: forever).
pub fn policy(config: &Config) -> RetentionPolicy {
    let days =
        |days: u32| (days > 0).then(|| Duration::from_secs(u64::from(days) * SECONDS_PER_DAY));
    RetentionPolicy {
        events: days(config.retention_events_days),
        results: days(config.retention_results_days),
    }
}

/// Sweeps now and then every `interval`, until aborted.
pub fn start(
    db: PgPool,
    policy: RetentionPolicy,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match retention::sweep(&db, policy, retention::DEFAULT_BATCH).await {
                Ok(swept) => record(&metrics, swept),
                Err(error) => tracing::warn!(%error, "the retention sweep failed"),
            }
        }
    })
}

fn record(metrics: &Metrics, swept: Swept) {
    for (table, deleted) in [
        ("session_events", swept.events),
        ("task_results", swept.results),
        ("slack_threads", swept.slack_threads),
    ] {
        if deleted > 0 {
            metrics
                .retention_deleted
                .get_or_create(&TableLabels { table })
                .inc_by(deleted);
            tracing::info!(table, deleted, "deleted rows past their retention");
        }
    }
}
