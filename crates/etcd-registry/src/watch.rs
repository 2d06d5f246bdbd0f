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

use etcd_client::{Event, EventType, KeyValue};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Retry;
use crate::conn::{Paged, is_compacted};
use crate::core::Core;
use crate::error::{Error, Result};
use crate::instance::ServiceInstance;
use crate::stream::{Item, Listed, Resumable};

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

const PROGRESS_INTERVAL: Duration = crate::stream::PROGRESS_INTERVAL;
const STALE_AFTER: Duration = crate::stream::STALE_AFTER;
/// Batches buffered between the watch task and its consumer.
const CHANNEL_BATCHES: usize = 16;

/// A stream of changes to one service (or to every service of the namespace).
///
/// Create one with [`Registry::watch`](crate::Registry::watch) or [`Registry::watch_all`](crate::Registry::watch_all). It
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

impl ServiceWatch {
    /// Starts the watch of service `name` (`None`: every service).
    pub(crate) fn start(core: &Core, name: Option<&str>) -> Result<Self> {
        Feed::start(core, name).map(Self::new)
    }

    pub(crate) fn new(feed: Feed) -> Self {
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
    /// The batch is the difference found by a re-list (a wiped or restored
    /// etcd, a compaction, a cluster change), not events etcd reported: its
    /// removals may be keys about to come back, not deregistrations.
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
    pub(crate) fn start(core: &Core, name: Option<&str>) -> Result<Self> {
        core.check_open()?;
        let prefix = match name {
            Some(name) => {
                crate::keys::validate_segment("name", name)?;
                core.keys.service_prefix(name)
            }
            None => core.keys.services_prefix().to_owned(),
        };
        let service = name.unwrap_or("*").to_owned();
        Ok(Self::spawn(core, prefix, service, None))
    }

    pub(crate) fn spawn(core: &Core, prefix: String, label: String, grpc: Option<String>) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
        let denied = Arc::new(OnceLock::new());
        let heard = crate::metrics::Heard::default();
        let mut stream = core.stream(vec![prefix], true, &label);
        stream.on_heard(heard.clone());
        let errors = stream.errors();
        let watcher = Watcher {
            heard: heard.clone(),
            denied: denied.clone(),
            core: core.clone(),
            service: label.clone(),
            naming: grpc,
            tx,
            errors: errors.clone(),
            seen: BTreeMap::new(),
            revision: 0,
            listed: false,
            stream,
        };
        let task = tokio::spawn(watcher.run());
        Self {
            rx,
            errors,
            denied,
            heard,
            service: label,
            task,
        }
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
    /// Follow the resumable stream.
    Watching,
}

/// How one state ended.
enum Next {
    /// Go on to this state now.
    Go(State),
    /// A failed read: count it, log it, back off, then go on to this state.
    Retry(State, String),
    /// The registry closed or the consumer went away.
    Stop,
    /// etcd's RBAC refused the read or the watch: retrying cannot help.
    Denied(&'static str, String),
}

impl Next {
    /// A failed step: an RBAC refusal ends the watch, a closed registry
    /// stops it, anything else is retried.
    fn failed(state: State, e: Error) -> Next {
        match e {
            Error::PermissionDenied { op, key } => Next::Denied(op, key),
            Error::Closed => Next::Stop,
            e => Next::Retry(state, e.to_string()),
        }
    }
}

struct Watcher {
    core: Core,
    /// The service name for logs, `*` for the whole namespace.
    service: String,
    /// The gRPC naming target whose endpoints are watched, if any.
    naming: Option<String>,
    tx: mpsc::Sender<Batch>,
    errors: Arc<AtomicU64>,
    denied: Arc<OnceLock<(&'static str, String)>>,
    /// When the watch last heard from etcd (for the cache staleness metric).
    heard: crate::metrics::Heard,
    /// What the consumer has seen, by key, as of `revision`.
    seen: BTreeMap<Vec<u8>, Seen>,
    /// Every change at or below this revision has been sent.
    revision: i64,
    /// Whether the snapshot has been sent.
    listed: bool,
    stream: Resumable,
}

impl Watcher {
    async fn run(mut self) {
        let mut retry = Retry::standard(format!("the watch of service {}", self.service));
        let mut state = State::Listing;
        loop {
            let next = match state {
                State::Listing => self.list().await,
                State::Resuming => self.check().await,
                State::Watching => self.watch().await,
            };
            match next {
                Next::Go(s) => {
                    if matches!(s, State::Watching) {
                        retry.succeeded();
                    }
                    state = s;
                }
                Next::Retry(s, reason) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    let error = format!("interrupted at revision {}: {reason}", self.revision);
                    if !retry.failed(&self.core.cancel, &error).await {
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
        crate::backoff::cancellable(&self.core.cancel, f).await
    }

    /// Sends a batch; false when the consumer is gone or the registry closed.
    async fn send(&self, events: Vec<FeedEvent>, relisted: bool) -> bool {
        let mut counts = [0u64; 4];
        for event in &events {
            counts[match event {
                FeedEvent::Snapshot(_) => 0,
                FeedEvent::Added(_) => 1,
                FeedEvent::Updated(_) => 2,
                FeedEvent::Removed(_) => 3,
            }] += 1;
        }
        crate::metrics::watch_events(self.core.namespace(), &self.service, counts);
        let batch = Batch {
            events,
            revision: self.revision,
            relisted,
        };
        matches!(self.cancellable(self.tx.send(batch)).await, Some(Ok(())))
    }

    /// Listing: one consistent (paged) read, sent as the snapshot or as a diff.
    async fn list(&mut self) -> Next {
        let (core, seen, naming) = (&self.core, &self.seen, &self.naming);
        let read = self.stream.list("watch list", BTreeMap::new, |fresh, kvs| {
            for kv in kvs {
                let (instance, malformed) = reparse(core, naming, seen.get(kv.key()), &kv);
                fresh.insert(
                    kv.key().to_vec(),
                    Seen {
                        instance,
                        malformed,
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
        });
        let Listed {
            revision,
            value: fresh,
            history_changed,
        } = match crate::backoff::cancellable(&self.core.cancel, read).await {
            None => return Next::Stop,
            Some(Err(e)) => return Next::failed(State::Listing, e),
            Some(Ok(read)) => read,
        };
        self.heard.now();
        if self.listed && (history_changed || revision < self.revision) {
            tracing::warn!(
                service = %self.service, revision, last_seen = self.revision,
                "etcd's history differs from what was seen (wiped or replaced); sending the difference"
            );
        }
        let events = if self.listed {
            diff(&self.seen, &fresh)
        } else {
            let all = fresh.values().filter_map(|s| s.instance.clone()).collect();
            vec![FeedEvent::Snapshot(all)]
        };
        tracing::debug!(service = %self.service, revision, changes = events.len(), "listed");
        self.seen = fresh;
        self.revision = revision;
        let relisted = self.listed;
        self.listed = true;
        if !self.send(events, relisted).await {
            return Next::Stop;
        }
        Next::Go(State::Watching)
    }

    /// A re-list that found the history changed.
    fn wiped(&self, why: &str) -> Next {
        crate::metrics::watch_restart(
            self.core.namespace(),
            &self.service,
            crate::metrics::Restart::Wiped,
        );
        tracing::warn!(service = %self.service, revision = self.revision, "{why}; re-listing");
        Next::Go(State::Listing)
    }

    /// Resuming: decides between watching on from `revision + 1` and re-listing.
    async fn check(&mut self) -> Next {
        let floor = self.revision;
        let prefixes = self.stream.keys().to_vec();
        let seen = &self.seen;
        // Every key last written at or before the revision we caught up to
        // must be exactly one we saw; anything else means the history changed.
        // Counts the keys we saw that are still there, too.
        let read = self.core.conn.read_prefixes(
            "watch check",
            &prefixes,
            true,
            || (true, 0usize),
            |(consistent, present), kvs| {
                for kv in &kvs {
                    let seen = seen.get(kv.key());
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
            Some(Err(e)) => return Next::failed(State::Resuming, e),
            Some(Ok(read)) => read,
        };
        if !self.stream.same_unary_cluster(cluster_id) {
            return self.wiped("etcd cluster id changed");
        }
        if revision < self.revision {
            return self.wiped("etcd's revision went back (wiped or restored from an old backup)");
        }
        if !consistent {
            return self.wiped("etcd no longer holds what was seen (wiped or replaced)");
        }
        if present == self.seen.len() {
            return Next::Go(State::Watching);
        }
        // A key we saw is gone: deleted after our revision (the watch will
        // report it) or lost with a wiped store that kept its cluster id
        // (nothing would). The store as of our revision tells which.
        let seen = &self.seen;
        let then = self.core.conn.read_prefixes_at(
            "watch check",
            &prefixes,
            true,
            Some(floor),
            || (true, 0usize),
            |(same, count), kvs| {
                *count += kvs.len();
                *same &= kvs.iter().all(|kv| {
                    seen.get(kv.key())
                        .is_some_and(|s| s.mod_revision == kv.mod_revision())
                });
            },
        );
        let (same, count) = match self.cancellable(then).await {
            None => return Next::Stop,
            Some(Ok(then)) => then.value,
            // History compacted past our revision: the watch reports that,
            // and the re-list that follows sends the difference.
            Some(Err(e)) if is_compacted(&e) => return Next::Go(State::Watching),
            Some(Err(e)) => return Next::failed(State::Resuming, e),
        };
        if !same || count != self.seen.len() {
            return self.wiped(
                "etcd's history at the last revision seen differs from what was seen (wiped)",
            );
        }
        Next::Go(State::Watching)
    }

    /// Watching: follows the resumable stream until it needs a check or a re-list.
    async fn watch(&mut self) -> Next {
        loop {
            match self.stream.next().await {
                Err(e) => return Next::failed(State::Resuming, e),
                Ok(Item::Interrupted) => return Next::Go(State::Resuming),
                Ok(Item::Reset(_)) => return Next::Go(State::Listing),
                Ok(Item::Events(events)) => {
                    let events = self.apply(&events);
                    if !self.send(events, false).await {
                        return Next::Stop;
                    }
                }
            }
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
                    let (instance, malformed) = reparse(&self.core, &self.naming, old, kv);
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

/// Parses a value; name and id always come from the key.
fn parse(core: &Core, kv: &KeyValue) -> Option<ServiceInstance> {
    let mut instance = core.parse_kv(kv)?;
    let key = std::str::from_utf8(kv.key()).ok();
    if let Some((name, id)) = key.and_then(|k| core.keys.parse_instance_key(k))
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
    core: &Core,
    grpc: &Option<String>,
    old: Option<&Seen>,
    kv: &KeyValue,
) -> (Option<Arc<ServiceInstance>>, Option<Vec<u8>>) {
    if let Some(bytes) = old.and_then(|o| o.malformed.as_ref())
        && bytes.as_slice() == kv.value()
    {
        return (None, Some(bytes.clone()));
    }
    let Some(instance) = crate::naming::parse_kv_or(grpc, kv, || parse(core, kv)) else {
        return (None, Some(kv.value().to_vec()));
    };
    let instance = match old.and_then(|o| o.instance.as_ref()) {
        Some(old) if **old == instance => old.clone(),
        _ => Arc::new(instance),
    };
    (Some(instance), None)
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
