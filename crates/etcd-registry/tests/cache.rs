//! ServiceCache against real etcd: one shared watch (etcd's metrics), pickers,
//! and (feature `tower`) balancing tonic calls over the cache.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use etcd_registry::{Registry, ServiceInstance, Strategy};
use etcd_registry_testkit::{EtcdServer, shared_server, unique_name};
use tokio::time::Instant;

async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    etcd_registry_testkit::within(what, Duration::from_secs(secs), f).await
}

async fn connect(endpoints: Vec<String>, ns: &str) -> Registry {
    within(
        30,
        "connect",
        Registry::builder()
            .endpoints(endpoints)
            .namespace(ns)
            .connect(),
    )
    .await
    .expect("connect")
}

fn inst(name: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(name, id, "127.0.0.1", port)
}

/// etcd's gauge of live watchers, from its /metrics endpoint.
async fn watchers(etcd: &EtcdServer) -> u64 {
    let text = within(10, "metrics", etcd.metrics())
        .await
        .expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("etcd_debugging_mvcc_watcher_total in /metrics")
}

/// Polls the watcher gauge until it equals `want`, or fails after `secs`.
async fn watchers_become(etcd: &EtcdServer, want: u64, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = watchers(etcd).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: etcd has {now} watchers, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_hundred_caches_of_one_service_share_one_etcd_watch() {
    // A server of its own: nobody else's watches move the gauge.
    let etcd = within(60, "start etcd", EtcdServer::start()).await.unwrap();
    let ns = unique_name("c6");
    let reg = connect(etcd.endpoints(), &ns).await;
    let _x = within(10, "register", reg.register(inst("x", "x1", 1)))
        .await
        .unwrap();
    // The registry's own anti-entropy watch (over service x) is the baseline.
    watchers_become(&etcd, 1, 20, "the registry's own watch").await;
    let baseline = 1;
    let caches = within(
        30,
        "100 caches",
        futures::future::join_all((0..100).map(|_| reg.cache("x"))),
    )
    .await;
    let caches: Vec<_> = caches.into_iter().collect::<Result<_, _>>().unwrap();
    assert!(caches.iter().all(|c| c.instances().len() == 1));
    watchers_become(&etcd, baseline + 1, 20, "100 caches").await;

    // A change reaches every cache through that one watch, and no other watch appears.
    let _x2 = within(10, "register", reg.register(inst("x", "x2", 2)))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !caches.iter().all(|c| c.get("x2").is_some()) {
        assert!(
            Instant::now() < deadline,
            "the change did not reach every cache"
        );
        within(15, "changed", caches[0].changed()).await.ok();
    }
    assert_eq!(watchers(&etcd).await, baseline + 1);
    // The 101st, made later, reuses it too.
    let late = within(10, "cache", reg.cache("x")).await.unwrap();
    assert_eq!(late.instances().len(), 2);
    assert_eq!(watchers(&etcd).await, baseline + 1);

    // A cache of another service and a plain watch each add one; dropping them removes it.
    let other = within(10, "cache", reg.cache("y")).await.unwrap();
    let watch = reg.watch("x").unwrap();
    watchers_become(&etcd, baseline + 3, 20, "another cache and a watch").await;
    drop(watch);
    drop(other);
    watchers_become(&etcd, baseline + 1, 20, "dropping a watch and a cache").await;

    drop(caches);
    assert_eq!(
        watchers(&etcd).await,
        baseline + 1,
        "one handle still holds the shared watch"
    );
    drop(late);
    watchers_become(&etcd, baseline, 20, "dropping every cache").await;
    within(10, "close", reg.close()).await.unwrap();
}

#[tokio::test]
async fn weighted_picks_follow_the_weights_and_round_robin_is_even() {
    let etcd = shared_server().await;
    let ns = unique_name("c7");
    let reg = connect(etcd.endpoints(), &ns).await;
    // Weight 0 and a negative weight count as 1: effective weights 1, 1, 3, 6.
    let weights = [("w0", 0), ("wneg", -4), ("w3", 3), ("w6", 6)];
    let mut regs = Vec::new();
    for (i, (id, w)) in weights.iter().enumerate() {
        regs.push(
            within(
                10,
                "register",
                reg.register(inst("pick", id, 100 + i as u16).with_weight(*w)),
            )
            .await
            .unwrap(),
        );
    }
    let cache = within(15, "cache", reg.cache("pick")).await.unwrap();
    assert_eq!(cache.instances().len(), 4);

    const N: usize = 10_000;
    let count = |strategy: Strategy| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..N {
            *counts
                .entry(cache.pick_with(strategy).expect("an instance").id.clone())
                .or_default() += 1;
        }
        counts
    };
    let weighted = count(Strategy::Weighted);
    for (id, expected) in [
        ("w0", 1.0 / 11.0),
        ("wneg", 1.0 / 11.0),
        ("w3", 3.0 / 11.0),
        ("w6", 6.0 / 11.0),
    ] {
        let share = weighted.get(id).copied().unwrap_or(0) as f64 / N as f64;
        assert!(
            (share - expected).abs() < 0.025,
            "{id}: share {share:.3}, expected {expected:.3}"
        );
    }
    let round_robin = count(Strategy::RoundRobin);
    assert_eq!(round_robin.len(), 4);
    assert!(
        round_robin.values().all(|&c| c == N / 4),
        "round-robin is exactly even: {round_robin:?}"
    );
    let plain: HashMap<String, usize> = (0..400).fold(HashMap::new(), |mut m, _| {
        *m.entry(cache.pick().unwrap().id.clone()).or_default() += 1;
        m
    });
    assert!(
        plain.values().all(|&c| c == 100),
        "pick() is round-robin: {plain:?}"
    );
    let random = count(Strategy::Random);
    assert!(
        random
            .values()
            .all(|&c| (c as f64 / N as f64 - 0.25).abs() < 0.03),
        "random is roughly even: {random:?}"
    );
    within(10, "close", reg.close()).await.unwrap();
}

#[cfg(feature = "tower")]
mod balancing {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;
    use tonic::transport::{Channel, Endpoint, Server};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tower::discover::Change;

    use super::*;

    /// A tonic-health server on an ephemeral port that counts the calls it serves.
    async fn health_server() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let (_reporter, service) = tonic_health::server::health_reporter();
        let counted = tonic::service::interceptor::InterceptedService::new(service, move |req| {
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(req)
        });
        let incoming = tokio_stream_incoming(listener);
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(counted)
                .serve_with_incoming(incoming)
                .await;
        });
        (port, calls, task)
    }

    fn tokio_stream_incoming(
        listener: tokio::net::TcpListener,
    ) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        })
    }

    #[tokio::test]
    async fn balanced_calls_follow_instances_joining_and_leaving() {
        let etcd = shared_server().await;
        let ns = unique_name("c8");
        let reg = connect(etcd.endpoints(), &ns).await;
        let mut servers = Vec::new();
        let mut registrations = Vec::new();
        for i in 0..3 {
            let (port, calls, task) = health_server().await;
            registrations.push(
                within(
                    10,
                    "register",
                    reg.register(inst("grpc", &format!("s{i}"), port)),
                )
                .await
                .unwrap(),
            );
            servers.push((calls, task));
        }
        let cache = within(15, "cache", reg.cache("grpc")).await.unwrap();
        let (channel, tx) = Channel::balance_channel::<String>(16);
        let mut discover = cache.discover();
        let feeder = tokio::spawn(async move {
            while let Some(Ok(change)) = discover.next().await {
                // tonic has its own `Change`, fed from tower's.
                let change = match change {
                    Change::Insert(id, i) => tonic::transport::channel::Change::Insert(
                        id,
                        Endpoint::from_shared(format!("http://{}", i.endpoint())).unwrap(),
                    ),
                    Change::Remove(id) => tonic::transport::channel::Change::Remove(id),
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        });
        let mut client = HealthClient::new(channel);
        let mut call = async || {
            within(
                10,
                "health call",
                client.check(HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await
            .expect("the call succeeds");
        };

        let deadline = Instant::now() + Duration::from_secs(20);
        while servers.iter().any(|(c, _)| c.load(Ordering::Relaxed) == 0) {
            assert!(
                Instant::now() < deadline,
                "calls did not reach all three servers"
            );
            call().await;
        }

        // s0 leaves: calls keep succeeding, and soon none reach it.
        let s0 = registrations.remove(0);
        within(10, "deregister", s0.deregister()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = servers[0].0.load(Ordering::Relaxed);
            for _ in 0..30 {
                call().await;
            }
            if servers[0].0.load(Ordering::Relaxed) == before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "calls still reach the deregistered server"
            );
        }
        let (s1, s2) = (
            servers[1].0.load(Ordering::Relaxed),
            servers[2].0.load(Ordering::Relaxed),
        );
        for _ in 0..60 {
            call().await;
        }
        assert!(
            servers[1].0.load(Ordering::Relaxed) > s1 && servers[2].0.load(Ordering::Relaxed) > s2
        );

        feeder.abort();
        for (_, task) in servers {
            task.abort();
        }
        within(10, "close", reg.close()).await.unwrap();
    }
}
