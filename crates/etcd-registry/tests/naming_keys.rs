//! The gRPC naming keys a registry publishes (`{target}/{host:port}`), under
//! the same invariants as its own keys (issue 29 §3, issue 34 items 1 and
//! 5): restored when lost, deleted when nothing publishes them, shared by
//! two registrations of one address. Against real etcd; each test was seen
//! failing with its fix taken out (see the note of each).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::GetOptions;
use etcd_registry::naming::{self, Publish};
use etcd_registry::{Registry, ServiceInstance};
use etcd_registry_testkit::{EtcdServer, eventually, shared_server, unique_name, within};

use common::{builder, connect_with};

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(60);

fn publish(target: &str) -> Publish {
    Publish::GrpcNaming {
        target: target.to_owned(),
    }
}

fn inst(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new("api", id, "127.0.0.1", port)
}

/// Every key under `prefix`.
async fn keys(etcd: &EtcdServer, prefix: &str) -> BTreeSet<String> {
    let mut client = within("client", T, etcd.client()).await.unwrap();
    let resp = within(
        "get",
        T,
        client.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await
    .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

fn set(keys: &[String]) -> BTreeSet<String> {
    keys.iter().cloned().collect()
}

async fn registry(etcd: &EtcdServer, ns: &str, ttl: u64) -> Registry {
    connect_with(builder(etcd.endpoints(), ns, ttl)).await
}

/// Issue 34 item 1: two ids at one address under one target share one
/// naming key. A restore batch put that key twice, etcd refused the
/// transaction ("duplicate key given in txn request"), and the restore was
/// retried forever: after an outside lease revoke nothing came back.
///
/// Seen failing before the fix: "timed out ... everything is back".
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_naming_key_does_not_stop_the_restore() {
    let etcd = shared_server().await;
    let ns = unique_name("nk1");
    let target = format!("{ns}/apps/shared");
    let registry = registry(etcd, &ns, 3).await;
    let a1 = registry
        .register_with(inst("a1", 7100), publish(&target))
        .await
        .unwrap();
    let a2 = registry
        .register_with(inst("a2", 7100), publish(&target))
        .await
        .unwrap();
    let expected = set(&[a1.key().to_owned(), a2.key().to_owned()]);
    let naming = set(&[format!("{target}/127.0.0.1:7100")]);
    let services = format!("/etcd_registry/{ns}/services/");
    assert_eq!(keys(etcd, &services).await, expected);
    assert_eq!(keys(etcd, &target).await, naming);
    // An outside revoke of the registry's lease.
    let mut client = etcd.client().await.unwrap();
    let leases = client.leases().await.unwrap();
    let lease = {
        let mut c = client.clone();
        let key = a1.key().to_owned();
        c.get(key, None).await.unwrap().kvs()[0].lease()
    };
    assert!(leases.leases().iter().any(|l| l.id() == lease));
    client.lease_revoke(lease).await.unwrap();
    eventually("everything is back", Duration::from_secs(20), || async {
        keys(etcd, &services).await == expected && keys(etcd, &target).await == naming
    })
    .await;
    // register_all of such a pair works too.
    let more = registry
        .register_all(vec![inst("b1", 7200), inst("b2", 7200)])
        .await;
    assert!(more.is_ok(), "{more:?}");
    registry.close().await.unwrap();
}

/// Issue 34 item 5: registering an id again at another address left the
/// old naming key behind (Go clients kept dialling it for the life of the
/// lease). Only the new address remains.
///
/// Seen failing before the fix: both `:8080` and `:9090` were there.
#[tokio::test(flavor = "multi_thread")]
async fn registering_again_at_a_new_address_moves_the_naming_key() {
    let etcd = shared_server().await;
    let ns = unique_name("nk2");
    let target = format!("{ns}/apps/move");
    let registry = registry(etcd, &ns, 10).await;
    let _a = registry
        .register_with(inst("a", 8080), publish(&target))
        .await
        .unwrap();
    let mut a = registry
        .register_with(inst("a", 9090), publish(&target))
        .await
        .unwrap();
    let only = |port: u16| set(&[format!("{target}/127.0.0.1:{port}")]);
    eventually("only :9090 remains", Duration::from_secs(10), || async {
        keys(etcd, &target).await == only(9090)
    })
    .await;
    // An update whose future is dropped mid-write leaves no stale key: the
    // table holds the new value, anti-entropy writes it (the write was cut)
    // and deletes the naming key that no registration publishes any more.
    // Settled first (anti-entropy has read the new target).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let landed = std::sync::Arc::new(tokio::sync::Notify::new());
    let l = landed.clone();
    registry.set_write_hook_for_tests(Some(std::sync::Arc::new(move |_key: &str| {
        let l = l.clone();
        Box::pin(async move {
            l.notify_one();
            futures::future::pending::<()>().await;
        })
    })));
    tokio::select! {
        r = a.update(inst("a", 9191)) => panic!("the update is held: {r:?}"),
        _ = within("the update's write landed", T, landed.notified()) => {}
    }
    registry.set_write_hook_for_tests(None);
    eventually("only :9191 remains", Duration::from_secs(30), || async {
        keys(etcd, &target).await == only(9191)
    })
    .await;
    a.update(inst("a", 9292)).await.unwrap();
    eventually("only :9292 remains", Duration::from_secs(10), || async {
        keys(etcd, &target).await == only(9292)
    })
    .await;
    registry.close().await.unwrap();
}

/// Issue 29 §3: a naming key deleted on its own (the instance key stays)
/// comes back within one anti-entropy round: anti-entropy watches the
/// target prefixes it publishes under.
///
/// Seen failing before the fix: the naming key stayed deleted.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_deleted_naming_key_comes_back() {
    let etcd = shared_server().await;
    let ns = unique_name("nk3");
    let target = format!("{ns}/apps/lone");
    let registry = registry(etcd, &ns, 10).await;
    let a = registry
        .register_with(inst("a", 7300), publish(&target))
        .await
        .unwrap();
    let naming = format!("{target}/127.0.0.1:7300");
    assert_eq!(
        keys(etcd, &target).await,
        set(std::slice::from_ref(&naming))
    );
    let mut client = etcd.client().await.unwrap();
    client.delete(naming.as_str(), None).await.unwrap();
    eventually(
        "the naming key is back",
        Duration::from_secs(20),
        || async { keys(etcd, &target).await.contains(&naming) },
    )
    .await;
    // And a naming key of ours that no registration publishes goes (as
    // after a snapshot restore brought back an old one).
    let lease = client.get(a.key(), None).await.unwrap().kvs()[0].lease();
    let stray = format!("{target}/127.0.0.1:7399");
    client
        .put(
            stray.as_str(),
            b"{\"Op\":0,\"Addr\":\"127.0.0.1:7399\",\"Metadata\":null}".to_vec(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    eventually(
        "the stray naming key is deleted",
        Duration::from_secs(20),
        || async { !keys(etcd, &target).await.contains(&stray) },
    )
    .await;
    registry.close().await.unwrap();
}

/// Issue 29 §3: two registrations at one address under one target:
/// deregistering one leaves the naming key while the other lives; the
/// second deregister removes it.
///
/// Seen failing before the fix: the first deregister deleted the shared key.
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_naming_key_stays_while_one_registration_lives() {
    let etcd = shared_server().await;
    let ns = unique_name("nk4");
    let target = format!("{ns}/apps/two");
    let registry = registry(etcd, &ns, 10).await;
    let a = registry
        .register_with(inst("a", 7400), publish(&target))
        .await
        .unwrap();
    let b = registry
        .register_with(inst("b", 7400), publish(&target))
        .await
        .unwrap();
    let naming = set(&[format!("{target}/127.0.0.1:7400")]);
    a.deregister().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(keys(etcd, &target).await, naming, "b still lives");
    b.deregister().await.unwrap();
    assert!(keys(etcd, &target).await.is_empty(), "both are gone");
    registry.close().await.unwrap();
}

/// Issue 29 §3: an admin `delete_instance` or `delete_service` removes the
/// naming keys of the instances it deletes, whichever registry published
/// them, and leaves a key another instance of that registry still shares.
///
/// Seen failing before the fix: the naming keys stayed.
#[tokio::test(flavor = "multi_thread")]
async fn admin_deletes_remove_the_naming_keys_too() {
    let etcd = shared_server().await;
    let ns = unique_name("nk5");
    let target = format!("{ns}/apps/admin");
    // The publisher: a process of ours that crashed, its lease still live,
    // written as our registry writes (instance keys and naming keys under
    // one lease).
    let mut client = etcd.client().await.unwrap();
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let with_lease = || Some(etcd_client::PutOptions::new().with_lease(lease));
    for (id, port) in [("a", 7500), ("b", 7501), ("c", 7502), ("d", 7502)] {
        let i = inst(id, port);
        let key = format!("/etcd_registry/{ns}/services/api/{id}");
        client.put(key, i.to_json(), with_lease()).await.unwrap();
        let naming = naming::naming_key(&target, &format!("127.0.0.1:{port}"));
        let value = naming::encode(&i).unwrap();
        client.put(naming, value, with_lease()).await.unwrap();
    }
    // A Go server's naming key under another lease, same address as a: not ours to touch.
    let go_target = format!("{ns}/apps/go");
    let go_lease = client.lease_grant(60, None).await.unwrap().id();
    let go_key = naming::naming_key(&go_target, "127.0.0.1:7500");
    client
        .put(
            go_key.as_str(),
            naming::encode(&inst("x", 7500)).unwrap(),
            Some(etcd_client::PutOptions::new().with_lease(go_lease)),
        )
        .await
        .unwrap();
    let admin = registry(etcd, &ns, 10).await;
    assert!(admin.delete_instance("api", "a").await.unwrap());
    let naming = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| format!("{target}/127.0.0.1:{p}"))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(keys(etcd, &target).await, naming(&[7501, 7502]));
    // c and d share :7502: deleting c leaves it for d.
    assert!(admin.delete_instance("api", "c").await.unwrap());
    assert_eq!(keys(etcd, &target).await, naming(&[7501, 7502]));
    assert_eq!(admin.delete_service("api").await.unwrap(), 2);
    assert!(keys(etcd, &target).await.is_empty());
    assert_eq!(
        keys(etcd, &go_target).await,
        set(&[go_key]),
        "another lease's key stays"
    );
    client.lease_revoke(lease).await.unwrap();
    client.lease_revoke(go_lease).await.unwrap();
    admin.close().await.unwrap();
}
