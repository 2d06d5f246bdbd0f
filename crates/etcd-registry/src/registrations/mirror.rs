//! Publishing an entry a second time, in gRPC's etcd naming layout
//! ([`crate::naming`]): the mirror key of an entry, written in the same
//! transaction as the entry's key and under the same lease, deleted with it.

use std::collections::{HashMap, HashSet};
use std::sync::MutexGuard;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::Table;
use crate::error::Result;
use crate::instance::ServiceInstance;
use crate::naming::Publish;

/// A second key that publishes an entry elsewhere (gRPC's etcd naming
/// layout, see [`crate::naming`]): written in the same transaction as the
/// entry's key, under the same lease, and deleted with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mirror {
    /// The naming target it was published under.
    pub(crate) target: String,
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
}

impl Mirror {
    pub(crate) fn new(target: &str, instance: &ServiceInstance) -> Result<Self> {
        let (key, value) = crate::naming::entry_for(target, instance)?;
        Ok(Self {
            target: target.to_owned(),
            key,
            value,
        })
    }

    /// The put of the mirror under `lease`.
    pub(crate) fn put(&self, lease: i64) -> TxnOp {
        TxnOp::put(
            self.key.as_str(),
            self.value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
    }
}

impl Table {
    /// Where `instance` is published besides its key: `publish` when given,
    /// else the registry's gRPC naming template, if any. Checked here, so
    /// that a bad target or port fails before anything is written.
    pub(super) fn mirror_for(
        &self,
        instance: &ServiceInstance,
        publish: Option<&Publish>,
    ) -> Result<Option<Mirror>> {
        let target = match publish {
            Some(Publish::GrpcNaming { target }) => Some(target.clone()),
            None => self
                .core
                .config
                .grpc_naming
                .as_deref()
                .map(|t| crate::naming::target_for(t, &instance.name)),
        };
        target.map(|t| Mirror::new(&t, instance)).transpose()
    }

    /// A take-over put of `key` and its mirror in one transaction: the
    /// revision, and the lease that held `key` before, if it existed.
    pub(super) async fn put_with_mirror(
        &self,
        key: &str,
        value: &[u8],
        mirror: &Mirror,
        lease: i64,
    ) -> Result<(i64, Option<i64>)> {
        let options = PutOptions::new().with_lease(lease).with_prev_key();
        let put = TxnOp::put(key, value.to_vec(), Some(options));
        let txn = Txn::new().and_then([put, mirror.put(lease)]);
        let resp = self
            .core
            .conn
            .retry_on("put", key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let prev = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Put(p) => p.prev_key().map(|kv| kv.lease()),
            _ => None,
        });
        Ok((resp.header().map_or(0, |h| h.revision()), prev))
    }

    /// The delete of `key` if `lease` holds it, with the deletes (each on
    /// the same condition for itself) of the mirror keys that go with it:
    /// the ones its entry left behind (deregistered, or moved to another
    /// address), and its own when the entry is out of service, unless
    /// another entry that is in service publishes the same one. One
    /// transaction; also returns those mirror keys.
    pub(super) fn delete_txn(&self, key: &str, lease: i64) -> (Txn, Vec<String>) {
        let if_ours = |k: &str| {
            Txn::new()
                .when([Compare::lease(k, CompareOp::Equal, lease)])
                .and_then([TxnOp::delete(k, None)])
        };
        let mirrors = {
            let entries = self.lock();
            let book = self.mirrors();
            let mut out: Vec<String> = book
                .orphans
                .iter()
                .filter(|(_, o)| o.left_by == key)
                .map(|(m, _)| m.clone())
                .collect();
            if let Some(m) = entries.get(key).and_then(|e| e.mirror.as_ref())
                && !book.served_by_another(&entries, &m.key, key)
            {
                out.push(m.key.clone());
            }
            out.sort();
            out.dedup();
            out
        };
        let txn = if mirrors.is_empty() {
            if_ours(key)
        } else {
            Txn::new().and_then(
                std::iter::once(TxnOp::txn(if_ours(key)))
                    .chain(mirrors.iter().map(|m| TxnOp::txn(if_ours(m))))
                    .collect::<Vec<_>>(),
            )
        };
        (txn, mirrors)
    }

    /// Whether `key`'s entry left a mirror key that nobody publishes now.
    pub(super) fn left_orphans(&self, key: &str) -> bool {
        self.mirrors().orphans.values().any(|o| o.left_by == key)
    }

    /// The mirror keys deleted with `key` are gone: no longer orphans.
    pub(super) fn mirrors_deleted(&self, key: &str, mirrors: &[String]) {
        let mut book = self.mirrors();
        for m in mirrors {
            if book.orphans.get(m).is_some_and(|o| o.left_by == key) {
                book.orphans.remove(m);
            }
        }
    }

    /// Records that `key`'s entry publishes `new` instead of `old`; returns
    /// whether `new` is under a target not published before (anti-entropy
    /// must widen its scope).
    pub(super) fn republish(&self, key: &str, old: Option<&Mirror>, new: Option<&Mirror>) -> bool {
        if old.map(|m| &m.key) == new.map(|m| &m.key) {
            return false;
        }
        let mut book = self.mirrors();
        if let Some(old) = old {
            book.unpublish(key, old);
        }
        new.is_some_and(|new| book.publish(key, new))
    }

    pub(super) fn mirrors(&self) -> MutexGuard<'_, MirrorBook> {
        self.mirrors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Which entries publish each mirror key, and the mirror keys of ours that
/// none publishes any more (to be deleted while our lease holds them).
/// Locked inside the table lock, never around it.
#[derive(Default)]
pub(crate) struct MirrorBook {
    /// Mirror key -> the entry keys that publish it (two ids of one server
    /// under one target share one).
    refs: HashMap<String, HashSet<String>>,
    /// The targets of `refs`, with how many mirror keys each has.
    targets: HashMap<String, usize>,
    /// Mirror keys that no entry publishes any more.
    pub(crate) orphans: HashMap<String, Orphan>,
}

/// A mirror key no entry publishes any more.
#[derive(Clone, Debug)]
pub(crate) struct Orphan {
    pub(crate) target: String,
    /// The entry key that published it last: deleted with that key.
    pub(crate) left_by: String,
}

impl MirrorBook {
    /// Returns whether the target is new.
    fn publish(&mut self, key: &str, m: &Mirror) -> bool {
        self.orphans.remove(&m.key);
        let refs = self.refs.entry(m.key.clone()).or_default();
        let first = refs.is_empty();
        refs.insert(key.to_owned());
        if !first {
            return false;
        }
        let n = self.targets.entry(m.target.clone()).or_default();
        *n += 1;
        *n == 1
    }

    fn unpublish(&mut self, key: &str, m: &Mirror) {
        let Some(refs) = self.refs.get_mut(&m.key) else {
            return;
        };
        refs.remove(key);
        if !refs.is_empty() {
            return;
        }
        self.refs.remove(&m.key);
        if let Some(n) = self.targets.get_mut(&m.target) {
            *n -= 1;
            if *n == 0 {
                self.targets.remove(&m.target);
            }
        }
        self.orphans.insert(
            m.key.clone(),
            Orphan {
                target: m.target.clone(),
                left_by: key.to_owned(),
            },
        );
    }

    /// The entry `key` left the table.
    pub(super) fn forget(&mut self, key: &str, mirror: Option<&Mirror>) {
        if let Some(m) = mirror {
            self.unpublish(key, m);
        }
    }

    /// Whether an entry other than `key` that is in service publishes `mirror`.
    pub(super) fn served_by_another(
        &self,
        entries: &HashMap<String, super::Entry>,
        mirror: &str,
        key: &str,
    ) -> bool {
        self.refs.get(mirror).is_some_and(|refs| {
            refs.iter()
                .any(|k| k != key && entries.get(k).is_some_and(|e| e.serving && !e.yielded))
        })
    }

    /// The entry keys that publish `mirror`.
    pub(super) fn publishers(&self, mirror: &str) -> Option<&HashSet<String>> {
        self.refs.get(mirror)
    }

    /// Every target anti-entropy watches: published ones and orphans'.
    pub(super) fn targets(&self) -> HashSet<String> {
        self.targets
            .keys()
            .cloned()
            .chain(self.orphans.values().map(|o| o.target.clone()))
            .collect()
    }

    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }
}
