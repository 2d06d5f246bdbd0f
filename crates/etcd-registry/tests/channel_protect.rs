//! `Registry::channel`: empty-set protection through an etcd restored from
//! a snapshot while a registrant puts its instance again at once.
#![cfg(feature = "channel")]

mod channel_common;
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use channel_common::TestServer;
use etcd_registry::channel::Phase;
use etcd_registry::{Channel, ServiceInstance};
use etcd_registry_testkit::{EtcdServer, eventually, within};

const T: Duration = Duration::from_secs(15);

fn instance(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new("svc", id, "127.0.0.1", port)
}

fn ids(channel: &Channel) -> BTreeSet<String> {
    channel.endpoints().into_iter().map(|e| e.id).collect()
}

fn ready(channel: &Channel, id: &str) -> bool {
    channel
        .endpoints()
        .iter()
        .any(|e| e.id == id && e.phase == Phase::Ready)
}

#[tokio::test(flavor = "current_thread")]
async fn a_restore_with_a_prompt_re_registration_keeps_the_other_instances() {
    let mut etcd = EtcdServer::start().await.unwrap();
    let ns = "restore";
    let snapshot = tempfile::tempdir().unwrap();
    let snapshot = snapshot.path().join("empty.db");
    // The backup predates every instance: restoring it drops them all.
    within("snapshot", T, etcd.save_snapshot(&snapshot))
        .await
        .unwrap();
    let registrant = common::connect_with(common::builder(etcd.endpoints(), ns, 2)).await;
    let client_registry = common::connect_with(common::builder(etcd.endpoints(), ns, 5)).await;
    let servers: Vec<TestServer> = (0..4).map(|_| TestServer::start()).collect();
    // Three written without a lease by a plain client, as instances whose
    // registries are slow to come back would be: only protection keeps them.
    let mut client = etcd.client().await.unwrap();
    let prefix = client_registry.config().key_prefix().to_owned();
    for (i, s) in servers[..3].iter().enumerate() {
        let id = format!("i{i}");
        client
            .put(
                format!("{prefix}/{ns}/services/svc/{id}"),
                instance(&id, s.port).to_json(),
                None,
            )
            .await
            .unwrap();
    }
    // The fourth is registered by a registry that puts it again as soon as
    // it finds its lease gone.
    let _live = registrant
        .register(instance("live", servers[3].port))
        .await
        .unwrap();
    let channel = within(
        "channel",
        T,
        client_registry
            .channel_builder("svc")
            .protect_for(Duration::from_secs(8))
            .build(),
    )
    .await
    .unwrap();
    eventually("4 ready", T, || async {
        ["i0", "i1", "i2", "live"]
            .iter()
            .all(|id| ready(&channel, id))
    })
    .await;

    within(
        "restore",
        Duration::from_secs(30),
        etcd.restore_snapshot(&snapshot),
    )
    .await
    .unwrap();
    // The re-list finds nothing (or only `live`, put again); then `live`
    // comes back. Neither publication may drop the three others before the
    // protection period ends, however the two are coalesced.
    let key = format!("{prefix}/{ns}/services/svc/live");
    eventually("live registered again", T, || async {
        match etcd.client().await {
            Ok(mut c) => c
                .get(key.as_str(), None)
                .await
                .is_ok_and(|r| !r.kvs().is_empty()),
            Err(_) => false,
        }
    })
    .await;
    let mut seen = Vec::new();
    for _ in 0..40 {
        seen.push(ids(&channel));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: BTreeSet<String> = ["i0", "i1", "i2", "live"].map(String::from).into();
    assert!(
        seen.iter().all(|ids| *ids == all),
        "protection let instances go: {seen:?}"
    );
    within("close", T, client_registry.close()).await.ok();
    within("close", T, registrant.close()).await.ok();
}
