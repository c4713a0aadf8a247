//! Sessions already resolved, by calling fleet and path id, so a callback's session is looked
//! up in Postgres once.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use nubabel_contract::identity::SidecarIdentity;
use nubabel_store::sessions::SessionRef;

/// The calling fleet (tenant, namespace, name) and the id in the path.
type Key = (String, String, String, String);

/// Sessions already resolved, by calling fleet and path id. A resolution never changes (sessions and
/// mappings are only added), so entries need no expiry; a session deleted later is evicted
/// when an append finds it gone. Only found sessions are kept, and the map is bounded.
#[derive(Debug, Default)]
pub struct SessionCache(Mutex<HashMap<Key, SessionRef>>);

/// Entries kept before the cache starts over.
const SESSION_CACHE_CAPACITY: usize = 100_000;

impl SessionCache {
    /// The cached resolution of `id` for a callback of `sidecar`.
    pub fn get(&self, sidecar: &SidecarIdentity, id: &str) -> Option<SessionRef> {
        self.lock().get(&key(sidecar, id)).cloned()
    }

    /// Remembers a resolution.
    pub fn insert(&self, sidecar: &SidecarIdentity, id: &str, session: SessionRef) {
        let mut map = self.lock();
        if map.len() >= SESSION_CACHE_CAPACITY {
            map.clear();
        }
        map.insert(key(sidecar, id), session);
    }

    /// Forgets every resolution to the session `pk`.
    pub fn evict(&self, pk: uuid::Uuid) {
        self.lock().retain(|_, session| session.pk != pk);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, SessionRef>> {
        // Every update is a single map operation, so a poisoned map is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn key(sidecar: &SidecarIdentity, id: &str) -> Key {
    (
        sidecar.organization_id().as_str().to_owned(),
        sidecar.namespace().to_owned(),
        sidecar.name().to_owned(),
        id.to_owned(),
    )
}
