//! The testkit against real etcd processes.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_registry_testkit::{
    Error, EtcdCluster, EtcdServer, FaultProxy, ProxyMode, shared_server, unique_name,
};
use tokio::time::{Instant, timeout};

/// Upper bound for any single await that should complete promptly.
const STEP: Duration = Duration::from_secs(15);

/// Awaits `fut`, failing the test if it takes longer than [`STEP`].
async fn step<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {STEP:?}"),
    }
}

/// Retries `f` (each attempt limited to 2 s) until it succeeds or `limit` passes.
async fn eventually<T, E: Debug, Fut>(what: &str, limit: Duration, mut f: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match timeout(Duration::from_secs(2), f()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => format!("{e:?}"),
            Err(_) => "attempt timed out".to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "{what}: still failing after {limit:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of `key`, or `None`, read with retries (the client may still be reconnecting).
async fn read(client: &Client, key: &str) -> Option<String> {
    let resp = eventually("get", Duration::from_secs(10), || {
        let mut c = client.clone();
        let key = key.to_string();
        async move { c.get(key, None).await }
    })
    .await;
    resp.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

async fn put(client: &Client, key: &str, value: &str) {
    eventually("put", Duration::from_secs(10), || {
        let mut c = client.clone();
        let (key, value) = (key.to_string(), value.to_string());
        async move { c.put(key, value, None).await }
    })
    .await;
}

async fn start_server() -> EtcdServer {
    match EtcdServer::start().await {
        Ok(s) => s,
        Err(e) => panic!("start etcd: {e}"),
    }
}

#[tokio::test]
async fn restart_keeps_data_and_ports() {
    let mut etcd = start_server().await;
    let endpoint = etcd.endpoint();
    let client = step("client", etcd.client()).await.unwrap();
    put(&client, "kept", "yes").await;

    step("restart", etcd.restart()).await.unwrap();

    assert!(etcd.is_running());
    assert_eq!(etcd.endpoint(), endpoint);
    assert_eq!(read(&client, "kept").await.as_deref(), Some("yes"));
    assert!(
        etcd.log_tail(200)
            .matches("etcd-registry-testkit: starting")
            .count()
            >= 2
    );
}

#[tokio::test]
async fn wiped_restart_loses_data() {
    let mut etcd = start_server().await;
    let client = step("client", etcd.client()).await.unwrap();
    put(&client, "doomed", "1").await;

    step("restart_wiped", etcd.restart_wiped()).await.unwrap();

    assert_eq!(read(&client, "doomed").await, None);
    let resp = step(
        "get",
        client
            .clone()
            .get("", Some(GetOptions::new().with_all_keys())),
    )
    .await
    .unwrap();
    assert_eq!(resp.count(), 0, "a wiped server has no keys");
    assert_eq!(
        resp.header().map(|h| h.revision()),
        Some(1),
        "a new cluster starts at revision 1"
    );
    // The log survives the wipe and covers both starts.
    assert!(
        etcd.log_tail(1000)
            .matches("etcd-registry-testkit: starting")
            .count()
            >= 2
    );
}

#[tokio::test]
async fn kill_then_restart() {
    let mut etcd = start_server().await;
    let pid = etcd.pid().expect("running server has a pid");
    let client = step("client", etcd.client()).await.unwrap();
    put(&client, "survivor", "here").await;

    step("kill", etcd.kill()).await.unwrap();
    assert!(!etcd.is_running());
    assert_eq!(etcd.pid(), None);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "killed process is reaped"
    );
    let down = timeout(Duration::from_secs(2), client.clone().get("survivor", None)).await;
    assert!(!matches!(down, Ok(Ok(_))), "a killed server cannot answer");

    step("restart", etcd.restart()).await.unwrap();
    assert_ne!(etcd.pid(), Some(pid));
    assert_eq!(read(&client, "survivor").await.as_deref(), Some("here"));
}

#[tokio::test]
async fn paused_server_does_not_answer_until_resumed() {
    let etcd = start_server().await;
    let client = step("client", etcd.client()).await.unwrap();
    put(&client, "k", "v").await;

    etcd.pause().unwrap();
    assert!(etcd.is_paused() && etcd.is_running());
    let frozen = timeout(Duration::from_millis(500), client.clone().get("k", None)).await;
    assert!(
        frozen.is_err(),
        "request to a paused server must hang, got {frozen:?}"
    );

    etcd.resume().unwrap();
    assert!(!etcd.is_paused());
    assert_eq!(read(&client, "k").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn cluster_keeps_serving_after_leader_is_killed() {
    let mut cluster = match EtcdCluster::start(3).await {
        Ok(c) => c,
        Err(e) => panic!("start cluster: {e}"),
    };
    assert_eq!(cluster.len(), 3);
    assert_eq!(cluster.endpoints().len(), 3);
    let client = step("client", Client::connect(cluster.endpoints(), None))
        .await
        .unwrap();
    put(&client, "before", "1").await;

    let old = step("leader", cluster.leader()).await.unwrap();
    step("kill leader", cluster.member_mut(old).kill())
        .await
        .unwrap();
    let new = step(
        "new leader",
        cluster.wait_for_leader(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_ne!(old, new);
    assert!(cluster.member(new).is_running());

    // The client may try the dead endpoint first; `put` retries.
    put(&client, "after", "2").await;
    let leader_client = step("client", cluster.member(new).client()).await.unwrap();
    assert_eq!(read(&leader_client, "after").await.as_deref(), Some("2"));

    // The old leader rejoins with its data and catches up.
    step("restart old leader", cluster.member_mut(old).restart())
        .await
        .unwrap();
    let rejoined = step("client", cluster.member(old).client()).await.unwrap();
    assert_eq!(read(&rejoined, "after").await.as_deref(), Some("2"));
    assert_eq!(read(&rejoined, "before").await.as_deref(), Some("1"));
    assert!(matches!(
        step("wipe member", cluster.member_mut(old).restart_wiped()).await,
        Err(Error::Unsupported(_))
    ));
}

#[tokio::test]
async fn blackholed_proxy_times_out_until_healed() {
    let etcd = start_server().await;
    let proxy = step("proxy", FaultProxy::start(&etcd.endpoint()))
        .await
        .unwrap();
    let client = step("client", Client::connect([proxy.endpoint()], None))
        .await
        .unwrap();
    put(&client, "through-proxy", "ok").await;

    proxy.blackhole();
    assert_eq!(proxy.mode(), ProxyMode::Blackhole);
    let cut = timeout(
        Duration::from_secs(2),
        client.clone().get("through-proxy", None),
    )
    .await;
    assert!(cut.is_err(), "a blackholed request must hang, got {cut:?}");

    proxy.heal();
    assert_eq!(proxy.mode(), ProxyMode::Pass);
    assert_eq!(read(&client, "through-proxy").await.as_deref(), Some("ok"));
}

#[tokio::test]
async fn proxy_reset_ends_watch_stream() {
    let etcd = start_server().await;
    let proxy = step("proxy", FaultProxy::start(&etcd.endpoint()))
        .await
        .unwrap();
    let via_proxy = step("client", Client::connect([proxy.endpoint()], None))
        .await
        .unwrap();
    let direct = step("client", etcd.client()).await.unwrap();

    let mut stream = eventually("watch", Duration::from_secs(10), || {
        let mut c = via_proxy.clone();
        async move { c.watch("watched", None).await }
    })
    .await;
    let created = step("watch created", stream.message())
        .await
        .unwrap()
        .expect("stream open");
    assert!(created.created());
    put(&direct, "watched", "1").await;
    let event = step("first event", stream.message())
        .await
        .unwrap()
        .expect("stream open");
    assert_eq!(event.events().len(), 1, "the watch works before the reset");

    proxy.reset();
    match step("stream end", stream.message()).await {
        Err(_) | Ok(None) => {}
        Ok(Some(resp)) => panic!("watch stream survived a reset: {resp:?}"),
    }
    // New connections are accepted normally.
    put(&via_proxy, "watched", "2").await;
    assert_eq!(read(&via_proxy, "watched").await.as_deref(), Some("2"));
}

#[tokio::test]
async fn missing_binary_error_says_what_to_do() {
    let err = EtcdServer::builder()
        .binary("/nonexistent/etcd-registry-testkit/etcd")
        .start()
        .await
        .expect_err("no such binary");
    assert!(matches!(err, Error::BinaryNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("scripts/setup"), "{msg}");
    assert!(msg.contains("ETCD_BIN"), "{msg}");
    assert!(
        msg.contains("/nonexistent/etcd-registry-testkit/etcd"),
        "{msg}"
    );
}

#[tokio::test]
async fn failed_start_reports_log_tail() {
    let err = EtcdServer::builder()
        .arg("--no-such-flag")
        .start()
        .await
        .expect_err("etcd rejects unknown flags");
    assert!(matches!(err, Error::Exited { .. }), "{err:?}");
    assert!(
        err.to_string().contains("no-such-flag"),
        "log tail missing: {err}"
    );
}

#[tokio::test]
async fn shared_server_is_started_once() {
    let a = shared_server().await;
    let b = shared_server().await;
    assert!(std::ptr::eq(a, b));
    assert_eq!(a.endpoint(), b.endpoint());

    let ns = unique_name("ns");
    assert!(!ns.contains('/'));
    assert_ne!(ns, unique_name("ns"));
    let client = step("client", a.client()).await.unwrap();
    put(&client, &format!("/{ns}/k"), "v").await;
    assert_eq!(
        read(&client, &format!("/{ns}/k")).await.as_deref(),
        Some("v")
    );
}

#[tokio::test]
async fn metrics_and_etcdctl_reach_the_server() {
    let etcd = shared_server().await;
    let metrics = step("metrics", etcd.metrics()).await.unwrap();
    assert!(
        metrics.contains("etcd_server_has_leader 1"),
        "unexpected metrics"
    );

    let key = format!("/{}/ctl", unique_name("ns"));
    let out = step(
        "etcdctl put",
        etcd.etcdctl().args(["put", &key, "from-ctl"]).output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = step("client", etcd.client()).await.unwrap();
    assert_eq!(read(&client, &key).await.as_deref(), Some("from-ctl"));
}

#[tokio::test]
async fn drop_kills_process_and_removes_directory() {
    let etcd = start_server().await;
    let pid = etcd.pid().expect("running");
    let data = etcd.data_dir();
    assert!(data.exists());
    drop(etcd);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process is gone and reaped"
    );
    assert!(!data.exists(), "temporary directory is removed");
}

#[tokio::test]
async fn open_streams_counts_a_clients_watch_until_it_is_dropped() {
    // A server of its own: no other test's streams are counted.
    let etcd = step("start", EtcdServer::start()).await.unwrap();
    assert_eq!(
        step("metrics", etcd.open_streams("Watch")).await.unwrap(),
        0
    );
    let mut client = step("client", etcd.client()).await.unwrap();
    let watch = step("watch", client.watch("k", None)).await.unwrap();
    etcd_registry_testkit::eventually("the watch stream is counted", STEP, || async {
        etcd.open_streams("Watch").await.is_ok_and(|n| n == 1)
    })
    .await;
    assert_eq!(etcd.open_streams("LeaseKeepAlive").await.unwrap(), 0);
    drop(watch);
    etcd_registry_testkit::eventually("the dropped stream is no longer counted", STEP, || async {
        etcd.open_streams("Watch").await.is_ok_and(|n| n == 0)
    })
    .await;
}
