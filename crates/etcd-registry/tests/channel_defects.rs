//! `Registry::channel`: waiting across zones, deadlines and retries, retries
//! that never go back to an endpoint already tried, a parked call that must
//! not stall the others, and an idle channel under a flapping endpoint.
#![cfg(feature = "channel")]

mod channel_common;
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use channel_common::{Control, RefusingServer, TestServer, check, dead_port};
use etcd_registry::channel::Phase;
use etcd_registry::{Channel, Registry, ServiceInstance};
use etcd_registry_testkit::{eventually, shared_server, unique_name, within};
use tonic_health::pb::HealthCheckRequest;
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

fn health_request(timeout: Option<Duration>) -> tonic::Request<HealthCheckRequest> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// Parses a `grpc-timeout` value as the test servers saw it.
fn grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().expect("grpc-timeout digits");
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        other => panic!("bad grpc-timeout unit {other:?}"),
    }
}

/// Issue #34 item 2: the only instance is in another zone and not connected
/// yet when the call starts; the call must not wait in the (empty) same-zone
/// balancer forever.
#[tokio::test]
async fn a_call_made_before_any_endpoint_is_ready_is_served_by_another_zone() {
    let registry = registry(&unique_name("chd-zone")).await;
    let server = TestServer::start();
    let _b = registry
        .register(instance("b1", server.port).with_metadata("zone", "b"))
        .await
        .unwrap();
    let channel = within(
        "channel",
        T,
        registry.channel_builder("svc").zone("a").build(),
    )
    .await
    .unwrap();
    let mut client = HealthClient::new(channel.clone());
    let answer =
        tokio::time::timeout(Duration::from_secs(2), client.check(health_request(None))).await;
    assert!(
        matches!(answer, Ok(Ok(_))),
        "no answer from the other zone: {answer:?}"
    );
    assert_eq!(server.ctl.calls(), 1);
    within("close", T, registry.close()).await.unwrap();
}

/// Issue #34 item 7: a timeout is not retried, even on an idempotent call,
/// and ends the call with `DEADLINE_EXCEEDED` at the caller's deadline.
#[tokio::test]
async fn an_idempotent_call_that_times_out_is_not_retried() {
    let registry = registry(&unique_name("chd-deadline")).await;
    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        s.ctl.delay_ms.store(1000, Ordering::SeqCst);
        regs.push(
            registry
                .register(instance(&format!("s{i}"), s.port))
                .await
                .unwrap(),
        );
    }
    let channel = within("channel", T, registry.channel("svc")).await.unwrap();
    ready(&channel, &["s0", "s1", "s2"]).await;
    let mut client = HealthClient::new(channel.idempotent());
    let start = Instant::now();
    let answer = within(
        "the call",
        T,
        client.check(health_request(Some(Duration::from_millis(200)))),
    )
    .await;
    let took = start.elapsed();
    let status = answer.expect_err("a 1 s server answered within 200 ms");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Every request the channel sent has reached its server by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent: u64 = servers.iter().map(|s| s.ctl.calls()).sum();
    assert_eq!(sent, 1, "a timed-out call was sent again");
    within("close", T, registry.close()).await.unwrap();
}

/// Issue #34 item 7: a retry carries the deadline that is left, not the
/// whole one again.
#[tokio::test]
async fn a_retry_carries_the_remaining_deadline() {
    let registry = registry(&unique_name("chd-remaining")).await;
    let servers: Vec<TestServer> = (0..2).map(|_| TestServer::start()).collect();
    let mut regs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        s.ctl.delay_ms.store(300, Ordering::SeqCst);
        s.ctl.unavailable.store(true, Ordering::SeqCst);
        s.ctl.record_timeouts.store(true, Ordering::SeqCst);
        regs.push(
            registry
                .register(instance(&format!("s{i}"), s.port))
                .await
                .unwrap(),
        );
    }
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .outlier_after(None)
            .max_retries(1)
            .build(),
    )
    .await
    .unwrap();
    ready(&channel, &["s0", "s1"]).await;
    let mut client = HealthClient::new(channel.idempotent());
    let answer = within(
        "the call",
        T,
        client.check(health_request(Some(Duration::from_secs(3)))),
    )
    .await;
    let status = answer.expect_err("both servers say UNAVAILABLE");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    let mut seen: Vec<Duration> = servers
        .iter()
        .flat_map(|s| s.ctl.timeouts.lock().unwrap().clone())
        .map(|t| grpc_timeout(&t.expect("a request without grpc-timeout")))
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 2, "one call and one retry: {seen:?}");
    assert!(
        seen[1] <= Duration::from_secs(3) && seen[1] > Duration::from_millis(2900),
        "the first attempt's deadline: {seen:?}"
    );
    // The first attempt took at least the servers' 300 ms.
    assert!(
        seen[0] <= Duration::from_millis(2750) && !seen[0].is_zero(),
        "the retry did not carry the remaining deadline: {seen:?}"
    );
    within("close", T, registry.close()).await.unwrap();
}

/// Issue #34 item 10: a retry goes to an endpoint not tried yet; once every
/// endpoint was tried, the call ends.
#[tokio::test]
async fn a_retry_never_goes_back_to_an_endpoint_already_tried() {
    let registry = registry(&unique_name("chd-tried")).await;
    let a = RefusingServer::start().await;
    let b = RefusingServer::start().await;
    let _a = registry.register(instance("a", a.port)).await.unwrap();
    let _b = registry.register(instance("b", b.port)).await.unwrap();
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .outlier_after(None)
            .max_retries(4)
            .retry_budget(Duration::from_secs(10), 100, 1.0)
            .build(),
    )
    .await
    .unwrap();
    ready(&channel, &["a", "b"]).await;
    let mut client = HealthClient::new(channel.clone());
    let calls = 10;
    for _ in 0..calls {
        assert!(check(&mut client).await.is_err());
    }
    let streams = |s: &RefusingServer| s.streams.load(Ordering::SeqCst);
    assert_eq!(
        (streams(&a), streams(&b)),
        (calls, calls),
        "each call must reach each endpoint exactly once"
    );
    within("close", T, registry.close()).await.unwrap();
}

/// Issue #34 item 11: a call future polled once (while no endpoint is ready)
/// and then never again must not stall the channel's other callers.
#[tokio::test]
async fn a_parked_call_does_not_stall_the_others() {
    let registry = registry(&unique_name("chd-parked")).await;
    let port = dead_port();
    let _r = registry.register(instance("late", port)).await.unwrap();
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .backoff(Duration::from_millis(50), Duration::from_millis(100))
            .build(),
    )
    .await
    .unwrap();
    let mut parked_client = HealthClient::new(channel.clone());
    let mut parked = Box::pin(parked_client.check(health_request(None)));
    assert!(
        futures::poll!(parked.as_mut()).is_pending(),
        "answered with no server listening"
    );
    let server = TestServer::start_on(port, Control::default());
    ready(&channel, &["late"]).await;
    let mut client = HealthClient::new(channel.clone());
    for i in 0..5 {
        check(&mut client)
            .await
            .unwrap_or_else(|e| panic!("call {i} behind a parked call: {e}"));
    }
    // The parked call itself still completes once polled again.
    within("the parked call", T, parked).await.unwrap();
    assert_eq!(server.ctl.calls(), 6);
    within("close", T, registry.close()).await.unwrap();
}

/// An HTTP/2 server on its own runtime that closes every connection shortly
/// after its handshake: an endpoint that connects, becomes ready, and is
/// lost, over and over.
struct Flapper {
    port: u16,
    accepted: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Flapper {
    fn start(hold: Duration) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = accepted.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    let _ = tokio::time::timeout(hold, conn.accept()).await;
                });
            }
        });
        Self {
            port,
            accepted,
            runtime: Some(runtime),
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Flapper {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Issue #34 item 11: an idle channel (no call at all) whose endpoint flaps
/// does not keep every change, and the connection each one holds.
#[tokio::test]
async fn an_idle_channel_does_not_pile_up_a_flapping_endpoints_changes() {
    let registry = registry(&unique_name("chd-flap")).await;
    let flapper = Flapper::start(Duration::from_millis(5));
    let _r = registry
        .register(instance("flappy", flapper.port))
        .await
        .unwrap();
    let channel = within(
        "channel",
        T,
        registry
            .channel_builder("svc")
            .backoff(Duration::from_millis(1), Duration::from_millis(2))
            .build(),
    )
    .await
    .unwrap();
    let lost = || {
        channel
            .endpoints()
            .iter()
            .find(|e| e.id == "flappy")
            .map_or(0, |e| e.failures)
    };
    eventually("a few flaps", T, || async { lost() >= 20 }).await;
    let before = alive_tasks();
    let start = Instant::now();
    eventually("1000 flaps", Duration::from_secs(120), || async {
        lost() >= 1020
    })
    .await;
    let after = alive_tasks();
    let accepted = flapper.accepted();
    eprintln!(
        "{} failures, {accepted} connections in {:?}; tasks {before} -> {after}",
        lost(),
        start.elapsed()
    );
    assert!(
        after <= before + 50,
        "tasks grew from {before} to {after} over 1000 flaps of an idle channel"
    );
    drop(channel);
    within("close", T, registry.close()).await.unwrap();
}

/// Issue #34 item 7: the deadline bounds the wait for a ready endpoint too.
#[tokio::test]
async fn a_call_waiting_for_a_ready_endpoint_ends_at_its_deadline() {
    let registry = registry(&unique_name("chd-wait-deadline")).await;
    let _r = registry
        .register(instance("nobody", dead_port()))
        .await
        .unwrap();
    let channel = within("channel", T, registry.channel("svc")).await.unwrap();
    let mut client = HealthClient::new(channel.clone());
    let start = Instant::now();
    let answer = within(
        "the call",
        T,
        client.check(health_request(Some(Duration::from_millis(300)))),
    )
    .await;
    let status = answer.expect_err("answered with no server listening");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(start.elapsed() < Duration::from_secs(10));
    within("close", T, registry.close()).await.unwrap();
}
