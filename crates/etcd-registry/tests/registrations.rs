//! The registration path under stress (issue 23): each test pins one defect
//! of the registration path, against real etcd, and was seen failing with
//! the defect put back (see the note of each test).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, PutOptions};
use etcd_registry::{Error, RegistrationState, Registry, ServiceInstance};
use etcd_registry_testkit::{Direction, EtcdServer, FaultProxy, eventually, unique_name, within};

use common::{builder, connect_with};

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(60);

fn inst(name: &str, id: &str) -> ServiceInstance {
    ServiceInstance::new(name, id, "10.0.0.1", 8080)
}

/// Every key under `prefix` with its value and lease.
async fn keys(etcd: &EtcdServer, prefix: &str) -> BTreeMap<String, (Vec<u8>, i64)> {
    let mut client = within("client", T, etcd.client()).await.unwrap();
    let resp = within(
        "get",
        T,
        client.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.value().to_vec(), kv.lease()),
            )
        })
        .collect()
}

/// How many keys are under `prefix` (values not read: they may be large).
async fn count(etcd: &EtcdServer, prefix: &str) -> i64 {
    let mut client = within("client", T, etcd.client()).await.unwrap();
    let options = GetOptions::new().with_prefix().with_count_only();
    within("count", T, client.get(prefix, Some(options)))
        .await
        .unwrap()
        .count()
}

async fn granted_leases(etcd: &EtcdServer) -> u64 {
    let text = within("metrics", T, etcd.metrics()).await.unwrap();
    text.lines()
        .find(|l| l.starts_with("etcd_debugging_lease_granted_total "))
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

async fn register_many(
    registry: &Registry,
    service: &str,
    n: usize,
) -> Vec<etcd_registry::Registration> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let batch = chunk
            .iter()
            .map(|i| registry.register(inst(service, &format!("i{i}"))));
        for r in within("register", T, futures::future::join_all(batch)).await {
            out.push(r.unwrap());
        }
    }
    out
}

/// Defect 1: restore ran to completion before keep-alive started on the new
/// lease, so a restore slower than the TTL lost the new lease too, and
/// granted again, in a loop. Now keep-alive runs beside the restore: 5,000
/// registrations through a 200 ms link with a 3 s TTL come back on exactly
/// one new lease, after a wipe that makes a new cluster and after one that
/// keeps the cluster id. The registry is told to send at most 32 operations
/// a transaction, so that the restore (about 8 s) outlasts the TTL: the
/// lease survives only if keep-alive runs beside it.
///
/// Seen failing with the restore awaited before the keep-alive (the old
/// session loop): more than one grant per wipe, and the test timed out.
#[tokio::test(flavor = "multi_thread")]
async fn restore_of_5000_runs_beside_keep_alive_on_one_new_lease() {
    let mut etcd = EtcdServer::start().await.unwrap();
    let proxy = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let ns = unique_name("restore");
    let registry = connect_with(
        builder(vec![proxy.endpoint()], &ns, 3)
            .etcd_limits(etcd_registry::DEFAULT_MAX_REQUEST_BYTES, 32),
    )
    .await;
    let _regs = register_many(&registry, "bulk", 5000).await;
    let prefix = format!("/etcd_registry/{ns}/services/bulk/");
    proxy.set_latency(Direction::ToServer, Duration::from_millis(200));
    for same_cluster in [false, true] {
        let before = registry.lease_id();
        if same_cluster {
            etcd.restart_wiped_same_cluster().await.unwrap();
        } else {
            etcd.restart_wiped().await.unwrap();
        }
        let started = Instant::now();
        eventually("every registration back on one lease", T, || async {
            let k = keys(&etcd, &prefix).await;
            k.len() == 5000 && k.values().all(|(_, l)| Some(*l) == registry.lease_id())
        })
        .await;
        let took = started.elapsed();
        let lease = registry.lease_id();
        assert_ne!(lease, before, "a new lease after the wipe");
        // The wiped etcd counts grants from zero: exactly one, ours.
        assert_eq!(
            granted_leases(&etcd).await,
            1,
            "one grant, no re-grant loop"
        );
        // And that lease is still alive well after the restore.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(registry.lease_id(), lease);
        assert_eq!(keys(&etcd, &prefix).await.len(), 5000);
        eprintln!("same cluster: {same_cluster}: 5000 back in {took:?}");
    }
    registry.close().await.unwrap();
}

/// Defect 2: restores went out as 100 puts a transaction whatever their
/// size, so one refusal by etcd failed every restore, forever. Against an
/// etcd with --max-request-bytes 262144 --max-txn-ops 16, 40 instances of
/// ~200 KiB and 2,000 small ones all come back after a wipe, the registry
/// learning the limits from etcd's refusals (it was not told them); and a
/// registry told the limits refuses, at `register`, an instance that can
/// never fit, naming its size and the limit.
///
/// Seen failing with batches of a fixed 100 entries and no split: the
/// restore never completed ("too many operations in txn request").
#[tokio::test(flavor = "multi_thread")]
async fn restores_respect_etcd_request_limits_and_oversized_entries_are_refused() {
    let mut etcd = EtcdServer::builder()
        .args(["--max-request-bytes", "262144", "--max-txn-ops", "16"])
        .start()
        .await
        .unwrap();
    let ns = unique_name("limits");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let blob = "x".repeat(200 << 10);
    let mut regs = register_many(&registry, "small", 2000).await;
    for i in 0..40 {
        let big = inst("big", &format!("b{i}")).with_metadata("blob", blob.clone());
        regs.push(
            within("register big", T, registry.register(big))
                .await
                .unwrap(),
        );
    }
    etcd.restart_wiped().await.unwrap();
    let root = format!("/etcd_registry/{ns}/services/");
    eventually(
        "2,040 registrations back",
        Duration::from_secs(120),
        || async { count(&etcd, &root).await == 2040 },
    )
    .await;
    for i in [0, 39] {
        let k = keys(&etcd, &format!("{root}big/b{i}")).await;
        assert!(
            k.values().all(|(v, _)| v.len() > 200 << 10),
            "the big values are whole"
        );
    }

    let told = connect_with(builder(etcd.endpoints(), &ns, 10).etcd_limits(262144, 16)).await;
    let huge = inst("big", "huge").with_metadata("blob", "x".repeat(300 << 10));
    match told.register(huge).await {
        Err(Error::InvalidInput { field, reason }) => {
            assert_eq!(field, "instance");
            assert!(reason.contains("262144"), "names the limit: {reason}");
            assert!(reason.contains("bytes"), "names the size: {reason}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(
        count(&etcd, &format!("{root}big/huge")).await,
        0,
        "nothing written"
    );
    told.close().await.unwrap();
    registry.close().await.unwrap();
}

/// Defect 3: a deregister whose delete failed put the entry back in the
/// table, and it was restored for the life of the process. Now deregister is
/// final: through a blackholed link the delete fails, etcd is wiped, the
/// link heals, the registry restores what it maintains, and the key stays
/// absent (a sentinel proves the restore ran).
///
/// Seen failing with the old re-insert on a failed delete: the key came back.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_deregister_is_still_final() {
    let mut etcd = EtcdServer::start().await.unwrap();
    let proxy = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let ns = unique_name("final");
    let registry = connect_with(
        builder(vec![proxy.endpoint()], &ns, 5).request_timeout(Duration::from_secs(1)),
    )
    .await;
    let gone = registry.register(inst("web", "gone")).await.unwrap();
    let _sentinel = registry.register(inst("web", "sentinel")).await.unwrap();
    proxy.blackhole();
    let result = within("deregister", T, gone.deregister()).await;
    assert!(
        result.is_err(),
        "the delete could not reach etcd: {result:?}"
    );
    etcd.restart_wiped().await.unwrap();
    proxy.heal();
    let key = |id: &str| format!("/etcd_registry/{ns}/services/web/{id}");
    eventually("the sentinel restored", T, || async {
        !keys(&etcd, &key("sentinel")).await.is_empty()
    })
    .await;
    // Past the background retries and a full anti-entropy read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        keys(&etcd, &key("gone")).await.is_empty(),
        "deregistered key came back"
    );
    registry.close().await.unwrap();
}

/// Defect 4: deregister deleted the key unconditionally, so a deregister
/// that ran before the registry's own watch had seen another owner's
/// take-over deleted that owner's key. The watch is held back with 2 s of
/// ToClient latency; the take-over and our deregister both happen inside
/// that window, and the other owner's key stays intact.
///
/// Seen failing with the unconditional delete: the other owner's key was gone.
#[tokio::test(flavor = "multi_thread")]
async fn deregister_never_deletes_another_owners_key() {
    let etcd = etcd_registry_testkit::shared_server().await;
    let proxy = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let ns = unique_name("owner");
    let registry = connect_with(builder(vec![proxy.endpoint()], &ns, 10)).await;
    let reg = registry.register(inst("web", "w1")).await.unwrap();
    let key = reg.key().to_owned();
    // Everything etcd tells us from now on arrives 2 s late, our watch included.
    proxy.set_latency(Direction::ToClient, Duration::from_secs(2));
    let mut other = etcd.client().await.unwrap();
    let lease = other.lease_grant(30, None).await.unwrap().id();
    other
        .put(
            key.as_str(),
            b"theirs".to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    within("deregister", T, reg.deregister()).await.unwrap();
    proxy.set_latency(Direction::ToClient, Duration::ZERO);
    let k = keys(etcd, &key).await;
    assert_eq!(
        k.get(&key),
        Some(&(b"theirs".to_vec(), lease)),
        "their key is intact"
    );
    registry.close().await.unwrap();
}

/// Defect 5: the registry's anti-entropy compared revisions across
/// histories. etcd restored from an older snapshot holds older values at
/// older revisions; now the registry's keys converge on its table: the
/// updated value, the added key present, the deregistered key absent, and
/// a cache and a watch converge on the same view.
///
/// Seen failing with the revision comparison on full reads and without
/// the deletion of stray keys: the old value and the deregistered key stayed.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_snapshot_restore_the_keys_equal_the_table() {
    use futures::StreamExt;
    let mut etcd = EtcdServer::start().await.unwrap();
    let ns = unique_name("snap");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let observer = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let mut a = registry.register(inst("web", "a")).await.unwrap();
    let _b = registry.register(inst("web", "b")).await.unwrap();
    let c = registry.register(inst("web", "c")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap.db");
    etcd.save_snapshot(&snap).await.unwrap();

    a.update(inst("web", "a").with_version("2")).await.unwrap();
    let _d = registry.register(inst("web", "d")).await.unwrap();
    c.deregister().await.unwrap();
    let cache = observer.cache("web").await.unwrap();
    let mut watch = observer.watch("web").unwrap();

    etcd.restore_snapshot(&snap).await.unwrap();
    let started = Instant::now();
    let prefix = format!("/etcd_registry/{ns}/services/web/");
    let expected = |k: &BTreeMap<String, (Vec<u8>, i64)>| {
        let ids: Vec<&str> = k
            .keys()
            .map(|k| k.rsplit('/').next().unwrap_or(""))
            .collect();
        let a_new = k
            .get(&format!("{prefix}a"))
            .and_then(|(v, _)| ServiceInstance::from_json(v).ok())
            .is_some_and(|i| i.version == "2");
        ids == ["a", "b", "d"] && a_new
    };
    eventually("etcd holds the table", T, || async {
        expected(&keys(&etcd, &prefix).await)
    })
    .await;
    eprintln!(
        "converged {:?} after the restore finished",
        started.elapsed()
    );
    eventually("the cache converges", T, || async {
        let mut ids: Vec<String> = cache.instances().iter().map(|i| i.id.clone()).collect();
        ids.sort();
        ids == ["a", "b", "d"] && cache.get("a").is_some_and(|i| i.version == "2")
    })
    .await;
    // The watch's view, rebuilt from its events.
    let mut view: HashMap<String, ServiceInstance> = HashMap::new();
    let ok = within("watch converges", T, async {
        while let Some(e) = watch.next().await {
            match e {
                etcd_registry::ServiceEvent::Snapshot(all) => {
                    view = all.into_iter().map(|i| (i.id.clone(), i)).collect()
                }
                etcd_registry::ServiceEvent::Added(i) | etcd_registry::ServiceEvent::Updated(i) => {
                    view.insert(i.id.clone(), i);
                }
                etcd_registry::ServiceEvent::Removed(i) => {
                    view.remove(&i.id);
                }
            }
            let mut ids: Vec<&str> = view.keys().map(String::as_str).collect();
            ids.sort();
            if ids == ["a", "b", "d"] && view["a"].version == "2" {
                return true;
            }
        }
        false
    })
    .await;
    assert!(ok);
    observer.close().await.unwrap();
    registry.close().await.unwrap();
}

/// Defect 6: the table's mutex was held across etcd round trips, so
/// registrations went out one at a time. 200 concurrent registers through
/// a 200 ms link take about one round trip, not 200 (40 s); the bound is 5 s.
///
/// Seen failing with the table lock held across the put: 40+ s.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_registers_do_not_wait_for_each_other() {
    let etcd = etcd_registry_testkit::shared_server().await;
    let proxy = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let ns = unique_name("concurrent");
    let registry = connect_with(builder(vec![proxy.endpoint()], &ns, 10)).await;
    proxy.set_latency(Direction::ToServer, Duration::from_millis(200));
    let started = Instant::now();
    let all = (0..200).map(|i| registry.register(inst("web", &format!("i{i}"))));
    let regs = within("200 registers", T, futures::future::join_all(all)).await;
    let took = started.elapsed();
    assert!(regs.iter().all(Result::is_ok));
    eprintln!("200 concurrent registers through 200 ms: {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    proxy.set_latency(Direction::ToServer, Duration::ZERO);
    registry.close().await.unwrap();
}

/// Defect 7: registering an id that the registry already maintained gave
/// two handles to one key. Now the newer handle owns it and the older is
/// retired: its update fails with `Replaced`, and dropping either keeps the
/// key (as documented). Issue 29: the retired handle's `deregister` still
/// removes the instance (as Go's `Deregister(id)` does), and the newer
/// handle then says `Deregistered`.
///
/// Seen failing without the owner check: the retired handle's update
/// changed the key. Seen failing with the owner check back in `take`: the
/// key stayed after the retired handle's deregister returned Ok.
#[tokio::test(flavor = "multi_thread")]
async fn one_key_has_one_owner_and_the_older_handle_is_retired() {
    let etcd = etcd_registry_testkit::shared_server().await;
    let ns = unique_name("owner1");
    let registry = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let mut old = registry.register(inst("web", "w1")).await.unwrap();
    let mut new = registry
        .register(inst("web", "w1").with_version("2"))
        .await
        .unwrap();
    assert_eq!(old.state(), RegistrationState::Replaced);
    assert_eq!(new.state(), RegistrationState::Active);
    assert!(matches!(
        old.update(inst("web", "w1").with_version("3")).await,
        Err(Error::Replaced { .. })
    ));
    let key = new.key().to_owned();
    let value = || async { keys(etcd, &key).await.get(&key).cloned() };
    let held = value().await.expect("the key is written");
    assert_eq!(ServiceInstance::from_json(&held.0).unwrap().version, "2");
    // Dropping a retired handle keeps the key, and it is still maintained.
    let again = registry.register(inst("web", "w1")).await.unwrap();
    drop(std::mem::replace(&mut new, again));
    etcd.client()
        .await
        .unwrap()
        .delete(key.as_str(), None)
        .await
        .unwrap();
    eventually("restored after an outside delete", T, || async {
        value().await.is_some()
    })
    .await;
    // The retired handle's deregister removes the instance.
    old.deregister().await.unwrap();
    assert!(value().await.is_none(), "Ok means the instance is gone");
    assert_eq!(new.state(), RegistrationState::Deregistered);
    assert!(matches!(
        new.update(inst("web", "w1").with_version("4")).await,
        Err(Error::Deregistered { .. })
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(value().await.is_none(), "nothing puts it back");
    new.deregister().await.unwrap();
    registry.close().await.unwrap();
}
