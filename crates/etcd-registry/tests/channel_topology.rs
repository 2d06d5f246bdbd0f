//! `Registry::channel`: empty-set protection, panic threshold, zones, subsets.
#![cfg(feature = "channel")]

mod channel_common;
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use channel_common::{TestServer, check, dead_port};
use etcd_registry::channel::Phase;
use etcd_registry::{Channel, Registry, ServiceInstance};
use etcd_registry_testkit::{EtcdServer, eventually, shared_server, unique_name, within};
use tonic_health::pb::health_client::HealthClient;

const T: Duration = Duration::from_secs(15);

async fn registry(ns: &str) -> Registry {
    let server = shared_server().await;
    common::connect_with(common::builder(server.endpoints(), ns, 5)).await
}

fn instance(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new("svc", id, "127.0.0.1", port)
}

fn ids(channel: &Channel) -> BTreeSet<String> {
    channel.endpoints().into_iter().map(|e| e.id).collect()
}

fn ready_count(channel: &Channel) -> usize {
    channel
        .endpoints()
        .iter()
        .filter(|e| e.phase == Phase::Ready)
        .count()
}

#[tokio::test]
async fn a_wiped_etcd_does_not_empty_the_channel() {
    let mut etcd = EtcdServer::start().await.unwrap();
    let ns = "wipe";
    let registry = common::connect_with(common::builder(etcd.endpoints(), ns, 5)).await;
    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
    // Written without a lease by a plain client, so that nobody writes them
    // again after the wipe: only protection can keep them.
    let client = etcd.client().await.unwrap();
    let key = |id: &str| format!("{}/{ns}/services/svc/{id}", registry.config().key_prefix());
    let put = |id: String, port: u16| {
        let mut client = client.clone();
        let key = key(&id);
        async move {
            client
                .put(key, instance(&id, port).to_json(), None)
                .await
                .unwrap();
        }
    };
    for (i, s) in servers.iter().enumerate() {
        put(format!("i{i}"), s.port).await;
    }
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .protect_for(Duration::from_secs(4))
            .build(),
    )
    .await
    .unwrap();
    eventually("3 ready", T, || async { ready_count(&channel) == 3 }).await;
    // An explicit delete applies at once.
    let mut c = client.clone();
    c.delete(key("i2"), None).await.unwrap();
    eventually("i2 leaves", T, || async { !ids(&channel).contains("i2") }).await;
    put("i2".into(), servers[2].port).await;
    eventually("i2 back", T, || async { ready_count(&channel) == 3 }).await;

    within("wipe etcd", Duration::from_secs(30), etcd.restart_wiped())
        .await
        .unwrap();
    // The channel's watch re-lists an empty service; calls keep working on
    // the last known set.
    let mut grpc = HealthClient::new(channel.clone());
    let before: u64 = servers.iter().map(|s| s.ctl.calls()).sum();
    for i in 0..20 {
        check(&mut grpc)
            .await
            .unwrap_or_else(|e| panic!("call {i} after the wipe failed: {e}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        servers.iter().map(|s| s.ctl.calls()).sum::<u64>(),
        before + 20
    );
    assert_eq!(ids(&channel).len(), 3, "protection did not keep the set");
    // Once the protection period is over, what did not come back goes.
    eventually("the held set expires", T, || async {
        ids(&channel).is_empty()
    })
    .await;
    within("close", T, registry.close()).await.ok();
}

#[tokio::test]
async fn under_the_panic_threshold_outliers_take_requests_again() {
    let registry = registry(&unique_name("ch-panic")).await;
    let good = TestServer::start();
    // The good one answers 20 ms late, so that p2c over PeakEwma prefers the
    // two bad ones (they fail at once) until both are ejected: otherwise the
    // second bad one can go unpicked for long (a flake seen in a CI run).
    good.ctl.delay_ms.store(20, Ordering::SeqCst);
    let bad: Vec<TestServer> = (0..2).map(|_| TestServer::start()).collect();
    for b in &bad {
        b.ctl.unavailable.store(true, Ordering::SeqCst);
    }
    let _g = registry
        .register(instance("good", good.port))
        .await
        .unwrap();
    let _b0 = registry
        .register(instance("bad0", bad[0].port))
        .await
        .unwrap();
    let _b1 = registry
        .register(instance("bad1", bad[1].port))
        .await
        .unwrap();
    let build = |threshold: f64| {
        registry
            .channel_builder("svc")
            .outlier_after(Some(2))
            // Long enough that no ejected endpoint returns during the test.
            .backoff(Duration::from_secs(60), Duration::from_secs(90))
            .panic_threshold(threshold)
            .build()
    };
    for (threshold, expect_more) in [(0.0, false), (0.5, true)] {
        let channel = within("channel", T, build(threshold)).await.unwrap();
        eventually("3 ready", T, || async { ready_count(&channel) == 3 }).await;
        let mut grpc = HealthClient::new(channel.clone());
        // Until both bad ones are ejected as outliers.
        eventually("both bad ones ejected", T, || {
            let mut grpc = grpc.clone();
            let channel = channel.clone();
            async move {
                let _ = check(&mut grpc).await;
                channel
                    .endpoints()
                    .iter()
                    .filter(|e| matches!(e.phase, Phase::Ejected { .. }))
                    .count()
                    == 2
            }
        })
        .await;
        let before: u64 = bad.iter().map(|b| b.ctl.calls()).sum();
        for _ in 0..40 {
            let _ = check(&mut grpc).await;
        }
        let after: u64 = bad.iter().map(|b| b.ctl.calls()).sum();
        assert_eq!(
            after > before,
            expect_more,
            "threshold {threshold}: bad servers got {} requests while ejected",
            after - before
        );
    }
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn the_own_zone_is_preferred_and_spills_over_as_it_fails() {
    let registry = registry(&unique_name("ch-zone")).await;
    let mut servers: Vec<TestServer> = (0..4).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let zone = if i < 2 { "a" } else { "b" };
        regs.push(
            registry
                .register(instance(&format!("{zone}{i}"), s.port).with_metadata("zone", zone))
                .await
                .unwrap(),
        );
    }
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .zone("a")
            .backoff(Duration::from_secs(20), Duration::from_secs(30))
            .build(),
    )
    .await
    .unwrap();
    eventually("4 ready", T, || async { ready_count(&channel) == 4 }).await;
    let mut grpc = HealthClient::new(channel.clone());
    for _ in 0..100 {
        check(&mut grpc).await.unwrap();
    }
    let calls = |s: &[TestServer]| s.iter().map(|s| s.ctl.calls()).sum::<u64>();
    assert_eq!(
        calls(&servers[2..]),
        0,
        "zone b got calls while a was whole"
    );
    // Half of zone a down: a takes min(1, 1.4 × 1/2) = 70%, b the rest.
    servers[0].kill();
    eventually("a0 ejected", T, || async { ready_count(&channel) == 3 }).await;
    let (a, b) = (calls(&servers[..2]), calls(&servers[2..]));
    for _ in 0..400 {
        check(&mut grpc).await.unwrap();
    }
    let (a, b) = (calls(&servers[..2]) - a, calls(&servers[2..]) - b);
    let share = b as f64 / (a + b) as f64;
    assert!(
        (0.15..=0.45).contains(&share),
        "zone b took {share:.2} of calls (expected about 0.30)"
    );
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn subsets_of_consecutive_clients_partition_the_service() {
    let registry = registry(&unique_name("ch-subset")).await;
    let mut regs = Vec::new();
    for i in 0..20 {
        regs.push(
            registry
                .register(instance(&format!("i{i:02}"), dead_port()))
                .await
                .unwrap(),
        );
    }
    let cache = registry.cache("svc").await.unwrap();
    eventually("20 cached", T, || async { cache.instances().len() == 20 }).await;
    let mut channels = Vec::new();
    for client in 0..4 {
        let channel = registry
            .channel_builder("svc")
            .subset(5)
            .client_id(client)
            .build()
            .await
            .unwrap();
        channels.push(channel);
    }
    eventually("each has 5", T, || async {
        channels.iter().all(|c| ids(c).len() == 5)
    })
    .await;
    let first: Vec<BTreeSet<String>> = channels.iter().map(ids).collect();
    let union: BTreeSet<&String> = first.iter().flatten().collect();
    assert_eq!(union.len(), 20, "subsets overlap: {first:?}");
    // A change that is not a membership change keeps the subsets.
    let mut changed = regs.remove(0);
    let updated = changed.instance().clone().with_metadata("v", "2");
    changed.update(updated).await.unwrap();
    regs.insert(0, changed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again: Vec<BTreeSet<String>> = channels.iter().map(ids).collect();
    assert_eq!(first, again);
    within("close", T, registry.close()).await.unwrap();
}
