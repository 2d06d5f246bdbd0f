//! Loading large data sets fast, for scale tests.

use etcd_client::{Client, Txn, TxnOp};
use tokio::task::JoinSet;

use crate::error::Result;

/// etcd's default `--max-txn-ops`: the most operations one transaction may hold.
pub const MAX_TXN_OPS: usize = 128;

/// How many transactions are in flight at once.
const CONCURRENT_TXNS: usize = 4;

/// Puts every `(key, value)` with raw transactions of [`MAX_TXN_OPS`] puts,
/// a few in flight at once: 100,000 keys take seconds, where one put each
/// would take minutes. Keys get no lease. Returns the revision of the last
/// transaction that answered.
///
/// ```no_run
/// # async fn demo(etcd: &etcd_registry_testkit::EtcdServer) -> etcd_registry_testkit::Result<()> {
/// let client = etcd.client().await?;
/// let kvs = (0..1000).map(|i| (format!("/bulk/{i:04}"), b"v".to_vec()));
/// etcd_registry_testkit::put_batched(&client, kvs).await?;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// The first transaction that failed; the keys of the others may be written.
pub async fn put_batched(
    client: &Client,
    kvs: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Result<i64> {
    let mut tasks: JoinSet<Result<i64>> = JoinSet::new();
    let mut revision = 0;
    let mut batch = Vec::with_capacity(MAX_TXN_OPS);
    let mut kvs = kvs.into_iter().peekable();
    while kvs.peek().is_some() {
        batch.extend(kvs.by_ref().take(MAX_TXN_OPS - batch.len()));
        if tasks.len() >= CONCURRENT_TXNS {
            revision = revision.max(joined(tasks.join_next().await)?);
        }
        let ops: Vec<TxnOp> = batch
            .drain(..)
            .map(|(k, v)| TxnOp::put(k, v, None))
            .collect();
        let mut client = client.clone();
        tasks.spawn(async move {
            let resp = client.txn(Txn::new().and_then(ops)).await?;
            Ok(resp.header().map_or(0, |h| h.revision()))
        });
    }
    while let Some(done) = tasks.join_next().await {
        revision = revision.max(joined(Some(done))?);
    }
    Ok(revision)
}

fn joined(done: Option<std::result::Result<Result<i64>, tokio::task::JoinError>>) -> Result<i64> {
    match done {
        Some(Ok(r)) => r,
        // A panicking task is a bug in this function; surface it as one.
        Some(Err(e)) => panic!("put_batched task failed: {e}"),
        None => Ok(0),
    }
}
