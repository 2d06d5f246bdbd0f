//! The metrics of the `metrics` feature, read from a `metrics-util`
//! debugging recorder installed for this test binary, against real etcd.
//!
//! The debugging recorder's snapshots drain counters (and zero gauges), so
//! this binary sums counters across snapshots and keeps every value a gauge
//! was given, in order: a short-lived state such as `recovering` is seen even
//! if no snapshot falls within it. Tests isolate by namespace label.
#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{builder, connect_with};
use etcd_registry::{RegistryState, ServiceInstance};
use etcd_registry_testkit::{
    EtcdServer, FaultProxy, eventually, shared_server, unique_name, within,
};
use futures::StreamExt;
use metrics::{Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

const T: Duration = Duration::from_secs(20);

/// A metric's name and its labels, sorted.
type Id = (String, Vec<(String, String)>);

fn id_of(key: &Key) -> Id {
    let mut labels: Vec<(String, String)> = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (key.name().to_owned(), labels)
}

fn id(name: &str, labels: &[(&str, &str)]) -> Id {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    (name.to_owned(), labels)
}

/// The debugging recorder for counters and histograms; gauges keep their history.
struct TestRecorder {
    debug: DebuggingRecorder,
    gauges: Arc<Mutex<HashMap<Id, Vec<f64>>>>,
}

struct GaugeHistory {
    id: Id,
    gauges: Arc<Mutex<HashMap<Id, Vec<f64>>>>,
}

impl GaugeHistory {
    fn push(&self, f: impl FnOnce(f64) -> f64) {
        let mut gauges = self.gauges.lock().unwrap();
        let history = gauges.entry(self.id.clone()).or_default();
        let next = f(history.last().copied().unwrap_or(0.0));
        history.push(next);
    }
}

impl GaugeFn for GaugeHistory {
    fn increment(&self, value: f64) {
        self.push(|v| v + value);
    }
    fn decrement(&self, value: f64) {
        self.push(|v| v - value);
    }
    fn set(&self, value: f64) {
        self.push(|_| value);
    }
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.debug.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.debug.describe_gauge(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.debug.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.debug.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(GaugeHistory {
            id: id_of(key),
            gauges: self.gauges.clone(),
        }))
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.debug.register_histogram(key, metadata)
    }
}

struct Recorded {
    snapshotter: Snapshotter,
    gauges: Arc<Mutex<HashMap<Id, Vec<f64>>>>,
    counters: Mutex<HashMap<Id, u64>>,
    histograms: Mutex<HashMap<Id, usize>>,
}

fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let debug = DebuggingRecorder::new();
        let snapshotter = debug.snapshotter();
        let gauges = Arc::new(Mutex::new(HashMap::new()));
        metrics::set_global_recorder(TestRecorder {
            debug,
            gauges: gauges.clone(),
        })
        .expect("the only recorder of this test binary");
        Recorded {
            snapshotter,
            gauges,
            counters: Mutex::new(HashMap::new()),
            histograms: Mutex::new(HashMap::new()),
        }
    })
}

impl Recorded {
    /// Drains the debugging recorder into the running totals.
    fn drain(&self) {
        let mut counters = self.counters.lock().unwrap();
        let mut histograms = self.histograms.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let id = id_of(key.key());
            match (key.kind(), value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => {
                    *counters.entry(id).or_default() += n
                }
                (MetricKind::Histogram, DebugValue::Histogram(v)) => {
                    *histograms.entry(id).or_default() += v.len()
                }
                _ => {}
            }
        }
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.drain();
        let counters = self.counters.lock().unwrap();
        counters.get(&id(name, labels)).copied().unwrap_or(0)
    }

    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.drain();
        let histograms = self.histograms.lock().unwrap();
        histograms.get(&id(name, labels)).copied().unwrap_or(0)
    }

    /// Every value the gauge was given, oldest first.
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let gauges = self.gauges.lock().unwrap();
        gauges.get(&id(name, labels)).cloned().unwrap_or_default()
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    eventually(what, T, || std::future::ready(check())).await;
}

// Mutation checks by hand: recording `recovering` as 1, dropping the
// `lease_recovered` call in session.rs, or dropping the `restored` call in
// registry.rs each made this test fail; restored since.
#[tokio::test]
async fn a_revoked_lease_goes_through_recovering_and_an_outside_delete_is_restored() {
    let m = recorded();
    let etcd = shared_server().await;
    let ns = unique_name("metrics-revoke");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 3)).await;
    let nsl = [("namespace", ns.as_str())];
    let _reg = within(
        "register",
        T,
        registry.register(ServiceInstance::new("web", "w-1", "10.0.0.1", 80)),
    )
    .await
    .unwrap();
    assert_eq!(
        m.gauge("etcd_registry_state", &nsl),
        vec![1.0],
        "active once connected"
    );
    assert_eq!(
        m.gauge("etcd_registry_registrations", &nsl).last(),
        Some(&1.0)
    );
    assert_eq!(
        m.samples(
            "etcd_registry_request_duration_seconds",
            &[("namespace", &ns), ("operation", "register")]
        ),
        1
    );
    wait_for("a keep-alive answered", || {
        m.counter("etcd_registry_keepalive_total", &nsl) >= 1
    })
    .await;
    let deadline = m.gauge("etcd_registry_lease_deadline_seconds", &nsl);
    assert!(
        deadline.last().is_some_and(|&s| s > 1.0 && s <= 3.0),
        "the deadline is about the TTL away: {deadline:?}"
    );
    assert_eq!(m.counter("etcd_registry_lease_recoveries_total", &nsl), 0);

    // Revoked from outside: the session notices, re-grants and re-puts.
    let old = registry.lease_id().unwrap();
    let mut client = within("client", T, etcd.client()).await.unwrap();
    within("revoke", T, client.lease_revoke(old)).await.unwrap();
    let mut state = registry.state();
    within(
        "active on a new lease",
        T,
        state.wait_for(|s| matches!(s, RegistryState::Active { lease_id } if *lease_id != old)),
    )
    .await
    .unwrap();
    let states = m.gauge("etcd_registry_state", &nsl);
    let recovering = states.iter().position(|&s| s == 3.0);
    assert!(
        recovering.is_some_and(|i| states[i + 1..].contains(&1.0)),
        "state went 1 -> recovering (3) -> active (1): {states:?}"
    );
    assert_eq!(states.last(), Some(&1.0), "{states:?}");
    assert_eq!(m.counter("etcd_registry_lease_recoveries_total", &nsl), 1);

    // Deleted from outside: anti-entropy puts it back, and counts it once.
    let restores = [("namespace", ns.as_str()), ("service", "web")];
    let before = m.counter("etcd_registry_restores_total", &restores);
    let key = format!("/etcd_registry/{ns}/services/web/w-1");
    within("delete", T, client.delete(key.as_str(), None))
        .await
        .unwrap();
    wait_for("the deleted key restored", || {
        m.counter("etcd_registry_restores_total", &restores) > before
    })
    .await;
    let back = within("get", T, client.get(key.as_str(), None))
        .await
        .unwrap();
    assert_eq!(back.kvs().len(), 1, "the key is back in etcd");
    assert_eq!(
        m.counter("etcd_registry_restores_total", &restores),
        before + 1
    );

    within("close", T, registry.close()).await.unwrap();
    assert_eq!(
        m.gauge("etcd_registry_state", &nsl).last(),
        Some(&4.0),
        "closed"
    );
    assert_eq!(
        m.gauge("etcd_registry_registrations", &nsl).last(),
        Some(&0.0)
    );
}

// Mutation check by hand: counting the compacted restart in watch.rs as
// `broken` made this test fail (0 compacted); restored since.
#[tokio::test]
async fn a_watch_across_a_compaction_counts_one_compacted_restart() {
    let m = recorded();
    // Its own server: the compaction must not disturb the other test.
    let etcd = within("start etcd", Duration::from_secs(60), EtcdServer::start())
        .await
        .unwrap();
    let proxy = within("start proxy", T, FaultProxy::start(&etcd.endpoint()))
        .await
        .unwrap();
    let ns = unique_name("metrics-compact");
    let writer = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let watcher = connect_with(builder(vec![proxy.endpoint()], &ns, 10)).await;
    let inst = |id: &str, port| ServiceInstance::new("db", id, "10.0.0.1", port);
    let _a = within("register", T, writer.register(inst("a", 1)))
        .await
        .unwrap();
    let mut b = within("register", T, writer.register(inst("b", 2)))
        .await
        .unwrap();
    let c = within("register", T, writer.register(inst("c", 3)))
        .await
        .unwrap();
    let mut watch = watcher.watch("db").unwrap();
    within("snapshot", T, watch.next()).await.unwrap();

    // Cut off, the watch misses three changes, whose history is then compacted.
    proxy.blackhole();
    let _d = within("register", T, writer.register(inst("d", 4)))
        .await
        .unwrap();
    within("update", T, b.update(inst("b", 2).with_weight(9)))
        .await
        .unwrap();
    within("deregister", T, c.deregister()).await.unwrap();
    let mut client = within("client", T, etcd.client()).await.unwrap();
    let rev = within("get", T, client.get("x", None))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    within("compact", T, client.compact(rev, None))
        .await
        .unwrap();
    // Reset the cut connections so the watch notices at once, then heal.
    proxy.reset();
    eventually("the watch to notice the cut", T, || {
        std::future::ready(watch.errors() > 0)
    })
    .await;
    proxy.heal();
    for _ in 0..3 {
        within("a missed change", T, watch.next()).await.unwrap();
    }

    let labels = |cause| {
        [
            ("namespace", ns.as_str()),
            ("service", "db"),
            ("cause", cause),
        ]
    };
    assert_eq!(
        m.counter("etcd_registry_watch_restarts_total", &labels("compacted")),
        1
    );
    let kind = |kind| {
        [
            ("namespace", ns.as_str()),
            ("service", "db"),
            ("kind", kind),
        ]
    };
    for (k, n) in [
        ("snapshot", 1),
        ("added", 1),
        ("updated", 1),
        ("removed", 1),
    ] {
        assert_eq!(
            m.counter("etcd_registry_watch_events_total", &kind(k)),
            n,
            "{k} events"
        );
    }
    within("close", T, watcher.close()).await.ok();
    within("close", T, writer.close()).await.unwrap();
}

// Mutation check by hand: without the leader gauge's increment this test
// failed; restored since.
#[tokio::test]
async fn leading_sets_the_leader_gauge_and_resigning_counts_a_loss_and_caches_count_instances() {
    let m = recorded();
    let etcd = shared_server().await;
    let ns = unique_name("metrics-elect");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let el = [("namespace", ns.as_str()), ("election", "cron")];
    let leadership = within(
        "campaign",
        T,
        registry.election("cron").unwrap().campaign("me"),
    )
    .await
    .unwrap();
    assert_eq!(m.gauge("etcd_registry_leader", &el).last(), Some(&1.0));
    within("resign", T, leadership.resign()).await.unwrap();
    wait_for("the leader gauge back to 0", || {
        m.gauge("etcd_registry_leader", &el).last() == Some(&0.0)
    })
    .await;
    let lost = [
        ("namespace", ns.as_str()),
        ("election", "cron"),
        ("reason", "resigned"),
    ];
    assert_eq!(m.counter("etcd_registry_leadership_lost_total", &lost), 1);

    let cache = within("cache", T, registry.cache("api")).await.unwrap();
    let svc = [("namespace", ns.as_str()), ("service", "api")];
    let _r = within(
        "register",
        T,
        registry.register(ServiceInstance::new("api", "a-1", "h", 1)),
    )
    .await
    .unwrap();
    wait_for("the cache sees it", || cache.instances().len() == 1).await;
    wait_for("the cache gauge at 1", || {
        m.gauge("etcd_registry_cache_instances", &svc).last() == Some(&1.0)
    })
    .await;
    // The staleness gauge is set every second and stays below the 5 s
    // progress interval plus slack while etcd answers.
    wait_for("a staleness value", || {
        !m.gauge("etcd_registry_cache_staleness_seconds", &svc)
            .is_empty()
    })
    .await;
    let staleness = m.gauge("etcd_registry_cache_staleness_seconds", &svc);
    assert!(
        staleness.iter().all(|&s| (0.0..8.0).contains(&s)),
        "{staleness:?}"
    );
    within("close", T, registry.close()).await.unwrap();
}

/// Checked by hand: with the `health_check` call removed from the health
/// task, the pass/fail counts stay 0 and this fails.
#[tokio::test]
async fn health_checks_are_counted_by_result_and_transitions_by_state() {
    use std::sync::atomic::{AtomicBool, Ordering};

    use etcd_registry::{HealthPolicy, health};

    let m = recorded();
    let etcd = shared_server().await;
    let ns = unique_name("metrics-health");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let ok = Arc::new(AtomicBool::new(true));
    let check = health::from_fn({
        let ok = ok.clone();
        move || {
            let ok = ok.load(Ordering::SeqCst);
            async move { if ok { Ok(()) } else { Err("down".to_owned()) } }
        }
    });
    let policy = HealthPolicy::new()
        .interval(Duration::from_millis(100))
        .rise(1)
        .fall(2);
    let _reg = within(
        "register_checked",
        T,
        registry.register_checked(ServiceInstance::new("api", "a-1", "h", 1), check, policy),
    )
    .await
    .unwrap();
    let label = |k: &'static str, v: &'static str| {
        [
            ("namespace", ns.clone()),
            ("service", "api".to_owned()),
            (k, v.to_owned()),
        ]
    };
    let count = |name: &str, labels: &[(&'static str, String); 3]| {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        m.counter(name, &labels)
    };
    let checks = "etcd_registry_health_checks_total";
    let transitions = "etcd_registry_health_transitions_total";
    wait_for("a healthy transition", || {
        count(transitions, &label("state", "healthy")) == 1
    })
    .await;
    assert!(count(checks, &label("result", "pass")) >= 1);
    ok.store(false, Ordering::SeqCst);
    wait_for("an unhealthy transition", || {
        count(transitions, &label("state", "unhealthy")) == 1
    })
    .await;
    assert!(count(checks, &label("result", "fail")) >= 2, "fall is 2");
    assert_eq!(count(transitions, &label("state", "healthy")), 1);
    within("close", T, registry.close()).await.unwrap();
}
