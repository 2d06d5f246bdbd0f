//! The one resumable watch: every watch of the crate goes through it.
//!
//! [`Resumable`] reads (paged, one consistent revision) and then watches
//! from that revision + 1, or watches from a revision it is given. It keeps
//! the stream alive on its own and tells its consumer only what the consumer
//! must act on ([`Item`]):
//!
//! * a broken, ended or stale stream is reopened from the last revision
//!   seen, plus one, after the standard backoff ([`Item::Interrupted`] is
//!   reported first, so that a consumer holding a view can check it still
//!   matches etcd);
//! * a compacted start revision, a cluster id that changed, or a revision
//!   that went back is a [`Item::Reset`]: read again;
//! * liveness: a progress report is asked for every [`PROGRESS_INTERVAL`],
//!   and a stream that heard nothing for [`STALE_AFTER`] is restarted. Where
//!   progress requests are never answered (etcd's gRPC proxy), the stream
//!   proves liveness instead with one small read per [`STALE_AFTER`]: the
//!   newest modification under the watched range must not be newer than
//!   what the stream delivered, and the range must hold as many keys as it
//!   did at the stream's revision (a deletion leaves no key behind to be
//!   newer). That is said once, at INFO.
//!
//! Cluster ids are compared like with like: unary answers with unary
//! answers, watch headers with watch headers, and a header whose id is 0 or
//! absent says nothing (etcd's gRPC proxy sends no id on watch responses).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Event, EventType, SortOrder, SortTarget};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::conn::{Conn, Paged};
use crate::error::{Error, Result};

/// How often a watch asks etcd for a progress report.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// A watch that has heard nothing at all (no event, no progress report) for
/// this long is checked, and restarted unless it is proven alive.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(10);

/// Why a [`Watch`] stopped.
#[derive(Debug)]
pub(crate) enum WatchEnd {
    /// etcd compacted the history past the watch's start revision.
    Compacted {
        /// The oldest revision etcd still holds.
        compact_revision: i64,
    },
    /// The stream broke, ended, did not open in time, or etcd cancelled the
    /// watch for another reason.
    Broken(Error),
}

impl std::fmt::Display for WatchEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchEnd::Compacted { compact_revision } => {
                write!(f, "history compacted up to revision {compact_revision}")
            }
            WatchEnd::Broken(e) => e.fmt(f),
        }
    }
}

fn watch_options(prefix: bool, from: i64) -> etcd_client::WatchOptions {
    let options = etcd_client::WatchOptions::new().with_start_revision(from);
    if prefix {
        options.with_prefix()
    } else {
        options
    }
}

fn watch_error(reason: impl Into<String>) -> Error {
    Error::etcd("watch", etcd_client::Error::WatchError(reason.into()))
}

/// One raw etcd watch stream whose every way of stopping arrives as a
/// [`WatchEnd`]. Dropping it cancels the watch. Only [`Resumable`] opens one.
struct Watch {
    requests: etcd_client::WatchRequestSender,
    responses: etcd_client::WatchResponseStream,
    /// The first key watched, to name it when etcd's RBAC refuses the watch.
    key: String,
}

impl Watch {
    /// Watches each of `keys` (every key under it when `prefix`) from
    /// revision `from`, on one stream. Opening is bounded by the request timeout.
    async fn open(conn: &Conn, keys: &[String], prefix: bool, from: i64) -> Result<Self, WatchEnd> {
        let first = keys.first().cloned().unwrap_or_default();
        let mut client = conn.client();
        let timeout = conn.request_timeout();
        let stream = tokio::time::timeout(
            timeout,
            client.watch(first.as_str(), Some(watch_options(prefix, from))),
        )
        .await
        .map_err(|_| {
            WatchEnd::Broken(Error::Timeout {
                op: "watch",
                after: timeout,
            })
        })?
        .map_err(|e| WatchEnd::Broken(Error::etcd("watch", e).on_key(&first)))?;
        let (mut requests, responses) = stream.split();
        for key in keys.iter().skip(1) {
            requests
                .watch(key.as_str(), Some(watch_options(prefix, from)))
                .await
                .map_err(|e| WatchEnd::Broken(Error::etcd("watch", e).on_key(key)))?;
        }
        Ok(Watch {
            requests,
            responses,
            key: first,
        })
    }

    /// The next response: events, the creation notice, or a progress report.
    /// Cancel safe: dropping the future loses no response.
    async fn next(&mut self) -> Result<etcd_client::WatchResponse, WatchEnd> {
        let resp = self
            .responses
            .message()
            .await
            .map_err(|e| WatchEnd::Broken(Error::etcd("watch", e).on_key(&self.key)))?
            .ok_or_else(|| WatchEnd::Broken(watch_error("stream ended")))?;
        if resp.canceled() {
            return Err(if resp.compact_revision() > 0 {
                WatchEnd::Compacted {
                    compact_revision: resp.compact_revision(),
                }
            } else {
                let reason = format!("cancelled by etcd: {}", resp.cancel_reason());
                WatchEnd::Broken(watch_error(reason).on_key(&self.key))
            });
        }
        Ok(resp)
    }

    async fn request_progress(&mut self) -> Result<()> {
        self.requests
            .request_progress()
            .await
            .map_err(|e| Error::etcd("watch progress", e))
    }
}

/// Why a consumer must read everything again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reset {
    /// The revision to resume from was compacted.
    Compacted,
    /// Another cluster answers now, or the revision went back: etcd was
    /// wiped, replaced or restored from an older snapshot.
    HistoryChanged,
}

/// What [`Resumable::next`] yields.
#[derive(Debug)]
pub(crate) enum Item {
    /// The events of one watch response, in order, all after the last
    /// revision seen before them.
    Events(Vec<Event>),
    /// The stream broke or went stale; the next call reopens it from the
    /// last revision seen + 1 (after the backoff). A consumer that holds a
    /// view may first check that etcd still holds it.
    Interrupted,
    /// Read everything again: the history the stream followed is gone.
    Reset(Reset),
}

/// The longest a liveness read may take (see `Resumable::liveness`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a liveness read found.
enum Liveness {
    Alive,
    /// No answer, or a change the stream did not deliver (which).
    Stale(&'static str),
    /// Another cluster, or an older revision: the history is not the one followed.
    Changed,
    /// The stream cannot catch up from its revision (compacted before its
    /// keys were counted, or a restart did not deliver what it missed):
    /// read again.
    Reset(&'static str),
}

/// Whether the server answers progress requests on a watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    Unknown,
    Answered,
    /// Never answered so far (etcd's gRPC proxy): liveness is proven by reads.
    Unanswered,
}

/// The cluster ids seen so far, one per kind of answer.
#[derive(Clone, Copy, Debug, Default)]
struct ClusterIds {
    unary: Option<u64>,
    watch: Option<u64>,
}

/// Records `id` in `slot`, or compares it with the one recorded. An id of
/// 0 (or none) is unknown, never a change.
fn same_cluster(slot: &mut Option<u64>, id: Option<u64>) -> bool {
    match (id.filter(|&id| id != 0), *slot) {
        (None, _) => true,
        (Some(id), Some(known)) => id == known,
        (Some(id), None) => {
            *slot = Some(id);
            true
        }
    }
}

/// Labels of a stream for logs and metrics.
#[derive(Clone, Debug)]
pub(crate) struct Label {
    pub(crate) namespace: String,
    /// The service (or `*`, or an election's or lock's name) for logs.
    pub(crate) name: String,
}

/// A read of the watched range, at one revision.
pub(crate) struct Listed<T> {
    pub(crate) revision: i64,
    pub(crate) value: T,
    /// The read answered from another cluster, or at an older revision,
    /// than the last one: what was seen before is not this history.
    pub(crate) history_changed: bool,
}

/// The one resumable watch; see the module docs.
pub(crate) struct Resumable {
    conn: Conn,
    cancel: CancellationToken,
    keys: Vec<String>,
    prefix: bool,
    label: Label,
    /// Watch from here on: the last revision seen + 1.
    next: i64,
    watch: Option<Watch>,
    /// The last reopen failed or the stream broke: back off before the next.
    back_off: bool,
    backoff: Backoff,
    progress: Progress,
    clusters: ClusterIds,
    errors: Arc<AtomicU64>,
    /// Told of every response (events or not): the staleness metric.
    heard: Option<crate::metrics::Heard>,
    /// How many keys the watched ranges hold (summed) as of `revision()`:
    /// from the list, kept up to date by the events delivered, or counted
    /// by the liveness read after `start_at` (see `Resumable::liveness`).
    count: Option<i64>,
    /// The revision at which the liveness read last found a deletion the
    /// stream did not deliver.
    missed: Option<i64>,
}

impl Resumable {
    /// Reports every response heard to `heard`.
    pub(crate) fn on_heard(&mut self, heard: crate::metrics::Heard) {
        self.heard = Some(heard);
    }

    /// The keys (or prefixes) the stream watches.
    pub(crate) fn keys(&self) -> &[String] {
        &self.keys
    }

    /// A stream of `keys` (each a prefix when `prefix`), not yet positioned:
    /// call [`list`](Self::list) or [`start_at`](Self::start_at) first.
    pub(crate) fn new(
        conn: Conn,
        cancel: CancellationToken,
        keys: Vec<String>,
        prefix: bool,
        label: Label,
    ) -> Self {
        Self {
            conn,
            cancel,
            keys,
            prefix,
            label,
            next: 0,
            watch: None,
            back_off: false,
            backoff: Backoff::standard(),
            progress: Progress::Unknown,
            clusters: ClusterIds::default(),
            errors: Arc::default(),
            heard: None,
            count: None,
            missed: None,
        }
    }

    /// Counts the recoverable errors met (broken, stale, compacted streams).
    pub(crate) fn errors(&self) -> Arc<AtomicU64> {
        self.errors.clone()
    }

    /// The last revision the stream has delivered everything up to.
    pub(crate) fn revision(&self) -> i64 {
        self.next - 1
    }

    /// Watches from `revision` on (dropping any open stream).
    pub(crate) fn start_at(&mut self, revision: i64) {
        self.next = revision;
        self.watch = None;
        self.count = None;
        self.missed = None;
    }

    /// Records the cluster id of a unary answer read by the consumer; false
    /// when another cluster answered than before.
    pub(crate) fn same_unary_cluster(&mut self, id: Option<u64>) -> bool {
        same_cluster(&mut self.clusters.unary, id)
    }

    fn restart(&self, cause: crate::metrics::Restart) {
        crate::metrics::watch_restart(&self.label.namespace, &self.label.name, cause);
    }

    /// Reads every key of the range, paged at one revision (see
    /// `Conn::read_prefixes`), and positions the stream right after it.
    pub(crate) async fn list<T>(
        &mut self,
        op: &'static str,
        mut init: impl FnMut() -> T,
        mut page: impl FnMut(&mut T, Vec<etcd_client::KeyValue>),
    ) -> Result<Listed<T>> {
        // Counts the keys too (a restarted read starts counting over).
        let init = || (init(), 0i64);
        let page = |(value, count): &mut (T, i64), kvs: Vec<etcd_client::KeyValue>| {
            *count += i64::try_from(kvs.len()).unwrap_or(i64::MAX);
            page(value, kvs);
        };
        let read = if self.prefix {
            Box::pin(self.conn.read_prefixes(op, &self.keys, false, init, page)).await?
        } else {
            Box::pin(self.read_keys(op, init, page)).await?
        };
        let Paged {
            revision,
            cluster_id,
            value: (value, count),
        } = read;
        let went_back = revision < self.revision();
        let other = !self.same_unary_cluster(cluster_id);
        if other {
            self.clusters = ClusterIds::default();
            self.same_unary_cluster(cluster_id);
        }
        self.start_at(revision + 1);
        self.count = Some(count);
        Ok(Listed {
            revision,
            value,
            history_changed: went_back || other,
        })
    }

    /// Exact keys, one get each (a watch of single keys lists them so).
    async fn read_keys<T>(
        &self,
        op: &'static str,
        mut init: impl FnMut() -> T,
        mut page: impl FnMut(&mut T, Vec<etcd_client::KeyValue>),
    ) -> Result<Paged<T>> {
        let mut state = init();
        let mut revision = 0;
        let mut cluster_id = None;
        for key in &self.keys {
            let options = etcd_client::GetOptions::new().with_revision(revision);
            let mut resp = self
                .conn
                .retry_on(op, key, |mut c| {
                    let (key, options) = (key.clone(), options.clone());
                    async move { c.get(key, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
                cluster_id = resp.header().map(|h| h.cluster_id());
            }
            page(&mut state, resp.take_kvs());
        }
        Ok(Paged {
            revision,
            cluster_id,
            value: state,
        })
    }

    /// The next thing the consumer must act on; see [`Item`]. Ends with
    /// [`Error::Closed`] once cancelled, and with an error only when
    /// retrying cannot help ([`Error::PermissionDenied`]).
    ///
    /// Cancel safe: dropping the future loses no event; an open stream is
    /// kept, or reopened from the last revision seen + 1.
    pub(crate) async fn next(&mut self) -> Result<Item> {
        loop {
            if self.cancel.is_cancelled() {
                return Err(Error::Closed);
            }
            if self.watch.is_none() {
                // Not `backoff::Retry`: this wait sits at the reopen inside a
                // cancel-safe `next()`, apart from where the interruption is
                // seen and logged (with the stream's label and revision,
                // `interrupted`), and a consumer may drop `next()` between
                // the two; so the backoff is a field of the stream instead.
                if self.back_off && !self.backoff.wait(&self.cancel).await {
                    return Err(Error::Closed);
                }
                self.back_off = false;
                // Boxed, as is each step below: these futures are large, and
                // every wait of the crate nests one.
                let open = Box::pin(Watch::open(&self.conn, &self.keys, self.prefix, self.next));
                let opened = tokio::select! {
                    _ = self.cancel.cancelled() => return Err(Error::Closed),
                    w = open => w,
                };
                match opened {
                    Ok(watch) => self.watch = Some(watch),
                    Err(end) => return self.ended(end, "opening the watch failed"),
                }
            }
            if let Some(item) = Box::pin(self.follow()).await? {
                return Ok(item);
            }
        }
    }

    /// Follows the open stream until there is something to report (`None`:
    /// the stream was dropped to be reopened at once).
    async fn follow(&mut self) -> Result<Option<Item>> {
        if self.watch.is_none() {
            return Ok(None);
        }
        let mut heard = Instant::now();
        let mut progress = tokio::time::interval_at(heard + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                _ = self.cancel.cancelled() => return Err(Error::Closed),
                _ = tokio::time::sleep_until(heard + STALE_AFTER) => {
                    if self.progress != Progress::Answered {
                        match Box::pin(self.liveness()).await {
                            Liveness::Alive => {
                                heard = Instant::now();
                                continue;
                            }
                            Liveness::Changed => {
                                self.watch = None;
                                self.restart(crate::metrics::Restart::Wiped);
                                self.errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(service = %self.label.name, revision = self.revision(), "etcd's history changed behind the watch (wiped or restored); reading again");
                                self.clusters = ClusterIds::default();
                                return Ok(Some(Item::Reset(Reset::HistoryChanged)));
                            }
                            Liveness::Reset(why) => {
                                self.watch = None;
                                self.restart(crate::metrics::Restart::Compacted);
                                self.errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(service = %self.label.name, revision = self.revision(), %why, "the watch went silent and cannot catch up from its revision; reading again");
                                return Ok(Some(Item::Reset(Reset::Compacted)));
                            }
                            Liveness::Stale(why) => {
                                self.restart(crate::metrics::Restart::Stale);
                                return self.interrupted(format!("no event or progress report for {STALE_AFTER:?} (stale stream), and {why}")).map(Some);
                            }
                        }
                    }
                    self.restart(crate::metrics::Restart::Stale);
                    return self.interrupted(format!("no event or progress report for {STALE_AFTER:?} (stale stream)")).map(Some);
                }
                _ = progress.tick(), if self.progress != Progress::Unanswered => {
                    let Some(watch) = self.watch.as_mut() else { return Ok(None) };
                    if let Err(e) = watch.request_progress().await {
                        self.restart(crate::metrics::Restart::Broken);
                        return self.interrupted(format!("progress request failed: {e}")).map(Some);
                    }
                    continue;
                }
                m = watch_next(&mut self.watch) => m,
            };
            let resp = match message {
                Ok(resp) => resp,
                Err(end) => return self.ended(end, "watch stream failed").map(Some),
            };
            heard = Instant::now();
            if let Some(h) = &self.heard {
                h.now();
            }
            let header = resp.header();
            if !same_cluster(&mut self.clusters.watch, header.map(|h| h.cluster_id())) {
                self.watch = None;
                self.restart(crate::metrics::Restart::Wiped);
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.label.name, revision = self.revision(), "etcd cluster id changed; reading again");
                self.clusters = ClusterIds::default();
                return Ok(Some(Item::Reset(Reset::HistoryChanged)));
            }
            // (A response may carry revision 0, hence the `> 0`.)
            if header.is_some_and(|h| h.revision() > 0 && h.revision() < self.revision()) {
                self.restart(crate::metrics::Restart::Broken);
                // A wiped store, or a member that lags behind: the consumer's check tells which.
                return self
                    .interrupted("etcd's revision is behind the last one seen".into())
                    .map(Some);
            }
            if resp.created() {
                self.backoff.reset();
                tracing::debug!(service = %self.label.name, from = self.next, "watching");
            }
            if resp.events().is_empty() {
                if !resp.created() && self.progress != Progress::Answered {
                    self.progress = Progress::Answered;
                }
                continue; // created, or a progress report: proof of life
            }
            let events = resp.events().to_vec();
            self.count_events(&events);
            if let Some(last) = events
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max()
            {
                self.next = self.next.max(last + 1);
            }
            return Ok(Some(Item::Events(events)));
        }
    }

    /// Keeps `count` up to date with delivered events: a put that creates a
    /// key (version 1) adds one, a delete removes one (etcd reports
    /// deletions of existing keys only). Events at or before `revision()`
    /// are already counted.
    fn count_events(&mut self, events: &[Event]) {
        let Some(count) = self.count.as_mut() else {
            return;
        };
        for event in events {
            let Some(kv) = event.kv() else { continue };
            if kv.mod_revision() < self.next {
                continue;
            }
            match event.event_type() {
                EventType::Put if kv.version() == 1 => *count += 1,
                EventType::Put => {}
                EventType::Delete => *count -= 1,
            }
        }
    }

    /// Where progress requests go unanswered: a read proves the stream
    /// alive when etcd holds exactly what it held at the stream's revision
    /// `R` (what the stream delivered), and catches a history that changed
    /// behind it (etcd wiped or restored behind a proxy, which keeps the
    /// client's stream open and silent).
    ///
    /// Per watched range, the read asks for the newest modification
    /// revision and the number of keys (`count`, which etcd reports for the
    /// whole range whatever the limit); the total must equal the number of
    /// keys as of `R` (`count`). Why this cannot miss a lasting change, a
    /// deletion included: if no key now is newer than `R`, every key now
    /// was last written at or before `R`, so it existed at `R` with the same
    /// value (a key deleted and created again would be newer than `R`): the
    /// keys now are a subset of the keys at `R`. Equal counts make the
    /// subset the whole set. A deletion leaves no key behind to be newer
    /// than `R`, but it lowers the count. (A key created and deleted again
    /// since `R` leaves etcd as it was, so nothing is lost: the view is
    /// right, and any later lasting change is caught by the next read.)
    ///
    /// Cost: one small request per watched range per [`STALE_AFTER`] of
    /// silence, each bounded by [`PROBE_TIMEOUT`] (or the request timeout).
    /// The count as of `R` costs nothing after a list (it is counted there
    /// and kept up to date by the events); after `start_at` it is read once,
    /// count only, as of `R` (etcd answers that from its index). When `R`
    /// was compacted before that, the stream cannot be proven alive, and it
    /// is a reset: the consumer reads again.
    async fn liveness(&mut self) -> Liveness {
        let mut options = etcd_client::GetOptions::new()
            .with_keys_only()
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(1);
        if self.prefix {
            options = options.with_prefix();
        }
        let timeout = self.conn.request_timeout().min(PROBE_TIMEOUT);
        let mut newest = 0;
        let mut count = 0;
        for k in self.keys.clone() {
            let resp = self
                .conn
                .once_within("watch liveness", timeout, |mut c| {
                    let options = options.clone();
                    async move { c.get(k, Some(options)).await }
                })
                .await;
            let Ok(resp) = resp else {
                return Liveness::Stale("no answer to the liveness read");
            };
            if self.changed_history(resp.header()) {
                return Liveness::Changed;
            }
            if let Some(kv) = resp.kvs().first() {
                newest = newest.max(kv.mod_revision());
            }
            count += resp.count();
        }
        if newest > self.revision() {
            return Liveness::Stale("a key changed that the stream did not deliver");
        }
        let then = match self.count {
            Some(then) => then,
            None => match self.count_at_revision(timeout).await {
                Ok(then) => then,
                Err(liveness) => return liveness,
            },
        };
        if then != count {
            // Once, the stream restarts from `R + 1` and etcd replays what it
            // missed. The same gap again after that restart: etcd does not
            // replay it (a deletion at exactly the compaction revision loses
            // its tombstone, for one), so only a new read can close it.
            if self.missed.replace(self.revision()) == Some(self.revision()) {
                return Liveness::Reset(
                    "a deletion it did not deliver, still missing after a restart",
                );
            }
            return Liveness::Stale("a key was deleted that the stream did not deliver");
        }
        if self.progress == Progress::Unknown {
            self.progress = Progress::Unanswered;
            tracing::info!(
                service = %self.label.name,
                "etcd (or a proxy in front of it) does not answer watch progress requests; \
                 proving the watch alive with one read per {STALE_AFTER:?} of silence instead"
            );
        }
        Liveness::Alive
    }

    /// The number of keys of the watched ranges as of `revision()`, read
    /// (count only) and kept in `count`.
    async fn count_at_revision(&mut self, timeout: Duration) -> Result<i64, Liveness> {
        let mut options = etcd_client::GetOptions::new()
            .with_count_only()
            .with_revision(self.revision());
        if self.prefix {
            options = options.with_prefix();
        }
        let mut count = 0;
        for k in self.keys.clone() {
            let resp = self
                .conn
                .once_within("watch liveness", timeout, |mut c| {
                    let options = options.clone();
                    async move { c.get(k, Some(options)).await }
                })
                .await;
            let resp = match resp {
                Ok(resp) => resp,
                Err(e) if crate::conn::is_compacted(&e) => {
                    return Err(Liveness::Reset(
                        "its revision was compacted before its keys were counted",
                    ));
                }
                Err(_) => return Err(Liveness::Stale("no answer to the liveness read")),
            };
            if self.changed_history(resp.header()) {
                return Err(Liveness::Changed);
            }
            count += resp.count();
        }
        self.count = Some(count);
        Ok(count)
    }

    /// Whether a unary answer comes from another cluster, or from a store
    /// behind the stream's revision.
    fn changed_history(&mut self, header: Option<&etcd_client::ResponseHeader>) -> bool {
        header.is_some_and(|h| {
            let went_back = h.revision() > 0 && h.revision() < self.revision();
            went_back || !same_cluster(&mut self.clusters.unary, Some(h.cluster_id()))
        })
    }

    /// The stream broke or went stale: drop it, count and log it, and
    /// report it. Resumes from the last revision seen + 1 on the next call.
    fn interrupted(&mut self, reason: String) -> Result<Item> {
        self.watch = None;
        self.back_off = true;
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(service = %self.label.name, revision = self.revision(), %reason, "watch interrupted; resuming");
        Ok(Item::Interrupted)
    }

    fn ended(&mut self, end: WatchEnd, context: &str) -> Result<Item> {
        self.watch = None;
        match end {
            WatchEnd::Compacted { compact_revision } => {
                self.restart(crate::metrics::Restart::Compacted);
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    service = %self.label.name, revision = self.revision(), compact_revision,
                    "the revision to resume from was compacted; reading again"
                );
                Ok(Item::Reset(Reset::Compacted))
            }
            WatchEnd::Broken(e @ Error::PermissionDenied { .. }) => Err(e),
            WatchEnd::Broken(e) => {
                self.restart(crate::metrics::Restart::Broken);
                self.interrupted(format!("{context}: {e}"))
            }
        }
    }
}

/// The next response of `watch` (pending forever when there is none).
async fn watch_next(watch: &mut Option<Watch>) -> Result<etcd_client::WatchResponse, WatchEnd> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_compare_like_with_like_and_zero_is_unknown() {
        let mut slot = None;
        assert!(same_cluster(&mut slot, Some(0)), "0 is unknown");
        assert_eq!(slot, None);
        assert!(same_cluster(&mut slot, None));
        assert!(same_cluster(&mut slot, Some(7)));
        assert!(
            same_cluster(&mut slot, Some(0)),
            "0 after a known id is no change"
        );
        assert!(same_cluster(&mut slot, Some(7)));
        assert!(!same_cluster(&mut slot, Some(8)));
    }
}
