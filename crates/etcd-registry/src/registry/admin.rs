//! Admin deletes: instances whoever registered them, with the gRPC naming
//! keys published beside them.
//!
//! A registry publishes an instance's naming key (`{target}/{host:port}`)
//! under the same lease as the instance key. The admin does not know the
//! target, but the lease does: etcd lists the keys attached to a lease
//! (`LeaseTimeToLive` with keys). Of those, the naming keys whose address
//! is the deleted instance's go too, unless another instance key of that
//! lease still has the same address (one server under two ids shares one
//! naming key). Only keys under that lease are touched: a Go server's
//! naming key for the same address, under its own lease, stays.

use std::collections::{HashMap, HashSet};

use etcd_client::{
    Compare, CompareOp, DeleteOptions, KeyValue, LeaseTimeToLiveOptions, Txn, TxnOp, TxnOpResponse,
};

use super::Registry;
use crate::error::Result;
use crate::instance::ServiceInstance;
use crate::keys::validate_segment;

/// Operations per transaction for the reads and deletes here.
const CHUNK: usize = 64;

impl Registry {
    /// Admin: deletes one instance, whoever registered it, with the gRPC
    /// naming key published beside it: of the keys attached to the deleted
    /// instance's lease, the naming keys (`{target}/{host:port}`) of its
    /// address go too, unless another instance key of that lease still has
    /// the same address. Keys under other leases (a Go server's naming key
    /// for the same address) are never touched. Returns whether it existed.
    ///
    /// If this registry itself maintains the instance, it stops maintaining
    /// it. Another live registry that maintains it puts it back (both keys):
    /// deregister through that registry to remove it for good.
    pub async fn delete_instance(&self, name: &str, id: &str) -> Result<bool> {
        let _timer = crate::metrics::timer(self.core().namespace(), "delete");
        validate_segment("name", name)?;
        validate_segment("id", id)?;
        let key = self.core().keys.instance_key(name, id);
        // Forgotten first, so that anti-entropy does not put it back.
        self.inner.regs.forget_key(&key);
        // The deleted value says which lease and address its naming keys have.
        let resp = self
            .core()
            .conn
            .retry_on("delete", &key, |mut c| {
                let key = key.clone();
                async move {
                    c.delete(key, Some(DeleteOptions::new().with_prev_key()))
                        .await
                }
            })
            .await?;
        let naming = self.naming_keys_of(resp.prev_kvs()).await?;
        self.delete_naming_keys(naming).await?;
        Ok(resp.deleted() > 0)
    }

    /// Admin: deletes every instance of service `name`, whoever registered
    /// them, with their gRPC naming keys (as [`Registry::delete_instance`]
    /// finds them).
    /// Returns how many instances were deleted. `web` never touches `webhook`.
    pub async fn delete_service(&self, name: &str) -> Result<u64> {
        let _timer = crate::metrics::timer(self.core().namespace(), "delete");
        validate_segment("name", name)?;
        let prefix = self.core().keys.service_prefix(name);
        self.inner.regs.forget_prefix(&prefix);
        let resp = self
            .core()
            .conn
            .retry_on("delete", &prefix, |mut c| {
                let prefix = prefix.clone();
                async move {
                    let options = DeleteOptions::new().with_prefix().with_prev_key();
                    c.delete(prefix, Some(options)).await
                }
            })
            .await?;
        let naming = self.naming_keys_of(resp.prev_kvs()).await?;
        self.delete_naming_keys(naming).await?;
        Ok(resp.deleted().max(0) as u64)
    }

    /// The naming keys that go with the instance keys `deleted`, each with
    /// the lease that must still hold it.
    async fn naming_keys_of(&self, deleted: &[KeyValue]) -> Result<Vec<(String, i64)>> {
        let core = self.core();
        let gone: HashSet<&[u8]> = deleted.iter().map(KeyValue::key).collect();
        let mut by_lease: HashMap<i64, HashSet<String>> = HashMap::new();
        for kv in deleted.iter().filter(|kv| kv.lease() != 0) {
            if let Some(addr) = address_of(kv.value()) {
                by_lease.entry(kv.lease()).or_default().insert(addr);
            }
        }
        let mut out = Vec::new();
        for (lease, addrs) in by_lease {
            let attached = core
                .conn
                .retry("lease", |mut c| async move {
                    c.lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
                        .await
                })
                .await;
            let attached = match attached {
                Ok(resp) => resp.keys().to_vec(),
                Err(error) => {
                    tracing::warn!(lease = %format_args!("{lease:x}"), %error, "could not list the keys of a deleted instance's lease; its gRPC naming keys, if any, stay until the lease ends");
                    continue;
                }
            };
            let (instances, others): (Vec<Vec<u8>>, Vec<Vec<u8>>) = attached
                .into_iter()
                .partition(|k| k.starts_with(core.keys.services_prefix().as_bytes()));
            // The addresses that instances of this lease still have.
            let remaining: Vec<String> = instances
                .into_iter()
                .filter(|k| !gone.contains(k.as_slice()))
                .filter_map(|k| String::from_utf8(k).ok())
                .collect();
            let mut kept = HashSet::new();
            for chunk in remaining.chunks(CHUNK) {
                let gets: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
                let resp = core
                    .conn
                    .retry("get", |mut c| {
                        let txn = Txn::new().and_then(gets.clone());
                        async move { c.txn(txn).await }
                    })
                    .await?;
                for op in resp.op_responses() {
                    if let TxnOpResponse::Get(g) = op {
                        kept.extend(g.kvs().iter().filter_map(|kv| address_of(kv.value())));
                    }
                }
            }
            for key in others.into_iter().filter_map(|k| String::from_utf8(k).ok()) {
                let Some((_, addr)) = key.rsplit_once('/') else {
                    continue;
                };
                if addrs.contains(addr) && !kept.contains(addr) {
                    out.push((key, lease));
                }
            }
        }
        Ok(out)
    }

    /// Deletes each naming key while its lease still holds it.
    async fn delete_naming_keys(&self, keys: Vec<(String, i64)>) -> Result<()> {
        for chunk in keys.chunks(CHUNK) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, lease)| {
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::lease(k.as_str(), CompareOp::Equal, *lease)])
                            .and_then([TxnOp::delete(k.as_str(), None)]),
                    )
                })
                .collect();
            self.core()
                .conn
                .retry("delete", |mut c| {
                    let txn = Txn::new().and_then(ops.clone());
                    async move { c.txn(txn).await }
                })
                .await?;
        }
        Ok(())
    }
}

/// The `host:port` a naming key of this instance value would end with.
fn address_of(value: &[u8]) -> Option<String> {
    let instance = ServiceInstance::from_json(value).ok()?;
    crate::naming::endpoint_addr(&instance).ok()
}
