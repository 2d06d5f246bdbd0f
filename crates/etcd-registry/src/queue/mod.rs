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

use crate::core::Core;
use crate::error::{Error, Result};

mod head;
mod slots;
mod steps;

use crate::backoff::Retry;
use crate::error::LostReason;
use crate::session::Lease;
pub(crate) use head::Head;
pub(crate) use slots::Slots;
use slots::*;
use steps::*;

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
    pub(crate) inner: Core,
    /// The registry's slots: one member per queue key at a time.
    pub(crate) slots: Slots,
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
        if !lease.is_live() {
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
        // Boxed: the whole join is a large future, and it nests in callers'.
        self.on_lease(
            lease.id,
            Box::pin(async {
                let Some(mut member) = self.enqueue(lease.id, value, Turn::Wait).await? else {
                    return Err(Error::Closed); // `Turn::Wait` always gets the slot
                };
                let checked_rev = member.wait_turn().await?;
                member.promote(checked_rev)
            }),
        )
        .await
    }

    /// Joins the queue only if nobody is ahead: `None` (and no key left)
    /// when another member, of this registry or any other, is.
    pub(crate) async fn try_join(&self, value: Vec<u8>) -> Result<Option<Head>> {
        let lease = self.lease().await?;
        // Boxed: the whole join is a large future, and it nests in callers'.
        self.on_lease(lease.id, Box::pin(async {
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
        }))
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
            Turn::Wait => KeySlot::acquire(&self.slots, key.clone()).await,
            Turn::Try => match KeySlot::try_acquire(&self.slots, key.clone()) {
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
        match Box::pin(wait_deletes(&q.inner, &q.prefix, &self.key, self.token)).await? {
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
        if crate::session::live_deadline(queue.inner.session.lease(), lease_id).is_none() {
            return Err(Error::SessionLost);
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
