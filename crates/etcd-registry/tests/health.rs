//! Health-gated registration and draining against real etcd: an instance is
//! in etcd only while its check passes, nothing the registry does on its own
//! brings an unhealthy instance back, and drains delete before they wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::Client;
use etcd_registry::{
    Health, HealthCheck, HealthPolicy, HealthState, InitialState, Registration, Registry,
    ServiceEvent, ServiceInstance, health,
};
use etcd_registry_testkit::{
    EtcdServer, HealthEndpoint, eventually, shared_server, unique_name, within,
};
use futures::StreamExt;
use tokio::time::Instant;

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(30);

mod common;

async fn connect(endpoints: Vec<String>, namespace: &str) -> Registry {
    common::connect_with(common::builder(endpoints, namespace, 10)).await
}

fn inst(name: &str, id: &str) -> ServiceInstance {
    ServiceInstance::new(name, id, "127.0.0.1", 8080)
}

/// Whether `key` is in etcd.
async fn present(client: &Client, key: &str) -> bool {
    let mut c = client.clone();
    match tokio::time::timeout(Duration::from_secs(5), c.get(key, None)).await {
        Ok(Ok(resp)) => !resp.kvs().is_empty(),
        other => panic!("get {key}: {other:?}"),
    }
}

/// Waits until the health of `reg` satisfies `f`, and returns it.
async fn health_where(reg: &Registration, what: &str, f: impl Fn(&Health) -> bool) -> Health {
    let mut rx = reg.health();
    within(what, T, rx.wait_for(|h| f(h)))
        .await
        .expect("the health task ended")
        .clone()
}

/// A check switched by a flag, counting its runs.
fn switch() -> (Arc<AtomicBool>, Arc<AtomicU64>, impl HealthCheck) {
    let on = Arc::new(AtomicBool::new(true));
    let runs = Arc::new(AtomicU64::new(0));
    let (flag, count) = (on.clone(), runs.clone());
    let check = health::from_fn(move || {
        count.fetch_add(1, Ordering::SeqCst);
        futures::future::ready(if flag.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("switched off".to_owned())
        })
    });
    (on, runs, check)
}

#[tokio::test]
async fn an_http_check_removes_and_restores_the_key_and_watchers_see_it() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("health-http");
    let registry = connect(server.endpoints(), &ns).await;
    let endpoint = HealthEndpoint::start().await.unwrap();
    let interval = Duration::from_millis(300);
    let (rise, fall) = (2, 3);
    let policy = HealthPolicy::new().interval(interval).rise(rise).fall(fall);

    let reg = within(
        "register_checked",
        T,
        registry.register_checked(
            inst("web", "web-1"),
            health::http(&endpoint.url("/healthz")).unwrap(),
            policy,
        ),
    )
    .await
    .unwrap();
    let key = reg.key().to_owned();
    // Registered on the first pass (InitialState::Pending, the default).
    health_where(&reg, "healthy", |h| h.state == HealthState::Healthy).await;
    eventually("registered on the first pass", T, || present(&client, &key)).await;

    let mut watch = registry.watch("web").unwrap();
    match within("snapshot", T, watch.next()).await {
        Some(ServiceEvent::Snapshot(all)) => assert_eq!(all.len(), 1),
        other => panic!("expected a snapshot, got {other:?}"),
    }

    endpoint.set_healthy(false);
    let failing = Instant::now();
    // Below `fall` failures in a row, the key stays. The read counts only if
    // the state had not moved by the time it returned (the delete follows it).
    health_where(&reg, "one failure", |h| h.failures >= 1).await;
    let was_present = present(&client, &key).await;
    let h = reg.health().borrow().clone();
    if h.state == HealthState::Healthy {
        assert!(was_present, "deleted after {} failure(s)", h.failures);
    }
    let h = health_where(&reg, "unhealthy", |h| h.state == HealthState::Unhealthy).await;
    assert_eq!(h.failures, fall);
    assert!(
        h.last_error.as_deref().is_some_and(|e| e.contains("503")),
        "last error: {:?}",
        h.last_error
    );
    // interval × fall plus one round trip, with room for a loaded machine.
    let bound = interval * fall + Duration::from_secs(3);
    eventually("the key is deleted", bound, || async {
        !present(&client, &key).await
    })
    .await;
    let gone_after = failing.elapsed();
    match within("removed", T, watch.next()).await {
        Some(ServiceEvent::Removed(i)) => assert_eq!(i.id, "web-1"),
        other => panic!("expected Removed, got {other:?}"),
    }

    endpoint.set_healthy(true);
    health_where(&reg, "one pass", |h| h.passes >= 1).await;
    let was_present = present(&client, &key).await;
    let h = reg.health().borrow().clone();
    if h.state == HealthState::Unhealthy {
        assert!(!was_present, "back after {} pass(es)", h.passes);
    }
    eventually(
        "the key is back",
        interval * rise + Duration::from_secs(3),
        || present(&client, &key),
    )
    .await;
    assert!(reg.health().borrow().passes >= rise);
    match within("added", T, watch.next()).await {
        Some(ServiceEvent::Added(i)) => assert_eq!(i.id, "web-1"),
        other => panic!("expected Added, got {other:?}"),
    }
    eprintln!("key deleted {gone_after:?} after the endpoint started failing (bound {bound:?})");
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn a_hanging_check_fails_after_its_timeout_and_blocks_nobody() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("health-hang");
    let registry = connect(server.endpoints(), &ns).await;
    let policy = HealthPolicy::new()
        .interval(Duration::from_millis(200))
        .timeout(Duration::from_millis(100))
        .fall(2)
        .initial(InitialState::Healthy);

    let hanging = health::from_fn(std::future::pending::<Result<(), String>>);
    let stuck = within(
        "register the hanging one",
        T,
        registry.register_checked(inst("web", "stuck"), hanging, policy),
    )
    .await
    .unwrap();
    // Registered at once with InitialState::Healthy.
    assert!(present(&client, stuck.key()).await);
    let (_on, runs, check) = switch();
    let fine = within(
        "register a passing one",
        T,
        registry.register_checked(inst("web", "fine"), check, policy),
    )
    .await
    .unwrap();
    let plain = within(
        "register a plain one",
        T,
        registry.register(inst("api", "a-1")),
    )
    .await
    .unwrap();

    let h = health_where(&stuck, "the hanging check fails", |h| {
        h.state == HealthState::Unhealthy
    })
    .await;
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no answer within")),
        "last error: {:?}",
        h.last_error
    );
    eventually("the hanging one is deleted", T, || async {
        !present(&client, stuck.key()).await
    })
    .await;

    // Meanwhile the other check kept running, and the registry kept working.
    let before = runs.load(Ordering::SeqCst);
    eventually("the passing check keeps running", T, || async {
        runs.load(Ordering::SeqCst) >= before + 3
    })
    .await;
    assert_eq!(fine.health().borrow().state, HealthState::Healthy);
    assert!(present(&client, fine.key()).await);
    assert!(present(&client, plain.key()).await);
    let listed = within("list", Duration::from_secs(5), registry.instances("web"))
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["fine"]
    );
    // A close is not held up by a check that never returns.
    within("close", Duration::from_secs(10), registry.close())
        .await
        .unwrap();
}

/// Breaking the mechanism by hand: with the `serving` filter removed from
/// `restore_all` the wiped-etcd step fails; with the `!entry.serving` guard
/// removed from `reconcile_key` the key is restored right after the check
/// deletes it; with that guard kept for deletions only, the stray write is
/// taken back under the registry's lease.
#[tokio::test]
async fn an_unhealthy_instance_is_never_restored_until_it_is_healthy() {
    let mut server = EtcdServer::start().await.unwrap();
    let registry = connect(server.endpoints(), "unhealthy").await;
    let policy = HealthPolicy::new()
        .interval(Duration::from_millis(200))
        .rise(1)
        .fall(1);
    let (on, _runs, check) = switch();
    let checked = within(
        "register_checked",
        T,
        registry.register_checked(inst("web", "sick"), check, policy),
    )
    .await
    .unwrap();
    // A positive control: the registry does restore what it should.
    let control = within("register", T, registry.register(inst("web", "control")))
        .await
        .unwrap();
    let client = server.client().await.unwrap();
    eventually("registered", T, || present(&client, checked.key())).await;

    on.store(false, Ordering::SeqCst);
    eventually("deleted when unhealthy", T, || async {
        !present(&client, checked.key()).await
    })
    .await;

    // Written, then deleted, from outside (a stray etcdctl), while unhealthy.
    // After each step the control key is deleted and waited for: the
    // registry handles events in revision order, so once the control key is
    // back it has handled the step before.
    let mut c = client.clone();
    let barrier = async |c: &mut Client| {
        within("delete", T, c.delete(control.key(), None))
            .await
            .unwrap();
        eventually("the control key is restored", T, || {
            present(&client, control.key())
        })
        .await;
    };
    within(
        "put",
        T,
        c.put(checked.key(), inst("web", "sick").to_json(), None),
    )
    .await
    .unwrap();
    barrier(&mut c).await;
    let stray = within("get", T, c.get(checked.key(), None)).await.unwrap();
    assert_eq!(
        stray.kvs().first().map(|kv| kv.lease()),
        Some(0),
        "an unhealthy key was taken back under the registry's lease"
    );
    within("delete", T, c.delete(checked.key(), None))
        .await
        .unwrap();
    barrier(&mut c).await;
    assert!(
        !present(&client, checked.key()).await,
        "an unhealthy key was restored"
    );

    within("restart etcd wiped", T, server.restart_wiped())
        .await
        .unwrap();
    let client = server.client().await.unwrap();
    eventually("the control key is back after the wipe", T, || {
        present(&client, control.key())
    })
    .await;
    // Recovery re-puts in one batch; a few more checks must not bring it back either.
    let checks = checked.health().borrow().checks;
    health_where(&checked, "more checks", |h| h.checks >= checks + 3).await;
    assert!(
        !present(&client, checked.key()).await,
        "recovery restored an unhealthy key"
    );

    on.store(true, Ordering::SeqCst);
    eventually("back once healthy", T, || present(&client, checked.key())).await;
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn maintenance_mode_overrides_a_passing_check() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("health-maint");
    let registry = connect(server.endpoints(), &ns).await;
    let (_on, _runs, check) = switch();
    let policy = HealthPolicy::new().interval(Duration::from_millis(200));
    let reg = within(
        "register_checked",
        T,
        registry.register_checked(inst("web", "m"), check, policy),
    )
    .await
    .unwrap();
    eventually("registered", T, || present(&client, reg.key())).await;

    within("set_serving(false)", T, reg.set_serving(false))
        .await
        .unwrap();
    assert!(
        !present(&client, reg.key()).await,
        "still there after set_serving(false)"
    );
    let checks = reg.health().borrow().checks;
    health_where(&reg, "more passing checks", |h| h.checks >= checks + 3).await;
    assert!(
        !present(&client, reg.key()).await,
        "a passing check undid maintenance"
    );

    within("set_serving(true)", T, reg.set_serving(true))
        .await
        .unwrap();
    assert!(present(&client, reg.key()).await);
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn drain_deletes_first_then_waits_the_grace_period() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("health-drain");
    let registry = connect(server.endpoints(), &ns).await;
    let reg = within("register", T, registry.register(inst("web", "d")))
        .await
        .unwrap();
    let key = reg.key().to_owned();
    assert!(present(&client, &key).await);

    let grace = Duration::from_millis(1500);
    let drain = tokio::spawn(reg.drain(grace));
    let started = Instant::now();
    eventually("deleted during the grace period", T, || async {
        !present(&client, &key).await
    })
    .await;
    let deleted_after = started.elapsed();
    within("drain", T, drain).await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(
        took >= grace,
        "drain returned after {took:?}, before the grace period"
    );
    assert!(
        deleted_after < took,
        "deleted after {deleted_after:?}, drain took {took:?}"
    );
    // Not restored afterwards: the registration ended.
    let _barrier = within("register", T, registry.register(inst("web", "barrier")))
        .await
        .unwrap();
    assert!(!present(&client, &key).await);
    within("close", T, registry.close()).await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_every_registration_then_closes() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("health-shutdown");
    let registry = Arc::new(connect(server.endpoints(), &ns).await);
    let a = within("register", T, registry.register(inst("web", "a")))
        .await
        .unwrap();
    let (on, _runs, check) = switch();
    let policy = HealthPolicy::new()
        .interval(Duration::from_millis(100))
        .rise(1)
        .fall(1)
        .initial(InitialState::Healthy);
    let b = within(
        "register_checked",
        T,
        registry.register_checked(inst("api", "b"), check, policy),
    )
    .await
    .unwrap();
    let lease = registry.lease_id().unwrap();
    let grace = Duration::from_secs(3);
    let r = registry.clone();
    let shutdown = tokio::spawn(async move { r.shutdown(grace).await });
    eventually("keys deleted at once", T, || async {
        !present(&client, a.key()).await && !present(&client, b.key()).await
    })
    .await;
    // During the grace period the lease still lives (elections keep running)
    // and a check that recovers does not put its key back. Breaking it by
    // hand (no `draining` test in `Inner::set_serving`) fails the last assert.
    let mut c = client.clone();
    let ttl = within("lease ttl", T, c.lease_time_to_live(lease, None))
        .await
        .unwrap();
    assert!(
        ttl.ttl() > 0,
        "the lease was revoked before the grace period ended"
    );
    on.store(false, Ordering::SeqCst);
    health_where(&b, "unhealthy", |h| h.state == HealthState::Unhealthy).await;
    on.store(true, Ordering::SeqCst);
    health_where(&b, "healthy again", |h| h.state == HealthState::Healthy).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let a wrong put land
    let still_draining = !shutdown.is_finished();
    assert!(
        !present(&client, b.key()).await,
        "a health check re-registered during shutdown"
    );
    assert!(
        still_draining,
        "the grace period ended before the test could check"
    );
    within("shutdown", T, shutdown).await.unwrap().unwrap();
    let ttl = within("lease ttl", T, c.lease_time_to_live(lease, None))
        .await
        .unwrap();
    assert!(ttl.ttl() <= 0, "the lease outlived shutdown");
}

#[cfg(feature = "grpc-health")]
#[tokio::test]
async fn a_grpc_health_server_set_to_not_serving_removes_the_instance() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("health-grpc");
    let registry = connect(server.endpoints(), &ns).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("echo", tonic_health::ServingStatus::Serving)
        .await;
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );

    let policy = HealthPolicy::new()
        .interval(Duration::from_millis(300))
        .rise(1)
        .fall(1);
    let check = health::grpc(&format!("127.0.0.1:{port}"), "echo").unwrap();
    let reg = within(
        "register_checked",
        T,
        registry.register_checked(inst("echo", "e-1"), check, policy),
    )
    .await
    .unwrap();
    eventually("registered while SERVING", T, || {
        present(&client, reg.key())
    })
    .await;

    reporter
        .set_service_status("echo", tonic_health::ServingStatus::NotServing)
        .await;
    eventually("removed when NOT_SERVING", T, || async {
        !present(&client, reg.key()).await
    })
    .await;
    let h = reg.health().borrow().clone();
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("NOT_SERVING")),
        "last error: {:?}",
        h.last_error
    );
    reporter
        .set_service_status("echo", tonic_health::ServingStatus::Serving)
        .await;
    eventually("back when SERVING", T, || present(&client, reg.key())).await;
    within("close", T, registry.close()).await.unwrap();
    grpc.abort();
}

#[tokio::test]
async fn bad_policies_are_rejected_before_anything_is_written() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("health-bad");
    let registry = connect(server.endpoints(), &ns).await;
    let (_on, _runs, check) = switch();
    let err = registry
        .register_checked(inst("web", "x"), check, HealthPolicy::new().rise(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            etcd_registry::Error::InvalidInput { field: "rise", .. }
        ),
        "{err:?}"
    );
    let mut c = client.clone();
    let prefix = format!("/etcd_registry/{ns}/");
    let all = within(
        "get",
        T,
        c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())),
    )
    .await
    .unwrap();
    assert!(all.kvs().is_empty());
    within("close", T, registry.close()).await.unwrap();
}
