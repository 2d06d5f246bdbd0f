//! The library through etcd's own gRPC proxy (`etcd grpc-proxy start`, issue
//! 24 §1): watches, caches and the namespace cache, a proxy with
//! `--namespace`, registration with restore after etcd behind the proxy was
//! wiped, elections with `observe`, locks, health-gated registration, a
//! blackholed client-to-proxy link, the leadership safety bound with the
//! proxy cut off from etcd (20 rounds), and 60 s idle.
//!
//! What the proxy does differently (etcd 3.4.23 to 3.5.30): it never answers
//! a watch's progress request, and the headers of its watch responses carry
//! cluster id 0 where unary responses carry etcd's. Lease keep-alives are
//! answered when the proxy's own keep-alive to etcd is answered.
//!
//! Warnings are counted per test: each test that counts them runs on a
//! current-thread runtime with a thread-local tracing subscriber, so every
//! task it spawns logs into its own capture. Watch restarts and re-lists are
//! counted by cause and namespace from the library's
//! `etcd_registry_watch_restarts_total` (a recorder installed for this
//! binary). Watch streams are counted as `tests/idle.rs` counts them, from
//! `grpc_server_started_total`, here the proxy's own (`/proxy/metrics`,
//! etcd 3.5 and later); etcd 3.4's proxy has no metrics of its own, and
//! there the streams that the proxy opens to etcd are counted instead.
//!
//! Runtime: the idle test (about 75 s with its set-up) is the only long one;
//! the others run beside it (the 20 leadership rounds took 23 s alone, the
//! watch cases about 20 s each). The whole file: 104-111 s on 2 cores, on
//! etcd 3.4.23, 3.5.1 and 3.5.30.
#![cfg(feature = "metrics")]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_registry::{
    HealthPolicy, LeaderStream, Registry, ServiceEvent, ServiceInstance, ServiceWatch, health,
};
use etcd_registry_testkit::{
    EtcdGrpcProxy, EtcdServer, FaultProxy, eventually, shared_server, unique_name, within,
};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::subscriber::DefaultGuard;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{EnvFilter, Layer};

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(30);
/// How long the idle test idles.
const IDLE: Duration = Duration::from_secs(60);
/// Long enough for a watch whose progress requests go unanswered to be
/// restarted as stale (the defect of issue 24) before the next event.
const PAST_STALE: Duration = Duration::from_secs(13);
/// After the last event, how long a re-list loop gets to show itself.
const SETTLE: Duration = Duration::from_secs(3);
/// Leadership rounds with the proxy cut off from etcd.
const ROUNDS: usize = 20;
/// Rounds run side by side, each lane in an election of its own.
const LANES: usize = 4;
/// TTL of the leader behind the proxy in the leadership rounds: short, to
/// keep rounds fast and the margin small.
const ROUND_TTL_SECS: u64 = 3;
/// TTL of the rival: the default, so that a loaded machine does not cost
/// the rival its own session (which would void the round, not fail it).
const RIVAL_TTL_SECS: u64 = 10;
/// Rounds that do not count (listed in the output) are replaced, up to this many.
const SPARE_ROUNDS: usize = 10;

// ---------------------------------------------------------------------------
// Capturing logs and counting restarts
// ---------------------------------------------------------------------------

/// Every event at INFO or above, from any crate, as "LEVEL target: fields".
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(Level, String)>>>);

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut text = format!(
            "{} {}:",
            event.metadata().level(),
            event.metadata().target()
        );
        event.record(&mut Fields(&mut text));
        if let Ok(mut all) = self.0.lock() {
            all.push((*event.metadata().level(), text));
        }
    }
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl Capture {
    /// Captures this thread's events until the guard drops; logs go to the
    /// test's output too (`RUST_LOG`, default `etcd_registry=info`). Only a
    /// current-thread runtime keeps every task of the test on this thread.
    fn start() -> (Capture, DefaultGuard) {
        let capture = Capture::default();
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "etcd_registry=info".into());
        let subscriber = tracing_subscriber::registry()
            .with(capture.clone().with_filter(LevelFilter::INFO))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(EnvFilter::new(filter)),
            );
        let guard = tracing::subscriber::set_default(subscriber);
        (capture, guard)
    }

    /// A mark: the number of events so far.
    fn mark(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// WARN and ERROR lines since `mark`.
    fn warnings_since(&self, mark: usize) -> Vec<String> {
        self.since(mark, |l| l <= Level::WARN)
    }

    /// INFO lines of this library since `mark`.
    fn infos_since(&self, mark: usize) -> Vec<String> {
        self.since(mark, |l| l == Level::INFO)
            .into_iter()
            .filter(|l| l.starts_with("INFO etcd_registry"))
            .collect()
    }

    fn since(&self, mark: usize, level: impl Fn(Level) -> bool) -> Vec<String> {
        self.0
            .lock()
            .map(|v| {
                v.iter()
                    .skip(mark)
                    .filter(|(l, _)| level(*l))
                    .map(|(_, t)| t.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// How many lines, and how many of each message (fields after the message dropped).
fn tally(lines: &[String]) -> String {
    let mut by_message: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines {
        let message = line
            .split_once(" message=")
            .map_or(line.as_str(), |(_, m)| m)
            .split(" service=")
            .next()
            .unwrap_or_default();
        *by_message.entry(message.to_owned()).or_default() += 1;
    }
    let mut out = format!("{} lines", lines.len());
    for (message, n) in by_message.iter().take(12) {
        out.push_str(&format!("\n  {n:6} x {message}"));
    }
    out
}

/// A recorder for this binary that keeps every counter.
#[derive(Default)]
struct Counters(Mutex<HashMap<metrics::Key, Arc<AtomicU64>>>);

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        metrics::Counter::from_arc(all.entry(key.clone()).or_default().clone())
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counters: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(counters).expect("the only recorder of this binary");
        counters
    })
}

/// Watch restarts of namespace `ns` so far, by cause (`broken`, `stale`,
/// `compacted`, `wiped`: the last two re-list).
fn restarts(ns: &str) -> BTreeMap<String, u64> {
    let all = counters().0.lock().unwrap_or_else(|e| e.into_inner());
    let mut by_cause = BTreeMap::new();
    for (key, value) in all.iter() {
        if key.name() != etcd_registry::metrics::WATCH_RESTARTS_TOTAL
            || !key
                .labels()
                .any(|l| l.key() == "namespace" && l.value() == ns)
        {
            continue;
        }
        let cause = key
            .labels()
            .find(|l| l.key() == "cause")
            .map_or("?", |l| l.value())
            .to_owned();
        *by_cause.entry(cause).or_insert(0) += value.load(Ordering::Relaxed);
    }
    by_cause
}

fn relists(r: &BTreeMap<String, u64>) -> u64 {
    r.get("wiped").copied().unwrap_or(0) + r.get("compacted").copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Set-up helpers
// ---------------------------------------------------------------------------

/// The gRPC proxy in front of this binary's shared etcd; never stopped.
async fn shared_proxy() -> &'static EtcdGrpcProxy {
    static PROXY: tokio::sync::OnceCell<EtcdGrpcProxy> = tokio::sync::OnceCell::const_new();
    let etcd = shared_server().await;
    PROXY
        .get_or_init(|| async {
            within("start the gRPC proxy", T, EtcdGrpcProxy::start(etcd))
                .await
                .expect("start the gRPC proxy")
        })
        .await
}

async fn connect(endpoints: Vec<String>, ns: &str, ttl_secs: u64) -> Registry {
    counters();
    within(
        "connect",
        T,
        Registry::builder()
            .endpoints(endpoints)
            .namespace(ns)
            .ttl(Duration::from_secs(ttl_secs))
            .dial_timeout(Duration::from_secs(3))
            .connect(),
    )
    .await
    .expect("connect")
}

fn inst(service: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(service, id, "10.0.0.1", port)
}

async fn next(watch: &mut ServiceWatch) -> ServiceEvent {
    within("the next watch event", T, watch.next())
        .await
        .expect("the watch ended")
}

fn ids<'a>(instances: impl IntoIterator<Item = &'a ServiceInstance>) -> BTreeSet<String> {
    instances.into_iter().map(|i| i.id.clone()).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// Keys under `prefix`, read from etcd directly.
async fn keys_under(client: &Client, prefix: &str) -> BTreeSet<String> {
    let mut c = client.clone();
    match tokio::time::timeout(
        Duration::from_secs(5),
        c.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await
    {
        Ok(Ok(r)) => r
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// The view a watch's events build: snapshot, then every change applied.
fn apply(view: &mut BTreeMap<String, ServiceInstance>, event: ServiceEvent) {
    match event {
        ServiceEvent::Snapshot(all) => {
            *view = all.into_iter().map(|i| (i.id.clone(), i)).collect();
        }
        ServiceEvent::Added(i) | ServiceEvent::Updated(i) => {
            view.insert(i.id.clone(), i);
        }
        ServiceEvent::Removed(i) => {
            view.remove(&i.id);
        }
    }
}

/// Lets time pass, which is what these tests are about: nothing to wait for.
async fn idle(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Reads `observer` until an item satisfies `f`.
async fn observe_until(
    observer: &mut LeaderStream,
    what: &str,
    f: impl Fn(Option<&etcd_registry::LeaderInfo>) -> bool,
) -> Option<etcd_registry::LeaderInfo> {
    within(what, T, async {
        loop {
            let item = observer.next().await.expect("the observer ended");
            if f(item.as_ref()) {
                return item;
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Watches and caches
// ---------------------------------------------------------------------------

/// Through `proxy`, a watch, a cache and the namespace cache see a
/// registration made through the proxy after PAST_STALE of quiet; no WARN
/// line, restart or re-list from the first snapshot to SETTLE after the
/// event. `in_etcd` is where the proxy puts the namespace's service keys.
async fn follow_changes(proxy: &EtcdGrpcProxy, ns: &str, in_etcd: &str, capture: &Capture) {
    let direct = shared_server().await.client().await.unwrap();
    let writer = connect(proxy.endpoints(), ns, 10).await;
    let reader = connect(proxy.endpoints(), ns, 10).await;
    let _w1 = within("register w1", T, writer.register(inst("web", "w1", 1)))
        .await
        .unwrap();
    eventually("w1 is in etcd where the proxy puts it", T, || async {
        keys_under(&direct, in_etcd).await == set(&[format!("{in_etcd}web/w1").as_str()])
    })
    .await;
    let mut watch = reader.watch("web").unwrap();
    assert_eq!(
        next(&mut watch).await,
        ServiceEvent::Snapshot(vec![inst("web", "w1", 1)])
    );
    let cache = within("cache", T, reader.cache("web")).await.unwrap();
    let all = within("cache_all", T, reader.cache_all()).await.unwrap();
    assert_eq!(ids(&cache.instances()), set(&["w1"]));
    assert_eq!(ids(&all.instances()), set(&["w1"]));
    let mark = capture.mark();
    let before = restarts(ns);

    idle(PAST_STALE).await;
    let quiet = (restarts(ns), capture.warnings_since(mark).len());
    let _w2 = within("register w2", T, writer.register(inst("web", "w2", 2)))
        .await
        .unwrap();
    let event = next(&mut watch).await;
    eventually("both caches see w2", T, || async {
        ids(&cache.instances()) == set(&["w1", "w2"]) && ids(&all.instances()) == set(&["w1", "w2"])
    })
    .await;
    idle(SETTLE).await;

    let warnings = capture.warnings_since(mark);
    let after = restarts(ns);
    eprintln!(
        "{ns}: restarts before the quiet time {before:?}, after it {:?} ({} WARN lines), \
         after the event and {SETTLE:?} {after:?}; WARN lines: {}",
        quiet.0,
        quiet.1,
        tally(&warnings)
    );
    assert_eq!(event, ServiceEvent::Added(inst("web", "w2", 2)));
    assert!(
        warnings.is_empty(),
        "{ns}: WARN lines while following changes through the proxy: {}",
        tally(&warnings)
    );
    assert_eq!(
        after, before,
        "{ns}: watches restarted or re-listed (by cause)"
    );
    assert_eq!((cache.errors(), all.errors(), watch.errors()), (0, 0, 0));
    within("close", T, reader.close()).await.unwrap();
    within("close", T, writer.close()).await.unwrap();
}

#[tokio::test]
async fn watches_and_caches_follow_changes_through_the_proxy_without_a_relist_loop() {
    let (capture, _guard) = Capture::start();
    let proxy = shared_proxy().await;
    let ns = unique_name("gp-watch");
    follow_changes(
        proxy,
        &ns,
        &format!("/etcd_registry/{ns}/services/"),
        &capture,
    )
    .await;
}

#[tokio::test]
async fn a_proxy_with_a_namespace_serves_watches_and_caches_without_a_relist_loop() {
    let (capture, _guard) = Capture::start();
    let etcd = shared_server().await;
    let tenant = format!("/{}", unique_name("gp-tenant"));
    let proxy = within(
        "start the gRPC proxy",
        T,
        EtcdGrpcProxy::builder().namespace(&tenant).start(etcd),
    )
    .await
    .unwrap();
    let ns = unique_name("gp-nswatch");
    follow_changes(
        &proxy,
        &ns,
        &format!("{tenant}/etcd_registry/{ns}/services/"),
        &capture,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Registration with restore after etcd behind the proxy was wiped
// ---------------------------------------------------------------------------

/// etcd behind the proxy is wiped (a new store, a new cluster id). The
/// registrations made through the proxy come back; a watch, a cache and the
/// namespace cache through the proxy converge on etcd's new content (the
/// key written directly before the wipe is gone from them, one written
/// after it is there); then no WARN line or re-list for SETTLE.
#[tokio::test]
async fn after_etcd_behind_the_proxy_is_wiped_registrations_come_back_and_caches_converge() {
    let (capture, _guard) = Capture::start();
    let mut etcd = within("start etcd", T, EtcdServer::start()).await.unwrap();
    let proxy = within("start the gRPC proxy", T, EtcdGrpcProxy::start(&etcd))
        .await
        .unwrap();
    let direct = etcd.client().await.unwrap();
    let ns = unique_name("gp-wipe");
    let services = format!("/etcd_registry/{ns}/services/");
    let owner = connect(proxy.endpoints(), &ns, 10).await;
    let _w1 = within("register", T, owner.register(inst("web", "w1", 1)))
        .await
        .unwrap();
    let _w2 = within("register", T, owner.register(inst("web", "w2", 2)))
        .await
        .unwrap();
    // Not a registration: nothing brings it back after the wipe.
    let mut c = direct.clone();
    within(
        "put",
        T,
        c.put(
            format!("{services}web/orphan"),
            inst("web", "orphan", 3).to_json(),
            None,
        ),
    )
    .await
    .unwrap();
    for i in 0..20 {
        within("put", T, c.put(format!("/{ns}/noise"), vec![i], None))
            .await
            .unwrap();
    }

    let reader = connect(proxy.endpoints(), &ns, 10).await;
    let mut watch = reader.watch("web").unwrap();
    let mut view = BTreeMap::new();
    apply(&mut view, next(&mut watch).await);
    assert_eq!(
        view.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["orphan", "w1", "w2"])
    );
    let cache = within("cache", T, reader.cache("web")).await.unwrap();
    let all = within("cache_all", T, reader.cache_all()).await.unwrap();
    assert_eq!(ids(&cache.instances()), set(&["orphan", "w1", "w2"]));
    assert_eq!(ids(&all.instances()), set(&["orphan", "w1", "w2"]));

    within("wipe etcd", T, etcd.restart_wiped()).await.unwrap();
    let wiped = Instant::now();
    let want = set(&[
        format!("{services}web/w1").as_str(),
        format!("{services}web/w2").as_str(),
    ]);
    let back = eventually("the registrations are back in etcd", T * 2, || async {
        keys_under(&direct, &services).await == want
    })
    .await;
    let mut c = direct.clone();
    within(
        "put",
        T,
        c.put(
            format!("{services}web/late"),
            inst("web", "late", 4).to_json(),
            None,
        ),
    )
    .await
    .unwrap();
    let want_ids = set(&["late", "w1", "w2"]);
    let mut converged = None;
    let deadline = Instant::now() + T * 2;
    while Instant::now() < deadline {
        let caches = ids(&cache.instances()) == want_ids && ids(&all.instances()) == want_ids;
        let watched = view.keys().cloned().collect::<BTreeSet<_>>() == want_ids;
        if caches && watched {
            converged = Some(wiped.elapsed());
            break;
        }
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), watch.next()).await {
            apply(&mut view, e);
        }
    }
    let mark = capture.mark();
    let relists_then = relists(&restarts(&ns));
    idle(SETTLE).await;
    let warnings = capture.warnings_since(mark);
    let r = restarts(&ns);
    eprintln!(
        "wipe: registrations back after {back:?}, caches and watch converged after {converged:?}; \
         restarts {r:?}; WARN lines over the whole test: {}",
        tally(&capture.warnings_since(0))
    );
    assert!(
        converged.is_some(),
        "not converged on {want_ids:?} within {:?}: cache {:?}, namespace cache {:?}, watch {:?}",
        T * 2,
        ids(&cache.instances()),
        ids(&all.instances()),
        view.keys().collect::<Vec<_>>()
    );
    assert!(
        relists_then >= 1,
        "the wipe was never detected as one: {r:?}"
    );
    assert!(
        warnings.is_empty() && relists(&r) == relists_then,
        "after converging, in {SETTLE:?}: {} re-lists and WARN lines: {}",
        relists(&r) - relists_then,
        tally(&warnings)
    );
    within("close", T, reader.close()).await.unwrap();
    within("close", T, owner.close()).await.unwrap();
}

// ---------------------------------------------------------------------------
// Elections, locks, health-gated registration
// ---------------------------------------------------------------------------

#[tokio::test]
async fn elections_and_observe_work_through_the_proxy() {
    let (capture, _guard) = Capture::start();
    let proxy = shared_proxy().await;
    let direct = shared_server().await.client().await.unwrap();
    let ns = unique_name("gp-elect");
    let a = connect(proxy.endpoints(), &ns, 10).await;
    let b = connect(proxy.endpoints(), &ns, 10).await;
    let watcher = connect(proxy.endpoints(), &ns, 10).await;
    let mut observer = watcher.election("job").unwrap().observe();
    observe_until(&mut observer, "no leader yet", |l| l.is_none()).await;

    let first = within("A campaigns", T, a.election("job").unwrap().campaign("A"))
        .await
        .unwrap();
    let seen = observe_until(&mut observer, "observe sees A", |l| l.is_some()).await;
    assert_eq!(
        seen.as_ref().map(|l| l.proposal_str().into_owned()),
        Some("A".into())
    );
    assert_eq!(seen.map(|l| l.fencing_token), Some(first.fencing_token()));
    let b_election = b.election("job").unwrap();
    let second = tokio::spawn(async move { b_election.campaign("B").await });
    let prefix = format!("{}/", a.election("job").unwrap().etcd_name());
    eventually("B's candidate key is written", T, || async {
        keys_under(&direct, &prefix).await.len() == 2
    })
    .await;
    // B waits on a watch through the proxy for A's key to go.
    idle(PAST_STALE).await;
    assert!(
        first.is_leader() && !second.is_finished(),
        "B must still wait"
    );
    within("A resigns", T, first.resign()).await.unwrap();
    let second = within("B wins", T, second).await.unwrap().unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    let seen = observe_until(&mut observer, "observe sees B", |l| {
        l.is_some_and(|l| l.proposal == b"B")
    })
    .await;
    assert_eq!(seen.map(|l| l.fencing_token), Some(second.fencing_token()));
    let leader = within("leader()", T, watcher.election("job").unwrap().leader())
        .await
        .unwrap();
    assert_eq!(
        leader.map(|l| l.fencing_token),
        Some(second.fencing_token())
    );
    within("B resigns", T, second.resign()).await.unwrap();
    observe_until(&mut observer, "observe sees no leader", |l| l.is_none()).await;

    let warnings = capture.warnings_since(0);
    eprintln!(
        "elections: restarts {:?}; WARN lines: {}",
        restarts(&ns),
        tally(&warnings)
    );
    assert!(warnings.is_empty(), "WARN lines: {}", tally(&warnings));
    for r in [a, b, watcher] {
        within("close", T, r.close()).await.unwrap();
    }
}

#[tokio::test]
async fn locks_work_through_the_proxy() {
    let (capture, _guard) = Capture::start();
    let proxy = shared_proxy().await;
    let ns = unique_name("gp-lock");
    let a = connect(proxy.endpoints(), &ns, 10).await;
    let b = connect(proxy.endpoints(), &ns, 10).await;
    let held = within("A acquires", T, a.lock("migration").unwrap().acquire())
        .await
        .unwrap();
    assert!(held.is_held());
    let b_lock = b.lock("migration").unwrap();
    assert!(
        within("try_acquire", T, b_lock.try_acquire())
            .await
            .unwrap()
            .is_none()
    );
    let waiting = tokio::spawn({
        let b_lock = b_lock.clone();
        async move { b_lock.acquire().await }
    });
    idle(PAST_STALE).await;
    assert!(
        held.is_held() && !waiting.is_finished(),
        "B must still wait"
    );
    within("A releases", T, held.release()).await.unwrap();
    let second = within("B acquires", T, waiting).await.unwrap().unwrap();
    assert!(second.fencing_token() > held.fencing_token());
    assert!(second.is_held());
    within("B releases", T, second.release()).await.unwrap();
    let warnings = capture.warnings_since(0);
    eprintln!(
        "locks: restarts {:?}; WARN lines: {}",
        restarts(&ns),
        tally(&warnings)
    );
    assert!(warnings.is_empty(), "WARN lines: {}", tally(&warnings));
    within("close", T, a.close()).await.unwrap();
    within("close", T, b.close()).await.unwrap();
}

#[tokio::test]
async fn health_gated_registration_works_through_the_proxy() {
    let (capture, _guard) = Capture::start();
    let proxy = shared_proxy().await;
    let direct = shared_server().await.client().await.unwrap();
    let ns = unique_name("gp-health");
    let registry = connect(proxy.endpoints(), &ns, 10).await;
    let watcher = connect(proxy.endpoints(), &ns, 10).await;
    let on = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = on.clone();
    let check = health::from_fn(move || {
        futures::future::ready(if flag.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("switched off".to_owned())
        })
    });
    let policy = HealthPolicy::new()
        .interval(Duration::from_millis(200))
        .rise(1)
        .fall(1);
    let reg = within(
        "register_checked",
        T,
        registry.register_checked(inst("web", "w1", 1), check, policy),
    )
    .await
    .unwrap();
    let key = reg.key().to_owned();
    eventually("registered", T, || async {
        keys_under(&direct, &key).await.len() == 1
    })
    .await;
    let mut watch = watcher.watch("web").unwrap();
    assert_eq!(
        next(&mut watch).await,
        ServiceEvent::Snapshot(vec![inst("web", "w1", 1)])
    );

    on.store(false, Ordering::SeqCst);
    eventually("deleted while failing", T, || async {
        keys_under(&direct, &key).await.is_empty()
    })
    .await;
    assert_eq!(
        next(&mut watch).await,
        ServiceEvent::Removed(inst("web", "w1", 1))
    );
    on.store(true, Ordering::SeqCst);
    eventually("back once passing", T, || async {
        keys_under(&direct, &key).await.len() == 1
    })
    .await;
    assert_eq!(
        next(&mut watch).await,
        ServiceEvent::Added(inst("web", "w1", 1))
    );
    // The failing check is reported at WARN on purpose; nothing else may be.
    let warnings: Vec<String> = capture
        .warnings_since(0)
        .into_iter()
        .filter(|w| !w.contains("instance unhealthy"))
        .collect();
    eprintln!(
        "health: restarts {:?}; other WARN lines: {}",
        restarts(&ns),
        tally(&warnings)
    );
    assert!(warnings.is_empty(), "WARN lines: {}", tally(&warnings));
    within("close", T, watcher.close()).await.unwrap();
    within("close", T, registry.close()).await.unwrap();
}

// ---------------------------------------------------------------------------
// A blackholed link between client and proxy
// ---------------------------------------------------------------------------

/// With HTTP/2 pings off, only the watch's own liveness check can notice a
/// link to the proxy that went silent; it must within the stale bound, and
/// the watch must then catch up.
#[tokio::test]
async fn a_blackholed_link_to_the_proxy_is_detected_within_the_stale_bound() {
    let proxy = shared_proxy().await;
    let ns = unique_name("gp-cut");
    let link = FaultProxy::start(&proxy.endpoint()).await.unwrap();
    counters();
    let watcher = within(
        "connect",
        T,
        Registry::builder()
            .endpoints([link.endpoint()])
            .namespace(&ns)
            .ttl(Duration::from_secs(30))
            .request_timeout(Duration::from_secs(5))
            .no_keep_alive()
            .connect(),
    )
    .await
    .unwrap();
    let writer = connect(proxy.endpoints(), &ns, 30).await;
    let mut watch = watcher.watch("web").unwrap();
    let cache = within("cache", T, watcher.cache("web")).await.unwrap();
    assert_eq!(next(&mut watch).await, ServiceEvent::Snapshot(vec![]));
    let _a = within("register", T, writer.register(inst("web", "a", 1)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut watch).await,
        ServiceEvent::Added(inst("web", "a", 1))
    );
    eventually("the cache sees a", T, || async {
        cache.instances().len() == 1
    })
    .await;

    let (watch_before, cache_before) = (watch.errors(), cache.errors());
    link.blackhole();
    let bound = ServiceWatch::STALE_AFTER + Duration::from_secs(5);
    let detected = eventually("both watches notice the cut", bound, || async {
        watch.errors() > watch_before && cache.errors() > cache_before
    })
    .await;
    let _b = within("register", T, writer.register(inst("web", "b", 2)))
        .await
        .unwrap();
    link.heal();
    assert_eq!(
        next(&mut watch).await,
        ServiceEvent::Added(inst("web", "b", 2))
    );
    eventually("the cache catches up", T, || async {
        cache.instances().len() == 2
    })
    .await;
    eprintln!(
        "the cut was noticed after {detected:?} (bound {bound:?}, stale bound {:?}); restarts {:?}",
        ServiceWatch::STALE_AFTER,
        restarts(&ns)
    );
    within("close", T, watcher.close()).await.ok();
    within("close", T, writer.close()).await.unwrap();
}

// ---------------------------------------------------------------------------
// Leadership with the proxy cut off from etcd
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Round {
    lane: usize,
    /// B (the rival) via a gRPC proxy of its own rather than directly.
    rival_via_proxy: bool,
    /// B won minus A's `lost()` firing, in ms (negative: an overlap).
    margin_ms: f64,
    /// Cut to A's `lost()` firing, in ms.
    detect_ms: f64,
    /// A's `is_leader()` right after B won.
    a_still_leader: bool,
    /// Why the round does not count, if it does not: A lost its leadership
    /// before the cut, or B's campaign failed (neither is a safety failure).
    void: Option<String>,
    reason: String,
}

/// A leads through a gRPC proxy whose link to etcd goes through a fault
/// proxy; B (directly, or through a gRPC proxy of its own) waits. The link
/// from A's proxy to etcd is blackholed at a random moment of A's keep-alive
/// cycle: A's `lost()` must fire before B's campaign returns. 20 rounds that
/// count, in 4 lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_through_a_proxy_cut_off_from_etcd_is_lost_before_a_rival_wins() {
    let seed = std::env::var("GRPC_PROXY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2424u64);
    let etcd = Arc::new(within("start etcd", T, EtcdServer::start()).await.unwrap());
    let next_round = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut lanes = Vec::new();
    for lane in 0..LANES {
        let (etcd, next_round, counted) = (etcd.clone(), next_round.clone(), counted.clone());
        lanes.push(tokio::spawn(async move {
            let ns = unique_name("gp-part");
            let rival_via_proxy = lane % 2 == 1;
            let rival_proxy = if rival_via_proxy {
                Some(within("rival's proxy", T, EtcdGrpcProxy::start(&*etcd)).await.unwrap())
            } else {
                None
            };
            let b_endpoints = rival_proxy.as_ref().map_or_else(|| etcd.endpoints(), |p| p.endpoints());
            let b = connect(b_endpoints, &ns, RIVAL_TTL_SECS).await;
            let mut results = Vec::new();
            loop {
                if counted.load(Ordering::SeqCst) >= ROUNDS {
                    break;
                }
                let i = next_round.fetch_add(1, Ordering::SeqCst);
                if i >= ROUNDS + SPARE_ROUNDS {
                    break;
                }
                let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let r = round(&etcd, &b, &ns, i, lane, rival_via_proxy, &mut rng).await;
                eprintln!(
                    "round {i:2} lane {} (rival {}): margin {:8.1} ms, A's lost() {:7.1} ms after the cut ({}){}{}",
                    r.lane,
                    if r.rival_via_proxy { "via its own proxy" } else { "direct" },
                    r.margin_ms,
                    r.detect_ms,
                    r.reason,
                    if r.margin_ms < 0.0 { ", OVERLAP: B won before A's lost()" } else { "" },
                    if r.a_still_leader { ", OVERLAP: A's is_leader() still true" } else { "" },
                );
                if let Some(why) = &r.void {
                    eprintln!("round {i:2} does not count: {why}");
                } else {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                results.push(r);
            }
            let _ = tokio::time::timeout(T, b.close()).await;
            results
        }));
    }
    let mut all = Vec::new();
    for lane in lanes {
        all.extend(within("a lane", T * 10, lane).await.expect("lane panicked"));
    }
    let (valid, void): (Vec<&Round>, Vec<&Round>) = all.iter().partition(|r| r.void.is_none());
    let overlaps: Vec<&&Round> = valid
        .iter()
        .filter(|r| r.margin_ms < 0.0 || r.a_still_leader)
        .collect();
    let mut margins: Vec<f64> = valid.iter().map(|r| r.margin_ms).collect();
    margins.sort_by(f64::total_cmp);
    eprintln!(
        "leadership through the proxy (seed {seed}): {} rounds counted, {} overlaps, {} rounds void; margin min {:.1} ms, max {:.1} ms",
        valid.len(),
        overlaps.len(),
        void.len(),
        margins.first().copied().unwrap_or(f64::NAN),
        margins.last().copied().unwrap_or(f64::NAN),
    );
    assert!(
        overlaps.is_empty(),
        "B won while A still led: {overlaps:#?}"
    );
    assert!(
        valid.len() >= ROUNDS,
        "only {} of {ROUNDS} rounds counted; void: {void:#?}",
        valid.len()
    );
}

async fn round(
    etcd: &EtcdServer,
    b: &Registry,
    ns: &str,
    i: usize,
    lane: usize,
    rival_via_proxy: bool,
    rng: &mut StdRng,
) -> Round {
    let link = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let proxy = within("A's proxy", T, EtcdGrpcProxy::start(&link))
        .await
        .unwrap();
    let a = connect(proxy.endpoints(), ns, ROUND_TTL_SECS).await;
    let election = format!("part-{i}");
    let a_lead = within("A leads", T, a.election(&election).unwrap().campaign("A"))
        .await
        .unwrap();
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    {
        let a_lead = a_lead.clone();
        tokio::spawn(async move {
            let reason = a_lead.lost().await;
            let _ = lost_tx.send((Instant::now(), reason));
        });
    }
    let b_election = b.election(&election).unwrap();
    let b_campaign = tokio::spawn(async move {
        let lead = b_election.campaign("B").await;
        (Instant::now(), lead)
    });
    let direct = etcd.client().await.unwrap();
    let prefix = format!("{}/", b.election(&election).unwrap().etcd_name());
    eventually("B's candidate key is written", T, || async {
        keys_under(&direct, &prefix).await.len() >= 2
    })
    .await;
    // A random moment of A's keep-alive cycle (one keep-alive every TTL/3).
    let cycle_ms = ROUND_TTL_SECS * 1000 / 3;
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..cycle_ms * 2))).await;
    let mut void = (!a_lead.is_leader()).then(|| "A lost its leadership before the cut".to_owned());
    link.blackhole();
    let cut = Instant::now();
    let (b_won, b_lead) = within("B wins once A's lease expired", T, b_campaign)
        .await
        .unwrap();
    let a_still_leader = a_lead.is_leader();
    let (a_lost, reason) = within("A's lost() fires", T, lost_rx).await.unwrap();
    match b_lead {
        Ok(b_lead) => within("B resigns", T, b_lead.resign()).await.unwrap(),
        Err(e) => void = Some(format!("B's campaign failed: {e}")),
    }
    link.heal();
    drop(a_lead);
    let _ = tokio::time::timeout(T, a.close()).await;
    let ms = |from: Instant, to: Instant| {
        if to >= from {
            (to - from).as_secs_f64() * 1000.0
        } else {
            -((from - to).as_secs_f64() * 1000.0)
        }
    };
    Round {
        lane,
        rival_via_proxy,
        margin_ms: ms(a_lost, b_won),
        detect_ms: ms(cut, a_lost),
        a_still_leader: a_still_leader && void.is_none(),
        void,
        reason: reason.to_string(),
    }
}

// ---------------------------------------------------------------------------
// 60 s idle through the proxy (the only long test of this file)
// ---------------------------------------------------------------------------

/// Unary calls per method on `proxy` (or on etcd behind it, on etcd 3.4).
fn unary_calls(text: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        if !line.starts_with("grpc_server_started_total{") || !line.contains("grpc_type=\"unary\"")
        {
            continue;
        }
        let method = line
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("?");
        let value = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        *calls.entry(method.to_owned()).or_insert(0) += value;
    }
    calls
}

/// Watch and keep-alive streams started, and unary calls by method: the
/// proxy's own count, or etcd's behind it where the proxy has none (3.4).
async fn proxy_counts(
    proxy: &EtcdGrpcProxy,
    etcd: &EtcdServer,
) -> (&'static str, u64, u64, BTreeMap<String, u64>) {
    let (source, text) = match within("metrics", T, proxy.metrics()).await {
        Ok(text) => ("the proxy's /proxy/metrics", text),
        Err(_) => (
            "etcd's /metrics behind the proxy",
            within("metrics", T, etcd.metrics()).await.unwrap(),
        ),
    };
    let started = |method: &str| {
        let wanted = format!("grpc_method=\"{method}\"");
        text.lines()
            .filter(|l| l.starts_with("grpc_server_started_total{") && l.contains(&wanted))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    (
        source,
        started("Watch"),
        started("LeaseKeepAlive"),
        unary_calls(&text),
    )
}

/// Through the proxy, a registry holding an instance, a cache, the
/// namespace cache, a leader, a waiting candidate and an observer sits idle
/// for 60 s: no WARN line, no state change, no restart or re-list, no new
/// watch or keep-alive stream. The unary calls made while idle are printed
/// (the cost of proving liveness without progress reports).
#[tokio::test]
async fn sixty_seconds_idle_through_the_proxy_are_quiet() {
    let (capture, _guard) = Capture::start();
    let etcd = within("start etcd", T, EtcdServer::start()).await.unwrap();
    let proxy = within("start the gRPC proxy", T, EtcdGrpcProxy::start(&etcd))
        .await
        .unwrap();
    let direct = etcd.client().await.unwrap();
    let ns = unique_name("gp-idle");
    // TTL 30 s as in tests/idle.rs: fewer keep-alive answers, so HTTP/2
    // pings are more often the only frames, which is when a server's ping
    // policy punishes them.
    let registry = connect(proxy.endpoints(), &ns, 30).await;
    let other = connect(proxy.endpoints(), &ns, 30).await;
    let _instance = within("register", T, registry.register(inst("web", "1", 8080)))
        .await
        .unwrap();
    let cache = within("cache", T, registry.cache("web")).await.unwrap();
    let all = within("cache_all", T, registry.cache_all()).await.unwrap();
    let election = registry.election("job").unwrap();
    let leadership = within("campaign", T, election.campaign("leader"))
        .await
        .unwrap();
    let other_leadership = within(
        "campaign",
        T,
        other.election("queue").unwrap().campaign("other"),
    )
    .await
    .unwrap();
    let queue = registry.election("queue").unwrap();
    let waiting = tokio::spawn({
        let queue = queue.clone();
        async move { queue.campaign("waiting").await }
    });
    let mut observer = election.observe();
    observe_until(&mut observer, "observe sees the leader", |l| l.is_some()).await;
    let queue_prefix = format!("{}/", queue.etcd_name());
    eventually("the waiting candidate's key is written", T, || async {
        keys_under(&direct, &queue_prefix).await.len() == 2
    })
    .await;
    eventually("both caches hold the instance", T, || async {
        cache.instances().len() == 1 && all.instances().len() == 1
    })
    .await;
    // Streams of the set-up are open before counting starts.
    let settle_deadline = Instant::now() + T;
    let mut last = proxy_counts(&proxy, &etcd).await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = proxy_counts(&proxy, &etcd).await;
        if (now.1, now.2) == (last.1, last.2) {
            break;
        }
        assert!(
            Instant::now() < settle_deadline,
            "the set-up's streams kept opening"
        );
        last = now;
    }
    let mut state = registry.state();
    let state_before = *state.borrow_and_update();
    let mut other_state = other.state();
    other_state.borrow_and_update();
    let (source, watches, keep_alives, calls_before) = proxy_counts(&proxy, &etcd).await;
    let restarts_before = restarts(&ns);
    let mark = capture.mark();

    let observed = within("idle", IDLE + T, async {
        let idle = tokio::time::sleep(IDLE);
        tokio::pin!(idle);
        let mut observed = Vec::new();
        loop {
            tokio::select! {
                _ = &mut idle => return observed,
                leader = observer.next() => observed.push(leader),
            }
        }
    })
    .await;

    let warnings = capture.warnings_since(mark);
    let infos = capture.infos_since(mark);
    let (_, watches_after, keep_alives_after, calls_after) = proxy_counts(&proxy, &etcd).await;
    let restarts_after = restarts(&ns);
    let per_minute: BTreeMap<&String, u64> = calls_after
        .iter()
        .map(|(m, n)| (m, n - calls_before.get(m).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    eprintln!(
        "idle {IDLE:?} through the proxy, counted on {source}: watch streams {watches} -> {watches_after}, \
         keep-alive streams {keep_alives} -> {keep_alives_after}; unary calls while idle: {per_minute:?}; \
         restarts {restarts_before:?} -> {restarts_after:?}; INFO lines: {}; WARN lines: {}",
        tally(&infos),
        tally(&warnings)
    );
    assert!(
        warnings.is_empty(),
        "WARN lines while idle: {}",
        tally(&warnings)
    );
    assert_eq!(
        restarts_after, restarts_before,
        "watches restarted or re-listed while idle"
    );
    assert!(
        !state.has_changed().unwrap(),
        "state moved from {state_before:?} to {:?} while idle",
        *state.borrow()
    );
    assert!(
        !other_state.has_changed().unwrap(),
        "the other registry's state moved while idle"
    );
    assert_eq!(
        (cache.errors(), all.errors()),
        (0, 0),
        "a cache's watch was interrupted"
    );
    assert!(
        observed.is_empty(),
        "the observer re-read while idle: {observed:?}"
    );
    assert_eq!(watches_after, watches, "watch streams restarted ({source})");
    assert_eq!(
        keep_alives_after, keep_alives,
        "keep-alive streams restarted ({source})"
    );
    assert!(leadership.is_leader() && other_leadership.is_leader());
    assert!(
        !waiting.is_finished(),
        "the waiting candidate stopped waiting"
    );

    // The waiting candidate still works after the idle time.
    within("resign", T, other_leadership.resign())
        .await
        .unwrap();
    let second = within("the waiting candidate wins", T, waiting)
        .await
        .unwrap()
        .unwrap();
    within("resign", T, second.resign()).await.unwrap();
    within("resign", T, leadership.resign()).await.unwrap();
    within("close", T, other.close()).await.unwrap();
    within("close", T, registry.close()).await.unwrap();
}
