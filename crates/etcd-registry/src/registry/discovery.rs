//! Discovery: lists, watches and caches of services.

use super::Registry;
use crate::cache::ServiceCache;
use crate::error::Result;
use crate::watch::ServiceWatch;

impl Registry {
    /// Watches service `name`: a [`ServiceEvent::Snapshot`](crate::ServiceEvent::Snapshot) of its instances,
    /// then every change. See [`ServiceWatch`] for the guarantees.
    ///
    /// Must be called within a Tokio runtime: it spawns the watch task.
    /// Fails with [`Error::InvalidInput`](crate::Error::InvalidInput) for an invalid name and with
    /// [`Error::Closed`](crate::Error::Closed) after [`Registry::close`]; every later problem is
    /// retried, not returned.
    pub fn watch(&self, name: &str) -> Result<ServiceWatch> {
        ServiceWatch::start(self.core(), Some(name))
    }

    /// Watches every service of the namespace. Like [`Registry::watch`];
    /// events carry instances of any service (tell them apart by `name`).
    pub fn watch_all(&self) -> Result<ServiceWatch> {
        ServiceWatch::start(self.core(), None)
    }

    /// A cache of service `name`, resolved once the first snapshot is applied.
    ///
    /// Shares the watch of any live cache of the same service from this
    /// registry. Until the first snapshot can be read it keeps retrying (see
    /// [`ServiceWatch`](crate::ServiceWatch)); wrap the call in a timeout to
    /// bound the wait. Fails with [`Error::InvalidInput`](crate::Error::InvalidInput) for an invalid name
    /// with [`Error::PermissionDenied`](crate::Error::PermissionDenied) when etcd's RBAC refuses this user
    /// the service's keys, and with [`Error::Closed`](crate::Error::Closed) once the registry is closed.
    ///
    /// Cancel safety: dropping the future loses nothing; the shared watch
    /// stops if no other handle holds it.
    pub async fn cache(&self, name: &str) -> Result<ServiceCache> {
        ServiceCache::open(self.core(), &self.inner.caches, Some(name)).await
    }

    /// A cache of every service of the namespace. Like [`Registry::cache`].
    pub async fn cache_all(&self) -> Result<ServiceCache> {
        ServiceCache::open(self.core(), &self.inner.caches, None).await
    }
}
