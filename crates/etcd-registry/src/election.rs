//! Leader election: [`Election`], [`Leadership`], [`LostReason`], [`LeaderInfo`],
//! [`LeaderStream`].
//!
//! # Protocol
//!
//! The layout and rules are those of etcd's Go `concurrency.Election` (and of
//! etcd's server-side election API), so `etcdctl elect` takes part as a peer:
//!
//! - a candidate is the key `{prefix}/{namespace}/elections/{election}/{lease id
//!   in lowercase hex}`, written under the registry's lease, whose value is the
//!   proposal;
//! - the leader is the candidate with the lowest create revision;
//! - a candidate waits for the candidate just before it (by create revision) to
//!   be deleted, then for the one before that, until none is left.
//!
//! # What we add to the Go package
//!
//! - A [`Leadership`] learns that it ended, through [`Leadership::lost`] and
//!   [`Leadership::is_leader`], and it learns it **locally**, at the latest
//!   at the moment etcd could let the lease expire (see [`Leadership::lost`]).
//! - [`Election::campaign`] fails with [`Error::SessionLost`] when the lease it
//!   campaigns with is lost; it never waits on a dead lease.
//! - [`Election::observe`] reports "no leader" (`None`) and survives
//!   reconnects and compaction.
//! - Leadership is decided by create revision only, never by comparing
//!   proposals: two candidates with one proposal never both lead.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::WatchEnd;
use crate::error::{Error, Result};
use crate::keys::validate_segment;
use crate::registry::{Inner, Registry};
use crate::session::{Backoff, Lease};

/// Why a [`Leadership`] ended. Returned by [`Leadership::lost`] and carried by
/// [`Error::NotLeader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// [`Leadership::resign`] was called.
    Resigned,
    /// The leader key was deleted by someone else (an admin, `etcdctl del`, ...).
    KeyDeleted,
    /// The leader key was deleted and written again by someone else: it has a
    /// different create revision, so it is no longer this leadership's key.
    KeyReplaced,
    /// No keep-alive of the registry's lease was acknowledged in time: etcd
    /// may let the lease (and with it the leader key) expire from now on.
    /// This is the local safety bound; it fires with no help from etcd, for
    /// example while the leader is cut off from etcd.
    LeaseDeadline,
    /// The registry's lease is gone (expired, revoked, or etcd lost its data)
    /// and the registry moved on to a new lease.
    SessionLost,
    /// The registry was closed or dropped.
    Closed,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::Resigned => "resigned",
            LostReason::KeyDeleted => "the leader key was deleted",
            LostReason::KeyReplaced => "the leader key was replaced",
            LostReason::LeaseDeadline => "no keep-alive was acknowledged before the lease deadline",
            LostReason::SessionLost => "the registry's lease was lost",
            LostReason::Closed => "the registry was closed",
        })
    }
}

/// The current leader of an election, as read from etcd.
///
/// The proposal is kept as bytes because that is what etcd stores; candidates
/// of this crate and `etcdctl elect` write text, which
/// [`proposal_str`](LeaderInfo::proposal_str) returns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct LeaderInfo {
    /// The leader's proposal (the value of its key), as written by `campaign`
    /// or [`Leadership::proclaim`].
    pub proposal: Vec<u8>,
    /// The create revision of the leader key: the leader's fencing token.
    pub fencing_token: i64,
    /// The lease the leader key lives under.
    pub lease_id: i64,
}

impl LeaderInfo {
    /// The proposal as text; invalid UTF-8 is replaced with `U+FFFD`.
    pub fn proposal_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.proposal)
    }

    pub(crate) fn from_kv(kv: &KeyValue) -> Self {
        LeaderInfo {
            proposal: kv.value().to_vec(),
            fencing_token: kv.create_revision(),
            lease_id: kv.lease(),
        }
    }
}

impl Registry {
    /// An election named `name` in this registry's namespace.
    ///
    /// Every candidate of the election campaigns with the lease of its own
    /// registry. The name is validated like a service name (non-empty, no `/`,
    /// no control characters); an invalid name fails with
    /// [`Error::InvalidInput`]. Nothing is sent to etcd.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// let election = registry.election("nightly-report")?;
    /// let leadership = election.campaign("instance-01").await?;
    /// // ... run the job, then step down so the next candidate wins at once:
    /// leadership.resign().await?;
    /// # Ok(()) }
    /// ```
    pub fn election(&self, name: &str) -> Result<Election> {
        validate_segment("election", name)?;
        Ok(Election {
            inner: self.inner.clone(),
            name: name.to_owned(),
            etcd_name: self.inner.keys.election_name(name),
            prefix: self.inner.keys.election_prefix(name),
        })
    }
}

/// One election of a [`Registry`]; create it with [`Registry::election`].
///
/// An `Election` is cheap to clone and holds no state in etcd by itself:
/// keys exist only while a [`campaign`](Election::campaign) or a
/// [`Leadership`] does.
///
/// Within one registry, candidacies in the same election take turns: the
/// registry has one lease and so one candidate key per election, and a second
/// `campaign` waits until the first candidacy has ended (its `Leadership`
/// resigned or dropped, or its `campaign` future dropped).
#[derive(Clone)]
pub struct Election {
    inner: Arc<Inner>,
    name: String,
    etcd_name: String,
    prefix: String,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.name)
            .field("etcd_name", &self.etcd_name)
            .finish()
    }
}

impl Election {
    /// The election name, as given to [`Registry::election`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name etcd's `concurrency.Election` and `etcdctl elect` use for this
    /// election: `{prefix}/{namespace}/elections/{name}`.
    pub fn etcd_name(&self) -> &str {
        &self.etcd_name
    }

    /// Campaigns with `proposal` and waits until this candidate leads.
    ///
    /// The candidate key is written under the registry's current lease (waiting
    /// up to the request timeout for one while the registry recovers). Then it
    /// waits, with no polling, until every candidate with a lower create
    /// revision is gone.
    ///
    /// # Errors
    ///
    /// - [`Error::SessionLost`] when the lease it campaigns with is lost while
    ///   waiting, or no keep-alive was acknowledged before the lease deadline:
    ///   it never keeps waiting on a dead lease. Campaign again; the registry
    ///   grants a new lease on its own.
    /// - [`Error::Closed`] when the registry is closed or dropped.
    /// - [`Error::NotLeader`] when someone else deleted or replaced the
    ///   candidate key while it waited.
    /// - etcd errors that retrying cannot fix. Timeouts and unreachable etcd
    ///   are retried with backoff until the lease deadline decides.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future withdraws the candidacy: the key is deleted in the
    /// background (a key whose write was still in flight is deleted once the
    /// write answers), so no zombie candidate is left. After the registry is
    /// closed or dropped nothing is deleted; the key goes with the lease.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// use std::time::Duration;
    /// let election = registry.election("compactor")?;
    /// // Give up (and withdraw) after a minute:
    /// match tokio::time::timeout(Duration::from_secs(60), election.campaign("node-a")).await {
    ///     Ok(leadership) => println!("leading with token {}", leadership?.fencing_token()),
    ///     Err(_) => println!("someone else is leading"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn campaign(&self, proposal: impl Into<Vec<u8>>) -> Result<Leadership> {
        let proposal = proposal.into();
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
        let leases = inner.session.leases();
        tokio::select! {
            biased;
            _ = inner.cancel.cancelled() => Err(Error::Closed),
            reason = lease_lost(leases, lease.id) => {
                tracing::warn!(election = %self.name, lease = %format_args!("{:x}", lease.id), %reason, "lease lost while campaigning");
                Err(Error::SessionLost)
            }
            r = self.campaign_on(lease.id, proposal) => r,
        }
    }

    async fn campaign_on(&self, lease_id: i64, proposal: Vec<u8>) -> Result<Leadership> {
        let inner = &self.inner;
        let key = inner.keys.election_key(&self.name, lease_id);
        let slot = Arc::new(KeySlot::acquire(&inner.election_slots, key.clone()).await);
        let mut guard = CandidacyGuard {
            inner: inner.clone(),
            key: key.clone(),
            lease_id,
            token: None,
            pending: None,
            slot: Some(slot.clone()),
        };

        // The write runs in its own task so that a dropped campaign cannot
        // leave a key whose write was still in flight: the task sees that
        // nobody took the answer and deletes what it created. An answer sent
        // but not yet read is taken by the guard's drop.
        let (tx, rx) = oneshot::channel();
        let rx = guard.pending.insert(rx);
        {
            let (inner, key, slot) = (inner.clone(), key.clone(), slot);
            let mut tx = tx;
            tokio::spawn(async move {
                let write = persist(&inner, "write the candidate key", || {
                    create_key(&inner, &key, lease_id, proposal.clone())
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
                    // The campaign went away while the write was being retried,
                    // and an attempt may have landed. The slot keeps this
                    // registry's other campaigns off the key, so delete it.
                    None => release_key(&inner, &key, None, lease_id).await,
                }
                drop(slot);
            });
        }
        let received = rx.await;
        guard.pending = None;
        let token = received.map_err(|_| Error::Closed)??;
        guard.token = Some(token);
        tracing::debug!(election = %self.name, key = %key, revision = token, "candidate key written; waiting for predecessors");

        wait_deletes(inner, &self.prefix, token).await?;

        // Our key must still be ours: someone may have deleted it while we waited.
        let resp = persist(inner, "check the candidate key", || {
            inner.conn.retry("get", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
        })
        .await?;
        let checked_rev = resp.header().map_or(0, |h| h.revision());
        match resp.kvs().first() {
            None => {
                guard.token = None; // nothing left to delete
                return Err(Error::NotLeader(LostReason::KeyDeleted));
            }
            Some(kv) if kv.create_revision() != token => {
                guard.token = None; // not ours any more
                return Err(Error::NotLeader(LostReason::KeyReplaced));
            }
            Some(_) => {}
        }
        match inner.session.lease() {
            Some(l) if l.id == lease_id && l.expires > Instant::now() => {}
            _ => return Err(Error::SessionLost),
        }
        let slot = guard.disarm();
        tracing::info!(election = %self.name, key = %key, fencing_token = token, "elected leader");
        Ok(Leadership::start(
            inner.clone(),
            self.name.clone(),
            key,
            lease_id,
            token,
            checked_rev,
            slot,
        ))
    }

    /// The current leader, or `None` when nobody leads. One read from etcd.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// match registry.election("compactor")?.leader().await? {
    ///     Some(l) => println!("{} leads (token {})", l.proposal_str(), l.fencing_token),
    ///     None => println!("no leader"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn leader(&self) -> Result<Option<LeaderInfo>> {
        let prefix = self.prefix.clone();
        let resp = self
            .inner
            .conn
            .retry_on("get", &prefix, |mut c| {
                let prefix = prefix.clone();
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1);
                async move { c.get(prefix, Some(options)).await }
            })
            .await?;
        Ok(resp.kvs().first().map(LeaderInfo::from_kv))
    }

    /// A stream of the election's leader: the current state first, then every
    /// change, including `None` when nobody leads.
    ///
    /// It yields an item whenever the leader, its fencing token or its
    /// proposal ([`Leadership::proclaim`]) changes, and never the same value
    /// twice in a row. It applies every change etcd reports, in order, so no
    /// leader is skipped, even a short-lived one.
    ///
    /// One owned background task feeds it. A broken watch (etcd restarted,
    /// connection lost) is resumed from the last revision seen, so nothing
    /// that happened meanwhile is missed; when that revision was compacted
    /// away it re-reads the candidates and goes on from there. The task stops
    /// when the stream is dropped; the stream ends when the registry closes.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// use futures::StreamExt;
    /// let mut leaders = registry.election("compactor")?.observe();
    /// while let Some(leader) = leaders.next().await {
    ///     match leader {
    ///         Some(l) => println!("leader: {}", l.proposal_str()),
    ///         None => println!("no leader"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn observe(&self) -> LeaderStream {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(observe_task(self.inner.clone(), self.prefix.clone(), tx));
        LeaderStream { rx, task }
    }

    /// Runs `task` whenever this candidate leads: the cron-job use case in one call.
    ///
    /// It campaigns with `proposal`, calls `task` with the [`Leadership`], and:
    ///
    /// - when the task finishes, resigns and returns its output;
    /// - when leadership is lost, **drops the task's future** (it stops at its
    ///   next `.await`), logs the reason, and campaigns again. The drop happens
    ///   when [`Leadership::lost`] resolves, so no later than the lease
    ///   deadline. Code between two `.await`s is not interrupted: guard writes
    ///   to external resources with [`Leadership::fencing_token`];
    /// - when the task itself resigns, waits for the task to finish and
    ///   returns its output;
    /// - when the registry is closed or dropped, drops the task and returns
    ///   [`Error::Closed`].
    ///
    /// Campaign failures (lease lost, etcd unreachable) are logged and retried
    /// with capped exponential backoff.
    ///
    /// Cancel safety: dropping the returned future drops the task and
    /// withdraws the candidacy or resigns, as dropping a `campaign` future or
    /// a `Leadership` does.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// let election = registry.election("nightly-report")?;
    /// let rows = election
    ///     .lead("instance-01", |leadership| async move {
    ///         println!("leading with fencing token {}", leadership.fencing_token());
    ///         // ... the job; it is dropped if leadership is lost ...
    ///         42
    ///     })
    ///     .await?;
    /// assert_eq!(rows, 42);
    /// # Ok(()) }
    /// ```
    pub async fn lead<F, Fut, T>(&self, proposal: impl Into<Vec<u8>>, mut task: F) -> Result<T>
    where
        F: FnMut(Leadership) -> Fut,
        Fut: Future<Output = T>,
    {
        let proposal = proposal.into();
        let cancel = self.inner.cancel.clone();
        let mut backoff = Backoff::standard();
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Closed);
            }
            let leadership = match self.campaign(proposal.clone()).await {
                Ok(l) => l,
                Err(Error::Closed) => return Err(Error::Closed),
                Err(error) => {
                    tracing::warn!(election = %self.name, %error, "campaign failed; campaigning again");
                    if !backoff.wait(&cancel).await {
                        return Err(Error::Closed);
                    }
                    continue;
                }
            };
            backoff.reset();
            let run = task(leadership.clone());
            let mut run = std::pin::pin!(run);
            tokio::select! {
                out = &mut run => {
                    if let Err(error) = leadership.resign().await {
                        tracing::warn!(election = %self.name, %error, "could not resign after the task finished; the key is deleted in the background");
                    }
                    return Ok(out);
                }
                reason = leadership.lost() => match reason {
                    LostReason::Resigned => return Ok(run.await),
                    LostReason::Closed => return Err(Error::Closed),
                    reason => {
                        tracing::warn!(election = %self.name, %reason, "leadership lost; task cancelled; campaigning again");
                    }
                },
            }
        }
    }
}

/// The leadership won by [`Election::campaign`].
///
/// # Safety bound and its assumption
///
/// A `Leadership` ends locally, with no help from etcd, no later than the
/// moment etcd could let the registry's lease expire: the send time of the
/// last acknowledged keep-alive plus the TTL, minus a safety margin (250 ms +
/// 2% of the TTL). etcd counts the TTL from when it received that keep-alive,
/// which is after it was sent, so a leader cut off from etcd stops believing
/// it leads before etcd can delete its key and elect someone else. This needs
/// no synchronised wall clocks; it assumes only that the clocks here and on
/// the etcd server run at the same rate (drift well below the margin over one
/// TTL) and that this process is not paused between checking
/// [`is_leader`](Leadership::is_leader) and acting.
///
/// # Fencing
///
/// That bound cannot stop a write already on its way to another system. For
/// that, pass [`fencing_token`](Leadership::fencing_token) along with every
/// write to an external resource, and have the resource remember the largest
/// token it has seen and reject writes that carry a smaller one. Tokens are
/// create revisions of etcd's single revision counter, so every new
/// leadership's token is larger than every earlier one's.
///
/// # Drop
///
/// Clones share one leadership. When the last clone is dropped without
/// [`resign`](Leadership::resign), the key is deleted in the background
/// (unless the registry was closed or dropped: then the key goes with the
/// lease, as after a crash).
#[derive(Clone)]
pub struct Leadership {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<Inner>,
    election: String,
    key: String,
    lease_id: i64,
    token: i64,
    lost: Arc<watch::Sender<Option<LostReason>>>,
    /// The key is deleted or is no longer ours: nothing to clean up on drop.
    released: Arc<AtomicBool>,
    slot: std::sync::Mutex<Option<Arc<KeySlot>>>,
    monitor: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("election", &self.shared.election)
            .field("key", &self.shared.key)
            .field("fencing_token", &self.shared.token)
            .field("lost", &*self.shared.lost.borrow())
            .finish()
    }
}

impl Leadership {
    fn start(
        inner: Arc<Inner>,
        election: String,
        key: String,
        lease_id: i64,
        token: i64,
        checked_rev: i64,
        slot: Arc<KeySlot>,
    ) -> Self {
        let lost = Arc::new(watch::Sender::new(None));
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
        Leadership {
            shared: Arc::new(Shared {
                inner,
                election,
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

    /// The fencing token: the create revision of the leader key.
    ///
    /// It rises strictly across successive leaders of the election. Send it
    /// with every write to an external resource and have the resource reject
    /// tokens smaller than the largest it has seen (see the type docs).
    pub fn fencing_token(&self) -> i64 {
        self.shared.token
    }

    /// The etcd key of this leadership.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The lease the leader key lives under.
    pub fn lease_id(&self) -> i64 {
        self.shared.lease_id
    }

    /// Whether this candidate still leads. No round trip: it reads local state
    /// only, including the lease deadline itself, so it turns `false` at the
    /// deadline even if the background task has not run yet.
    pub fn is_leader(&self) -> bool {
        let s = &self.shared;
        if s.lost.borrow().is_some() || s.inner.cancel.is_cancelled() {
            return false;
        }
        matches!(s.inner.session.lease(), Some(l) if l.id == s.lease_id && l.expires > Instant::now())
    }

    /// Why leadership ended, or `None` while it lasts.
    pub fn lost_reason(&self) -> Option<LostReason> {
        *self.shared.lost.borrow()
    }

    /// Resolves when leadership ends, with the reason: resigned, key deleted
    /// or replaced by someone else, lease deadline passed, lease lost, or
    /// registry closed. It resolves at once if leadership has already ended.
    ///
    /// **Safety bound:** it resolves locally, with no help from etcd, no later
    /// than the moment etcd could let the lease expire (see the type docs for
    /// the assumption about clocks). A leader cut off from etcd therefore
    /// stops before a new leader can be elected.
    ///
    /// Cancel safe: it only waits on local state, and can be called again.
    ///
    /// ```no_run
    /// # async fn demo(leadership: etcd_registry::Leadership) {
    /// # async fn do_the_job(token: i64) {}
    /// tokio::select! {
    ///     reason = leadership.lost() => eprintln!("stopped leading: {reason}"),
    ///     _ = do_the_job(leadership.fencing_token()) => {}
    /// }
    /// # }
    /// ```
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.shared.lost.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.unwrap_or(LostReason::Closed),
            Err(_) => LostReason::Closed,
        }
    }

    /// Replaces the proposal (the value of the leader key) while still leading.
    ///
    /// The write is conditional on the key still having this leadership's
    /// create revision, so it never writes to a successor's key.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] with the reason when leadership was lost before or
    /// during the call; etcd errors and timeouts otherwise.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        let s = &self.shared;
        if !self.is_leader() {
            return Err(Error::NotLeader(self.lost_reason().unwrap_or(
                if s.inner.cancel.is_cancelled() {
                    LostReason::Closed
                } else {
                    LostReason::LeaseDeadline
                },
            )));
        }
        let value = value.into();
        let (key, token, lease_id) = (s.key.clone(), s.token, s.lease_id);
        let resp = s
            .inner
            .conn
            .retry("proclaim", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        token,
                    )])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    )])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                async move { c.txn(txn).await }
            })
            .await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) if e.is_lease_not_found() => {
                s.inner.session.suspect_lost();
                self.set_lost(LostReason::SessionLost);
                return Err(Error::NotLeader(
                    self.lost_reason().unwrap_or(LostReason::SessionLost),
                ));
            }
            Err(e) => return Err(e),
        };
        if !resp.succeeded() {
            let reason = if first_get_kv(&resp).is_some() {
                LostReason::KeyReplaced
            } else {
                LostReason::KeyDeleted
            };
            self.set_lost(reason);
            s.released.store(true, Ordering::SeqCst);
            return Err(Error::NotLeader(self.lost_reason().unwrap_or(reason)));
        }
        tracing::debug!(election = %s.election, key = %s.key, "proclaimed");
        Ok(())
    }

    /// Steps down: leadership ends at once ([`lost`](Leadership::lost)
    /// resolves with [`LostReason::Resigned`] before anything is sent), then
    /// the key is deleted so that the next candidate wins at once.
    ///
    /// The delete is conditional on the key still having this leadership's
    /// create revision. Calling it again, or after leadership was lost, is
    /// fine. If the delete fails it is returned, and the key is deleted in the
    /// background when the last clone of this `Leadership` is dropped.
    pub async fn resign(&self) -> Result<()> {
        let s = &self.shared;
        self.set_lost(LostReason::Resigned);
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
        tracing::info!(election = %s.election, key = %s.key, fencing_token = s.token, "resigned");
        Ok(())
    }

    fn set_lost(&self, reason: LostReason) {
        set_lost(&self.shared.lost, reason);
    }
}

impl Drop for Shared {
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
            tracing::debug!(key = %key, "leadership dropped without resign; deleting its key");
            rt.spawn(async move {
                release_key(&inner, &key, Some(token), lease_id).await;
                drop(slot);
            });
        }
    }
}

/// A stream of an election's leaders, from [`Election::observe`].
///
/// It yields `Some(leader)` or `None` (nobody leads); see
/// [`Election::observe`]. Dropping it stops its background task.
#[derive(Debug)]
pub struct LeaderStream {
    rx: mpsc::Receiver<Option<LeaderInfo>>,
    task: JoinHandle<()>,
}

impl futures::Stream for LeaderStream {
    type Item = Option<LeaderInfo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for LeaderStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Candidacy bookkeeping

/// One candidacy per candidate key at a time within a registry: two campaigns
/// of one registry in one election would share a key, and both would lead.
/// Held by the registry (`Inner::election_slots`).
pub(crate) type Slots = Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Exclusive use of one candidate key, held by the campaign, the leadership
/// and any background cleanup of the key; released when the last holder drops.
struct KeySlot {
    slots: Slots,
    id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeySlot {
    async fn acquire(slots: &Slots, id: String) -> Self {
        let mutex = match slots.lock() {
            Ok(mut slots) => slots.entry(id.clone()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        };
        let guard = mutex.lock_owned().await;
        KeySlot {
            slots: slots.clone(),
            id,
            guard: Some(guard),
        }
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

/// Deletes the candidate key when a campaign ends without leading.
struct CandidacyGuard {
    inner: Arc<Inner>,
    key: String,
    lease_id: i64,
    /// `Some` once the key was written and is ours to delete.
    token: Option<i64>,
    /// The answer of the key's write while it is awaited.
    pending: Option<oneshot::Receiver<Result<i64>>>,
    slot: Option<Arc<KeySlot>>,
}

impl CandidacyGuard {
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

impl Drop for CandidacyGuard {
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
            tracing::debug!(key = %key, "campaign ended without leading; withdrawing the candidate key");
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

fn first_get_kv(resp: &etcd_client::TxnResponse) -> Option<KeyValue> {
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
/// with backoff. Campaign steps run raced against the loss of the lease, so a
/// campaign ends with `SessionLost` (or succeeds), not with a slow request.
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

/// Writes the candidate key if absent (as Go's `Campaign` does) and returns its
/// create revision. A key left by an earlier candidacy of this same lease is
/// reused, with its value updated to `proposal`.
async fn create_key(inner: &Inner, key: &str, lease_id: i64, proposal: Vec<u8>) -> Result<i64> {
    let resp = inner
        .conn
        .retry_on("campaign", key, |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    proposal.clone(),
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
        return Err(Error::NotLeader(LostReason::KeyDeleted));
    };
    if kv.lease() != lease_id {
        return Err(Error::NotLeader(LostReason::KeyReplaced));
    }
    let token = kv.create_revision();
    if kv.value() != proposal.as_slice() {
        let resp = inner
            .conn
            .retry_on("campaign", key, |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, token)])
                    .and_then([TxnOp::put(
                        key,
                        proposal.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    )]);
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|e| lease_error(inner, e))?;
        if !resp.succeeded() {
            return Err(Error::NotLeader(LostReason::KeyDeleted));
        }
    }
    tracing::debug!(
        key,
        revision = token,
        "reusing this lease's existing candidate key"
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
                tracing::debug!(key, "candidate key deleted");
                return;
            }
            Err(error) => {
                if inner.session.lease().is_none_or(|l| l.id != lease_id) {
                    return;
                }
                tracing::warn!(key, %error, "could not delete an election key; retrying");
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

/// Go's `waitDeletes`: waits until no key under `prefix` has a create revision
/// below `my_rev`, by watching the newest such key until it is deleted.
async fn wait_deletes(inner: &Inner, prefix: &str, my_rev: i64) -> Result<()> {
    let mut backoff = Backoff::standard();
    loop {
        let resp = inner
            .conn
            .retry("get", |mut c| {
                let options = GetOptions::new()
                    .with_prefix()
                    .with_max_create_revision(my_rev - 1)
                    .with_sort(SortTarget::Create, SortOrder::Descend)
                    .with_limit(1);
                let prefix = prefix.to_owned();
                async move { c.get(prefix, Some(options)).await }
            })
            .await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(error) => {
                tracing::warn!(prefix, %error, "reading election predecessors failed; retrying");
                if !backoff.wait(&inner.cancel).await {
                    return Err(Error::Closed);
                }
                continue;
            }
        };
        let Some(kv) = resp.kvs().first() else {
            return Ok(());
        };
        let rev = resp.header().map_or(0, |h| h.revision());
        let key = kv.key().to_vec();
        tracing::debug!(predecessor = %String::from_utf8_lossy(&key), "waiting for the previous candidate to go");
        match wait_delete(inner, key, rev).await {
            Ok(()) => backoff.reset(),
            Err(error) => {
                tracing::warn!(prefix, %error, "watching an election predecessor failed; retrying");
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

/// The per-leadership task: resolves `lost` at the lease deadline, when the
/// lease changes, when our key goes, or when the registry closes. After a
/// deadline it keeps trying to delete the key, which would otherwise hold the
/// election if the lease survived the outage.
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
        _ = lost_rx.wait_for(Option::is_some) => return, // resigned or proclaim saw the loss
        reason = lease_lost(inner.session.leases(), lease_id) => reason,
        reason = watch_own_key(&inner, &key, token, checked_rev) => reason,
    };
    if set_lost(&lost, reason) {
        tracing::warn!(key = %key, fencing_token = token, %reason, "leadership lost");
    }
    match reason {
        LostReason::KeyDeleted | LostReason::KeyReplaced | LostReason::SessionLost => {
            released.store(true, Ordering::SeqCst);
        }
        LostReason::LeaseDeadline => {
            release_key(&inner, &key, Some(token), lease_id).await;
            released.store(true, Ordering::SeqCst);
        }
        LostReason::Resigned | LostReason::Closed => {}
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
            Err(error) => tracing::debug!(key, %error, "leader key watch interrupted; re-checking"),
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
                Err(error) => tracing::debug!(key, %error, "leader key check failed; retrying"),
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

// ---------------------------------------------------------------------------
// Observe

/// A candidate as the observer tracks it.
#[derive(Clone)]
struct Candidate {
    create_revision: i64,
    lease_id: i64,
    value: Vec<u8>,
}

struct Observer {
    /// Candidates by key; `None` until the first read (or after compaction).
    candidates: Option<BTreeMap<Vec<u8>, Candidate>>,
    /// The last revision applied.
    revision: i64,
    /// The last value sent; `None` before the first.
    last: Option<Option<LeaderInfo>>,
}

impl Observer {
    fn leader(&self) -> Option<LeaderInfo> {
        let candidates = self.candidates.as_ref()?;
        candidates
            .values()
            .min_by_key(|c| c.create_revision)
            .map(|c| LeaderInfo {
                proposal: c.value.clone(),
                fencing_token: c.create_revision,
                lease_id: c.lease_id,
            })
    }

    /// Sends the leader if it changed; false when the stream was dropped.
    async fn emit(&mut self, tx: &mpsc::Sender<Option<LeaderInfo>>) -> bool {
        let leader = self.leader();
        if self.last.as_ref() == Some(&leader) {
            return true;
        }
        self.last = Some(leader.clone());
        tx.send(leader).await.is_ok()
    }
}

async fn observe_task(inner: Arc<Inner>, prefix: String, tx: mpsc::Sender<Option<LeaderInfo>>) {
    let cancel = inner.cancel.clone();
    let closed = tx.clone();
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = closed.closed() => {}
        _ = observe_loop(&inner, &prefix, &tx) => {}
    }
}

async fn observe_loop(inner: &Inner, prefix: &str, tx: &mpsc::Sender<Option<LeaderInfo>>) {
    let mut state = Observer {
        candidates: None,
        revision: 0,
        last: None,
    };
    let mut backoff = Backoff::standard();
    loop {
        match observe_pass(inner, prefix, tx, &mut state, &mut backoff).await {
            Ok(false) => return,
            Ok(true) => {}
            Err(error) => tracing::warn!(prefix, %error, "election observer interrupted; resuming"),
        }
        if !backoff.wait(&inner.cancel).await {
            return;
        }
    }
}

/// One watch: (re)reads the candidates if needed, then applies events until
/// the watch breaks. `Ok(false)` when the consumer went away.
async fn observe_pass(
    inner: &Inner,
    prefix: &str,
    tx: &mpsc::Sender<Option<LeaderInfo>>,
    state: &mut Observer,
    backoff: &mut Backoff,
) -> Result<bool> {
    if state.candidates.is_none() {
        // Paged: the number of candidates is not bounded.
        let read = inner
            .conn
            .read_prefixes(
                "get",
                &[prefix.to_owned()],
                false,
                BTreeMap::new,
                |all, kvs| {
                    all.extend(kvs.into_iter().map(|kv| {
                        let c = Candidate {
                            create_revision: kv.create_revision(),
                            lease_id: kv.lease(),
                            value: kv.value().to_vec(),
                        };
                        (kv.key().to_vec(), c)
                    }));
                },
            )
            .await?;
        state.revision = read.revision;
        state.candidates = Some(read.value);
        if !state.emit(tx).await {
            return Ok(false);
        }
    }
    let mut watch = inner.conn.watch(prefix, true, state.revision + 1).await?;
    loop {
        let resp = match watch.next().await {
            Ok(resp) => resp,
            Err(end) => {
                if let WatchEnd::Compacted { compact_revision } = end {
                    tracing::info!(
                        prefix,
                        compact_revision,
                        "election history compacted; re-reading the candidates"
                    );
                    state.candidates = None;
                }
                return Err(end.into());
            }
        };
        if resp.created() {
            backoff.reset();
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            if let Some(candidates) = state.candidates.as_mut() {
                if event.event_type() == EventType::Delete {
                    candidates.remove(kv.key());
                } else {
                    let c = Candidate {
                        create_revision: kv.create_revision(),
                        lease_id: kv.lease(),
                        value: kv.value().to_vec(),
                    };
                    candidates.insert(kv.key().to_vec(), c);
                }
            }
            state.revision = state.revision.max(kv.mod_revision());
            if !state.emit(tx).await {
                return Ok(false);
            }
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
}
