//! [`ServiceCache`]: a watch-fed local view of a service, with pickers and
//! change notification.
//!
//! One task (the single writer) applies the batches of one watch to a map and
//! publishes an immutable [`View`] after each; readers clone an `Arc` of the
//! current view under a lock held only for that clone.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};

use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, Result};
use crate::instance::ServiceInstance;
use crate::keys::validate_segment;
use crate::registry::{Inner, Registry};
use crate::watch::{Feed, ServiceEvent};

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
/// Create one with [`Registry::cache`] or [`Registry::cache_all`]. It is
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
    view: RwLock<Arc<View>>,
    version: watch::Sender<Version>,
    turn: AtomicUsize,
    errors: Arc<std::sync::atomic::AtomicU64>,
    /// Set when etcd's RBAC refused the watch behind the cache.
    denied: Arc<std::sync::OnceLock<(&'static str, String)>>,
    service: Option<String>,
    /// Stops the feeding task when the last handle goes; the task owns the
    /// watch, so that drops the etcd watch stream.
    _stop: DropGuard,
}

/// An immutable snapshot of the cache.
#[derive(Default)]
struct View {
    instances: Arc<[ServiceInstance]>,
    /// Index of the first instance with each id.
    by_id: HashMap<String, usize>,
    /// Running totals of the effective weights, for weighted picks.
    cumulative: Vec<u64>,
    revision: i64,
}

impl View {
    fn new(map: &BTreeMap<(String, String), ServiceInstance>, revision: i64) -> Self {
        let instances: Arc<[ServiceInstance]> = map.values().cloned().collect();
        let mut by_id = HashMap::with_capacity(instances.len());
        let mut cumulative = Vec::with_capacity(instances.len());
        let mut total = 0u64;
        for (i, instance) in instances.iter().enumerate() {
            by_id.entry(instance.id.clone()).or_insert(i);
            total = total.saturating_add(effective_weight(instance.weight));
            cumulative.push(total);
        }
        Self {
            instances,
            by_id,
            cumulative,
            revision,
        }
    }
}

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
}

impl Registry {
    /// A cache of service `name`, resolved once the first snapshot is applied.
    ///
    /// Shares the watch of any live cache of the same service from this
    /// registry. Until the first snapshot can be read it keeps retrying (see
    /// [`ServiceWatch`](crate::ServiceWatch)); wrap the call in a timeout to
    /// bound the wait. Fails with [`Error::InvalidInput`] for an invalid name
    /// with [`Error::PermissionDenied`] when etcd's RBAC refuses this user
    /// the service's keys, and with [`Error::Closed`] once the registry is closed.
    ///
    /// Cancel safety: dropping the future loses nothing; the shared watch
    /// stops if no other handle holds it.
    pub async fn cache(&self, name: &str) -> Result<ServiceCache> {
        validate_segment("name", name)?;
        ServiceCache::open(&self.inner, Some(name.to_owned())).await
    }

    /// A cache of every service of the namespace. Like [`Registry::cache`].
    pub async fn cache_all(&self) -> Result<ServiceCache> {
        ServiceCache::open(&self.inner, None).await
    }
}

impl ServiceCache {
    async fn open(inner: &Arc<Inner>, service: Option<String>) -> Result<Self> {
        let shared = {
            let mut caches = inner
                .caches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            caches.retain(|_, weak| weak.strong_count() > 0);
            match caches.get(&service).and_then(Weak::upgrade) {
                Some(shared) => shared,
                None => {
                    let shared = Shared::start(inner, service.clone())?;
                    caches.insert(service, Arc::downgrade(&shared));
                    shared
                }
            }
        };
        let mut version = shared.version.subscribe();
        let ready = tokio::select! {
            _ = inner.cancel.cancelled() => return Err(Error::Closed),
            v = version.wait_for(|v| v.ready || v.closed) => v.map(|v| v.ready),
        };
        match ready {
            Ok(true) => Ok(Self { shared }),
            _ => Err(crate::watch::denied_error(&shared.denied).unwrap_or(Error::Closed)),
        }
    }

    fn view(&self) -> Arc<View> {
        self.shared
            .view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every instance, sorted by service name then id. Answers from memory
    /// with a shared snapshot: later changes do not alter the returned slice.
    pub fn instances(&self) -> Arc<[ServiceInstance]> {
        self.view().instances.clone()
    }

    /// The instance with this id, if present. In a whole-namespace cache,
    /// where ids are unique only within a service, the first match in
    /// (name, id) order.
    pub fn get(&self, id: &str) -> Option<ServiceInstance> {
        let view = self.view();
        view.by_id.get(id).map(|&i| view.instances[i].clone())
    }

    /// Picks an instance round-robin; `None` when there is none.
    /// Same as `pick_with(Strategy::RoundRobin)`.
    pub fn pick(&self) -> Option<ServiceInstance> {
        self.pick_with(Strategy::RoundRobin)
    }

    /// Picks an instance with `strategy`; `None` when there is none.
    ///
    /// ```no_run
    /// # fn demo(cache: etcd_registry::ServiceCache) {
    /// use etcd_registry::Strategy;
    /// let target = cache.pick_with(Strategy::Random).map(|i| i.endpoint());
    /// # }
    /// ```
    pub fn pick_with(&self, strategy: Strategy) -> Option<ServiceInstance> {
        let view = self.view();
        let n = view.instances.len();
        if n == 0 {
            return None;
        }
        let i = match strategy {
            Strategy::RoundRobin => self.shared.turn.fetch_add(1, Ordering::Relaxed) % n,
            Strategy::Random => rand::rng().random_range(0..n),
            Strategy::Weighted => {
                let total = view.cumulative.last().copied().unwrap_or(0);
                let ticket = rand::rng().random_range(0..total.max(1));
                view.cumulative.partition_point(|&c| c <= ticket).min(n - 1)
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

    /// The etcd revision the cache reflects (see
    /// [`ServiceWatch::revision`](crate::ServiceWatch::revision)).
    pub fn revision(&self) -> i64 {
        self.view().revision
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
        let view = self.view();
        f.debug_struct("ServiceCache")
            .field("service", &self.shared.service.as_deref().unwrap_or("*"))
            .field("instances", &view.instances.len())
            .field("revision", &view.revision)
            .finish()
    }
}

impl Shared {
    fn start(inner: &Arc<Inner>, service: Option<String>) -> Result<Arc<Self>> {
        let feed = Feed::start(inner, service.as_deref())?;
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            view: RwLock::new(Arc::new(View::default())),
            version: watch::Sender::new(Version::default()),
            turn: AtomicUsize::new(0),
            errors: feed.errors.clone(),
            denied: feed.denied.clone(),
            service,
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(feed_cache(Arc::downgrade(&shared), feed, stop));
        Ok(shared)
    }

    fn publish(&self, view: View, changed: bool) {
        *self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(view);
        self.version.send_if_modified(|v| {
            let before = *v;
            v.ready = true;
            if changed {
                v.changes += 1;
            }
            *v != before
        });
    }
}

/// The cache's single writer: applies the watch's batches and publishes.
async fn feed_cache(shared: Weak<Shared>, mut feed: Feed, stop: CancellationToken) {
    let mut map: BTreeMap<(String, String), ServiceInstance> = BTreeMap::new();
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            b = feed.rx.recv() => b,
        };
        let Some(batch) = batch else { break };
        let mut revision = batch.revision;
        let mut changed = apply(&mut map, batch.events);
        // Publish once for everything already waiting.
        while let Ok(batch) = feed.rx.try_recv() {
            revision = batch.revision;
            changed |= apply(&mut map, batch.events);
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.publish(View::new(&map, revision), changed);
    }
    if let Some(shared) = shared.upgrade() {
        shared.version.send_modify(|v| v.closed = true);
    }
}

/// Applies events; true when the instances changed.
fn apply(map: &mut BTreeMap<(String, String), ServiceInstance>, events: Vec<ServiceEvent>) -> bool {
    let mut changed = false;
    for event in events {
        match event {
            ServiceEvent::Snapshot(all) => {
                let fresh: BTreeMap<_, _> = all
                    .into_iter()
                    .map(|i| ((i.name.clone(), i.id.clone()), i))
                    .collect();
                changed |= fresh != *map;
                *map = fresh;
            }
            ServiceEvent::Added(i) | ServiceEvent::Updated(i) => {
                let key = (i.name.clone(), i.id.clone());
                changed |= map.insert(key, i.clone()).as_ref() != Some(&i);
            }
            ServiceEvent::Removed(i) => {
                changed |= map.remove(&(i.name, i.id)).is_some();
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_below_one_count_as_one() {
        assert_eq!(effective_weight(0), 1);
        assert_eq!(effective_weight(-5), 1);
        assert_eq!(effective_weight(7), 7);
    }

    #[test]
    fn view_indexes_first_id_and_running_weights() {
        let mut map = BTreeMap::new();
        for (name, id, w) in [("a", "x", 3), ("b", "x", 0), ("b", "y", 2)] {
            map.insert(
                (name.to_owned(), id.to_owned()),
                ServiceInstance::new(name, id, "h", 1).with_weight(w),
            );
        }
        let view = View::new(&map, 9);
        assert_eq!(view.cumulative, vec![3, 4, 6]);
        assert_eq!(view.by_id["x"], 0);
        assert_eq!(view.revision, 9);
    }
}
