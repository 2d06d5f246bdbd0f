//! Batched registration and restore through a slow link (issue 23):
//! `register_all` of 10,000 instances against raw etcd-client transactions
//! of the same size and concurrency, and the time until 5,000 instances
//! are back after a wipe behind 200 ms of latency, with the grants counted.

use std::time::{Duration, Instant};

use etcd_client::{PutOptions, Txn, TxnOp};
use etcd_registry::Registry;
use etcd_registry_testkit::{Direction, EtcdServer, FaultProxy};
use futures::StreamExt;

use crate::measure::{R, bounded, until_count};
use crate::report::Row;
use crate::{Ctx, connect, inst};

const LIMIT: Duration = Duration::from_secs(120);

/// `register_all` of n instances, against raw puts in transactions of 128
/// under one lease, 8 transactions in flight (what `register_all` sends).
pub async fn register_all(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(10_000, 200);
    let etcd = EtcdServer::builder().name("batch").start().await?;
    let reg = connect(&etcd.endpoints(), "batch", 10).await?;
    let instances: Vec<_> = (0..n).map(|i| inst("many", i)).collect();
    let started = Instant::now();
    let regs = bounded("register_all", LIMIT, reg.register_all(instances)).await??;
    let ours = started.elapsed().as_secs_f64();
    assert_eq!(regs.len(), n);

    let client = etcd.client().await?;
    let lease = client.clone().lease_grant(30, None).await?.id();
    let values: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let i = inst("many", i);
            (format!("/raw/services/many/{}", i.id), i.to_json())
        })
        .collect();
    let started = Instant::now();
    let txns: Vec<Txn> = values
        .chunks(128)
        .map(|chunk| {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    TxnOp::put(
                        k.as_str(),
                        v.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            Txn::new().and_then(ops)
        })
        .collect();
    let calls = txns.into_iter().map(|txn| {
        let mut c = client.clone();
        async move { c.txn(txn).await }
    });
    let mut sent = futures::stream::iter(calls).buffer_unordered(8);
    while let Some(r) = sent.next().await {
        r?;
    }
    let raw = started.elapsed().as_secs_f64();
    drop(regs);
    reg.close().await?;
    Ok(vec![
        Row::new("register_all_10k", format!("register_all of {n} instances")).figure_vs(
            "seconds",
            format!("time for {n}"),
            ours,
            "s",
            "raw txns of 128, 8 in flight",
            raw,
        ),
    ])
}

/// n instances through a link with 200 ms of latency towards etcd; etcd
/// is wiped; the time until a direct client sees all n back, and how many
/// leases the new etcd granted (one: no re-grant while restoring).
pub async fn restore_slow_link(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(5_000, 200);
    let mut etcd = EtcdServer::builder().name("slowlink").start().await?;
    let proxy = FaultProxy::start(&etcd.endpoint()).await?;
    let reg: Registry = connect(&[proxy.endpoint()], "slow", 10).await?;
    let regs = bounded(
        "register_all",
        LIMIT,
        reg.register_all((0..n).map(|i| inst("slow", i)).collect()),
    )
    .await??;
    proxy.set_latency(Direction::ToServer, Duration::from_millis(200));
    etcd.restart_wiped().await?;
    let client = etcd.client().await?;
    let took = until_count(
        &client,
        "/etcd_registry/slow/services/slow/",
        n as i64,
        Duration::from_millis(10),
        LIMIT,
    )
    .await?;
    let metrics = etcd.metrics().await?;
    let grants = metrics
        .lines()
        .find(|l| l.starts_with("etcd_debugging_lease_granted_total "))
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    proxy.set_latency(Direction::ToServer, Duration::ZERO);
    drop(regs);
    reg.close().await?;
    Ok(vec![
        Row::new(
            "restore_5k_latency",
            format!("{n} instances back after a wipe, through 200 ms latency"),
        )
        .figure(
            "seconds",
            "time until all are back",
            took.as_secs_f64(),
            "s",
        )
        .figure("grants", "leases granted by the new etcd", grants, ""),
    ])
}
