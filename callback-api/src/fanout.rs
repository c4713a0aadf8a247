//! Fan-out of committed events to the SSE streams of every replica.
//!
//! After a commit, the handler publishes the event: straight to this replica's subscribers
//! when it is the next one in order, and to the session's Redis stream. One reader task per
//! replica waits with a single `XREAD` on the streams of every session that has local
//! subscribers and broadcasts what arrives, in sequence order, through one in-process
//! broadcast channel per session. Positions are Postgres sequence numbers, so every source
//! (local publish, Redis, Postgres) agrees and duplicates are dropped by number.
//!
//! Redis is never the record. A failed append is retried in the background; gaps (an append
//! that lost a race or never happened) are filled from Postgres; while Redis is unreachable
//! the reader polls Postgres instead, and every few seconds it checks Postgres anyway, so an
//! event whose append was lost reaches readers within that period at the latest.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use nubabel_store::{
    Result,
    events::{self, EventKind, StoredEvent},
    streams::{RedisStore, StreamAppend, StreamReader},
};
use sqlx::PgPool;
use tokio::sync::{Notify, broadcast, mpsc};
use uuid::Uuid;

use crate::metrics::Metrics;

/// Events buffered per session for slow subscribers before they lag and catch up from Postgres.
const CHANNEL_CAPACITY: usize = 1024;
/// How long one `XREAD` blocks; bounds how late a newly watched session joins the read.
const READ_BLOCK: Duration = Duration::from_millis(200);
/// Entries taken per `XREAD`.
const READ_COUNT: usize = 512;
/// How often Postgres is checked for events Redis never carried.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// How often Postgres is polled while Redis is unreachable.
const DEGRADED_POLL: Duration = Duration::from_millis(250);
/// How long a request waits for its Redis append before handing it to the retry queue.
const APPEND_TIMEOUT: Duration = Duration::from_millis(250);
/// Appends waiting for Redis; beyond this they are dropped (readers get them from Postgres).
const RETRY_QUEUE: usize = 10_000;
/// Appends older than this are not retried: readers have long taken them from Postgres.
const RETRY_HORIZON: Duration = Duration::from_secs(300);
/// Largest batch read from Postgres at once.
pub const PG_BATCH: i64 = 500;

/// A subscriber's view of a session: a receiver for events after `live_after`.
#[derive(Debug)]
pub struct Subscription {
    /// Live events; may skip numbers (fill from Postgres) and lag (catch up from Postgres).
    pub receiver: broadcast::Receiver<Arc<StoredEvent>>,
    /// Every event with a higher number is broadcast on `receiver`; the subscriber replays
    /// everything up to this number itself.
    pub live_after: i64,
}

/// The fan-out of one replica. Cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout").finish_non_exhaustive()
    }
}

struct Inner {
    db: PgPool,
    redis: RedisStore,
    metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<Uuid, Channel>>,
    watch_changed: Notify,
    retries: mpsc::Sender<PendingAppend>,
}

struct Channel {
    sender: broadcast::Sender<Arc<StoredEvent>>,
    /// The highest number broadcast (or known to be before the first subscriber).
    position: i64,
}

struct PendingAppend {
    session_pk: Uuid,
    event: Arc<StoredEvent>,
    since: Instant,
}

impl Fanout {
    /// Creates the fan-out and starts its reader and retry tasks; they stop when the last
    /// clone is dropped.
    pub fn start(db: PgPool, redis: RedisStore, metrics: Arc<Metrics>) -> Self {
        let (retries, pending) = mpsc::channel(RETRY_QUEUE);
        let inner = Arc::new(Inner {
            db,
            redis,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            watch_changed: Notify::new(),
            retries,
        });
        tokio::spawn(read_loop(Arc::downgrade(&inner)));
        tokio::spawn(retry_loop(Arc::downgrade(&inner), pending));
        Self { inner }
    }

    /// Publishes a committed event: to local subscribers, to Redis (with the hot state for
    /// state updates), and into the retry queue when Redis does not answer in time.
    pub async fn publish(&self, session_pk: Uuid, event: StoredEvent) {
        let event = Arc::new(event);
        self.inner.broadcast_in_order(session_pk, &event, true);
        let appended =
            tokio::time::timeout(APPEND_TIMEOUT, self.inner.append(session_pk, &event)).await;
        if !matches!(appended, Ok(Ok(()))) {
            self.inner.metrics.redis_append_failures.inc();
            let pending = PendingAppend {
                session_pk,
                event,
                since: Instant::now(),
            };
            if self.inner.retries.try_send(pending).is_err() {
                tracing::warn!(%session_pk, "redis retry queue full; readers will take the event from postgres");
            }
        }
    }

    /// Subscribes to a session's live events.
    pub async fn subscribe(&self, session_pk: Uuid) -> Result<Subscription> {
        if let Some(subscription) = self.inner.existing_subscription(session_pk) {
            return Ok(subscription);
        }
        // The first subscriber fixes the starting point: everything committed so far is replayed
        // by the subscriber, everything later comes through the channel.
        let last = events::last_seqs(&self.inner.db, &[session_pk])
            .await?
            .first()
            .map_or(0, |(_, seq)| *seq);
        let subscription = {
            let mut sessions = lock(&self.inner.sessions);
            let channel = sessions.entry(session_pk).or_insert_with(|| Channel {
                sender: broadcast::channel(CHANNEL_CAPACITY).0,
                position: last,
            });
            Subscription {
                receiver: channel.sender.subscribe(),
                live_after: channel.position,
            }
        };
        self.inner.watch_changed.notify_one();
        Ok(subscription)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map half-updated (each update is one
    // insert or field write), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    fn existing_subscription(&self, session_pk: Uuid) -> Option<Subscription> {
        let sessions = lock(&self.sessions);
        sessions.get(&session_pk).map(|channel| Subscription {
            receiver: channel.sender.subscribe(),
            live_after: channel.position,
        })
    }

    async fn append(&self, session_pk: Uuid, event: &StoredEvent) -> Result<()> {
        match self.redis.append(session_pk, event).await? {
            StreamAppend::Added | StreamAppend::Superseded => {}
        }
        if event.kind == EventKind::State {
            self.redis.set_state(session_pk, event).await?;
        }
        Ok(())
    }

    /// Broadcasts `event` if it is newer than what subscribers have. With `strict`, only the
    /// very next number goes out (a local publish must not jump over an event another replica
    /// committed and Redis has not delivered yet).
    fn broadcast_in_order(&self, session_pk: Uuid, event: &Arc<StoredEvent>, strict: bool) {
        let mut sessions = lock(&self.sessions);
        let Some(channel) = sessions.get_mut(&session_pk) else {
            return;
        };
        let next = channel.position + 1;
        if event.seq < next || (strict && event.seq != next) {
            return;
        }
        channel.position = event.seq;
        // An error only means nobody listens right now.
        let _ = channel.sender.send(Arc::clone(event));
    }

    fn position(&self, session_pk: Uuid) -> Option<i64> {
        lock(&self.sessions).get(&session_pk).map(|c| c.position)
    }

    /// Positions of the watched sessions, forgetting sessions nobody listens to any more.
    fn watched(&self) -> Vec<(Uuid, i64)> {
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, channel| channel.sender.receiver_count() > 0);
        sessions.iter().map(|(pk, c)| (*pk, c.position)).collect()
    }

    /// Delivers entries read from Redis, filling any gap before them from Postgres.
    async fn deliver(&self, entries: Vec<(Uuid, StoredEvent)>) -> Result<()> {
        for (session_pk, event) in entries {
            let Some(position) = self.position(session_pk) else {
                continue;
            };
            if event.seq > position + 1 {
                self.fill_from_postgres(session_pk, position, event.seq - 1)
                    .await?;
            }
            self.broadcast_in_order(session_pk, &Arc::new(event), false);
        }
        Ok(())
    }

    /// Broadcasts events `after < seq <= up_to` from Postgres.
    async fn fill_from_postgres(&self, session_pk: Uuid, mut after: i64, up_to: i64) -> Result<()> {
        while after < up_to {
            let batch =
                events::list_after(&self.db, session_pk, after, PG_BATCH.min(up_to - after))
                    .await?;
            let Some(last) = batch.last().map(|e| e.seq) else {
                break;
            };
            for event in batch {
                self.broadcast_in_order(session_pk, &Arc::new(event), false);
            }
            after = last;
        }
        Ok(())
    }

    /// Broadcasts whatever Postgres has beyond each watched session's position.
    async fn reconcile(&self) -> Result<()> {
        let watched = self.watched();
        if watched.is_empty() {
            return Ok(());
        }
        let pks: Vec<Uuid> = watched.iter().map(|(pk, _)| *pk).collect();
        for (session_pk, last) in events::last_seqs(&self.db, &pks).await? {
            if let Some(position) = self.position(session_pk)
                && last > position
            {
                self.fill_from_postgres(session_pk, position, last).await?;
            }
        }
        Ok(())
    }
}

async fn read_loop(inner: Weak<Inner>) {
    let mut reader: Option<StreamReader> = None;
    let mut last_reconcile = Instant::now();
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let watched = inner.watched();
        if watched.is_empty() {
            // Nothing to read: wait for a subscriber (or time out to notice shutdown).
            let _ =
                tokio::time::timeout(Duration::from_secs(1), inner.watch_changed.notified()).await;
            continue;
        }
        if reader.is_none() {
            reader = inner.redis.reader(READ_BLOCK).await.ok();
        }
        let mut degraded = true;
        if let Some(current) = reader.as_mut() {
            match current.read(&watched, READ_COUNT).await {
                Ok(entries) => {
                    degraded = false;
                    if let Err(error) = inner.deliver(entries).await {
                        tracing::warn!(error = %error, "filling a stream gap from postgres failed");
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "reading redis streams failed; polling postgres");
                    reader = None;
                }
            }
        }
        inner.metrics.fanout_degraded.set(i64::from(degraded));
        if degraded || last_reconcile.elapsed() >= RECONCILE_EVERY {
            if let Err(error) = inner.reconcile().await {
                tracing::warn!(error = %error, "reading new events from postgres failed");
            }
            last_reconcile = Instant::now();
        }
        if degraded {
            drop(inner);
            tokio::time::sleep(DEGRADED_POLL).await;
        }
    }
}

async fn retry_loop(inner: Weak<Inner>, mut pending: mpsc::Receiver<PendingAppend>) {
    let mut backoff = Duration::from_millis(100);
    while let Some(item) = pending.recv().await {
        loop {
            let Some(inner) = inner.upgrade() else { return };
            if item.since.elapsed() > RETRY_HORIZON {
                break;
            }
            match inner.append(item.session_pk, &item.event).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(_) => {
                    drop(inner);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
