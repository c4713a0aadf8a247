//! Group commit of callbacks.
//!
//! Every accepted callback must be committed before it is answered, and each commit on its own
//! costs a round trip, a transaction and a WAL flush. The committer takes appends from every
//! handler through one queue and commits them in batches: while up to `concurrency` batches are
//! in flight, the callbacks that arrive meanwhile wait in the queue, and the next free slot
//! takes all of them (up to `max_batch`) in one transaction. Under light load a batch is a
//! single event and nothing waits; under a burst the cost per callback falls as batches grow,
//! so the queue drains instead of every callback competing for its own commit.
//!
//! Each event in a batch is appended exactly as a single append would be (see
//! [`events::append_batch`]), and each handler gets its own event's result.

use std::sync::Arc;

use nubabel_store::events::{self, Appended, PreparedEvent};
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::metrics::Metrics;

/// How the committer batches.
#[derive(Debug, Clone, Copy)]
pub struct CommitSettings {
    /// Most events committed in one transaction.
    pub max_batch: usize,
    /// Most batches in flight at once (each holds one pooled connection).
    pub concurrency: usize,
}

impl Default for CommitSettings {
    fn default() -> Self {
        Self {
            max_batch: 64,
            concurrency: 4,
        }
    }
}

/// Appends waiting for a slot; senders wait when it is full.
const QUEUE: usize = 4096;

struct Job {
    event: PreparedEvent,
    reply: oneshot::Sender<nubabel_store::Result<Appended>>,
}

/// The committer of one replica. Cheap to clone; its task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Committer {
    db: PgPool,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts the committer's task.
    pub fn start(db: PgPool, settings: CommitSettings, metrics: Arc<Metrics>) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        tokio::spawn(run(db.clone(), settings, metrics, queue));
        Self { db, jobs }
    }

    /// Appends `event`, committed with whatever else is waiting, and returns its result.
    pub async fn append(&self, event: PreparedEvent) -> nubabel_store::Result<Appended> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.send(Job { event, reply }).await {
            Ok(()) => match answer.await {
                Ok(result) => result,
                // The batch's task ended without answering (it panicked): the event may or may
                // not be committed, and appending it again settles which, exactly once.
                Err(_) => Err(nubabel_store::Error::Corrupt(
                    "the committer stopped before answering".to_owned(),
                )),
            },
            // The committer is gone (shutting down): commit this one directly.
            Err(mpsc::error::SendError(job)) => events::append_prepared(&self.db, &job.event).await,
        }
    }
}

async fn run(
    db: PgPool,
    settings: CommitSettings,
    metrics: Arc<Metrics>,
    mut queue: mpsc::Receiver<Job>,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let max_batch = settings.max_batch.max(1);
    loop {
        // Take a slot first: while every slot is busy, arrivals gather in the queue and the
        // next batch takes them together.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "a batch holds at most a few hundred"
        )]
        metrics.append_batch_size.observe(batch.len() as f64);
        let db = db.clone();
        tokio::spawn(async move {
            let (events, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|job| (job.event, job.reply)).unzip();
            let results = events::append_batch(&db, &events).await;
            drop(slot);
            for (reply, result) in replies.into_iter().zip(results) {
                // A handler that went away (its client disconnected) needs no answer; its
                // event is committed and a retry finds it.
                let _ = reply.send(result);
            }
        });
    }
}
