//! [`ServiceWatch`]: a snapshot, then every change, with no gap and no end.
//!
//! One owned task per watch runs an explicit state machine:
//!
//! ```text
//!            +-----------+   listed at R    +---------------------+
//! start ---> |  Listing  | ---------------> | Watching(from R+1)  | <--+
//!            +-----------+                  +---------------------+    |
//!              ^   ^   compacted / cluster changed |  broken / stale   |
//!              |   +-----------------------------+ |  / leader lost    |
//!              |                                   v                   |
//!              |  wiped or inconsistent    +---------------+  store    |
//!              +-------------------------- |   Resuming    | ----------+
//!                                          +---------------+ consistent
//! ```
//!
//! * **Listing** reads the prefix in one consistent read at revision `R`
//!   (paged, every page at `R`; see `Conn::read_prefixes`). The
//!   first read is sent as [`ServiceEvent::Snapshot`]; every later one is
//!   diffed against what the consumer has already seen and sent as
//!   `Added`/`Updated`/`Removed`.
//! * **Watching** watches from the last revision seen + 1.
//! * **Resuming** runs after a broken stream. A keys-only read checks that the
//!   store still holds the history the consumer saw (its revision did not go
//!   back and every key last modified at or before that revision is exactly
//!   the one seen; if a key seen is gone, the store as of that revision still
//!   holds exactly what was seen). If so the watch resumes from the last
//!   revision seen + 1 without re-listing; if not (etcd was wiped or
//!   replaced) it re-lists.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{Event, EventType, KeyValue, ResponseHeader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::conn::{Paged, WatchEnd, is_compacted};
use crate::error::{Error, Result};
use crate::instance::ServiceInstance;
use crate::keys::validate_segment;
use crate::registry::{Inner, Registry};
use crate::session::Backoff;

/// What a [`ServiceWatch`] yields.
///
/// A consumer may rely on exactly this:
///
/// * the first item is always [`Snapshot`](ServiceEvent::Snapshot), and it is
///   the only snapshot the stream ever sends;
/// * after it, applying each event in order (`Added`/`Updated` insert or
///   replace by name and id, `Removed` deletes) keeps the consumer's set equal
///   to etcd's as of [`ServiceWatch::revision`], including across
///   disconnections, etcd restarts, compactions and wiped stores;
/// * an instance's `name` and `id` always match its etcd key;
/// * no event is sent for a write that left the instance unchanged (for
///   example a re-registration under a new lease with the same value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceEvent {
    /// Every instance at the revision the watch started from, in key order.
    /// Always the first item, and sent only once.
    Snapshot(Vec<ServiceInstance>),
    /// An instance appeared (or a malformed value under its key became valid).
    Added(ServiceInstance),
    /// An instance's key now holds a different value; this is the new one.
    Updated(ServiceInstance),
    /// An instance is gone (deleted, expired, or its value became malformed).
    /// Carries the last value the consumer saw, so a balancer knows which
    /// address to drop.
    Removed(ServiceInstance),
}

/// A [`ServiceEvent`] as the watch task sends it: the instances are the
/// `Arc`s the task itself holds, so a cache fed by it holds each instance
/// once. [`ServiceWatch`] hands out owned copies.
#[derive(Clone, Debug)]
pub(crate) enum FeedEvent {
    Snapshot(Vec<Arc<ServiceInstance>>),
    Added(Arc<ServiceInstance>),
    Updated(Arc<ServiceInstance>),
    Removed(Arc<ServiceInstance>),
}

impl From<FeedEvent> for ServiceEvent {
    fn from(event: FeedEvent) -> Self {
        match event {
            FeedEvent::Snapshot(all) => {
                ServiceEvent::Snapshot(all.into_iter().map(Arc::unwrap_or_clone).collect())
            }
            FeedEvent::Added(i) => ServiceEvent::Added(Arc::unwrap_or_clone(i)),
            FeedEvent::Updated(i) => ServiceEvent::Updated(Arc::unwrap_or_clone(i)),
            FeedEvent::Removed(i) => ServiceEvent::Removed(Arc::unwrap_or_clone(i)),
        }
    }
}

/// How often a watch asks etcd for a progress report.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// A watch that has heard nothing at all (no event, no progress report) for
/// this long is considered stale and is restarted.
const STALE_AFTER: Duration = Duration::from_secs(10);
/// Batches buffered between the watch task and its consumer.
const CHANNEL_BATCHES: usize = 16;

/// A stream of changes to one service (or to every service of the namespace).
///
/// Create one with [`Registry::watch`] or [`Registry::watch_all`]. It
/// implements [`futures::Stream`] with `Item =` [`ServiceEvent`]; see that
/// type for what a consumer may rely on.
///
/// # Guarantees
///
/// * **No gap.** The watch starts at the snapshot's revision + 1.
/// * **Survives everything.** On a broken stream, an etcd restart, a member
///   loss or a leader change it resumes from the last revision seen + 1.
/// * **Compaction and wiped stores.** When that revision is no longer in
///   etcd's history (compacted) or the store was wiped or replaced, it
///   re-lists and sends the difference against what was already sent.
/// * **Staleness.** Connections use require-leader, so a member that loses
///   its leader ends the stream at once. The watch also asks etcd for a
///   progress report every [`PROGRESS_INTERVAL`](Self::PROGRESS_INTERVAL);
///   if nothing at all arrives for [`STALE_AFTER`](Self::STALE_AFTER), the
///   watch is restarted. A stream that silently stopped is thus restarted at
///   most 10 s after its last message (HTTP/2 keep-alive usually notices a
///   dead connection sooner, in about 4 s).
/// * **Malformed values** are skipped with a `tracing` warning; they never
///   end the stream. A value that becomes malformed is reported as
///   [`ServiceEvent::Removed`].
/// * **Errors.** Recoverable errors (broken streams, failed reads,
///   compactions, stale streams) are logged through `tracing` with the
///   service and revision, retried with capped exponential backoff (100 ms
///   to 5 s, with jitter), and counted: see [`errors`](Self::errors).
/// * **Permission denied.** When etcd's RBAC refuses this user the read or
///   the watch of the prefix, the stream ends (yields `None`) and
///   [`error`](ServiceWatch::error) returns [`Error::PermissionDenied`]:
///   retrying would not help until an administrator grants access.
/// * **Ending.** Otherwise the stream ends (yields `None`) only when the registry is
///   closed or dropped. Dropping the `ServiceWatch` stops its task and
///   cancels its etcd watch.
///
/// ```no_run
/// use futures::StreamExt;
/// use etcd_registry::ServiceEvent;
///
/// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
/// let mut watch = registry.watch("web")?;
/// while let Some(event) = watch.next().await {
///     match event {
///         ServiceEvent::Snapshot(all) => println!("{} instances", all.len()),
///         ServiceEvent::Added(i) | ServiceEvent::Updated(i) => println!("up: {}", i.endpoint()),
///         ServiceEvent::Removed(i) => println!("gone: {}", i.endpoint()),
///     }
///     println!("caught up to revision {}", watch.revision());
/// }
/// # Ok(()) }
/// ```
pub struct ServiceWatch {
    feed: Feed,
    /// Converted to owned events one at a time, as they are yielded.
    buffer: VecDeque<FeedEvent>,
    /// Revision of the batch in `buffer`: reached once the buffer drains.
    pending_revision: i64,
    revision: i64,
}

impl ServiceWatch {
    /// How often the watch asks etcd for a progress report: 5 s.
    pub const PROGRESS_INTERVAL: Duration = PROGRESS_INTERVAL;
    /// How long a watch may hear nothing (no event, no progress report)
    /// before it is restarted: 10 s.
    pub const STALE_AFTER: Duration = STALE_AFTER;

    /// The etcd revision the consumer has caught up to: every change at or
    /// below it has been yielded by this stream. 0 before the snapshot.
    ///
    /// It advances with the snapshot, with changes under the watched prefix,
    /// and with re-lists; writes elsewhere in etcd do not move it. After etcd
    /// was wiped it may go down, to the new store's revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// How many recoverable errors the watch has met and recovered from so
    /// far (broken streams, failed reads, compactions, stale streams). Each
    /// is also logged through `tracing` with a warning.
    pub fn errors(&self) -> u64 {
        self.feed.errors.load(Ordering::Relaxed)
    }

    /// Why the stream ended, if it ended for another reason than the
    /// registry closing: [`Error::PermissionDenied`] when etcd's RBAC refused
    /// the read or the watch. `None` while the stream is live.
    pub fn error(&self) -> Option<Error> {
        self.feed.denied()
    }
}

impl futures::Stream for ServiceWatch {
    type Item = ServiceEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServiceEvent>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.buffer.pop_front() {
                if this.buffer.is_empty() {
                    this.revision = this.pending_revision;
                }
                return Poll::Ready(Some(event.into()));
            }
            match this.feed.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => {
                    this.pending_revision = batch.revision;
                    if batch.events.is_empty() {
                        this.revision = batch.revision;
                    }
                    this.buffer.extend(batch.events);
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl std::fmt::Debug for ServiceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceWatch")
            .field("service", &self.feed.service)
            .field("revision", &self.revision)
            .field("errors", &self.errors())
            .finish()
    }
}

impl Registry {
    /// Watches service `name`: a [`ServiceEvent::Snapshot`] of its instances,
    /// then every change. See [`ServiceWatch`] for the guarantees.
    ///
    /// Must be called within a Tokio runtime: it spawns the watch task.
    /// Fails with [`Error::InvalidInput`] for an invalid name and with
    /// [`Error::Closed`] after [`Registry::close`]; every later problem is
    /// retried, not returned.
    pub fn watch(&self, name: &str) -> Result<ServiceWatch> {
        validate_segment("name", name)?;
        let feed = Feed::start(&self.inner, Some(name))?;
        Ok(ServiceWatch::new(feed))
    }

    /// Watches every service of the namespace. Like [`Registry::watch`];
    /// events carry instances of any service (tell them apart by `name`).
    pub fn watch_all(&self) -> Result<ServiceWatch> {
        let feed = Feed::start(&self.inner, None)?;
        Ok(ServiceWatch::new(feed))
    }
}

impl ServiceWatch {
    fn new(feed: Feed) -> Self {
        Self {
            feed,
            buffer: VecDeque::new(),
            pending_revision: 0,
            revision: 0,
        }
    }
}

/// The changes of one etcd revision (or of one re-list), sent as a unit so
/// that consumers can apply them atomically.
pub(crate) struct Batch {
    pub(crate) events: Vec<FeedEvent>,
    /// The revision the consumer has caught up to once it applied `events`.
    pub(crate) revision: i64,
    /// The batch is the difference found by a re-list (etcd wiped, restored
    /// or replaced), not events etcd reported.
    pub(crate) relisted: bool,
}

/// The receiving end of a watch task; dropping it stops the task, which drops
/// its etcd watch stream.
pub(crate) struct Feed {
    pub(crate) rx: mpsc::Receiver<Batch>,
    pub(crate) errors: Arc<AtomicU64>,
    /// Set when etcd's RBAC refused the watch, which then ended.
    pub(crate) denied: Arc<OnceLock<(&'static str, String)>>,
    pub(crate) heard: crate::metrics::Heard,
    service: String,
    task: JoinHandle<()>,
}

impl Feed {
    /// Spawns the watch task of service `name` (`None`: every service).
    pub(crate) fn start(inner: &Arc<Inner>, name: Option<&str>) -> Result<Self> {
        if inner.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        let prefix = match name {
            Some(name) => inner.keys.service_prefix(name),
            None => inner.keys.services_prefix().to_owned(),
        };
        let service = name.unwrap_or("*").to_owned();
        let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
        let errors = Arc::new(AtomicU64::new(0));
        let denied = Arc::new(OnceLock::new());
        let heard = crate::metrics::Heard::default();
        let watcher = Watcher {
            heard: heard.clone(),
            denied: denied.clone(),
            inner: inner.clone(),
            prefix,
            service: service.clone(),
            tx,
            errors: errors.clone(),
            cancel: inner.cancel.clone(),
            seen: BTreeMap::new(),
            revision: 0,
            cluster_id: None,
            listed: false,
        };
        let task = tokio::spawn(watcher.run());
        Ok(Self {
            rx,
            errors,
            denied,
            heard,
            service,
            task,
        })
    }

    /// The RBAC refusal that ended the watch, if any.
    pub(crate) fn denied(&self) -> Option<Error> {
        denied_error(&self.denied)
    }
}

/// The [`Error::PermissionDenied`] recorded in `slot`, if any.
pub(crate) fn denied_error(slot: &OnceLock<(&'static str, String)>) -> Option<Error> {
    slot.get().map(|(op, key)| Error::PermissionDenied {
        op,
        key: key.clone(),
    })
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the consumer has seen of one key.
struct Seen {
    /// `None` for a malformed value or a key outside the layout: never sent.
    /// Shared with the consumer (a cache keeps this very `Arc`).
    instance: Option<Arc<ServiceInstance>>,
    /// The bytes of a value that did not parse, so that an unchanged one is
    /// not warned about again. Valid values are not kept: the parsed
    /// instance tells a change, and a large namespace is not held twice.
    malformed: Option<Vec<u8>>,
    mod_revision: i64,
}

/// The states of the watch loop.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Read everything; diff against what the consumer has seen.
    Listing,
    /// The stream broke: check that etcd still holds what we saw, then resume.
    Resuming,
    /// Watch from this revision on.
    Watching { from: i64 },
}

/// How one state ended.
enum Next {
    /// Go on to this state now.
    Go(State),
    /// A recoverable error: count it, log it, back off, then go on to this state.
    Retry(State, String),
    /// The registry closed or the consumer went away.
    Stop,
    /// etcd's RBAC refused the read or the watch: retrying cannot help.
    Denied(&'static str, String),
}

impl Next {
    /// A failed step: an RBAC refusal ends the watch, anything else is retried.
    fn failed(state: State, e: Error, context: &str) -> Next {
        match e {
            Error::PermissionDenied { op, key } => Next::Denied(op, key),
            e => Next::Retry(state, format!("{context}{e}")),
        }
    }
}

struct Watcher {
    inner: Arc<Inner>,
    prefix: String,
    /// The service name for logs, `*` for the whole namespace.
    service: String,
    tx: mpsc::Sender<Batch>,
    errors: Arc<AtomicU64>,
    denied: Arc<OnceLock<(&'static str, String)>>,
    /// When the watch last heard from etcd (for the cache staleness metric).
    heard: crate::metrics::Heard,
    cancel: CancellationToken,
    /// What the consumer has seen, by key, as of `revision`.
    seen: BTreeMap<Vec<u8>, Seen>,
    /// Every change at or below this revision has been sent.
    revision: i64,
    cluster_id: Option<u64>,
    /// Whether the snapshot has been sent.
    listed: bool,
}

impl Watcher {
    async fn run(mut self) {
        let mut backoff = Backoff::standard();
        let mut state = State::Listing;
        loop {
            let next = match state {
                State::Listing => self.list().await,
                State::Resuming => self.check().await,
                State::Watching { from } => self.watch(from, &mut backoff).await,
            };
            match next {
                Next::Go(s) => state = s,
                Next::Retry(s, reason) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        service = %self.service, revision = self.revision, %reason,
                        "watch interrupted; retrying"
                    );
                    if !backoff.wait(&self.cancel).await {
                        return;
                    }
                    state = s;
                }
                Next::Stop => return,
                Next::Denied(op, key) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        service = %self.service, op, key = %key,
                        "etcd refused this user the watch (permission denied); the watch ends"
                    );
                    let _ = self.denied.set((op, key));
                    return;
                }
            }
            tracing::debug!(service = %self.service, revision = self.revision, ?state, "watch state");
        }
    }

    /// Runs `f` unless the registry closes first.
    async fn cancellable<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            v = f => Some(v),
        }
    }

    /// Sends a batch; false when the consumer is gone or the registry closed.
    async fn send(&self, events: Vec<FeedEvent>, relisted: bool) -> bool {
        crate::metrics::watch_events(&self.inner.config.namespace, &self.service, &events);
        let batch = Batch {
            events,
            revision: self.revision,
            relisted,
        };
        matches!(self.cancellable(self.tx.send(batch)).await, Some(Ok(())))
    }

    /// Parses a value; name and id always come from the key.
    fn parse(&self, kv: &KeyValue) -> Option<ServiceInstance> {
        let mut instance = self.inner.parse_kv(kv)?;
        let key = std::str::from_utf8(kv.key()).ok();
        if let Some((name, id)) = key.and_then(|k| self.inner.keys.parse_instance_key(k))
            && (instance.name != name || instance.id != id)
        {
            tracing::debug!(key = %String::from_utf8_lossy(kv.key()), "value names another instance; the key wins");
            name.clone_into(&mut instance.name);
            id.clone_into(&mut instance.id);
        }
        Some(instance)
    }

    /// Parses `kv`, the new value of a key last seen as `old`: an unchanged
    /// malformed value is not parsed (nor warned about) again, and an
    /// unchanged valid one keeps the instance already shared with the
    /// consumer, so that a re-list or a re-registration with the same value
    /// does not leave the watch and a cache holding two copies.
    fn reparse(
        &self,
        old: Option<&Seen>,
        kv: &KeyValue,
    ) -> (Option<Arc<ServiceInstance>>, Option<Vec<u8>>) {
        if let Some(bytes) = old.and_then(|o| o.malformed.as_ref())
            && bytes.as_slice() == kv.value()
        {
            return (None, Some(bytes.clone()));
        }
        let Some(instance) = self.parse(kv) else {
            return (None, Some(kv.value().to_vec()));
        };
        let instance = match old.and_then(|o| o.instance.as_ref()) {
            Some(old) if **old == instance => old.clone(),
            _ => Arc::new(instance),
        };
        (Some(instance), None)
    }

    /// Checks a response header for another cluster; records the first one.
    fn same_cluster(&mut self, cluster_id: Option<u64>) -> bool {
        let Some(cluster_id) = cluster_id else {
            return true;
        };
        match self.cluster_id {
            Some(known) if known != cluster_id => false,
            _ => {
                self.cluster_id = Some(cluster_id);
                true
            }
        }
    }

    /// Listing: one consistent (paged) read, sent as the snapshot or as a diff.
    async fn list(&mut self) -> Next {
        let prefixes = [self.prefix.clone()];
        let read = self.inner.conn.read_prefixes(
            "watch list",
            &prefixes,
            false,
            BTreeMap::new,
            |fresh, kvs| {
                for kv in kvs {
                    let (instance, malformed) = self.reparse(self.seen.get(kv.key()), &kv);
                    fresh.insert(
                        kv.key().to_vec(),
                        Seen {
                            instance,
                            malformed,
                            mod_revision: kv.mod_revision(),
                        },
                    );
                }
            },
        );
        let Paged {
            revision,
            cluster_id,
            value: fresh,
        } = match self.cancellable(read).await {
            None => return Next::Stop,
            Some(Err(e)) => return Next::failed(State::Listing, e, ""),
            Some(Ok(read)) => read,
        };
        self.heard.now();
        if self.listed && (revision < self.revision || cluster_id != self.cluster_id) {
            tracing::warn!(
                service = %self.service, revision, last_seen = self.revision,
                "etcd's history differs from what was seen (wiped or replaced); sending the difference"
            );
        }
        let relisted = self.listed;
        let events = if self.listed {
            diff(&self.seen, &fresh)
        } else {
            let all = fresh.values().filter_map(|s| s.instance.clone()).collect();
            vec![FeedEvent::Snapshot(all)]
        };
        tracing::debug!(service = %self.service, revision, changes = events.len(), "listed");
        self.seen = fresh;
        self.revision = revision;
        self.cluster_id = cluster_id.or(self.cluster_id);
        self.listed = true;
        if !self.send(events, relisted).await {
            return Next::Stop;
        }
        Next::Go(State::Watching { from: revision + 1 })
    }

    /// Resuming: decides between watching on from `revision + 1` and re-listing.
    async fn check(&mut self) -> Next {
        let floor = self.revision;
        let prefixes = [self.prefix.clone()];
        // Every key last written at or before the revision we caught up to
        // must be exactly one we saw; anything else means the history changed.
        // Counts the keys we saw that are still there, too.
        let read = self.inner.conn.read_prefixes(
            "watch check",
            &prefixes,
            true,
            || (true, 0usize),
            |(consistent, present), kvs| {
                for kv in &kvs {
                    let seen = self.seen.get(kv.key());
                    *consistent &= kv.mod_revision() > floor
                        || seen.is_some_and(|s| s.mod_revision == kv.mod_revision());
                    *present += usize::from(seen.is_some());
                }
            },
        );
        let Paged {
            revision,
            cluster_id,
            value: (consistent, present),
        } = match self.cancellable(read).await {
            None => return Next::Stop,
            Some(Err(e)) => return Next::failed(State::Resuming, e, ""),
            Some(Ok(read)) => read,
        };
        if !self.same_cluster(cluster_id) {
            crate::metrics::watch_restart(
                &self.inner.config.namespace,
                &self.service,
                crate::metrics::Restart::Wiped,
            );
            tracing::warn!(service = %self.service, revision = self.revision, "etcd cluster id changed; re-listing");
            return Next::Go(State::Listing);
        }
        if revision < self.revision {
            crate::metrics::watch_restart(
                &self.inner.config.namespace,
                &self.service,
                crate::metrics::Restart::Wiped,
            );
            tracing::warn!(
                service = %self.service, revision = self.revision, current = revision,
                "etcd's revision went back (wiped or restored from an old backup); re-listing"
            );
            return Next::Go(State::Listing);
        }
        if !consistent {
            crate::metrics::watch_restart(
                &self.inner.config.namespace,
                &self.service,
                crate::metrics::Restart::Wiped,
            );
            tracing::warn!(
                service = %self.service, revision = self.revision,
                "etcd no longer holds what was seen (wiped or replaced); re-listing"
            );
            return Next::Go(State::Listing);
        }
        if present == self.seen.len() {
            return Next::Go(State::Watching {
                from: self.revision + 1,
            });
        }
        // A key we saw is gone: deleted after our revision (the watch will
        // report it) or lost with a wiped store that kept its cluster id
        // (nothing would). The store as of our revision tells which.
        let then = self.inner.conn.read_prefixes_at(
            "watch check",
            &prefixes,
            true,
            Some(floor),
            || (true, 0usize),
            |(same, count), kvs| {
                *count += kvs.len();
                *same &= kvs.iter().all(|kv| {
                    self.seen
                        .get(kv.key())
                        .is_some_and(|s| s.mod_revision == kv.mod_revision())
                });
            },
        );
        let (same, count) = match self.cancellable(then).await {
            None => return Next::Stop,
            Some(Ok(then)) => then.value,
            // History compacted past our revision: the watch reports that,
            // and the re-list that follows sends the difference.
            Some(Err(e)) if is_compacted(&e) => {
                return Next::Go(State::Watching {
                    from: self.revision + 1,
                });
            }
            Some(Err(e)) => return Next::failed(State::Resuming, e, ""),
        };
        if !same || count != self.seen.len() {
            crate::metrics::watch_restart(
                &self.inner.config.namespace,
                &self.service,
                crate::metrics::Restart::Wiped,
            );
            tracing::warn!(
                service = %self.service, revision = self.revision,
                "etcd's history at the last revision seen differs from what was seen (wiped); re-listing"
            );
            return Next::Go(State::Listing);
        }
        Next::Go(State::Watching {
            from: self.revision + 1,
        })
    }

    /// Watching: follows the etcd watch until it breaks.
    async fn watch(&mut self, from: i64, backoff: &mut Backoff) -> Next {
        let mut watch = match self
            .cancellable(self.inner.conn.watch(self.prefix.as_str(), true, from))
            .await
        {
            None => return Next::Stop,
            Some(Err(end)) => {
                crate::metrics::watch_restart(
                    &self.inner.config.namespace,
                    &self.service,
                    crate::metrics::Restart::Broken,
                );
                return Next::failed(State::Resuming, end.into(), "opening the watch failed: ");
            }
            Some(Ok(watch)) => watch,
        };
        let mut heard = Instant::now();
        let mut progress = tokio::time::interval_at(heard + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                _ = self.cancel.cancelled() => return Next::Stop,
                _ = tokio::time::sleep_until(heard + STALE_AFTER) => {
                    crate::metrics::watch_restart(&self.inner.config.namespace, &self.service, crate::metrics::Restart::Stale);
                    return Next::Retry(State::Resuming, format!("no event or progress report for {STALE_AFTER:?} (stale stream)"));
                }
                _ = progress.tick() => {
                    if let Err(e) = watch.request_progress().await {
                        crate::metrics::watch_restart(&self.inner.config.namespace, &self.service, crate::metrics::Restart::Broken);
                        return Next::Retry(State::Resuming, format!("progress request failed: {e}"));
                    }
                    continue;
                }
                m = watch.next() => m,
            };
            let resp = match message {
                Ok(resp) => resp,
                Err(WatchEnd::Compacted { compact_revision }) => {
                    crate::metrics::watch_restart(
                        &self.inner.config.namespace,
                        &self.service,
                        crate::metrics::Restart::Compacted,
                    );
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        service = %self.service, revision = self.revision, compact_revision,
                        "the last revision seen was compacted; re-listing and sending the difference"
                    );
                    return Next::Go(State::Listing);
                }
                Err(WatchEnd::Broken(e)) => {
                    crate::metrics::watch_restart(
                        &self.inner.config.namespace,
                        &self.service,
                        crate::metrics::Restart::Broken,
                    );
                    return Next::failed(State::Resuming, e, "watch stream failed: ");
                }
            };
            heard = Instant::now();
            self.heard.now();
            if !self.same_cluster(resp.header().map(ResponseHeader::cluster_id)) {
                crate::metrics::watch_restart(
                    &self.inner.config.namespace,
                    &self.service,
                    crate::metrics::Restart::Wiped,
                );
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.service, revision = self.revision, "etcd cluster id changed; re-listing");
                return Next::Go(State::Listing);
            }
            // (A response may carry revision 0, hence the `> 0`.)
            if resp
                .header()
                .is_some_and(|h| h.revision() > 0 && h.revision() < self.revision)
            {
                crate::metrics::watch_restart(
                    &self.inner.config.namespace,
                    &self.service,
                    crate::metrics::Restart::Broken,
                );
                // A wiped store, or a member that lags behind: the check tells which.
                return Next::Retry(
                    State::Resuming,
                    "etcd's revision is behind the last one seen".into(),
                );
            }
            if resp.created() {
                backoff.reset();
                tracing::debug!(service = %self.service, from, "watching");
            }
            if resp.events().is_empty() {
                continue; // created, or a progress report: proof of life
            }
            let events = self.apply(resp.events());
            if !self.send(events, false).await {
                return Next::Stop;
            }
            // Time spent waiting for a slow consumer is not staleness.
            heard = Instant::now();
        }
    }

    /// Applies watch events to `seen`; returns what the consumer must be told.
    fn apply(&mut self, events: &[Event]) -> Vec<FeedEvent> {
        let mut out = Vec::new();
        let floor = self.revision;
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let mod_revision = kv.mod_revision();
            if mod_revision <= floor {
                continue; // already reflected (never expected: we watch from revision + 1)
            }
            match event.event_type() {
                EventType::Put => {
                    let old = self.seen.get(kv.key());
                    let (instance, malformed) = self.reparse(old, kv);
                    if let Some(e) =
                        change(old.and_then(|o| o.instance.as_ref()), instance.as_ref())
                    {
                        out.push(e);
                    }
                    self.seen.insert(
                        kv.key().to_vec(),
                        Seen {
                            instance,
                            malformed,
                            mod_revision,
                        },
                    );
                }
                EventType::Delete => {
                    if let Some(Seen {
                        instance: Some(old),
                        ..
                    }) = self.seen.remove(kv.key())
                    {
                        out.push(FeedEvent::Removed(old));
                    }
                }
            }
            self.revision = self.revision.max(mod_revision);
        }
        out
    }
}

/// The event that turns `old` into `new`, if any.
fn change(
    old: Option<&Arc<ServiceInstance>>,
    new: Option<&Arc<ServiceInstance>>,
) -> Option<FeedEvent> {
    match (old, new) {
        (None, Some(new)) => Some(FeedEvent::Added(new.clone())),
        (Some(old), Some(new)) if !Arc::ptr_eq(old, new) && old != new => {
            Some(FeedEvent::Updated(new.clone()))
        }
        (Some(old), None) => Some(FeedEvent::Removed(old.clone())),
        _ => None,
    }
}

/// The events that turn the consumer's `old` view into `new`, in key order.
fn diff(old: &BTreeMap<Vec<u8>, Seen>, new: &BTreeMap<Vec<u8>, Seen>) -> Vec<FeedEvent> {
    let mut out = Vec::new();
    for (key, seen) in old {
        if !new.contains_key(key)
            && let Some(instance) = &seen.instance
        {
            out.push(FeedEvent::Removed(instance.clone()));
        }
    }
    for (key, seen) in new {
        let before = old.get(key).and_then(|s| s.instance.as_ref());
        if let Some(e) = change(before, seen.instance.as_ref()) {
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(port: u16) -> Seen {
        let instance = ServiceInstance::new("web", "a", "10.0.0.1", port);
        Seen {
            malformed: None,
            instance: Some(Arc::new(instance)),
            mod_revision: 1,
        }
    }

    #[test]
    fn diff_reports_adds_updates_and_removes_but_not_unchanged() {
        let mut old = BTreeMap::new();
        old.insert(b"a".to_vec(), seen(1));
        old.insert(b"b".to_vec(), seen(2));
        old.insert(b"c".to_vec(), seen(3));
        let mut new = BTreeMap::new();
        new.insert(b"b".to_vec(), seen(20));
        new.insert(b"c".to_vec(), seen(3));
        new.insert(b"d".to_vec(), seen(4));
        let events: Vec<ServiceEvent> = diff(&old, &new).into_iter().map(Into::into).collect();
        let instance = |port| Arc::unwrap_or_clone(seen(port).instance.unwrap());
        assert_eq!(
            events,
            vec![
                ServiceEvent::Removed(instance(1)),
                ServiceEvent::Updated(instance(20)),
                ServiceEvent::Added(instance(4)),
            ]
        );
    }

    #[test]
    fn a_value_turning_malformed_is_a_removal() {
        let old = seen(1).instance;
        let removed = change(old.as_ref(), None).map(ServiceEvent::from);
        assert_eq!(
            removed,
            Some(ServiceEvent::Removed(ServiceInstance::clone(
                old.as_ref().unwrap()
            )))
        );
        assert!(change(None, None).is_none());
        assert!(change(old.as_ref(), old.as_ref()).is_none());
        // Equal in value, held apart: still no change.
        assert!(change(old.as_ref(), seen(1).instance.as_ref()).is_none());
    }
}
