//! Watches behind a proxy whose watch went silent (issue 34, item 6),
//! against real etcd through the testkit's gRPC shim: unary calls pass, the
//! watch streams open before `silence_watches` stay open and deliver
//! nothing, and progress requests go unanswered, as behind etcd's gRPC
//! proxy. The stream's liveness read must then notice a deletion it did not
//! deliver, as well as a put.

mod common;

use std::time::{Duration, Instant};

use etcd_registry::ServiceInstance;
use etcd_registry_testkit::{
    EtcdServer, GrpcShim, WATCH_PATH, eventually, shared_server, unique_name, within,
};

use common::{builder, connect_with};

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(30);
/// How long a missed change may go unnoticed: the stream's liveness bound
/// (10 s of silence, then a read of at most 3 s) and a reopen after the
/// backoff, with room to spare.
const LIVENESS_BOUND: Duration = Duration::from_secs(40);

const RANGE: &str = "/etcdserverpb.KV/Range";

fn inst(id: &str) -> ServiceInstance {
    ServiceInstance::new("web", id, "10.0.0.1", 8080)
}

async fn shim() -> GrpcShim {
    let etcd = shared_server().await;
    let shim = GrpcShim::start(&etcd.endpoint()).await.unwrap();
    shim.drop_progress_requests();
    shim
}

/// A cache behind the shim holds w1 and w2; its watch goes silent; w1 is
/// deregistered. The cache drops w1 within the liveness bound, and follows
/// later changes (w3) on the stream it reopened.
///
/// Seen failing before the fix (the liveness read compared only the newest
/// modification revision of the keys still there): the cache still held w1
/// when the bound ran out, while the shim had swallowed the DELETE.
#[tokio::test(flavor = "multi_thread")]
async fn a_cache_behind_a_silent_watch_drops_a_deleted_instance() {
    let etcd = shared_server().await;
    let shim = shim().await;
    let ns = unique_name("silent");
    let publisher = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let reader = connect_with(builder(vec![shim.endpoint()], &ns, 10)).await;
    let w1 = publisher.register(inst("w1")).await.unwrap();
    let _w2 = publisher.register(inst("w2")).await.unwrap();
    let watches = shim.calls(WATCH_PATH);
    let cache = reader.cache("web").await.unwrap();
    eventually("the cache holds w1 and w2", T, || async {
        cache.instances().len() == 2
    })
    .await;
    // The cache lists, then opens its watch: silence that one.
    eventually("the cache watches", T, || async {
        shim.calls(WATCH_PATH) > watches
    })
    .await;

    shim.silence_watches();
    w1.deregister().await.unwrap();
    let deleted = Instant::now();
    eventually("the shim swallows the DELETE", T, || async {
        shim.swallowed() > 0
    })
    .await;
    eventually("the cache drops w1", LIVENESS_BOUND, || async {
        cache.get("w1").is_none()
    })
    .await;
    eprintln!(
        "the cache dropped w1 {:?} after the delete",
        deleted.elapsed()
    );
    assert!(cache.get("w2").is_some());

    // The reopened stream is not silenced: changes arrive as events again.
    let _w3 = publisher.register(inst("w3")).await.unwrap();
    eventually("the cache sees w3", T, || async {
        cache.get("w3").is_some()
    })
    .await;
    reader.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// A lock waiter behind the shim is queued; its watch of the predecessor's
/// key goes silent; the holder releases. The waiter acquires within the
/// liveness bound.
///
/// Seen failing before the fix: the liveness read found no key newer than
/// the stream's revision (the released key is simply gone) and judged the
/// silent stream alive, so the waiter was still waiting when the bound ran
/// out.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_waiter_behind_a_silent_watch_sees_its_predecessor_go() {
    let etcd = shared_server().await;
    let shim = shim().await;
    let ns = unique_name("silentlock");
    let holder = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    // A TTL far beyond the bound: the waiter's lease must not be what decides.
    let waiter = connect_with(builder(vec![shim.endpoint()], &ns, 120)).await;
    let guard = within(
        "the holder acquires",
        T,
        holder.lock("job").unwrap().acquire(),
    )
    .await
    .unwrap();
    let lock = waiter.lock("job").unwrap();
    let watches = shim.calls(WATCH_PATH);
    let acquire = tokio::spawn(async move { lock.acquire().await });
    eventually("the waiter watches its predecessor", T, || async {
        shim.calls(WATCH_PATH) > watches
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // the watch is created

    shim.silence_watches();
    guard.release().await.unwrap();
    let released = Instant::now();
    let acquired = within("the waiter acquires", LIVENESS_BOUND, acquire)
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "the waiter acquired {:?} after the release",
        released.elapsed()
    );
    assert!(shim.swallowed() > 0, "the shim did not silence the watch");
    acquired.release().await.unwrap();
    waiter.close().await.unwrap();
    holder.close().await.unwrap();
}

/// The liveness read's cost: a quiet cache behind the shim (progress
/// requests unanswered) reads etcd about once per 10 s of silence. Over
/// 35 s that is 3 or 4 reads (one more right after a change, to count the
/// keys as of the stream's revision); the bound allows twice that.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_silent_watch_costs_a_read_or_two_per_stale_period() {
    let etcd = shared_server().await;
    let shim = shim().await;
    let ns = unique_name("quiet");
    let publisher = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let reader = connect_with(builder(vec![shim.endpoint()], &ns, 10)).await;
    let _w1 = publisher.register(inst("w1")).await.unwrap();
    let cache = reader.cache("web").await.unwrap();
    eventually("the cache holds w1", T, || async {
        cache.instances().len() == 1
    })
    .await;
    let before = shim.calls(RANGE);
    tokio::time::sleep(Duration::from_secs(35)).await;
    let reads = shim.calls(RANGE) - before;
    eprintln!("{reads} range reads in 35 s of a quiet watch");
    assert!(reads <= 8, "{reads} range reads in 35 s");
    assert_eq!(cache.instances().len(), 1);
    reader.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// As above, and etcd compacts its history at the delete's revision, right
/// after it. The liveness read finds the deletion missing and the stream
/// restarts from its revision + 1, which is the compaction revision: etcd
/// accepts that start without reporting a compaction, but the compaction
/// dropped the delete's tombstone, so the restarted stream has nothing to
/// deliver. The next liveness read finds the same gap at the same revision
/// and resets the stream, and the cache re-lists and drops w1.
///
/// Seen failing with the first version of the fix (the count check alone):
/// the stream restarted every 10 s ("a key was deleted that the stream did
/// not deliver", a WARN each time, in a loop) and the cache kept w1.
#[tokio::test(flavor = "multi_thread")]
async fn a_compacted_revision_behind_a_silent_watch_ends_in_a_relist() {
    // Its own etcd: the compaction would disturb the other tests.
    let etcd = within("etcd", T, EtcdServer::start()).await.unwrap();
    let shim = GrpcShim::start(&etcd.endpoint()).await.unwrap();
    shim.drop_progress_requests();
    let ns = unique_name("silentcompact");
    let publisher = connect_with(builder(etcd.endpoints(), &ns, 10)).await;
    let reader = connect_with(builder(vec![shim.endpoint()], &ns, 10)).await;
    let w1 = publisher.register(inst("w1")).await.unwrap();
    let _w2 = publisher.register(inst("w2")).await.unwrap();
    let watches = shim.calls(WATCH_PATH);
    let cache = reader.cache("web").await.unwrap();
    eventually("the cache holds w1 and w2", T, || async {
        cache.instances().len() == 2
    })
    .await;
    eventually("the cache watches", T, || async {
        shim.calls(WATCH_PATH) > watches
    })
    .await;

    shim.silence_watches();
    w1.deregister().await.unwrap();
    let mut direct = etcd.client().await.unwrap();
    let now = direct.get("compact", None).await.unwrap();
    let revision = now.header().map_or(0, |h| h.revision());
    direct.compact(revision, None).await.unwrap();
    eventually("the cache drops w1", LIVENESS_BOUND, || async {
        cache.get("w1").is_none()
    })
    .await;
    assert!(cache.get("w2").is_some());
    reader.close().await.unwrap();
    publisher.close().await.unwrap();
}
