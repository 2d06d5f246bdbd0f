//! (d) Memory as the OS sees it: resident set growth once the allocator has
//! settled, with the heap the counting allocator saw beside it.

use std::time::Duration;

use etcd_client::GetOptions;
use futures::{StreamExt, stream};

use crate::measure::{BoxError, R, bounded, settled};
use crate::report::Row;
use crate::scale::fill;
use crate::{Ctx, connect, inst};

const OP: Duration = Duration::from_secs(60);

fn mb(after: f64, before: f64) -> f64 {
    (after - before) / 1e6
}

fn with_memory(row: Row, n: usize, what: &str, heap: (isize, isize), rss: (u64, u64)) -> Row {
    row.count(n)
        .figure(
            "rss_mb",
            "resident set growth",
            mb(rss.1 as f64, rss.0 as f64),
            "MB",
        )
        .figure(
            "heap_mb",
            "heap growth",
            mb(heap.1 as f64, heap.0 as f64),
            "MB",
        )
        .figure(
            "heap_per",
            format!("heap per {what}"),
            (heap.1 - heap.0) as f64 / n as f64,
            "B",
        )
}

/// 1,000 instances in one registry.
pub async fn one_registry(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(1000, 20);
    let (h0, r0) = settled().await?;
    let reg = connect(&ctx.main.endpoints(), "mem1", 60).await?;
    let done: Vec<R<_>> = stream::iter(0..n)
        .map(|i| {
            let reg = &reg;
            async move {
                Ok::<_, BoxError>(bounded("register", OP, reg.register(inst("mem", i))).await??)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let keep = done.into_iter().collect::<R<Vec<_>>>()?;
    let (h1, r1) = settled().await?;
    drop(keep);
    reg.close().await?;
    Ok(vec![with_memory(
        Row::new("mem_one_registry", format!("{n} instances in one registry")),
        n,
        "instance",
        (h0, h1),
        (r0, r1),
    )])
}

/// 1,000 registries with one instance each: what one lease (and one
/// connection) per instance costs.
pub async fn many_registries(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(1000, 10);
    let (h0, r0) = settled().await?;
    let endpoints = ctx.main.endpoints();
    let done: Vec<R<_>> = stream::iter(0..n)
        .map(|i| {
            let endpoints = &endpoints;
            async move {
                let reg = connect(endpoints, "mem2", 60).await?;
                let r = bounded("register", OP, reg.register(inst("mem", i))).await??;
                Ok::<_, BoxError>((reg, r))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let all = done.into_iter().collect::<R<Vec<_>>>()?;
    let (h1, r1) = settled().await?;
    let closed: Vec<R<()>> = stream::iter(all)
        .map(|(reg, r)| async move {
            drop(r);
            Ok(bounded("close", OP, reg.close()).await??)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    closed.into_iter().collect::<R<()>>()?;
    Ok(vec![with_memory(
        Row::new(
            "mem_many_registries",
            format!("{n} registries, one instance each"),
        ),
        n,
        "registry",
        (h0, h1),
        (r0, r1),
    )])
}

/// A cache of 10,000 instances, against one raw get response holding them.
pub async fn cache_10k(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(10_000, 100);
    let client = ctx.main.client().await?;
    fill(&client, "mem3", 1, n).await?;
    let reg = connect(&ctx.main.endpoints(), "mem3", 60).await?;
    let (h0, r0) = settled().await?;
    let cache = bounded("cache", OP, reg.cache("svc-0")).await??;
    if cache.instances().len() != n {
        return Err(format!(
            "the cache holds {} instances, not {n}",
            cache.instances().len()
        )
        .into());
    }
    let (h1, r1) = settled().await?;
    let resp = client
        .clone()
        .get(
            "/etcd_registry/mem3/services/svc-0/",
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    if resp.kvs().len() != n {
        return Err("the raw get did not return every key".into());
    }
    let (h2, _) = settled().await?;
    let raw_per = (h2 - h1) as f64 / n as f64;
    drop((resp, cache));
    reg.close().await?;
    let mut row = with_memory(
        Row::new("mem_cache_10k", format!("a cache of {n} instances")),
        n,
        "instance",
        (h0, h1),
        (r0, r1),
    );
    // The raw figure is the response alone: bytes as etcd sent them, nothing parsed.
    if let Some(f) = row.figures.iter_mut().find(|f| f.key == "heap_per") {
        f.baseline = Some((
            "raw get response holding the same key-values".into(),
            raw_per,
        ));
    }
    Ok(vec![row])
}
