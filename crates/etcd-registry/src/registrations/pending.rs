//! Writes in flight, and the events anti-entropy defers to them.
//!
//! Anti-entropy leaves a key to a write of ours that is in flight: the
//! write's answer is recorded when it comes, and acting on the key in the
//! meantime would only race it. But an event seen while the write is in
//! flight may come *after* that write (an outside delete, or the late
//! delete of an earlier attempt that failed), so a deferred event is never
//! dropped: it is recorded in the entry with its revision, and once no
//! write is in flight any more, a key whose last recorded write is older
//! than the deferred event is read again and reconciled. A deferral also
//! has a bound ([`DEFER_BOUND`] past the first one, whatever is in flight),
//! so no entry is exempt from anti-entropy for longer than that.
//!
//! Every write of an entry by `put` holds a [`Writing`]; `register` holds
//! one from the moment its entry is recorded (the entry and the count go in
//! together, under the table lock), so no read can find the entry between
//! the two and take it for one that nothing writes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Entry, Table};

/// The longest a deferred key waits for the write in flight before
/// anti-entropy reads it again regardless (a write future can be parked, or
/// etcd slow to answer).
pub(crate) const DEFER_BOUND: Duration = Duration::from_secs(10);

/// An event (or a read) anti-entropy left to a write in flight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deferred {
    /// The newest revision deferred: a write recorded at or after it
    /// covers it.
    pub(crate) revision: i64,
    /// When the first of them was deferred.
    pub(crate) since: Instant,
}

/// A write of an entry in flight; counted in `Entry::writing` until dropped
/// (the future finished, failed, or was dropped).
pub(super) struct Writing<'a> {
    table: &'a Table,
    key: &'a str,
}

impl<'a> Writing<'a> {
    /// Takes over a count made under the table lock (by `Table::insert`,
    /// or `put` as it copies what it sends).
    pub(super) fn adopt(table: &'a Table, key: &'a str) -> Self {
        Self { table, key }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let recheck = {
            let mut entries = self.table.lock();
            let Some(e) = entries.get_mut(self.key) else {
                return;
            };
            e.writing = e.writing.saturating_sub(1);
            // The last write ended: read the key again if something was
            // deferred to it that it does not cover, or if the entry's
            // latest value was never acknowledged (the write failed or its
            // future was dropped): etcd may hold an older one.
            let unwritten =
                e.serving && !e.yielded && e.written.is_none_or(|w| w.generation != e.generation);
            e.writing == 0 && (settle_deferred(e) | unwritten)
        };
        if recheck {
            self.table.recheck_now(self.key);
        }
    }
}

/// Clears the entry's deferral if its last recorded write covers it;
/// `true` when it does not, so the key must be read again.
pub(super) fn settle_deferred(e: &mut Entry) -> bool {
    match (e.deferred, e.written) {
        (None, _) => false,
        (Some(d), Some(w)) if w.revision >= d.revision && w.generation == e.generation => {
            e.deferred = None;
            false
        }
        (Some(_), _) => true,
    }
}

impl Table {
    /// Records that anti-entropy left `key` (seen at `revision`) to a write
    /// in flight.
    pub(super) fn defer(&self, e: &mut Entry, key: &str, revision: i64) {
        let since = e.deferred.map_or_else(Instant::now, |d| d.since);
        let revision = e.deferred.map_or(revision, |d| d.revision.max(revision));
        e.deferred = Some(Deferred { revision, since });
        self.deferred_keys().insert(key.to_owned());
    }

    /// Asks anti-entropy to read `key` again on its next tick (a reconcile
    /// of it failed for a reason that may pass).
    pub(super) fn retry_soon(&self, key: &str) {
        {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(key) else {
                return; // not an entry (a mirror key): the next full read retries it
            };
            let since = e.deferred.map_or_else(Instant::now, |d| d.since);
            e.deferred = Some(Deferred {
                revision: i64::MAX,
                since,
            });
        }
        self.deferred_keys().insert(key.to_owned());
    }

    /// Asks anti-entropy to read `key` again now.
    pub(super) fn recheck_now(&self, key: &str) {
        if let Some(e) = self.lock().get_mut(key) {
            let since = e.deferred.map_or_else(Instant::now, |d| d.since);
            e.deferred = Some(Deferred {
                revision: i64::MAX,
                since,
            });
        }
        self.deferred_keys().insert(key.to_owned());
        self.recheck.notify_one();
    }

    pub(super) fn deferred_keys(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.deferred_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Forgets a registration whose `register` did not finish: it failed, or
/// its future was dropped. The caller got no handle, so nothing of it may
/// stay: the entry goes, and so does a write that may have landed.
pub(super) struct Unfinished {
    pub(super) table: Arc<Table>,
    pub(super) keys: Vec<(String, u64)>,
}

impl Unfinished {
    /// The register finished: the caller has its handles.
    pub(super) fn done(mut self) {
        self.keys.clear();
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.keys.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for (key, owner) in std::mem::take(&mut self.keys) {
            self.table.forget(&key, owner);
        }
    }
}

/// Test knob (see `Registry::set_write_hook_for_tests`): awaited after each
/// write of `put` came back from etcd, before its outcome is recorded.
pub(crate) type WriteHook =
    Arc<dyn Fn(&str) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

impl Table {
    pub(super) async fn after_write(&self, key: &str) {
        let hook = self
            .write_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(key).await;
        }
    }
}

impl super::Registrations {
    pub(crate) fn set_write_hook(&self, hook: Option<WriteHook>) {
        *self
            .table
            .write_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
    }
}
