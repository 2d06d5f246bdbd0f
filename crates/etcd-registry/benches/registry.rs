//! The benchmark harness: etcd-registry side by side with raw etcd-client,
//! in the same run, against one throwaway etcd started by the testkit.
//!
//! ```text
//! ./scripts/bench                  # release build, writes BENCHMARKS.md
//! BENCH_SCALE=0.1 ./scripts/bench  # a quick run with a tenth of the iterations
//! ```
//!
//! Heap figures come from a counting global allocator in this binary: live
//! bytes after minus before, so they measure what the library itself holds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use etcd_registry::{Registry, ServiceEvent, ServiceInstance};
use etcd_registry_testkit::EtcdServer;
use futures::{StreamExt, stream};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Latency summary of one side of a comparison.
struct Stats {
    n: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut samples: Vec<Duration>, wall: Duration) -> Stats {
    samples.sort_unstable();
    let n = samples.len().max(1);
    let total: Duration = samples.iter().sum();
    Stats {
        n: samples.len(),
        mean: total / n as u32,
        p50: samples[samples.len() / 2],
        p99: samples[(samples.len() * 99 / 100).min(samples.len() - 1)],
        per_sec: samples.len() as f64 / wall.as_secs_f64(),
    }
}

async fn timed<F, Fut>(n: usize, mut f: F) -> Stats
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        samples.push(t.elapsed());
    }
    stats(samples, start.elapsed())
}

fn us(d: Duration) -> String {
    if d < Duration::from_micros(10) {
        format!("{} ns", d.as_nanos())
    } else {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    }
}

struct Report {
    rows: String,
    memory: String,
}

impl Report {
    fn row(&mut self, scenario: &str, ours: &Stats, raw: &Stats, raw_label: &str) {
        let ratio = raw.mean.as_secs_f64() / ours.mean.as_secs_f64();
        let _ = writeln!(
            self.rows,
            "| {scenario} | {} | {} / {} / {} | {:.0}/s | {raw_label}: {} / {} / {} | {:.0}/s | {ratio:.2}× |",
            ours.n,
            us(ours.mean),
            us(ours.p50),
            us(ours.p99),
            ours.per_sec,
            us(raw.mean),
            us(raw.p50),
            us(raw.p99),
            raw.per_sec,
        );
        eprintln!(
            "  {scenario}: ours mean {} vs raw mean {}",
            us(ours.mean),
            us(raw.mean)
        );
    }
}

fn scale(n: usize) -> usize {
    let s: f64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * s) as usize).max(10)
}

fn inst(name: &str, i: usize) -> ServiceInstance {
    ServiceInstance::new(
        name,
        format!("id-{i}"),
        "10.0.0.1",
        8000 + (i % 1000) as u16,
    )
    .with_version("1.0.0")
}

async fn connect(server: &EtcdServer, ns: &str) -> Registry {
    Registry::builder()
        .endpoints(server.endpoints())
        .namespace(ns)
        .ttl(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect")
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not support.
    let server = EtcdServer::start()
        .await
        .expect("start etcd (run scripts/setup)");
    let client = server.client().await.expect("raw client");
    let mut report = Report {
        rows: String::new(),
        memory: String::new(),
    };
    eprintln!("benchmarking against {}", server.endpoint());

    // Each comparison alternates the two sides operation by operation, so
    // that drift in the machine's load hits both alike.

    // 1. Registering one instance: one put under the shared lease, vs a raw put with a lease.
    let n = scale(2000);
    let reg = connect(&server, "b1").await;
    let lease = client
        .clone()
        .lease_grant(60, None)
        .await
        .expect("grant")
        .id();
    let mut keep = Vec::with_capacity(n);
    let (mut ours, mut raw) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        keep.push(reg.register(inst("web", i)).await.expect("register"));
        ours.push(t.elapsed());
        let mut c = client.clone();
        let t = Instant::now();
        c.put(
            format!("/raw/b1/services/web/id-{i}"),
            inst("web", i).to_json(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put");
        raw.push(t.elapsed());
    }
    let wall = start.elapsed() / 2;
    report.row(
        "register one instance (sequential)",
        &stats(ours, wall),
        &stats(raw, wall),
        "put with lease",
    );

    // 2. Listing a service of 100 instances: one get + JSON parse, vs a raw get.
    let n = scale(2000);
    let reg100 = connect(&server, "b2").await;
    let mut keep100 = Vec::new();
    for i in 0..100 {
        keep100.push(reg100.register(inst("api", i)).await.expect("register"));
        let mut c = client.clone();
        c.put(
            format!("/raw/b2/services/api/id-{i}"),
            inst("api", i).to_json(),
            None,
        )
        .await
        .expect("put");
    }
    let (mut ours, mut raw) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        assert_eq!(reg100.instances("api").await.expect("list").len(), 100);
        ours.push(t.elapsed());
        let mut c = client.clone();
        let t = Instant::now();
        let r = c
            .get(
                "/raw/b2/services/api/",
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .expect("get");
        assert_eq!(r.kvs().len(), 100);
        raw.push(t.elapsed());
    }
    let wall = start.elapsed() / 2;
    let raw = stats(raw, wall);
    report.row(
        "list a service of 100 instances",
        &stats(ours, wall),
        &raw,
        "get prefix (no parse)",
    );

    // 3. Looking up the same 100 instances from the cache: memory, no round trip.
    let cache = reg100.cache("api").await.expect("cache");
    let n_cache = scale(200_000);
    let ours = timed(n_cache, |_| async {
        assert_eq!(cache.instances().len(), 100);
    })
    .await;
    report.row(
        "look up a service of 100 (cache)",
        &ours,
        &raw,
        "get prefix",
    );
    let ours_pick = timed(n_cache, |_| async {
        assert!(cache.pick().is_some());
    })
    .await;
    report.row(
        "pick one instance (cache, round-robin)",
        &ours_pick,
        &raw,
        "get prefix",
    );

    // 4. Change delivery: a put until the watcher sees it, ours vs a raw etcd watch.
    let n = scale(500);
    let mut watch = reg100.watch("events").expect("watch");
    let first = watch.next().await;
    assert!(matches!(first, Some(ServiceEvent::Snapshot(_))));
    let mut samples = Vec::with_capacity(n);
    let began = Instant::now();
    for i in 0..n {
        let mut c = client.clone();
        let t = Instant::now();
        c.put(
            format!("/etcd_registry/b2/services/events/id-{}", i % 50),
            inst("events", i).to_json(),
            None,
        )
        .await
        .expect("put");
        loop {
            match watch.next().await.expect("event") {
                ServiceEvent::Added(x) | ServiceEvent::Updated(x)
                    if x.port == inst("events", i).port =>
                {
                    break;
                }
                _ => {}
            }
        }
        samples.push(t.elapsed());
    }
    let ours = stats(samples, began.elapsed());
    let mut raw_watch = client
        .clone()
        .watch("/raw/b4/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("raw watch");
    let mut samples = Vec::with_capacity(n);
    let began = Instant::now();
    for i in 0..n {
        let mut c = client.clone();
        let key = format!("/raw/b4/events/id-{}", i % 50);
        let t = Instant::now();
        c.put(key.clone(), inst("events", i).to_json(), None)
            .await
            .expect("put");
        'wait: loop {
            let resp = raw_watch.message().await.expect("watch").expect("open");
            for e in resp.events() {
                if e.event_type() == EventType::Put
                    && e.kv().is_some_and(|kv| kv.key() == key.as_bytes())
                {
                    break 'wait;
                }
            }
        }
        samples.push(t.elapsed());
    }
    let raw = stats(samples, began.elapsed());
    report.row("put → change event delivered", &ours, &raw, "raw watch");
    drop(watch);

    // 5. 1,000 instances registered 16 at a time: one shared lease, vs the Go
    // library's way of a lease per instance (grant + put each), on raw etcd-client.
    let n = scale(1000);
    let reg_many = connect(&server, "b5").await;
    let start = Instant::now();
    let ours_samples: Vec<Duration> = stream::iter(0..n)
        .map(|i| {
            let reg_many = &reg_many;
            async move {
                let t = Instant::now();
                let r = reg_many.register(inst("many", i)).await.expect("register");
                std::mem::forget(r); // keep registered; Registration holds no resources of its own
                t.elapsed()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let ours = stats(ours_samples, start.elapsed());
    let start = Instant::now();
    let raw_samples: Vec<Duration> = stream::iter(0..n)
        .map(|i| {
            let mut c = client.clone();
            async move {
                let t = Instant::now();
                let lease = c.lease_grant(60, None).await.expect("grant").id();
                c.put(
                    format!("/raw/b5/many/id-{i}"),
                    inst("many", i).to_json(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .expect("put");
                t.elapsed()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let raw = stats(raw_samples, start.elapsed());
    report.row(
        "register 1,000 instances, 16 concurrent",
        &ours,
        &raw,
        "grant + put per instance",
    );
    let leases = client
        .clone()
        .leases()
        .await
        .expect("leases")
        .leases()
        .len();

    // 6. Memory: what the library holds per registration and per cached instance.
    let n = scale(10_000);
    let before = live();
    let reg_mem = connect(&server, "b6").await;
    let mut regs = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let futs = chunk.iter().map(|&i| reg_mem.register(inst("mem", i)));
        for r in futures::future::join_all(futs).await {
            regs.push(r.expect("register"));
        }
    }
    let after_regs = live();
    let cache_mem = reg_mem.cache("mem").await.expect("cache");
    assert_eq!(cache_mem.instances().len(), n);
    let after_cache = live();
    let raw_before = live();
    let raw_resp = client
        .clone()
        .get(
            "/etcd_registry/b6/services/mem/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .expect("get");
    assert_eq!(raw_resp.kvs().len(), n);
    let raw_after = live();
    let per = |bytes: isize| bytes as f64 / n as f64;
    let _ = writeln!(
        report.memory,
        "| {n} registrations in one registry (map + handles) | {:.0} B per instance |",
        per(after_regs - before)
    );
    let _ = writeln!(
        report.memory,
        "| cache of the same {n} instances | {:.0} B per instance |",
        per(after_cache - after_regs)
    );
    let _ = writeln!(
        report.memory,
        "| raw etcd-client: one get response holding the same {n} key-values | {:.0} B per instance |",
        per(raw_after - raw_before)
    );
    drop((raw_resp, cache_mem, regs, keep, keep100, cache));
    for r in [reg, reg100, reg_many, reg_mem] {
        r.close().await.expect("close");
    }

    let etcd_version =
        std::process::Command::new(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let md = format!(
        "# Benchmarks\n\n\
Measured by `./scripts/bench` (`cargo bench -p etcd-registry --bench registry`, release build):\n\
etcd-registry and raw `etcd-client` 0.21 side by side in the same run, against one\n\
throwaway etcd on loopback started by the testkit ({etcd_version}, {cores} cores).\n\
Latencies are mean / p50 / p99 per operation; the last column is raw mean ÷ ours\n\
(above 1 means etcd-registry is faster). Figures vary from run to run and machine to\n\
machine by tens of percent; compare columns within one run.\n\n\
| scenario | n | etcd-registry mean / p50 / p99 | rate | raw etcd-client | rate | speed-up |\n\
| --- | --- | --- | --- | --- | --- | --- |\n\
{rows}\n\
After the last concurrent scenario, etcd held {leases} leases: 1 for all of etcd-registry's\n\
instances in it, and one per instance for the lease-per-registration approach.\n\n\
## What each row compares\n\n\
- **register one instance**: `Registry::register` (a put with the registry's lease and\n\
  `prev_kv`, to warn on take-overs, then bookkeeping for self-healing) against a bare put\n\
  with a lease. The registry's own anti-entropy watch also receives every write.\n\
- **list**: `Registry::instances` includes parsing 100 JSON values into `ServiceInstance`;\n\
  the raw side only fetches the bytes.\n\
- **cache look-up / pick**: `ServiceCache::instances()` and `pick()` answer from memory\n\
  (an `Arc` clone of an immutable view); the raw side is the round trip a cache-less client\n\
  makes for each look-up.\n\
- **change delivered**: time from a put to the event reaching the consumer. The\n\
  `ServiceWatch` side parses the value, compares it with what the consumer saw, and hands\n\
  it over from its owned task through a channel; the raw side reads the etcd watch directly.\n\
- **register 1,000, 16 concurrent**: one shared lease (one put each) against the Go library's\n\
  model of one lease per registration (grant + put each), on raw etcd-client.\n\n\
## Memory (heap held, counted by a global allocator in the harness)\n\n\
| what | heap |\n| --- | --- |\n{memory}",
        rows = report.rows,
        memory = report.memory,
    );
    let out = std::env::var("BENCH_OUT")
        .unwrap_or_else(|_| format!("{}/../../BENCHMARKS.md", env!("CARGO_MANIFEST_DIR")));
    std::fs::write(&out, &md).expect("write BENCHMARKS.md");
    println!("{md}");
    eprintln!("wrote {out}");
}
