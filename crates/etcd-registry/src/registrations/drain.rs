//! Drain: every maintained key out of etcd at once, and kept out.

use std::sync::atomic::Ordering;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::Table;
use crate::error::Result;

impl Table {
    /// Marks the registry draining and deletes every maintained key that is
    /// in etcd, in batches that fit etcd's limits.
    pub(super) async fn drain_all(&self) -> Result<()> {
        self.draining.store(true, Ordering::SeqCst);
        let keys: Vec<String> = {
            let mut entries = self.lock();
            // Mirrors are deleted as keys of their own, on the same condition.
            // A shared mirror key is deleted once: etcd refuses a
            // transaction that names a key twice.
            let keys: std::collections::BTreeSet<String> = entries
                .iter()
                .filter(|(_, e)| e.serving && !e.yielded)
                .flat_map(|(k, e)| {
                    std::iter::once(k.clone()).chain(e.mirror.as_ref().map(|m| m.key.clone()))
                })
                .collect();
            let keys: Vec<String> = keys.into_iter().collect();
            for e in entries.values_mut() {
                e.serving = false;
                e.generation += 1;
            }
            keys
        };
        let Some(lease) = self.core.session.lease() else {
            return Ok(());
        };
        let max_ops = (self.max_ops.load(Ordering::Relaxed) / 2).max(1);
        for chunk in keys.chunks(max_ops) {
            // Each key is a compare and a delete.
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
                .core
                .conn
                .retry("drain", |mut c| {
                    let txn = Txn::new().when(compares.clone()).and_then(deletes.clone());
                    async move { c.txn(txn).await }
                })
                .await;
            match resp {
                Ok(r) if r.succeeded() => {}
                _ => {
                    for k in chunk {
                        self.delete_if_ours(k, lease.id).await?;
                    }
                }
            }
        }
        tracing::info!(count = keys.len(), "drained: every instance key deleted");
        Ok(())
    }
}
