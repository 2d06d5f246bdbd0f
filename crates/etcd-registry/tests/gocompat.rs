//! Joining deployments of the Go library (github.com/jackman0925/discovery)
//! as they are: its key layout for every prefix and namespace it accepts,
//! every value it can write, faithful re-encoding, reclaiming a key after a
//! take-over ends, and leader failover after a crash.
//!
//! The Go side is played by a raw etcd client writing exactly what Go writes:
//! `fmt.Sprintf("%s/%s/services/%s/%s", prefix, namespace, name, id)` holding
//! `json.Marshal(ServiceInfo)` under the Go process's own lease.

use std::process::Stdio;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use etcd_registry::{Registry, ServiceInstance};
use etcd_registry_testkit::{EtcdServer, eventually, shared_server, unique_name, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

mod common;

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(30);

/// The bytes Go's `json.Marshal` writes for a `ServiceInfo`.
fn go_value(name: &str, id: &str, port: &str, metadata: &str) -> String {
    format!(
        r#"{{"name":"{name}","id":"{id}","address":"10.0.0.1","port":"{port}","version":"","weight":0,"metadata":{metadata}}}"#
    )
}

/// A Go process: its own lease (kept alive by nobody: the tests let it
/// expire or revoke it) and a put of `value` at `key` under it.
async fn go_put(client: &Client, key: &str, value: &str, lease: i64) {
    let mut c = client.clone();
    within(
        "go put",
        T,
        c.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await
    .unwrap();
}

async fn grant(client: &Client, ttl: i64) -> i64 {
    let mut c = client.clone();
    within("grant", T, c.lease_grant(ttl, None))
        .await
        .unwrap()
        .id()
}

/// The stored (value, lease) of `key`, if any.
async fn stored(client: &Client, key: &str) -> Option<(String, i64)> {
    let mut c = client.clone();
    let resp = within("get", T, c.get(key, None)).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
}

async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let mut c = client.clone();
    let opts = GetOptions::new().with_prefix().with_keys_only();
    let resp = within("get", T, c.get(prefix, Some(opts))).await.unwrap();
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

async fn connect(server: &EtcdServer, prefix: &str, namespace: &str, ttl: u64) -> Registry {
    common::connect_with(common::builder(server.endpoints(), namespace, ttl).key_prefix(prefix))
        .await
}

#[tokio::test]
async fn every_prefix_and_namespace_go_accepts_is_joined_with_gos_keys() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("gokeys");
    let go_lease = grant(&client, 60).await;
    // Go composes keys by plain concatenation: a trailing slash doubles, an
    // empty prefix starts at the namespace, a '/' in the namespace nests.
    for (prefix, namespace) in [
        ("/etcd_registry/".to_owned(), ns.clone()),
        (String::new(), ns.clone()),
        ("/etcd_registry".to_owned(), format!("{ns}/team/a")),
    ] {
        let root = format!("{prefix}/{namespace}");
        let go_key = format!("{root}/services/web/go-1");
        go_put(
            &client,
            &go_key,
            &go_value("web", "go-1", "8080", "null"),
            go_lease,
        )
        .await;

        let reg = connect(server, &prefix, &namespace, 10).await;
        let mine = reg
            .register(ServiceInstance::new("web", "rs-1", "10.0.0.2", 9090))
            .await
            .unwrap();
        assert_eq!(mine.key(), format!("{root}/services/web/rs-1"));
        let mut ids: Vec<String> = within("list", T, reg.instances("web"))
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            ["go-1", "rs-1"],
            "prefix {prefix:?}, namespace {namespace:?}"
        );

        // Elections: Go's concurrency.NewElection(session, "{root}/elections/{name}").
        let leadership = within("campaign", T, reg.election("job").unwrap().campaign("p"))
            .await
            .unwrap();
        assert_eq!(
            keys_under(&client, &format!("{root}/elections/job/")).await,
            [leadership.key().to_owned()]
        );
        within("close", T, reg.close()).await.unwrap();
    }
    // The nested namespace is not listed as part of its parent: "{ns}" sees nothing.
    let parent = connect(server, "/etcd_registry", &ns, 10).await;
    assert!(
        within("list", T, parent.all_instances())
            .await
            .unwrap()
            .is_empty()
    );
    within("close", T, parent.close()).await.unwrap();
    let mut c = client.clone();
    within("revoke", T, c.lease_revoke(go_lease)).await.unwrap();
}

#[tokio::test]
async fn every_value_go_writes_is_listed_and_written_back_byte_for_byte() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("govalues");
    let root = format!("/etcd_registry/{ns}/services/web/");
    let go_lease = grant(&client, 60).await;
    // (id, port, metadata): Go's Port is a free string; an empty non-nil map is {}.
    let values = [
        ("empty-port", "", "null"),
        ("named-port", "http", "null"),
        ("big-port", "70000", "null"),
        ("empty-meta", "8080", "{}"),
        ("escaped", "8080", r#"{"q":"a\u003cb\u003e \u0026"}"#),
    ];
    for (id, port, meta) in values {
        go_put(
            &client,
            &format!("{root}{id}"),
            &go_value("web", id, port, meta),
            go_lease,
        )
        .await;
    }
    // Go writes any id, '/' included; its value names the key exactly.
    let slash_key = format!("{root}a/b");
    go_put(
        &client,
        &slash_key,
        &go_value("web", "a/b", "1", "null"),
        go_lease,
    )
    .await;

    let reg = connect(server, "/etcd_registry", &ns, 10).await;
    let listed = within("list", T, reg.instances("web")).await.unwrap();
    let cache = within("cache", T, reg.cache("web")).await.unwrap();
    assert_eq!(listed.len(), values.len() + 1, "{listed:?}");
    assert_eq!(cache.instances().len(), values.len() + 1);
    for (id, port, _) in values {
        let inst = listed.iter().find(|i| i.id == id).unwrap();
        assert_eq!(inst.port.as_str(), port);
    }
    let by_id = |id: &str| listed.iter().find(|i| i.id == id).unwrap().clone();
    assert_eq!(by_id("named-port").port.number(), None);
    assert_eq!(by_id("empty-meta").port.number(), Some(8080));
    assert_eq!(by_id("escaped").metadata["q"], "a<b> &");
    assert_eq!(by_id("a/b").port.number(), Some(1));

    // Read and written back (here: taken over by this registry) keeps Go's bytes.
    for id in ["empty-meta", "escaped", "named-port"] {
        let reg_of_it = reg.register(by_id(id)).await.unwrap();
        let (value, lease) = stored(&client, reg_of_it.key()).await.unwrap();
        assert_eq!(lease, reg.lease_id().unwrap());
        let (_, port, meta) = values.iter().find(|v| v.0 == id).unwrap();
        assert_eq!(value, go_value("web", id, port, meta));
    }
    within("close", T, reg.close()).await.unwrap();
    let mut c = client.clone();
    within("revoke", T, c.lease_revoke(go_lease)).await.unwrap();
}

#[tokio::test]
async fn a_yielded_registration_reclaims_its_key_once_the_other_owner_is_gone() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("reclaim");
    let reg = connect(server, "/etcd_registry", &ns, 10).await;
    let mine = reg
        .register(ServiceInstance::new("web", "1", "10.0.0.2", 9090))
        .await
        .unwrap();
    let key = mine.key().to_owned();
    let my_value = String::from_utf8(mine.instance().to_json()).unwrap();
    let my_lease = reg.lease_id().unwrap();
    let is_mine = || async { stored(&client, &key).await == Some((my_value.clone(), my_lease)) };
    // Barrier: a sentinel key, deleted and restored, proves the anti-entropy
    // watch has handled every change made before it.
    let sentinel = reg
        .register(ServiceInstance::new("web", "sentinel", "10.0.0.2", 1))
        .await
        .unwrap();
    let barrier = || async {
        let mut c = client.clone();
        within("delete", T, c.delete(sentinel.key(), None))
            .await
            .unwrap();
        eventually("the sentinel is restored", T, || async {
            stored(&client, sentinel.key()).await.is_some()
        })
        .await;
    };

    // 1. A Go process takes the id over under its live lease: we yield, and
    //    keep yielding across its updates.
    let theirs = go_value("web", "1", "8080", "null");
    let go_lease = grant(&client, 60).await;
    go_put(&client, &key, &theirs, go_lease).await;
    barrier().await;
    go_put(
        &client,
        &key,
        &go_value("web", "1", "8081", "null"),
        go_lease,
    )
    .await;
    barrier().await;
    assert_eq!(
        stored(&client, &key).await.map(|(_, l)| l),
        Some(go_lease),
        "a key held by another live lease must stay yielded"
    );

    // 2. The Go process deletes its key (or exits and revokes): we reclaim it.
    let mut c = client.clone();
    within("delete", T, c.delete(key.as_str(), None))
        .await
        .unwrap();
    eventually("reclaimed after a delete", T, is_mine).await;

    // 3. Taken over again, by a lease that nobody keeps alive: when it
    //    expires with the key, we reclaim it.
    let short = grant(&client, 2).await;
    go_put(&client, &key, &theirs, short).await;
    barrier().await;
    if stored(&client, &key).await.map(|(_, l)| l) != Some(short) {
        // Only if the short lease is already gone (a slow barrier) may it be ours again.
        let ttl = within("ttl", T, c.lease_time_to_live(short, None))
            .await
            .unwrap();
        assert!(ttl.ttl() < 0, "a key held by a live lease was taken back");
    }
    let took = eventually("reclaimed after the other lease expired", T, is_mine).await;
    // Removing the reclaim (a yielded key staying yielded when deleted, as
    // before this change) made steps 2 and 3 time out: checked by hand.
    eprintln!("reclaimed {took:?} after the take-over by a 2 s lease");
    within("close", T, reg.close()).await.unwrap();
    within("revoke", T, c.lease_revoke(go_lease)).await.unwrap();
}

const CHILD_ENDPOINTS: &str = "GOCOMPAT_CHILD_ENDPOINTS";
const CHILD_NAMESPACE: &str = "GOCOMPAT_CHILD_NAMESPACE";

/// Not a test of its own: the leader process of
/// `a_killed_leaders_successor_wins_within_ttl_plus_one_second`, which runs
/// this test binary again with only this (ignored) test selected.
#[tokio::test]
#[ignore = "run as a child process by a_killed_leaders_successor_wins_within_ttl_plus_one_second"]
async fn child_leader_process() {
    let (Ok(endpoints), Ok(namespace)) = (
        std::env::var(CHILD_ENDPOINTS),
        std::env::var(CHILD_NAMESPACE),
    ) else {
        return;
    };
    let reg = common::connect_with(
        Registry::builder()
            .endpoints(endpoints.split(','))
            .namespace(namespace),
    )
    .await;
    let leadership = within(
        "campaign",
        T,
        reg.election("cron").unwrap().campaign("child"),
    )
    .await
    .unwrap();
    println!("LEADING {}", leadership.fencing_token());
    // Held until the parent kills this process; bounded in case it does not.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn a_killed_leaders_successor_wins_within_ttl_plus_one_second() {
    let server = shared_server().await;
    let ns = unique_name("failover");
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_leader_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENDPOINTS, server.endpoints().join(","))
        .env(CHILD_NAMESPACE, &ns)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    within("the child leads", Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("LEADING") {
                return;
            }
        }
        panic!("the child exited without leading");
    })
    .await;

    // The successor uses the default TTL too; what matters is the child's.
    let reg = common::connect_with(
        Registry::builder()
            .endpoints(server.endpoints())
            .namespace(&ns),
    )
    .await;
    let ttl = reg.config().ttl();
    let election = reg.election("cron").unwrap();
    let campaign = tokio::spawn(async move { election.campaign("successor").await });
    // It is queued behind the child, not leading.
    let waiting = tokio::time::timeout(Duration::from_millis(500), async {
        while !campaign.is_finished() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    assert!(
        waiting.is_err(),
        "the successor must wait while the child leads"
    );

    child.start_kill().unwrap(); // SIGKILL: no resign, no revoke
    let killed = Instant::now();
    within("child exits", T, child.wait()).await.unwrap();
    let leadership = within("successor wins", ttl * 3, campaign)
        .await
        .unwrap()
        .unwrap();
    let took = killed.elapsed();
    eprintln!("successor won {took:?} after the leader was SIGKILLed (TTL {ttl:?})");
    // The lease expires between 2/3 TTL (just after a keep-alive) and TTL after the kill.
    assert!(
        took >= ttl * 2 / 3 - Duration::from_millis(300),
        "won after {took:?}: the key must have expired, not been deleted"
    );
    assert!(
        took <= ttl + Duration::from_secs(1),
        "successor won after {took:?}, over TTL {ttl:?} + 1 s"
    );
    assert!(leadership.is_leader());
    within("close", T, reg.close()).await.unwrap();
}
