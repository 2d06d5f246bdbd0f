//! Leader election: [`Election`], [`Leadership`], [`LeaderInfo`],
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
//! That queue is shared with locks (see `queue.rs`); this module adds what
//! only elections have: proposals, [`Leadership::proclaim`], the current
//! [`leader`](Election::leader) and [`observe`](Election::observe).
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

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use std::task::{Context, Poll};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Retry;
use crate::conn::first_get_kv;
use crate::core::Core;
use crate::error::LostReason;
use crate::error::{Error, Result};
use crate::keys::validate_segment;
use crate::queue::{Head, Kind, Queue, Slots};
use crate::stream::Item;

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

/// One election of a [`Registry`](crate::Registry); create it with [`Registry::election`](crate::Registry::election).
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
    queue: Queue,
    etcd_name: String,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.queue.name)
            .field("etcd_name", &self.etcd_name)
            .finish()
    }
}

impl Election {
    /// The election `name` of the registry whose core this is; `slots` are the
    /// registry's (one member per queue key).
    pub(crate) fn new(core: &Core, slots: &Slots, name: &str) -> Result<Self> {
        validate_segment("election", name)?;
        Ok(Election {
            queue: Queue {
                inner: core.clone(),
                slots: slots.clone(),
                kind: Kind::Election,
                name: name.to_owned(),
                prefix: core.keys.election_prefix(name),
            },
            etcd_name: core.keys.election_name(name),
        })
    }
    /// The election name, as given to [`Registry::election`](crate::Registry::election).
    pub fn name(&self) -> &str {
        &self.queue.name
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
        let _timer = crate::metrics::timer(&self.queue.inner.config.namespace, "campaign");
        let head = self.queue.join(proposal.into()).await?;
        Ok(Leadership { head })
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
        let _timer = crate::metrics::timer(&self.queue.inner.config.namespace, "leader");
        let prefix = self.queue.prefix.clone();
        let resp = self
            .queue
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
        let task = tokio::spawn(observe_task(
            self.queue.inner.clone(),
            self.queue.prefix.clone(),
            tx,
        ));
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
        let cancel = self.queue.inner.cancel.clone();
        let mut retry = Retry::standard(format!("the campaign in election {}", self.queue.name));
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Closed);
            }
            let leadership = match self.campaign(proposal.clone()).await {
                Ok(l) => l,
                Err(Error::Closed) => return Err(Error::Closed),
                // Retrying cannot cure a refusal: a configuration error, not a campaign.
                Err(error) if error.is_final() => return Err(error),
                Err(error) => {
                    if !retry.failed(&cancel, &error).await {
                        return Err(Error::Closed);
                    }
                    continue;
                }
            };
            retry.succeeded();
            let run = task(leadership.clone());
            let mut run = std::pin::pin!(run);
            tokio::select! {
                out = &mut run => {
                    if let Err(error) = leadership.resign().await {
                        tracing::warn!(election = %self.queue.name, %error, "could not resign after the task finished; the key is deleted in the background");
                    }
                    return Ok(out);
                }
                reason = leadership.lost() => match reason {
                    LostReason::Resigned => return Ok(run.await),
                    LostReason::Closed => return Err(Error::Closed),
                    reason => {
                        tracing::warn!(election = %self.queue.name, %reason, "leadership lost; task cancelled; campaigning again");
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
    head: Head,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Leadership");
        self.head.debug_fields(&mut d);
        d.finish()
    }
}

impl Leadership {
    /// The fencing token: the create revision of the leader key.
    ///
    /// It rises strictly across successive leaders of the election. Send it
    /// with every write to an external resource and have the resource reject
    /// tokens smaller than the largest it has seen (see the type docs).
    pub fn fencing_token(&self) -> i64 {
        self.head.token()
    }

    /// The etcd key of this leadership.
    pub fn key(&self) -> &str {
        self.head.key()
    }

    /// The lease the leader key lives under.
    pub fn lease_id(&self) -> i64 {
        self.head.lease_id()
    }

    /// Whether this candidate still leads. No round trip: it reads local state
    /// only, including the lease deadline itself, so it turns `false` at the
    /// deadline even if the background task has not run yet.
    pub fn is_leader(&self) -> bool {
        self.head.is_held()
    }

    /// Why leadership ended, or `None` while it lasts.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.head.lost_reason()
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
        self.head.lost().await
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
        let head = &self.head;
        if !head.is_held() {
            return Err(Error::NotLeader(head.not_held_reason()));
        }
        let value = value.into();
        let (key, token, lease_id) = (head.key(), head.token(), head.lease_id());
        let resp = head
            .core()
            .conn
            .retry("proclaim", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, token)])
                    .and_then([TxnOp::put(
                        key,
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    )])
                    .or_else([TxnOp::get(key, None)]);
                async move { c.txn(txn).await }
            })
            .await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) if e.is_lease_not_found() => {
                head.core().session.suspect_lost();
                head.set_lost(LostReason::SessionLost);
                return Err(Error::NotLeader(head.not_held_reason()));
            }
            Err(e) => return Err(e),
        };
        if !resp.succeeded() {
            let reason = if first_get_kv(&resp).is_some() {
                LostReason::KeyReplaced
            } else {
                LostReason::KeyDeleted
            };
            head.set_lost(reason);
            head.mark_released();
            return Err(Error::NotLeader(head.not_held_reason()));
        }
        tracing::debug!(election = %head.name(), key, "proclaimed");
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
        let _timer = crate::metrics::timer(&self.head.core().config.namespace, "resign");
        self.head.leave().await
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
// Observe

/// A candidate as the observer tracks it.
#[derive(Clone)]
struct Candidate {
    create_revision: i64,
    lease_id: i64,
    value: Vec<u8>,
}

impl Candidate {
    fn from_kv(kv: &KeyValue) -> Self {
        Candidate {
            create_revision: kv.create_revision(),
            lease_id: kv.lease(),
            value: kv.value().to_vec(),
        }
    }
}

/// Reads the candidates: every key under `prefix`, with the revision of the read.
async fn read_candidates(
    inner: &Core,
    prefix: &str,
) -> Result<(i64, BTreeMap<Vec<u8>, Candidate>)> {
    // Paged: the number of candidates is not bounded.
    let read = inner
        .conn
        .read_prefixes(
            "get",
            &[prefix.to_owned()],
            false,
            BTreeMap::new,
            |all, kvs| {
                all.extend(
                    kvs.into_iter()
                        .map(|kv| (kv.key().to_vec(), Candidate::from_kv(&kv))),
                );
            },
        )
        .await?;
    Ok((read.revision, read.value))
}

struct Observer {
    /// Candidates by key; `None` until the first read (or after compaction).
    candidates: Option<BTreeMap<Vec<u8>, Candidate>>,
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

async fn observe_task(inner: Core, prefix: String, tx: mpsc::Sender<Option<LeaderInfo>>) {
    let closed = tx.clone();
    tokio::select! {
        _ = closed.closed() => {}
        _ = observe_loop(&inner, &prefix, &tx) => {}
    }
}

/// Reads the candidates, then follows them through the resumable watch
/// (progress, stale checks, resume from the last revision seen); reads
/// again when that history is gone. Ends when the consumer goes away or
/// the registry closes.
async fn observe_loop(inner: &Core, prefix: &str, tx: &mpsc::Sender<Option<LeaderInfo>>) {
    let mut state = Observer {
        candidates: None,
        last: None,
    };
    let mut stream = inner.stream(vec![prefix.to_owned()], true, prefix);
    loop {
        if state.candidates.is_none() {
            let read =
                crate::backoff::retry_transient(&inner.cancel, "reading the candidates", || {
                    read_candidates(inner, prefix)
                })
                .await;
            match read {
                Ok((revision, candidates)) => {
                    stream.start_at(revision + 1);
                    state.candidates = Some(candidates);
                }
                Err(Error::Closed) => return,
                Err(error) => {
                    tracing::error!(prefix, %error, "cannot read the election's candidates; the observer ends");
                    return;
                }
            }
            if !state.emit(tx).await {
                return;
            }
        }
        match stream.next().await {
            Err(Error::Closed) => return,
            Err(error) => {
                tracing::error!(prefix, %error, "cannot watch the election; the observer ends");
                return;
            }
            // Broken: resume from the last revision seen, so that every
            // leader that came and went meanwhile is still reported, unless
            // etcd's revision went back (wiped, restored from a snapshot).
            Ok(Item::Interrupted) => {
                if let Ok((revision, candidates)) = read_candidates(inner, prefix).await
                    && revision < stream.revision()
                {
                    tracing::info!(
                        prefix,
                        revision,
                        "etcd's revision went back; re-reading the candidates"
                    );
                    stream.start_at(revision + 1);
                    state.candidates = Some(candidates);
                    if !state.emit(tx).await {
                        return;
                    }
                }
            }
            Ok(Item::Reset(why)) => {
                tracing::info!(
                    prefix,
                    ?why,
                    "election history gone (compacted or etcd wiped); re-reading the candidates"
                );
                state.candidates = None;
            }
            Ok(Item::Events(events)) => {
                // One leader a revision: a catch-up after a broken stream
                // delivers several in one response, and each is reported.
                for event in events {
                    let Some(kv) = event.kv() else { continue };
                    if let Some(candidates) = state.candidates.as_mut() {
                        if event.event_type() == EventType::Delete {
                            candidates.remove(kv.key());
                        } else {
                            candidates.insert(kv.key().to_vec(), Candidate::from_kv(kv));
                        }
                    }
                    if !state.emit(tx).await {
                        return;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The lease deadline, for stopping work gracefully before it

impl Leadership {
    /// The local deadline of the lease this leadership lives under: the
    /// instant at which [`lost`](Leadership::lost) resolves with
    /// [`LostReason::LeaseDeadline`] unless a keep-alive is acknowledged
    /// before it (see the type docs). Each acknowledged keep-alive moves it
    /// later; while keep-alives fail it stays put and comes closer.
    ///
    /// `None` once that lease can no longer be relied on: its deadline
    /// passed, or the registry moved to another lease or closed. It
    /// describes the lease only; whether the key is still ours is
    /// [`is_leader`](Leadership::is_leader). No round trip.
    ///
    /// ```no_run
    /// # fn demo(leadership: etcd_registry::Leadership) {
    /// if let Some(deadline) = leadership.lease_deadline() {
    ///     let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    ///     println!("leadership ends within {left:?} unless a keep-alive is acknowledged");
    /// }
    /// # }
    /// ```
    pub fn lease_deadline(&self) -> Option<tokio::time::Instant> {
        self.head.lease_deadline()
    }

    /// Resolves once the [`lease_deadline`](Leadership::lease_deadline) is
    /// less than `within` away, or the lease can no longer be relied on;
    /// at once if that is already so.
    ///
    /// With healthy keep-alives the deadline stays between TTL − TTL/3 and
    /// TTL away (minus the safety margin), so a `within` below that resolves
    /// only once keep-alives have failed for a while: the moment to start a
    /// graceful stop that must end by the deadline. `within` of zero resolves
    /// at the deadline itself. It does not watch the key: combine it with
    /// [`lost`](Leadership::lost) for that.
    ///
    /// Cancel safe: it only waits on local state, and can be called again.
    ///
    /// ```no_run
    /// # async fn demo(leadership: etcd_registry::Leadership) {
    /// # async fn stop_gracefully() {}
    /// use std::time::Duration;
    /// tokio::select! {
    ///     _ = leadership.lease_expiring_within(Duration::from_secs(2)) => stop_gracefully().await,
    ///     reason = leadership.lost() => eprintln!("stopped leading: {reason}"),
    /// }
    /// # }
    /// ```
    pub async fn lease_expiring_within(&self, within: std::time::Duration) {
        self.head.lease_expiring_within(within).await
    }
}
