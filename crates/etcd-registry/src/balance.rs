//! (feature `tower`) [`ServiceDiscover`]: a [`ServiceCache`] as a
//! [`tower::discover::Discover`] stream of [`Change`]s.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::stream::BoxStream;
use tower::discover::Change;

use crate::cache::{Instances, ServiceCache};
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
/// step with the cache. What was emitted is kept as the cache's own shared
/// [`Instances`](crate::Instances), not as a copy; the comparison walks
/// pointers, and only changed instances are cloned into [`Change`]s. The
/// stream ends when the registry is closed.
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
    /// The cache's instances as last emitted: a shared view, not a copy.
    emitted: Instances,
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
    ///
    /// Both are sorted by (name, id), so one merge walk finds the changes;
    /// instances the cache did not change are the same `Arc` in both and
    /// cost a pointer comparison. Only changed instances are copied.
    fn catch_up(&mut self) {
        let current = self.cache.instances();
        let (old, new) = (self.emitted.as_slice(), current.as_slice());
        let (mut i, mut j) = (0, 0);
        let mut inserted = Vec::new();
        loop {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => (i, j) = (i + 1, j + 1),
                (Some(a), Some(b)) => match (&a.name, &a.id).cmp(&(&b.name, &b.id)) {
                    Ordering::Less => {
                        self.pending.push_back(Change::Remove(self.key(a)));
                        i += 1;
                    }
                    Ordering::Greater => {
                        inserted.push(b);
                        j += 1;
                    }
                    Ordering::Equal => {
                        if a != b {
                            inserted.push(b);
                        }
                        (i, j) = (i + 1, j + 1);
                    }
                },
                (Some(a), None) => {
                    self.pending.push_back(Change::Remove(self.key(a)));
                    i += 1;
                }
                (None, Some(b)) => {
                    inserted.push(b);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        // Removals first, then insertions, as the stream always sent them.
        for b in inserted {
            self.pending
                .push_back(Change::Insert(self.key(b), ServiceInstance::clone(b)));
        }
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
            emitted: Instances::default(),
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
