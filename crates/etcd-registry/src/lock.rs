//! Distributed locks with fencing: [`Lock`] and [`LockGuard`].
//!
//! # Protocol
//!
//! The layout and rules are those of etcd's Go `concurrency.Mutex` (and of
//! etcd's server-side lock API), so `etcdctl lock` takes part as a peer:
//!
//! - a holder or waiter is the key `{prefix}/{namespace}/locks/{lock}/{lease id
//!   in lowercase hex}`, written with an empty value under the registry's lease;
//! - the holder is the key with the lowest create revision, and that revision
//!   is the holder's fencing token;
//! - a waiter waits for the key just before it (by create revision) to be
//!   deleted, then for the one before that, until none is left.
//!
//! It is the queue elections use (see `queue.rs`), so a lock has the same
//! guarantees as a [`Leadership`](crate::Leadership): a holder learns
//! locally, before etcd could let its lease expire, that it lost the lock
//! ([`LockGuard::lost`]); a release never deletes a newer holder's key; a
//! dropped acquisition or guard leaves no key behind.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Retry;
use crate::core::Core;
use crate::error::LostReason;
use crate::error::{Error, Result};
use crate::keys::validate_segment;
use crate::queue::{Head, Kind, Queue, Slots, Turn};

/// One distributed lock of a [`Registry`](crate::Registry); create it with [`Registry::lock`](crate::Registry::lock).
///
/// A `Lock` is cheap to clone and holds no state in etcd by itself: keys
/// exist only while an acquisition or a [`LockGuard`] does.
///
/// Every registry acquires with its own lease. **A registry that asks for a
/// lock it already holds waits** until its own guard is released or dropped
/// (and [`try_acquire`](Lock::try_acquire) returns `None`): the registry has
/// one lease and so one key per lock, and two acquisitions of it take turns,
/// as two campaigns of one registry do. The lock is not re-entrant.
#[derive(Clone)]
pub struct Lock {
    queue: Queue,
    etcd_name: String,
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock")
            .field("name", &self.queue.name)
            .field("etcd_name", &self.etcd_name)
            .finish()
    }
}

impl Lock {
    /// The lock `name` of the registry whose core this is; `slots` are the
    /// registry's (one member per queue key).
    pub(crate) fn new(core: &Core, slots: &Slots, name: &str) -> Result<Self> {
        validate_segment("lock", name)?;
        Ok(Lock {
            queue: Queue {
                inner: core.clone(),
                slots: slots.clone(),
                kind: Kind::Lock,
                name: name.to_owned(),
                prefix: core.keys.lock_prefix(name),
            },
            etcd_name: core.keys.lock_name(name),
        })
    }
    /// The lock name, as given to [`Registry::lock`](crate::Registry::lock).
    pub fn name(&self) -> &str {
        &self.queue.name
    }

    /// The name etcd's `concurrency.Mutex` and `etcdctl lock` use for this
    /// lock: `{prefix}/{namespace}/locks/{name}`.
    pub fn etcd_name(&self) -> &str {
        &self.etcd_name
    }

    /// Waits until the lock is held.
    ///
    /// The key is written under the registry's current lease (waiting up to
    /// the request timeout for one while the registry recovers). Then it
    /// waits, with no polling, until every key created before it is gone.
    ///
    /// # Errors
    ///
    /// - [`Error::SessionLost`] when the lease it waits with is lost, or no
    ///   keep-alive was acknowledged before the lease deadline: it never keeps
    ///   waiting on a dead lease. Acquire again; the registry grants a new
    ///   lease on its own.
    /// - [`Error::Closed`] when the registry is closed or dropped.
    /// - [`Error::LockLost`] when someone else deleted or replaced the key
    ///   while it waited.
    /// - etcd errors that retrying cannot fix. Timeouts and unreachable etcd
    ///   are retried with backoff until the lease deadline decides.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future withdraws the key in the background (a key whose
    /// write was still in flight is deleted once the write answers), so no
    /// waiter is left behind to hold up others. After the registry is closed
    /// or dropped nothing is deleted; the key goes with the lease.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// let guard = registry.lock("shard-7")?.acquire().await?;
    /// println!("holding shard-7 with fencing token {}", guard.fencing_token());
    /// # Ok(()) }
    /// ```
    pub async fn acquire(&self) -> Result<LockGuard> {
        let _timer = crate::metrics::timer(&self.queue.inner.config.namespace, "lock");
        let head = self.queue.join(Vec::new()).await?;
        Ok(LockGuard { head })
    }

    /// Takes the lock if nobody holds it; never waits for another holder.
    ///
    /// `Ok(None)` when another registry, an `etcdctl lock`, or this same
    /// registry holds the lock or is ahead in the queue. Its key is then
    /// deleted before it returns (or in the background if etcd does not
    /// answer). It still waits for etcd to answer its own requests.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Lock::acquire). Cancel safe in the same way.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// match registry.lock("nightly-backup")?.try_acquire().await? {
    ///     Some(guard) => { /* ... run the backup ... */ guard.release().await? }
    ///     None => println!("another node is running the backup"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>> {
        let _timer = crate::metrics::timer(&self.queue.inner.config.namespace, "lock");
        let head = self.queue.try_join(Vec::new()).await?;
        Ok(head.map(|head| LockGuard { head }))
    }

    /// Waits up to `timeout` for the lock; `Ok(None)` when it was not
    /// acquired in time.
    ///
    /// On timeout its key is deleted before it returns (or in the background
    /// if etcd does not answer), so it leaves nothing behind. That delete may
    /// make it return a little after `timeout`.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Lock::acquire). Cancel safe in the same way.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// use std::time::Duration;
    /// let lock = registry.lock("reindex")?;
    /// let Some(guard) = lock.acquire_timeout(Duration::from_secs(30)).await? else {
    ///     return Ok(()); // someone else is reindexing
    /// };
    /// # Ok(()) }
    /// ```
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        let _timer = crate::metrics::timer(&self.queue.inner.config.namespace, "lock");
        let deadline = Instant::now() + timeout;
        let queue = &self.queue;
        let Ok(lease) = tokio::time::timeout_at(deadline, queue.lease()).await else {
            return Ok(None);
        };
        let lease = lease?;
        // Boxed: the whole acquisition is a large future (see `Queue::join`).
        queue
            .on_lease(lease.id, Box::pin(async {
                let enqueue = queue.enqueue(lease.id, Vec::new(), Turn::Wait);
                // On timeout the dropped write withdraws its key in the background.
                let Ok(member) = tokio::time::timeout_at(deadline, enqueue).await else {
                    return Ok(None);
                };
                let Some(mut member) = member? else {
                    return Err(Error::Closed); // `Turn::Wait` always gets the slot
                };
                match tokio::time::timeout_at(deadline, member.wait_turn()).await {
                    Ok(checked_rev) => Ok(Some(LockGuard {
                        head: member.promote(checked_rev?)?,
                    })),
                    Err(_) => {
                        tracing::debug!(lock = %queue.name, ?timeout, "lock not acquired in time; withdrawing");
                        member.withdraw().await;
                        Ok(None)
                    }
                }
            }))
            .await
    }

    /// Runs `task` under the lock: acquires it, calls `task` with the
    /// [`LockGuard`], and releases the lock when the task finishes, returning
    /// its output.
    ///
    /// - When the lock is lost, it **drops the task's future** (it stops at
    ///   its next `.await`) and returns [`Error::LockLost`] with the reason.
    ///   The drop happens when [`LockGuard::lost`] resolves, so no later than
    ///   the lease deadline. Code between two `.await`s is not interrupted:
    ///   guard writes to external resources with [`LockGuard::fencing_token`].
    /// - When the task itself releases the guard, it waits for the task to
    ///   finish and returns its output.
    /// - When the registry is closed or dropped, it drops the task and
    ///   returns [`Error::Closed`].
    ///
    /// While waiting for the lock, a lost lease ([`Error::SessionLost`]) or a
    /// key deleted by someone else is logged and the lock is asked for again
    /// with capped exponential backoff; other errors are returned. The task
    /// runs at most once.
    ///
    /// Cancel safety: dropping the returned future drops the task and
    /// withdraws the key or releases the lock in the background.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// let moved = registry
    ///     .lock("shard-7")?
    ///     .with(|guard| async move {
    ///         println!("moving shard-7 with fencing token {}", guard.fencing_token());
    ///         // ... the critical section; it is dropped if the lock is lost ...
    ///         1024
    ///     })
    ///     .await?;
    /// assert_eq!(moved, 1024);
    /// # Ok(()) }
    /// ```
    pub async fn with<F, Fut, T>(&self, task: F) -> Result<T>
    where
        F: FnOnce(LockGuard) -> Fut,
        Fut: Future<Output = T>,
    {
        let cancel = self.queue.inner.cancel.clone();
        let mut retry = Retry::standard(format!("acquiring lock {}", self.queue.name));
        let guard = loop {
            match self.acquire().await {
                Ok(guard) => break guard,
                Err(error @ (Error::SessionLost | Error::LockLost(_))) => {
                    if !retry.failed(&cancel, &error).await {
                        return Err(Error::Closed);
                    }
                }
                Err(error) => return Err(error),
            }
        };
        let run = task(guard.clone());
        let mut run = std::pin::pin!(run);
        tokio::select! {
            out = &mut run => {
                if let Err(error) = guard.release().await {
                    tracing::warn!(lock = %self.queue.name, %error, "could not release after the task finished; the key is deleted in the background");
                }
                Ok(out)
            }
            reason = guard.lost() => match reason {
                LostReason::Released => Ok(run.await),
                LostReason::Closed => Err(Error::Closed),
                reason => {
                    tracing::warn!(lock = %self.queue.name, reason = %reason.lock_wording(), "lock lost; task cancelled");
                    Err(Error::LockLost(reason))
                }
            },
        }
    }
}

/// A held lock, from [`Lock::acquire`], [`Lock::try_acquire`],
/// [`Lock::acquire_timeout`] or [`Lock::with`].
///
/// # Safety bound and its assumption
///
/// A `LockGuard` ends locally, with no help from etcd, no later than the
/// moment etcd could let the registry's lease expire: the send time of the
/// last acknowledged keep-alive plus the TTL, minus a safety margin (250 ms +
/// 2% of the TTL). So a holder cut off from etcd stops believing it holds the
/// lock before etcd can delete its key and hand the lock to someone else.
/// This is the bound of [`Leadership`](crate::Leadership) and rests on the
/// same assumption: the clocks here and on the etcd server run at the same
/// rate, and this process is not paused between checking
/// [`is_held`](LockGuard::is_held) and acting.
///
/// # Fencing
///
/// That bound cannot stop a write already on its way to another system. Pass
/// [`fencing_token`](LockGuard::fencing_token) along with every write to an
/// external resource, and have the resource reject tokens smaller than the
/// largest it has seen. Tokens are create revisions of etcd's single revision
/// counter, so every later holder's token is larger.
///
/// # Drop
///
/// Clones share one hold. When the last clone is dropped without
/// [`release`](LockGuard::release), the key is deleted in the background
/// (unless the registry was closed or dropped: then the key goes with the
/// lease, as after a crash).
#[derive(Clone)]
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    head: Head,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("LockGuard");
        self.head.debug_fields(&mut d);
        d.finish()
    }
}

impl LockGuard {
    /// The fencing token: the create revision of the lock key. It rises
    /// strictly across successive holders of the lock (see the type docs).
    pub fn fencing_token(&self) -> i64 {
        self.head.token()
    }

    /// The etcd key of this hold: `{lock's etcd name}/{lease id in hex}`.
    pub fn key(&self) -> &str {
        self.head.key()
    }

    /// The lease the lock key lives under.
    pub fn lease_id(&self) -> i64 {
        self.head.lease_id()
    }

    /// Whether the lock is still held. No round trip: it reads local state
    /// only, including the lease deadline itself, so it turns `false` at the
    /// deadline even if the background task has not run yet.
    pub fn is_held(&self) -> bool {
        self.head.is_held()
    }

    /// Why the lock was lost, or `None` while it is held.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.head.lost_reason()
    }

    /// Resolves when the lock is lost, with the reason: released, key deleted
    /// or replaced by someone else, lease deadline passed, lease lost, or
    /// registry closed. It resolves at once if the lock was already lost.
    ///
    /// **Safety bound:** it resolves locally, with no help from etcd, no later
    /// than the moment etcd could let the lease expire (see the type docs), as
    /// [`Leadership::lost`](crate::Leadership::lost) does. A holder cut off
    /// from etcd therefore stops before anyone else can acquire the lock.
    ///
    /// Cancel safe: it only waits on local state, and can be called again.
    ///
    /// ```no_run
    /// # async fn demo(guard: etcd_registry::LockGuard) {
    /// # async fn migrate(token: i64) {}
    /// tokio::select! {
    ///     reason = guard.lost() => eprintln!("lock lost: {reason}"),
    ///     _ = migrate(guard.fencing_token()) => {}
    /// }
    /// # }
    /// ```
    pub async fn lost(&self) -> LostReason {
        self.head.lost().await
    }

    /// Releases the lock: it ends at once ([`lost`](LockGuard::lost) resolves
    /// with [`LostReason::Released`] before anything is sent), then the key is
    /// deleted so that the next waiter acquires at once.
    ///
    /// The delete is conditional on the key still having this hold's create
    /// revision, so a late or retried release never deletes another holder's
    /// key, even one of this same registry. Calling it again, or after the
    /// lock was lost, is fine. If the delete fails it is returned, and the key
    /// is deleted in the background when the last clone of this guard is
    /// dropped.
    pub async fn release(&self) -> Result<()> {
        let _timer = crate::metrics::timer(&self.head.core().config.namespace, "unlock");
        self.head.leave().await
    }
}

// ---------------------------------------------------------------------------
// The lease deadline, for stopping work gracefully before it

impl LockGuard {
    /// The local deadline of the lease this hold lives under: the instant at
    /// which [`lost`](LockGuard::lost) resolves with
    /// [`LostReason::LeaseDeadline`] unless a keep-alive is acknowledged
    /// before it. Each acknowledged keep-alive moves it later; while
    /// keep-alives fail it stays put and comes closer.
    ///
    /// `None` once that lease can no longer be relied on: its deadline
    /// passed, or the registry moved to another lease or closed. It
    /// describes the lease only; whether the key is still ours is
    /// [`is_held`](LockGuard::is_held). No round trip.
    ///
    /// ```no_run
    /// # fn demo(guard: etcd_registry::LockGuard) {
    /// if let Some(deadline) = guard.lease_deadline() {
    ///     let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    ///     println!("the hold ends within {left:?} unless a keep-alive is acknowledged");
    /// }
    /// # }
    /// ```
    pub fn lease_deadline(&self) -> Option<tokio::time::Instant> {
        self.head.lease_deadline()
    }

    /// Resolves once the [`lease_deadline`](LockGuard::lease_deadline) is
    /// less than `within` away, or the lease can no longer be relied on;
    /// at once if that is already so.
    ///
    /// With healthy keep-alives the deadline stays between TTL − TTL/3 and
    /// TTL away (minus the safety margin), so a `within` below that resolves
    /// only once keep-alives have failed for a while: the moment to start a
    /// graceful stop that must end by the deadline. `within` of zero resolves
    /// at the deadline itself. It does not watch the key: combine it with
    /// [`lost`](LockGuard::lost) for that.
    ///
    /// Cancel safe: it only waits on local state, and can be called again.
    ///
    /// ```no_run
    /// # async fn demo(guard: etcd_registry::LockGuard) {
    /// # async fn stop_gracefully() {}
    /// use std::time::Duration;
    /// tokio::select! {
    ///     _ = guard.lease_expiring_within(Duration::from_secs(2)) => stop_gracefully().await,
    ///     reason = guard.lost() => eprintln!("lock lost: {reason}"),
    /// }
    /// # }
    /// ```
    pub async fn lease_expiring_within(&self, within: std::time::Duration) {
        self.head.lease_expiring_within(within).await
    }
}
