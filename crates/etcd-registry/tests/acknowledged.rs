//! Issue 29: nothing acknowledged is ever lost. Every registration whose
//! last `register`/`update` returned `Ok` is in etcd with that value within
//! one anti-entropy round, whatever happened to earlier attempts; and a
//! `deregister` that returned `Ok` removed the instance, whichever handle of
//! the id it was called on. Each test was seen failing with its fix taken
//! out (see the note of each).

mod common;

use std::sync::Arc;
use std::time::Duration;

use etcd_registry::{Error, RegistrationState, ServiceInstance};
use etcd_registry_testkit::{Direction, EtcdServer, FaultProxy, eventually, unique_name, within};
use tokio::sync::{Notify, Semaphore};

use common::{builder, connect_with};

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(60);

/// The value etcd holds for `key`, if any.
async fn value(etcd: &EtcdServer, key: &str) -> Option<Vec<u8>> {
    let mut client = within("client", T, etcd.client()).await.unwrap();
    let resp = within("get", T, client.get(key, None)).await.unwrap();
    resp.kvs().first().map(|kv| kv.value().to_vec())
}

async fn delete(etcd: &EtcdServer, key: &str) {
    let mut client = within("client", T, etcd.client()).await.unwrap();
    within("delete", T, client.delete(key, None)).await.unwrap();
}

/// The root cause of the seed-1212 violation: anti-entropy left a key to a
/// write of ours in flight and dropped the event. When the delete came after
/// that write landed but before its answer was recorded (a late delete of an
/// earlier failed attempt, under a leader kill), the write was acknowledged,
/// the delete's event was gone, and nothing put the key back until the next
/// full read.
///
/// Here the write's answer is held (test hook) while the key is deleted
/// behind it; once the answer is recorded, the key must come back.
///
/// Seen failing before the fix (the event dropped, `writing > 0 ||
/// written.is_none()`): "timed out ... the acknowledged key is back".
#[tokio::test(flavor = "multi_thread")]
async fn a_delete_seen_while_the_write_was_in_flight_is_not_lost() {
    let etcd = etcd_registry_testkit::shared_server().await;
    let ns = unique_name("ack1");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    // Anti-entropy watches the service from its first registration on.
    let _other = registry
        .register(ServiceInstance::new("api", "other", "10.0.0.2", 80))
        .await
        .unwrap();
    let landed = Arc::new(Notify::new());
    let release = Arc::new(Semaphore::new(0));
    let (l, r) = (landed.clone(), release.clone());
    registry.set_write_hook_for_tests(Some(Arc::new(move |key: &str| {
        let (l, r) = (l.clone(), r.clone());
        let held = key.ends_with("/api/a");
        Box::pin(async move {
            if held {
                l.notify_one();
                let _ = r.acquire().await.map(|p| p.forget());
            }
        })
    })));
    let reg = registry.clone();
    let register = tokio::spawn(async move {
        reg.register(ServiceInstance::new("api", "a", "10.0.0.1", 8080))
            .await
    });
    within("the put landed", T, landed.notified()).await;
    let key = format!("/etcd_registry/{ns}/services/api/a");
    assert!(value(etcd, &key).await.is_some(), "the held put landed");
    delete(etcd, &key).await;
    // Give the watch time to deliver the delete while the write is held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    release.add_permits(1);
    let r = within("register", T, register).await.unwrap().unwrap();
    registry.set_write_hook_for_tests(None);
    eventually(
        "the acknowledged key is back",
        Duration::from_secs(20),
        || async { value(etcd, &key).await.is_some() },
    )
    .await;
    r.deregister().await.unwrap();
    registry.close().await.unwrap();
}

/// A register whose put landed but whose answer was lost fails; the caller
/// retries, as the soak's workload does. The failed attempt's clean-up
/// (deleting a write that may have landed) must not leave the retried,
/// acknowledged registration missing.
///
/// The put's answer is lost by holding responses in the fault proxy past the
/// request timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_a_lost_answer_stays_registered() {
    let etcd = etcd_registry_testkit::shared_server().await;
    let proxy = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let ns = unique_name("ack2");
    let registry = connect_with(
        builder(vec![proxy.endpoint()], &ns, 10).request_timeout(Duration::from_secs(1)),
    )
    .await;
    let _other = registry
        .register(ServiceInstance::new("api", "other", "10.0.0.2", 80))
        .await
        .unwrap();
    let instance = ServiceInstance::new("api", "a", "10.0.0.1", 8080);
    proxy.set_latency(Direction::ToClient, Duration::from_millis(2500));
    let first = registry.register(instance.clone()).await;
    assert!(
        first.is_err(),
        "the answer was held past the request timeout"
    );
    proxy.set_latency(Direction::ToClient, Duration::ZERO);
    let r = loop {
        match within("register again", T, registry.register(instance.clone())).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::info!(error = %e, "retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let key = r.key().to_owned();
    eventually(
        "the acknowledged key is in etcd",
        Duration::from_secs(20),
        || async { value(etcd, &key).await.is_some() },
    )
    .await;
    // And it stays: whatever the failed attempt's clean-up did, it is done.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        eventually("the key stays", Duration::from_secs(20), || async {
            value(etcd, &key).await.is_some()
        })
        .await;
    }
    r.deregister().await.unwrap();
    registry.close().await.unwrap();
}

/// A register future dropped while its put is in flight leaves nothing
/// behind: the caller has no handle, so no key may stay maintained (and
/// nothing is exempt from anti-entropy: the entry is gone).
///
/// Seen failing before the fix: the key stayed (written by the dropped
/// future, and maintained with no handle).
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_register_leaves_nothing_behind() {
    let etcd = etcd_registry_testkit::shared_server().await;
    let ns = unique_name("ack3");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let landed = Arc::new(Notify::new());
    let l = landed.clone();
    registry.set_write_hook_for_tests(Some(Arc::new(move |_key: &str| {
        let l = l.clone();
        Box::pin(async move {
            l.notify_one();
            futures::future::pending::<()>().await;
        })
    })));
    let reg = registry.clone();
    let register = tokio::spawn(async move {
        reg.register(ServiceInstance::new("api", "a", "10.0.0.1", 8080))
            .await
    });
    within("the put landed", T, landed.notified()).await;
    register.abort();
    let _ = register.await;
    registry.set_write_hook_for_tests(None);
    let key = format!("/etcd_registry/{ns}/services/api/a");
    eventually(
        "the dropped register's key is gone",
        Duration::from_secs(20),
        || async { value(etcd, &key).await.is_none() },
    )
    .await;
    // And it stays gone: nothing maintains it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(value(etcd, &key).await, None);
    // The id registers normally afterwards.
    let r = registry
        .register(ServiceInstance::new("api", "a", "10.0.0.1", 8080))
        .await
        .unwrap();
    assert_eq!(r.state(), RegistrationState::Active);
    assert!(value(etcd, &key).await.is_some());
    r.deregister().await.unwrap();
    registry.close().await.unwrap();
}

/// Issue 29 §2: the snippet from the issue. Registering an id again
/// replaces the entry; `deregister` on the retired handle still removes the
/// instance (as Go's `Deregister(id)` does), so after a wiped etcd and the
/// restore, `api/a` is absent. The newer handle says `Deregistered`, and its
/// `update` fails with a typed error.
///
/// Seen failing before the fix: "api/a is back after the restore".
#[tokio::test(flavor = "multi_thread")]
async fn deregister_on_a_retired_handle_removes_the_instance() {
    let mut server = within("etcd", T, EtcdServer::start()).await.unwrap();
    let ns = unique_name("ack4");
    let registry = connect_with(builder(server.endpoints(), &ns, 3)).await;
    let a = registry
        .register(ServiceInstance::new("api", "a", "10.0.0.1", 8080))
        .await
        .unwrap();
    let mut a2 = registry
        .register(ServiceInstance::new("api", "a", "10.0.0.1", 8081))
        .await
        .unwrap();
    let b = registry
        .register(ServiceInstance::new("api", "b", "10.0.0.1", 8082))
        .await
        .unwrap();
    let key = a.key().to_owned();
    a.deregister().await.unwrap();
    assert_eq!(value(&server, &key).await, None, "Ok means gone");
    assert_eq!(a2.state(), RegistrationState::Deregistered);
    assert!(matches!(
        a2.update(ServiceInstance::new("api", "a", "10.0.0.1", 8083))
            .await,
        Err(Error::Deregistered { .. })
    ));
    within("wipe etcd", T, server.restart_wiped())
        .await
        .unwrap();
    // The restore brings back what is maintained (b), and only that.
    let b_key = b.key().to_owned();
    eventually("b is restored", T, || async {
        value(&server, &b_key).await.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        value(&server, &key).await,
        None,
        "api/a is back after the restore"
    );
    drop(a2);
    registry.close().await.unwrap();
}
