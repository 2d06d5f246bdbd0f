//! The testkit's latency injection and same-cluster wipe, against real etcd.

use std::future::Future;
use std::time::Duration;

use etcd_client::Client;
use etcd_registry_testkit::{Direction, EtcdServer, FaultProxy, within};
use tokio::time::Instant;

/// Upper bound for any single await that should complete promptly.
const STEP: Duration = Duration::from_secs(15);

async fn step<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within(what, STEP, fut).await
}

async fn start_server() -> EtcdServer {
    match EtcdServer::start().await {
        Ok(s) => s,
        Err(e) => panic!("start etcd: {e}"),
    }
}

/// How long one `get` through `client` takes.
async fn timed_get(client: &Client) -> Duration {
    let start = Instant::now();
    step("get", client.clone().get("k", None))
        .await
        .expect("get");
    start.elapsed()
}

// Only lower bounds on the delays: a loaded machine may add time, never
// remove it. The one upper bound (concurrent requests) is loose by 4x.
#[tokio::test]
async fn proxy_latency_delays_each_direction_without_throttling() {
    let etcd = start_server().await;
    let proxy = step("proxy", FaultProxy::start(&etcd.endpoint()))
        .await
        .unwrap();
    let client = step("client", Client::connect([proxy.endpoint()], None))
        .await
        .unwrap();
    // Warm the HTTP/2 connection up, so each timed get is one round trip.
    timed_get(&client).await;
    let delay = Duration::from_millis(400);

    proxy.set_latency(Direction::ToClient, delay);
    assert_eq!(proxy.latency(Direction::ToClient), delay);
    assert_eq!(proxy.latency(Direction::ToServer), Duration::ZERO);
    let took = timed_get(&client).await;
    assert!(
        took >= delay,
        "answers must come {delay:?} late, took {took:?}"
    );

    proxy.set_latency(Direction::ToClient, Duration::ZERO);
    proxy.set_latency(Direction::ToServer, delay);
    let took = timed_get(&client).await;
    assert!(
        took >= delay,
        "requests must arrive {delay:?} late, took {took:?}"
    );

    proxy.set_latency(Direction::Both, delay);
    let took = timed_get(&client).await;
    assert!(
        took >= 2 * delay,
        "a round trip must take 2 x {delay:?}, took {took:?}"
    );

    // Eight requests in flight at once share the delay instead of queueing
    // behind each other (serialised they would take 8 x 800 ms).
    let start = Instant::now();
    let mut gets = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = client.clone();
        gets.spawn(async move { timed_get(&client).await });
    }
    step("concurrent gets", gets.join_all()).await;
    let took = start.elapsed();
    assert!(
        took < 8 * 2 * delay / 2,
        "concurrent requests must overlap, 8 took {took:?}"
    );

    // A write made while requests are slowed is really made, in order.
    step("put", client.clone().put("k", "v", None))
        .await
        .unwrap();
    proxy.set_latency(Direction::Both, Duration::ZERO);
    let resp = step("get", client.clone().get("k", None)).await.unwrap();
    assert_eq!(resp.kvs()[0].value(), b"v");
}

#[tokio::test]
async fn a_blackhole_holds_delayed_bytes_until_healed() {
    let etcd = start_server().await;
    let proxy = step("proxy", FaultProxy::start(&etcd.endpoint()))
        .await
        .unwrap();
    let client = step("client", Client::connect([proxy.endpoint()], None))
        .await
        .unwrap();
    timed_get(&client).await;
    proxy.set_latency(Direction::ToClient, Duration::from_millis(500));
    let pending = tokio::spawn({
        let mut c = client.clone();
        async move { c.get("k", None).await }
    });
    // The answer is now held in the proxy; the cut must keep holding it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.blackhole();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!pending.is_finished(), "an answer got through a blackhole");
    proxy.heal();
    step("answer after heal", pending).await.unwrap().unwrap();
}

#[tokio::test]
async fn wiped_restart_keeps_the_cluster_id_only_when_asked() {
    let mut etcd = start_server().await;
    let mut client = step("client", etcd.client()).await.unwrap();
    let cluster_id = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            let resp = step("status", c.status()).await.expect("status");
            resp.header().map(|h| h.cluster_id()).expect("header")
        }
    };
    for i in 0..5 {
        step("put", client.put(format!("k{i}"), "v", None))
            .await
            .unwrap();
    }
    let original = cluster_id(&mut client).await;

    step("wipe, same cluster", etcd.restart_wiped_same_cluster())
        .await
        .unwrap();
    assert_eq!(cluster_id(&mut client).await, original);
    let resp = step("get", client.get("k0", None)).await.unwrap();
    assert!(resp.kvs().is_empty(), "the data must be gone");
    assert_eq!(resp.header().map(|h| h.revision()), Some(1));

    step("wipe, new cluster", etcd.restart_wiped())
        .await
        .unwrap();
    assert_ne!(cluster_id(&mut client).await, original);
}
