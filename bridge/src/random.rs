//! Randomness for the bridge: the operating system's, with a std-only stand-in should it ever
//! be unavailable (nothing here guards a secret; the values only keep pods apart).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A random `u64`.
pub fn u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| fallback_u64())
}

/// A random fraction in `[0, 1)`.
pub fn fraction() -> f64 {
    // The top 53 bits: every value is exactly representable, and 1.0 is never reached.
    (u64() >> 11) as f64 / (1_u64 << 53) as f64
}

/// std's per-process random hash keys over the time and a counter.
fn fallback_u64() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one((
        nanos,
        CALLS.fetch_add(1, Ordering::Relaxed),
        std::process::id(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_stay_within_zero_and_one() {
        assert!(
            (0..1000)
                .map(|_| fraction())
                .all(|f| (0.0..1.0).contains(&f))
        );
    }

    #[test]
    fn two_draws_differ() {
        assert_ne!(u64(), u64());
        assert_ne!(fallback_u64(), fallback_u64());
    }
}
