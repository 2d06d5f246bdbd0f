//! A namespace of 100,000 instances (10 services of 10,000, values of about
//! 200 bytes: 20 MB, five times the client's 4 MiB decode limit) against
//! real etcd: lists, caches and watches read it in pages at one revision.
//!
//! The data set is loaded once per test binary with raw batched transactions.
//! Tests write to the namespace only under services that sort after the
//! data set's (`zz-...`), and run one at a time (`SERIAL`): one compacts
//! etcd, which would fail another's raw read at an older revision.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions};
use etcd_registry::{DEFAULT_KEY_PREFIX, Registry, ServiceEvent, ServiceInstance, ServiceWatch};
use etcd_registry_testkit::{put_batched, shared_server, unique_name};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::OnceCell;
use tokio::time::Instant;

const SERVICES: usize = 10;
const PER_SERVICE: usize = 10_000;
const TOTAL: usize = SERVICES * PER_SERVICE;

type Model = BTreeMap<(String, String), ServiceInstance>;

async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    etcd_registry_testkit::within(what, Duration::from_secs(secs), f).await
}

/// One test at a time: a compaction would fail another test's raw read at
/// an older revision, or break its watch.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct DataSet {
    ns: String,
    endpoints: Vec<String>,
    /// What was loaded, under services `svc0`..`svc9`.
    model: Model,
}

/// The 100,000 instances, loaded once for the whole test binary.
async fn data_set() -> &'static DataSet {
    static DATA: OnceCell<DataSet> = OnceCell::const_new();
    DATA.get_or_init(|| async {
        common::init_tracing();
        let etcd = shared_server().await;
        let ns = unique_name("scale");
        let mut model = Model::new();
        for s in 0..SERVICES {
            for i in 0..PER_SERVICE {
                let instance =
                    ServiceInstance::new(format!("svc{s}"), format!("i{i:05}"), "10.1.2.3", 8000)
                        .with_version("1.2.3")
                        .with_weight(i as i64 % 7)
                        .with_metadata("zone", "eu-west-1a")
                        .with_metadata("build", "2026-11-29T06:00:00Z-0123456789abcdef")
                        .with_metadata("owner", "team-platform-discovery");
                model.insert((instance.name.clone(), instance.id.clone()), instance);
            }
        }
        let kvs: Vec<(String, Vec<u8>)> = model
            .values()
            .map(|i| (instance_key(&ns, &i.name, &i.id), i.to_json()))
            .collect();
        let bytes: usize = kvs.iter().map(|(_, v)| v.len()).sum();
        let client = within(10, "raw client", etcd.client())
            .await
            .expect("client");
        let start = Instant::now();
        within(120, "load 100,000 instances", put_batched(&client, kvs))
            .await
            .expect("load");
        eprintln!(
            "loaded {TOTAL} instances ({bytes} bytes of values) in {:?}",
            start.elapsed()
        );
        assert!(
            bytes > 4 << 20,
            "the data set must exceed the 4 MiB decode limit"
        );
        DataSet {
            ns,
            endpoints: etcd.endpoints(),
            model,
        }
    })
    .await
}

fn instance_key(ns: &str, name: &str, id: &str) -> String {
    format!("{DEFAULT_KEY_PREFIX}/{ns}/services/{name}/{id}")
}

async fn connect(data: &DataSet) -> Registry {
    common::connect_with(common::builder(data.endpoints.clone(), &data.ns, 10)).await
}

async fn raw_client(data: &DataSet) -> Client {
    within(10, "raw client", Client::connect(&data.endpoints, None))
        .await
        .expect("raw client")
}

/// One raw range request (not paged) of the whole namespace at `revision`,
/// with a decode limit that fits it.
async fn raw_read_at(data: &DataSet, revision: i64) -> Model {
    let client = raw_client(data).await;
    let prefix = format!("{DEFAULT_KEY_PREFIX}/{}/services/", data.ns);
    let mut kv = client.kv_client().max_decoding_message_size(256 << 20);
    let resp = within(
        60,
        "raw read",
        kv.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_revision(revision)),
        ),
    )
    .await
    .expect("raw read");
    to_model(
        resp.kvs()
            .iter()
            .map(|kv| ServiceInstance::from_json(kv.value()).expect("valid value")),
    )
}

fn to_model(instances: impl IntoIterator<Item = ServiceInstance>) -> Model {
    instances
        .into_iter()
        .map(|i| ((i.name.clone(), i.id.clone()), i))
        .collect()
}

/// Only the services of the data set: other tests add `zz-...` services.
fn loaded(model: Model) -> Model {
    model
        .into_iter()
        .filter(|((name, _), _)| name.starts_with("svc"))
        .collect()
}

/// The snapshot of a new watch, and the revision it was read at.
async fn snapshot(watch: &mut ServiceWatch) -> (Model, i64) {
    match within(120, "watch snapshot", watch.next()).await {
        Some(ServiceEvent::Snapshot(all)) => (to_model(all), watch.revision()),
        other => panic!("expected a snapshot first, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_caches_and_watches_a_namespace_of_100k() {
    let data = data_set().await;
    let _serial = SERIAL.lock().await;
    let registry = connect(data).await;

    let start = Instant::now();
    let all = within(120, "all_instances", registry.all_instances())
        .await
        .expect("all_instances of 100k");
    eprintln!(
        "all_instances() of {} took {:?}",
        all.len(),
        start.elapsed()
    );
    assert_eq!(loaded(to_model(all)), data.model);

    let rss_before = rss_kib();
    let start = Instant::now();
    let cache = within(120, "cache_all ready", registry.cache_all())
        .await
        .expect("cache_all");
    eprintln!(
        "cache_all() ready in {:?}; resident memory {} KiB -> {} KiB (a rough figure: the test holds its own copy too)",
        start.elapsed(),
        rss_before,
        rss_kib()
    );
    assert_eq!(
        loaded(to_model(cache.instances().iter().cloned())),
        data.model
    );

    let mut watch = registry.watch_all().expect("watch_all");
    let start = Instant::now();
    let (snap, _) = snapshot(&mut watch).await;
    eprintln!("watch_all() snapshot in {:?}", start.elapsed());
    assert_eq!(loaded(snap), data.model);

    // A change after the snapshot reaches both.
    let later = ServiceInstance::new("zz-later", unique_name("later"), "10.9.9.9", 9);
    let _reg = within(30, "register", registry.register(later.clone()))
        .await
        .expect("register");
    within(30, "the watch to see the later instance", async {
        loop {
            match watch.next().await {
                Some(ServiceEvent::Added(i)) if i == later => return,
                Some(_) => continue,
                None => panic!("the watch ended"),
            }
        }
    })
    .await;
    etcd_registry_testkit::eventually(
        "the cache to see the later instance",
        Duration::from_secs(30),
        || async { cache.instances().contains(&later) },
    )
    .await;
    assert_eq!(watch.errors(), 0, "no read had to be retried");
    within(10, "close", registry.close()).await.expect("close");
}

/// This process's resident memory (Linux), for the log; 0 if unknown.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A hook that runs `f` between the pages of every paged read.
fn after_page<F, Fut>(f: F) -> Arc<dyn Fn(i64) -> BoxFuture<'static, ()> + Send + Sync>
where
    F: Fn(i64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |revision| Box::pin(f(revision)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_paged_snapshot_is_one_revision_under_a_concurrent_writer() {
    let data = data_set().await;
    let _serial = SERIAL.lock().await;
    let churn = unique_name("zz-churn");
    let client = raw_client(data).await;

    // Between every two pages, one key is added and the one before deleted,
    // under a service that sorts after every page read so far: a reader that
    // did not pin the first page's revision would return them.
    let pages = Arc::new(AtomicU64::new(0));
    let hook = {
        let (client, ns, churn, pages) = (
            client.clone(),
            data.ns.clone(),
            churn.clone(),
            pages.clone(),
        );
        after_page(move |_revision| {
            let (mut client, ns, churn, pages) =
                (client.clone(), ns.clone(), churn.clone(), pages.clone());
            async move {
                let n = pages.fetch_add(1, Ordering::SeqCst);
                let value =
                    ServiceInstance::new(churn.as_str(), format!("p{n}"), "10.0.0.1", 1).to_json();
                let put = client.put(instance_key(&ns, &churn, &format!("p{n}")), value, None);
                within(10, "put between pages", put).await.expect("put");
                if n > 0 {
                    let delete =
                        client.delete(instance_key(&ns, &churn, &format!("p{}", n - 1)), None);
                    within(10, "delete between pages", delete)
                        .await
                        .expect("delete");
                }
            }
        })
    };
    let registry = connect(data).await;
    registry.set_read_paging_for_tests(None, Some(hook));

    // And a writer that runs on its own while the snapshot is read (bounded).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mut client, ns, churn, stop) =
            (client.clone(), data.ns.clone(), churn.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ops = 0u32;
            while !stop.load(Ordering::SeqCst) && ops < 5_000 {
                let key = instance_key(&ns, &churn, &format!("w{}", ops % 50));
                if ops % 3 == 2 {
                    let _ = within(10, "writer delete", client.delete(key, None)).await;
                } else {
                    let value = ServiceInstance::new(
                        churn.as_str(),
                        format!("w{}", ops % 50),
                        "10.0.0.2",
                        2,
                    )
                    .to_json();
                    let _ = within(10, "writer put", client.put(key, value, None)).await;
                }
                ops += 1;
            }
            ops
        })
    };

    let mut watch = registry.watch_all().expect("watch_all");
    let (snap, revision) = snapshot(&mut watch).await;
    stop.store(true, Ordering::SeqCst);
    let ops = within(30, "writer", writer).await.expect("writer task");
    let pages = pages.load(Ordering::SeqCst);
    eprintln!(
        "snapshot at revision {revision}: {} instances, {pages} page boundaries, {ops} concurrent writes",
        snap.len()
    );
    assert!(
        pages >= 5,
        "the snapshot was read in {} pages; expected many",
        pages + 1
    );

    assert_eq!(loaded(snap.clone()), data.model);
    // Checked by hand: with every page read at the latest revision instead of
    // the first page's (`with_revision(0)` in `Conn::read_prefixes`), this fails.
    let raw = raw_read_at(data, revision).await;
    assert_eq!(
        snap, raw,
        "the snapshot differs from a single read at its revision"
    );
    assert_eq!(watch.errors(), 0);
    within(10, "close", registry.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_in_the_middle_of_a_paged_read_restarts_it_consistently() {
    let data = data_set().await;
    let _serial = SERIAL.lock().await;
    let marker = unique_name("zz-compact");
    let client = raw_client(data).await;

    // After the first page: write a key, then compact up to it, so the
    // revision the read is pinned to is gone before the second page.
    let revisions = Arc::new(Mutex::new(Vec::<i64>::new()));
    let compacted = Arc::new(AtomicBool::new(false));
    let hook = {
        let (client, ns, marker, revisions, compacted) = (
            client.clone(),
            data.ns.clone(),
            marker.clone(),
            revisions.clone(),
            compacted.clone(),
        );
        after_page(move |revision| {
            let (mut client, ns, marker, compacted) = (
                client.clone(),
                ns.clone(),
                marker.clone(),
                compacted.clone(),
            );
            if let Ok(mut seen) = revisions.lock() {
                seen.push(revision);
            }
            async move {
                if compacted.swap(true, Ordering::SeqCst) {
                    return;
                }
                let value = ServiceInstance::new(marker.as_str(), "m", "10.0.0.3", 3).to_json();
                let put = client.put(instance_key(&ns, &marker, "m"), value, None);
                let rev = within(10, "put marker", put)
                    .await
                    .expect("put")
                    .header()
                    .map_or(0, |h| h.revision());
                let compact = client.compact(rev, Some(CompactionOptions::new().with_physical()));
                within(60, "compact", compact).await.expect("compact");
            }
        })
    };
    let registry = connect(data).await;
    registry.set_read_paging_for_tests(None, Some(hook));

    let mut watch = registry.watch_all().expect("watch_all");
    let (snap, revision) = snapshot(&mut watch).await;
    let revisions = revisions.lock().expect("revisions").clone();
    eprintln!("page boundaries at revisions {revisions:?}; snapshot at {revision}");
    let first = revisions[0];
    assert!(
        revisions.iter().any(|&r| r > first),
        "the read did not start again at a new revision: {revisions:?}"
    );
    assert!(
        revision > first,
        "the snapshot is at the compacted revision {first}"
    );
    // The restart is inside the read: the watch itself saw no failed list.
    // Checked by hand: with the restart removed from `Conn::read_prefixes`,
    // the list fails once, the watch retries it, and this fails (1 != 0).
    assert_eq!(
        watch.errors(),
        0,
        "the compaction surfaced as a failed list instead of a restart"
    );
    assert!(
        snap.contains_key(&(marker.clone(), "m".to_owned())),
        "the snapshot misses the key written before the restart"
    );
    assert_eq!(loaded(snap.clone()), data.model);
    assert_eq!(snap, raw_read_at(data, revision).await);
    within(10, "close", registry.close()).await.expect("close");
}

/// Waits until `cache` satisfies `done`, waking on its changes (and every
/// 50 ms, since a change may land between the check and the wait).
async fn cache_until(
    cache: &etcd_registry::ServiceCache,
    what: &str,
    done: impl Fn(&etcd_registry::ServiceCache) -> bool,
) {
    within(30, what, async {
        while !done(cache) {
            let _ = tokio::time::timeout(Duration::from_millis(50), cache.changed()).await;
        }
    })
    .await;
}

/// `instances()` is one sorted set: (name, id) strictly increasing.
fn sorted_and_unique(cache: &etcd_registry::ServiceCache) -> bool {
    let all = cache.instances();
    let keys: Vec<(&str, &str)> = all
        .iter()
        .map(|i| (i.name.as_str(), i.id.as_str()))
        .collect();
    keys.windows(2).all(|w| w[0] < w[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_changes_to_a_cache_of_100k_are_seen_and_instances_stay_consistent() {
    const ADDS: usize = 100;
    let data = data_set().await;
    let _serial = SERIAL.lock().await;
    let registry = connect(data).await;
    let mut client = raw_client(data).await;
    let service = unique_name("zz-single");
    let cache = within(120, "cache_all ready", registry.cache_all())
        .await
        .expect("cache_all");
    let before = cache.instances();
    // Other tests of this binary may have left `zz-...` instances behind.
    let base = before.len();
    assert_eq!(
        loaded(to_model(before.to_vec())),
        data.model,
        "the cache's snapshot"
    );

    // One change at a time, each waited for: the cost of a change to a
    // large cache, as a user sees it (put, watch event, applied, visible).
    let start = Instant::now();
    for n in 0..ADDS {
        let id = format!("a{n:03}");
        let value = ServiceInstance::new(service.as_str(), id.as_str(), "10.7.0.1", 7).to_json();
        let put = client.put(instance_key(&data.ns, &service, &id), value, None);
        within(10, "put", put).await.expect("put");
        cache_until(&cache, "the cache to see a single add", |c| {
            c.get(&id).is_some_and(|i| i.name == service)
        })
        .await;
    }
    let took = start.elapsed();
    eprintln!(
        "{ADDS} single adds, each seen by a cache of {TOTAL} before the next: {took:?} ({:?} per change)",
        took / ADDS as u32
    );

    // The first read after a change rebuilds the list from pointers; the
    // next ones share it.
    let start = Instant::now();
    let rebuilt = cache.instances();
    let first_read = start.elapsed();
    let start = Instant::now();
    let again = cache.instances();
    eprintln!(
        "instances() of {}: {first_read:?} for the first read after a change, {:?} for the next",
        rebuilt.len(),
        start.elapsed()
    );
    assert_eq!(again.len(), base + ADDS);

    // Readers on another task all along: every list they get is one sorted
    // set of a size the writes below allow, and picks always answer.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (cache, stop) = (cache.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reads = 0u32;
            while !stop.load(Ordering::SeqCst) && reads < 100_000 {
                let len = cache.instances().len();
                assert!(
                    (base + ADDS - ADDS / 4..=base + ADDS).contains(&len),
                    "instances() has {len}"
                );
                assert!(cache.pick().is_some());
                if reads.is_multiple_of(64) {
                    assert!(
                        sorted_and_unique(&cache),
                        "instances() is not one sorted set"
                    );
                }
                reads += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            reads
        })
    };

    // Updates and deletes, each checked through `instances()` as well.
    let start = Instant::now();
    for n in 0..ADDS / 2 {
        let id = format!("a{n:03}");
        let key = instance_key(&data.ns, &service, &id);
        if n % 2 == 0 {
            let value =
                ServiceInstance::new(service.as_str(), id.as_str(), "10.7.0.2", 8).to_json();
            within(10, "update", client.put(key, value, None))
                .await
                .expect("update");
            cache_until(&cache, "the cache to see an update", |c| {
                c.get(&id).is_some_and(|i| i.port.number() == Some(8))
            })
            .await;
        } else {
            within(10, "delete", client.delete(key, None))
                .await
                .expect("delete");
            cache_until(&cache, "the cache to see a delete", |c| {
                c.get(&id).is_none()
            })
            .await;
        }
        let removed = n.div_ceil(2);
        assert_eq!(cache.instances().len(), base + ADDS - removed);
        assert!(
            sorted_and_unique(&cache),
            "instances() is not one sorted set"
        );
    }
    eprintln!(
        "{} single updates/deletes, each read back through instances(): {:?}",
        ADDS / 2,
        start.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    let reads = within(30, "reader", reader).await.expect("reader");
    eprintln!("a reader on another task read the cache {reads} times meanwhile");
    assert!(reads > 0);

    // A snapshot taken earlier is not altered by later changes.
    assert_eq!(before.len(), base);
    // The cache equals etcd at the revision it reports.
    let revision = cache.revision();
    let now = cache.instances();
    let raw = raw_read_at(data, revision).await;
    assert_eq!(
        to_model(now.to_vec()),
        raw,
        "the cache differs from etcd at its revision {revision}"
    );
    assert_eq!(cache.errors(), 0);
    let delete = client.delete(
        format!("{DEFAULT_KEY_PREFIX}/{}/services/{service}/", data.ns),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    );
    within(10, "clean up", delete).await.expect("clean up");
    within(10, "close", registry.close()).await.expect("close");
}

/// Run by `a_cache_of_100k_holds_each_instance_once` in a child process, so
/// that the figure is not blurred by the parent's data set and the memory its
/// allocator kept from loading it: connects to the etcd and namespace named by
/// `SCALE_CHILD_ENDPOINTS` and `SCALE_CHILD_NS`, holds either a `cache_all()`
/// (with its view built) or an `all_instances()` list (`SCALE_CHILD_HOLD`),
/// and prints the resident memory before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by a_cache_of_100k_holds_each_instance_once"]
async fn memory_child() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let registry = common::connect_with(common::builder(
        var("SCALE_CHILD_ENDPOINTS")
            .split(',')
            .map(str::to_owned)
            .collect(),
        &var("SCALE_CHILD_NS"),
        10,
    ))
    .await;
    let before = rss_kib();
    let (n, held): (usize, Box<dyn std::any::Any>) = match var("SCALE_CHILD_HOLD").as_str() {
        "cache" => {
            let cache = within(120, "cache_all ready", registry.cache_all())
                .await
                .expect("cache_all");
            (cache.instances().len(), Box::new(cache))
        }
        "list" => {
            let all = within(120, "all_instances", registry.all_instances())
                .await
                .expect("all_instances");
            (all.len(), Box::new(all))
        }
        other => panic!("SCALE_CHILD_HOLD={other}"),
    };
    let after = rss_kib();
    println!("CHILD n={n} before={before} after={after}");
    drop(held);
    within(10, "close", registry.close()).await.expect("close");
}

/// Resident memory (KiB) that a fresh process gains by holding `hold`
/// (`cache` or `list`) of the data set, and how many instances it held.
async fn child_memory(data: &DataSet, hold: &str) -> (u64, u64) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = tokio::process::Command::new(exe);
    child
        .args(["memory_child", "--exact", "--ignored", "--nocapture"])
        .env("SCALE_CHILD_ENDPOINTS", data.endpoints.join(","))
        .env("SCALE_CHILD_NS", &data.ns)
        .env("SCALE_CHILD_HOLD", hold)
        .kill_on_drop(true);
    let out = within(180, "the child process", child.output())
        .await
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHILD "))
        .unwrap_or_else(|| panic!("no figures from the child:\n{stdout}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    let (n, before, after) = (field("n"), field("before"), field("after"));
    eprintln!(
        "a process holding {hold} of {n} instances: resident memory {before} KiB -> {after} KiB (+{} KiB)",
        after.saturating_sub(before)
    );
    (after.saturating_sub(before), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_of_100k_holds_each_instance_once() {
    let data = data_set().await;
    let _serial = SERIAL.lock().await;
    let (list, n_list) = child_memory(data, "list").await;
    let (cache, n_cache) = child_memory(data, "cache").await;
    assert!(n_list >= TOTAL as u64 && n_cache == n_list);
    // A plain list holds each instance once, with nothing else. The cache
    // adds its indexes, the watch's per-key state and its view, all small
    // next to an instance; a second copy of the instances would double it.
    // Checked by hand: with the cache's store holding its own copy of each
    // instance (`Arc::new(ServiceInstance::clone(&instance))` in
    // `Store::put`), this fails.
    assert!(
        cache * 2 <= list * 3,
        "a cache of {n_cache} takes {cache} KiB, a plain list of them {list} KiB: more than one copy?"
    );
}
