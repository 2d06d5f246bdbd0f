//! Anti-entropy: watches the services this registry registers, through the
//! one resumable watch, and makes etcd hold exactly the table.
//!
//! * After every read (the first, and each one after a compaction, a wiped
//!   or restored etcd, or a newly registered service) every maintained key is
//!   compared with the table **by value and lease**, not by revision: etcd
//!   restored from an older snapshot holds older values at older revisions.
//!   Service keys under this registry's lease that the table no longer
//!   holds (deregistered while etcd was unreachable, or brought back by a
//!   snapshot) are deleted.
//! * Each later event of a maintained key is reconciled on its own.
//! * One key that cannot be reconciled (refused, malformed) is logged and
//!   retried later; it never holds up the others.
//! * While a restore under a new lease is pending, it leaves the keys to it.
//! * A key with a write of ours in flight is left to that write, but the
//!   event is remembered ([`super::pending`]): once the write ends, a key
//!   whose last acknowledged write is older than what was seen is read and
//!   reconciled again; and no key waits longer than
//!   [`super::pending::DEFER_BOUND`] for a write, whatever is in flight.
//!
//! The invariant: every registration whose last `register` or `update`
//! returned `Ok` is in etcd with that value within one round of this task
//! (a read, or the event of the change), whatever happened to earlier
//! attempts that failed or were dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Weak;

use etcd_client::{Compare, CompareOp, EventType, KeyValue, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use super::{Table, Written};
use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::stream::{Item, Listed};

/// Past this many services, one watch covers the whole namespace instead of
/// one per service.
const MAX_SCOPED_SERVICES: usize = 64;

/// Keys that failed to reconcile: warned about once, then retried and
/// logged at DEBUG until they succeed. A transient failure (a timeout, a
/// connection lost under a fault) is retried on its own within about a
/// second ([`RECHECK_TICK`]), so that one round of anti-entropy is a bounded
/// time however many faults came before; every failing key is also retried
/// by a full read with a growing delay (1 s to 60 s), which is what keeps a
/// refused key (permission denied) from being asked again and again.
struct Failing {
    keys: HashSet<String>,
    retry: Backoff,
}

impl Failing {
    fn failed(&mut self, table: &Table, key: &str, error: &Error) {
        if error.is_transient() {
            table.retry_soon(key);
        }
        if self.keys.insert(key.to_owned()) {
            tracing::warn!(%error, key, "could not reconcile a maintained instance; retrying it in the background (further failures at DEBUG)");
        } else {
            tracing::debug!(%error, key, "reconciling a maintained instance failed again");
        }
    }

    fn succeeded(&mut self, key: &str) {
        if self.keys.remove(key) {
            tracing::info!(
                key,
                "a maintained instance that could not be reconciled is in step again"
            );
        }
        if self.keys.is_empty() {
            self.retry.reset();
        }
    }
}

/// The anti-entropy task; ends when the registry closes or is dropped.
pub(super) async fn run(table: Weak<Table>, cancel: CancellationToken) {
    let mut retry = crate::backoff::Retry::standard("the registration watch");
    let mut failing = Failing {
        keys: HashSet::new(),
        retry: Backoff::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        ),
    };
    loop {
        let Some(t) = table.upgrade() else { return };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            r = pass(&t, &mut failing) => r,
        };
        drop(t);
        match outcome {
            Ok(()) => retry.succeeded(),
            Err(Error::Closed) => return,
            Err(error) => {
                if !retry.failed(&cancel, &error).await {
                    return;
                }
            }
        }
    }
}

/// One scope of services: read, reconcile, then follow events until the
/// scope must change (a new service, a finished restore).
async fn pass(table: &Table, failing: &mut Failing) -> Result<()> {
    let core = &table.core;
    core.session
        .wait_lease(std::time::Duration::from_secs(3600), &core.cancel)
        .await?;
    let services = table.services();
    if services.is_empty() {
        table.resync.notified().await;
        return Ok(());
    }
    let mut prefixes: Vec<String> = if services.len() > MAX_SCOPED_SERVICES {
        vec![core.keys.services_prefix().to_owned()]
    } else {
        services
            .iter()
            .map(|s| core.keys.service_prefix(s))
            .collect()
    };
    // The gRPC naming targets it publishes under (and those of mirror keys
    // left to delete).
    let targets = table.mirrors().targets();
    prefixes.extend(targets.iter().map(|t| crate::naming::naming_prefix(t)));
    prefixes.sort();
    prefixes.dedup();
    let mut stream = core.stream(prefixes, true, "registrations");
    loop {
        let read = stream
            .list(
                "get",
                HashMap::new,
                |present: &mut HashMap<String, KeyValue>, kvs| {
                    for kv in kvs {
                        if let Ok(key) = std::str::from_utf8(kv.key()) {
                            present.insert(key.to_owned(), kv);
                        }
                    }
                },
            )
            .await?;
        reconcile_all(table, read, failing).await;
        let retry_in = failing.retry.next_delay();
        loop {
            let retry = !failing.keys.is_empty();
            let deferred = !table.deferred_keys().is_empty() || !table.mirrors().orphans.is_empty();
            let item = tokio::select! {
                i = stream.next() => i?,
                // A new service, or a restore finished: read again, wider.
                _ = table.resync.notified() => return Ok(()),
                // Keys that failed: a full read retries them.
                _ = tokio::time::sleep(retry_in), if retry => break,
                // A write that anti-entropy deferred to ended, or the bound
                // of a deferral is near.
                _ = table.recheck.notified() => {
                    recheck(table, failing).await?;
                    continue;
                }
                _ = tokio::time::sleep(RECHECK_TICK), if deferred => {
                    recheck(table, failing).await?;
                    continue;
                }
            };
            match item {
                // A broken stream may hide a wiped or restored etcd (whose
                // revision went back): a read of our services settles it.
                Item::Interrupted | Item::Reset(_) => break,
                Item::Events(events) => {
                    for event in events {
                        let Some(kv) = event.kv() else { continue };
                        let Ok(key) = std::str::from_utf8(kv.key()) else {
                            continue;
                        };
                        let present = (event.event_type() == EventType::Put).then_some(kv);
                        let seen = Seen::Event(kv.mod_revision());
                        let done = if table.lock().contains_key(key) || !table.is_mirror_key(key) {
                            reconcile(table, key, present, seen).await
                        } else {
                            table.reconcile_mirror(key, present, seen).await
                        };
                        match done {
                            Ok(()) => failing.succeeded(key),
                            Err(Error::Closed) => return Err(Error::Closed),
                            Err(error) => failing.failed(table, key, &error),
                        }
                    }
                }
            }
        }
    }
}

/// Reconciles every maintained key against a full read, and deletes our
/// stray keys. Keys that fail are recorded in `failing` (retried later).
async fn reconcile_all(
    table: &Table,
    read: Listed<HashMap<String, KeyValue>>,
    failing: &mut Failing,
) {
    let present = read.value;
    if read.history_changed {
        // etcd's revisions restarted (wiped, restored from a snapshot): our
        // recorded revisions mean nothing in the new history.
        for e in table.lock().values_mut() {
            if let Some(w) = e.written.as_mut() {
                w.revision = 0;
            }
        }
    }
    let maintained: HashSet<String> = table.lock().keys().cloned().collect();
    for key in &maintained {
        match reconcile(table, key, present.get(key), Seen::Read(read.revision)).await {
            Ok(()) => failing.succeeded(key),
            Err(Error::Closed) => return,
            Err(error) => failing.failed(table, key, &error),
        }
    }
    // Keys under our current lease that the table does not hold.
    let Some(lease) = table.core.session.lease() else {
        return;
    };
    // gRPC naming keys: the published ones, and any of ours under a target.
    let mut mirrors: HashSet<String> = table
        .lock()
        .values()
        .filter_map(|e| e.mirror.as_ref().map(|m| m.key.clone()))
        .collect();
    mirrors.extend(
        present
            .keys()
            .filter(|k| !k.starts_with(table.core.keys.services_prefix()))
            .cloned(),
    );
    mirrors.extend(table.mirrors().orphans.keys().cloned());
    for key in &mirrors {
        let seen = Seen::Read(read.revision);
        match table.reconcile_mirror(key, present.get(key), seen).await {
            Ok(()) => failing.succeeded(key),
            Err(Error::Closed) => return,
            Err(error) => failing.failed(table, key, &error),
        }
    }
    for (key, kv) in &present {
        if !key.starts_with(table.core.keys.services_prefix()) {
            continue; // gRPC naming keys: reconciled above
        }
        if kv.lease() == lease.id && !maintained.contains(key) && !table.lock().contains_key(key) {
            if !failing.keys.contains(key) {
                tracing::warn!(
                    key,
                    "a key under this registry's lease is no registration of it (deregistered while etcd was unreachable, or restored from a snapshot); deleting it"
                );
            }
            let txn = Txn::new()
                .when([
                    Compare::lease(key.as_str(), CompareOp::Equal, lease.id),
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
                ])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            let deleted = table
                .core
                .conn
                .retry_on("delete", key, |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await;
            match deleted {
                Ok(_) => failing.succeeded(key),
                Err(error) => failing.failed(table, key, &error),
            }
        }
    }
}

/// The most keys one recheck reads (each is a request); more wait for the
/// next tick, or a full read.
const MAX_RECHECKS: usize = 256;

/// How often deferred keys are looked at while any is pending.
const RECHECK_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How anti-entropy saw a key.
#[derive(Clone, Copy)]
pub(super) enum Seen {
    /// A watch event at this revision: older than our last write, it is ours
    /// or stale.
    Event(i64),
    /// A read at this revision, compared by value.
    Read(i64),
    /// A read for a deferral past its bound: decided now, whatever is in flight.
    Forced(i64),
}

impl Seen {
    /// Whether what was seen says nothing past a write of ours at `written`:
    /// that write's own event, or an older one. Reads are compared by value
    /// only, never by revision: etcd restored from an older snapshot may
    /// answer at a revision below our last write without this history
    /// change being noticed yet (a stream that had seen little of the old
    /// one), and a key it lost would then be taken for in step.
    pub(super) fn older_than(self, written: i64) -> bool {
        match self {
            Seen::Event(r) => r <= written,
            Seen::Read(_) | Seen::Forced(_) => false,
        }
    }

    pub(super) fn revision(self) -> i64 {
        match self {
            Seen::Event(r) | Seen::Read(r) | Seen::Forced(r) => r,
        }
    }
}

/// Reads and reconciles the deferred keys whose writes ended, or whose
/// deferral is past its bound.
async fn recheck(table: &Table, failing: &mut Failing) -> Result<()> {
    if !table.mirrors().orphans.is_empty() {
        table.delete_orphans().await;
    }
    let due: Vec<(String, bool)> = {
        let keys: Vec<String> = table.deferred_keys().iter().cloned().collect();
        let mut done = Vec::new();
        let mut due = Vec::new();
        let entries = table.lock();
        for key in keys {
            if due.len() >= MAX_RECHECKS {
                break; // the rest on the next tick
            }
            match entries.get(&key).and_then(|e| e.deferred.map(|d| (e, d))) {
                None => done.push(key),
                Some((e, _)) if e.writing == 0 => due.push((key, false)),
                Some((_, d)) if d.since.elapsed() >= super::pending::DEFER_BOUND => {
                    due.push((key, true));
                }
                Some(_) => {}
            }
        }
        drop(entries);
        let mut set = table.deferred_keys();
        for key in done.iter().chain(due.iter().map(|(k, _)| k)) {
            set.remove(key);
        }
        due
    };
    for (key, forced) in due {
        let mirror = table
            .lock()
            .get(&key)
            .and_then(|e| e.mirror.as_ref().map(|m| m.key.clone()));
        if let Some(mirror) = mirror {
            check_mirror(table, &mirror, forced, failing).await?;
        }
        let read = table
            .core
            .conn
            .retry_on("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await;
        let outcome = match read {
            Ok(resp) => {
                let revision = resp.header().map_or(0, |h| h.revision());
                let seen = if forced {
                    Seen::Forced(revision)
                } else {
                    Seen::Read(revision)
                };
                reconcile(table, &key, resp.kvs().first(), seen).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => failing.succeeded(&key),
            Err(Error::Closed) => return Err(Error::Closed),
            Err(error) => {
                // Read again with the next full read (failing keys force one).
                failing.failed(table, &key, &error);
            }
        }
    }
    Ok(())
}

/// Reads one mirror key and reconciles it.
async fn check_mirror(table: &Table, key: &str, forced: bool, failing: &mut Failing) -> Result<()> {
    let read = table
        .core
        .conn
        .retry_on("get", key, |mut c| {
            let key = key.to_owned();
            async move { c.get(key, None).await }
        })
        .await;
    let outcome = match read {
        Ok(resp) => {
            let revision = resp.header().map_or(0, |h| h.revision());
            let seen = if forced {
                Seen::Forced(revision)
            } else {
                Seen::Read(revision)
            };
            table.reconcile_mirror(key, resp.kvs().first(), seen).await
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(()) => failing.succeeded(key),
        Err(Error::Closed) => return Err(Error::Closed),
        Err(error) => failing.failed(table, key, &error),
    }
    Ok(())
}

/// What to do with one maintained key as etcd holds it (`kv`, `None` when
/// absent), as `seen`.
async fn reconcile(table: &Table, key: &str, kv: Option<&KeyValue>, seen: Seen) -> Result<()> {
    let core = &table.core;
    if !table.restored() {
        return Ok(()); // the restore under the new lease covers every key
    }
    let Some(lease) = core.session.lease() else {
        return Ok(());
    };
    let (reclaimed, value, mirror, generation, name, id) = {
        let mut entries = table.lock();
        let Some(entry) = entries.get_mut(key) else {
            return Ok(());
        };
        // Out of service (unhealthy, in maintenance, drained): never restored.
        if !entry.serving {
            return Ok(());
        }
        if let Some(w) = entry.written
            && seen.older_than(w.revision)
        {
            return Ok(()); // our own write, or older
        }
        // A write of ours in flight decides this key, once its answer is
        // recorded; what was seen meanwhile is remembered, and looked at
        // again when the write ends (or the bound passes).
        if entry.writing > 0 && !matches!(seen, Seen::Forced(_)) {
            table.defer(entry, key, seen.revision());
            return Ok(());
        }
        entry.deferred = None;
        if let Some(kv) = kv {
            let holder = kv.lease();
            if holder != 0 && !core.session.is_owned(holder) {
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
                // Under a lease of ours. The value we hold: in step. Another
                // one while a write of ours is in flight: that write decides.
                if kv.value() == entry.value.as_slice() {
                    if holder == lease.id {
                        entry.written = Some(Written {
                            generation: entry.generation,
                            revision: kv.mod_revision(),
                        });
                    }
                    return Ok(());
                }
            }
        }
        (
            entry.yielded,
            entry.value.clone(),
            entry.mirror.clone(),
            entry.generation,
            entry.instance.name.clone(),
            entry.instance.id.clone(),
        )
    };
    // Written only if the key is still as observed: if its owner (or a new
    // one) wrote it since, that write's event decides instead of this one.
    let observed = kv.map_or(0, KeyValue::mod_revision);
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, observed)])
        .and_then(
            std::iter::once(TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease.id)),
            ))
            .chain(mirror.map(|m| m.put(lease.id)))
            .collect::<Vec<_>>(),
        );
    let resp = core
        .conn
        .retry_on("restore", key, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await;
    match resp {
        Ok(resp) if resp.succeeded() => {
            // Logged once done: a read older than our own write finds the
            // key changed since, and its txn does nothing.
            if reclaimed {
                tracing::warn!(service = %name, id = %id, "the instance taken over by another lease was gone or unleased; reclaimed it");
            } else {
                tracing::warn!(service = %name, id = %id, "a maintained instance was deleted or altered; restored it");
            }
            crate::metrics::restored(core.namespace(), &name);
            let gone = match table.lock().get_mut(key) {
                Some(e) => {
                    e.yielded = false;
                    if e.generation == generation {
                        e.written = Some(Written {
                            generation,
                            revision: resp.header().map_or(0, |h| h.revision()),
                        });
                    }
                    false
                }
                None => true,
            };
            if gone {
                // Deregistered meanwhile: do not leave the key behind.
                table.delete_if_ours(key, lease.id).await?;
            }
            tracing::debug!(service = %name, id = %id, "restored");
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
                core.session.suspect_lost();
                return Ok(());
            }
            Err(e)
        }
    }
}
