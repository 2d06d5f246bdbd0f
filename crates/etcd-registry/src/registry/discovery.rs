//! Discovery: lists, watches and caches of services.

use super::Registry;
use crate::cache::ServiceCache;
use crate::core::Core;
use crate::error::Result;
use crate::instance::ServiceInstance;
use crate::watch::{Feed, ServiceWatch};

/// The watch task of gRPC naming `target`: the keys under `{target}/`,
/// read as Go's endpoint values ([`crate::naming`]).
fn grpc_naming_feed(core: &Core, target: &str) -> Result<Feed> {
    core.check_open()?;
    crate::naming::validate_target(target)?;
    let prefix = crate::naming::naming_prefix(target);
    let label = format!("grpc:{target}");
    Ok(Feed::spawn(core, prefix, label, Some(target.to_owned())))
}

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

    /// Every endpoint under gRPC naming `target` (`{target}/…`, as etcd's Go
    /// `naming/endpoints` manager writes them: see [`crate::naming`]), as one
    /// consistent snapshot paged like [`Registry::instances`], in key order.
    /// An endpoint is an instance with `name` = target and `id` = its `Addr`;
    /// values that are not endpoints are skipped with a warning.
    ///
    /// Fails with [`Error::InvalidInput`](crate::Error::InvalidInput) for an
    /// invalid target (field `target`).
    pub async fn grpc_naming_instances(&self, target: &str) -> Result<Vec<ServiceInstance>> {
        let _timer = crate::metrics::timer(self.core().namespace(), "list");
        crate::naming::validate_target(target)?;
        self.core().check_open()?;
        let prefix = crate::naming::naming_prefix(target);
        let read = self
            .core()
            .conn
            .read_prefixes("get", &[prefix], false, Vec::new, |all, kvs| {
                all.extend(
                    kvs.iter()
                        .filter_map(|kv| crate::naming::from_kv(target, kv.key(), kv.value())),
                );
            })
            .await?;
        Ok(read.value)
    }

    /// Watches the endpoints under gRPC naming `target`, Go-written ones
    /// included: like [`Registry::watch`], with instances as
    /// [`Registry::grpc_naming_instances`] reads them. An id (`Addr`) under
    /// two keys is one instance: the later write wins, and removing either
    /// key removes it.
    pub fn watch_grpc_naming(&self, target: &str) -> Result<ServiceWatch> {
        grpc_naming_feed(self.core(), target).map(ServiceWatch::new)
    }

    /// A cache of the endpoints under gRPC naming `target`: like
    /// [`Registry::cache`], with instances as
    /// [`Registry::grpc_naming_instances`] reads them, so that Go- and
    /// Java-registered gRPC servers can be picked or fed to a balancer like
    /// any service. Each call starts a watch of its own.
    pub async fn cache_grpc_naming(&self, target: &str) -> Result<ServiceCache> {
        let feed = grpc_naming_feed(self.core(), target)?;
        ServiceCache::open_feed(self.core(), feed, format!("grpc:{target}")).await
    }
}
