//! The table of instance keys a registry maintains, and everything that
//! writes them: put, update, deregister, the serving switch, drain, restore
//! under a new lease ([`restore`]) and anti-entropy ([`keeper`]).
//!
//! # Rules
//!
//! * The table is a plain mutex that is never held across an etcd round
//!   trip: every write copies what it sends, releases the lock, sends, and
//!   records the outcome under the lock again. A generation counter per
//!   entry tells whether the entry changed while a write was in flight.
//! * An entry leaves the table before its key is deleted: once
//!   [`Registration::deregister`] has started, nothing puts the key again,
//!   whatever the delete returned. A failed delete is retried in the
//!   background until it succeeds or the registry closes (which revokes the
//!   lease, so the key goes either way).
//! * Only keys this registry holds are deleted or updated: deletes and
//!   updates compare the key's lease with the current one. A key another
//!   live lease took over is yielded, never fought for, and reclaimed once
//!   it is gone.
//! * One key, one owner: registering an id that this registry already
//!   maintains replaces the entry and retires the older
//!   [`Registration`]; from then on only the newer handle changes the
//!   value. `deregister` on any handle of the id removes it (as Go's
//!   `Deregister(id)` does), and the other handles then say `Deregistered`.
//! * The registry's keys equal its table: anti-entropy restores what is
//!   missing or altered and deletes service keys under its lease that the
//!   table no longer holds (as after etcd was restored from an old snapshot).

mod drain;
mod handle;
mod keeper;
mod mirror;
mod mirror_keeper;
mod pending;
mod restore;
mod write;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::health::{Applier, Gate, HealthCheck, HealthPolicy, InitialState};
use crate::instance::ServiceInstance;

pub use handle::{Registration, RegistrationState};
pub(crate) use mirror::Mirror;
pub(crate) use pending::WriteHook;

/// Bytes a key-value costs in a request beyond its key and value (field
/// tags, lengths, the lease id), counted generously.
pub(crate) const OP_OVERHEAD: usize = 64;
/// Room kept in every request for the transaction's own framing.
pub(crate) const REQUEST_MARGIN: usize = 1024;

/// The registrations of one registry: a cheap handle on the shared table.
#[derive(Clone)]
pub(crate) struct Registrations {
    table: Arc<Table>,
}

pub(crate) struct Table {
    core: Core,
    entries: Mutex<HashMap<String, Entry>>,
    /// A service was registered that anti-entropy does not watch yet, or a
    /// restore finished: anti-entropy starts over with a fresh read.
    resync: Notify,
    /// `Registry::shutdown` started: no key of a registration is put again.
    draining: AtomicBool,
    next_owner: AtomicU64,
    /// The lease whose restore finished (0: the first lease, nothing to restore).
    restored: AtomicI64,
    /// The most operations etcd accepted in one transaction: the configured
    /// limit, lowered when etcd refused a batch for its count.
    max_ops: AtomicUsize,
    /// The request size in bytes, likewise.
    max_bytes: AtomicUsize,
    /// Who publishes each mirror key (gRPC naming), and the mirror keys of
    /// ours that nobody publishes any more.
    mirrors: Mutex<mirror::MirrorBook>,
    /// Keys whose entry holds a [`pending::Deferred`], for anti-entropy.
    deferred_keys: Mutex<HashSet<String>>,
    /// A deferred key is ready to be read again.
    recheck: Notify,
    /// Test knob: awaited after each write of `put` (see [`pending::WriteHook`]).
    write_hook: Mutex<Option<pending::WriteHook>>,
}

/// A registration this registry maintains.
pub(crate) struct Entry {
    pub(crate) instance: ServiceInstance,
    pub(crate) value: Vec<u8>,
    /// Where else the entry is published, if anywhere.
    pub(crate) mirror: Option<Mirror>,
    /// The live [`Registration`] handle that owns the entry.
    owner: u64,
    /// Bumped by every change of `value` or `serving`.
    pub(crate) generation: u64,
    /// The key belongs in etcd (healthy, in service, not drained). When
    /// false, nothing puts it: not anti-entropy, not a restore.
    pub(crate) serving: bool,
    /// Another live lease took the key over: yielded, not fought for.
    pub(crate) yielded: bool,
    /// Our last write that etcd acknowledged, if any.
    pub(crate) written: Option<Written>,
    /// Writes of this entry now in flight ([`pending::Writing`]):
    /// anti-entropy defers the key to them, within a bound.
    pub(crate) writing: u32,
    /// What anti-entropy deferred to those writes, to be settled when they end.
    pub(crate) deferred: Option<pending::Deferred>,
}

/// A write of an entry etcd acknowledged.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Written {
    /// The entry's generation the write carried.
    pub(crate) generation: u64,
    /// The revision of the write; older watch events are stale.
    pub(crate) revision: i64,
}

/// How a put treats a key held by another lease.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `register`: last writer wins, as in the Go library.
    TakeOver,
    /// Updates and the serving switch: write only a key we hold, or one that
    /// is absent or unleased; another live lease's key is yielded.
    OwnOnly,
}

impl Registrations {
    pub(crate) fn new(core: &Core) -> Self {
        let table = Arc::new(Table {
            core: core.clone(),
            entries: Mutex::default(),
            resync: Notify::new(),
            draining: AtomicBool::new(false),
            next_owner: AtomicU64::new(1),
            restored: AtomicI64::new(core.session.lease().map_or(0, |l| l.id)),
            max_ops: AtomicUsize::new(core.config.max_txn_ops),
            max_bytes: AtomicUsize::new(core.config.max_request_bytes),
            mirrors: Mutex::default(),
            deferred_keys: Mutex::default(),
            recheck: Notify::new(),
            write_hook: Mutex::default(),
        });
        core.spawn(restore::run(Arc::downgrade(&table), core.cancel.clone()));
        core.spawn(keeper::run(Arc::downgrade(&table), core.cancel.clone()));
        Self { table }
    }

    /// How many registrations are maintained.
    pub(crate) fn len(&self) -> usize {
        self.table.lock().len()
    }

    /// Registers `instance` (see `Registry::register`): the key is written
    /// before this returns.
    pub(crate) async fn register(&self, instance: ServiceInstance) -> Result<Registration> {
        self.register_with(instance, None).await
    }

    /// Registers `instance`, also published as `publish` says (`None`: as
    /// the registry's settings say; see `Registry::register_with`).
    pub(crate) async fn register_with(
        &self,
        instance: ServiceInstance,
        publish: Option<crate::naming::Publish>,
    ) -> Result<Registration> {
        let (key, value) = self.table.encode(&instance)?;
        let mirror = self.table.mirror_for(&instance, publish.as_ref())?;
        let owner = self.table.insert(&key, &instance, value, mirror, true)?;
        // Nothing half-done: if this fails or is dropped, the caller gets no
        // handle, so the entry goes, and so does a write that may have landed.
        let unfinished = pending::Unfinished {
            table: self.table.clone(),
            keys: vec![(key.clone(), owner)],
        };
        let first = pending::Writing::adopt(&self.table, &key);
        self.table.put(&key, Mode::TakeOver).await?;
        unfinished.done();
        drop(first);
        // Registered again at another address: the old naming key goes now
        // (or, should that fail, with anti-entropy's next round).
        if self.table.left_orphans(&key) {
            self.table.delete_orphans().await;
        }
        Ok(Registration::new(
            self.clone(),
            key,
            instance,
            owner,
            Gate::unchecked(self.table.core.cancel.child_token()),
        ))
    }

    /// Registers every instance (see `Registry::register_all`): validated
    /// first, then written in batches that fit etcd's limits. All or none:
    /// on a failure no handle is returned and what was written is deleted.
    pub(crate) async fn register_all(
        &self,
        instances: Vec<ServiceInstance>,
    ) -> Result<Vec<Registration>> {
        let mut encoded = Vec::with_capacity(instances.len());
        let mut seen = HashSet::new();
        for instance in instances {
            let (key, value) = self.table.encode(&instance)?;
            if !seen.insert(key.clone()) {
                return Err(Error::invalid(
                    "instances",
                    format!("{}/{} is given twice", instance.name, instance.id),
                ));
            }
            let mirror = self.table.mirror_for(&instance, None)?;
            encoded.push((key, value, mirror, instance));
        }
        let lease = self.table.core.live_lease().await?;
        let mut items = Vec::with_capacity(encoded.len());
        let mut owned = Vec::with_capacity(encoded.len());
        let mut unfinished = pending::Unfinished {
            table: self.table.clone(),
            keys: Vec::with_capacity(encoded.len()),
        };
        for (key, value, mirror, instance) in encoded {
            let owner = self
                .table
                .insert(&key, &instance, value.clone(), mirror.clone(), true)?;
            unfinished.keys.push((key.clone(), owner));
            let generation = self.table.lock().get(&key).map_or(0, |e| e.generation);
            items.push(restore::Item {
                key: key.clone(),
                value,
                mirror,
                generation,
            });
            owned.push((key, instance, owner));
        }
        let first: Vec<_> = owned
            .iter()
            .map(|(key, _, _)| pending::Writing::adopt(&self.table, key))
            .collect();
        // On a failure (or a dropped future) `unfinished` forgets them all.
        restore::put_all(&self.table, lease.id, items).await?;
        unfinished.done();
        drop(first);
        Ok(owned
            .into_iter()
            .map(|(key, instance, owner)| {
                let gate = Gate::unchecked(self.table.core.cancel.child_token());
                Registration::new(self.clone(), key, instance, owner, gate)
            })
            .collect())
    }

    /// Registers `instance` gated by `check` (see `Registry::register_checked`).
    pub(crate) async fn register_checked(
        &self,
        instance: ServiceInstance,
        check: impl HealthCheck,
        policy: HealthPolicy,
    ) -> Result<Registration> {
        policy.validate()?;
        let (key, value) = self.table.encode(&instance)?;
        let mirror = self.table.mirror_for(&instance, None)?;
        let healthy = policy.initial == InitialState::Healthy;
        let owner = self.table.insert(&key, &instance, value, mirror, healthy)?;
        let unfinished = pending::Unfinished {
            table: self.table.clone(),
            keys: vec![(key.clone(), owner)],
        };
        if healthy {
            let first = pending::Writing::adopt(&self.table, &key);
            self.table.put(&key, Mode::TakeOver).await?;
            drop(first);
        }
        unfinished.done();
        let (gate, task) = crate::health::start(
            self.table.core.cancel.child_token(),
            self.table.core.namespace().to_owned(),
            self.applier(&key, owner),
            instance.name.clone(),
            instance.id.clone(),
            check,
            policy,
        );
        self.table.core.spawn(async move {
            let _ = task.await;
        });
        Ok(Registration::new(self.clone(), key, instance, owner, gate))
    }

    /// The health gate's way to put the key back or take it out.
    fn applier(&self, key: &str, owner: u64) -> Applier {
        let table = Arc::downgrade(&self.table);
        let key = key.to_owned();
        Arc::new(move |serving| {
            let (table, key) = (table.clone(), key.clone());
            Box::pin(async move {
                match table.upgrade() {
                    Some(table) => table.set_serving(&key, owner, serving).await,
                    None => Err(Error::Closed),
                }
            })
        })
    }

    /// Admin: stops maintaining `key` (it was deleted by an admin call).
    pub(crate) fn forget_key(&self, key: &str) {
        let mut entries = self.table.lock();
        if let Some(e) = entries.remove(key) {
            self.table.mirrors().forget(key, e.mirror.as_ref());
            self.table.recheck.notify_one();
        }
        crate::metrics::registrations(self.table.core.namespace(), entries.len());
    }

    /// Admin: stops maintaining every key under `prefix`.
    pub(crate) fn forget_prefix(&self, prefix: &str) {
        let mut entries = self.table.lock();
        let mut book = self.table.mirrors();
        entries.retain(|k, e| {
            let keep = !k.starts_with(prefix);
            if !keep {
                book.forget(k, e.mirror.as_ref());
            }
            keep
        });
        drop(book);
        self.table.recheck.notify_one();
        crate::metrics::registrations(self.table.core.namespace(), entries.len());
    }

    /// Deletes every maintained key in etcd and keeps them out from now on
    /// (see `Registry::shutdown`).
    pub(crate) async fn drain_all(&self) -> Result<()> {
        self.table.drain_all().await
    }

    /// Forgets everything (the registry closed; the lease revoke takes the keys).
    pub(crate) fn clear(&self) {
        let mut entries = self.table.lock();
        entries.clear();
        self.table.mirrors().clear();
        drop(entries);
        crate::metrics::registrations(self.table.core.namespace(), 0);
    }
}

impl Table {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Validates and encodes `instance`; refuses one that no request etcd
    /// accepts could hold.
    fn encode(&self, instance: &ServiceInstance) -> Result<(String, Vec<u8>)> {
        let key = self.core.keys.instance_key(&instance.name, &instance.id);
        let value = instance.encode_for(&key)?;
        let size = key.len() + value.len() + OP_OVERHEAD;
        let limit = self.core.config.max_request_bytes;
        if size + REQUEST_MARGIN > limit {
            return Err(Error::invalid(
                "instance",
                format!(
                    "{}/{} encodes to {size} bytes, which cannot fit etcd's request limit of \
                     {limit} bytes (max_request_bytes, etcd's --max-request-bytes); shrink its metadata",
                    instance.name, instance.id
                ),
            ));
        }
        Ok((key, value))
    }

    /// Records a registration (replacing and retiring any older handle of
    /// the same key); returns the new owner id. When `serving`, the caller's
    /// first write is counted in flight from here (the caller takes the
    /// count over with [`pending::Writing::adopt`]).
    fn insert(
        &self,
        key: &str,
        instance: &ServiceInstance,
        value: Vec<u8>,
        mirror: Option<Mirror>,
        serving: bool,
    ) -> Result<u64> {
        self.core.check_open()?;
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let serving = serving && !self.draining.load(Ordering::SeqCst);
        let (new_service, new_target) = {
            let mut entries = self.lock();
            let new_service = !entries.values().any(|e| e.instance.name == instance.name);
            let old = entries.get(key).and_then(|e| e.mirror.as_ref());
            let new_target = self.republish(key, old, mirror.as_ref());
            match entries.get_mut(key) {
                Some(e) => {
                    tracing::debug!(key, "registered again: the older Registration is retired");
                    e.instance = instance.clone();
                    e.value = value;
                    e.mirror = mirror;
                    e.owner = owner;
                    e.generation += 1;
                    e.serving = serving;
                    e.yielded = false;
                    e.writing += u32::from(serving);
                }
                None => {
                    entries.insert(
                        key.to_owned(),
                        Entry {
                            instance: instance.clone(),
                            value,
                            mirror,
                            owner,
                            generation: 1,
                            serving,
                            yielded: false,
                            written: None,
                            writing: u32::from(serving),
                            deferred: None,
                        },
                    );
                }
            }
            crate::metrics::registrations(self.core.namespace(), entries.len());
            (new_service, new_target)
        };
        if new_service || new_target {
            self.resync.notify_one();
        }
        Ok(owner)
    }

    /// Removes the entry of `owner` (if it still owns it) and deletes the
    /// key if we hold it, in the background until done.
    fn forget(self: &Arc<Self>, key: &str, owner: u64) {
        let removed = {
            let mut entries = self.lock();
            let ours = entries.get(key).is_some_and(|e| e.owner == owner);
            let removed = ours.then(|| entries.remove(key)).flatten();
            if let Some(e) = &removed {
                self.mirrors().forget(key, e.mirror.as_ref());
            }
            crate::metrics::registrations(self.core.namespace(), entries.len());
            removed
        };
        if removed.is_some() {
            self.delete_in_background(key.to_owned());
        }
    }

    /// Deletes `key` if a lease of ours holds it, retrying in the background
    /// until that succeeds or the registry closes.
    pub(crate) fn delete_in_background(self: &Arc<Self>, key: String) {
        if tokio::runtime::Handle::try_current().is_err() {
            return; // dropped outside a runtime: the lease takes the key
        }
        let table = Arc::downgrade(self);
        self.core.spawn(async move {
            let mut retry =
                crate::backoff::Retry::standard("deleting the key of an ended registration");
            loop {
                let Some(t) = table.upgrade() else { return };
                if t.lock().contains_key(&key) {
                    // Registered again meanwhile: the key is the new entry's.
                    // (A delete already on its way can still land after the
                    // new write; anti-entropy sees it and puts the key back.)
                    return;
                }
                let cancel = t.core.cancel.clone();
                let done = match crate::backoff::cancellable(&cancel, t.core.wait_lease()).await {
                    None => return,
                    Some(Ok(lease)) => t.delete_if_ours(&key, lease.id).await,
                    Some(Err(e)) => Err(e),
                };
                drop(t);
                match done {
                    Ok(()) => {
                        tracing::debug!(key, "key of an ended registration deleted");
                        return;
                    }
                    Err(Error::Closed) => return,
                    Err(error) if error.is_final() => {
                        // Refused for good (permission denied): retrying cannot cure it,
                        // and a put this user may not make never landed either.
                        tracing::warn!(key, %error, "the key of an ended registration cannot be deleted by this user; leaving it to the lease");
                        return;
                    }
                    Err(error) => {
                        let error = format!("{key}: {error}");
                        if !retry.failed(&cancel, &error).await {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Writes the entry of `key` under the current lease, until etcd holds
    /// its latest value under that lease (or the entry no longer wants it).
    async fn put(&self, key: &str, mode: Mode) -> Result<()> {
        let mut lease_lost_once = false;
        for _ in 0..8 {
            let lease = self.core.live_lease().await?;
            let (value, mirror, generation, instance) = {
                let mut entries = self.lock();
                match entries.get_mut(key) {
                    Some(e) if e.serving && !e.yielded => {
                        e.writing += 1;
                        (
                            e.value.clone(),
                            e.mirror.clone(),
                            e.generation,
                            e.instance.clone(),
                        )
                    }
                    _ => return Ok(()),
                }
            };
            // Held until the outcome is recorded (or this future is dropped).
            let _writing = pending::Writing::adopt(self, key);
            let sent = self.write(key, &value, mirror.as_ref(), lease, mode).await;
            self.after_write(key).await;
            let (revision, other) = match sent {
                Ok(w) => w,
                Err(e) if e.is_lease_not_found() && !lease_lost_once => {
                    // The lease vanished under us: let the session re-grant, then retry.
                    lease_lost_once = true;
                    self.core.session.suspect_lost();
                    let mut leases = self.core.session.leases();
                    let changed = leases.wait_for(|l| l.is_none_or(|l| l.id != lease.id));
                    let _ = tokio::time::timeout(self.core.request_timeout(), changed).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let again = {
                let mut entries = self.lock();
                self.core.check_open()?;
                match (entries.get_mut(key), other) {
                    // Deregistered while the write was in flight: its delete
                    // may have gone first, so make sure the key goes.
                    (None, _) => None,
                    (Some(e), Some(holder)) => {
                        if !e.yielded {
                            tracing::warn!(service = %instance.name, id = %instance.id, other_lease = %format_args!("{holder:x}"), "another lease holds this instance; yielding it");
                        }
                        e.yielded = true;
                        return Ok(());
                    }
                    (Some(e), None) => {
                        e.written = Some(Written {
                            generation,
                            revision,
                        });
                        // Changed while the write was in flight: write the newer value.
                        Some(e.generation != generation)
                    }
                }
            };
            let Some(again) = again else {
                return self.delete_if_ours(key, lease.id).await;
            };
            if self.draining.load(Ordering::SeqCst) {
                // Registry::shutdown deleted the keys while this write was in flight.
                self.delete_if_ours(key, lease.id).await?;
                return Err(Error::Closed);
            }
            // A lease replaced while we wrote is restored without us: write again.
            if again || self.core.session.lease().is_some_and(|l| l.id != lease.id) {
                continue;
            }
            tracing::debug!(service = %instance.name, id = %instance.id, lease = %format_args!("{:x}", lease.id), revision, "registered");
            return Ok(());
        }
        Err(Error::SessionLost)
    }

    /// Deletes `key` if `lease` holds it: never another registry's key, nor
    /// a value someone wrote without a lease.
    /// The key's mirror, if it has one, goes in the same transaction, on
    /// the same condition for itself.
    pub(crate) async fn delete_if_ours(&self, key: &str, lease: i64) -> Result<()> {
        let (txn, mirrors) = self.delete_txn(key, lease);
        self.core
            .conn
            .retry_on("delete", key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        self.mirrors_deleted(key, &mirrors);
        Ok(())
    }

    /// Replaces the value of `owner`'s entry and writes it if it is in etcd.
    async fn update(
        &self,
        key: &str,
        owner: u64,
        instance: &ServiceInstance,
        value: Vec<u8>,
    ) -> Result<()> {
        // The address changed: the old mirror key goes once the new one is
        // written (and, should that fail, with anti-entropy's next round).
        let mut moved = false;
        let write = {
            let mut entries = self.lock();
            self.core.check_open()?;
            let e = match entries.get_mut(key) {
                Some(e) if e.owner == owner => e,
                Some(_) => {
                    return Err(Error::Replaced {
                        key: key.to_owned(),
                    });
                }
                None => {
                    return Err(Error::Deregistered {
                        key: key.to_owned(),
                    });
                }
            };
            if let Some(m) = &e.mirror {
                let mirror = Mirror::new(&m.target, instance)?;
                moved = mirror.key != m.key;
                self.republish(key, Some(m), Some(&mirror));
                e.mirror = Some(mirror);
            }
            e.instance = instance.clone();
            e.value = value;
            e.generation += 1;
            // Out of service or yielded: stored for when it is put back or reclaimed.
            e.serving && !e.yielded
        };
        if moved {
            self.recheck.notify_one();
        }
        if write {
            self.put(key, Mode::OwnOnly).await?;
        }
        if moved {
            self.delete_orphans().await;
        }
        Ok(())
    }

    /// Puts the key back (`true`) or deletes it and keeps it out (`false`),
    /// for `owner`'s entry only.
    async fn set_serving(&self, key: &str, owner: u64, serving: bool) -> Result<()> {
        {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(key).filter(|e| e.owner == owner) else {
                return Ok(());
            };
            if serving && self.draining.load(Ordering::SeqCst) {
                return Ok(());
            }
            if e.serving != serving {
                e.serving = serving;
                e.generation += 1;
            }
            if e.yielded {
                // Another lease holds it: anti-entropy reclaims it once that key is gone.
                return Ok(());
            }
        }
        if serving {
            tracing::debug!(key, "putting the key back");
            return self.put(key, Mode::OwnOnly).await;
        }
        // Cleared first, under the lock: from here on nothing restores the key.
        let lease = self.core.session.lease().ok_or(Error::SessionLost)?;
        self.delete_if_ours(key, lease.id).await?;
        tracing::debug!(key, "key deleted; not serving");
        Ok(())
    }

    /// Takes the entry of `key` out of the table, whichever handle owns it:
    /// from here on nothing puts the key. `None` when it was already gone
    /// (deregistered through another handle, or by an admin call).
    fn take(&self, key: &str) -> Option<Entry> {
        let mut entries = self.lock();
        let entry = entries.remove(key);
        if let Some(e) = &entry {
            self.mirrors().forget(key, e.mirror.as_ref());
        }
        crate::metrics::registrations(self.core.namespace(), entries.len());
        entry
    }

    /// Deletes the key of an entry taken out of the table, if we hold it;
    /// a failed delete goes on in the background.
    async fn delete_taken(self: &Arc<Self>, key: &str, entry: Entry) -> Result<()> {
        if entry.yielded {
            return Ok(());
        }
        let Some(lease) = self.core.session.lease() else {
            // No live lease: nothing of ours is in etcd now; a restore will not put it.
            return Ok(());
        };
        let deleted = self.delete_if_ours(key, lease.id).await;
        if let Err(error) = &deleted {
            tracing::warn!(key, %error, "deregister: the delete failed; retrying in the background");
            self.delete_in_background(key.to_owned());
        }
        deleted
    }

    /// The services of the table, for anti-entropy's scope.
    fn services(&self) -> HashSet<String> {
        self.lock()
            .values()
            .map(|e| e.instance.name.clone())
            .collect()
    }

    /// Whether the keys are known to be under the current lease (no restore pending).
    fn restored(&self) -> bool {
        self.core
            .session
            .lease()
            .is_some_and(|l| l.id == self.restored.load(Ordering::SeqCst))
    }
}
