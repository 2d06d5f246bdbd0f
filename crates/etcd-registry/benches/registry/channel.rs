//! Calling a service: `registry.channel` under faults and load, against
//! tonic-health servers on loopback (each on its own runtime, so that a kill
//! drops its connections at once), side by side with tonic's own
//! `balance_channel` and a direct tonic `Channel` where they compare.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_registry::{Channel, Registry, ServiceInstance};
use etcd_registry_testkit::EtcdServer;
use futures::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[path = "../../tests/channel_common/mod.rs"]
#[allow(unused_imports)]
mod channel_common;

use crate::measure::{Hist, R, bounded};
use crate::report::Row;
use crate::{Ctx, connect};

use channel_common::TestServer;

const LIMIT: Duration = Duration::from_secs(60);

fn instance(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new("echo", id, "127.0.0.1", port)
}

/// Outcomes of a load run.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Failures, as milliseconds since the start of the run.
    failed_at: std::sync::Mutex<Vec<u64>>,
}

/// `callers` tasks calling through `channel` (idempotent or not) until `stop`.
fn load(
    channel: Channel,
    callers: usize,
    idempotent: bool,
    stop: Arc<AtomicBool>,
) -> (Arc<Load>, Instant, Vec<tokio::task::JoinHandle<()>>) {
    let stats = Arc::new(Load::default());
    let start = Instant::now();
    let tasks = (0..callers)
        .map(|_| {
            let (stats, stop) = (stats.clone(), stop.clone());
            let channel = if idempotent {
                channel.idempotent()
            } else {
                channel.clone()
            };
            tokio::spawn(async move {
                let mut client = HealthClient::new(channel);
                while !stop.load(Ordering::Relaxed) {
                    let call = client.check(HealthCheckRequest {
                        service: String::new(),
                    });
                    match tokio::time::timeout(Duration::from_secs(5), call).await {
                        Ok(Ok(_)) => stats.ok.fetch_add(1, Ordering::Relaxed),
                        _ => {
                            let at = start.elapsed().as_millis() as u64;
                            stats
                                .failed_at
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(at);
                            stats.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    (stats, start, tasks)
}

async fn finish(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) -> R<()> {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        bounded("caller stops", Duration::from_secs(10), t).await??;
    }
    Ok(())
}

async fn wait_ready(channel: &Channel, n: usize) -> R<()> {
    bounded("endpoints ready", Duration::from_secs(20), async {
        while channel
            .endpoints()
            .iter()
            .filter(|e| e.phase == etcd_registry::channel::Phase::Ready)
            .count()
            < n
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Rolling restart of 3/3 under load: deregister (the channel drains), stop,
/// start, register, one instance after the other.
pub async fn rolling(ctx: Ctx) -> R<Vec<Row>> {
    let reg = connect(&ctx.main.endpoints(), "ch-rolling", 5).await?;
    let mut servers: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        regs.push(reg.register(instance(&format!("i{i}"), s.port)).await?);
    }
    let channel = bounded("channel", LIMIT, reg.channel("echo")).await??;
    wait_ready(&channel, 3).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (stats, start, tasks) = load(channel.clone(), 8, false, stop.clone());
    let pause = Duration::from_millis(if ctx.plan.smoke { 100 } else { 500 });
    for (i, server) in servers.iter_mut().enumerate() {
        tokio::time::sleep(pause).await;
        let id = format!("i{i}");
        let old = regs.remove(0);
        bounded("deregister", LIMIT, old.deregister()).await??;
        // Until the channel no longer sends to it and its calls finished.
        bounded("drained", LIMIT, async {
            while channel.endpoints().iter().any(|e| e.id == id) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await?;
        server.kill();
        *server = TestServer::start();
        regs.push(reg.register(instance(&id, server.port)).await?);
        wait_ready(&channel, 3).await?;
    }
    tokio::time::sleep(pause).await;
    finish(&stop, tasks).await?;
    let took = start.elapsed().as_secs_f64();
    let (ok, failed) = (
        stats.ok.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
    );
    reg.close().await?;
    Ok(vec![
        Row::new(
            "channel_rolling",
            "rolling restart of 3/3 under load (8 callers)",
        )
        .figure("failed", "failed calls", failed as f64, "")
        .figure("ok", "calls", ok as f64, "")
        .figure("per_sec", "calls per second", ok as f64 / took, "/s"),
    ])
}

/// One of 3 instances killed (SIGKILL-like: every connection drops, no
/// deregistration), plain and with idempotent retries.
pub async fn sigkill(ctx: Ctx) -> R<Vec<Row>> {
    let reg = connect(&ctx.main.endpoints(), "ch-kill", 5).await?;
    let run = ctx.plan.n(3, 1) as u64;
    let mut rows = Vec::new();
    for (idempotent, id, title) in [
        (
            false,
            "channel_sigkill",
            "one of 3 killed, plain calls (8 callers)",
        ),
        (
            true,
            "channel_sigkill_idem",
            "one of 3 killed, idempotent calls (8 callers)",
        ),
    ] {
        let mut servers: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
        let mut regs = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            regs.push(reg.register(instance(&format!("{id}-{i}"), s.port)).await?);
        }
        let channel = bounded("channel", LIMIT, reg.channel("echo")).await??;
        wait_ready(&channel, 3).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stats, start, tasks) = load(channel.clone(), 8, idempotent, stop.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed_at = start.elapsed().as_millis() as u64;
        servers[0].kill();
        tokio::time::sleep(Duration::from_secs(run)).await;
        finish(&stop, tasks).await?;
        let late = stats
            .failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|&&t| t > killed_at + 1000)
            .count();
        let failed = stats.failed.load(Ordering::Relaxed);
        rows.push(
            Row::new(id, title)
                .figure("failed", "failed calls", failed as f64, "")
                .figure(
                    "late",
                    "failed more than 1 s after the kill",
                    late as f64,
                    "",
                )
                .figure("ok", "calls", stats.ok.load(Ordering::Relaxed) as f64, ""),
        );
        for r in regs {
            r.deregister().await?;
        }
        drop(channel);
    }
    reg.close().await?;
    Ok(rows)
}

/// etcd wiped and restarted while clients call.
pub async fn wiped(ctx: Ctx) -> R<Vec<Row>> {
    let mut etcd = EtcdServer::builder().name("ch-wipe").start().await?;
    let owner = connect(&etcd.endpoints(), "ch-wipe", 5).await?;
    let caller = connect(&etcd.endpoints(), "ch-wipe", 5).await?;
    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        regs.push(owner.register(instance(&format!("i{i}"), s.port)).await?);
    }
    let channel = bounded("channel", LIMIT, caller.channel("echo")).await??;
    wait_ready(&channel, 3).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (stats, start, tasks) = load(channel.clone(), 8, false, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    bounded("wipe", LIMIT, etcd.restart_wiped()).await??;
    tokio::time::sleep(Duration::from_secs(ctx.plan.n(5, 2) as u64)).await;
    finish(&stop, tasks).await?;
    let took = start.elapsed().as_secs_f64();
    let (ok, failed) = (
        stats.ok.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
    );
    let _ = owner.close().await;
    let _ = caller.close().await;
    Ok(vec![
        Row::new(
            "channel_wiped",
            "etcd wiped and restarted while calling (8 callers)",
        )
        .figure("failed", "failed calls", failed as f64, "")
        .figure("ok", "calls", ok as f64, "")
        .figure("per_sec", "calls per second", ok as f64 / took, "/s"),
    ])
}

/// tonic's `balance_channel`, fed from the cache as `examples/balance.rs` did.
async fn tonic_balanced(reg: &Registry) -> R<tonic::transport::Channel> {
    use tonic::transport::channel::Change as TonicChange;
    use tower::discover::Change;
    let cache = reg.cache("echo").await?;
    let (channel, tx) = tonic::transport::Channel::balance_channel::<String>(16);
    let mut discover = cache.discover();
    tokio::spawn(async move {
        while let Some(Ok(change)) = discover.next().await {
            let change = match change {
                Change::Insert(id, i) => {
                    match tonic::transport::Endpoint::from_shared(format!(
                        "http://{}",
                        i.endpoint()
                    )) {
                        Ok(e) => TonicChange::Insert(id, e),
                        Err(_) => continue,
                    }
                }
                Change::Remove(id) => TonicChange::Remove(id),
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    });
    Ok(channel)
}

/// One of 3 instances slowed by 50 ms: its share of calls, ours and tonic's.
pub async fn slow(ctx: Ctx) -> R<Vec<Row>> {
    let reg = connect(&ctx.main.endpoints(), "ch-slow", 5).await?;
    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        regs.push(reg.register(instance(&format!("i{i}"), s.port)).await?);
    }
    let run = Duration::from_secs(ctx.plan.n(5, 1) as u64);
    let ours = bounded("channel", LIMIT, reg.channel("echo")).await??;
    wait_ready(&ours, 3).await?;
    let theirs = tonic_balanced(&reg).await?;
    let mut results = Vec::new();
    for slowed in [false, true] {
        servers[0]
            .ctl
            .delay_ms
            .store(if slowed { 50 } else { 0 }, Ordering::SeqCst);
        for side in 0..2 {
            let before: Vec<u64> = servers.iter().map(|s| s.ctl.calls()).collect();
            let start = Instant::now();
            let mut callers = Vec::new();
            for _ in 0..8 {
                let ours = ours.clone();
                let theirs = theirs.clone();
                callers.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    let (mut a, mut b) = (HealthClient::new(ours), HealthClient::new(theirs));
                    while start.elapsed() < run {
                        let req = HealthCheckRequest {
                            service: String::new(),
                        };
                        let ok = if side == 0 {
                            a.check(req).await.is_ok()
                        } else {
                            b.check(req).await.is_ok()
                        };
                        n += u64::from(ok);
                    }
                    n
                }));
            }
            let mut n = 0;
            for c in callers {
                n += bounded("caller", LIMIT, c).await??;
            }
            let took = start.elapsed().as_secs_f64();
            let after: Vec<u64> = servers.iter().map(|s| s.ctl.calls()).collect();
            let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
            let share = (after[0] - before[0]) as f64 / total.max(1) as f64;
            results.push((slowed, side, n as f64 / took, share));
        }
    }
    let get = |slowed: bool, side: usize| {
        results
            .iter()
            .find(|r| r.0 == slowed && r.1 == side)
            .map_or((0.0, 0.0), |r| (r.2, r.3))
    };
    let (ours_fast, _) = get(false, 0);
    let (tonic_fast, _) = get(false, 1);
    let (ours_slow, ours_share) = get(true, 0);
    let (tonic_slow, tonic_share) = get(true, 1);
    reg.close().await?;
    Ok(vec![
        Row::new(
            "channel_slow",
            "one of 3 slowed by 50 ms (8 sequential callers)",
        )
        .figure_vs(
            "share",
            "share of calls to the slow one",
            ours_share * 100.0,
            "%",
            "tonic balance_channel",
            tonic_share * 100.0,
        )
        .figure_vs(
            "per_sec_slow",
            "calls per second, one slow",
            ours_slow,
            "/s",
            "tonic balance_channel",
            tonic_slow,
        )
        .figure_vs(
            "per_sec_fast",
            "calls per second, all fast",
            ours_fast,
            "/s",
            "tonic balance_channel",
            tonic_fast,
        ),
    ])
}

/// Per-call overhead against a direct tonic `Channel` to the one endpoint,
/// alternated call by call.
pub async fn overhead(ctx: Ctx) -> R<Vec<Row>> {
    let reg = connect(&ctx.main.endpoints(), "ch-overhead", 5).await?;
    let server = TestServer::start();
    let _r = reg.register(instance("only", server.port)).await?;
    let ours = bounded("channel", LIMIT, reg.channel("echo")).await??;
    wait_ready(&ours, 1).await?;
    let direct =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))?
            .connect()
            .await?;
    let (mut a, mut b) = (HealthClient::new(ours), HealthClient::new(direct));
    let n = ctx.plan.n(20_000, 50);
    let (mut ha, mut hb) = (Hist::new(), Hist::new());
    for i in 0..n + n / 10 {
        let req = || HealthCheckRequest {
            service: String::new(),
        };
        let t = Instant::now();
        a.check(req()).await?;
        let da = t.elapsed();
        let t = Instant::now();
        b.check(req()).await?;
        let db = t.elapsed();
        if i >= n / 10 {
            ha.record(da);
            hb.record(db);
        }
    }
    reg.close().await?;
    Ok(vec![
        Row::new(
            "channel_overhead",
            "a call: registry.channel vs a direct tonic Channel",
        )
        .count(n)
        .latency(
            ha.summary("registry.channel"),
            Some(hb.summary("tonic Channel")),
        ),
    ])
}

/// 1,000 instances, 50 channels with `subset(10)` and client ids 0–49:
/// endpoints per instance and memory per channel.
pub async fn subset(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(1000, 40);
    let channels_n = ctx.plan.n(50, 4);
    let reg = connect(&ctx.main.endpoints(), "ch-subset", 10).await?;
    let server = TestServer::start();
    let mut regs = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let puts = chunk
            .iter()
            .map(|i| reg.register(instance(&format!("i{i:04}"), server.port)));
        for r in futures::future::join_all(puts).await {
            regs.push(r?);
        }
    }
    let cache = reg.cache("echo").await?;
    bounded("all cached", LIMIT, async {
        while cache.instances().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    let heap_before = crate::measure::heap();
    let mut channels = Vec::new();
    for c in 0..channels_n {
        let ch = reg
            .channel_builder("echo")
            .subset(10)
            .client_id(c as u64)
            .build()
            .await?;
        channels.push(ch);
    }
    for ch in &channels {
        wait_ready(ch, 10).await?;
    }
    let heap_after = crate::measure::heap();
    let mut per_instance = std::collections::HashMap::<String, usize>::new();
    for ch in &channels {
        for e in ch.endpoints() {
            *per_instance.entry(e.id).or_default() += 1;
        }
    }
    let max = per_instance.values().copied().max().unwrap_or(0);
    let connections: usize = per_instance.values().sum();
    drop(channels);
    reg.close().await?;
    Ok(vec![
        Row::new(
            "channel_subset",
            format!("{n} instances, {channels_n} channels with subset(10)"),
        )
        .figure(
            "max_per_endpoint",
            "most connections to one instance",
            max as f64,
            "",
        )
        .figure("connections", "connections in all", connections as f64, "")
        .figure(
            "heap_per_channel",
            "heap per channel (10 connected endpoints)",
            (heap_after - heap_before) as f64 / channels_n as f64 / 1024.0,
            "KiB",
        ),
    ])
}
