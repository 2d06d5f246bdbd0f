//! Publishing an entry a second time, in gRPC's etcd naming layout
//! ([`crate::naming`]): the mirror key of an entry, written in the same
//! transaction as the entry's key and under the same lease, deleted with it.

use std::collections::HashMap;
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

    /// The delete of `key` if `lease` holds it, with its mirror's on the
    /// same condition for the mirror, in one transaction; and the mirror key.
    pub(super) fn delete_txn(&self, key: &str, lease: i64) -> (Txn, Option<String>) {
        let if_ours = |k: &str| {
            Txn::new()
                .when([Compare::lease(k, CompareOp::Equal, lease)])
                .and_then([TxnOp::delete(k, None)])
        };
        let mirror = self.mirrors().get(key).cloned();
        let txn = match &mirror {
            None => if_ours(key),
            Some(m) => Txn::new().and_then([TxnOp::txn(if_ours(key)), TxnOp::txn(if_ours(m))]),
        };
        (txn, mirror)
    }

    pub(super) fn mirrors(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.mirrors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
