//! The placement ledger, pure apart from its lock: which pod each task placed by this operator
//! runs on and which session it serves, from the moment the planner places it until the task
//! finishes or goes back to the queue.
//!
//! Load comes from the controller's cache, which shows a placement only after its status write
//! comes back through the watch, and tasks reconcile concurrently: without the ledger, tasks
//! created together all see the same pod free and overfill it. A reconcile therefore plans and
//! places in one critical section ([`Placements::decide`]), with each pod's load and each
//! session's business read from the cache and the ledger together. Only the leader reconciles,
//! so the ledger is the one place placements are made; after a restart the cache has every
//! status written before.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a placed task the cache has not shown yet still counts (the cache shows a new
/// task within moments; a ledger entry of a task deleted before it was ever seen must not
/// hold a slot for ever).
pub const UNSEEN_PLACEMENT_GRACE: Duration = Duration::from_secs(60);

/// A Nubabel session: a `sessionId` belongs to its organization, in any namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The tenant.
    pub organization_id: String,
    /// The task's `sessionId`, or a session of the task's own.
    pub session_id: String,
}

/// Where this operator placed a task, the session it serves, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The namespace of the task and its fleet.
    pub namespace: String,
    /// The pod.
    pub pod: String,
    /// The session the task continues or starts.
    pub session: SessionKey,
    /// When it was placed.
    pub at: Instant,
}

/// What the cache showed when a reconcile planned, besides the task itself.
#[derive(Clone, Debug, Default)]
pub struct CacheView {
    /// The other unfinished tasks of the task's namespace, by uid, each with the pod the cache
    /// shows it holding a slot on.
    pub pods_of_live_neighbours: HashMap<String, Option<String>>,
    /// Every other unfinished task, in any namespace, by uid.
    pub live: HashSet<String>,
    /// Every task the cache held, finished or not, by uid.
    pub known: HashSet<String>,
}

impl CacheView {
    /// Whether a task placed by this operator still holds its place: the cache shows it
    /// unfinished, or it was placed so recently that the cache may not show it yet (tasks
    /// created together reconcile before the cache has all of them).
    fn holds(&self, uid: &str, placement: &Placement) -> bool {
        self.live.contains(uid)
            || (!self.known.contains(uid) && placement.at.elapsed() < UNSEEN_PLACEMENT_GRACE)
    }
}

/// The placements themselves, by task uid.
#[derive(Debug, Default)]
pub struct Ledger {
    placed: HashMap<String, Placement>,
}

impl Ledger {
    /// Tasks other than `me` on pod `namespace/pod`: those the cache shows there, and those
    /// placed there that still hold their place.
    pub fn occupants(&self, view: &CacheView, me: &str, namespace: &str, pod: &str) -> usize {
        let cached = view
            .pods_of_live_neighbours
            .iter()
            .filter(|(_, cached)| cached.as_deref() == Some(pod))
            .map(|(uid, _)| uid.as_str());
        let placed = self
            .placed
            .iter()
            .filter(|(uid, p)| {
                uid.as_str() != me && p.namespace == namespace && p.pod == pod && view.holds(uid, p)
            })
            .map(|(uid, _)| uid.as_str());
        cached.chain(placed).collect::<HashSet<_>>().len()
    }

    /// Whether a task other than `me` that still holds its place serves `session`, in any
    /// namespace.
    pub fn session_placed(&self, view: &CacheView, me: &str, session: &SessionKey) -> bool {
        self.placed
            .iter()
            .any(|(uid, p)| uid != me && &p.session == session && view.holds(uid, p))
    }

    /// Records where task `uid` was placed.
    pub fn place(&mut self, uid: &str, placement: Placement) {
        self.placed.insert(uid.to_owned(), placement);
    }

    /// Forgets task `uid` (finished, queued again or deleted).
    pub fn release(&mut self, uid: &str) {
        self.placed.remove(uid);
    }
}

/// The ledger shared by the controller's concurrent reconciles.
#[derive(Clone, Default)]
pub struct Placements(Arc<Mutex<Ledger>>);

impl Placements {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `decision` with the ledger held, so what it reads and what it places are one
    /// step no other reconcile can come between. `decision` must not block.
    pub fn decide<T>(&self, decision: impl FnOnce(&mut Ledger) -> T) -> T {
        decision(&mut self.lock())
    }

    /// Forgets task `uid`.
    pub fn release(&self, uid: &str) {
        self.lock().release(uid);
    }
}

/// The uids of tasks this operator finished recently, so a queued task woken by the finish
/// does not count their slot as taken while the cache catches up; dropped once the cache
/// shows the task finished.
#[derive(Clone, Default)]
pub struct JustFinished(Arc<Mutex<HashSet<String>>>);

impl JustFinished {
    fn lock(&self) -> MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers that task `uid` finished.
    pub fn insert(&self, uid: String) {
        self.lock().insert(uid);
    }

    /// Forgets task `uid`: the cache shows it finished.
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// The tasks finished here that the cache may not show finished yet.
    pub fn snapshot(&self) -> HashSet<String> {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn neighbours(tasks: &[(&str, Option<&str>)]) -> HashMap<String, Option<String>> {
        tasks
            .iter()
            .map(|(uid, pod)| ((*uid).to_owned(), pod.map(str::to_owned)))
            .collect()
    }

    fn session(organization: &str, session: &str) -> SessionKey {
        SessionKey {
            organization_id: organization.to_owned(),
            session_id: session.to_owned(),
        }
    }

    fn at(namespace: &str, pod: &str) -> Placement {
        // A session of its own for each placement, so only capacity decides.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Placement {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            session: session("org", &format!("own-{n}")),
            at: Instant::now(),
        }
    }

    fn uids(uids: &[&str]) -> HashSet<String> {
        uids.iter().map(|uid| (*uid).to_owned()).collect()
    }

    /// The cache shows these neighbours (this namespace's other unfinished tasks) and nothing
    /// else.
    fn view(neighbours: HashMap<String, Option<String>>) -> CacheView {
        let live: HashSet<String> = neighbours.keys().cloned().collect();
        CacheView {
            pods_of_live_neighbours: neighbours,
            known: live.clone(),
            live,
        }
    }

    /// What the planner does with a pod of `capacity` slots: place `uid` when a slot is free.
    fn place_if_free(
        ledger: &mut Ledger,
        uid: &str,
        placement: Placement,
        view: &CacheView,
        capacity: usize,
    ) -> bool {
        let free = ledger.occupants(view, uid, &placement.namespace, &placement.pod) < capacity;
        if free {
            ledger.place(uid, placement);
        }
        free
    }

    #[test]
    fn tasks_placed_together_never_take_more_slots_than_a_pod_has() {
        let mut ledger = Ledger::default();
        // Three tasks created together: the cache shows none of them on a pod yet.
        let fresh = neighbours(&[("a", None), ("b", None), ("c", None)]);
        let others = |me: &str| {
            let mut others = fresh.clone();
            others.remove(me);
            view(others)
        };
        assert!(place_if_free(
            &mut ledger,
            "a",
            at("ns", "pod-0"),
            &others("a"),
            2
        ));
        assert!(place_if_free(
            &mut ledger,
            "b",
            at("ns", "pod-0"),
            &others("b"),
            2
        ));
        assert!(!place_if_free(
            &mut ledger,
            "c",
            at("ns", "pod-0"),
            &others("c"),
            2
        ));
        assert!(place_if_free(
            &mut ledger,
            "c",
            at("ns", "pod-1"),
            &others("c"),
            2
        ));

        // A task the cache shows on the pod counts once, placed here or not; one the cache
        // shows finished (`b`) no longer counts.
        let mut cached = view(neighbours(&[("a", Some("pod-0")), ("x", Some("pod-0"))]));
        cached.known.extend(uids(&["b", "c"]));
        assert_eq!(ledger.occupants(&cached, "me", "ns", "pod-0"), 2);
        // A pod of the same name in another namespace is another pod.
        assert!(place_if_free(
            &mut ledger,
            "d",
            at("other", "pod-0"),
            &view(neighbours(&[])),
            1
        ));
    }

    #[test]
    fn a_task_placed_before_the_cache_shows_it_still_takes_its_slot() {
        let mut ledger = Ledger::default();
        // `a` is placed while `b` plans with a cache that does not hold `a` yet.
        let before_a = view(neighbours(&[]));
        assert!(place_if_free(
            &mut ledger,
            "a",
            at("ns", "pod-0"),
            &view(neighbours(&[("b", None)])),
            1
        ));
        assert!(!place_if_free(
            &mut ledger,
            "b",
            at("ns", "pod-0"),
            &before_a,
            1
        ));
        // Once the cache holds `a` finished, its slot is free.
        let a_finished = CacheView {
            known: uids(&["a"]),
            ..CacheView::default()
        };
        assert!(place_if_free(
            &mut ledger,
            "b",
            at("ns", "pod-0"),
            &a_finished,
            1
        ));
        // A placement the cache never showed (its task deleted at once) stops counting.
        let mut stale = Ledger::default();
        let mut old = at("ns", "pod-0");
        old.at = Instant::now()
            .checked_sub(UNSEEN_PLACEMENT_GRACE + Duration::from_secs(1))
            .expect("the clock is past the grace");
        stale.place("gone", old);
        assert!(place_if_free(
            &mut stale,
            "c",
            at("ns", "pod-0"),
            &before_a,
            1
        ));
    }

    #[test]
    fn a_released_slot_is_free_again() {
        let placements = Placements::default();
        let others = view(neighbours(&[("a", None)]));
        placements.decide(|ledger| {
            assert!(place_if_free(
                ledger,
                "a",
                at("ns", "pod-0"),
                &view(neighbours(&[("b", None)])),
                1
            ));
            assert!(!place_if_free(ledger, "b", at("ns", "pod-0"), &others, 1));
        });
        // Released (finished or queued again), `a` takes no slot, live or not.
        placements.release("a");
        placements.decide(|ledger| {
            assert!(place_if_free(ledger, "c", at("ns", "pod-0"), &others, 1));
        });
    }

    #[test]
    fn a_session_placed_anywhere_is_busy_for_every_other_task_of_it() {
        let mut ledger = Ledger::default();
        let everyone = CacheView {
            live: uids(&["one", "two", "three"]),
            known: uids(&["one", "two", "three"]),
            ..CacheView::default()
        };
        let chat = session("org-a", "chat");
        ledger.place(
            "one",
            Placement {
                namespace: "ns".to_owned(),
                pod: "pod-0".to_owned(),
                session: chat.clone(),
                at: Instant::now(),
            },
        );
        // Another turn of the session, from any namespace, finds it busy; the task itself does
        // not, nor does another session or the same sessionId of another organization.
        assert!(ledger.session_placed(&everyone, "two", &chat));
        assert!(!ledger.session_placed(&everyone, "one", &chat));
        assert!(!ledger.session_placed(&everyone, "two", &session("org-a", "other")));
        assert!(!ledger.session_placed(&everyone, "two", &session("org-b", "chat")));
        // Once the cache shows the first turn finished, the session is free.
        let one_finished = CacheView {
            live: uids(&["two"]),
            known: uids(&["one", "two"]),
            ..CacheView::default()
        };
        assert!(!ledger.session_placed(&one_finished, "two", &chat));
        ledger.release("one");
        assert!(!ledger.session_placed(&everyone, "two", &chat));
    }
}
