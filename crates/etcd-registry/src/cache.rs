//! [`ServiceCache`]: a watch-fed local view of a service, with pickers and
//! change notification.
//!
//! One task (the single writer) applies the batches of one watch to a
//! [`Store`], O(log n) per changed instance. The flat, sorted [`View`] that
//! `instances()` and the pickers read is derived from the store lazily, on the
//! first such read after a change, and holds only pointers: every instance is
//! one `Arc<ServiceInstance>`, shared by the watch task's state, the store,
//! every view and every instance handed out.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};

use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::core::Core;
use crate::error::{Error, Result};
use crate::instance::ServiceInstance;
use crate::keys::validate_segment;
use crate::watch::{Batch, Feed, FeedEvent};

/// The registry's caches, by service name (`None`: the whole namespace).
/// Weak, so that dropping the last handle of a cache stops its watch.
pub(crate) type Caches = std::sync::Mutex<HashMap<Option<String>, Weak<Shared>>>;

/// How [`ServiceCache::pick_with`] chooses an instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Each instance in turn. The turn is shared by every clone of the cache.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// At random, in proportion to [`ServiceInstance::weight`]. A weight of 0
    /// (the default) or below counts as 1, so unweighted instances still get
    /// traffic and a negative weight cannot take any away from the others.
    Weighted,
}

/// A local, always-current view of one service (or of every service of the
/// namespace), fed by one [`ServiceWatch`](crate::ServiceWatch).
///
/// Create one with [`Registry::cache`](crate::Registry::cache) or [`Registry::cache_all`](crate::Registry::cache_all). It is
/// cheap to clone (one `Arc`) and `Send + Sync`. Reads answer from memory:
/// no round trip, and no lock is held across an await.
///
/// Caches of the same service (or of the whole namespace) created from one
/// registry share one etcd watch: the 100th `cache("web")` opens no new
/// watch. Dropping the last handle stops that watch. The watch inherits the
/// guarantees of [`ServiceWatch`](crate::ServiceWatch): it never misses a
/// change, survives etcd restarts and compactions, and ignores malformed
/// values with a warning.
///
/// # Memory and cost
///
/// Each instance is held once, as an `Arc<ServiceInstance>` shared by the
/// watch, the cache and everything the cache hands out: [`get`](Self::get)
/// and the pickers return that `Arc` (no copy; use
/// [`Arc::unwrap_or_clone`] or `ServiceInstance::clone(&i)` for an owned
/// value), and [`instances`](Self::instances) returns [`Instances`], a
/// shared, immutable list of them. Applying a change costs O(log n);
/// the list behind [`instances`](Self::instances) and the pickers is
/// rebuilt from pointers (no instance is copied) on the first such read
/// after a change, so changes that nobody reads in between cost nothing
/// more. [`get`](Self::get) and [`revision`](Self::revision) never rebuild it.
///
/// ```no_run
/// use etcd_registry::Strategy;
///
/// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
/// let web = registry.cache("web").await?;
/// if let Some(instance) = web.pick_with(Strategy::Weighted) {
///     println!("calling {}", instance.endpoint());
/// }
/// loop {
///     web.changed().await?;
///     println!("web now has {} instances", web.instances().len());
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct ServiceCache {
    shared: Arc<Shared>,
}

/// The state of one cache, shared by its handles.
pub(crate) struct Shared {
    /// Written by the feeding task only, for as long as it applies one batch;
    /// read for a lookup or (once per change) to build the view.
    store: RwLock<Store>,
    version: watch::Sender<Version>,
    turn: AtomicUsize,
    errors: Arc<std::sync::atomic::AtomicU64>,
    /// Set when etcd's RBAC refused the watch behind the cache.
    denied: Arc<std::sync::OnceLock<(&'static str, String)>>,
    service: Option<String>,
    /// The registry's namespace: the `namespace` label of the cache's metrics.
    namespace: String,
    /// Stops the feeding task when the last handle goes; the task owns the
    /// watch, so that drops the etcd watch stream.
    _stop: DropGuard,
}

/// The instances of a cache, by service name and then by id.
#[derive(Default)]
struct Store {
    services: BTreeMap<String, BTreeSet<ById>>,
    len: usize,
    /// The etcd revision the store reflects.
    revision: i64,
    /// The flat view of `services`: built by the first reader that needs it
    /// after a change, dropped by the next change.
    view: OnceLock<Arc<View>>,
}

/// An instance ordered, compared and looked up by its id alone, so that a
/// service's set is searchable by `&str` without a second copy of each id.
struct ById(Arc<ServiceInstance>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

impl Store {
    /// Inserts or replaces; true when the instances changed.
    fn put(&mut self, instance: Arc<ServiceInstance>) -> bool {
        let ids = match self.services.get_mut(&instance.name) {
            Some(ids) => ids,
            None => self.services.entry(instance.name.clone()).or_default(),
        };
        // The watch sends a changed instance only, and shares an unchanged
        // one, so equal values are the same `Arc`; compared by value anyway.
        if ids
            .get(instance.id.as_str())
            .is_some_and(|old| Arc::ptr_eq(&old.0, &instance) || *old.0 == *instance)
        {
            return false;
        }
        if ids.replace(ById(instance)).is_none() {
            self.len += 1;
        }
        true
    }

    /// Removes; true when the instance was there.
    fn remove(&mut self, instance: &ServiceInstance) -> bool {
        let Some(ids) = self.services.get_mut(&instance.name) else {
            return false;
        };
        let removed = ids.remove(instance.id.as_str());
        if ids.is_empty() {
            self.services.remove(&instance.name);
        }
        self.len -= usize::from(removed);
        removed
    }

    /// Applies events; true when the instances changed.
    fn apply(&mut self, events: Vec<FeedEvent>) -> bool {
        let mut changed = false;
        for event in events {
            changed |= match event {
                FeedEvent::Snapshot(all) => {
                    let had = self.len > 0;
                    self.services.clear();
                    self.len = 0;
                    let mut changed = had;
                    for instance in all {
                        changed |= self.put(instance);
                    }
                    changed
                }
                FeedEvent::Added(i) | FeedEvent::Updated(i) => self.put(i),
                FeedEvent::Removed(i) => self.remove(&i),
            };
        }
        if changed {
            self.view = OnceLock::new();
        }
        changed
    }

    /// The view of the current instances, built if a change dropped it.
    fn view(&self) -> Arc<View> {
        self.view
            .get_or_init(|| {
                let mut instances = Vec::with_capacity(self.len);
                for ids in self.services.values() {
                    instances.extend(ids.iter().map(|i| i.0.clone()));
                }
                Arc::new(View {
                    instances,
                    cumulative: OnceLock::new(),
                })
            })
            .clone()
    }

    /// The first instance with this id, in (name, id) order.
    fn get(&self, id: &str) -> Option<Arc<ServiceInstance>> {
        self.services
            .values()
            .find_map(|ids| ids.get(id))
            .map(|i| i.0.clone())
    }
}

/// An immutable, flat list of the cache's instances at one moment.
#[derive(Default)]
struct View {
    /// Sorted by service name, then id.
    instances: Vec<Arc<ServiceInstance>>,
    /// Running totals of the effective weights: built on the first weighted
    /// pick, so a cache nobody picks from by weight never pays for it.
    cumulative: OnceLock<Vec<u64>>,
}

impl View {
    fn cumulative(&self) -> &[u64] {
        self.cumulative.get_or_init(|| {
            let mut total = 0u64;
            self.instances
                .iter()
                .map(|i| {
                    total = total.saturating_add(effective_weight(i.weight));
                    total
                })
                .collect()
        })
    }
}

/// The instances of a [`ServiceCache`] at one moment, sorted by service name
/// then id: what [`ServiceCache::instances`] returns.
///
/// Cheap to clone (one `Arc`) and immutable: later changes to the cache do
/// not alter it. It holds the cache's own instances, not copies: iterating
/// yields `&ServiceInstance`, and [`as_slice`](Self::as_slice) gives the
/// shared `Arc`s to keep some without copying them.
///
/// ```no_run
/// # fn demo(cache: etcd_registry::ServiceCache) {
/// let instances = cache.instances();
/// for instance in &instances {
///     println!("{} at {}", instance.id, instance.endpoint());
/// }
/// let owned: Vec<etcd_registry::ServiceInstance> = instances.to_vec();
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Instances {
    view: Arc<View>,
}

impl Instances {
    /// How many instances there are.
    pub fn len(&self) -> usize {
        self.view.instances.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.view.instances.is_empty()
    }

    /// The instances, in order.
    pub fn iter(&self) -> InstancesIter<'_> {
        InstancesIter(self.view.instances.iter())
    }

    /// The instance at `index`, if any.
    pub fn get(&self, index: usize) -> Option<&ServiceInstance> {
        self.view.instances.get(index).map(|i| &**i)
    }

    /// Whether an instance equal to `instance` (every field) is present.
    pub fn contains(&self, instance: &ServiceInstance) -> bool {
        self.iter().any(|i| i == instance)
    }

    /// The shared instances themselves, in order.
    pub fn as_slice(&self) -> &[Arc<ServiceInstance>] {
        &self.view.instances
    }

    /// Owned copies of the instances, in order.
    pub fn to_vec(&self) -> Vec<ServiceInstance> {
        self.iter().cloned().collect()
    }
}

impl std::ops::Index<usize> for Instances {
    type Output = ServiceInstance;

    fn index(&self, index: usize) -> &ServiceInstance {
        &self.view.instances[index]
    }
}

impl<'a> IntoIterator for &'a Instances {
    type Item = &'a ServiceInstance;
    type IntoIter = InstancesIter<'a>;

    fn into_iter(self) -> InstancesIter<'a> {
        self.iter()
    }
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// An iterator over [`Instances`], yielding `&ServiceInstance` in order.
#[derive(Clone, Debug)]
pub struct InstancesIter<'a>(std::slice::Iter<'a, Arc<ServiceInstance>>);

impl<'a> Iterator for InstancesIter<'a> {
    type Item = &'a ServiceInstance;

    fn next(&mut self) -> Option<&'a ServiceInstance> {
        self.0.next().map(|i| &**i)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for InstancesIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|i| &**i)
    }
}

impl ExactSizeIterator for InstancesIter<'_> {}

impl std::iter::FusedIterator for InstancesIter<'_> {}

/// Weights below 1 count as 1.
fn effective_weight(weight: i64) -> u64 {
    u64::try_from(weight).unwrap_or(0).max(1)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Version {
    /// How many times the instances changed.
    pub(crate) changes: u64,
    /// The first snapshot has been applied.
    pub(crate) ready: bool,
    /// The watch ended (the registry closed).
    pub(crate) closed: bool,
    /// How many publications included a change from a re-list (a wiped or
    /// restored etcd, a compaction, a cluster change) rather than from
    /// etcd's events: its removals may be instances about to re-register.
    /// A count, not a flag, so that a reader that skipped publications (they
    /// coalesce in the watch channel) still learns that a re-list happened
    /// since it last looked, whatever was published after it.
    pub(crate) relists: u64,
}

impl Version {
    /// Publishes a change into `self`; true when anything changed.
    fn publish(&mut self, changed: bool, relisted: bool) -> bool {
        let before = *self;
        self.ready = true;
        if changed {
            self.changes += 1;
            self.relists += u64::from(relisted);
        }
        *self != before
    }
}

impl ServiceCache {
    /// The cache of service `name` (`None`: the whole namespace), shared
    /// through `caches` with every live cache of it; resolved once the
    /// first snapshot is applied.
    pub(crate) async fn open(core: &Core, caches: &Caches, service: Option<&str>) -> Result<Self> {
        let _timer = crate::metrics::timer(core.namespace(), "cache");
        if let Some(name) = service {
            validate_segment("name", name)?;
        }
        let service = service.map(str::to_owned);
        let shared = {
            let mut caches = caches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            caches.retain(|_, weak| weak.strong_count() > 0);
            match caches.get(&service).and_then(Weak::upgrade) {
                Some(shared) => shared,
                None => {
                    let shared = Shared::start(core, service.clone())?;
                    caches.insert(service, Arc::downgrade(&shared));
                    shared
                }
            }
        };
        Self::ready(core, shared).await
    }

    /// A cache fed by `feed` alone (not shared), labelled `label`;
    /// resolved once the first snapshot is applied.
    pub(crate) async fn open_feed(core: &Core, feed: Feed, label: String) -> Result<Self> {
        let _timer = crate::metrics::timer(core.namespace(), "cache");
        Self::ready(core, Shared::with_feed(core, feed, Some(label))).await
    }

    /// Resolves once `shared` applied its first snapshot.
    async fn ready(core: &Core, shared: Arc<Shared>) -> Result<Self> {
        let mut version = shared.version.subscribe();
        let ready = tokio::select! {
            _ = core.cancel.cancelled() => return Err(Error::Closed),
            v = version.wait_for(|v| v.ready || v.closed) => v.map(|v| v.ready),
        };
        match ready {
            Ok(true) => Ok(Self { shared }),
            _ => Err(crate::watch::denied_error(&shared.denied).unwrap_or(Error::Closed)),
        }
    }

    fn store(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.shared
            .store
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current view. The read lock is held only to clone an `Arc`, or,
    /// on the first read after a change, to build the view from pointers.
    fn view(&self) -> Arc<View> {
        self.store().view()
    }

    /// Every instance, sorted by service name then id. Answers from memory
    /// with a shared snapshot: later changes do not alter what it returned.
    /// The instances are the cache's own (see [`Instances`]), not copies.
    pub fn instances(&self) -> Instances {
        Instances { view: self.view() }
    }

    /// The instance with this id, if present. In a whole-namespace cache,
    /// where ids are unique only within a service, the first match in
    /// (name, id) order. O(log n) per service searched.
    ///
    /// Returns the cache's own instance, shared: no copy is made.
    pub fn get(&self, id: &str) -> Option<Arc<ServiceInstance>> {
        self.store().get(id)
    }

    /// Picks an instance round-robin; `None` when there is none.
    /// Same as `pick_with(Strategy::RoundRobin)`.
    pub fn pick(&self) -> Option<Arc<ServiceInstance>> {
        self.pick_with(Strategy::RoundRobin)
    }

    /// Picks an instance with `strategy`; `None` when there is none.
    ///
    /// Returns the cache's own instance, shared: no copy is made.
    ///
    /// ```no_run
    /// # fn demo(cache: etcd_registry::ServiceCache) {
    /// use etcd_registry::Strategy;
    /// let target = cache.pick_with(Strategy::Random).map(|i| i.endpoint());
    /// # }
    /// ```
    pub fn pick_with(&self, strategy: Strategy) -> Option<Arc<ServiceInstance>> {
        let view = self.view();
        let n = view.instances.len();
        if n == 0 {
            return None;
        }
        let i = match strategy {
            Strategy::RoundRobin => self.shared.turn.fetch_add(1, Ordering::Relaxed) % n,
            Strategy::Random => rand::rng().random_range(0..n),
            Strategy::Weighted => {
                let cumulative = view.cumulative();
                let total = cumulative.last().copied().unwrap_or(0);
                let ticket = rand::rng().random_range(0..total.max(1));
                cumulative.partition_point(|&c| c <= ticket).min(n - 1)
            }
        };
        Some(view.instances[i].clone())
    }

    /// Resolves on the next change of the instances (not on writes that left
    /// them unchanged). Fails with [`Error::Closed`] once the registry is
    /// closed and the cache will not change any more.
    ///
    /// Cancel safe: a change that happens while no call is waiting is not
    /// remembered; compare [`revision`](Self::revision) or
    /// [`instances`](Self::instances) to catch up.
    pub async fn changed(&self) -> Result<()> {
        let mut version = self.shared.version.subscribe();
        let start = version.borrow_and_update().changes;
        match version.wait_for(|v| v.changes != start || v.closed).await {
            Ok(v) if v.changes != start => Ok(()),
            _ => Err(Error::Closed),
        }
    }

    /// Whether the cache stopped following etcd: its registry was closed or
    /// dropped (or etcd's RBAC refused the watch; see
    /// [`error`](Self::error)). A closed cache keeps its last instances,
    /// and [`changed`](Self::changed) returns [`Error::Closed`] at once.
    pub fn is_closed(&self) -> bool {
        self.shared.version.borrow().closed
    }

    /// Why the cache stopped, when etcd's RBAC refused its watch:
    /// [`Error::PermissionDenied`]. `None` otherwise.
    pub fn error(&self) -> Option<Error> {
        crate::watch::denied_error(&self.shared.denied)
    }

    /// The etcd revision the cache reflects (see
    /// [`ServiceWatch::revision`](crate::ServiceWatch::revision)).
    pub fn revision(&self) -> i64 {
        self.store().revision
    }

    /// How many recoverable errors the shared watch has met and recovered
    /// from (see [`ServiceWatch::errors`](crate::ServiceWatch::errors)).
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    /// A receiver of the cache's change counter, for adapters.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn versions(&self) -> watch::Receiver<Version> {
        self.shared.version.subscribe()
    }

    /// Whether this caches the whole namespace.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn is_namespace(&self) -> bool {
        self.shared.service.is_none()
    }
}

impl std::fmt::Debug for ServiceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (len, revision) = {
            let store = self.store();
            (store.len, store.revision)
        };
        f.debug_struct("ServiceCache")
            .field("service", &self.shared.service.as_deref().unwrap_or("*"))
            .field("instances", &len)
            .field("revision", &revision)
            .finish()
    }
}

impl Shared {
    fn start(core: &Core, service: Option<String>) -> Result<Arc<Self>> {
        let feed = Feed::start(core, service.as_deref())?;
        Ok(Self::with_feed(core, feed, service))
    }

    /// A cache fed by `feed`; `service` names it in metrics and logs.
    fn with_feed(core: &Core, feed: Feed, service: Option<String>) -> Arc<Self> {
        let stop = CancellationToken::new();
        crate::metrics::track_cache_staleness(
            core.namespace(),
            service.as_deref().unwrap_or("*"),
            &feed.heard,
            &stop,
            &core.cancel,
        );
        let shared = Arc::new(Shared {
            store: RwLock::new(Store::default()),
            version: watch::Sender::new(Version::default()),
            turn: AtomicUsize::new(0),
            errors: feed.errors.clone(),
            denied: feed.denied.clone(),
            service,
            namespace: core.namespace().to_owned(),
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(feed_cache(Arc::downgrade(&shared), feed, stop));
        shared
    }

    /// Applies one batch under the write lock; true when the instances
    /// changed. The lock is held for O(changes × log n): the first batch,
    /// the whole snapshot, is applied before any handle can read.
    fn apply(&self, batch: Batch) -> bool {
        let mut store = self
            .store
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        store.revision = batch.revision;
        let changed = store.apply(batch.events);
        crate::metrics::cache_instances(
            &self.namespace,
            self.service.as_deref().unwrap_or("*"),
            store.len,
        );
        changed
    }

    /// Publishes a change; `relisted` when any batch applied since the last
    /// publication came from a re-list.
    fn publish(&self, changed: bool, relisted: bool) {
        self.version
            .send_if_modified(|v| v.publish(changed, relisted));
    }
}

/// The cache's single writer: applies the watch's batches and publishes.
async fn feed_cache(shared: Weak<Shared>, mut feed: Feed, stop: CancellationToken) {
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            b = feed.rx.recv() => b,
        };
        let Some(batch) = batch else { break };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut relisted = batch.relisted;
        let mut changed = shared.apply(batch);
        // Wake the waiters once for everything already waiting; the lock is
        // released between batches, so readers are never held up for long.
        while let Ok(batch) = feed.rx.try_recv() {
            relisted |= batch.relisted;
            changed |= shared.apply(batch);
        }
        shared.publish(changed, relisted);
    }
    if let Some(shared) = shared.upgrade() {
        shared.version.send_modify(|v| v.closed = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relist_is_seen_by_a_reader_that_missed_its_publication() {
        let (tx, mut rx) = watch::channel(Version::default());
        rx.borrow_and_update();
        let seen = rx.borrow().relists;
        // A re-list's batch, then a normal one, both published before the
        // reader looks: the watch channel keeps only the last value.
        tx.send_if_modified(|v| v.publish(true, true));
        tx.send_if_modified(|v| v.publish(true, false));
        let version = *rx.borrow_and_update();
        assert_eq!(version.changes, 2);
        assert_ne!(version.relists, seen, "the re-list was lost");
        // Nothing since: a reader that caught up sees no re-list.
        tx.send_if_modified(|v| v.publish(true, false));
        assert_eq!(rx.borrow_and_update().relists, version.relists);
        // A re-list that changed nothing is no news.
        assert!(!tx.send_if_modified(|v| v.publish(false, true)));
    }

    #[test]
    fn weights_below_one_count_as_one() {
        assert_eq!(effective_weight(0), 1);
        assert_eq!(effective_weight(-5), 1);
        assert_eq!(effective_weight(7), 7);
    }

    fn shared(name: &str, id: &str, weight: i64) -> Arc<ServiceInstance> {
        Arc::new(ServiceInstance::new(name, id, "h", 1).with_weight(weight))
    }

    #[test]
    fn store_orders_by_name_then_id_and_finds_the_first_id() {
        let mut store = Store::default();
        let changed = store.apply(vec![FeedEvent::Snapshot(vec![
            shared("b", "x", 0),
            shared("a", "x", 3),
            shared("b", "y", 2),
        ])]);
        assert!(changed);
        let view = store.view();
        let keys: Vec<_> = view
            .instances
            .iter()
            .map(|i| (i.name.as_str(), i.id.as_str()))
            .collect();
        assert_eq!(keys, [("a", "x"), ("b", "x"), ("b", "y")]);
        assert_eq!(view.cumulative(), [3, 4, 6]);
        assert_eq!(store.get("x").map(|i| i.name.clone()).as_deref(), Some("a"));
        assert_eq!(store.len, 3);
    }

    #[test]
    fn a_change_drops_the_view_and_an_unchanged_write_keeps_it() {
        let mut store = Store::default();
        let a = shared("a", "x", 1);
        store.apply(vec![FeedEvent::Snapshot(vec![a.clone()])]);
        let first = store.view();
        // Equal in value (another `Arc`): not a change.
        assert!(!store.apply(vec![FeedEvent::Updated(shared("a", "x", 1))]));
        assert!(Arc::ptr_eq(&first, &store.view()));
        assert!(Arc::ptr_eq(&store.get("x").expect("x"), &a));
        assert!(store.apply(vec![FeedEvent::Updated(shared("a", "x", 2))]));
        let second = store.view();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.instances[0].weight, 2);
        // A view handed out earlier is not altered.
        assert_eq!(first.instances[0].weight, 1);
        assert!(store.apply(vec![FeedEvent::Removed(shared("a", "x", 2))]));
        assert!(!store.apply(vec![FeedEvent::Removed(shared("a", "x", 2))]));
        assert!(store.view().instances.is_empty());
        assert!(store.services.is_empty());
        assert_eq!(store.len, 0);
    }
}
