//! Request coalescing: concurrent callers asking for the same key share one fetch.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::OnceCell;

/// Shares one in-flight fetch per key among concurrent callers. A result is not cached: once a
/// fetch completes and its callers have it, the next call for the key fetches again.
///
/// Capacity: one entry per key with a fetch in flight, so the map is bounded by the number of
/// concurrent callers.
pub struct Coalescer<K, V> {
    in_flight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for Coalescer<K, V> {
    fn default() -> Self {
        Self {
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Coalescer<K, V> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Arc<OnceCell<V>>>> {
        // Every critical section is a single map operation, so a poisoned lock is still usable.
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns the value of the fetch in flight for `key`, or runs `fetch`. When the fetch that
    /// others wait on fails, its caller gets the error and the next waiter runs its own fetch.
    ///
    /// # Errors
    /// Returns the error of the fetch this caller ran.
    pub async fn get<E, F, Fut>(&self, key: K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = self.lock().entry(key.clone()).or_default().clone();
        let result = cell.get_or_try_init(fetch).await.cloned();
        let mut in_flight = self.lock();
        if in_flight.get(&key).is_some_and(|current| Arc::ptr_eq(current, &cell)) {
            in_flight.remove(&key);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let coalescer = Arc::new(Coalescer::<u32, u64>::default());
        let fetches = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let (coalescer, fetches, release) = (coalescer.clone(), fetches.clone(), release.clone());
                tokio::spawn(async move {
                    coalescer
                        .get(7, || async move {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            release.notified().await;
                            Ok::<_, ()>(42)
                        })
                        .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        release.notify_one();
        for caller in callers {
            assert_eq!(caller.await.expect("caller task"), Ok(42));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(coalescer.lock().is_empty());
    }

    #[tokio::test]
    async fn completed_fetch_is_not_cached() {
        let coalescer = Coalescer::<u32, u64>::default();
        assert_eq!(coalescer.get(1, || async { Ok::<_, ()>(1) }).await, Ok(1));
        assert_eq!(coalescer.get(1, || async { Ok::<_, ()>(2) }).await, Ok(2));
        assert_eq!(coalescer.get(1, || async { Err::<u64, _>("down") }).await, Err("down"));
    }
}
