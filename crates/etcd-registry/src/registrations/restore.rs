//! Restore: every maintained key back under a new lease, beside keep-alive.
//!
//! The session publishes each new lease and keeps it alive from the first
//! moment; this task sees the new lease and re-puts every serving
//! registration under it, in transactions sized to etcd's limits
//! (`max_txn_ops` operations and `max_request_bytes` bytes) and several at
//! a time. A batch etcd refuses for its size or its count is split in two
//! (and the limit learned), never sent again as it was; a single entry that
//! etcd still refuses is skipped with an error in the log.

use std::sync::Weak;
use std::sync::atomic::Ordering;

use etcd_client::{PutOptions, Txn, TxnOp};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Mirror, OP_OVERHEAD, REQUEST_MARGIN, Table, Written};
use crate::error::{Error, Result};

/// Batches in flight at once.
const CONCURRENT_BATCHES: usize = 8;

/// One entry as a batch sends it.
pub(super) struct Item {
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    /// Put in the same batch as the key.
    pub(super) mirror: Option<Mirror>,
    pub(super) generation: u64,
}

impl Item {
    /// Operations the item takes in a transaction.
    fn ops(&self) -> usize {
        1 + usize::from(self.mirror.is_some())
    }

    /// Bytes the item takes in a request.
    fn size(&self) -> usize {
        let mirror = self
            .mirror
            .as_ref()
            .map_or(0, |m| m.key.len() + m.value.len() + OP_OVERHEAD);
        self.key.len() + self.value.len() + OP_OVERHEAD + mirror
    }
}

/// Follows the session's lease; restores every registration under each new one.
pub(super) async fn run(table: Weak<Table>, cancel: CancellationToken) {
    let Some(mut leases) = table.upgrade().map(|t| t.core.session.leases()) else {
        return;
    };
    let mut retry = crate::backoff::Retry::standard("restoring registrations");
    loop {
        let lease = *leases.borrow_and_update();
        let pending = match (lease, table.upgrade()) {
            (_, None) => return,
            (Some(lease), Some(t)) if t.restored.load(Ordering::SeqCst) != lease.id => {
                Some((lease, t))
            }
            _ => None,
        };
        if let Some((lease, t)) = pending {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                r = restore_all(&t, lease.id) => r,
            };
            match outcome {
                Ok(count) => {
                    retry.succeeded();
                    t.restored.store(lease.id, Ordering::SeqCst);
                    t.core.session.mark_restored(lease.id);
                    tracing::info!(lease = %format_args!("{:x}", lease.id), count, "registrations restored under the new lease");
                    // Anything that changed meanwhile: anti-entropy reads again.
                    t.resync.notify_one();
                }
                Err(error) if error.is_lease_not_found() => {
                    tracing::warn!(lease = %format_args!("{:x}", lease.id), "new lease vanished while restoring; waiting for the next one");
                    t.core.session.suspect_lost();
                }
                Err(Error::Closed) => return,
                Err(error) => {
                    drop(t);
                    let error = format!("lease {:x}: {error}", lease.id);
                    if !retry.failed(&cancel, &error).await {
                        return;
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = leases.changed() => if changed.is_err() { return },
        }
    }
}

/// Re-puts every serving registration under `lease_id`; the count restored.
async fn restore_all(table: &Table, lease_id: i64) -> Result<usize> {
    let items: Vec<Item> = {
        let entries = table.lock();
        entries
            .iter()
            .filter(|(_, e)| e.serving && !e.yielded)
            .map(|(k, e)| Item {
                key: k.clone(),
                value: e.value.clone(),
                mirror: e.mirror.clone(),
                generation: e.generation,
            })
            .collect()
    };
    let count = items.len();
    put_all(table, lease_id, items).await?;
    Ok(count)
}

/// Puts every item under `lease_id` in batches that fit etcd's limits,
/// several at a time, and records each write; an entry that changed while
/// its batch was in flight is written again with its newer value.
pub(super) async fn put_all(table: &Table, lease_id: i64, items: Vec<Item>) -> Result<()> {
    let batches = batches(
        items,
        table.max_ops.load(Ordering::Relaxed),
        table.max_bytes.load(Ordering::Relaxed),
    );
    let mut sent = futures::stream::iter(batches.into_iter().map(|b| send(table, lease_id, b)))
        .buffer_unordered(CONCURRENT_BATCHES);
    let mut changed = Vec::new();
    while let Some(done) = sent.next().await {
        changed.extend(done?);
    }
    drop(sent);
    for key in changed {
        table.put(&key, super::Mode::TakeOver).await?;
    }
    Ok(())
}

/// Splits `items` into batches of at most `max_ops` operations and about
/// `max_bytes` bytes.
fn batches(items: Vec<Item>, max_ops: usize, max_bytes: usize) -> Vec<Vec<Item>> {
    let budget = max_bytes.saturating_sub(REQUEST_MARGIN).max(1);
    let mut out = Vec::new();
    let mut batch: Vec<Item> = Vec::new();
    let (mut bytes, mut ops) = (0, 0);
    for item in items {
        let size = item.size();
        if !batch.is_empty() && (ops + item.ops() > max_ops.max(1) || bytes + size > budget) {
            out.push(std::mem::take(&mut batch));
            (bytes, ops) = (0, 0);
        }
        bytes += size;
        ops += item.ops();
        batch.push(item);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// etcd refused the request for its size or its count of operations.
fn refused_as_too_big(e: &Error) -> Option<Limit> {
    let Error::Etcd {
        source: etcd_client::Error::GRpcStatus(s),
        ..
    } = e
    else {
        return None;
    };
    let m = s.message();
    if m.contains("too many operations") {
        Some(Limit::Ops)
    } else if m.contains("request is too large")
        || m.contains("larger than max")
        || s.code() == tonic::Code::ResourceExhausted
    {
        Some(Limit::Bytes)
    } else {
        None
    }
}

/// etcd refused the request as invalid (not for a limit).
fn refused_as_invalid(e: &Error) -> bool {
    matches!(e, Error::Etcd {
        source: etcd_client::Error::GRpcStatus(s),
        ..
    } if s.code() == tonic::Code::InvalidArgument)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    Ops,
    Bytes,
}

/// Sends one batch (split on refusal); returns the keys whose entry changed
/// while it was in flight.
fn send(
    table: &Table,
    lease_id: i64,
    batch: Vec<Item>,
) -> futures::future::BoxFuture<'_, Result<Vec<String>>> {
    Box::pin(async move {
        // Two entries can publish one mirror key (one server under two ids
        // and one target): etcd refuses a transaction that names a key
        // twice, so each mirror key is put once a batch.
        let mut mirrors = std::collections::HashSet::new();
        let ops: Vec<TxnOp> = batch
            .iter()
            .flat_map(|i| {
                let mirror = i
                    .mirror
                    .as_ref()
                    .filter(|m| mirrors.insert(m.key.as_str()))
                    .map(|m| m.put(lease_id));
                std::iter::once(TxnOp::put(
                    i.key.as_str(),
                    i.value.clone(),
                    Some(PutOptions::new().with_lease(lease_id)),
                ))
                .chain(mirror)
            })
            .collect();
        let resp = table
            .core
            .conn
            .retry("restore", |mut c| {
                let txn = Txn::new().and_then(ops.clone());
                async move { c.txn(txn).await }
            })
            .await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => match refused_as_too_big(&e) {
                Some(limit) if batch.len() > 1 => {
                    let half = batch.len() / 2;
                    let learned = match limit {
                        Limit::Ops => &table.max_ops,
                        Limit::Bytes => &table.max_bytes,
                    };
                    let now = match limit {
                        Limit::Ops => half.max(1),
                        Limit::Bytes => {
                            let bytes: usize = batch.iter().map(Item::size).sum();
                            (bytes / 2 + REQUEST_MARGIN).max(REQUEST_MARGIN + 1)
                        }
                    };
                    learned.fetch_min(now, Ordering::Relaxed);
                    tracing::warn!(
                        ?limit,
                        ops = batch.len(),
                        "etcd refused a restore batch as too big; splitting it"
                    );
                    let mut batch = batch;
                    let second = batch.split_off(half);
                    let mut changed = send(table, lease_id, batch).await?;
                    changed.extend(send(table, lease_id, second).await?);
                    return Ok(changed);
                }
                Some(_) => {
                    tracing::error!(key = %batch[0].key, error = %e, "etcd refuses this registration even on its own; it cannot be restored");
                    return Ok(Vec::new());
                }
                // Refused for what it holds, not its size (a request etcd
                // can never take, such as one key twice): sending it again
                // would fail forever and hold every restore up, so halve it
                // until the one entry at fault is found, and skip that one.
                None if refused_as_invalid(&e) && batch.len() > 1 => {
                    tracing::warn!(error = %e, ops = batch.len(), "etcd refused a restore batch; splitting it");
                    let mut batch = batch;
                    let second = batch.split_off(batch.len() / 2);
                    let mut changed = send(table, lease_id, batch).await?;
                    changed.extend(send(table, lease_id, second).await?);
                    return Ok(changed);
                }
                None if refused_as_invalid(&e) => {
                    tracing::error!(key = %batch[0].key, error = %e, "etcd refuses this registration even on its own; it cannot be restored");
                    return Ok(Vec::new());
                }
                None => return Err(e),
            },
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut entries = table.lock();
        let mut changed = Vec::new();
        for item in batch {
            let Some(e) = entries.get_mut(&item.key) else {
                continue;
            };
            if e.generation == item.generation {
                e.written = Some(Written {
                    generation: item.generation,
                    revision,
                });
            } else {
                changed.push(item.key);
            }
        }
        Ok(changed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize, bytes: usize) -> Item {
        Item {
            key: format!("k{n}"),
            value: vec![b'x'; bytes],
            mirror: None,
            generation: 1,
        }
    }

    #[test]
    fn batches_respect_both_the_op_count_and_the_byte_budget() {
        let items = (0..300).map(|n| item(n, 10)).collect();
        let b = batches(items, 128, 1 << 20);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [128, 128, 44]);
        // 200 KiB values under a 256 KiB limit: one a batch.
        let items = (0..5).map(|n| item(n, 200 << 10)).collect();
        let b = batches(items, 16, 256 << 10);
        assert_eq!(b.len(), 5);
        // An oversized entry still goes alone (etcd decides).
        let b = batches(vec![item(0, 10), item(1, 1 << 20), item(2, 10)], 16, 4096);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
    }
}
