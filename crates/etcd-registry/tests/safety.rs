//! Tests that pin the safety mechanisms the README promises (issue 19).
//!
//! Each test names, in its comment, the mechanism it pins and the mutant it
//! was checked against: the mechanism was broken by hand once, this test
//! failed, and the mechanism was restored.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_registry::{
    DEFAULT_KEY_PREFIX, LostReason, Registry, RegistryState, ServiceEvent, ServiceInstance,
    ServiceWatch,
};
use etcd_registry_testkit::{
    Direction, EtcdServer, FaultProxy, eventually, shared_server, unique_name, within,
};
use futures::StreamExt;
use tokio::time::Instant;

mod common;

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(20);

async fn connect(endpoints: Vec<String>, namespace: &str, ttl_secs: u64) -> Registry {
    let builder = common::builder(endpoints, namespace, ttl_secs);
    common::connect_with(builder.request_timeout(Duration::from_secs(5))).await
}

async fn raw_client(endpoints: Vec<String>) -> Client {
    within("raw connect", T, Client::connect(endpoints, None))
        .await
        .expect("raw connect")
}

/// Every key under `prefix`: (key, lease, create revision, mod revision).
async fn raw(client: &Client, prefix: &str) -> Vec<(String, i64, i64, i64)> {
    let mut c = client.clone();
    let resp = within(
        "raw get",
        T,
        c.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    .expect("raw get");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.lease(),
                kv.create_revision(),
                kv.mod_revision(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. The lease deadline counts from the keep-alive's send time, minus a margin.
// ---------------------------------------------------------------------------

/// Pins `Lease::expires = send time of the last acknowledged keep-alive + TTL
/// − margin` (session.rs, `lease_deadline`) on a link where that differs from
/// the answer's arrival: every answer of etcd reaches the leader 1 s late.
///
/// The answer of the last acknowledged keep-alive reached the leader before
/// the cut (the proxy holds delayed bytes through a blackhole), so it was
/// sent at least 1 s before the cut, and `lost()` must fire by
/// cut − 1 s + TTL − margin. Mutant checked by hand: margin 0 and the
/// deadline counted from the answer's arrival; `lost()` then fired about
/// 2 to 3 s after the cut and this test failed.
///
/// It also needs keep-alives that tolerate the latency: before this test,
/// a keep-alive answer slower than TTL/3 was given up on, and the next one
/// was sent a period after the previous answer, so such a leader lost its
/// leadership without any cut (the "holds for longer than the TTL" check).
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_behind_slow_answers_stops_before_the_server_deadline() {
    const TTL: Duration = Duration::from_secs(3);
    const LATENCY: Duration = Duration::from_secs(1);
    // The library's margin for a 3 s TTL: 250 ms + 2% of the TTL.
    const MARGIN: Duration = Duration::from_millis(310);
    // Scheduling of the task that observes `lost()`, on a loaded machine.
    const SLACK: Duration = Duration::from_millis(150);

    let server = shared_server().await;
    let client = raw_client(server.endpoints()).await;
    let ns = unique_name("safety-deadline");
    let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
    let r1 = connect(vec![proxy.endpoint()], &ns, TTL.as_secs()).await;
    let r2 = connect(server.endpoints(), &ns, TTL.as_secs()).await;
    let e1 = r1.election("job").unwrap();
    let e2 = r2.election("job").unwrap();
    let l1 = within("campaign 1", T, e1.campaign("candidate-1"))
        .await
        .unwrap();

    proxy.set_latency(Direction::ToClient, LATENCY);
    // Leadership must survive the latency: held for longer than a TTL, so
    // keep-alives answered 1 s late are acknowledged and extend the lease.
    let held_until = Instant::now() + TTL + Duration::from_secs(1);
    while Instant::now() < held_until {
        assert!(
            l1.is_leader(),
            "a leader whose answers take {LATENCY:?} lost leadership: {:?}",
            l1.lost_reason()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let lost1 = tokio::spawn({
        let l1 = l1.clone();
        async move {
            let reason = l1.lost().await;
            (Instant::now(), reason)
        }
    });
    let c2 = tokio::spawn(async move {
        e2.campaign("candidate-2")
            .await
            .map(|l| (Instant::now(), l))
    });
    let prefix = format!("{}/", e1.etcd_name());
    eventually("candidate 2 has written its key", T, || async {
        raw(&client, &prefix).await.len() == 2
    })
    .await;

    let cut = Instant::now();
    proxy.blackhole();
    let (lost_at, reason) = within("leader 1 notices", T, lost1).await.unwrap();
    let (won_at, l2) = within("candidate 2 wins", T, c2).await.unwrap().unwrap();
    eprintln!(
        "leader 1 lost {:?} after the cut, candidate 2 won {:?} after the cut",
        lost_at - cut,
        won_at - cut
    );
    assert_eq!(reason, LostReason::LeaseDeadline);
    let bound = TTL - LATENCY - MARGIN + SLACK;
    assert!(
        lost_at - cut <= bound,
        "lost() fired {:?} after the cut; the last acknowledged keep-alive was sent \
         at least {LATENCY:?} before it, so the deadline was at most {:?} after it",
        lost_at - cut,
        TTL - LATENCY - MARGIN
    );
    assert!(lost_at < won_at, "candidate 2 won while leader 1 still led");
    assert!(l2.fencing_token() > l1.fencing_token());
    within("resign", T, l2.resign()).await.unwrap();
    drop(l1);
    drop(r1);
    r2.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// 2. The store check on resume, against a wiped etcd that keeps its cluster id.
// ---------------------------------------------------------------------------

fn inst(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new("svc", id, "127.0.0.1", port)
}

type Ids = BTreeSet<String>;

fn ids<'a>(list: impl IntoIterator<Item = &'a ServiceInstance>) -> Ids {
    list.into_iter().map(|i| i.id.clone()).collect()
}

async fn next(watch: &mut ServiceWatch) -> ServiceEvent {
    within("next watch event", T, watch.next())
        .await
        .expect("the watch ended")
}

/// Retries a put on a client whose server is restarting.
async fn put_retrying(client: &Client, key: &str, value: Vec<u8>) {
    eventually("put", T, || {
        let mut c = client.clone();
        let value = value.clone();
        async move { c.put(key, value, None).await.is_ok() }
    })
    .await;
}

/// A watch and a cache behind a proxy see `orphan` and `kept`; the proxy is
/// cut, etcd is wiped and restarted with the same cluster id, and the new
/// store is written to until its revision passes the watcher's. After the
/// heal, exactly the differences must arrive: `orphan` removed, the new keys
/// added, nothing for `kept` (rewritten with the same value).
///
/// The cluster id does not change and the revision does not go back, so only
/// the store check in `Resuming` (watch.rs, `Watcher::check`) can tell the
/// history apart. Mutant checked by hand: `check` always resumes without
/// re-listing; both variants then failed (the orphan stayed).
///
/// `reuse_old_revisions`: the new keys are written first, at revisions the
/// watcher has already passed (a key at or below its revision that it never
/// saw); otherwise every new write is past the watcher's revision, and only
/// the missing `orphan` betrays the wipe.
async fn same_cluster_wipe_sends_exactly_the_difference(reuse_old_revisions: bool) {
    let mut etcd = within("start etcd", T, EtcdServer::start()).await.unwrap();
    let direct = raw_client(etcd.endpoints()).await;
    let ns = unique_name("safety-wipe");
    let key = |id: &str| format!("{DEFAULT_KEY_PREFIX}/{ns}/services/svc/{id}");
    // Revisions, so that the watcher's revision is well above 1.
    for i in 0..10 {
        put_retrying(&direct, &format!("/{ns}/noise"), vec![i]).await;
    }
    put_retrying(&direct, &key("kept"), inst("kept", 1).to_json()).await;
    put_retrying(&direct, &key("orphan"), inst("orphan", 2).to_json()).await;

    let proxy = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let watcher = connect(vec![proxy.endpoint()], &ns, 30).await;
    let mut watch = watcher.watch("svc").unwrap();
    let cache = within("cache", T, watcher.cache("svc")).await.unwrap();
    let ServiceEvent::Snapshot(first) = next(&mut watch).await else {
        panic!("the first event must be the snapshot");
    };
    assert_eq!(ids(&first), Ids::from(["kept".into(), "orphan".into()]));
    let old_revision = watch.revision();
    assert!(old_revision > 10);
    assert_eq!(ids(&cache.instances()), ids(&first));

    proxy.blackhole();
    within("wipe", T, etcd.restart_wiped_same_cluster())
        .await
        .unwrap();
    let mut added = vec!["new".to_owned()];
    if reuse_old_revisions {
        put_retrying(&direct, &key("kept"), inst("kept", 1).to_json()).await;
        put_retrying(&direct, &key("new"), inst("new", 3).to_json()).await;
    }
    loop {
        let mut c = direct.clone();
        let rev = within("status", T, c.status())
            .await
            .unwrap()
            .header()
            .map_or(0, |h| h.revision());
        if rev > old_revision {
            break;
        }
        put_retrying(&direct, &format!("/{ns}/noise"), vec![0]).await;
    }
    if reuse_old_revisions {
        added.push("late".to_owned());
        put_retrying(&direct, &key("late"), inst("late", 4).to_json()).await;
    } else {
        put_retrying(&direct, &key("kept"), inst("kept", 1).to_json()).await;
        put_retrying(&direct, &key("new"), inst("new", 3).to_json()).await;
    }
    let keys = raw(&direct, &format!("{DEFAULT_KEY_PREFIX}/{ns}/services/")).await;
    let below = keys.iter().filter(|k| k.3 <= old_revision).count();
    assert_eq!(below > 0, reuse_old_revisions, "test setup: {keys:?}");
    proxy.heal();

    // Events up to a marker written after the heal: exactly the difference.
    // Last in key order, so a re-list that already includes it sends it last.
    let marker = key("zzz-marker");
    let marker_written = put_retrying(&direct, &marker, inst("zzz-marker", 5).to_json());
    let collect = async {
        let mut events = Vec::new();
        loop {
            match next(&mut watch).await {
                ServiceEvent::Added(i) if i.id == "zzz-marker" => return events,
                e => events.push(e),
            }
        }
    };
    let ((), events) = tokio::join!(marker_written, within("events", T, collect));
    let mut removed = Vec::new();
    let mut got_added = Vec::new();
    for e in &events {
        match e {
            ServiceEvent::Removed(i) => removed.push(i.id.clone()),
            ServiceEvent::Added(i) => got_added.push(i.id.clone()),
            other => panic!("unexpected event {other:?}; all: {events:?}"),
        }
    }
    got_added.sort();
    added.sort();
    let watch_ok = removed == ["orphan"] && got_added == added;

    // The cache has its own watch: it must end up with exactly etcd's set.
    let mut want: Ids = added.iter().cloned().collect();
    want.insert("kept".into());
    want.insert("zzz-marker".into());
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids(&cache.instances()) != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let cached = ids(&cache.instances());
    assert!(
        watch_ok && cached == want,
        "watch events: {events:?} (want removed [orphan], added {added:?}); \
         cache: {cached:?} (want {want:?})"
    );
    within("close", T, watcher.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn same_cluster_wipe_with_new_keys_at_old_revisions() {
    common::init_tracing();
    same_cluster_wipe_sends_exactly_the_difference(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn same_cluster_wipe_with_every_new_key_past_the_old_revision() {
    common::init_tracing();
    same_cluster_wipe_sends_exactly_the_difference(false).await;
}

// ---------------------------------------------------------------------------
// 3. The fencing token is the create revision, also after `proclaim`.
// ---------------------------------------------------------------------------

/// After `proclaim` the leader key's mod revision differs from its create
/// revision, so `leader()` and `observe()` must report the create revision,
/// like `Leadership::fencing_token`. Mutant checked by hand:
/// `LeaderInfo::fencing_token` taken from the mod revision; this test failed.
#[tokio::test(flavor = "multi_thread")]
async fn after_proclaim_leader_and_observe_report_the_leaderships_fencing_token() {
    let server = shared_server().await;
    let client = raw_client(server.endpoints()).await;
    let registry = connect(server.endpoints(), &unique_name("safety-fence"), 10).await;
    let election = registry.election("job").unwrap();
    let l = within("campaign", T, election.campaign("v1"))
        .await
        .unwrap();
    within("proclaim", T, l.proclaim("v2")).await.unwrap();

    let keys = raw(&client, l.key()).await;
    assert_eq!(keys.len(), 1);
    let (_, _, create, modified) = keys[0];
    assert!(
        modified > create,
        "proclaim must have moved the mod revision"
    );
    assert_eq!(l.fencing_token(), create);

    let leader = within("leader", T, election.leader())
        .await
        .unwrap()
        .expect("a leader");
    assert_eq!(leader.proposal_str(), "v2");
    assert_eq!(leader.fencing_token, l.fencing_token());
    assert_eq!(leader.lease_id, l.lease_id());

    let mut observed = election.observe();
    let seen = within("observe", T, observed.next())
        .await
        .expect("observe ended")
        .expect("a leader");
    assert_eq!(seen, leader, "observe and leader() must agree");
    within("resign", T, l.resign()).await.unwrap();
    registry.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// 5. After a revoke, the session re-puts every registration by itself.
// ---------------------------------------------------------------------------

/// Anti-entropy restores deleted keys too, so a test that only checks that
/// the keys come back cannot tell who restored them. The session re-puts
/// every registration in one transaction (`restore_all`, batches of 100)
/// before it reports `Active` again, so all keys share one mod revision;
/// anti-entropy restores key by key, each at its own revision. Mutant checked
/// by hand: no re-put after the re-grant (`restore_all` returns at once);
/// the session then reported `Active` on the new lease with none of the keys
/// back, and this test failed.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_revoke_the_session_re_puts_every_registration_at_once() {
    let server = shared_server().await;
    let client = raw_client(server.endpoints()).await;
    let ns = unique_name("safety-revoke");
    let registry = connect(server.endpoints(), &ns, 30).await;
    let _a = registry
        .register(ServiceInstance::new("web", "1", "127.0.0.1", 1))
        .await
        .unwrap();
    let _b = registry
        .register(ServiceInstance::new("web", "2", "127.0.0.1", 2))
        .await
        .unwrap();
    let _c = registry
        .register(ServiceInstance::new("api", "1", "127.0.0.1", 3))
        .await
        .unwrap();
    let old = registry.lease_id().unwrap();
    let root = format!("{DEFAULT_KEY_PREFIX}/{ns}/");

    let mut c = client.clone();
    within("revoke", T, c.lease_revoke(old)).await.unwrap();
    let mut state = registry.state();
    let new = *within(
        "active on a new lease",
        T,
        state.wait_for(|s| matches!(s, RegistryState::Active { lease_id } if *lease_id != old)),
    )
    .await
    .unwrap();
    let RegistryState::Active { lease_id: new } = new else {
        unreachable!()
    };
    let keys = raw(&client, &root).await;
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.iter().all(|k| k.1 == new), "{keys:?}");
    let revisions: BTreeSet<i64> = keys.iter().map(|k| k.3).collect();
    assert_eq!(
        revisions.len(),
        1,
        "the session must re-put every registration in one transaction: {keys:?}"
    );
    registry.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// A watch that went silent is restarted.
// ---------------------------------------------------------------------------

/// With HTTP/2 pings switched off nothing but the watch's own staleness bound
/// (progress requests every 5 s, restart after 10 s of silence) notices a
/// blackholed stream. Mutant checked by hand: the staleness timer removed
/// from `Watcher::watch`; the cut was then never noticed and this test failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_watch_is_restarted_without_http2_pings() {
    let server = shared_server().await;
    let ns = unique_name("safety-stale");
    let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
    let builder = common::builder(vec![proxy.endpoint()], &ns, 30)
        .request_timeout(Duration::from_secs(5))
        .no_keep_alive();
    let watcher = common::connect_with(builder).await;
    let writer = connect(server.endpoints(), &ns, 30).await;
    let mut watch = watcher.watch("svc").unwrap();
    assert_eq!(next(&mut watch).await, ServiceEvent::Snapshot(Vec::new()));
    // An event proves the etcd watch is open, so the cut hits a live stream.
    let _a = within("register", T, writer.register(inst("a", 1)))
        .await
        .unwrap();
    assert_eq!(next(&mut watch).await, ServiceEvent::Added(inst("a", 1)));

    proxy.blackhole();
    let cut = Instant::now();
    eventually(
        "the silent watch is restarted",
        ServiceWatch::STALE_AFTER + Duration::from_secs(10),
        || async { watch.errors() >= 1 },
    )
    .await;
    eprintln!("the cut was noticed after {:?}", cut.elapsed());
    proxy.heal();
    let _b = within("register", T, writer.register(inst("b", 2)))
        .await
        .unwrap();
    assert_eq!(next(&mut watch).await, ServiceEvent::Added(inst("b", 2)));
    within("close", T, watcher.close()).await.ok();
    writer.close().await.unwrap();
}
