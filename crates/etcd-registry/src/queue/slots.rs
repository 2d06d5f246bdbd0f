//! One member per queue key within a registry, and the withdrawal of a
//! key whose join ended before it led.

use super::*;

// ---------------------------------------------------------------------------
// One member per key within a registry

/// One member per queue key at a time within a registry: two members of one
/// registry in one queue would share a key, and both would be its head.
/// Held by the registry, for elections and locks alike.
pub(crate) type Slots = Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Exclusive use of one queue key, held by the join, the head and any
/// background cleanup of the key; released when the last holder drops.
pub(super) struct KeySlot {
    pub(super) slots: Slots,
    pub(super) id: String,
    pub(super) guard: Option<OwnedMutexGuard<()>>,
}

impl KeySlot {
    pub(super) fn mutex(slots: &Slots, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        match slots.lock() {
            Ok(mut slots) => slots.entry(id.to_owned()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub(super) async fn acquire(slots: &Slots, id: String) -> Self {
        let guard = Self::mutex(slots, &id).lock_owned().await;
        KeySlot {
            slots: slots.clone(),
            id,
            guard: Some(guard),
        }
    }

    pub(super) fn try_acquire(slots: &Slots, id: String) -> Option<Self> {
        let guard = Self::mutex(slots, &id).try_lock_owned().ok()?;
        Some(KeySlot {
            slots: slots.clone(),
            id,
            guard: Some(guard),
        })
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let mutex = OwnedMutexGuard::mutex(&guard).clone();
        drop(guard);
        if let Ok(mut slots) = self.slots.lock() {
            // Only the map and `mutex` hold it: nobody waits, forget it.
            if Arc::strong_count(&mutex) == 2
                && slots.get(&self.id).is_some_and(|m| Arc::ptr_eq(m, &mutex))
            {
                slots.remove(&self.id);
            }
        }
    }
}

/// Deletes the queue key when a join ends without becoming the head.
pub(super) struct Withdrawal {
    pub(super) inner: Core,
    pub(super) key: String,
    pub(super) lease_id: i64,
    /// `Some` once the key was written and is ours to delete.
    pub(super) token: Option<i64>,
    /// The answer of the key's write while it is awaited.
    pub(super) pending: Option<oneshot::Receiver<Result<i64>>>,
    pub(super) slot: Option<Arc<KeySlot>>,
}

impl Withdrawal {
    pub(super) fn disarm(&mut self) -> Arc<KeySlot> {
        self.token = None;
        // `slot` is always `Some` until `disarm`, which is called once.
        self.slot.take().unwrap_or_else(|| {
            Arc::new(KeySlot {
                slots: Slots::default(),
                id: String::new(),
                guard: None,
            })
        })
    }
}

impl Drop for Withdrawal {
    fn drop(&mut self) {
        if let Some(mut rx) = self.pending.take() {
            // After `close` the writer can no longer send: either its answer
            // is already here (the key is ours to delete) or the writer sees
            // the failed send and deletes the key itself.
            rx.close();
            if let Ok(Ok(token)) = rx.try_recv() {
                self.token = Some(token);
            }
        }
        let (Some(token), Some(slot)) = (self.token, self.slot.take()) else {
            return;
        };
        if self.inner.cancel.is_cancelled() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (inner, key, lease_id) = (self.inner.clone(), self.key.clone(), self.lease_id);
            tracing::debug!(key = %key, "left the queue before its head; withdrawing the key");
            rt.spawn(async move {
                release_key(&inner, &key, Some(token), lease_id).await;
                drop(slot);
            });
        }
    }
}
