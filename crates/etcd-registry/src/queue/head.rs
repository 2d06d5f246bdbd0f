//! The head of a queue: a leadership or a held lock, and its monitor.

use super::*;

// ---------------------------------------------------------------------------
// The head

/// The head of a queue: a leadership or a held lock. Clones share one head.
#[derive(Clone)]
pub(crate) struct Head {
    pub(super) shared: Arc<Held>,
}

pub(super) struct Held {
    pub(super) inner: Core,
    pub(super) kind: Kind,
    pub(super) name: String,
    pub(super) key: String,
    pub(super) lease_id: i64,
    pub(super) token: i64,
    pub(super) lost: Arc<watch::Sender<Option<LostReason>>>,
    /// The key is deleted or is no longer ours: nothing to clean up on drop.
    pub(super) released: Arc<AtomicBool>,
    pub(super) slot: std::sync::Mutex<Option<Arc<KeySlot>>>,
    pub(super) monitor: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Head {
    pub(super) fn start(
        queue: &Queue,
        key: String,
        lease_id: i64,
        token: i64,
        checked_rev: i64,
        slot: Arc<KeySlot>,
    ) -> Self {
        let inner = queue.inner.clone();
        let lost = Arc::new(watch::Sender::new(None));
        if queue.kind == Kind::Election {
            crate::metrics::track_leadership(inner.namespace(), &queue.name, &lost.subscribe());
        }
        let released = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(monitor(
            inner.clone(),
            key.clone(),
            lease_id,
            token,
            checked_rev,
            lost.clone(),
            released.clone(),
            slot.clone(),
        ));
        Head {
            shared: Arc::new(Held {
                inner,
                kind: queue.kind,
                name: queue.name.clone(),
                key,
                lease_id,
                token,
                lost,
                released,
                slot: std::sync::Mutex::new(Some(slot)),
                monitor: std::sync::Mutex::new(Some(monitor)),
            }),
        }
    }

    pub(crate) fn core(&self) -> &Core {
        &self.shared.inner
    }

    pub(crate) fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) fn token(&self) -> i64 {
        self.shared.token
    }

    pub(crate) fn key(&self) -> &str {
        &self.shared.key
    }

    pub(crate) fn lease_id(&self) -> i64 {
        self.shared.lease_id
    }

    /// Reads local state only, including the lease deadline itself, so it
    /// turns `false` at the deadline even if the monitor has not run yet.
    pub(crate) fn is_held(&self) -> bool {
        let s = &self.shared;
        if s.lost.borrow().is_some() || s.inner.cancel.is_cancelled() {
            return false;
        }
        crate::session::live_deadline(s.inner.session.lease(), s.lease_id).is_some()
    }

    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        *self.shared.lost.borrow()
    }

    /// The local deadline of this head's lease while it can be relied on
    /// (see `Leadership::lease_deadline`, `LockGuard::lease_deadline`).
    pub(crate) fn lease_deadline(&self) -> Option<Instant> {
        crate::session::live_deadline(*self.leases().borrow(), self.lease_id())
    }

    /// Resolves once that deadline is less than `within` away, or gone.
    pub(crate) async fn lease_expiring_within(&self, within: std::time::Duration) {
        // Subscribed before the first read, so no later keep-alive is missed.
        let mut leases = self.leases();
        loop {
            let Some(at) = self.lease_deadline().and_then(|d| d.checked_sub(within)) else {
                return;
            };
            if at <= Instant::now() {
                return;
            }
            tokio::select! {
                changed = leases.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(at) => {}
            }
        }
    }

    /// The session's published leases, to follow this head's lease deadline
    /// (`Leadership::lease_deadline`, `LockGuard::lease_expiring_within`).
    pub(crate) fn leases(&self) -> watch::Receiver<Option<Lease>> {
        self.shared.inner.session.leases()
    }

    /// Why the head is not held: the recorded reason, or what `is_held` saw.
    pub(crate) fn not_held_reason(&self) -> LostReason {
        self.lost_reason()
            .unwrap_or(if self.shared.inner.cancel.is_cancelled() {
                LostReason::Closed
            } else {
                LostReason::LeaseDeadline
            })
    }

    /// Resolves when the head is lost, locally, no later than the lease deadline.
    pub(crate) async fn lost(&self) -> LostReason {
        let mut rx = self.shared.lost.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.unwrap_or(LostReason::Closed),
            Err(_) => LostReason::Closed,
        }
    }

    /// Records the loss (the first reason wins); true if it was the first.
    pub(crate) fn set_lost(&self, reason: LostReason) -> bool {
        set_lost(&self.shared.lost, reason)
    }

    /// The key is gone or no longer ours: nothing to delete any more.
    pub(crate) fn mark_released(&self) {
        self.shared.released.store(true, Ordering::SeqCst);
    }

    /// Leaves the queue: ends the head at once, then deletes the key,
    /// conditional on its create revision, so that the next member goes
    /// ahead at once. Idempotent.
    pub(crate) async fn leave(&self) -> Result<()> {
        let s = &self.shared;
        self.set_lost(s.kind.left());
        if s.released.load(Ordering::SeqCst) {
            return Ok(());
        }
        delete_key(&s.inner, &s.key, Some(s.token)).await?;
        s.released.store(true, Ordering::SeqCst);
        if let Some(m) = s.monitor.lock().ok().and_then(|mut m| m.take()) {
            m.abort();
        }
        if let Ok(mut slot) = s.slot.lock() {
            slot.take();
        }
        match s.kind {
            Kind::Election => {
                tracing::info!(election = %s.name, key = %s.key, fencing_token = s.token, "resigned")
            }
            Kind::Lock => {
                tracing::info!(lock = %s.name, key = %s.key, fencing_token = s.token, "lock released")
            }
        }
        Ok(())
    }

    /// For `Debug` impls.
    pub(crate) fn debug_fields(&self, d: &mut std::fmt::DebugStruct<'_, '_>) {
        let s = &self.shared;
        d.field(s.kind.noun(), &s.name)
            .field("key", &s.key)
            .field("fencing_token", &s.token)
            .field("lost", &*s.lost.borrow());
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(m) = self.monitor.get_mut().ok().and_then(Option::take) {
            m.abort();
        }
        let slot = self.slot.get_mut().ok().and_then(Option::take);
        if self.released.load(Ordering::SeqCst) || self.inner.cancel.is_cancelled() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (inner, key, token, lease_id) = (
                self.inner.clone(),
                self.key.clone(),
                self.token,
                self.lease_id,
            );
            tracing::debug!(key = %key, "dropped while held; deleting its key");
            rt.spawn(async move {
                release_key(&inner, &key, Some(token), lease_id).await;
                drop(slot);
            });
        }
    }
}
