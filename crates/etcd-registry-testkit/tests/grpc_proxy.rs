//! `EtcdGrpcProxy` against real etcd processes: in front of a server, a
//! cluster and a fault proxy, with `--namespace`, restarted and dropped.

use std::time::Duration;

use etcd_registry_testkit::{
    Error, EtcdCluster, EtcdGrpcProxy, EtcdServer, FaultProxy, shared_server, unique_name, within,
};

const T: Duration = Duration::from_secs(30);

async fn get(client: &etcd_client::Client, key: &str) -> Option<String> {
    let mut c = client.clone();
    let resp = within("get", T, c.get(key, None)).await.expect("get");
    resp.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

#[tokio::test]
async fn a_proxy_forwards_to_its_server_and_dies_with_its_value() {
    let etcd = shared_server().await;
    let proxy = within("start", T, EtcdGrpcProxy::start(etcd))
        .await
        .unwrap();
    assert_eq!(proxy.upstream(), etcd.endpoints().as_slice());
    assert!(proxy.endpoint().starts_with("http://127.0.0.1:"));
    let key = unique_name("/gp-kit/key");
    let mut through = proxy.client().await.unwrap();
    within("put", T, through.put(key.as_str(), "v", None))
        .await
        .unwrap();
    assert_eq!(
        get(&etcd.client().await.unwrap(), &key).await.as_deref(),
        Some("v")
    );
    // Still up well past the ~5 s after which etcd 3.5's proxy exits when
    // its advertised URL does not answer.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(proxy.is_running(), "{}", proxy.log_tail(20));
    assert_eq!(get(&through, &key).await.as_deref(), Some("v"));

    let pid = proxy.pid().expect("running");
    drop(proxy);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the proxy (pid {pid}) outlived its value"
    );
}

#[tokio::test]
async fn a_namespaced_proxy_prefixes_every_key() {
    let etcd = shared_server().await;
    let tenant = format!("/{}/", unique_name("gp-kit-tenant"));
    let proxy = within(
        "start",
        T,
        EtcdGrpcProxy::builder().namespace(&tenant).start(etcd),
    )
    .await
    .unwrap();
    assert_eq!(proxy.namespace(), Some(tenant.as_str()));
    let mut through = proxy.client().await.unwrap();
    within("put", T, through.put("k", "v", None)).await.unwrap();
    let direct = etcd.client().await.unwrap();
    assert_eq!(
        get(&direct, &format!("{tenant}k")).await.as_deref(),
        Some("v")
    );
    assert_eq!(get(&through, "k").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn a_proxy_in_front_of_a_cluster_or_a_fault_proxy_and_restarted_on_its_port() {
    let cluster = within("cluster", T, EtcdCluster::start(3)).await.unwrap();
    let proxy = within("start", T, EtcdGrpcProxy::start(&cluster))
        .await
        .unwrap();
    assert_eq!(proxy.upstream().len(), 3);
    let mut c = proxy.client().await.unwrap();
    within("put", T, c.put("cluster-key", "1", None))
        .await
        .unwrap();

    let etcd = within("etcd", T, EtcdServer::start()).await.unwrap();
    let link = FaultProxy::start(&etcd.endpoint()).await.unwrap();
    let mut proxy = within("start", T, EtcdGrpcProxy::start(&link))
        .await
        .unwrap();
    let through = proxy.client().await.unwrap();
    let mut c = through.clone();
    within("put", T, c.put("k", "1", None)).await.unwrap();
    link.blackhole();
    let mut c = through.clone();
    let cut_off = tokio::time::timeout(Duration::from_secs(2), c.put("k", "2", None)).await;
    assert!(
        !matches!(cut_off, Ok(Ok(_))),
        "a put through a proxy cut off from etcd succeeded"
    );
    link.heal();

    let (endpoint, pid) = (proxy.endpoint(), proxy.pid());
    within("restart", T, proxy.restart()).await.unwrap();
    assert_eq!(proxy.endpoint(), endpoint);
    assert_ne!(proxy.pid(), pid);
    let fresh = proxy.client().await.unwrap();
    assert!(get(&fresh, "k").await.is_some());
    within("kill", T, proxy.kill()).await.unwrap();
    assert!(!proxy.is_running());
}

#[tokio::test]
async fn the_proxys_own_metrics_count_streams_or_say_they_are_missing() {
    let proxy = within("start", T, EtcdGrpcProxy::start(shared_server().await))
        .await
        .unwrap();
    let mut c = proxy.client().await.unwrap();
    let mut stream = within("watch", T, c.watch("m", None)).await.unwrap();
    // The created notice: the stream is open on the proxy.
    within("created", T, stream.message()).await.unwrap();
    match proxy.streams_started("Watch").await {
        // etcd 3.5 and later.
        Ok(n) => {
            assert!(n >= 1, "{n}");
            assert_eq!(proxy.open_streams("Watch").await.unwrap(), 1);
        }
        // etcd 3.4: the proxy has no metrics of its own.
        Err(Error::Unsupported(why)) => assert!(why.contains("3.5"), "{why}"),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn an_https_upstream_is_refused_by_name() {
    let err = EtcdGrpcProxy::start(&vec!["https://127.0.0.1:1".to_owned()])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("https://127.0.0.1:1")),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_binary_names_scripts_setup() {
    let err = EtcdGrpcProxy::builder()
        .binary("/nonexistent/etcd")
        .start(shared_server().await)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BinaryNotFound { .. }), "{err}");
    assert!(err.to_string().contains("scripts/setup"), "{err}");
}
