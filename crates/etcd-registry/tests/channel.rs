//! `Registry::channel`: connections, ejection, retries, budget, drain.
#![cfg(feature = "channel")]

mod channel_common;
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use channel_common::{RefusingServer, TestServer, check, check_idempotent, dead_port};
use etcd_registry::channel::Phase;
use etcd_registry::{Channel, Registry, ServiceInstance};
use etcd_registry_testkit::{eventually, shared_server, unique_name, within};
use tonic_health::pb::health_client::HealthClient;

const T: Duration = Duration::from_secs(15);

async fn registry(ns: &str) -> Registry {
    let server = shared_server().await;
    common::connect_with(common::builder(server.endpoints(), ns, 5)).await
}

fn instance(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new("svc", id, "127.0.0.1", port)
}

fn phase(channel: &Channel, id: &str) -> Option<Phase> {
    channel
        .endpoints()
        .into_iter()
        .find(|e| e.id == id)
        .map(|e| e.phase)
}

async fn ready(channel: &Channel, ids: &[&str]) {
    eventually("endpoints ready", T, || async {
        ids.iter()
            .all(|id| phase(channel, id) == Some(Phase::Ready))
    })
    .await;
}

#[tokio::test]
async fn calls_spread_over_connected_endpoints_and_are_reported() {
    let registry = registry(&unique_name("ch-basic")).await;
    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        regs.push(
            registry
                .register(instance(&format!("i{i}"), s.port))
                .await
                .unwrap(),
        );
    }
    let channel = within("channel", T, registry.channel("svc")).await.unwrap();
    ready(&channel, &["i0", "i1", "i2"]).await;
    let mut client = HealthClient::new(channel.clone());
    for _ in 0..90 {
        check(&mut client).await.unwrap();
    }
    for s in &servers {
        assert!(s.ctl.calls() > 0, "a server got no call");
    }
    let states = channel.endpoints();
    assert_eq!(states.len(), 3);
    assert_eq!(states.iter().map(|e| e.requests).sum::<u64>(), 90);
    assert!(
        states
            .iter()
            .all(|e| e.latency_ewma.is_some() && e.in_flight == 0)
    );
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn a_failed_connect_or_a_lost_connection_ejects_at_once() {
    let registry = registry(&unique_name("ch-eject")).await;
    let mut up = TestServer::start();
    let _a = registry.register(instance("up", up.port)).await.unwrap();
    let _b = registry
        .register(instance("down", dead_port()))
        .await
        .unwrap();
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .backoff(Duration::from_millis(200), Duration::from_millis(400))
            .build(),
    )
    .await
    .unwrap();
    ready(&channel, &["up"]).await;
    eventually("the dead one is ejected", T, || async {
        matches!(phase(&channel, "down"), Some(Phase::Ejected { .. }))
    })
    .await;
    let mut client = HealthClient::new(channel.clone());
    for _ in 0..20 {
        check(&mut client).await.unwrap();
    }
    // A connection that drops ejects its endpoint without any request.
    up.kill();
    eventually(
        "the killed one is ejected",
        Duration::from_secs(3),
        || async { matches!(phase(&channel, "up"), Some(Phase::Ejected { .. })) },
    )
    .await;
    let failures = channel
        .endpoints()
        .iter()
        .find(|e| e.id == "up")
        .unwrap()
        .failures;
    assert!(failures >= 1);
    // It comes back after backoff and a successful connect.
    up.restart();
    ready(&channel, &["up"]).await;
    check(&mut client).await.unwrap();
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn a_request_never_sent_is_retried_on_another_endpoint() {
    let registry = registry(&unique_name("ch-notsent")).await;
    let good = TestServer::start();
    let refusing = RefusingServer::start().await;
    let _a = registry
        .register(instance("good", good.port))
        .await
        .unwrap();
    let _b = registry
        .register(instance("refusing", refusing.port))
        .await
        .unwrap();
    let channel = within("channel", T, registry.channel("svc")).await.unwrap();
    ready(&channel, &["good", "refusing"]).await;
    let mut client = HealthClient::new(channel.clone());
    for i in 0..40 {
        check(&mut client)
            .await
            .unwrap_or_else(|e| panic!("call {i} failed: {e}"));
    }
    let refused = refusing.streams.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refused > 0, "no request went to the refusing server");
    assert_eq!(good.ctl.calls(), 40);
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn a_sent_request_is_retried_only_when_idempotent() {
    let registry = registry(&unique_name("ch-idem")).await;
    let good = TestServer::start();
    let bad = TestServer::start();
    bad.ctl
        .unavailable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let _a = registry
        .register(instance("good", good.port))
        .await
        .unwrap();
    let _b = registry.register(instance("bad", bad.port)).await.unwrap();
    let channel = within(
        "channel",
        T,
        registry.channel_builder("svc").outlier_after(None).build(),
    )
    .await
    .unwrap();
    ready(&channel, &["good", "bad"]).await;
    let mut client = HealthClient::new(channel.clone());
    let mut failed = 0;
    for _ in 0..40 {
        if let Err(e) = check(&mut client).await {
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
            failed += 1;
        }
    }
    assert!(failed > 0, "no call reached the bad server");
    assert_eq!(failed, bad.ctl.calls(), "a non-idempotent call was retried");
    assert_eq!(good.ctl.calls() + bad.ctl.calls(), 40);
    for i in 0..40 {
        check_idempotent(&mut client)
            .await
            .unwrap_or_else(|e| panic!("idempotent call {i} failed: {e}"));
    }
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn retries_draw_on_the_budget() {
    let registry = registry(&unique_name("ch-budget")).await;
    // Three endpoints, since a retry goes only to one not tried yet.
    let bad: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in bad.iter().enumerate() {
        s.ctl
            .unavailable
            .store(true, std::sync::atomic::Ordering::SeqCst);
        regs.push(
            registry
                .register(instance(&format!("bad{i}"), s.port))
                .await
                .unwrap(),
        );
    }
    // A reserve of 1/s over 10 s: at most 10 retries, however many calls.
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .outlier_after(None)
            .retry_budget(Duration::from_secs(10), 1, 0.0)
            .build(),
    )
    .await
    .unwrap();
    ready(&channel, &["bad0", "bad1", "bad2"]).await;
    let mut client = HealthClient::new(channel.idempotent());
    for _ in 0..30 {
        assert!(check(&mut client).await.is_err());
    }
    let sent: u64 = bad.iter().map(|s| s.ctl.calls()).sum();
    // Without a budget: 30 × 3 = 90; without retries, 30.
    assert!((31..=42).contains(&sent), "{sent} requests for 30 calls");
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn a_removed_instance_drains_its_in_flight_requests() {
    let registry = registry(&unique_name("ch-drain")).await;
    let slow = TestServer::start();
    slow.ctl
        .delay_ms
        .store(1500, std::sync::atomic::Ordering::SeqCst);
    let fast = TestServer::start();
    let slow_reg = registry
        .register(instance("slow", slow.port))
        .await
        .unwrap();
    let channel = within("channel", T, registry.channel("svc")).await.unwrap();
    ready(&channel, &["slow"]).await;
    let mut client = HealthClient::new(channel.clone());
    let in_flight = tokio::spawn(async move { check(&mut client).await });
    eventually("the call is in flight", T, || async {
        slow.ctl.calls() == 1
    })
    .await;
    let _f = registry
        .register(instance("fast", fast.port))
        .await
        .unwrap();
    within("deregister", T, slow_reg.deregister())
        .await
        .unwrap();
    eventually("slow drains", T, || async {
        phase(&channel, "slow") == Some(Phase::Draining)
    })
    .await;
    ready(&channel, &["fast"]).await;
    let mut client = HealthClient::new(channel.clone());
    for _ in 0..10 {
        check(&mut client).await.unwrap();
    }
    assert_eq!(
        slow.ctl.calls(),
        1,
        "a draining endpoint took a new request"
    );
    within("in-flight call", T, in_flight)
        .await
        .unwrap()
        .expect("the in-flight call failed");
    eventually("slow is gone once idle", T, || async {
        phase(&channel, "slow").is_none()
    })
    .await;
    let ids: BTreeSet<String> = channel.endpoints().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, BTreeSet::from(["fast".to_owned()]));
    within("close", T, registry.close()).await.unwrap();
}
