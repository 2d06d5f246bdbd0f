//! [`Registry`]: the facade. It connects, wires the pieces (the core, the
//! registrations, the caches and the queue slots) and closes; every method
//! hands the work to the module that owns it.

mod admin;
mod coordination;
mod discovery;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::cache::Caches;
use crate::config::{Config, RegistryBuilder};
use crate::conn::Conn;
use crate::core::Core;
use crate::error::Result;
use crate::health::{HealthCheck, HealthPolicy};
use crate::instance::ServiceInstance;
use crate::keys::validate_segment;
use crate::queue::Slots;
use crate::registrations::{Registration, Registrations};
use crate::session::{RegistryState, Session};

/// A connection to etcd that registers service instances under one lease,
/// lists them, and hosts watches, caches, elections and locks.
///
/// See the [crate docs](crate) for the lease model. Create one with
/// [`Registry::builder`]. A `Registry` is a cheap handle: clones share one
/// connection, one lease and one set of background tasks. Dropping the last
/// clone without [`close`](Registry::close) stops the background work (logged
/// once at INFO); its keys then expire after the TTL, and every cache,
/// watch and [`Registration`] of it reports that it is closed.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Facade>,
}

/// What the clones of one registry share.
struct Facade {
    core: Core,
    regs: Registrations,
    /// Live service caches, shared per service.
    caches: Caches,
    /// Queue keys in use by this registry's campaigns and locks.
    slots: Slots,
    closed: AtomicBool,
}

impl RegistryBuilder {
    /// Validates the settings, reaches etcd and grants the registry's lease.
    ///
    /// Succeeds when any endpoint answers within the dial timeout; otherwise
    /// fails with [`Error::Connect`](crate::Error::Connect) naming every endpoint tried.
    pub async fn connect(self) -> Result<Registry> {
        let config = self.build_config()?;
        Registry::connect_with(config).await
    }
}

impl Registry {
    /// A builder with every default: endpoint `127.0.0.1:2379`, namespace
    /// `default`, prefix `/etcd_registry`, TTL 10 s, dial timeout 5 s.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    async fn connect_with(config: Config) -> Result<Self> {
        let conn = Conn::connect(&config).await?;
        let session = Arc::new(Session::new(config.ttl, &config.namespace));
        let lease = session.grant(&conn).await?;
        session.start(lease);
        let core = Core::new(conn, config, session);
        core.spawn(crate::session::run(
            core.session.clone(),
            core.conn.clone(),
            core.cancel.clone(),
        ));
        let regs = Registrations::new(&core);
        Ok(Registry {
            inner: Arc::new(Facade {
                core,
                regs,
                caches: Caches::default(),
                slots: Slots::default(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    fn core(&self) -> &Core {
        &self.inner.core
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.inner.core.config
    }

    /// The lease state; every transition is also logged through `tracing`.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) {
    /// let mut state = registry.state();
    /// while state.changed().await.is_ok() {
    ///     println!("registry is now {:?}", *state.borrow());
    /// }
    /// # }
    /// ```
    pub fn state(&self) -> watch::Receiver<RegistryState> {
        self.core().session.state()
    }

    /// The current lease id, or `None` while recovering or after close.
    pub fn lease_id(&self) -> Option<i64> {
        self.core().session.lease().map(|l| l.id)
    }

    /// Whether the registry was closed ([`close`](Registry::close),
    /// [`shutdown`](Registry::shutdown)). Once closed, nothing is maintained:
    /// caches report [`ServiceCache::is_closed`](crate::ServiceCache::is_closed),
    /// watch streams end, and [`Registration::state`] says
    /// [`Closed`](crate::RegistrationState::Closed).
    pub fn is_closed(&self) -> bool {
        self.core().is_closed()
    }

    /// Registers `instance` under the registry's lease and keeps it there
    /// until [`Registration::deregister`] or [`Registry::close`].
    ///
    /// It is one write to etcd. Registering an id this registry already holds
    /// replaces it and retires the older [`Registration`] (see there); one
    /// that another live lease holds is taken over (last writer wins) with a
    /// warning. An instance too large for any request etcd accepts (see
    /// [`RegistryBuilder::etcd_limits`]) is refused with
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming its size and the limit. Invalid input fails with
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) before anything is written.
    ///
    /// If the write fails, nothing stays behind: the entry is dropped and a
    /// write that may have landed is deleted in the background.
    ///
    /// Cancel safety: if the future is dropped after the write was sent, the
    /// key may exist in etcd without being maintained; it expires with the
    /// lease, and anti-entropy deletes it at its next full read.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// use etcd_registry::ServiceInstance;
    /// let reg = registry.register(ServiceInstance::new("web", "web-1", "10.0.0.7", 8080)).await?;
    /// // ... serve ...
    /// reg.deregister().await?;
    /// # Ok(()) }
    /// ```
    pub async fn register(&self, instance: ServiceInstance) -> Result<Registration> {
        let _timer = crate::metrics::timer(self.core().namespace(), "register");
        self.inner.regs.register(instance).await
    }

    /// Registers every instance of `instances` at once: the batched form
    /// of [`register`](Registry::register), for a process that serves many.
    ///
    /// Every instance is validated before anything is written (an invalid
    /// one, or one given twice, fails with [`Error::InvalidInput`](crate::Error::InvalidInput)); then
    /// the keys go out in transactions sized to etcd's limits (see
    /// [`RegistryBuilder::etcd_limits`]), several at a time, under the
    /// registry's lease. All or none: if a write fails, no handle is
    /// returned, and what was written is deleted in the background.
    /// The handles come back in the order of `instances`.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// use etcd_registry::ServiceInstance;
    /// let shards = (0..1000).map(|i| ServiceInstance::new("shard", format!("s{i}"), "10.0.0.7", 9000));
    /// let regs = registry.register_all(shards.collect()).await?;
    /// assert_eq!(regs.len(), 1000);
    /// # Ok(()) }
    /// ```
    pub async fn register_all(&self, instances: Vec<ServiceInstance>) -> Result<Vec<Registration>> {
        let _timer = crate::metrics::timer(self.core().namespace(), "register");
        self.inner.regs.register_all(instances).await
    }

    /// Registers `instance` like [`register`](Registry::register), also
    /// published as `publish` says. With [`Publish::GrpcNaming`](crate::Publish::GrpcNaming) the
    /// instance is also written at `{target}/{host:port}` in gRPC's etcd
    /// naming layout ([`crate::naming`]), so that a gRPC client dialing
    /// `etcd:///{target}` finds it: under the same lease, in the same
    /// transaction as the instance's own key, deleted with it (deregister,
    /// drain, a failing health check), restored with it under a new lease and
    /// reclaimed with it after a take-over. This replaces the registry-wide
    /// [`RegistryBuilder::publish_grpc_naming`] for this registration.
    ///
    /// Fails with [`Error::InvalidInput`](crate::Error::InvalidInput) for
    /// `target` (empty, ending with `/`, a control character) or `port` (not
    /// a number) before anything is written.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// use etcd_registry::{Publish, ServiceInstance};
    /// let target = "foo/bar/my-service".to_owned();
    /// let instance = ServiceInstance::new("my-service", "a-1", "10.0.0.1", 50051);
    /// let _reg = registry.register_with(instance, Publish::GrpcNaming { target }).await?;
    /// // A Go client: grpc.Dial("etcd:///foo/bar/my-service", grpc.WithResolvers(r), ...)
    /// # Ok(()) }
    /// ```
    pub async fn register_with(
        &self,
        instance: ServiceInstance,
        publish: crate::naming::Publish,
    ) -> Result<Registration> {
        let _timer = crate::metrics::timer(self.core().namespace(), "register");
        self.inner.regs.register_with(instance, Some(publish)).await
    }

    /// Registers `instance` while `check` passes: the key is in etcd only
    /// while the instance is healthy by `policy` (see [`crate::health`]).
    ///
    /// The check runs on a task of its own, first at once, then every
    /// [`HealthPolicy::interval`], each run cut off after its timeout (a
    /// hang is a failure). After `fall` failures in a row the key is deleted
    /// (watchers and caches see `Removed`); after `rise` passes in a row it
    /// is put back (`Added`). While the instance is out, neither
    /// anti-entropy nor recovery after a lost lease or a wiped etcd puts its
    /// key back. With the default [`InitialState::Pending`](crate::InitialState)
    /// nothing is written before the first pass, so this returns before the
    /// instance is discoverable: watch [`Registration::health`] to know when.
    ///
    /// The check stops on [`Registration::deregister`] or `drain`, on
    /// [`Registry::close`] and when the registry is dropped; dropping the
    /// `Registration` alone keeps it running, as it keeps a plain
    /// registration maintained.
    ///
    /// Invalid input (the instance, or the policy: field `interval`,
    /// `timeout`, `rise` or `fall`) fails with [`Error::InvalidInput`](crate::Error::InvalidInput) before
    /// anything is written.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// use etcd_registry::{HealthPolicy, ServiceInstance, health};
    /// let reg = registry
    ///     .register_checked(
    ///         ServiceInstance::new("web", "web-1", "10.0.0.7", 8080),
    ///         health::tcp("127.0.0.1:8080")?,
    ///         HealthPolicy::default(),
    ///     )
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn register_checked(
        &self,
        instance: ServiceInstance,
        check: impl HealthCheck,
        policy: HealthPolicy,
    ) -> Result<Registration> {
        self.inner
            .regs
            .register_checked(instance, check, policy)
            .await
    }

    /// Every instance of service `name`, as one consistent snapshot.
    /// Malformed values are skipped with a warning.
    ///
    /// The read is paged (pages of about 1 MiB, all at the revision of the
    /// first one), so a service of any size can be listed; if that revision
    /// is compacted mid-way, the read starts again at the current revision.
    pub async fn instances(&self, name: &str) -> Result<Vec<ServiceInstance>> {
        let _timer = crate::metrics::timer(self.core().namespace(), "list");
        validate_segment("name", name)?;
        let prefix = self.core().keys.service_prefix(name);
        Ok(self.core().list(&prefix).await?.1)
    }

    /// Every instance of every service in the namespace, as one consistent
    /// snapshot, paged like [`Registry::instances`].
    pub async fn all_instances(&self) -> Result<Vec<ServiceInstance>> {
        let _timer = crate::metrics::timer(self.core().namespace(), "list");
        let prefix = self.core().keys.services_prefix().to_owned();
        Ok(self.core().list(&prefix).await?.1)
    }

    /// The stored values of service `name` (every service of the namespace
    /// with `None`) with their keys, byte for byte and unparsed, as one
    /// consistent snapshot paged like [`Registry::instances`]: what it parses.
    pub async fn stored_values(&self, name: Option<&str>) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = match name {
            Some(name) => {
                validate_segment("name", name)?;
                self.core().keys.service_prefix(name)
            }
            None => self.core().keys.services_prefix().to_owned(),
        };
        let read = self
            .core()
            .conn
            .read_prefixes("get", &[prefix], false, Vec::new, |all, kvs| {
                all.extend(kvs.into_iter().map(|kv| {
                    let (key, value) = kv.into_key_value();
                    (String::from_utf8_lossy(&key).into_owned(), value)
                }));
            })
            .await?;
        Ok(read.value)
    }

    /// Test knob, not part of the API: reads of this registry that are
    /// paged (lists, watch and cache snapshots, re-lists, anti-entropy,
    /// election reads) read at most `max_keys` keys a page, and await
    /// `after_page(revision)` between pages. Lets a test compact etcd in the
    /// middle of a paged read. Applies to reads started after the call.
    #[doc(hidden)]
    pub fn set_read_paging_for_tests(
        &self,
        max_keys: Option<i64>,
        after_page: Option<
            Arc<dyn Fn(i64) -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
        >,
    ) {
        self.core().conn.set_paging_hooks(crate::conn::PagingHooks {
            max_keys,
            after_page,
        });
    }

    /// Test knob, not part of the API: `hook(key)` is awaited after each
    /// write of a registration's key came back from etcd, before its outcome
    /// is recorded. Lets a test hold an acknowledged write "in flight" while
    /// it changes the key behind it.
    #[doc(hidden)]
    pub fn set_write_hook_for_tests(&self, hook: Option<crate::registrations::WriteHook>) {
        self.inner.regs.set_write_hook(hook);
    }

    /// Revokes the lease, so every instance and election key of this registry
    /// disappears at once, and stops all background work. Idempotent.
    ///
    /// If etcd cannot be reached, the background work still stops and the
    /// keys expire after the TTL; the revocation error is returned.
    pub async fn close(&self) -> Result<()> {
        let _timer = crate::metrics::timer(self.core().namespace(), "close");
        self.inner.close().await
    }

    /// Drains every registration of this registry at once, waits `grace`,
    /// then [closes](Registry::close) it.
    ///
    /// Every instance key is deleted first (in one transaction per 100 keys),
    /// so that clients' caches drop them while the process still serves;
    /// from then on no health check, `set_serving(true)` or new registration
    /// puts a key back. Election keys stay until the close. Use it at the
    /// start of a graceful shutdown, before the server stops accepting.
    ///
    /// If the deletion fails (etcd unreachable), the registry still waits
    /// and closes, and the error is returned; the keys then go with the
    /// lease, after the TTL at the latest.
    pub async fn shutdown(&self, grace: Duration) -> Result<()> {
        let drained = self.inner.regs.drain_all().await;
        if let Err(error) = &drained {
            tracing::warn!(%error, "could not delete every instance key before the grace period");
        }
        tokio::time::sleep(grace).await;
        let closed = self.inner.close().await;
        drained.and(closed)
    }
}

impl Facade {
    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let core = &self.core;
        core.cancel.cancel();
        for task in core.take_tasks() {
            let _ = task.await;
        }
        self.regs.clear();
        let lease = core.session.close();
        if let Some(lease) = lease {
            let revoked = core
                .conn
                .retry("lease revoke", |mut c| async move {
                    c.lease_revoke(lease.id).await
                })
                .await;
            match revoked {
                Ok(_) => {
                    tracing::info!(lease = %format_args!("{:x}", lease.id), "lease revoked; registry closed")
                }
                Err(e) if e.is_lease_not_found() => {}
                Err(e) => {
                    tracing::warn!(lease = %format_args!("{:x}", lease.id), error = %e, "could not revoke the lease; its keys expire after the TTL");
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Facade {
    fn drop(&mut self) {
        self.core.cancel.cancel();
        if !self.closed.swap(true, Ordering::SeqCst) {
            let lease = self.core.session.close();
            let caches = self
                .caches
                .lock()
                .map(|c| c.values().filter(|w| w.strong_count() > 0).count())
                .unwrap_or(0);
            tracing::info!(
                namespace = %self.core.namespace(),
                lease = %lease.map_or_else(|| "none".to_owned(), |l| format!("{:x}", l.id)),
                registrations = self.regs.len(),
                caches,
                "registry dropped without close: stopped keep-alive, anti-entropy and every watch, cache and health check; its keys expire after the TTL"
            );
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("endpoints", &self.config().endpoints)
            .field("namespace", &self.config().namespace)
            .field("lease_id", &self.lease_id())
            .finish()
    }
}
