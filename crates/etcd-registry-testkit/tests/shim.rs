//! The gRPC shim against real etcd: unary calls pass, open watch streams
//! can be silenced (new ones work), progress requests can be dropped, and
//! calls are counted.

use std::time::Duration;

use etcd_registry_testkit::{EtcdServer, GrpcShim, WATCH_PATH, within};

const STEP: Duration = Duration::from_secs(15);

#[tokio::test]
async fn silenced_watches_stay_open_and_quiet_while_unary_calls_and_new_watches_work() {
    let etcd = within("etcd", STEP, EtcdServer::start()).await.unwrap();
    let shim = GrpcShim::start(&etcd.endpoint()).await.unwrap();
    let mut client = within(
        "connect",
        STEP,
        etcd_client::Client::connect([shim.endpoint()], None),
    )
    .await
    .unwrap();

    // Before silencing: events and progress reports arrive.
    let (mut old_w, mut old) = within("watch", STEP, client.watch("k", None))
        .await
        .unwrap()
        .split();
    let created = within("created", STEP, old.message()).await.unwrap();
    assert!(created.is_some_and(|r| r.created()));
    client.put("k", "1", None).await.unwrap();
    let event = within("event", STEP, old.message()).await.unwrap().unwrap();
    assert_eq!(event.events().len(), 1);
    old_w.request_progress().await.unwrap();
    let progress = within("progress", STEP, old.message())
        .await
        .unwrap()
        .unwrap();
    assert!(progress.events().is_empty() && !progress.created());

    shim.silence_watches();
    client.put("k", "2", None).await.unwrap();
    // Unary calls pass.
    let got = within("get", STEP, client.get("k", None)).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"2");
    // A watch opened now works, and sees the put as of its start revision.
    let rev = got.header().map_or(0, |h| h.revision());
    let options = etcd_client::WatchOptions::new().with_start_revision(rev);
    let (_new_w, mut new) = within("watch", STEP, client.watch("k", Some(options)))
        .await
        .unwrap()
        .split();
    let created = within("created", STEP, new.message()).await.unwrap();
    assert!(created.is_some_and(|r| r.created()));
    let event = within("event", STEP, new.message()).await.unwrap().unwrap();
    assert_eq!(event.events().len(), 1);
    // The silenced stream is open (it does not end) and hears nothing.
    let quiet = tokio::time::timeout(Duration::from_secs(2), old.message()).await;
    assert!(quiet.is_err(), "the silenced stream said {quiet:?}");
    assert!(shim.swallowed() >= 1);
    assert_eq!(shim.calls(WATCH_PATH), 2);
    assert!(shim.calls("/etcdserverpb.KV/Range") >= 1);
    assert!(shim.calls("/etcdserverpb.KV/Put") >= 2);

    // Dropped progress requests go unanswered; events still arrive.
    shim.drop_progress_requests();
    let (mut w, mut stream) = within("watch", STEP, client.watch("p", None))
        .await
        .unwrap()
        .split();
    let created = within("created", STEP, stream.message()).await.unwrap();
    assert!(created.is_some_and(|r| r.created()));
    w.request_progress().await.unwrap();
    client.put("p", "1", None).await.unwrap();
    let next = within("event", STEP, stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next.events().len(),
        1,
        "a progress report arrived: {next:?}"
    );
}
