//! Anti-entropy for the mirror keys (gRPC naming): the same invariants as
//! the instance keys, on the target prefixes the registry publishes under.
//!
//! * A mirror key that an entry in service publishes is in etcd under our
//!   lease with one of its publishers' values: one deleted or altered on its
//!   own is put back. One held by another live lease is left alone.
//! * A mirror key of ours that no entry publishes any more (its entry was
//!   deregistered, or moved to another address, and the delete failed or
//!   was dropped; or etcd came back from a snapshot) is deleted while our
//!   current lease holds it.
//! * Two entries may publish one mirror key (one server under two ids and
//!   one target): it stays while either is in service.

use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::Table;
use super::keeper::Seen;
use crate::error::Result;

/// What one mirror key needs.
enum Plan {
    Nothing,
    /// Put this value, if the key is still at this revision.
    Put(Vec<u8>, i64),
    /// Delete it, if our lease still holds it at this revision; `true` when
    /// no orphan of ours (worth a warning once it is done).
    Delete(i64, bool),
}

impl Table {
    /// Whether `key` is a mirror key anti-entropy looks after: one that is
    /// published, an orphan, or under a published target, and no instance key.
    pub(super) fn is_mirror_key(&self, key: &str) -> bool {
        if key.starts_with(self.core.keys.services_prefix()) {
            return false;
        }
        let book = self.mirrors();
        book.publishers(key).is_some()
            || book.orphans.contains_key(key)
            || book
                .targets()
                .iter()
                .any(|t| crate::naming::parse_naming_key(t, key).is_some())
    }

    /// Reconciles one mirror key as etcd holds it (`kv`, `None` if absent).
    pub(super) async fn reconcile_mirror(
        &self,
        key: &str,
        kv: Option<&KeyValue>,
        seen: Seen,
    ) -> Result<()> {
        if !self.restored() {
            return Ok(()); // the restore puts every mirror back
        }
        let Some(lease) = self.core.session.lease() else {
            return Ok(());
        };
        let plan = {
            let mut entries = self.lock();
            let book = self.mirrors();
            match book.publishers(key) {
                Some(publishers) => {
                    let publishers: Vec<String> = publishers.iter().cloned().collect();
                    drop(book);
                    let mut values = Vec::new();
                    let mut in_flight = false;
                    for p in &publishers {
                        let Some(e) = entries.get_mut(p) else {
                            continue;
                        };
                        if !e.serving || e.yielded {
                            continue;
                        }
                        if let Some(w) = e.written
                            && seen.older_than(w.revision)
                        {
                            // Written with this publisher's key, after what was seen.
                            return Ok(());
                        }
                        if e.writing > 0 && !matches!(seen, Seen::Forced(_)) {
                            // The entry's write carries the mirror: its end rechecks both.
                            self.defer(e, p, seen.revision());
                            in_flight = true;
                        }
                        if let Some(m) = &e.mirror {
                            values.push(m.value.clone());
                        }
                    }
                    match kv {
                        _ if in_flight || values.is_empty() => Plan::Nothing,
                        Some(kv) if kv.lease() != 0 && !self.core.session.is_owned(kv.lease()) => {
                            Plan::Nothing // another live registry publishes it too
                        }
                        Some(kv) if kv.lease() != 0 && values.iter().any(|v| v == kv.value()) => {
                            Plan::Nothing
                        }
                        _ => Plan::Put(values.swap_remove(0), kv.map_or(0, |kv| kv.mod_revision())),
                    }
                }
                None => match kv {
                    Some(kv) if kv.lease() == lease.id => {
                        Plan::Delete(kv.mod_revision(), !book.orphans.contains_key(key))
                    }
                    Some(kv) if self.core.session.is_owned(kv.lease()) => Plan::Nothing,
                    _ => {
                        drop(book);
                        self.mirrors().orphans.remove(key);
                        Plan::Nothing
                    }
                },
            }
        };
        let deleting = matches!(plan, Plan::Delete(..));
        let stray = matches!(plan, Plan::Delete(_, true));
        let txn = match plan {
            Plan::Nothing => return Ok(()),
            Plan::Put(value, observed) => Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, observed)])
                .and_then([TxnOp::put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(lease.id)),
                )]),
            Plan::Delete(observed, _) => Txn::new()
                .when([
                    Compare::lease(key, CompareOp::Equal, lease.id),
                    Compare::mod_revision(key, CompareOp::Equal, observed),
                ])
                .and_then([TxnOp::delete(key, None)]),
        };
        let resp = self
            .core
            .conn
            .retry_on("restore", key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        // Logged once done: a txn that found the key changed since it was
        // seen did nothing (a read older than our own write or delete).
        if resp.succeeded() && deleting {
            self.mirrors().orphans.remove(key);
            if stray {
                tracing::warn!(
                    key,
                    "a gRPC naming key under this registry's lease was published by none of its registrations; deleted it"
                );
            }
        } else if resp.succeeded() {
            tracing::warn!(
                key,
                "a published gRPC naming key was deleted or altered; restored it"
            );
        }
        Ok(())
    }

    /// Deletes every orphaned mirror key that our current lease holds, and
    /// forgets those that are gone or another's. Failures stay for the next
    /// round (logged at DEBUG: anti-entropy retries them on its tick).
    pub(super) async fn delete_orphans(&self) {
        let Some(lease) = self.core.session.lease() else {
            return;
        };
        let orphans: Vec<String> = self.mirrors().orphans.keys().cloned().collect();
        for key in orphans {
            let txn = Txn::new()
                .when([Compare::lease(key.as_str(), CompareOp::Equal, lease.id)])
                .and_then([TxnOp::delete(key.as_str(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = self
                .core
                .conn
                .retry_on("delete", &key, |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await;
            match resp {
                Ok(resp) => {
                    let held_by_ours = !resp.succeeded()
                        && resp.op_responses().into_iter().any(|op| match op {
                            TxnOpResponse::Get(g) => g
                                .kvs()
                                .first()
                                .is_some_and(|kv| self.core.session.is_owned(kv.lease())),
                            _ => false,
                        });
                    if !held_by_ours {
                        // Deleted, or absent, or another's: nothing of ours is left.
                        self.mirrors().orphans.remove(&key);
                    }
                }
                Err(error) => {
                    tracing::debug!(key, %error, "could not delete a gRPC naming key no registration publishes; retrying later");
                }
            }
        }
    }
}
