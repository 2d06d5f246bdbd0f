//! `etcd-registry ui`: the JSON API and the event stream, read with a plain
//! HTTP client against real etcd.

mod common;
mod ui_common;

use std::time::Duration;

use etcd_registry::{Registry, ServiceInstance};
use etcd_registry_testkit::{EtcdServer, eventually, unique_name, within};
use serde_json::Value;

use common::{Ctx, STEP, bare_command};
use ui_common::{Dashboard, get_json, ids, request};

/// Bound of a condition polled through the API.
const SEEN: Duration = Duration::from_secs(20);

fn instance(service: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(service, id, "10.0.0.7", port)
        .with_version("1.0.2")
        .with_metadata("zone", "eu-1")
}

fn service_count(services: &Value, name: &str) -> Option<u64> {
    services
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["instances"].as_u64())
}

async fn dashboard(ctx: &Ctx) -> Dashboard {
    let cmd = ctx.command(&["ui", "--listen", "127.0.0.1:0"]);
    Dashboard::start(cmd, "ui").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_a_snapshot_then_streams_adds_updates_removes_and_leader_changes() {
    let ctx = Ctx::new("ui-api").await;
    let registry = ctx.registry().await;
    let rival = ctx.registry().await;
    let _web1 = registry
        .register(instance("web", "web-1", 8080))
        .await
        .unwrap();
    let web2 = registry
        .register(instance("web", "web-2", 8081))
        .await
        .unwrap();
    let _api1 = registry
        .register(instance("api", "api-1", 9000))
        .await
        .unwrap();
    let first = within(
        "node-a wins",
        STEP,
        registry.election("cron").unwrap().campaign("node-a"),
    )
    .await
    .unwrap();
    let rival_election = rival.election("cron").unwrap();
    let second = tokio::spawn(async move { rival_election.campaign("node-b").await });

    let ui = dashboard(&ctx).await;

    // The snapshot, through the JSON API.
    eventually("both services with their counts", SEEN, || async {
        let services = ui.get("/api/services").await.1;
        service_count(&services, "web") == Some(2) && service_count(&services, "api") == Some(1)
    })
    .await;
    let services = ui.get("/api/services").await.1;
    assert_eq!(services.as_array().unwrap().len(), 2, "{services}");
    assert_eq!(services[0]["namespace"], ctx.ns.as_str());
    let (status, web) = ui.get("/api/services/web").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&web["instances"]), ["web-1", "web-2"]);
    let web1 = &web["instances"][0];
    assert_eq!(web1["address"], "10.0.0.7");
    assert_eq!(web1["port"], 8080);
    assert_eq!(web1["version"], "1.0.2");
    assert_eq!(web1["metadata"]["zone"], "eu-1");
    // Present before the dashboard started: its age is a lower bound.
    assert_eq!(web1["since_ms"], Value::Null);
    // The create revision comes from a keys-only read that follows the snapshot.
    eventually("create revisions and leases", SEEN, || async {
        let web = ui.get("/api/services/web").await.1;
        web["instances"].as_array().is_some_and(|a| {
            a.iter().all(|i| {
                i["create_revision"].as_i64().is_some_and(|r| r > 0)
                    && i["lease"] == format!("{:x}", registry.lease_id().unwrap()).as_str()
            })
        })
    })
    .await;
    let (status, missing) = ui.get("/api/services/nope").await;
    assert_eq!(status, 404, "{missing}");

    eventually("the election with its leader", SEEN, || async {
        let elections = ui.get("/api/elections").await.1;
        elections[0]["leader"]["proposal"] == "node-a" && elections[0]["candidates"] == 2
    })
    .await;
    let elections = ui.get("/api/elections").await.1;
    assert_eq!(elections[0]["name"], "cron");
    assert_eq!(
        elections[0]["leader"]["fencing_token"],
        first.fencing_token()
    );
    assert_eq!(
        elections[0]["leader"]["lease"],
        format!("{:x}", first.lease_id()).as_str()
    );

    // Read-only: no method but GET is routed.
    for method in ["POST", "PUT", "DELETE"] {
        let (status, _) = request(method, &ui.url("/api/services/web")).await;
        assert_eq!(status, 405, "{method} /api/services/web");
    }

    // The event stream: the snapshot first...
    let mut events = ui.events().await;
    let (name, snapshot) = events.next().await;
    assert_eq!(name, "snapshot");
    assert_eq!(ids(&snapshot["instances"]), ["api-1", "web-1", "web-2"]);
    assert_eq!(snapshot["elections"][0]["leader"]["proposal"], "node-a");
    assert_eq!(
        snapshot["connection"]["endpoints"][0]["endpoint"],
        ctx.etcd.endpoint().as_str()
    );

    // ...then each change as it happens.
    let mut web3 = registry
        .register(instance("web", "web-3", 8082))
        .await
        .unwrap();
    let added = events
        .until("added web-3", SEEN, |name, d| {
            (name == "added").then(|| d.clone())
        })
        .await;
    assert_eq!(added["id"], "web-3");
    assert_eq!(added["port"], 8082);
    assert!(
        added["since_ms"].as_u64().is_some(),
        "an instance seen arriving has an exact age: {added}"
    );

    web3.update(instance("web", "web-3", 8082).with_version("2.0.0"))
        .await
        .unwrap();
    let updated = events
        .until("updated web-3", SEEN, |name, d| {
            (name == "updated").then(|| d.clone())
        })
        .await;
    assert_eq!(updated["id"], "web-3");
    assert_eq!(updated["version"], "2.0.0");
    // An update keeps the key's age.
    assert_eq!(updated["since_ms"], added["since_ms"]);

    web2.deregister().await.unwrap();
    let removed = events
        .until("removed web-2", SEEN, |name, d| {
            (name == "removed").then(|| d.clone())
        })
        .await;
    assert_eq!(removed["id"], "web-2");

    first.resign().await.unwrap();
    let successor = within("node-b wins after the resign", STEP, second)
        .await
        .unwrap()
        .unwrap();
    let changed = events
        .until("the new leader", SEEN, |name, d| {
            (name == "election" && d["leader"]["proposal"] == "node-b").then(|| d.clone())
        })
        .await;
    assert_eq!(
        changed["leader"]["fencing_token"],
        successor.fencing_token()
    );
    assert!(successor.fencing_token() > first.fencing_token());

    // The API agrees with the stream.
    let web = ui.get("/api/services/web").await.1;
    assert_eq!(ids(&web["instances"]), ["web-1", "web-3"]);

    successor.resign().await.unwrap();
    let none = events
        .until("no leader", SEEN, |name, d| {
            (name == "election" && d["leader"].is_null()).then(|| d.clone())
        })
        .await;
    assert_eq!(none["name"], "cron");

    ui.stop().await;
    rival.close().await.unwrap();
    registry.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_state_reports_a_lost_etcd_and_recovers_by_itself() {
    // Its own etcd: this test stops it.
    let mut etcd = EtcdServer::builder().name("ui-loss").start().await.unwrap();
    let ns = unique_name("ui-loss");
    let mut cmd = bare_command();
    cmd.args(["--endpoints", &etcd.endpoint(), "--namespace", &ns])
        .args(["--dial-timeout", "1s", "ui", "--listen", "127.0.0.1:0"]);
    let ui = Dashboard::start(cmd, "ui").await;

    let status = || async { ui.get("/api/status").await.1 };
    eventually("connected", SEEN, || async {
        status().await["connected"] == true
    })
    .await;
    let before = status().await;
    assert_eq!(before["lost_since_ms"], Value::Null);
    assert_eq!(before["endpoints"][0]["reachable"], true);

    // Checked against a mutant that always counted etcd as connected: this fails.
    within("stopping etcd", STEP, etcd.stop()).await.unwrap();
    eventually("the loss is shown", SEEN, || async {
        let s = status().await;
        s["connected"] == false && s["lost_since_ms"].as_u64().is_some()
    })
    .await;
    let lost = status().await;
    assert_eq!(lost["endpoints"][0]["reachable"], false, "{lost}");

    within("restarting etcd", STEP, etcd.restart())
        .await
        .unwrap();
    eventually("recovered by itself", SEEN, || async {
        let s = status().await;
        s["connected"] == true && s["lost_since_ms"].is_null()
    })
    .await;

    // The watch recovered too: a registration made now shows up.
    let registry = within(
        "connect",
        STEP,
        Registry::builder()
            .endpoints(etcd.endpoints())
            .namespace(&ns)
            .connect(),
    )
    .await
    .unwrap();
    let _reg = registry
        .register(instance("web", "after", 8080))
        .await
        .unwrap();
    eventually("the instance registered after the outage", SEEN, || async {
        service_count(&ui.get("/api/services").await.1, "web") == Some(1)
    })
    .await;

    ui.stop().await;
    registry.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_namespaces_follows_every_namespace_including_new_ones() {
    let etcd = etcd_registry_testkit::shared_server().await;
    // A prefix of its own keeps the other tests' namespaces out of view.
    let prefix = format!("/{}", unique_name("ui-all"));
    let connect = |ns: &str| {
        Registry::builder()
            .endpoints(etcd.endpoints())
            .key_prefix(&prefix)
            .namespace(ns)
            .connect()
    };
    let prod = within("connect", STEP, connect("prod")).await.unwrap();
    let _p = prod.register(instance("web", "p-1", 8080)).await.unwrap();
    let staging = within("connect", STEP, connect("staging")).await.unwrap();
    let _s = staging
        .register(instance("web", "s-1", 8080))
        .await
        .unwrap();

    let mut cmd = bare_command();
    cmd.args(["--endpoints", &etcd.endpoint(), "--prefix", &prefix])
        .args(["ui", "--all-namespaces", "--listen", "127.0.0.1:0"]);
    let ui = Dashboard::start(cmd, "ui").await;

    let namespaces_of_web = || async {
        let web = ui.get("/api/services/web").await.1;
        let mut ns: Vec<String> = web["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["namespace"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        ns.sort();
        ns
    };
    eventually("both namespaces", SEEN, || async {
        namespaces_of_web().await == ["prod", "staging"]
    })
    .await;
    let (status, only) = ui.get("/api/services/web?namespace=staging").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&only["instances"]), ["s-1"]);

    // A namespace that appears later is found by itself.
    let dev = within("connect", STEP, connect("dev")).await.unwrap();
    let _d = dev.register(instance("web", "d-1", 8080)).await.unwrap();
    eventually("the new namespace", SEEN, || async {
        namespaces_of_web().await == ["dev", "prod", "staging"]
    })
    .await;

    ui.stop().await;
    for r in [prod, staging, dev] {
        r.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_warns_and_namespace_options_exclude_each_other() {
    let ctx = Ctx::new("ui-listen").await;
    let mut ui = Dashboard::start(ctx.command(&["ui", "--listen", "0.0.0.0:0"]), "ui").await;
    // Served on every address, so on loopback too; the test talks to loopback only.
    let port = ui.base.rsplit(':').next().unwrap().to_owned();
    let (status, _) = get_json(&format!("http://127.0.0.1:{port}/api/services")).await;
    assert_eq!(status, 200);
    ui.process.sigterm();
    let exit = ui.process.exit().await;
    let stderr = ui.process.stderr().await;
    assert!(exit.success(), "{exit}: {stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("no authentication"),
        "stderr: {stderr}"
    );

    let mut both = bare_command();
    both.args(["--namespace", "x", "ui", "--all-namespaces"]);
    let out = common::run(both, &["ui --namespace --all-namespaces"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_show_their_holder_and_waiters_and_go_when_released() {
    let ctx = Ctx::new("ui-locks").await;
    let registry = ctx.registry().await;
    let rival = ctx.registry().await;
    let held = within(
        "lock",
        STEP,
        registry.lock("db-migrations").unwrap().acquire(),
    )
    .await
    .unwrap();
    let rival_lock = rival.lock("db-migrations").unwrap();
    let waiting = tokio::spawn(async move { rival_lock.acquire().await });

    let ui = dashboard(&ctx).await;
    eventually("the holder and one waiter", SEEN, || async {
        let locks = ui.get("/api/locks").await.1;
        locks[0]["name"] == "db-migrations" && locks[0]["waiters"] == 1
    })
    .await;
    let locks = ui.get("/api/locks").await.1;
    assert_eq!(locks[0]["holder"]["fencing_token"], held.fencing_token());
    assert_eq!(
        locks[0]["holder"]["lease"],
        format!("{:x}", held.lease_id()).as_str()
    );

    let mut events = ui.events().await;
    let (name, snapshot) = events.next().await;
    assert_eq!(name, "snapshot");
    assert_eq!(
        snapshot["locks"][0]["holder"]["fencing_token"],
        held.fencing_token()
    );

    held.release().await.unwrap();
    let next = within("the waiter gets the lock", STEP, waiting)
        .await
        .unwrap()
        .unwrap();
    let changed = events
        .until("the next holder", SEEN, |name, d| {
            (name == "lock" && d["holder"]["fencing_token"] == next.fencing_token())
                .then(|| d.clone())
        })
        .await;
    assert_eq!(changed["waiters"], 0);
    next.release().await.unwrap();
    events
        .until("released", SEEN, |name, d| {
            (name == "lock" && d["holder"].is_null()).then_some(())
        })
        .await;
    assert_eq!(ui.get("/api/locks").await.1, serde_json::json!([]));

    ui.stop().await;
    rival.close().await.unwrap();
    registry.close().await.unwrap();
}
