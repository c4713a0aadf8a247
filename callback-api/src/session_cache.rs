//! Sessions already resolved, by tenant and path id, so a callback's session is looked up in
//! Postgres once.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use nubabel_store::sessions::SessionRef;

/// Sessions already resolved, by tenant and path id. A resolution never changes (sessions and
/// mappings are only added), so entries need no expiry; a session deleted later is evicted
/// when an append finds it gone. Only found sessions are kept, and the map is bounded.
#[derive(Debug, Default)]
pub struct SessionCache(Mutex<HashMap<(String, String), SessionRef>>);

/// Entries kept before the cache starts over.
const SESSION_CACHE_CAPACITY: usize = 100_000;

impl SessionCache {
    /// The cached resolution of `id` for `organization_id`.
    pub fn get(&self, organization_id: &str, id: &str) -> Option<SessionRef> {
        self.lock()
            .get(&(organization_id.to_owned(), id.to_owned()))
            .cloned()
    }

    /// Remembers a resolution.
    pub fn insert(&self, organization_id: &str, id: &str, session: SessionRef) {
        let mut map = self.lock();
        if map.len() >= SESSION_CACHE_CAPACITY {
            map.clear();
        }
        map.insert((organization_id.to_owned(), id.to_owned()), session);
    }

    /// Forgets every resolution to the session `pk`.
    pub fn evict(&self, pk: uuid::Uuid) {
        self.lock().retain(|_, session| session.pk != pk);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), SessionRef>> {
        // Every update is a single map operation, so a poisoned map is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
