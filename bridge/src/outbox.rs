//! The bounded buffer between the event stream and the callback API.
//!
//! One FIFO for every session keeps each session's callbacks in order. When the API is
//! unreachable, callbacks wait here; when the buffer is full the oldest is dropped (counted
//! and logged) so that memory stays bounded and the newest state wins.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::mapping::Callback;
use crate::metrics::Metrics;

/// A buffered callback and its position in the buffer's history.
pub type Entry = (u64, Arc<Callback>);

#[derive(Debug, Default)]
struct Queue {
    entries: VecDeque<Entry>,
    next: u64,
}

/// A bounded FIFO of callbacks with drop-oldest overflow.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    capacity: usize,
    changed: Notify,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// A buffer of at most `capacity` callbacks (at least 1).
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            capacity: capacity.max(1),
            changed: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue stays consistent even if a holder panicked: every change is one call.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a callback, dropping the oldest when full.
    pub fn push(&self, callback: Callback) {
        let mut queue = self.lock();
        if queue.entries.len() >= self.capacity
            && let Some((_, dropped)) = queue.entries.pop_front()
        {
            self.metrics.dropped.inc();
            tracing::warn!(
                capacity = self.capacity,
                session = %dropped.session_id,
                webhook_id = %dropped.webhook_id,
                "callback buffer full: dropped the oldest callback"
            );
        }
        let seq = queue.next;
        queue.next += 1;
        queue.entries.push_back((seq, Arc::new(callback)));
        self.metrics.buffered.set(gauge(queue.entries.len()));
        drop(queue);
        self.changed.notify_waiters();
    }

    /// The oldest callback, waiting until there is one.
    pub async fn front(&self) -> Entry {
        loop {
            let changed = self.changed.notified();
            if let Some(entry) = self.peek() {
                return entry;
            }
            changed.await;
        }
    }

    /// The oldest callback, if any.
    pub fn peek(&self) -> Option<Entry> {
        self.lock().entries.front().cloned()
    }

    /// Whether `seq` is still the oldest (it may have been dropped while it was being sent).
    pub fn is_front(&self, seq: u64) -> bool {
        self.lock()
            .entries
            .front()
            .is_some_and(|(front, _)| *front == seq)
    }

    /// Removes `seq` if it is the oldest (after it was delivered or refused for good).
    pub fn remove(&self, seq: u64) {
        let mut queue = self.lock();
        if queue
            .entries
            .front()
            .is_some_and(|(front, _)| *front == seq)
        {
            queue.entries.pop_front();
        }
        self.metrics.buffered.set(gauge(queue.entries.len()));
        drop(queue);
        self.changed.notify_waiters();
    }

    /// Callbacks waiting.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the buffer is empty.
    pub async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            if self.is_empty() {
                return;
            }
            changed.await;
        }
    }
}

fn gauge(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::mapping::CallbackKind;

    fn callback(n: u32) -> Callback {
        Callback {
            session_id: "ses_1".into(),
            kind: CallbackKind::Progress,
            webhook_id: format!("id-{n}"),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_it() {
        let metrics = Arc::new(Metrics::new());
        let outbox = Outbox::new(3, Arc::clone(&metrics));
        for n in 1..=5 {
            outbox.push(callback(n));
        }
        assert_eq!(outbox.len(), 3);
        assert_eq!(metrics.dropped.get(), 2);
        assert_eq!(metrics.buffered.get(), 3);
        let (seq, front) = outbox.peek().unwrap();
        assert_eq!(front.webhook_id, "id-3");
        outbox.remove(seq);
        assert_eq!(outbox.peek().unwrap().1.webhook_id, "id-4");
        assert!(
            metrics
                .encode()
                .contains("nubabel_bridge_callbacks_dropped_total 2")
        );
    }

    #[test]
    fn removing_a_callback_that_was_already_dropped_keeps_the_newer_ones() {
        let outbox = Outbox::new(1, Arc::new(Metrics::new()));
        outbox.push(callback(1));
        let (in_flight, _) = outbox.peek().unwrap();
        outbox.push(callback(2));
        assert!(!outbox.is_front(in_flight));
        outbox.remove(in_flight);
        assert_eq!(outbox.peek().unwrap().1.webhook_id, "id-2");
    }

    #[tokio::test]
    async fn front_waits_for_the_next_callback() {
        let outbox = Arc::new(Outbox::new(4, Arc::new(Metrics::new())));
        let waiter = tokio::spawn({
            let outbox = Arc::clone(&outbox);
            async move { outbox.front().await.1.webhook_id.clone() }
        });
        tokio::task::yield_now().await;
        outbox.push(callback(9));
        let id = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(id, "id-9");
    }
}
