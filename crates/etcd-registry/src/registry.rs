//! [`Registry`] and [`Registration`]: register, deregister, list, admin, close.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, EventType, KeyValue, PutOptions, Txn, TxnOp};
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RegistryBuilder};
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::health::{Gate, Health, HealthCheck, HealthPolicy};
use crate::instance::ServiceInstance;
use crate::keys::{Keys, validate_segment};
use crate::session::{self, Backoff, RegistryState, Session};

/// etcd's default limit of operations in one transaction is 128.
const TXN_BATCH: usize = 100;

/// A connection to etcd that registers service instances under one lease,
/// lists them, and hosts watches, caches and elections.
///
/// See the [crate docs](crate) for the lease model. Create one with
/// [`Registry::builder`]. Dropping a `Registry` without [`close`](Registry::close)
/// stops its background work; its keys then expire after the TTL.
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
}

/// State shared by the registry, its registrations and its background tasks.
pub(crate) struct Inner {
    pub(crate) conn: Conn,
    pub(crate) keys: Keys,
    pub(crate) config: Config,
    pub(crate) session: Arc<Session>,
    pub(crate) cancel: CancellationToken,
    /// Live service caches, shared per service (see cache.rs).
    pub(crate) caches: crate::cache::Caches,
    /// Queue keys in use by this registry's campaigns and locks (see queue.rs).
    pub(crate) election_slots: crate::queue::Slots,
    regs: Mutex<HashMap<String, Entry>>,
    /// Services whose keys the anti-entropy watch covers; a registration of
    /// any other service wakes `services_changed` so that it widens.
    watched: std::sync::Mutex<HashSet<String>>,
    services_changed: Notify,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
    /// `Registry::shutdown` started: no key of a registration is put again.
    draining: AtomicBool,
}

/// A registration this registry maintains.
struct Entry {
    instance: ServiceInstance,
    value: Vec<u8>,
    /// Revision of our last write of the key; older watch events are stale.
    written_rev: i64,
    /// Another live lease took the key over: yielded, not fought for.
    yielded: bool,
    /// `written_rev` is a re-put of `value` by recovery or anti-entropy, not
    /// a caller's write: a caller's write still in flight may be newer.
    restored: bool,
    /// The key belongs in etcd (healthy, in service, not drained). When
    /// false, nothing restores it: not anti-entropy, not lease recovery.
    serving: bool,
}

impl Registry {
    /// A builder with every default: endpoint `127.0.0.1:2379`, namespace
    /// `default`, prefix `/etcd_registry`, TTL 10 s, dial timeout 5 s.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    pub(crate) async fn connect_with(config: Config) -> Result<Self> {
        let conn = Conn::connect(&config).await?;
        let session = Arc::new(Session::new(config.ttl, &config.namespace));
        let lease = session.grant(&conn).await?;
        session.start(lease);
        let inner = Arc::new(Inner {
            keys: Keys::new(&config.key_prefix, &config.namespace),
            conn,
            config,
            session,
            cancel: CancellationToken::new(),
            caches: Default::default(),
            election_slots: Default::default(),
            regs: Mutex::new(HashMap::new()),
            watched: std::sync::Mutex::new(HashSet::new()),
            services_changed: Notify::new(),
            tasks: std::sync::Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        let restore: session::Restore = Box::new(move |lease_id| {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(inner) => inner.restore_all(lease_id).await,
                    None => Err(Error::Closed),
                }
            })
        });
        let session_task = tokio::spawn(session::run(
            inner.session.clone(),
            inner.conn.clone(),
            restore,
            inner.cancel.clone(),
        ));
        let keeper_task = tokio::spawn(keeper(Arc::downgrade(&inner), inner.cancel.clone()));
        inner.spawned(session_task);
        inner.spawned(keeper_task);
        Ok(Registry { inner })
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
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
        self.inner.session.state()
    }

    /// The current lease id, or `None` while recovering or after close.
    pub fn lease_id(&self) -> Option<i64> {
        self.inner.session.lease().map(|l| l.id)
    }

    /// Registers `instance` under the registry's lease and keeps it there
    /// until [`Registration::deregister`] or [`Registry::close`].
    ///
    /// It is one write to etcd. Registering an id this registry already holds
    /// replaces it; one that another live lease holds is taken over (last
    /// writer wins) with a warning. Invalid input fails with
    /// [`Error::InvalidInput`] before anything is written.
    ///
    /// Cancel safety: if the future is dropped after the write was sent, the
    /// key may exist in etcd without being maintained; it expires with the lease.
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
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "register");
        let key = self.inner.keys.instance_key(&instance.name, &instance.id);
        let value = instance.encode_for(&key)?;
        self.inner.put_entry(&key, instance.clone(), value).await?;
        Ok(Registration {
            gate: Gate::unchecked(self.inner.cancel.child_token()),
            inner: self.inner.clone(),
            key,
            instance,
        })
    }

    /// Every instance of service `name`, as one consistent snapshot.
    /// Malformed values are skipped with a warning.
    ///
    /// The read is paged (pages of about 1 MiB, all at the revision of the
    /// first one), so a service of any size can be listed; if that revision
    /// is compacted mid-way, the read starts again at the current revision.
    pub async fn instances(&self, name: &str) -> Result<Vec<ServiceInstance>> {
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "list");
        validate_segment("name", name)?;
        let prefix = self.inner.keys.service_prefix(name);
        Ok(self.inner.list(&prefix).await?.1)
    }

    /// Every instance of every service in the namespace, as one consistent
    /// snapshot, paged like [`Registry::instances`].
    pub async fn all_instances(&self) -> Result<Vec<ServiceInstance>> {
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "list");
        let prefix = self.inner.keys.services_prefix().to_owned();
        Ok(self.inner.list(&prefix).await?.1)
    }

    /// The stored values of service `name` (every service of the namespace
    /// with `None`) with their keys, byte for byte and unparsed, as one
    /// consistent snapshot paged like [`Registry::instances`]: what it parses.
    pub async fn stored_values(&self, name: Option<&str>) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = match name {
            Some(name) => {
                validate_segment("name", name)?;
                self.inner.keys.service_prefix(name)
            }
            None => self.inner.keys.services_prefix().to_owned(),
        };
        let read = self
            .inner
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
        self.inner.conn.set_paging_hooks(crate::conn::PagingHooks {
            max_keys,
            after_page,
        });
    }

    /// Admin: deletes one instance, whoever registered it. Returns whether it existed.
    ///
    /// If this registry itself maintains the instance, it stops maintaining it.
    pub async fn delete_instance(&self, name: &str, id: &str) -> Result<bool> {
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "delete");
        validate_segment("name", name)?;
        validate_segment("id", id)?;
        let key = self.inner.keys.instance_key(name, id);
        let mut regs = self.inner.regs.lock().await;
        let resp = self
            .inner
            .conn
            .retry_on("delete", &key, |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        regs.remove(&key);
        crate::metrics::registrations(&self.inner.config.namespace, regs.len());
        Ok(resp.deleted() > 0)
    }

    /// Admin: deletes every instance of service `name`, whoever registered
    /// them. Returns how many were deleted. `web` never touches `webhook`.
    pub async fn delete_service(&self, name: &str) -> Result<u64> {
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "delete");
        validate_segment("name", name)?;
        let prefix = self.inner.keys.service_prefix(name);
        let mut regs = self.inner.regs.lock().await;
        let resp = self
            .inner
            .conn
            .retry_on("delete", &prefix, |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        regs.retain(|k, _| !k.starts_with(&prefix));
        crate::metrics::registrations(&self.inner.config.namespace, regs.len());
        Ok(resp.deleted().max(0) as u64)
    }

    /// Revokes the lease, so every instance and election key of this registry
    /// disappears at once, and stops all background work. Idempotent.
    ///
    /// If etcd cannot be reached, the background work still stops and the
    /// keys expire after the TTL; the revocation error is returned.
    pub async fn close(&self) -> Result<()> {
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "close");
        self.inner.close().await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.inner.cancel.cancel();
        if !self.inner.closed.load(Ordering::SeqCst) {
            self.inner.session.close();
            tracing::debug!("registry dropped without close; its keys expire after the TTL");
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("endpoints", &self.inner.config.endpoints)
            .field("namespace", &self.inner.config.namespace)
            .field("lease_id", &self.lease_id())
            .finish()
    }
}

impl Inner {
    fn spawned(&self, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.tasks.lock() {
            // Health tasks end with their registration: do not keep their handles.
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
    }

    /// One consistent read of `prefix`, paged: the revision and the parsed
    /// instances. Each page is parsed and dropped before the next one.
    pub(crate) async fn list(&self, prefix: &str) -> Result<(i64, Vec<ServiceInstance>)> {
        self.conn
            .read_prefixes("get", &[prefix.to_owned()], false, Vec::new, |all, kvs| {
                all.extend(kvs.iter().filter_map(|kv| self.parse_kv(kv)));
            })
            .await
            .map(|paged| (paged.revision, paged.value))
    }

    /// Parses an instance key-value; `None` (with a warning) when malformed.
    pub(crate) fn parse_kv(&self, kv: &KeyValue) -> Option<ServiceInstance> {
        let key = std::str::from_utf8(kv.key()).ok();
        let name_id = key.and_then(|k| self.keys.parse_instance_key(k));
        if name_id.is_none() {
            // The Go library writes any name and id, `/` and empty included;
            // such a key is still its instance when the value names exactly it.
            if let (Some(key), Ok(inst)) = (key, ServiceInstance::from_json(kv.value()))
                && self.keys.instance_key(&inst.name, &inst.id) == key
            {
                return Some(inst);
            }
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping a key outside the service layout");
            return None;
        }
        ServiceInstance::from_kv(kv.key(), kv.value(), name_id)
    }

    /// Writes a registration under the current lease and records it.
    async fn put_entry(&self, key: &str, instance: ServiceInstance, value: Vec<u8>) -> Result<()> {
        let mut lease_lost_once = false;
        for _ in 0..4 {
            let lease = self
                .session
                .wait_lease(self.config.request_timeout, &self.cancel)
                .await?;
            // The write holds no lock, so concurrent registrations go out in parallel.
            let result = self
                .conn
                .retry_on("put", key, |mut c| {
                    let (key, value) = (key.to_owned(), value.clone());
                    let options = PutOptions::new().with_lease(lease.id).with_prev_key();
                    async move { c.put(key, value, Some(options)).await }
                })
                .await;
            let resp = match result {
                Ok(resp) => resp,
                Err(e) if e.is_lease_not_found() && !lease_lost_once => {
                    // The lease vanished under us: let the session re-grant, then retry.
                    lease_lost_once = true;
                    self.session.suspect_lost();
                    let mut leases = self.session.leases();
                    let changed = leases.wait_for(|l| l.is_none_or(|l| l.id != lease.id));
                    let _ = tokio::time::timeout(self.config.request_timeout, changed).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(prev) = resp.prev_key()
                && prev.lease() != 0
                && !self.session.is_owned(prev.lease())
            {
                tracing::warn!(
                    service = %instance.name, id = %instance.id,
                    other_lease = %format_args!("{:x}", prev.lease()),
                    "took over an instance id that another live lease held (last writer wins)"
                );
            }
            let written_rev = resp.header().map_or(0, |h| h.revision());
            {
                let mut regs = self.regs.lock().await;
                if self.cancel.is_cancelled() {
                    return Err(Error::Closed);
                }
                let clobbered = regs
                    .get(key)
                    .filter(|e| e.written_rev > written_rev && e.restored && e.value != value)
                    .map(|e| e.written_rev);
                if let Some(rev) = clobbered {
                    // A restore re-put the value from before this write, after
                    // it landed: etcd holds an older value than the caller is
                    // about to be told. Record ours, so that any further
                    // restore uses it, and write it again. Found by the chaos soak.
                    regs.insert(
                        key.to_owned(),
                        Entry {
                            instance: instance.clone(),
                            value: value.clone(),
                            written_rev: rev,
                            yielded: false,
                            restored: false,
                            serving: true,
                        },
                    );
                    tracing::debug!(service = %instance.name, id = %instance.id, "a restore overwrote this write with an older value; writing again");
                    continue;
                }
                // Of two concurrent writes of one key, the later revision is what etcd holds.
                if regs.get(key).is_none_or(|e| e.written_rev < written_rev) {
                    regs.insert(
                        key.to_owned(),
                        Entry {
                            instance: instance.clone(),
                            value: value.clone(),
                            written_rev,
                            yielded: false,
                            restored: false,
                            serving: true,
                        },
                    );
                }
                crate::metrics::registrations(&self.config.namespace, regs.len());
                if self.draining.load(Ordering::SeqCst) {
                    // Registry::shutdown deleted the keys while this write was in flight.
                    self.delete_if_ours(key, lease.id).await?;
                    if let Some(e) = regs.get_mut(key) {
                        e.serving = false;
                    }
                    return Err(Error::Closed);
                }
            }
            if !self
                .watched
                .lock()
                .is_ok_and(|w| w.contains(&instance.name))
            {
                self.services_changed.notify_one();
            }
            // A lease replaced while we wrote was restored without us: write again.
            if self.session.lease().is_some_and(|l| l.id != lease.id) {
                continue;
            }
            tracing::debug!(service = %instance.name, id = %instance.id, lease = %format_args!("{:x}", lease.id), revision = written_rev, "registered");
            return Ok(());
        }
        Err(Error::SessionLost)
    }

    /// Re-puts every maintained registration under `lease_id`, in batches.
    async fn restore_all(&self, lease_id: i64) -> Result<()> {
        let mut regs = self.regs.lock().await;
        let keys: Vec<String> = regs
            .iter()
            .filter(|(_, e)| !e.yielded && e.serving)
            .map(|(k, _)| k.clone())
            .collect();
        for chunk in keys.chunks(TXN_BATCH) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .filter_map(|k| regs.get(k).map(|e| (k, e)))
                .map(|(k, e)| {
                    TxnOp::put(
                        k.as_str(),
                        e.value.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    )
                })
                .collect();
            let resp = self
                .conn
                .retry("restore", |mut c| {
                    let txn = Txn::new().and_then(ops.clone());
                    async move { c.txn(txn).await }
                })
                .await?;
            let rev = resp.header().map_or(0, |h| h.revision());
            for k in chunk {
                if let Some(e) = regs.get_mut(k) {
                    e.written_rev = rev;
                    e.restored = true;
                }
            }
        }
        tracing::info!(lease = %format_args!("{lease_id:x}"), count = keys.len(), "registrations restored under the new lease");
        Ok(())
    }

    /// Compares one observed key with what we maintain, and restores, yields
    /// or reclaims. `kv` is `None` when the key is absent (deleted).
    ///
    /// A yielded key is reclaimed once it is gone (deleted, or expired with
    /// the other owner's lease) or overwritten without a lease; while another
    /// live lease holds it, it stays yielded.
    async fn reconcile_key(
        &self,
        regs: &mut HashMap<String, Entry>,
        key: &str,
        kv: Option<&KeyValue>,
        mod_rev: i64,
    ) -> Result<()> {
        let Some(entry) = regs.get_mut(key) else {
            return Ok(());
        };
        // Out of service (unhealthy, in maintenance, drained): never restored.
        if !entry.serving || mod_rev <= entry.written_rev {
            return Ok(());
        }
        let Some(lease) = self.session.lease() else {
            return Ok(()); // recovery re-puts everything
        };
        if let Some(kv) = kv {
            let holder = kv.lease();
            if holder != 0 && !self.session.is_owned(holder) {
                if !entry.yielded {
                    tracing::warn!(
                        service = %entry.instance.name, id = %entry.instance.id,
                        other_lease = %format_args!("{holder:x}"),
                        "another lease took over this instance; yielding it"
                    );
                    entry.yielded = true;
                }
                return Ok(());
            }
            if holder != 0 {
                // Under one of our own leases: our write (possibly one still in
                // flight, whose entry is not updated yet). Never "restore" over it.
                if kv.value() == entry.value.as_slice() {
                    entry.written_rev = kv.mod_revision();
                }
                return Ok(());
            }
        }
        if entry.yielded {
            tracing::warn!(
                service = %entry.instance.name, id = %entry.instance.id,
                revision = mod_rev,
                "the instance taken over by another lease is gone or unleased; reclaiming it"
            );
        } else {
            tracing::warn!(
                service = %entry.instance.name, id = %entry.instance.id,
                revision = mod_rev,
                "a maintained instance was deleted or overwritten; restoring it"
            );
        }
        // Written only if the key is still as observed: if its owner (or a new
        // one) wrote it since, that write's event decides instead of this one.
        let observed = kv.map_or(0, KeyValue::mod_revision);
        let value = entry.value.clone();
        let resp = self
            .conn
            .retry_on("restore", key, |mut c| {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, observed)])
                    .and_then([TxnOp::put(
                        key,
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease.id)),
                    )]);
                async move { c.txn(txn).await }
            })
            .await;
        match resp {
            Ok(resp) if resp.succeeded() => {
                crate::metrics::restored(&self.config.namespace, &entry.instance.name);
                entry.written_rev = resp.header().map_or(0, |h| h.revision());
                entry.yielded = false;
                entry.restored = true;
                Ok(())
            }
            Ok(_) => {
                tracing::debug!(
                    key,
                    "key changed before it could be restored; its next event decides"
                );
                Ok(())
            }
            Err(e) => {
                if e.is_lease_not_found() {
                    self.session.suspect_lost();
                }
                Err(e)
            }
        }
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.cancel.cancel();
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
        self.regs.lock().await.clear();
        crate::metrics::registrations(&self.config.namespace, 0);
        let lease = self.session.close();
        if let Some(lease) = lease {
            let revoked = self
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

/// Anti-entropy: watches the services this registry registers and restores
/// the keys it maintains when someone else deletes or overwrites them.
/// Each (re)start (a broken stream, or a newly registered service) reconciles
/// against a fresh read, then watches from there.
async fn keeper(weak: std::sync::Weak<Inner>, cancel: CancellationToken) {
    let mut backoff = Backoff::standard();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            r = keeper_pass(&inner) => r,
        };
        drop(inner);
        match outcome {
            Ok(()) => backoff.reset(),
            Err(error) => tracing::warn!(%error, "registration watch interrupted; re-syncing"),
        }
        if !backoff.wait(&cancel).await {
            return;
        }
    }
}

/// Past this many services, one watch covers the whole namespace instead of
/// one per service (a transaction holds at most 128 operations).
const MAX_SCOPED_SERVICES: usize = 64;

async fn keeper_pass(inner: &Inner) -> Result<()> {
    inner
        .session
        .wait_lease(Duration::from_secs(3600), &inner.cancel)
        .await?;
    // Watch only the services this registry registers, so that a registry
    // does not hear every change of a large namespace.
    let prefixes: Vec<String> = {
        let regs = inner.regs.lock().await;
        let services: HashSet<String> = regs.values().map(|e| e.instance.name.clone()).collect();
        let prefixes = if services.len() > MAX_SCOPED_SERVICES {
            vec![inner.keys.services_prefix().to_owned()]
        } else {
            services
                .iter()
                .map(|s| inner.keys.service_prefix(s))
                .collect()
        };
        if let Ok(mut watched) = inner.watched.lock() {
            *watched = services;
        }
        prefixes
    };
    if prefixes.is_empty() {
        inner.services_changed.notified().await;
        return Ok(());
    }
    // Only the keys this registry maintained before the read are reconciled:
    // one registered during the read was written at or after its revision,
    // and the watch from there on covers it. Keeping only those keys bounds
    // memory by what we maintain, not by the size of the namespace.
    let maintained: HashSet<String> = inner.regs.lock().await.keys().cloned().collect();
    let crate::conn::Paged {
        revision: rev,
        value: present,
        ..
    } = inner
        .conn
        .read_prefixes("get", &prefixes, false, HashMap::new, |present, kvs| {
            for kv in kvs {
                if let Ok(key) = std::str::from_utf8(kv.key())
                    && maintained.contains(key)
                {
                    present.insert(key.to_owned(), kv);
                }
            }
        })
        .await?;
    {
        let mut regs = inner.regs.lock().await;
        for key in &maintained {
            let kv = present.get(key);
            let mod_rev = kv.map_or(rev, KeyValue::mod_revision);
            inner.reconcile_key(&mut regs, key, kv, mod_rev).await?;
        }
    }
    let mut watch = inner
        .conn
        .watch(prefixes[0].as_str(), true, rev + 1)
        .await?;
    for prefix in &prefixes[1..] {
        watch.add(prefix.as_str(), true, rev + 1).await?;
    }
    loop {
        let resp = tokio::select! {
            r = watch.next() => r?,
            // A new service: restart with a wider watch.
            _ = inner.services_changed.notified() => return Ok(()),
        };
        if resp.events().is_empty() {
            continue;
        }
        let mut regs = inner.regs.lock().await;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Ok(key) = std::str::from_utf8(kv.key()) else {
                continue;
            };
            let present = (event.event_type() == EventType::Put).then_some(kv);
            if let Err(error) = inner
                .reconcile_key(&mut regs, key, present, kv.mod_revision())
                .await
            {
                if error.is_lease_not_found() {
                    // The lease itself is gone: the session re-grants and re-puts everything.
                    tracing::info!(
                        key,
                        "lease gone while restoring; waiting for the session to re-grant"
                    );
                    return Ok(());
                }
                tracing::warn!(%error, key, "could not restore a maintained instance; will retry");
                return Err(error);
            }
        }
    }
}

/// A registered instance, maintained by its [`Registry`] until
/// [`deregister`](Registration::deregister) or [`Registry::close`].
///
/// Dropping a `Registration` does **not** deregister: the instance stays
/// registered (and is restored if lost) until the registry closes. Call
/// [`deregister`](Registration::deregister) to remove it earlier.
#[must_use = "dropping a Registration keeps the instance registered until Registry::close"]
pub struct Registration {
    inner: Arc<Inner>,
    key: String,
    instance: ServiceInstance,
    /// Health, maintenance switch and the health task's token.
    gate: Arc<Gate>,
}

impl Registration {
    /// The instance as last written.
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    /// The etcd key of the instance.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Replaces the instance's version, weight, metadata or address in place,
    /// under the same key. `name` and `id` must not change.
    ///
    /// If another lease had taken the key over, this writes it back under this
    /// registry's lease and maintains it again (last writer wins).
    pub async fn update(&mut self, instance: ServiceInstance) -> Result<()> {
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "update");
        if instance.name != self.instance.name {
            return Err(Error::invalid(
                "name",
                "update cannot change the service name",
            ));
        }
        if instance.id != self.instance.id {
            return Err(Error::invalid("id", "update cannot change the instance id"));
        }
        let value = instance.encode_for(&self.key)?;
        // Serialised with health transitions; a key that is out stays out.
        let _gate = self.gate.lock().await;
        if !self
            .inner
            .update_unserved(&self.key, &instance, value.clone())
            .await
        {
            self.inner
                .put_entry(&self.key, instance.clone(), value)
                .await?;
        }
        self.instance = instance;
        Ok(())
    }

    /// Deletes the key and stops maintaining it (and its health check). A
    /// key that another lease took over is left alone.
    pub async fn deregister(self) -> Result<()> {
        let _timer = crate::metrics::timer(&self.inner.config.namespace, "deregister");
        // No health transition may put the key back behind our back.
        let _gate = self.gate.lock().await;
        self.gate.cancel.cancel();
        let mut regs = self.inner.regs.lock().await;
        let Some(entry) = regs.remove(&self.key) else {
            return Ok(());
        };
        crate::metrics::registrations(&self.inner.config.namespace, regs.len());
        if entry.yielded || !entry.serving {
            return Ok(());
        }
        let key = self.key.clone();
        let result = self
            .inner
            .conn
            .retry("delete", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await;
        if let Err(e) = result {
            regs.insert(self.key.clone(), entry);
            crate::metrics::registrations(&self.inner.config.namespace, regs.len());
            return Err(e);
        }
        tracing::debug!(service = %self.instance.name, id = %self.instance.id, "deregistered");
        Ok(())
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("instance", &self.instance)
            .finish()
    }
}

// Health-gated registration, maintenance and draining (see health.rs): the
// `serving` flag of an entry says whether its key belongs in etcd.

impl Registry {
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
    /// `timeout`, `rise` or `fall`) fails with [`Error::InvalidInput`] before
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
        policy.validate()?;
        let key = self.inner.keys.instance_key(&instance.name, &instance.id);
        let value = instance.encode_for(&key)?;
        if policy.initial == crate::health::InitialState::Healthy {
            self.inner.put_entry(&key, instance.clone(), value).await?;
        } else {
            self.inner.add_unserved(&key, &instance, value).await?;
        }
        let (gate, task) = crate::health::start(
            &self.inner,
            key.clone(),
            instance.name.clone(),
            instance.id.clone(),
            check,
            policy,
        );
        self.inner.spawned(task);
        Ok(Registration {
            inner: self.inner.clone(),
            key,
            instance,
            gate,
        })
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
        let drained = self.inner.drain_all().await;
        if let Err(error) = &drained {
            tracing::warn!(%error, "could not delete every instance key before the grace period");
        }
        tokio::time::sleep(grace).await;
        let closed = self.inner.close().await;
        drained.and(closed)
    }
}

impl Inner {
    /// Records a registration whose key is not in etcd yet (not healthy yet).
    async fn add_unserved(
        &self,
        key: &str,
        instance: &ServiceInstance,
        value: Vec<u8>,
    ) -> Result<()> {
        {
            let mut regs = self.regs.lock().await;
            if self.cancel.is_cancelled() {
                return Err(Error::Closed);
            }
            if let Some(e) = regs.get(key)
                && e.serving
                && !e.yielded
            {
                // Registering an id we hold replaces it: the old key goes too.
                if let Some(lease) = self.session.lease() {
                    self.delete_if_ours(key, lease.id).await?;
                }
            }
            regs.insert(
                key.to_owned(),
                Entry {
                    instance: instance.clone(),
                    value,
                    written_rev: 0,
                    yielded: false,
                    restored: false,
                    serving: false,
                },
            );
            crate::metrics::registrations(&self.config.namespace, regs.len());
        }
        if !self
            .watched
            .lock()
            .is_ok_and(|w| w.contains(&instance.name))
        {
            self.services_changed.notify_one();
        }
        Ok(())
    }

    /// Replaces the stored value of a registration whose key is out of
    /// etcd, without writing; returns false if it is in (or not maintained).
    async fn update_unserved(&self, key: &str, instance: &ServiceInstance, value: Vec<u8>) -> bool {
        let mut regs = self.regs.lock().await;
        match regs.get_mut(key) {
            Some(e) if !e.serving => {
                e.instance = instance.clone();
                e.value = value;
                true
            }
            _ => false,
        }
    }

    /// Puts the key back (`true`) or deletes it and keeps it out (`false`).
    /// A registration that is no longer maintained (deregistered, deleted by
    /// an admin call, yielded) is left alone.
    pub(crate) async fn set_serving(&self, key: &str, serving: bool) -> Result<()> {
        let mut regs = self.regs.lock().await;
        let Some(entry) = regs.get_mut(key) else {
            return Ok(());
        };
        if serving {
            if self.draining.load(Ordering::SeqCst) {
                return Ok(());
            }
            entry.serving = true;
            if entry.yielded {
                // Another lease holds it: anti-entropy reclaims it once that key is gone.
                return Ok(());
            }
            let (instance, value) = (entry.instance.clone(), entry.value.clone());
            drop(regs);
            tracing::debug!(service = %instance.name, id = %instance.id, "putting the key back");
            return self.put_entry(key, instance, value).await;
        }
        // Cleared first, under the lock: from here on nothing restores the key.
        entry.serving = false;
        if entry.yielded {
            return Ok(());
        }
        let lease = self.session.lease().ok_or(Error::SessionLost)?;
        self.delete_if_ours(key, lease.id).await?;
        tracing::debug!(key, "key deleted; not serving");
        Ok(())
    }

    /// Deletes `key` if `lease` holds it: never another registry's key, nor
    /// a value someone wrote without a lease.
    async fn delete_if_ours(&self, key: &str, lease: i64) -> Result<()> {
        self.conn
            .retry("delete", |mut c| {
                let txn = Txn::new()
                    .when([Compare::lease(key, CompareOp::Equal, lease)])
                    .and_then([TxnOp::delete(key, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(())
    }

    /// Marks the registry draining and deletes every maintained instance key
    /// that is in etcd, in batches.
    async fn drain_all(&self) -> Result<()> {
        self.draining.store(true, Ordering::SeqCst);
        let mut regs = self.regs.lock().await;
        let keys: Vec<String> = regs
            .iter()
            .filter(|(_, e)| e.serving && !e.yielded)
            .map(|(k, _)| k.clone())
            .collect();
        for e in regs.values_mut() {
            e.serving = false;
        }
        let Some(lease) = self.session.lease() else {
            // No live lease: nothing of ours is in etcd, and nothing is restored now.
            return Ok(());
        };
        for chunk in keys.chunks(TXN_BATCH / 2) {
            // Each key is a compare and a delete; a transaction holds up to 128 operations.
            let (compares, deletes): (Vec<Compare>, Vec<TxnOp>) = chunk
                .iter()
                .map(|k| {
                    (
                        Compare::lease(k.as_str(), CompareOp::Equal, lease.id),
                        TxnOp::delete(k.as_str(), None),
                    )
                })
                .unzip();
            // All or nothing would keep every key if one was taken over: delete one by one on a miss.
            let resp = self
                .conn
                .retry("drain", |mut c| {
                    let txn = Txn::new().when(compares.clone()).and_then(deletes.clone());
                    async move { c.txn(txn).await }
                })
                .await?;
            if !resp.succeeded() {
                for k in chunk {
                    self.delete_if_ours(k, lease.id).await?;
                }
            }
        }
        tracing::info!(count = keys.len(), "drained: every instance key deleted");
        Ok(())
    }
}

impl Registration {
    /// The health of this registration: its state after the rise/fall
    /// policy, the last error text, and counts, updated after every check
    /// (compare `state` to see transitions). Every transition is also
    /// logged through `tracing`. A registration without a check reports
    /// [`HealthState::Healthy`](crate::HealthState) and never changes.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.gate.health()
    }

    /// Maintenance switch. `set_serving(false)` deletes the key at once and
    /// keeps it out whatever the health check says; `set_serving(true)` puts
    /// it back if the instance is healthy (a checked one that is not comes
    /// back when it is). Both return once etcd agrees.
    ///
    /// After [`Registry::shutdown`] started, `set_serving(true)` does nothing.
    pub async fn set_serving(&self, serving: bool) -> Result<()> {
        tracing::info!(service = %self.instance.name, id = %self.instance.id, serving, "maintenance switch");
        self.gate.set_serving(&self.inner, &self.key, serving).await
    }

    /// Deletes the key at once, then waits `grace` before returning, so that
    /// clients' caches drop the instance before the caller stops serving.
    /// The registration ends (as with [`deregister`](Registration::deregister)).
    ///
    /// Cancel safety: once the key is deleted, dropping the future only cuts
    /// the wait short.
    pub async fn drain(self, grace: Duration) -> Result<()> {
        let (service, id) = (self.instance.name.clone(), self.instance.id.clone());
        self.deregister().await?;
        tracing::info!(service, id, grace = ?grace, "drained; waiting for clients to drop the instance");
        tokio::time::sleep(grace).await;
        Ok(())
    }
}
