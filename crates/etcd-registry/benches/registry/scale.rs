//! (c) Scale: 10,000 and 20,000 instances in one registry against raw puts
//! under one lease, the way back after a wiped restart, keep-alive traffic,
//! watch sharing between caches, and a namespace of 100,000 instances.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use etcd_registry_testkit::EtcdServer;
use futures::{StreamExt, stream};

use crate::measure::{BoxError, Hist, R, bounded, metric, settled, time, until_count};
use crate::report::Row;
use crate::{Ctx, connect, inst};

const OP: Duration = Duration::from_secs(60);
const WIDE: usize = 64;
/// After this long no new batch of the 20,000 starts (the last one and the
/// clean-up must still fit in the phase's 240 s).
const GROWTH_BUDGET: Duration = Duration::from_secs(150);
/// How long the 100,000-instance cache may take to be ready.
const CACHE_ALL: Duration = Duration::from_secs(40);
/// TTL of the registries that hold thousands of instances, the library's
/// default: one keep-alive every TTL/3, so a 20 s window sees about six. With
/// 5 s, 64-wide writes on a loaded 2-core machine delayed etcd's applies
/// ("waiting for the applied index took too long") until keep-alives failed
/// and the lease expired, over and over.
const KA_TTL: u64 = 10;

/// Writes `n` instances in the Go wire format straight into etcd, 128 puts
/// per transaction (etcd's default `--max-txn-ops`), spread over `services`
/// services `svc-0`, `svc-1`, …. Used to fill namespaces that are only read.
pub async fn fill(client: &Client, ns: &str, services: usize, n: usize) -> R<()> {
    let ids: Vec<usize> = (0..n).collect();
    let done: Vec<R<()>> = stream::iter(ids.chunks(128).map(<[usize]>::to_vec))
        .map(|chunk| {
            let mut c = client.clone();
            async move {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|&i| {
                        let svc = format!("svc-{}", i % services);
                        TxnOp::put(
                            format!("/etcd_registry/{ns}/services/{svc}/id-{i}"),
                            inst(&svc, i).to_json(),
                            None,
                        )
                    })
                    .collect();
                bounded("fill txn", OP, c.txn(Txn::new().and_then(ops))).await??;
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    done.into_iter().collect()
}

/// Lease renewals etcd counted during `window`, and keep-alive messages it received.
async fn keep_alives(etcd: &EtcdServer, window: Duration) -> R<(f64, f64)> {
    let read = |text: &str| {
        (
            metric(text, "etcd_debugging_lease_renewed_total", &[]),
            metric(
                text,
                "grpc_server_msg_received_total",
                &["grpc_method=\"LeaseKeepAlive\""],
            ),
        )
    };
    let before = read(&etcd.metrics().await?);
    tokio::time::sleep(window).await;
    let after = read(&etcd.metrics().await?);
    Ok((after.0 - before.0, after.1 - before.1))
}

/// Registers `ids` in `reg`, `WIDE` at a time; returns the handles and the wall time.
async fn register_wide(
    reg: &etcd_registry::Registry,
    service: &str,
    ids: std::ops::Range<usize>,
    h: &mut Hist,
) -> R<(Vec<etcd_registry::Registration>, Duration)> {
    let start = Instant::now();
    let done: Vec<R<_>> = stream::iter(ids)
        .map(|i| async move {
            let (r, d) = time(bounded("register", OP, reg.register(inst(service, i)))).await;
            Ok::<_, BoxError>((r??, d))
        })
        .buffer_unordered(WIDE)
        .collect()
        .await;
    let wall = start.elapsed();
    h.add_wall(wall);
    let mut regs = Vec::with_capacity(done.len());
    for r in done {
        let (r, d) = r?;
        h.record(d);
        regs.push(r);
    }
    Ok((regs, wall))
}

/// Raw puts of `ids` under one lease, `WIDE` at a time; returns the wall time.
async fn put_wide(
    client: &Client,
    lease: i64,
    ids: std::ops::Range<usize>,
    h: &mut Hist,
) -> R<Duration> {
    let start = Instant::now();
    let done: Vec<R<Duration>> = stream::iter(ids)
        .map(|i| {
            let mut c = client.clone();
            async move {
                let (r, d) = time(bounded(
                    "put",
                    OP,
                    c.put(
                        format!("/raw/scale/services/grow/id-{i}"),
                        inst("grow", i).to_json(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                ))
                .await;
                r??;
                Ok(d)
            }
        })
        .buffer_unordered(WIDE)
        .collect()
        .await;
    let wall = start.elapsed();
    h.add_wall(wall);
    for d in done {
        h.record(d?);
    }
    Ok(wall)
}

/// 20,000 instances registered in 1,000-instance batches, 64 wide, each
/// batch alternated with the same number of raw puts under one lease. The
/// first half is the 10,000-instance figure; keep-alive traffic is counted
/// with 10 instances first and again with 10,000.
pub async fn growth(ctx: Ctx) -> R<Vec<Row>> {
    let batch = ctx.plan.n(1000, 25);
    let batches = if ctx.plan.smoke { 4 } else { 20 };
    let mark = batches / 2;
    let window = if ctx.plan.smoke {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(20)
    };
    let etcd = EtcdServer::builder().name("scale").start().await?;
    let client = etcd.client().await?;

    // Keep-alive traffic with 10 instances (the only lease kept alive on this server).
    let small = connect(&etcd.endpoints(), "ka10", KA_TTL).await?;
    let mut keep = Vec::new();
    for i in 0..10 {
        keep.push(small.register(inst("ka", i)).await?);
    }
    let (renew_10, msgs_10) = keep_alives(&etcd, window).await?;
    drop(keep);
    small.close().await?;

    let reg = connect(&etcd.endpoints(), "scale", KA_TTL).await?;
    let lease = client.clone().lease_grant(3600, None).await?.id();
    let (mut ours, mut raw) = (Hist::new(), Hist::new());
    let (mut ours_half, mut raw_half) = (Duration::ZERO, Duration::ZERO);
    let mut keep = Vec::new();
    let mut worst: f64 = 0.0;
    let mut table = String::from(
        "| batch | keys in etcd before (both sides) | etcd-registry | raw puts, one lease | ours ÷ raw (time) |\n| --- | --- | --- | --- | --- |\n",
    );
    let mut renew_10k = (0.0, 0.0);
    // On a loaded machine 20 batches can take minutes; stopping early keeps
    // the figures gathered so far (the table says where it stopped).
    let budget = Instant::now() + GROWTH_BUDGET;
    let mut done = 0;
    for b in 0..batches {
        if b > mark && Instant::now() > budget {
            let _ = writeln!(
                table,
                "\nStopped after {b} batches: the phase's {GROWTH_BUDGET:?} budget was spent."
            );
            break;
        }
        done = b + 1;
        let ids = b * batch..(b + 1) * batch;
        let (regs, wo) = register_wide(&reg, "grow", ids.clone(), &mut ours).await?;
        keep.extend(regs);
        let wr = put_wide(&client, lease, ids, &mut raw).await?;
        let ratio = wo.as_secs_f64() / wr.as_secs_f64();
        worst = worst.max(ratio);
        let _ = writeln!(
            table,
            "| {} | {} | {:.0}/s | {:.0}/s | {ratio:.2}× |",
            b + 1,
            2 * b * batch,
            batch as f64 / wo.as_secs_f64(),
            batch as f64 / wr.as_secs_f64(),
        );
        if b < mark {
            ours_half += wo;
            raw_half += wr;
        }
        if b + 1 == mark {
            renew_10k = keep_alives(&etcd, window).await?;
        }
    }
    let half = batch * mark;
    let total = batch * done;
    drop(keep);
    reg.close().await?;
    client.clone().lease_revoke(lease).await?;

    let mut growth = Row::new(
        "register_20k",
        format!("register {total} in one registry, {WIDE} concurrent, in batches of {batch}"),
    )
    .latency(
        ours.summary("Registry::register"),
        Some(raw.summary("raw put, one lease")),
    )
    .figure(
        "worst_batch_ratio",
        "slowest batch, ours ÷ raw (time)",
        worst,
        "×",
    );
    growth.extra_md = Some(table);
    Ok(vec![
        Row::new(
            "register_10k",
            format!("register {half} in one registry, {WIDE} concurrent"),
        )
        .count(half)
        .figure_vs(
            "seconds",
            format!("time for {half} (first {mark} batches)"),
            ours_half.as_secs_f64(),
            "s",
            "raw puts, one lease",
            raw_half.as_secs_f64(),
        ),
        Row::new("keep_alive", "keep-alive traffic (etcd /metrics)")
            .count(half)
            .figure_vs(
                "renewals_big",
                format!("lease renewals in {window:?} at {half} instances"),
                renew_10k.0,
                "",
                "at 10 instances",
                renew_10,
            )
            .figure_vs(
                "messages_big",
                format!("LeaseKeepAlive messages in {window:?} at {half} instances"),
                renew_10k.1,
                "",
                "at 10 instances",
                msgs_10,
            ),
        growth,
    ])
}

/// 10,000 instances in one registry, then etcd restarted with its data
/// wiped: how long until all are back, timed from etcd answering health.
pub async fn wiped_10k(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(10_000, 50);
    let mut etcd = EtcdServer::builder().name("wipe10k").start().await?;
    let client = etcd.client().await?;
    let reg = connect(&etcd.endpoints(), "wipe", KA_TTL).await?;
    let mut h = Hist::new();
    let (keep, wall) = register_wide(&reg, "big", 0..n, &mut h).await?;
    let prefix = "/etcd_registry/wipe/services/big/";
    until_count(&client, prefix, n as i64, Duration::from_millis(10), OP).await?;
    etcd.restart_wiped().await?;
    let back = until_count(
        &client,
        prefix,
        n as i64,
        Duration::from_millis(10),
        Duration::from_secs(120),
    )
    .await?;
    drop(keep);
    reg.close().await?;
    Ok(vec![
        Row::new(
            "wiped_10k",
            format!("{n} instances back after a wiped restart"),
        )
        .count(n)
        .figure(
            "seconds",
            "time until all are back",
            back.as_secs_f64(),
            "s",
        )
        .figure(
            "register_seconds",
            format!("time to register them first ({WIDE} concurrent, not alternated)"),
            wall.as_secs_f64(),
            "s",
        ),
    ])
}

/// etcd's watcher gauge once it has stopped moving (watches of earlier
/// phases may still be closing on the server).
async fn watchers(etcd: &EtcdServer) -> R<f64> {
    let mut last = metric(
        &etcd.metrics().await?,
        "etcd_debugging_mvcc_watcher_total",
        &[],
    );
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = metric(
            &etcd.metrics().await?,
            "etcd_debugging_mvcc_watcher_total",
            &[],
        );
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Err("etcd's watcher count did not settle within 4 s".into())
}

/// 1,000 caches of one service in one registry: how many etcd watchers they add.
pub async fn caches(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(1000, 20);
    let client = ctx.main.client().await?;
    fill(&client, "caches", 1, 10).await?;
    // A registry that registers nothing opens no watch of its own.
    let reg = connect(&ctx.main.endpoints(), "caches", 60).await?;
    let before = watchers(&ctx.main).await?;
    let start = Instant::now();
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        all.push(bounded("cache", OP, reg.cache("svc-0")).await??);
    }
    let opened = start.elapsed();
    if all.iter().any(|c| c.instances().len() != 10) {
        return Err("a cache does not hold the service's 10 instances".into());
    }
    let after = watchers(&ctx.main).await?;
    drop(all);
    reg.close().await?;
    Ok(vec![
        Row::new("caches", format!("{n} caches of one service"))
            .count(n)
            .figure("watchers_added", "etcd watchers added", after - before, "")
            .figure(
                "open_ms",
                format!("time to open all {n}"),
                opened.as_secs_f64() * 1e3,
                "ms",
            ),
    ])
}

/// The first key after every key under `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// Reads every key under `prefix` in pages of `page`; returns how many.
async fn paged_read(client: &Client, prefix: &str, page: i64) -> R<usize> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut seen = 0;
    loop {
        let resp = bounded(
            "page",
            OP,
            client.clone().get(
                from.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(page)),
            ),
        )
        .await??;
        seen += resp.kvs().len();
        match resp.kvs().last() {
            Some(kv) if resp.more() => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => return Ok(seen),
        }
    }
}

/// A namespace of 100,000 instances (100 services): a whole-namespace cache's
/// time to ready and memory, against reading the same keys raw, page by page.
pub async fn namespace_100k(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(100_000, 1000);
    let etcd = EtcdServer::builder().name("big").start().await?;
    let client = etcd.client().await?;
    let (filled, fill_time) = time(fill(&client, "big", 100, n)).await;
    filled?;
    let prefix = "/etcd_registry/big/services/";
    let (read, raw_time) = time(paged_read(&client, prefix, 5000)).await;
    if read? != n {
        return Err(format!("the raw paged read did not see {n} keys").into());
    }
    let reg = connect(&etcd.endpoints(), "big", 60).await?;
    let (heap0, rss0) = settled().await?;
    let (cache, ready) = time(bounded("cache_all", CACHE_ALL, reg.cache_all())).await;
    let mut row = Row::new(
        "namespace_100k",
        format!("cache of a namespace of {n} instances"),
    )
    .count(n)
    .figure(
        "fill_seconds",
        "time to write them raw (txn of 128 puts, 8 wide)",
        fill_time.as_secs_f64(),
        "s",
    );
    let cache = match cache.and_then(|c| c.map_err(Into::into)) {
        Ok(c) => c,
        Err(e) => {
            // cache_all() retries until it can read a snapshot, so a timeout
            // hides the reason; a one-shot list of the same keys names it.
            let why = match bounded("all_instances", OP, reg.all_instances()).await {
                Ok(Ok(all)) => format!("all_instances() read {} instances", all.len()),
                Ok(Err(e)) => format!("all_instances() failed: {e}"),
                Err(e) => format!("all_instances(): {e}"),
            };
            // Reported in the tables; the run goes on.
            row.error = Some(format!("cache_all(): {e}; {why}"));
            return Ok(vec![row.figure(
                "raw_read_seconds",
                "raw paged read (5,000 a page)",
                raw_time.as_secs_f64(),
                "s",
            )]);
        }
    };
    if cache.instances().len() != n {
        return Err(format!(
            "the cache holds {} instances, not {n}",
            cache.instances().len()
        )
        .into());
    }
    let (heap1, rss1) = settled().await?;
    let row = row
        .figure_vs(
            "ready_seconds",
            "time to ready",
            ready.as_secs_f64(),
            "s",
            "raw paged read (5,000 a page)",
            raw_time.as_secs_f64(),
        )
        .figure(
            "rss_mb",
            "resident set growth",
            (rss1 as f64 - rss0 as f64) / 1e6,
            "MB",
        )
        .figure("heap_mb", "heap growth", (heap1 - heap0) as f64 / 1e6, "MB")
        .figure(
            "heap_per_instance",
            "heap per instance",
            (heap1 - heap0) as f64 / n as f64,
            "B",
        );
    drop(cache);
    // A one-shot list of the whole namespace: the same paged read plus
    // parsing every value, against the raw paged read above.
    let (all, listed) = time(bounded("all_instances", CACHE_ALL, reg.all_instances())).await;
    if all??.len() != n {
        return Err(format!("all_instances() did not return {n} instances").into());
    }
    let row = row.figure_vs(
        "all_instances_seconds",
        "all_instances()",
        listed.as_secs_f64(),
        "s",
        "raw paged read (5,000 a page, no parse)",
        raw_time.as_secs_f64(),
    );
    reg.close().await?;
    Ok(vec![row])
}
