//! (feature `tower`) [`ServiceDiscover`]: a [`ServiceCache`] as a
//! [`tower::discover::Discover`] stream of [`Change`]s.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use futures::stream::BoxStream;
use tower::discover::Change;

use crate::cache::ServiceCache;
use crate::instance::ServiceInstance;

/// The changes of a [`ServiceCache`] as a stream of
/// `Result<Change<String, ServiceInstance>, Infallible>`, which implements
/// [`tower::discover::Discover`].
///
/// Created by [`ServiceCache::discover`]. The first items insert every
/// instance present; then each addition is a [`Change::Insert`], each update
/// a [`Change::Insert`] of the new value under the same key (replacing the
/// old one), and each removal a [`Change::Remove`]. Keys are instance ids; in
/// a whole-namespace cache, where ids are unique only within a service, they
/// are `name/id`.
///
/// Each poll compares the cache's current instances with what was already
/// emitted, so a slow consumer skips intermediate states but always ends in
/// step with the cache. The stream ends when the registry is closed.
///
/// ```no_run
/// use futures::StreamExt;
/// use tower::discover::Change;
///
/// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
/// let cache = registry.cache("grpc-api").await?;
/// let mut changes = cache.discover();
/// while let Some(Ok(change)) = changes.next().await {
///     match change {
///         Change::Insert(id, instance) => println!("+ {id} at {}", instance.endpoint()),
///         Change::Remove(id) => println!("- {id}"),
///     }
/// }
/// # Ok(()) }
/// ```
pub struct ServiceDiscover {
    inner: BoxStream<'static, Result<Change<String, ServiceInstance>, Infallible>>,
}

impl Stream for ServiceDiscover {
    type Item = Result<Change<String, ServiceInstance>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for ServiceDiscover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceDiscover").finish_non_exhaustive()
    }
}

struct DiscoverState {
    cache: ServiceCache,
    versions: tokio::sync::watch::Receiver<crate::cache::Version>,
    emitted: HashMap<String, ServiceInstance>,
    pending: VecDeque<Change<String, ServiceInstance>>,
}

impl DiscoverState {
    fn key(&self, instance: &ServiceInstance) -> String {
        if self.cache.is_namespace() {
            format!("{}/{}", instance.name, instance.id)
        } else {
            instance.id.clone()
        }
    }

    /// Queues the changes from what was emitted to the cache's current view.
    fn catch_up(&mut self) {
        let current: HashMap<String, ServiceInstance> = self
            .cache
            .instances()
            .iter()
            .map(|i| (self.key(i), i.clone()))
            .collect();
        let mut removed: Vec<&String> = self
            .emitted
            .keys()
            .filter(|k| !current.contains_key(*k))
            .collect();
        removed.sort();
        self.pending
            .extend(removed.into_iter().map(|k| Change::Remove(k.clone())));
        let mut inserted: Vec<(&String, &ServiceInstance)> = current
            .iter()
            .filter(|(k, i)| self.emitted.get(*k) != Some(*i))
            .collect();
        inserted.sort_by(|a, b| a.0.cmp(b.0));
        self.pending.extend(
            inserted
                .into_iter()
                .map(|(k, i)| Change::Insert(k.clone(), i.clone())),
        );
        self.emitted = current;
    }
}

impl ServiceCache {
    /// This cache as a [`tower::discover::Discover`] stream (feature `tower`).
    /// See [`ServiceDiscover`].
    pub fn discover(&self) -> ServiceDiscover {
        let state = DiscoverState {
            cache: self.clone(),
            versions: self.versions(),
            emitted: HashMap::new(),
            pending: VecDeque::new(),
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(change) = state.pending.pop_front() {
                    return Some((Ok(change), state));
                }
                // Mark the version seen before reading, so that a change made
                // after the read wakes the wait below.
                if state.versions.borrow_and_update().closed {
                    return None;
                }
                state.catch_up();
                if state.pending.is_empty() && state.versions.changed().await.is_err() {
                    return None;
                }
            }
        });
        ServiceDiscover {
            inner: Box::pin(stream),
        }
    }
}
