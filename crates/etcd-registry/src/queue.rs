//! The one candidate queue under [elections](crate::Election) and
//! [locks](crate::Lock): [`LostReason`] and the crate-internal queue.
//!
//! # Protocol
//!
//! It is the protocol of etcd's Go `concurrency` package (`Election` and
//! `Mutex`) and of etcd's server-side election and lock APIs, so `etcdctl
//! elect` and `etcdctl lock` take part as peers:
//!
//! - a member of the queue is the key `{queue prefix}/{lease id in lowercase
//!   hex}`, written if absent under the registry's lease;
//! - the head (the leader, the lock holder) is the key with the lowest create
//!   revision, and that revision is its fencing token;
//! - a member waits for the deletion of the newest key created before its
//!   own, then reads again, until no older key is left. Each key has one
//!   waiter behind it, so a release wakes one member, not the whole queue.
//!   Each read is one transaction that also reads the member's own key, so
//!   a handover costs one round trip after the wake-up, and a member leads
//!   only if no older key existed at a revision at which its key was its own.
//!
//! # What we add to the Go package
//!
//! - The head learns that it lost its place **locally**, at the latest when
//!   etcd could let the lease expire (see [`Head::lost`]); a per-head task
//!   also watches its key and the registry's lease.
//! - Joining fails with [`Error::SessionLost`] when the lease it joined with
//!   is lost; it never keeps waiting on a dead lease.
//! - Leaving is a delete conditional on the key's create revision, so a late
//!   or retried release never deletes a newer member's key (etcd#22082).
//! - A dropped join withdraws its key in the background, even one whose write
//!   was still in flight.
//! - Within one registry (one lease, hence one key per queue) members take
//!   turns through a local slot, so two of them never share the key.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use tokio::sync::{OwnedMutexGuard, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::registry::Inner;
use crate::session::{Backoff, Lease};

/// Why a [`Leadership`](crate::Leadership) or a [`LockGuard`](crate::LockGuard)
/// ended. Returned by their `lost()` and carried by [`Error::NotLeader`] and
/// [`Error::LockLost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// [`Leadership::resign`](crate::Leadership::resign) was called.
    Resigned,
    /// [`LockGuard::release`](crate::LockGuard::release) was called.
    Released,
    /// The key was deleted by someone else (an admin, `etcdctl del`, ...).
    KeyDeleted,
    /// The key was deleted and written again by someone else: it has a
    /// different create revision, so it is no longer this holder's key.
    KeyReplaced,
    /// No keep-alive of the registry's lease was acknowledged in time: etcd
    /// may let the lease (and with it the key) expire from now on.
    /// This is the local safety bound; it fires with no help from etcd, for
    /// example while the holder is cut off from etcd.
    LeaseDeadline,
    /// The registry's lease is gone (expired, revoked, or etcd lost its data)
    /// and the registry moved on to a new lease.
    SessionLost,
    /// The registry was closed or dropped.
    Closed,
}

/// Worded for elections, as it was before locks existed (the CLI prints it);
/// [`Error::LockLost`] words the key reasons for locks.
impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::Resigned => "resigned",
            LostReason::Released => "released",
            LostReason::KeyDeleted => "the leader key was deleted",
            LostReason::KeyReplaced => "the leader key was replaced",
            LostReason::LeaseDeadline => "no keep-alive was acknowledged before the lease deadline",
            LostReason::SessionLost => "the registry's lease was lost",
            LostReason::Closed => "the registry was closed",
        })
    }
}

impl LostReason {
    /// The reason worded for a lock.
    pub(crate) fn lock_wording(self) -> std::borrow::Cow<'static, str> {
        match self {
            LostReason::KeyDeleted => "the lock key was deleted".into(),
            LostReason::KeyReplaced => "the lock key was replaced".into(),
            reason => reason.to_string().into(),
        }
    }
}

/// What a queue is for: the only differences are key layout, wording and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Election,
    Lock,
}

impl Kind {
    /// The operation named in errors when a candidate key is written.
    fn join_op(self) -> &'static str {
        match self {
            Kind::Election => "campaign",
            Kind::Lock => "lock acquire",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Election => "election",
            Kind::Lock => "lock",
        }
    }

    /// The error a member of this queue gets when its place is gone.
    pub(crate) fn lost_error(self, reason: LostReason) -> Error {
        match self {
            Kind::Election => Error::NotLeader(reason),
            Kind::Lock => Error::LockLost(reason),
        }
    }

    /// The reason a head that leaves on its own ends with.
    fn left(self) -> LostReason {
        match self {
            Kind::Election => LostReason::Resigned,
            Kind::Lock => LostReason::Released,
        }
    }
}

/// One queue (an election or a lock) of one registry.
#[derive(Clone)]
pub(crate) struct Queue {
    pub(crate) inner: Arc<Inner>,
    pub(crate) kind: Kind,
    /// The user's name of the election or lock, for keys and logs.
    pub(crate) name: String,
    /// Every member key lives under it; ends with `/`.
    pub(crate) prefix: String,
}

/// Whether joining may wait for this registry's own member of the queue.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    Wait,
    Try,
}

impl Queue {
    fn key(&self, lease_id: i64) -> String {
        match self.kind {
            Kind::Election => self.inner.keys.election_key(&self.name, lease_id),
            Kind::Lock => self.inner.keys.lock_key(&self.name, lease_id),
        }
    }

    /// The registry's current lease, waiting up to the request timeout for one
    /// while the registry recovers.
    pub(crate) async fn lease(&self) -> Result<Lease> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        let lease = inner
            .session
            .wait_lease(inner.config.request_timeout, &inner.cancel)
            .await?;
        if lease.expires <= Instant::now() {
            return Err(Error::SessionLost);
        }
        Ok(lease)
    }

    /// Runs `step` unless the registry closes (`Closed`) or `lease_id` is
    /// lost first (`SessionLost`): a join never waits on a dead lease.
    pub(crate) async fn on_lease<T>(
        &self,
        lease_id: i64,
        step: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let inner = &self.inner;
        tokio::select! {
            biased;
            _ = inner.cancel.cancelled() => Err(Error::Closed),
            reason = lease_lost(inner.session.leases(), lease_id) => {
                tracing::warn!(kind = self.kind.noun(), name = %self.name, lease = %format_args!("{lease_id:x}"), %reason, "lease lost while waiting in the queue");
                Err(Error::SessionLost)
            }
            r = step => r,
        }
    }

    /// Joins the queue and waits to be its head.
    pub(crate) async fn join(&self, value: Vec<u8>) -> Result<Head> {
        let lease = self.lease().await?;
        self.on_lease(lease.id, async {
            let Some(mut member) = self.enqueue(lease.id, value, Turn::Wait).await? else {
                return Err(Error::Closed); // `Turn::Wait` always gets the slot
            };
            let checked_rev = member.wait_turn().await?;
            member.promote(checked_rev)
        })
        .await
    }

    /// Joins the queue only if nobody is ahead: `None` (and no key left)
    /// when another member, of this registry or any other, is.
    pub(crate) async fn try_join(&self, value: Vec<u8>) -> Result<Option<Head>> {
        let lease = self.lease().await?;
        self.on_lease(lease.id, async {
            let Some(mut member) = self.enqueue(lease.id, value, Turn::Try).await? else {
                return Ok(None);
            };
            let place = persist(&self.inner, "read the queue", || {
                place(&self.inner, &self.prefix, &member.key, member.token)
            })
            .await?;
            match place {
                Place::Behind { key, .. } => {
                    tracing::debug!(kind = self.kind.noun(), name = %self.name, holder = %String::from_utf8_lossy(&key), "taken; withdrawing");
                    member.withdraw().await;
                    Ok(None)
                }
                Place::First { rev } => member.promote(rev).map(Some),
                Place::Lost(reason) => Err(member.lost(reason)),
            }
        })
        .await
    }

    /// Writes this registry's key (taking the registry's slot for it first)
    /// and returns the member. `None` when `Turn::Try` finds the slot taken.
    pub(crate) async fn enqueue(
        &self,
        lease_id: i64,
        value: Vec<u8>,
        turn: Turn,
    ) -> Result<Option<Member>> {
        let inner = &self.inner;
        let key = self.key(lease_id);
        let slot = match turn {
            Turn::Wait => KeySlot::acquire(&inner.election_slots, key.clone()).await,
            Turn::Try => match KeySlot::try_acquire(&inner.election_slots, key.clone()) {
                Some(slot) => slot,
                None => return Ok(None),
            },
        };
        let slot = Arc::new(slot);
        let mut guard = Withdrawal {
            inner: inner.clone(),
            key: key.clone(),
            lease_id,
            token: None,
            pending: None,
            slot: Some(slot.clone()),
        };

        // The write runs in its own task so that a dropped join cannot leave
        // a key whose write was still in flight: the task sees that nobody
        // took the answer and deletes what it created. An answer sent but not
        // yet read is taken by the guard's drop.
        let (tx, rx) = oneshot::channel();
        let rx = guard.pending.insert(rx);
        {
            let (inner, key, slot) = (inner.clone(), key.clone(), slot);
            let kind = self.kind;
            let mut tx = tx;
            tokio::spawn(async move {
                let write = persist(&inner, "write the queue key", || {
                    create_key(&inner, kind, &key, lease_id, value.clone())
                });
                let outcome = tokio::select! {
                    result = write => Some(result),
                    _ = tx.closed() => None,
                };
                match outcome {
                    Some(result) => {
                        if let Err(Ok(token)) = tx.send(result) {
                            release_key(&inner, &key, Some(token), lease_id).await;
                        }
                    }
                    // The join went away while the write was being retried,
                    // and an attempt may have landed. The slot keeps this
                    // registry's other members off the key, so delete it.
                    None => release_key(&inner, &key, None, lease_id).await,
                }
                drop(slot);
            });
        }
        let received = rx.await;
        guard.pending = None;
        let token = received.map_err(|_| Error::Closed)??;
        guard.token = Some(token);
        tracing::debug!(kind = self.kind.noun(), name = %self.name, key = %key, revision = token, "queue key written");
        Ok(Some(Member {
            queue: self.clone(),
            key,
            lease_id,
            token,
            guard,
        }))
    }
}

/// A member of the queue that is not (yet) its head. Dropping it withdraws
/// its key in the background.
pub(crate) struct Member {
    queue: Queue,
    key: String,
    lease_id: i64,
    token: i64,
    guard: Withdrawal,
}

impl Member {
    /// Waits until no older member is left at a revision at which our key is
    /// still ours; returns that revision.
    pub(crate) async fn wait_turn(&mut self) -> Result<i64> {
        tracing::debug!(kind = self.queue.kind.noun(), name = %self.queue.name, key = %self.key, "waiting for the members ahead");
        let q = &self.queue;
        match wait_deletes(&q.inner, &q.prefix, &self.key, self.token).await? {
            Ok(rev) => Ok(rev),
            Err(reason) => Err(self.lost(reason)),
        }
    }

    /// Someone deleted or replaced our key: the error to end the join with.
    fn lost(&mut self, reason: LostReason) -> Error {
        self.guard.token = None; // nothing of ours left to delete
        self.queue.kind.lost_error(reason)
    }

    /// Becomes the head, if the lease still holds.
    pub(crate) fn promote(self, checked_rev: i64) -> Result<Head> {
        let Member {
            queue,
            key,
            lease_id,
            token,
            mut guard,
        } = self;
        match queue.inner.session.lease() {
            Some(l) if l.id == lease_id && l.expires > Instant::now() => {}
            _ => return Err(Error::SessionLost),
        }
        let slot = guard.disarm();
        match queue.kind {
            Kind::Election => {
                tracing::info!(election = %queue.name, key = %key, fencing_token = token, "elected leader")
            }
            Kind::Lock => {
                tracing::info!(lock = %queue.name, key = %key, fencing_token = token, "lock acquired")
            }
        }
        Ok(Head::start(&queue, key, lease_id, token, checked_rev, slot))
    }

    /// Deletes our key now (conditional on its create revision); if that
    /// fails, the drop deletes it in the background.
    pub(crate) async fn withdraw(mut self) {
        let Some(token) = self.guard.token else {
            return;
        };
        match delete_key(&self.queue.inner, &self.key, Some(token)).await {
            Ok(()) => {
                self.guard.token = None;
                tracing::debug!(key = %self.key, "queue key withdrawn");
            }
            Err(error) => {
                tracing::warn!(key = %self.key, %error, "could not withdraw the queue key; deleting it in the background");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The head

/// The head of a queue: a leadership or a held lock. Clones share one head.
#[derive(Clone)]
pub(crate) struct Head {
    shared: Arc<Held>,
}

struct Held {
    inner: Arc<Inner>,
    kind: Kind,
    name: String,
    key: String,
    lease_id: i64,
    token: i64,
    lost: Arc<watch::Sender<Option<LostReason>>>,
    /// The key is deleted or is no longer ours: nothing to clean up on drop.
    released: Arc<AtomicBool>,
    slot: std::sync::Mutex<Option<Arc<KeySlot>>>,
    monitor: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Head {
    fn start(
        queue: &Queue,
        key: String,
        lease_id: i64,
        token: i64,
        checked_rev: i64,
        slot: Arc<KeySlot>,
    ) -> Self {
        let inner = queue.inner.clone();
        let lost = Arc::new(watch::Sender::new(None));
        crate::metrics::track_leadership(
            &inner.config.namespace,
            queue.kind,
            &queue.name,
            &lost.subscribe(),
        );
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

    pub(crate) fn inner(&self) -> &Inner {
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
        matches!(s.inner.session.lease(), Some(l) if l.id == s.lease_id && l.expires > Instant::now())
    }

    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        *self.shared.lost.borrow()
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

// ---------------------------------------------------------------------------
// One member per key within a registry

/// One member per queue key at a time within a registry: two members of one
/// registry in one queue would share a key, and both would be its head.
/// Held by the registry (`Inner::election_slots`, for elections and locks).
pub(crate) type Slots = Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Exclusive use of one queue key, held by the join, the head and any
/// background cleanup of the key; released when the last holder drops.
struct KeySlot {
    slots: Slots,
    id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeySlot {
    fn mutex(slots: &Slots, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        match slots.lock() {
            Ok(mut slots) => slots.entry(id.to_owned()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    async fn acquire(slots: &Slots, id: String) -> Self {
        let guard = Self::mutex(slots, &id).lock_owned().await;
        KeySlot {
            slots: slots.clone(),
            id,
            guard: Some(guard),
        }
    }

    fn try_acquire(slots: &Slots, id: String) -> Option<Self> {
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
struct Withdrawal {
    inner: Arc<Inner>,
    key: String,
    lease_id: i64,
    /// `Some` once the key was written and is ours to delete.
    token: Option<i64>,
    /// The answer of the key's write while it is awaited.
    pending: Option<oneshot::Receiver<Result<i64>>>,
    slot: Option<Arc<KeySlot>>,
}

impl Withdrawal {
    fn disarm(&mut self) -> Arc<KeySlot> {
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

fn set_lost(lost: &watch::Sender<Option<LostReason>>, reason: LostReason) -> bool {
    lost.send_if_modified(|r| {
        if r.is_some() {
            return false;
        }
        *r = Some(reason);
        true
    })
}

pub(crate) fn first_get_kv(resp: &etcd_client::TxnResponse) -> Option<KeyValue> {
    resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

fn lease_error(inner: &Inner, e: Error) -> Error {
    if e.is_lease_not_found() {
        inner.session.suspect_lost();
        Error::SessionLost
    } else {
        e
    }
}

// ---------------------------------------------------------------------------
// Protocol steps

/// Runs `step` again through transient failures (timeouts, etcd unreachable),
/// with backoff. Join steps run raced against the loss of the lease, so a
/// join ends with `SessionLost` (or succeeds), not with a slow request.
async fn persist<T, F, Fut>(inner: &Inner, what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::standard();
    loop {
        match step().await {
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, "{what} failed; retrying");
                if !backoff.wait(&inner.cancel).await {
                    return Err(Error::Closed);
                }
            }
            result => return result,
        }
    }
}

/// Writes the queue key if absent (as Go's `Campaign` and `Lock` do) and
/// returns its create revision. A key left by an earlier member of this same
/// lease is reused, with its value updated to `value`.
async fn create_key(
    inner: &Inner,
    kind: Kind,
    key: &str,
    lease_id: i64,
    value: Vec<u8>,
) -> Result<i64> {
    let resp = inner
        .conn
        .retry_on(kind.join_op(), key, |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease_id)),
                )])
                .or_else([TxnOp::get(key, None)]);
            async move { c.txn(txn).await }
        })
        .await
        .map_err(|e| lease_error(inner, e))?;
    if resp.succeeded() {
        return Ok(resp.header().map_or(0, |h| h.revision()));
    }
    let Some(kv) = first_get_kv(&resp) else {
        // Deleted between the compare and the get: cannot happen in one txn.
        return Err(kind.lost_error(LostReason::KeyDeleted));
    };
    if kv.lease() != lease_id {
        return Err(kind.lost_error(LostReason::KeyReplaced));
    }
    let token = kv.create_revision();
    if kv.value() != value.as_slice() {
        let resp = inner
            .conn
            .retry_on(kind.join_op(), key, |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, token)])
                    .and_then([TxnOp::put(
                        key,
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    )]);
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|e| lease_error(inner, e))?;
        if !resp.succeeded() {
            return Err(kind.lost_error(LostReason::KeyDeleted));
        }
    }
    tracing::debug!(
        key,
        revision = token,
        "reusing this lease's existing queue key"
    );
    Ok(token)
}

/// Deletes `key`, only if its create revision is still `token` when given.
async fn delete_key(inner: &Inner, key: &str, token: Option<i64>) -> Result<()> {
    inner
        .conn
        .retry("resign", |mut c| {
            let mut txn = Txn::new();
            if let Some(token) = token {
                txn = txn.when([Compare::create_revision(key, CompareOp::Equal, token)]);
            }
            let txn = txn.and_then([TxnOp::delete(key, None)]);
            async move { c.txn(txn).await }
        })
        .await
        .map(|_| ())
}

/// Deletes our key in the background, retrying until it is done, the lease it
/// lives under is gone (and the key with it), or the registry closes.
async fn release_key(inner: &Inner, key: &str, token: Option<i64>, lease_id: i64) {
    let mut backoff = Backoff::standard();
    loop {
        if inner.cancel.is_cancelled() {
            return;
        }
        match delete_key(inner, key, token).await {
            Ok(()) => {
                tracing::debug!(key, "queue key deleted");
                return;
            }
            Err(error) => {
                if inner.session.lease().is_none_or(|l| l.id != lease_id) {
                    return;
                }
                tracing::warn!(key, %error, "could not delete a queue key; retrying");
                if !backoff.wait(&inner.cancel).await {
                    return;
                }
            }
        }
    }
}

/// Resolves when the lease `lease_id` can no longer be relied on: the registry
/// moved to another lease or has none (`SessionLost`), or its deadline passed
/// with no newer keep-alive acknowledged (`LeaseDeadline`). Purely local.
async fn lease_lost(mut leases: watch::Receiver<Option<Lease>>, lease_id: i64) -> LostReason {
    loop {
        let deadline = match *leases.borrow_and_update() {
            Some(l) if l.id == lease_id => l.expires,
            _ => return LostReason::SessionLost,
        };
        tokio::select! {
            biased;
            changed = leases.changed() => {
                if changed.is_err() {
                    return LostReason::SessionLost;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                // A newer deadline may have been published at the same moment.
                match *leases.borrow_and_update() {
                    Some(l) if l.id == lease_id && l.expires > Instant::now() => {}
                    Some(l) if l.id == lease_id => return LostReason::LeaseDeadline,
                    _ => return LostReason::SessionLost,
                }
            }
        }
    }
}

/// Where a member stands in the queue, as one transaction read it.
enum Place {
    /// `key` is the newest key created before ours; read at `rev`.
    Behind { key: Vec<u8>, rev: i64 },
    /// At `rev` no key older than ours was left and ours was still ours.
    First { rev: i64 },
    /// Nobody was ahead, but our key was deleted or replaced.
    Lost(LostReason),
}

/// Reads, in one transaction and so at one revision, the newest key under
/// `prefix` created before `token` and our own `key`. One round trip decides
/// the head: the two reads one after the other cost a second round trip on
/// every handover, and were made at two revisions.
async fn place(inner: &Inner, prefix: &str, key: &str, token: i64) -> Result<Place> {
    let resp = inner
        .conn
        .retry_on("get", prefix, |mut c| {
            let ahead = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(token - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let txn = Txn::new().and_then([TxnOp::get(prefix, Some(ahead)), TxnOp::get(key, None)]);
            async move { c.txn(txn).await }
        })
        .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut reads = resp.op_responses().into_iter().map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    });
    let (ahead, own) = (reads.next().flatten(), reads.next().flatten());
    // Our key decides only once nobody is ahead, as it did when it was read
    // after the wait: a member behind others whose key went (its lease
    // revoked, say) keeps waiting until `on_lease` reports the lost session.
    // A missing answer reads as a missing key: never as a way to the head.
    Ok(match (ahead, own) {
        (Some(ahead), _) => Place::Behind {
            key: ahead.key().to_vec(),
            rev,
        },
        (None, None) => Place::Lost(LostReason::KeyDeleted),
        (None, Some(kv)) if kv.create_revision() != token => Place::Lost(LostReason::KeyReplaced),
        (None, Some(_)) => Place::First { rev },
    })
}

/// Go's `waitDeletes`: waits until no key under `prefix` has a create revision
/// below `token`, by watching the newest such key until it is deleted, and
/// returns the revision at which that was read with `key` still ours (or why
/// it was not). Keys older than ours can only go, never come back (a key
/// written again gets a new create revision), so the head stays the head.
async fn wait_deletes(
    inner: &Inner,
    prefix: &str,
    key: &str,
    token: i64,
) -> Result<std::result::Result<i64, LostReason>> {
    let mut backoff = Backoff::standard();
    loop {
        let (ahead, rev) = match place(inner, prefix, key, token).await {
            Ok(Place::Behind { key, rev }) => (key, rev),
            Ok(Place::First { rev }) => return Ok(Ok(rev)),
            Ok(Place::Lost(reason)) => return Ok(Err(reason)),
            Err(error) => {
                tracing::warn!(prefix, %error, "reading the members ahead failed; retrying");
                if !backoff.wait(&inner.cancel).await {
                    return Err(Error::Closed);
                }
                continue;
            }
        };
        tracing::debug!(predecessor = %String::from_utf8_lossy(&ahead), "waiting for the member ahead to go");
        match wait_delete(inner, ahead, rev).await {
            Ok(()) => backoff.reset(),
            Err(error) => {
                tracing::warn!(prefix, %error, "watching the member ahead failed; retrying");
                if !backoff.wait(&inner.cancel).await {
                    return Err(Error::Closed);
                }
            }
        }
    }
}

/// Waits until `key` is deleted after revision `rev`.
async fn wait_delete(inner: &Inner, key: Vec<u8>, rev: i64) -> Result<()> {
    let mut watch = inner.conn.watch(key, false, rev + 1).await?;
    loop {
        let resp = watch.next().await?;
        if resp
            .events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            return Ok(());
        }
    }
}

/// The per-head task: resolves `lost` at the lease deadline, when the lease
/// changes, when our key goes, or when the registry closes. After a deadline
/// it keeps trying to delete the key, which would otherwise hold the queue
/// if the lease survived the outage.
#[allow(clippy::too_many_arguments)]
async fn monitor(
    inner: Arc<Inner>,
    key: String,
    lease_id: i64,
    token: i64,
    checked_rev: i64,
    lost: Arc<watch::Sender<Option<LostReason>>>,
    released: Arc<AtomicBool>,
    slot: Arc<KeySlot>,
) {
    let mut lost_rx = lost.subscribe();
    let reason = tokio::select! {
        biased;
        _ = inner.cancel.cancelled() => LostReason::Closed,
        _ = lost_rx.wait_for(Option::is_some) => return, // left, or proclaim saw the loss
        reason = lease_lost(inner.session.leases(), lease_id) => reason,
        reason = watch_own_key(&inner, &key, token, checked_rev) => reason,
    };
    if set_lost(&lost, reason) {
        tracing::warn!(key = %key, fencing_token = token, %reason, "lost the head of the queue");
    }
    match reason {
        LostReason::KeyDeleted | LostReason::KeyReplaced | LostReason::SessionLost => {
            released.store(true, Ordering::SeqCst);
        }
        LostReason::LeaseDeadline => {
            release_key(&inner, &key, Some(token), lease_id).await;
            released.store(true, Ordering::SeqCst);
        }
        LostReason::Resigned | LostReason::Released | LostReason::Closed => {}
    }
    drop(slot);
}

/// Resolves when our key is deleted or replaced; survives broken watches.
async fn watch_own_key(inner: &Inner, key: &str, token: i64, checked_rev: i64) -> LostReason {
    let mut backoff = Backoff::standard();
    let mut from = checked_rev + 1;
    loop {
        match watch_key_once(inner, key, token, &mut from, &mut backoff).await {
            Ok(reason) => return reason,
            Err(error) => tracing::debug!(key, %error, "queue key watch interrupted; re-checking"),
        }
        loop {
            if !backoff.wait(&inner.cancel).await {
                return LostReason::Closed;
            }
            let resp = inner
                .conn
                .once("get", |mut c| {
                    let key = key.to_owned();
                    async move { c.get(key, None).await }
                })
                .await;
            match resp {
                Ok(resp) => {
                    match resp.kvs().first() {
                        None => return LostReason::KeyDeleted,
                        Some(kv) if kv.create_revision() != token => {
                            return LostReason::KeyReplaced;
                        }
                        Some(_) => {}
                    }
                    from = resp.header().map_or(from, |h| h.revision() + 1);
                    break;
                }
                Err(error) => tracing::debug!(key, %error, "queue key check failed; retrying"),
            }
        }
    }
}

async fn watch_key_once(
    inner: &Inner,
    key: &str,
    token: i64,
    from: &mut i64,
    backoff: &mut Backoff,
) -> Result<LostReason> {
    let mut watch = inner.conn.watch(key, false, *from).await?;
    loop {
        let resp = watch.next().await?;
        if resp.created() {
            backoff.reset();
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            if event.event_type() == EventType::Delete {
                return Ok(LostReason::KeyDeleted);
            }
            if kv.create_revision() != token {
                return Ok(LostReason::KeyReplaced);
            }
            *from = (*from).max(kv.mod_revision() + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lost_reasons_read_well() {
        assert_eq!(LostReason::Resigned.to_string(), "resigned");
        let e = Error::NotLeader(LostReason::KeyDeleted);
        assert_eq!(
            e.to_string(),
            "leadership was lost: the leader key was deleted"
        );
        let e = Kind::Lock.lost_error(LostReason::KeyDeleted);
        assert_eq!(e.to_string(), "the lock was lost: the lock key was deleted");
        let e = Kind::Lock.lost_error(LostReason::LeaseDeadline);
        assert_eq!(
            e.to_string(),
            "the lock was lost: no keep-alive was acknowledged before the lease deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lease_deadline_fires_without_etcd_and_is_rearmed_by_keep_alives() {
        let start = Instant::now();
        let (tx, rx) = watch::channel(Some(Lease {
            id: 7,
            expires: start + Duration::from_secs(2),
        }));
        let lost = tokio::spawn(lease_lost(rx, 7));
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send_replace(Some(Lease {
            id: 7,
            expires: start + Duration::from_secs(5),
        }));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !lost.is_finished(),
            "a newer deadline must re-arm the timer"
        );
        assert_eq!(lost.await.ok(), Some(LostReason::LeaseDeadline));
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
    }

    // Pins the deadline arithmetic: with the margin set to zero, or with the
    // deadline counted from the answer's arrival, this fails (checked by hand).
    // The integration test `a_leader_behind_slow_answers_stops_before_the_server_deadline`
    // (tests/safety.rs) pins that the session passes the send time in.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_send_time_minus_a_margin() {
        let ttl = Duration::from_secs(3);
        let sent = Instant::now();
        // The answer arrives one second after the keep-alive was sent.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let expires = crate::session::lease_deadline(sent, 3, ttl);
        let server_deadline = sent + ttl;
        assert!(
            server_deadline - expires >= Duration::from_millis(250),
            "the margin must be at least 250 ms, it is {:?}",
            server_deadline - expires
        );
        assert_eq!(expires, sent + ttl - Duration::from_millis(310));
        let (_tx, rx) = watch::channel(Some(Lease { id: 7, expires }));
        assert_eq!(lease_lost(rx, 7).await, LostReason::LeaseDeadline);
        assert!(Instant::now() < server_deadline);
        assert_eq!(Instant::now(), sent + Duration::from_millis(2690));
        // A TTL etcd reports as expired gives no time at all.
        assert!(crate::session::lease_deadline(Instant::now(), -1, ttl) <= Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_lease_id_is_a_lost_session() {
        let now = Instant::now();
        let (tx, rx) = watch::channel(Some(Lease {
            id: 7,
            expires: now + Duration::from_secs(60),
        }));
        let lost = tokio::spawn(lease_lost(rx, 7));
        tx.send_replace(Some(Lease {
            id: 8,
            expires: now + Duration::from_secs(60),
        }));
        assert_eq!(lost.await.ok(), Some(LostReason::SessionLost));
        let (_tx, rx) = watch::channel(None);
        assert_eq!(lease_lost(rx, 7).await, LostReason::SessionLost);
    }

    #[test]
    fn a_taken_slot_is_not_waited_for_by_a_try() {
        let slots = Slots::default();
        let held = KeySlot::try_acquire(&slots, "k".into());
        assert!(held.is_some());
        assert!(KeySlot::try_acquire(&slots, "k".into()).is_none());
        assert!(KeySlot::try_acquire(&slots, "other".into()).is_some());
        drop(held);
        assert!(KeySlot::try_acquire(&slots, "k".into()).is_some());
        assert!(
            slots.lock().unwrap().is_empty(),
            "unused slots are forgotten"
        );
    }
}
