//! The everyday operations: register, list, cache look-ups, change delivery
//! and concurrent registration, each against raw etcd-client.

use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use etcd_registry::{ServiceEvent, ServiceInstance};
use futures::{StreamExt, stream};

use crate::measure::{Hist, R, bounded};
use crate::report::Row;
use crate::{Ctx, connect, inst};

const OP: Duration = Duration::from_secs(30);

/// Registering one instance: one put under the shared lease, vs a raw put with a lease.
pub async fn register(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(2000, 20);
    let warm = (n / 10).max(2);
    let client = ctx.main.client().await?;
    let reg = connect(&ctx.main.endpoints(), "b1", 60).await?;
    let lease = client.clone().lease_grant(600, None).await?.id();
    let mut keep = Vec::with_capacity(n + warm);
    let (mut ours, mut raw) = (Hist::new(), Hist::new());
    for i in 0..warm + n {
        let t = Instant::now();
        keep.push(bounded("register", OP, reg.register(inst("web", i))).await??);
        let d = t.elapsed();
        let mut c = client.clone();
        let t = Instant::now();
        bounded(
            "put",
            OP,
            c.put(
                format!("/raw/b1/services/web/id-{i}"),
                inst("web", i).to_json(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await??;
        let dr = t.elapsed();
        if i >= warm {
            ours.record(d);
            ours.add_wall(d);
            raw.record(dr);
            raw.add_wall(dr);
        }
    }
    drop(keep);
    reg.close().await?;
    client.clone().lease_revoke(lease).await?;
    Ok(vec![
        Row::new("register", "register one instance (sequential)").latency(
            ours.summary("Registry::register"),
            Some(raw.summary("put with lease")),
        ),
    ])
}

/// The same comparison with a raw watch open on the raw side's prefix, as
/// the registry's own anti-entropy watch is on its keys: etcd matches every
/// put against the watchers of its key inside the write, so this isolates
/// what the library itself adds.
pub async fn register_watched(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(1000, 20);
    let warm = (n / 10).max(2);
    let client = ctx.main.client().await?;
    let reg = connect(&ctx.main.endpoints(), "b1w", 60).await?;
    let lease = client.clone().lease_grant(600, None).await?.id();
    let mut events = client
        .clone()
        .watch("/raw/b1w/", Some(WatchOptions::new().with_prefix()))
        .await?;
    // Drain the raw watch as the registry drains its own.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = events.message().await {} });
    let mut keep = Vec::with_capacity(n + warm);
    let (mut ours, mut raw) = (Hist::new(), Hist::new());
    for i in 0..warm + n {
        let t = Instant::now();
        keep.push(bounded("register", OP, reg.register(inst("web", i))).await??);
        let d = t.elapsed();
        let mut c = client.clone();
        let t = Instant::now();
        bounded(
            "put",
            OP,
            c.put(
                format!("/raw/b1w/services/web/id-{i}"),
                inst("web", i).to_json(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await??;
        let dr = t.elapsed();
        if i >= warm {
            ours.record(d);
            ours.add_wall(d);
            raw.record(dr);
            raw.add_wall(dr);
        }
    }
    drain.abort();
    drop(keep);
    reg.close().await?;
    client.clone().lease_revoke(lease).await?;
    Ok(vec![
        Row::new(
            "register_watched",
            "register one instance, raw side watched too (sequential)",
        )
        .latency(
            ours.summary("Registry::register"),
            Some(raw.summary("put with lease on a watched prefix")),
        ),
    ])
}

/// Listing a service of 100 instances, then looking them up in a cache.
pub async fn list_and_cache(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(2000, 20);
    let warm = (n / 10).max(2);
    let client = ctx.main.client().await?;
    let reg = connect(&ctx.main.endpoints(), "b2", 60).await?;
    let mut keep = Vec::new();
    for i in 0..100 {
        keep.push(reg.register(inst("api", i)).await?);
        client
            .clone()
            .put(
                format!("/raw/b2/services/api/id-{i}"),
                inst("api", i).to_json(),
                None,
            )
            .await?;
    }
    let (mut ours, mut raw) = (Hist::new(), Hist::new());
    for i in 0..warm + n {
        let (list, d) = crate::measure::time(bounded("list", OP, reg.instances("api"))).await;
        if list??.len() != 100 {
            return Err("list did not return 100 instances".into());
        }
        let mut c = client.clone();
        let (r, dr) = crate::measure::time(bounded(
            "get",
            OP,
            c.get(
                "/raw/b2/services/api/",
                Some(GetOptions::new().with_prefix()),
            ),
        ))
        .await;
        if r??.kvs().len() != 100 {
            return Err("raw get did not return 100 keys".into());
        }
        if i >= warm {
            ours.record(d);
            ours.add_wall(d);
            raw.record(dr);
            raw.add_wall(dr);
        }
    }
    let raw = raw.summary("get prefix (no parse)");
    // What the list does beyond the raw get, without the round trip: parse
    // the same 100 values from memory.
    let resp = client
        .clone()
        .get(
            "/etcd_registry/b2/services/api/",
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut parse = Hist::new();
    for _ in 0..n {
        let t = Instant::now();
        let parsed = resp
            .kvs()
            .iter()
            .filter_map(|kv| ServiceInstance::from_json(kv.value()).ok())
            .count();
        parse.record(t.elapsed());
        if parsed != 100 {
            return Err("not every value parsed".into());
        }
    }
    let mut rows = vec![
        Row::new("list", "list a service of 100 instances")
            .latency(ours.summary("Registry::instances"), Some(raw.clone()))
            .figure(
                "parse_us",
                "parsing the 100 values from memory, p50",
                parse.summary("parse").p50_us,
                "µs",
            ),
    ];

    // Memory answers: no round trip to alternate with, so the baseline is the
    // raw get a cache-less client makes for each look-up.
    let cache = bounded("cache", OP, reg.cache("api")).await??;
    let n_cache = ctx.plan.n(200_000, 2000);
    for (id, title) in [
        ("cache_instances", "look up a service of 100 (cache)"),
        ("cache_pick", "pick one instance (cache, round-robin)"),
    ] {
        let look: &dyn Fn() -> bool = if id == "cache_instances" {
            &|| cache.instances().len() == 100
        } else {
            &|| cache.pick().is_some()
        };
        let mut h = Hist::new();
        let start = Instant::now();
        for i in 0..n_cache + n_cache / 10 {
            let t = Instant::now();
            let ok = look();
            let d = t.elapsed();
            if !ok {
                return Err(format!("{id}: the cache did not hold 100 instances").into());
            }
            if i >= n_cache / 10 {
                h.record(d);
            }
        }
        h.add_wall(start.elapsed());
        rows.push(Row::new(id, title).latency(h.summary("from memory"), Some(raw.clone())));
    }
    drop((cache, keep));
    reg.close().await?;
    client
        .clone()
        .delete(
            "/raw/b2/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    Ok(rows)
}

/// Change delivery: a put until the watcher sees it, ours vs a raw etcd
/// watch, alternated put by put.
pub async fn watch(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(500, 10);
    let warm = (n / 10).max(2);
    let client = ctx.main.client().await?;
    let reg = connect(&ctx.main.endpoints(), "b4", 60).await?;
    let mut watch = reg.watch("events")?;
    match bounded("snapshot", OP, watch.next()).await? {
        Some(ServiceEvent::Snapshot(_)) => {}
        other => return Err(format!("expected a snapshot first, got {other:?}").into()),
    }
    let mut raw_watch = client
        .clone()
        .watch("/raw/b4/", Some(WatchOptions::new().with_prefix()))
        .await?;
    let (mut ours, mut raw) = (Hist::new(), Hist::new());
    for i in 0..warm + n {
        let want = inst("events", i);
        let mut c = client.clone();
        let t = Instant::now();
        c.put(
            format!("/etcd_registry/b4/services/events/id-{}", i % 50),
            want.to_json(),
            None,
        )
        .await?;
        loop {
            match bounded("event", OP, watch.next()).await? {
                Some(ServiceEvent::Added(x) | ServiceEvent::Updated(x)) if x.port == want.port => {
                    break;
                }
                Some(_) => {}
                None => return Err("the watch ended".into()),
            }
        }
        let d = t.elapsed();

        let key = format!("/raw/b4/events/id-{}", i % 50);
        let t = Instant::now();
        c.put(key.clone(), want.to_json(), None).await?;
        'wait: loop {
            let resp = bounded("raw event", OP, raw_watch.message())
                .await??
                .ok_or("the raw watch ended")?;
            for e in resp.events() {
                if e.event_type() == EventType::Put
                    && e.kv().is_some_and(|kv| kv.key() == key.as_bytes())
                {
                    break 'wait;
                }
            }
        }
        let dr = t.elapsed();
        if i >= warm {
            ours.record(d);
            ours.add_wall(d);
            raw.record(dr);
            raw.add_wall(dr);
        }
    }
    drop(watch);
    reg.close().await?;
    Ok(vec![
        Row::new("watch", "put → change event delivered")
            .latency(ours.summary("ServiceWatch"), Some(raw.summary("raw watch"))),
    ])
}

/// 1,000 instances registered 16 at a time: one shared lease, vs the Go
/// library's lease per instance (grant + put each). Alternated batch by batch.
pub async fn register_concurrent(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(1000, 40);
    let batch = (n / 10).max(1);
    let client = ctx.main.client().await?;
    let reg = connect(&ctx.main.endpoints(), "b5", 60).await?;
    let (mut ours, mut raw) = (Hist::new(), Hist::new());
    let mut keep = Vec::with_capacity(n);
    let mut leases = Vec::with_capacity(n);
    for first in (0..n).step_by(batch) {
        let ids = first..(first + batch).min(n);
        let start = Instant::now();
        let done: Vec<_> = stream::iter(ids.clone())
            .map(|i| {
                let reg = &reg;
                async move {
                    let t = Instant::now();
                    let r = bounded("register", OP, reg.register(inst("many", i))).await?;
                    Ok::<_, crate::measure::BoxError>((r?, t.elapsed()))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        ours.add_wall(start.elapsed());
        for r in done {
            let (r, d) = r?;
            keep.push(r);
            ours.record(d);
        }
        let start = Instant::now();
        let done: Vec<_> = stream::iter(ids)
            .map(|i| {
                let mut c = client.clone();
                async move {
                    let t = Instant::now();
                    let lease = bounded("grant", OP, c.lease_grant(60, None)).await??.id();
                    bounded(
                        "put",
                        OP,
                        c.put(
                            format!("/raw/b5/many/id-{i}"),
                            inst("many", i).to_json(),
                            Some(PutOptions::new().with_lease(lease)),
                        ),
                    )
                    .await??;
                    Ok::<_, crate::measure::BoxError>((lease, t.elapsed()))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        raw.add_wall(start.elapsed());
        for r in done {
            let (lease, d) = r?;
            leases.push(lease);
            raw.record(d);
        }
    }
    let held = client.clone().leases().await?.leases().len();
    drop(keep);
    reg.close().await?;
    for lease in leases {
        client.clone().lease_revoke(lease).await?;
    }
    Ok(vec![
        Row::new(
            "register_concurrent",
            "register 1,000 instances, 16 concurrent",
        )
        .latency(
            ours.summary("one shared lease"),
            Some(raw.summary("grant + put per instance")),
        )
        .figure(
            "leases_held",
            "leases etcd held after both sides registered",
            held as f64,
            "",
        ),
    ])
}
