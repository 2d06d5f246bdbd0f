//! The soak: registries, caches, an election with a fenced counter and an
//! observer, on a 3-member cluster, under a seeded schedule of mixed faults,
//! with the invariants of issue #12 checked after every fault and at the end.
//!
//! Every client reaches the cluster through its own [`FaultProxy`] per member,
//! so one client can be cut off (or have its connections reset) alone, while
//! the checks read etcd directly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use etcd_registry::{LeaderInfo, Registration, Registry, ServiceCache, ServiceInstance};
use etcd_registry_testkit::{EtcdCluster, FaultProxy, unique_name};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{RwLock, watch};
use tokio::time::Instant;

use super::common;

/// Lease TTL of every client.
const TTL: Duration = Duration::from_secs(3);
/// How long the system may take to settle after a fault heals.
const SETTLE: Duration = Duration::from_secs(6);
const KEY_PREFIX: &str = "/etcd_registry";
const WORKERS: usize = 4;
const INSTANCES: usize = 25;
const CACHES: usize = 3;
const CANDIDATES: usize = 3;
const LOCK_HOLDERS: usize = 2;
const LOCK: &str = "chaos";
const ELECTION: &str = "chaos";
/// Bound on one request of the workload or the checker.
const REQUEST: Duration = Duration::from_secs(2);

/// The kinds of fault, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    KillLeader,
    KillFollower,
    PauseMember,
    Blackhole,
    Reset,
    Compact,
}

const KINDS: [Kind; 6] = [
    Kind::KillLeader,
    Kind::KillFollower,
    Kind::PauseMember,
    Kind::Blackhole,
    Kind::Reset,
    Kind::Compact,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::KillLeader => "kill+restart raft leader",
            Kind::KillFollower => "kill+restart follower",
            Kind::PauseMember => "pause+resume member",
            Kind::Blackhole => "blackhole+heal client",
            Kind::Reset => "reset client connections",
            Kind::Compact => "compact to current revision",
        }
    }
}

/// One client's path to the cluster: a proxy per member.
struct Net {
    proxies: Vec<FaultProxy>,
}

impl Net {
    async fn start(cluster: &EtcdCluster) -> Net {
        let mut proxies = Vec::new();
        for e in cluster.endpoints() {
            proxies.push(FaultProxy::start(&e).await.expect("start proxy"));
        }
        Net { proxies }
    }
    fn endpoints(&self) -> Vec<String> {
        self.proxies.iter().map(FaultProxy::endpoint).collect()
    }
    fn blackhole(&self) {
        self.proxies.iter().for_each(FaultProxy::blackhole);
    }
    fn heal(&self) {
        self.proxies.iter().for_each(FaultProxy::heal);
    }
    fn reset(&self) {
        self.proxies.iter().for_each(FaultProxy::reset);
    }
}

/// What the workload believes is registered: key -> instance.
type Believed = Arc<Mutex<BTreeMap<String, ServiceInstance>>>;

/// One leadership as its candidate saw it, on this process's monotonic clock.
#[derive(Debug, Clone)]
struct Interval {
    candidate: usize,
    token: i64,
    won: Instant,
    stepped_down: Option<Instant>,
}

type Intervals = Arc<Mutex<Vec<Interval>>>;

/// Outcomes of the fenced increments.
#[derive(Default)]
struct CounterLog {
    /// op id -> counter value it wrote, for increments reported successful.
    succeeded: HashMap<String, u64>,
    /// Sent and never answered (timed out, or the task was dropped): may have landed.
    pending: HashSet<String>,
    /// Answered "not applied" (fenced out, or raced by a newer write).
    rejected: u64,
}

struct Stats {
    faults: BTreeMap<Kind, u64>,
    worst_recovery: BTreeMap<Kind, Duration>,
    checks_passed: BTreeMap<&'static str, u64>,
    violations: Vec<String>,
    /// Overlapping leaderships already reported, by their tokens.
    overlaps_seen: HashSet<(i64, i64)>,
}

impl Stats {
    fn pass(&mut self, what: &'static str) {
        *self.checks_passed.entry(what).or_default() += 1;
    }
    fn violation(&mut self, seed: u64, msg: String) {
        println!("VIOLATION (seed {seed}): {msg}");
        self.violations.push(msg);
    }
}

fn elapsed(start: Instant) -> String {
    format!("{:7.2}s", start.elapsed().as_secs_f64())
}

pub async fn run(duration: Duration, seed: u64) {
    println!(
        "chaos soak: {} s, seed {seed}, TTL {} s; replay with: scripts/chaos --seconds {} --seed {seed}",
        duration.as_secs(),
        TTL.as_secs(),
        duration.as_secs()
    );
    let tasks_at_start = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut cluster = EtcdCluster::start(3)
        .await
        .expect("start a 3-member cluster");
    let mut raw = Client::connect(cluster.endpoints(), None)
        .await
        .expect("raw client");
    println!(
        "chaos soak: {}",
        super::partitions::etcd_version(cluster.member(0)).await
    );
    let ns = unique_name("chaos");
    let services_prefix = format!("{KEY_PREFIX}/{ns}/services/");
    let counter_key = format!("/chaos-counter/{ns}/counter");
    let token_key = format!("/chaos-counter/{ns}/token");
    let inc_prefix = format!("/chaos-counter/{ns}/inc/");
    raw.put(counter_key.clone(), "0", None)
        .await
        .expect("init counter");
    raw.put(token_key.clone(), pad(0), None)
        .await
        .expect("init token");
    let lock_counter_key = format!("/chaos-lock-counter/{ns}/counter");
    let lock_token_key = format!("/chaos-lock-counter/{ns}/token");
    let lock_inc_prefix = format!("/chaos-lock-counter/{ns}/inc/");
    raw.put(lock_counter_key.clone(), "0", None)
        .await
        .expect("init lock counter");
    raw.put(lock_token_key.clone(), pad(0), None)
        .await
        .expect("init lock token");

    let clients = WORKERS + CACHES + CANDIDATES + 1 + LOCK_HOLDERS;
    let mut nets = Vec::new();
    for _ in 0..clients {
        nets.push(Net::start(&cluster).await);
    }
    let connect = |net: &Net| {
        common::connect_with(
            common::builder(net.endpoints(), &ns, TTL.as_secs())
                .request_timeout(REQUEST)
                .dial_timeout(REQUEST),
        )
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(RwLock::new(()));
    let believed: Believed = Arc::default();
    let ops = Arc::new(AtomicU64::new(0));

    // Registries with their workload.
    let mut workers = Vec::new();
    for (w, net) in nets.iter().enumerate().take(WORKERS) {
        let reg = connect(net).await;
        workers.push(tokio::spawn(worker(
            w,
            reg,
            StdRng::seed_from_u64(seed.wrapping_add(1 + w as u64)),
            gate.clone(),
            believed.clone(),
            ops.clone(),
            stop_rx.clone(),
        )));
    }
    // Namespace-wide caches, each in a registry of its own.
    let mut cache_regs = Vec::new();
    let mut caches: Vec<ServiceCache> = Vec::new();
    for c in 0..CACHES {
        let reg = connect(&nets[WORKERS + c]).await;
        caches.push(
            etcd_registry_testkit::within("open a cache", Duration::from_secs(30), reg.cache_all())
                .await
                .expect("cache"),
        );
        cache_regs.push(reg);
    }
    // Candidates with the fenced counter.
    let intervals: Intervals = Arc::default();
    let counter_log = Arc::new(Mutex::new(CounterLog::default()));
    let mut candidates = Vec::new();
    let mut candidate_regs = Vec::new();
    for c in 0..CANDIDATES {
        let net = &nets[WORKERS + CACHES + c];
        let reg = connect(net).await;
        let kv = Client::connect(net.endpoints(), None)
            .await
            .expect("candidate's kv client");
        let fence = Fence {
            kv,
            counter_key: counter_key.clone(),
            token_key: token_key.clone(),
            inc_prefix: inc_prefix.clone(),
            log: counter_log.clone(),
        };
        let election = reg.election(ELECTION).expect("election name");
        let (intervals, seed) = (intervals.clone(), seed.wrapping_add(100 + c as u64));
        candidates.push(tokio::spawn(async move {
            let result = election
                .lead(format!("candidate-{c}"), move |leadership| {
                    let (intervals, fence) = (intervals.clone(), fence.clone());
                    async move { lead_task(c, leadership, intervals, fence, seed).await }
                })
                .await;
            tracing::info!(candidate = c, ?result, "lead() returned");
        }));
        candidate_regs.push(reg);
    }
    // Lock holders, each with the same fenced increments on a counter of their own.
    let lock_intervals: Intervals = Arc::default();
    let lock_log = Arc::new(Mutex::new(CounterLog::default()));
    let mut holders = Vec::new();
    let mut holder_regs = Vec::new();
    for h in 0..LOCK_HOLDERS {
        let net = &nets[WORKERS + CACHES + CANDIDATES + 1 + h];
        let reg = connect(net).await;
        let kv = Client::connect(net.endpoints(), None)
            .await
            .expect("lock holder's kv client");
        let fence = Fence {
            kv,
            counter_key: lock_counter_key.clone(),
            token_key: lock_token_key.clone(),
            inc_prefix: lock_inc_prefix.clone(),
            log: lock_log.clone(),
        };
        let lock = reg.lock(LOCK).expect("lock name");
        holders.push(tokio::spawn(lock_holder(
            h,
            lock,
            lock_intervals.clone(),
            fence,
            seed.wrapping_add(200 + h as u64),
        )));
        holder_regs.push(reg);
    }
    // The observer.
    let observer_reg = connect(&nets[WORKERS + CACHES + CANDIDATES]).await;
    let observed: Arc<Mutex<Option<Option<LeaderInfo>>>> = Arc::default();
    let observer = {
        let mut stream = observer_reg
            .election(ELECTION)
            .expect("election name")
            .observe();
        let observed = observed.clone();
        tokio::spawn(async move {
            while let Some(leader) = stream.next().await {
                *observed.lock().unwrap() = Some(leader);
            }
        })
    };
    let election_prefix = format!(
        "{}/",
        observer_reg
            .election(ELECTION)
            .expect("election name")
            .etcd_name()
    );

    let ctx = Checker {
        raw: raw.clone(),
        services_prefix,
        election_prefix,
        gate: gate.clone(),
        believed: believed.clone(),
        intervals: intervals.clone(),
        lock_intervals: lock_intervals.clone(),
        observed: observed.clone(),
        seed,
    };
    let mut stats = Stats {
        faults: BTreeMap::new(),
        worst_recovery: BTreeMap::new(),
        checks_passed: BTreeMap::new(),
        violations: Vec::new(),
        overlaps_seen: HashSet::new(),
    };

    // The fault schedule.
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        n += 1;
        let kind = KINDS[rng.random_range(0..KINDS.len())];
        let hold = Duration::from_millis(rng.random_range(1000..=3000));
        let target = rng.random_range(0..64usize);
        let leader = intervals
            .lock()
            .unwrap()
            .iter()
            .find(|i| i.stepped_down.is_none())
            .map(|i| i.candidate);
        let what = inject(&mut cluster, &nets, &mut raw, kind, target, hold, leader).await;
        println!("[{}] fault {n}: {} ({what})", elapsed(start), kind.name());
        *stats.faults.entry(kind).or_default() += 1;
        let healed = Instant::now();
        ctx.check_all(&caches, &mut stats, &format!("after fault {n}"))
            .await;
        let took = healed.elapsed();
        let worst = stats.worst_recovery.entry(kind).or_default();
        *worst = (*worst).max(took);
        println!(
            "[{}] fault {n}: invariants hold again {} ms after the heal; {} workload ops so far",
            elapsed(start),
            took.as_millis(),
            ops.load(Ordering::Relaxed)
        );
    }

    // The end: stop the workload, final checks, then close everything.
    println!("[{}] stopping the workload", elapsed(start));
    ctx.check_all(&caches, &mut stats, "at the end").await;
    let _ = stop_tx.send(true);
    let mut worker_regs = Vec::new();
    for w in workers {
        match tokio::time::timeout(Duration::from_secs(60), w).await {
            Ok(Ok((reg, unresolved))) => {
                if unresolved > 0 {
                    stats.violation(
                        seed,
                        format!("{unresolved} workload operations never succeeded"),
                    );
                }
                worker_regs.push(reg);
            }
            other => stats.violation(seed, format!("a worker did not stop: {other:?}")),
        }
    }
    // Candidates step down (their tasks are dropped) before the registries close.
    for c in candidates.iter().chain(&holders) {
        c.abort();
    }
    for c in candidates.into_iter().chain(holders) {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    observer.abort();
    let _ = observer.await;
    check_intervals(&intervals, "3 no two leaders", seed, &mut stats, true);
    check_intervals(
        &lock_intervals,
        "3 no two lock holders",
        seed,
        &mut stats,
        true,
    );
    check_counter(
        &mut raw,
        &counter_key,
        &inc_prefix,
        &counter_log,
        seed,
        &mut stats,
    )
    .await;
    check_counter(
        &mut raw,
        &lock_counter_key,
        &lock_inc_prefix,
        &lock_log,
        seed,
        &mut stats,
    )
    .await;
    drop(caches);
    for reg in worker_regs
        .iter()
        .chain(&cache_regs)
        .chain(&candidate_regs)
        .chain(&holder_regs)
        .chain(std::iter::once(&observer_reg))
    {
        match tokio::time::timeout(Duration::from_secs(20), reg.close()).await {
            Ok(Ok(())) => {}
            other => stats.violation(seed, format!("close failed: {other:?}")),
        }
    }
    drop((
        worker_regs,
        cache_regs,
        candidate_regs,
        holder_regs,
        observer_reg,
    ));
    // Invariant 5: no lease and no task left behind.
    let leases_gone = poll(Duration::from_secs(10), || {
        let mut raw = raw.clone();
        async move {
            matches!(
                tokio::time::timeout(REQUEST, raw.leases()).await,
                Ok(Ok(r)) if r.leases().is_empty()
            )
        }
    })
    .await;
    if leases_gone {
        stats.pass("5 no lease left");
    } else {
        let left = raw.leases().await.map(|r| r.leases().len()).unwrap_or(0);
        stats.violation(
            seed,
            format!("{left} leases left in etcd after every registry closed"),
        );
    }
    drop(ctx);
    drop(raw);
    drop(nets);
    let tasks_left = poll(Duration::from_secs(15), || async {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            <= tasks_at_start
    })
    .await;
    if tasks_left {
        stats.pass("5 no task left");
    } else {
        let now = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        stats.violation(
            seed,
            format!("{now} tokio tasks alive at the end, {tasks_at_start} at the start"),
        );
    }

    // The report.
    let log = counter_log.lock().unwrap();
    println!();
    println!(
        "chaos soak report (seed {seed}, {} s, etcd cluster of 3, TTL {} s)",
        duration.as_secs(),
        TTL.as_secs()
    );
    println!(
        "  workload operations: {}; fenced increments: {} succeeded, {} rejected, {} unanswered",
        ops.load(Ordering::Relaxed),
        log.succeeded.len(),
        log.rejected,
        log.pending.len()
    );
    println!("  leaderships: {}", intervals.lock().unwrap().len());
    let locks = lock_log.lock().unwrap();
    println!(
        "  lock holds: {}; fenced increments under the lock: {} succeeded, {} rejected, {} unanswered",
        lock_intervals.lock().unwrap().len(),
        locks.succeeded.len(),
        locks.rejected,
        locks.pending.len()
    );
    println!("  faults injected: {}", stats.faults.values().sum::<u64>());
    for (kind, count) in &stats.faults {
        println!(
            "    {:30} {count:4}   worst recovery {:6} ms",
            kind.name(),
            stats
                .worst_recovery
                .get(kind)
                .copied()
                .unwrap_or_default()
                .as_millis()
        );
    }
    println!("  invariant checks passed:");
    for (what, count) in &stats.checks_passed {
        println!("    {what:30} {count:4}");
    }
    println!("  violations: {}", stats.violations.len());
    for v in &stats.violations {
        println!("    {v}");
    }
    println!("chaos soak: seed {seed}");
    assert!(
        stats.violations.is_empty(),
        "{} invariant violations (seed {seed})",
        stats.violations.len()
    );
}

/// Injects one fault, holds it, heals it; returns what it hit.
async fn inject(
    cluster: &mut EtcdCluster,
    nets: &[Net],
    raw: &mut Client,
    kind: Kind,
    target: usize,
    hold: Duration,
    leader: Option<usize>,
) -> String {
    match kind {
        Kind::KillLeader | Kind::KillFollower => {
            let leader = cluster
                .wait_for_leader(Duration::from_secs(20))
                .await
                .expect("a raft leader");
            let m = if kind == Kind::KillLeader {
                leader
            } else {
                let followers: Vec<usize> = (0..cluster.len()).filter(|&i| i != leader).collect();
                followers[target % followers.len()]
            };
            cluster.member_mut(m).kill().await.expect("kill");
            tokio::time::sleep(hold).await;
            cluster.member_mut(m).restart().await.expect("restart");
            format!("member{m}, {} ms", hold.as_millis())
        }
        Kind::PauseMember => {
            let m = target % cluster.len();
            cluster.member(m).pause().expect("pause");
            tokio::time::sleep(hold).await;
            cluster.member(m).resume().expect("resume");
            format!("member{m}, {} ms", hold.as_millis())
        }
        Kind::Blackhole => {
            // Every other blackhole cuts off the leading candidate: the case
            // the safety bound is for, held past the TTL (4-6 s) so that its
            // lease expires and another candidate takes over.
            let leading = leader.filter(|_| target.is_multiple_of(2));
            let c = leading.map_or(target % nets.len(), |l| WORKERS + CACHES + l);
            // Other clients: past the TTL every other time, so that their
            // leases expire and the registries must re-register everything.
            let hold = if leading.is_some() || target % 4 == 1 {
                hold + TTL
            } else {
                hold
            };
            nets[c].blackhole();
            tokio::time::sleep(hold).await;
            nets[c].heal();
            match leading {
                Some(l) => format!("client {c}, leading candidate {l}, {} ms", hold.as_millis()),
                None => format!("client {c}, {} ms", hold.as_millis()),
            }
        }
        Kind::Reset => {
            // Every fourth reset hits every client at once.
            let what = if target.is_multiple_of(4) {
                nets.iter().for_each(Net::reset);
                "all clients".to_owned()
            } else {
                let c = target % nets.len();
                nets[c].reset();
                format!("client {c}")
            };
            tokio::time::sleep(hold).await;
            what
        }
        Kind::Compact => {
            let rev = match tokio::time::timeout(REQUEST, raw.get("/", None)).await {
                Ok(Ok(r)) => r.header().map_or(0, |h| h.revision()),
                _ => 0,
            };
            let what = match tokio::time::timeout(REQUEST, raw.compact(rev, None)).await {
                Ok(Ok(_)) => format!("revision {rev}"),
                other => format!("revision {rev} failed: {other:?}"),
            };
            tokio::time::sleep(hold).await;
            what
        }
    }
}

fn pad(token: i64) -> String {
    format!("{token:020}")
}

/// A workload of one registry: register, update and deregister at random.
/// Returns the registry and how many operations it gave up on.
async fn worker(
    w: usize,
    reg: Registry,
    mut rng: StdRng,
    gate: Arc<RwLock<()>>,
    believed: Believed,
    ops: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> (Registry, u64) {
    let service = format!("svc{w}");
    let mut slots: Vec<Option<Registration>> = (0..INSTANCES).map(|_| None).collect();
    let mut version = 0u64;
    let mut unresolved = 0;
    loop {
        let pause = Duration::from_millis(rng.random_range(20..200));
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(pause) => {}
        }
        let _turn = gate.read().await;
        let id = rng.random_range(0..INSTANCES);
        version += 1;
        let instance =
            ServiceInstance::new(&service, format!("i{id}"), "127.0.0.1", 10_000 + id as u16)
                .with_version(format!("v{version}"));
        let slot = &mut slots[id];
        let done = match slot.take() {
            None => match register(&reg, &instance, &stop).await {
                Some(r) => {
                    believed
                        .lock()
                        .unwrap()
                        .insert(r.key().to_owned(), instance);
                    *slot = Some(r);
                    true
                }
                None => false,
            },
            Some(mut r) if rng.random_bool(0.5) => {
                let ok = update(&mut r, &instance, &stop).await;
                if ok {
                    believed
                        .lock()
                        .unwrap()
                        .insert(r.key().to_owned(), instance);
                }
                *slot = Some(r);
                ok
            }
            Some(r) => {
                let key = r.key().to_owned();
                let old = r.instance().clone();
                if deregister(&reg, r, &old, &stop).await {
                    believed.lock().unwrap().remove(&key);
                    true
                } else {
                    false
                }
            }
        };
        if done {
            ops.fetch_add(1, Ordering::Relaxed);
        } else {
            unresolved += 1;
        }
    }
    (reg, unresolved)
}

/// Retries `op` until it succeeds; `None` only if the soak stops first.
/// A failed write may or may not have landed; repeating it until it is
/// acknowledged is what resolves that for a real caller too.
async fn retry<T, F, Fut>(stop: &watch::Receiver<bool>, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = etcd_registry::Result<T>>,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(15), op()).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => tracing::debug!(error = %e, "workload operation failed; retrying"),
            Err(_) => tracing::debug!("workload operation timed out; retrying"),
        }
        if *stop.borrow() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn update(
    r: &mut Registration,
    instance: &ServiceInstance,
    stop: &watch::Receiver<bool>,
) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), r.update(instance.clone())).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => tracing::debug!(error = %e, "update failed; retrying"),
            Err(_) => tracing::debug!("update timed out; retrying"),
        }
        if *stop.borrow() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn register(
    reg: &Registry,
    instance: &ServiceInstance,
    stop: &watch::Receiver<bool>,
) -> Option<Registration> {
    retry(stop, || reg.register(instance.clone())).await
}

/// Deregisters; a failed deregister keeps the key maintained but consumes the
/// handle, so take the handle back with a register of the same value and try again.
async fn deregister(
    reg: &Registry,
    mut r: Registration,
    instance: &ServiceInstance,
    stop: &watch::Receiver<bool>,
) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), r.deregister()).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => tracing::debug!(error = %e, "deregister failed; retrying"),
            Err(_) => tracing::debug!("deregister timed out; retrying"),
        }
        if *stop.borrow() {
            return false;
        }
        match register(reg, instance, stop).await {
            Some(again) => r = again,
            None => return false,
        }
    }
}

/// What a candidate needs to increment the fenced counter.
#[derive(Clone)]
struct Fence {
    kv: Client,
    counter_key: String,
    token_key: String,
    inc_prefix: String,
    log: Arc<Mutex<CounterLog>>,
}

/// Marks the interval stepped down when the task ends or is dropped by `lead()`.
struct StepDown {
    intervals: Intervals,
    index: usize,
}

impl StepDown {
    fn now(&self) {
        let mut all = self.intervals.lock().unwrap();
        let i = &mut all[self.index];
        if i.stepped_down.is_none() {
            i.stepped_down = Some(Instant::now());
        }
    }
}

impl Drop for StepDown {
    fn drop(&mut self) {
        self.now();
    }
}

async fn lead_task(
    candidate: usize,
    leadership: etcd_registry::Leadership,
    intervals: Intervals,
    mut fence: Fence,
    seed: u64,
) {
    let won = Instant::now();
    let token = leadership.fencing_token();
    let index = {
        let mut all = intervals.lock().unwrap();
        all.push(Interval {
            candidate,
            token,
            won,
            stepped_down: None,
        });
        all.len() - 1
    };
    let step_down = StepDown { intervals, index };
    let mut rng = StdRng::seed_from_u64(seed ^ token as u64);
    let work = async {
        let mut seq = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
            if !leadership.is_leader() {
                continue;
            }
            seq += 1;
            increment(&mut fence, format!("c{candidate}-t{token}-{seq}"), token).await;
        }
    };
    tokio::select! {
        _ = leadership.lost() => step_down.now(),
        () = work => {}
    }
    // Never return: a task that finishes makes `lead()` resign and return,
    // and this candidate would stop campaigning. `lead()` drops it instead.
    std::future::pending::<()>().await;
}

/// A lock holder: acquires, increments its fenced counter for 0.3-1.5 s while
/// it holds the lock, releases, and again; the interval log is invariant 3's.
async fn lock_holder(
    holder: usize,
    lock: etcd_registry::Lock,
    intervals: Intervals,
    mut fence: Fence,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let guard = match tokio::time::timeout(Duration::from_secs(30), lock.acquire()).await {
            Ok(Ok(g)) => g,
            Ok(Err(etcd_registry::Error::Closed)) => return,
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let token = guard.fencing_token();
        let index = {
            let mut all = intervals.lock().unwrap();
            all.push(Interval {
                candidate: holder,
                token,
                won: Instant::now(),
                stepped_down: None,
            });
            all.len() - 1
        };
        let step_down = StepDown {
            intervals: intervals.clone(),
            index,
        };
        let hold = Instant::now() + Duration::from_millis(rng.random_range(300..1500));
        let mut seq = 0u64;
        let work = async {
            while Instant::now() < hold {
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..200))).await;
                if guard.is_held() {
                    seq += 1;
                    increment(&mut fence, format!("l{holder}-t{token}-{seq}"), token).await;
                }
            }
        };
        tokio::select! {
            _ = guard.lost() => step_down.now(),
            () = work => {
                // Stepped down before the key goes, so the next holder's win is later.
                step_down.now();
                let _ = tokio::time::timeout(REQUEST, guard.release()).await;
            }
        }
        drop(step_down);
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
    }
}

/// One fenced increment: applied only if the stored token is not newer than
/// ours and the counter did not move since we read it.
async fn increment(fence: &mut Fence, op: String, token: i64) {
    let Ok(Ok(resp)) =
        tokio::time::timeout(REQUEST, fence.kv.get(fence.counter_key.clone(), None)).await
    else {
        return;
    };
    let Some(kv) = resp.kvs().first() else { return };
    let n: u64 = kv
        .value_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rev = kv.mod_revision();
    let txn = Txn::new()
        .when([
            Compare::value(fence.token_key.clone(), CompareOp::Less, pad(token + 1)),
            Compare::mod_revision(fence.counter_key.clone(), CompareOp::Equal, rev),
        ])
        .and_then([
            TxnOp::put(fence.counter_key.clone(), (n + 1).to_string(), None),
            TxnOp::put(fence.token_key.clone(), pad(token), None),
            TxnOp::put(
                format!("{}{:020}", fence.inc_prefix, n + 1),
                format!("{op} {token}"),
                None,
            ),
        ]);
    // Recorded before sending: if the task is dropped mid-request, the
    // increment stays "unanswered", which is what it is.
    fence.log.lock().unwrap().pending.insert(op.clone());
    let outcome = tokio::time::timeout(REQUEST, fence.kv.txn(txn)).await;
    let mut log = fence.log.lock().unwrap();
    match outcome {
        Ok(Ok(r)) if r.succeeded() => {
            log.pending.remove(&op);
            log.succeeded.insert(op, n + 1);
        }
        Ok(Ok(_)) => {
            log.pending.remove(&op);
            log.rejected += 1;
        }
        _ => {}
    }
}

/// Invariant 3: leader intervals never overlap.
fn check_intervals(
    intervals: &Intervals,
    what: &'static str,
    seed: u64,
    stats: &mut Stats,
    at_end: bool,
) {
    let mut all = intervals.lock().unwrap().clone();
    all.sort_by_key(|i| i.won);
    let mut bad = Vec::new();
    for pair in all.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if matches!(a.stepped_down, Some(end) if end <= b.won) {
            continue;
        }
        if !stats.overlaps_seen.insert((a.token, b.token)) {
            bad.push(String::new());
            continue;
        }
        match a.stepped_down {
            Some(end) if end <= b.won => {}
            Some(end) => bad.push(format!(
                "candidate {} (token {}) won {:?} before candidate {} (token {}) stepped down",
                b.candidate,
                b.token,
                end - b.won,
                a.candidate,
                a.token
            )),
            None => bad.push(format!(
                "candidate {} (token {}) won while candidate {} (token {}) still led",
                b.candidate, b.token, a.candidate, a.token
            )),
        }
    }
    if at_end && let Some(open) = all.iter().find(|i| i.stepped_down.is_none()) {
        bad.push(format!(
            "candidate {} never stepped down after the end",
            open.candidate
        ));
    }
    if bad.is_empty() {
        stats.pass(what);
    }
    // Empty entries are overlaps reported by an earlier check.
    for b in bad.into_iter().filter(|b| !b.is_empty()) {
        stats.violation(seed, format!("invariant 3: {b}"));
    }
}

/// Invariant 4: the counter equals the increments reported successful, plus
/// those that were never answered and did land; every write came in token order.
async fn check_counter(
    raw: &mut Client,
    counter_key: &str,
    inc_prefix: &str,
    log: &Arc<Mutex<CounterLog>>,
    seed: u64,
    stats: &mut Stats,
) {
    let counter = match tokio::time::timeout(REQUEST, raw.get(counter_key, None)).await {
        Ok(Ok(r)) => r
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok()?.parse::<u64>().ok()),
        _ => None,
    };
    let records = tokio::time::timeout(
        REQUEST,
        raw.get(inc_prefix, Some(GetOptions::new().with_prefix())),
    )
    .await;
    let (Some(counter), Ok(Ok(records))) = (counter, records) else {
        stats.violation(seed, "invariant 4: cannot read the counter".into());
        return;
    };
    let log = log.lock().unwrap();
    let mut problems = Vec::new();
    let mut last_token = 0i64;
    let mut landed_unanswered = 0u64;
    let mut seen = HashSet::new();
    for (i, kv) in records.kvs().iter().enumerate() {
        let n = i as u64 + 1;
        let key = kv.key_str().unwrap_or_default();
        if key != format!("{inc_prefix}{n:020}") {
            problems.push(format!("increment record {key} out of sequence at {n}"));
            break;
        }
        let value = kv.value_str().unwrap_or_default();
        let (op, token) = value.rsplit_once(' ').unwrap_or((value, "0"));
        let token: i64 = token.parse().unwrap_or(0);
        if token < last_token {
            problems.push(format!("increment {n} by {op} carries token {token} after token {last_token}: a stale leader wrote"));
        }
        last_token = last_token.max(token);
        seen.insert(op.to_owned());
        match log.succeeded.get(op) {
            Some(&m) if m == n => {}
            Some(&m) => problems.push(format!("{op} reported writing {m} but wrote {n}")),
            None if log.pending.contains(op) => landed_unanswered += 1,
            None => problems.push(format!("{op} landed at {n} but was reported rejected")),
        }
    }
    for op in log.succeeded.keys() {
        if !seen.contains(op) {
            problems.push(format!("{op} was reported successful but is not in etcd"));
        }
    }
    let expected = log.succeeded.len() as u64 + landed_unanswered;
    if counter != expected {
        problems.push(format!(
            "counter is {counter}, but {} increments succeeded and {landed_unanswered} unanswered ones landed",
            log.succeeded.len()
        ));
    }
    if problems.is_empty() {
        stats.pass("4 fenced counter exact");
        println!(
            "  counter {counter} = {} reported successful + {landed_unanswered} unanswered that landed",
            log.succeeded.len()
        );
    }
    for p in problems.into_iter().take(20) {
        stats.violation(seed, format!("invariant 4: {p}"));
    }
}

/// Polls `check` every 50 ms until true; false after `limit`.
async fn poll<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if tokio::time::timeout_at(deadline, check())
            .await
            .unwrap_or(false)
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything the invariant checks read.
struct Checker {
    raw: Client,
    services_prefix: String,
    election_prefix: String,
    gate: Arc<RwLock<()>>,
    believed: Believed,
    intervals: Intervals,
    lock_intervals: Intervals,
    observed: Arc<Mutex<Option<Option<LeaderInfo>>>>,
    seed: u64,
}

/// A raw read of the services: key -> instance, and the newest mod revision
/// among them (0 when empty).
type Snapshot = (BTreeMap<String, ServiceInstance>, i64);

impl Checker {
    async fn read(&self, revision: Option<i64>) -> Result<Snapshot, String> {
        let mut options = GetOptions::new().with_prefix();
        if let Some(rev) = revision {
            options = options.with_revision(rev);
        }
        let mut raw = self.raw.clone();
        let resp = match tokio::time::timeout(
            REQUEST,
            raw.get(self.services_prefix.clone(), Some(options)),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let mut map = BTreeMap::new();
        let newest = resp
            .kvs()
            .iter()
            .map(|kv| kv.mod_revision())
            .max()
            .unwrap_or(0);
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default().to_owned();
            match ServiceInstance::from_json(kv.value()) {
                Ok(i) => {
                    map.insert(key, i);
                }
                Err(e) => return Err(format!("{key} holds a value we cannot parse: {e}")),
            }
        }
        Ok((map, newest))
    }

    fn key_of(&self, i: &ServiceInstance) -> String {
        format!("{}{}/{}", self.services_prefix, i.name, i.id)
    }

    /// Invariants 1-3 after a fault healed: holds the workload still, then
    /// waits up to [`SETTLE`] for etcd, the caches and the observer to agree.
    async fn check_all(&self, caches: &[ServiceCache], stats: &mut Stats, when: &str) {
        let deadline = Instant::now() + SETTLE;
        let seed = self.seed;
        let Ok(_still) = tokio::time::timeout_at(deadline, self.gate.write()).await else {
            stats.violation(
                seed,
                format!(
                    "{when}: workload operations still failing {} s after the heal",
                    SETTLE.as_secs()
                ),
            );
            return;
        };
        let believed = self.believed.lock().unwrap().clone();
        // 1. etcd holds exactly what the workload believes is live.
        let last = std::cell::RefCell::new(String::new());
        let ok = poll(
            deadline.saturating_duration_since(Instant::now()),
            || async {
                match self.read(None).await {
                    Ok((map, _)) if map == believed => true,
                    Ok((map, rev)) => {
                        *last.borrow_mut() = diff("etcd", &map, &believed, rev);
                        false
                    }
                    Err(e) => {
                        *last.borrow_mut() = format!("read failed: {e}");
                        false
                    }
                }
            },
        )
        .await;
        if ok {
            stats.pass("1 registrations exact");
        } else {
            stats.violation(seed, format!("{when}: invariant 1: {}", last.borrow()));
        }
        // 2. every cache equals etcd at the cache's revision (and is current).
        for (c, cache) in caches.iter().enumerate() {
            let last = std::cell::RefCell::new(String::new());
            let ok = poll(deadline.saturating_duration_since(Instant::now()), || async {
                let rev = cache.revision();
                let view: BTreeMap<String, ServiceInstance> =
                    cache.instances().iter().map(|i| (self.key_of(i), i.clone())).collect();
                if cache.revision() != rev {
                    return false;
                }
                if view != believed {
                    *last.borrow_mut() = diff(&format!("cache {c}"), &view, &believed, rev);
                    return false;
                }
                match self.read(Some(rev)).await {
                    Ok((map, _)) if map == view => true,
                    Ok((map, _)) => {
                        *last.borrow_mut() = format!("cache {c} at revision {rev} differs from etcd at that revision: {}", diff("etcd", &map, &view, rev));
                        false
                    }
                    // Compacted past the cache's revision: then etcd now must
                    // match and hold nothing written after that revision.
                    Err(e) if e.contains("compacted") => {
                        matches!(self.read(None).await, Ok((map, newest)) if map == view && newest <= rev)
                    }
                    Err(e) => {
                        *last.borrow_mut() = format!("read at {rev} failed: {e}");
                        false
                    }
                }
            })
            .await;
            if ok {
                stats.pass("2 caches equal etcd");
            } else {
                stats.violation(
                    seed,
                    format!("{when}: invariant 2: cache {c}: {}", last.borrow()),
                );
            }
        }
        // 3. no overlap so far, and the observer names etcd's leader.
        check_intervals(&self.intervals, "3 no two leaders", seed, stats, false);
        check_intervals(
            &self.lock_intervals,
            "3 no two lock holders",
            seed,
            stats,
            false,
        );
        let last = std::cell::RefCell::new(String::new());
        let ok = poll(
            deadline.saturating_duration_since(Instant::now()),
            || async {
                let mut raw = self.raw.clone();
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(
                        etcd_client::SortTarget::Create,
                        etcd_client::SortOrder::Ascend,
                    )
                    .with_limit(1);
                let Ok(Ok(resp)) = tokio::time::timeout(
                    REQUEST,
                    raw.get(self.election_prefix.clone(), Some(options)),
                )
                .await
                else {
                    return false;
                };
                let etcd_leader = resp.kvs().first().map(|kv| kv.create_revision());
                let seen = self
                    .observed
                    .lock()
                    .unwrap()
                    .clone()
                    .map(|l| l.map(|l| l.fencing_token));
                if seen == Some(etcd_leader) {
                    true
                } else {
                    *last.borrow_mut() =
                        format!("observer says {seen:?}, etcd says {etcd_leader:?}");
                    false
                }
            },
        )
        .await;
        if ok {
            stats.pass("3 observer names the leader");
        } else {
            stats.violation(seed, format!("{when}: observer: {}", last.borrow()));
        }
    }
}

fn diff(
    what: &str,
    got: &BTreeMap<String, ServiceInstance>,
    want: &BTreeMap<String, ServiceInstance>,
    rev: i64,
) -> String {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let changed: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, v)| format!("{k}: {} instead of {}", got[k].version, v.version))
        .collect();
    format!(
        "{what} at revision {rev}: {} missing {:?}, {} extra {:?}, {} stale {:?}",
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(3).collect::<Vec<_>>(),
        changed.len(),
        changed.iter().take(3).collect::<Vec<_>>()
    )
}
