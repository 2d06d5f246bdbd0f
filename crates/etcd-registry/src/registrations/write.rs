//! One write of an entry's key (and its mirror) under a lease, as `put`
//! sends it: a take-over put for `register`, or a conditional one that
//! yields a key another live lease holds.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::{Mirror, Mode, Table};
use crate::error::Result;
use crate::session::Lease;

impl Table {
    /// One write of `value` under `lease`. Returns the revision, and the
    /// lease of another holder when `OwnOnly` found the key held by it.
    /// A mirror, if any, is written in the same transaction.
    pub(super) async fn write(
        &self,
        key: &str,
        value: &[u8],
        mirror: Option<&Mirror>,
        lease: Lease,
        mode: Mode,
    ) -> Result<(i64, Option<i64>)> {
        let puts = || {
            let mut ops = vec![TxnOp::put(
                key,
                value.to_vec(),
                Some(PutOptions::new().with_lease(lease.id)),
            )];
            ops.extend(mirror.map(|m| m.put(lease.id)));
            ops
        };
        match mode {
            Mode::TakeOver => {
                let (revision, prev_lease) = match mirror {
                    None => {
                        let resp = self
                            .core
                            .conn
                            .retry_on("put", key, |mut c| {
                                let (key, value) = (key.to_owned(), value.to_vec());
                                let options =
                                    PutOptions::new().with_lease(lease.id).with_prev_key();
                                async move { c.put(key, value, Some(options)).await }
                            })
                            .await?;
                        (
                            resp.header().map_or(0, |h| h.revision()),
                            resp.prev_key().map(|p| p.lease()),
                        )
                    }
                    Some(m) => self.put_with_mirror(key, value, m, lease.id).await?,
                };
                if let Some(prev) = prev_lease
                    && prev != 0
                    && !self.core.session.is_owned(prev)
                {
                    tracing::warn!(key, other_lease = %format_args!("{prev:x}"), "took over an instance id that another live lease held (last writer wins)");
                }
                Ok((revision, None))
            }
            Mode::OwnOnly => {
                // Ours, or absent / unleased (a missing key compares as lease 0);
                // else read who holds it. One round trip.
                let txn = Txn::new()
                    .when([Compare::lease(key, CompareOp::Equal, lease.id)])
                    .and_then(puts())
                    .or_else([TxnOp::txn(
                        Txn::new()
                            .when([Compare::lease(key, CompareOp::Equal, 0)])
                            .and_then(puts())
                            .or_else([TxnOp::get(key, None)]),
                    )]);
                let resp = self
                    .core
                    .conn
                    .retry_on("put", key, |mut c| {
                        let txn = txn.clone();
                        async move { c.txn(txn).await }
                    })
                    .await?;
                let revision = resp.header().map_or(0, |h| h.revision());
                if resp.succeeded() {
                    return Ok((revision, None));
                }
                let nested = resp.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Txn(t) => Some(t),
                    _ => None,
                });
                match nested {
                    Some(t) if t.succeeded() => Ok((revision, None)),
                    Some(t) => {
                        let holder = crate::conn::first_get_kv(&t).map_or(0, |kv| kv.lease());
                        if self.core.session.is_owned(holder) {
                            // An older lease of ours: as good as absent once it expires.
                            return Ok((revision, None));
                        }
                        Ok((revision, Some(holder)))
                    }
                    None => Ok((revision, None)),
                }
            }
        }
    }
}
