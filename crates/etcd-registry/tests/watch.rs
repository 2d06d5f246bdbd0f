//! ServiceWatch and ServiceCache against real etcd: events, no gap,
//! compaction, restarts (kept, wiped, cluster member and leader loss) and
//! malformed values.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use etcd_client::GetOptions;
use etcd_registry::{
    DEFAULT_KEY_PREFIX, Registration, Registry, ServiceCache, ServiceEvent, ServiceInstance,
    ServiceWatch,
};
use etcd_registry_testkit::{EtcdCluster, EtcdServer, FaultProxy, shared_server, unique_name};
use futures::StreamExt;
use tokio::time::Instant;

type Model = BTreeMap<(String, String), ServiceInstance>;

/// Every await that could hang goes through this.
async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    etcd_registry_testkit::within(what, Duration::from_secs(secs), f).await
}

/// Polls `check` until it is true, or fails after `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    etcd_registry_testkit::eventually(what, Duration::from_secs(secs), check).await;
}

/// Captured `tracing` output of this test binary.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer_buf = buf.clone();
        let echo = std::env::var_os("TEST_LOG").is_some();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("etcd_registry=debug,etcd_registry_testkit=info,warn")
            .with_ansi(false)
            .with_writer(move || Capture(writer_buf.clone(), echo))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>, bool);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.1 {
            let _ = std::io::stderr().write_all(b);
        }
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(needle: &str) -> bool {
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .any(|l| l.contains(needle) && l.contains("WARN"))
}

async fn connect(endpoints: Vec<String>, ns: &str) -> Registry {
    logs();
    within(
        30,
        "connect",
        Registry::builder()
            .endpoints(endpoints)
            .namespace(ns)
            .ttl(Duration::from_secs(10))
            .connect(),
    )
    .await
    .expect("connect")
}

/// Registers through an outage: the writer is not under test, so it retries.
async fn register_retrying(reg: &Registry, instance: ServiceInstance) -> Registration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), reg.register(instance.clone())).await {
            Ok(Ok(r)) => return r,
            Ok(Err(e)) if Instant::now() < deadline => {
                eprintln!("register {} failed, retrying: {e}", instance.id)
            }
            Err(_) if Instant::now() < deadline => {
                eprintln!("register {} timed out, retrying", instance.id)
            }
            other => panic!(
                "could not register {} within 60 s: {:?}",
                instance.id,
                other.map(|r| r.map(|_| ()))
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes through an outage (admin delete), retrying like [`register_retrying`].
async fn delete_retrying(reg: &Registry, name: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), reg.delete_instance(name, id)).await {
            Ok(Ok(_)) => return,
            _ if Instant::now() < deadline => eprintln!("delete {id} failed, retrying"),
            _ => panic!("could not delete {id} within 60 s"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn inst(name: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(name, id, "127.0.0.1", port)
}

fn apply(model: &mut Model, event: ServiceEvent) {
    match event {
        ServiceEvent::Snapshot(all) => {
            *model = all
                .into_iter()
                .map(|i| ((i.name.clone(), i.id.clone()), i))
                .collect();
        }
        ServiceEvent::Added(i) | ServiceEvent::Updated(i) => {
            model.insert((i.name.clone(), i.id.clone()), i);
        }
        ServiceEvent::Removed(i) => {
            model.remove(&(i.name, i.id));
        }
    }
}

async fn next(watch: &mut ServiceWatch, secs: u64) -> ServiceEvent {
    within(secs, "next watch event", watch.next())
        .await
        .expect("the watch ended")
}

/// A raw read of etcd under `{prefix}/{ns}/services/{name}/` (every service
/// when `name` is `None`), valid values only, with the revision.
async fn raw(endpoints: &[String], ns: &str, name: Option<&str>) -> (i64, Model) {
    let prefix = match name {
        Some(n) => format!("{DEFAULT_KEY_PREFIX}/{ns}/services/{n}/"),
        None => format!("{DEFAULT_KEY_PREFIX}/{ns}/services/"),
    };
    let read = async {
        let mut client = etcd_client::Client::connect(endpoints, None).await?;
        client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
    };
    let resp = within(15, "raw read", read).await.expect("raw read");
    let mut model = Model::new();
    for kv in resp.kvs() {
        if let Ok(i) = ServiceInstance::from_json(kv.value()) {
            model.insert((i.name.clone(), i.id.clone()), i);
        }
    }
    (resp.header().map_or(0, |h| h.revision()), model)
}

fn cache_model(cache: &ServiceCache) -> Model {
    cache
        .instances()
        .iter()
        .map(|i| ((i.name.clone(), i.id.clone()), i.clone()))
        .collect()
}

/// Drains events into `model` until it equals a raw read of etcd.
async fn converge(
    watch: &mut ServiceWatch,
    model: &mut Model,
    endpoints: &[String],
    ns: &str,
    name: &str,
    secs: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, want) = raw(endpoints, ns, Some(name)).await;
        if *model == want {
            return;
        }
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(event)) => apply(model, event),
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!(
                "watch did not converge within {secs} s: have {:?}, etcd has {:?}",
                model.keys(),
                want.keys()
            ),
        }
    }
}

async fn cache_converges(
    cache: &ServiceCache,
    endpoints: &[String],
    ns: &str,
    name: &str,
    secs: u64,
) {
    eventually(secs, "the cache equals etcd", || async {
        let (_, want) = raw(endpoints, ns, Some(name)).await;
        cache_model(cache) == want
    })
    .await;
}

#[tokio::test]
async fn events_follow_one_service_and_the_namespace_and_nothing_else() {
    let etcd = shared_server().await;
    let (ns, other_ns) = (unique_name("w1"), unique_name("w1-other"));
    let reg = connect(etcd.endpoints(), &ns).await;
    let stranger = connect(etcd.endpoints(), &other_ns).await;
    let mut w1 = within(10, "register", reg.register(inst("web", "w1", 1001)))
        .await
        .unwrap();
    let _o1 = within(10, "register", reg.register(inst("other", "o1", 2001)))
        .await
        .unwrap();

    let mut web = reg.watch("web").unwrap();
    let mut all = reg.watch_all().unwrap();
    assert_eq!(
        next(&mut web, 15).await,
        ServiceEvent::Snapshot(vec![inst("web", "w1", 1001)])
    );
    assert_eq!(
        next(&mut all, 15).await,
        ServiceEvent::Snapshot(vec![inst("other", "o1", 2001), inst("web", "w1", 1001)])
    );
    assert!(web.revision() > 0);

    let w2 = within(10, "register", reg.register(inst("web", "w2", 1002)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut web, 15).await,
        ServiceEvent::Added(inst("web", "w2", 1002))
    );
    assert_eq!(
        next(&mut all, 15).await,
        ServiceEvent::Added(inst("web", "w2", 1002))
    );

    let updated = inst("web", "w1", 1001).with_weight(5).with_version("2");
    within(10, "update", w1.update(updated.clone()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut web, 15).await,
        ServiceEvent::Updated(updated.clone())
    );
    assert_eq!(
        next(&mut all, 15).await,
        ServiceEvent::Updated(updated.clone())
    );

    within(10, "deregister", w2.deregister()).await.unwrap();
    assert_eq!(
        next(&mut web, 15).await,
        ServiceEvent::Removed(inst("web", "w2", 1002))
    );
    assert_eq!(
        next(&mut all, 15).await,
        ServiceEvent::Removed(inst("web", "w2", 1002))
    );

    // Noise: the same service in another namespace, a service whose name
    // starts with "web", and a re-registration of w1 under another lease with
    // the identical value. None of it may reach `web`; only webhook reaches `all`.
    let _x = within(10, "register", stranger.register(inst("web", "x", 3001)))
        .await
        .unwrap();
    let _h = within(10, "register", reg.register(inst("webhook", "h1", 4001)))
        .await
        .unwrap();
    let takeover = connect(etcd.endpoints(), &ns).await;
    let _w1_again = within(10, "re-register", takeover.register(updated.clone()))
        .await
        .unwrap();
    let _w3 = within(10, "register", reg.register(inst("web", "w3", 1003)))
        .await
        .unwrap();

    assert_eq!(
        next(&mut web, 15).await,
        ServiceEvent::Added(inst("web", "w3", 1003))
    );
    assert_eq!(
        next(&mut all, 15).await,
        ServiceEvent::Added(inst("webhook", "h1", 4001))
    );
    assert_eq!(
        next(&mut all, 15).await,
        ServiceEvent::Added(inst("web", "w3", 1003))
    );

    let (rev, want) = raw(&etcd.endpoints(), &ns, Some("web")).await;
    assert!(
        web.revision() <= rev && web.revision() > 0,
        "revision {} vs etcd {rev}",
        web.revision()
    );
    assert_eq!(
        want.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(),
        ["w1", "w3"]
    );
    assert_eq!(web.errors(), 0);
    within(10, "close", takeover.close()).await.unwrap();
    within(10, "close", stranger.close()).await.unwrap();
    within(10, "close", reg.close()).await.unwrap();
    // Closing the registry ends its streams.
    let rest: Vec<_> = within(10, "stream end", web.collect::<Vec<_>>()).await;
    assert!(rest.iter().all(|e| !matches!(e, ServiceEvent::Snapshot(_))));
}

#[tokio::test]
async fn no_gap_while_200_instances_register_during_the_watch_start() {
    let etcd = shared_server().await;
    let ns = unique_name("w2");
    let writer = Arc::new(connect(etcd.endpoints(), &ns).await);
    let watcher = connect(etcd.endpoints(), &ns).await;

    async fn register_wave(
        writer: Arc<Registry>,
        wave: u16,
    ) -> etcd_registry::Result<Vec<etcd_registry::Registration>> {
        let regs = (0..50).map(|i| {
            let port = 10_000 + wave * 50 + i;
            let writer = writer.clone();
            async move {
                writer
                    .register(inst("api", &format!("i{port}"), port))
                    .await
            }
        });
        futures::future::join_all(regs).await.into_iter().collect()
    }
    let first = within(30, "wave 0", register_wave(writer.clone(), 0))
        .await
        .unwrap();
    let w = writer.clone();
    let rest = tokio::spawn(async move {
        let mut all = Vec::new();
        for wave in 1..4 {
            all.extend(register_wave(w.clone(), wave).await?);
        }
        Ok::<_, etcd_registry::Error>(all)
    });
    let mut watch = watcher.watch("api").unwrap();
    let mut model = Model::new();
    let ServiceEvent::Snapshot(snapshot) = next(&mut watch, 15).await else {
        panic!("the first item must be a snapshot")
    };
    let in_snapshot = snapshot.len();
    apply(&mut model, ServiceEvent::Snapshot(snapshot));
    let rest = within(60, "waves 1-3", rest).await.unwrap().unwrap();
    assert_eq!(first.len() + rest.len(), 200);
    converge(&mut watch, &mut model, &etcd.endpoints(), &ns, "api", 30).await;
    assert_eq!(model.len(), 200);
    eprintln!("snapshot held {in_snapshot} of 200; the rest arrived as events");
    within(10, "close", writer.close()).await.unwrap();
    within(10, "close", watcher.close()).await.unwrap();
}

#[tokio::test]
async fn compaction_while_cut_off_sends_exactly_the_missed_changes() {
    let etcd = within(60, "start etcd", EtcdServer::start()).await.unwrap();
    let proxy = within(10, "start proxy", FaultProxy::start(&etcd.endpoint()))
        .await
        .unwrap();
    let ns = unique_name("w3");
    let writer = connect(etcd.endpoints(), &ns).await;
    let watcher = connect(vec![proxy.endpoint()], &ns).await;
    let _a = within(10, "register", writer.register(inst("db", "a", 1)))
        .await
        .unwrap();
    let mut b = within(10, "register", writer.register(inst("db", "b", 2)))
        .await
        .unwrap();
    let c = within(10, "register", writer.register(inst("db", "c", 3)))
        .await
        .unwrap();

    let mut watch = watcher.watch("db").unwrap();
    let mut model = Model::new();
    apply(&mut model, next(&mut watch, 15).await);
    assert_eq!(model.len(), 3);

    proxy.blackhole();
    let _d = within(10, "register", writer.register(inst("db", "d", 4)))
        .await
        .unwrap();
    within(10, "update", b.update(inst("db", "b", 2).with_weight(9)))
        .await
        .unwrap();
    within(10, "deregister", c.deregister()).await.unwrap();
    let (rev, _) = raw(&etcd.endpoints(), &ns, Some("db")).await;
    let mut client = within(10, "client", etcd.client()).await.unwrap();
    within(10, "compact", client.compact(rev, None))
        .await
        .unwrap();
    // Nothing may arrive while cut off; heal once the watcher noticed the cut
    // (HTTP/2 keep-alive or the staleness bound), so that it must resume
    // from a compacted revision.
    let deadline = Instant::now() + Duration::from_secs(30);
    while watch.errors() == 0 {
        assert!(
            Instant::now() < deadline,
            "the cut-off was not noticed within 30 s"
        );
        if let Ok(e) = tokio::time::timeout(Duration::from_millis(100), watch.next()).await {
            panic!("an item arrived while cut off: {e:?}");
        }
    }
    proxy.heal();

    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, want) = raw(&etcd.endpoints(), &ns, Some("db")).await;
        if model == want {
            break;
        }
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(event)) => {
                received.push(event.clone());
                apply(&mut model, event);
            }
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("no convergence after heal: received {received:?}"),
        }
    }
    received.sort_by_key(|e| format!("{e:?}"));
    let mut expected = vec![
        ServiceEvent::Added(inst("db", "d", 4)),
        ServiceEvent::Updated(inst("db", "b", 2).with_weight(9)),
        ServiceEvent::Removed(inst("db", "c", 3)),
    ];
    expected.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(received, expected);
    // Nothing more than the missed changes.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.next())
            .await
            .is_err()
    );
    assert!(
        watch.errors() >= 1,
        "the interruption and the compaction are counted"
    );
    assert!(logged("compacted"), "the compaction is logged");
    within(10, "close", watcher.close()).await.ok();
    within(10, "close", writer.close()).await.unwrap();
}

/// Registers, checks that the watch and the cache converge, for one step.
async fn step_converges(
    watch: &mut ServiceWatch,
    model: &mut Model,
    cache: &ServiceCache,
    endpoints: &[String],
    ns: &str,
) {
    converge(watch, model, endpoints, ns, "svc", 60).await;
    cache_converges(cache, endpoints, ns, "svc", 60).await;
}

#[tokio::test]
async fn watch_and_cache_survive_an_etcd_restart_with_data_kept() {
    let mut etcd = within(60, "start etcd", EtcdServer::start()).await.unwrap();
    let eps = etcd.endpoints();
    let ns = unique_name("w4k");
    let writer = connect(eps.clone(), &ns).await;
    let watcher = connect(eps.clone(), &ns).await;
    let _a = within(10, "register", writer.register(inst("svc", "a", 1)))
        .await
        .unwrap();
    let _b = within(10, "register", writer.register(inst("svc", "b", 2)))
        .await
        .unwrap();
    let mut watch = watcher.watch("svc").unwrap();
    let cache = within(15, "cache", watcher.cache("svc")).await.unwrap();
    let mut model = Model::new();
    step_converges(&mut watch, &mut model, &cache, &eps, &ns).await;

    within(60, "restart", etcd.restart()).await.unwrap();
    let _c = register_retrying(&writer, inst("svc", "c", 3)).await;
    delete_retrying(&writer, "svc", "a").await;
    step_converges(&mut watch, &mut model, &cache, &eps, &ns).await;
    assert_eq!(cache.instances().len(), 2);
    assert!(cache.get("c").is_some() && cache.get("a").is_none());
    assert!(watch.errors() >= 1, "the broken stream is counted");
    within(10, "close", watcher.close()).await.unwrap();
    within(10, "close", writer.close()).await.unwrap();
}

#[tokio::test]
async fn watch_and_cache_survive_a_wiped_etcd() {
    let mut etcd = within(60, "start etcd", EtcdServer::start()).await.unwrap();
    let eps = etcd.endpoints();
    let ns = unique_name("w4w");
    let writer = connect(eps.clone(), &ns).await;
    let watcher = connect(eps.clone(), &ns).await;
    let _a = within(10, "register", writer.register(inst("svc", "a", 1)))
        .await
        .unwrap();
    // A key nobody maintains: gone for good after the wipe.
    let mut client = within(10, "client", etcd.client()).await.unwrap();
    let orphan = format!("{DEFAULT_KEY_PREFIX}/{ns}/services/svc/orphan");
    within(
        10,
        "put",
        client.put(orphan.as_str(), inst("svc", "orphan", 9).to_json(), None),
    )
    .await
    .unwrap();
    // Many revisions, so that the wiped store starts far below the watcher's.
    for i in 0..30 {
        within(
            10,
            "put",
            client.put(format!("/{ns}/noise"), format!("{i}"), None),
        )
        .await
        .unwrap();
    }
    let mut watch = watcher.watch("svc").unwrap();
    let cache = within(15, "cache", watcher.cache("svc")).await.unwrap();
    let mut model = Model::new();
    step_converges(&mut watch, &mut model, &cache, &eps, &ns).await;
    assert_eq!(model.len(), 2);

    within(60, "restart wiped", etcd.restart_wiped())
        .await
        .unwrap();
    // The writer restores `a` under a new lease; then a new instance.
    let _b = register_retrying(&writer, inst("svc", "b", 2)).await;
    step_converges(&mut watch, &mut model, &cache, &eps, &ns).await;
    let ids: Vec<String> = cache.instances().iter().map(|i| i.id.clone()).collect();
    assert_eq!(
        ids,
        ["a", "b"],
        "the orphan is removed, the restored and the new instance are present"
    );
    within(10, "close", watcher.close()).await.unwrap();
    within(10, "close", writer.close()).await.unwrap();
}

#[tokio::test]
async fn watch_and_cache_survive_member_and_leader_loss_in_a_cluster() {
    let mut cluster = within(120, "start cluster", EtcdCluster::start(3))
        .await
        .unwrap();
    let eps = cluster.endpoints();
    let ns = unique_name("w4c");
    let writer = connect(eps.clone(), &ns).await;
    let watcher = connect(eps.clone(), &ns).await;
    let _a = within(10, "register", writer.register(inst("svc", "a", 1)))
        .await
        .unwrap();
    let mut watch = watcher.watch("svc").unwrap();
    let cache = within(15, "cache", watcher.cache("svc")).await.unwrap();
    let mut model = Model::new();
    step_converges(&mut watch, &mut model, &cache, &eps, &ns).await;

    // The member most of the watch streams went to dies.
    let mut used = (0, 0);
    for i in 0..cluster.len() {
        let open = cluster.member(i).open_streams("Watch").await.unwrap();
        if open > used.1 {
            used = (i, open);
        }
    }
    let used = used.0;
    within(
        30,
        "kill the watched member",
        cluster.member_mut(used).kill(),
    )
    .await
    .unwrap();
    let live: Vec<String> = (0..3)
        .filter(|&i| i != used)
        .map(|i| eps[i].clone())
        .collect();
    let _b = register_retrying(&writer, inst("svc", "b", 2)).await;
    step_converges(&mut watch, &mut model, &cache, &live, &ns).await;
    assert!(cache.get("b").is_some());

    // It comes back; then the leader dies.
    within(
        60,
        "restart the watched member",
        cluster.member_mut(used).restart(),
    )
    .await
    .unwrap();
    let leader = within(
        60,
        "leader",
        cluster.wait_for_leader(Duration::from_secs(50)),
    )
    .await
    .unwrap();
    within(30, "kill the leader", cluster.member_mut(leader).kill())
        .await
        .unwrap();
    let live: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| eps[i].clone())
        .collect();
    within(
        60,
        "new leader",
        cluster.wait_for_leader(Duration::from_secs(50)),
    )
    .await
    .unwrap();
    let _c = register_retrying(&writer, inst("svc", "c", 3)).await;
    delete_retrying(&writer, "svc", "a").await;
    step_converges(&mut watch, &mut model, &cache, &live, &ns).await;
    let ids: Vec<String> = cache.instances().iter().map(|i| i.id.clone()).collect();
    assert_eq!(ids, ["b", "c"]);
    within(20, "close", watcher.close()).await.ok();
    within(20, "close", writer.close()).await.ok();
}

#[tokio::test]
async fn a_malformed_value_is_skipped_with_a_warning_and_the_stream_goes_on() {
    let etcd = shared_server().await;
    let ns = unique_name("w5");
    let reg = connect(etcd.endpoints(), &ns).await;
    let mut watch = reg.watch("svc").unwrap();
    assert_eq!(next(&mut watch, 15).await, ServiceEvent::Snapshot(vec![]));
    let cache = within(15, "cache", reg.cache("svc")).await.unwrap();

    let bad_key = format!("{DEFAULT_KEY_PREFIX}/{ns}/services/svc/bad");
    let etcdctl = |value: String| {
        let mut cmd = etcd.etcdctl();
        cmd.args(["put", bad_key.as_str(), value.as_str()]);
        async move {
            let out = within(15, "etcdctl put", cmd.output())
                .await
                .expect("etcdctl runs");
            assert!(
                out.status.success(),
                "etcdctl failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    etcdctl("this is {not json".into()).await;
    let _good = within(10, "register", reg.register(inst("svc", "good", 1)))
        .await
        .unwrap();
    // The malformed put produced no event; the next registration does.
    assert_eq!(
        next(&mut watch, 15).await,
        ServiceEvent::Added(inst("svc", "good", 1))
    );
    eventually(15, "the cache holds the good instance", || async {
        cache.get("good").is_some()
    })
    .await;
    assert_eq!(cache.instances().len(), 1);
    assert!(cache.get("bad").is_none());
    eventually(5, "a warning names the malformed key", || async {
        logged(&bad_key)
    })
    .await;

    // A malformed key that becomes valid is added; one that turns malformed again is removed.
    let fixed = inst("svc", "bad", 2);
    etcdctl(String::from_utf8(fixed.to_json()).unwrap()).await;
    assert_eq!(
        next(&mut watch, 15).await,
        ServiceEvent::Added(fixed.clone())
    );
    // A port of the wrong type: Go's json.Unmarshal fails on it too.
    etcdctl("{\"port\": true}".into()).await;
    assert_eq!(next(&mut watch, 15).await, ServiceEvent::Removed(fixed));
    eventually(15, "the cache dropped it", || async {
        cache.get("bad").is_none()
    })
    .await;
    assert_eq!(watch.errors(), 0, "malformed values are not watch errors");
    within(10, "close", reg.close()).await.unwrap();
}
