//! `etcd-registry list` and `watch` on a namespace of 100,000 instances
//! (about 20 MB of values, five times the client's 4 MiB decode limit),
//! loaded with raw batched transactions.

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use etcd_registry::{DEFAULT_KEY_PREFIX, ServiceInstance};
use etcd_registry_testkit::{put_batched, shared_server, unique_name};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_etcd-registry");
const TOTAL: usize = 100_000;

async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    etcd_registry_testkit::within(what, Duration::from_secs(secs), f).await
}

fn instance(n: usize) -> ServiceInstance {
    ServiceInstance::new(
        format!("svc{}", n % 10),
        format!("i{n:06}"),
        "10.1.2.3",
        8000,
    )
    .with_version("1.2.3")
    .with_metadata("zone", "eu-west-1a")
    .with_metadata("build", "2026-11-29T06:00:00Z-0123456789abcdef")
    .with_metadata("owner", "team-platform-discovery")
}

fn command(endpoint: &str, ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "ETCD_ENDPOINTS",
        "ETCD_REGISTRY_NAMESPACE",
        "ETCD_REGISTRY_PREFIX",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("--endpoints")
        .arg(endpoint)
        .arg("--namespace")
        .arg(ns)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_watch_a_namespace_of_100k() {
    let etcd = shared_server().await;
    let ns = unique_name("cli-scale");
    let key =
        |i: &ServiceInstance| format!("{DEFAULT_KEY_PREFIX}/{ns}/services/{}/{}", i.name, i.id);
    let client = within(10, "raw client", etcd.client())
        .await
        .expect("client");
    let kvs = (0..TOTAL).map(|n| {
        let i = instance(n);
        (key(&i), i.to_json())
    });
    within(120, "load", put_batched(&client, kvs))
        .await
        .expect("load");
    // In key order, as `list` prints them.
    let mut want: Vec<ServiceInstance> = (0..TOTAL).map(instance).collect();
    want.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));

    let start = Instant::now();
    let out = within(
        180,
        "list --json",
        command(&etcd.endpoint(), &ns, &["list", "--json"]).output(),
    )
    .await
    .expect("run list");
    eprintln!("list --json of {TOTAL} took {:?}", start.elapsed());
    assert!(
        out.status.success(),
        "list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
    let listed: Vec<ServiceInstance> = listed
        .iter()
        .map(|v| ServiceInstance::from_json(v.to_string().as_bytes()).expect("an instance"))
        .collect();
    assert_eq!(listed.len(), TOTAL);
    assert!(listed == want, "list --json differs from what was loaded");

    let mut watch = command(&etcd.endpoint(), &ns, &["watch", "--json", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let start = Instant::now();
    let snapshot = within(180, "watch snapshot", lines.next_line())
        .await
        .expect("read")
        .expect("a snapshot line");
    eprintln!(
        "watch --json snapshot of {TOTAL} took {:?}",
        start.elapsed()
    );
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot).expect("snapshot JSON");
    assert_eq!(snapshot["event"], "snapshot");
    assert_eq!(snapshot["instances"].as_array().map(Vec::len), Some(TOTAL));

    let later = ServiceInstance::new("zz-later", "x", "10.9.9.9", 9);
    let mut c = client.clone();
    within(10, "put", c.put(key(&later), later.to_json(), None))
        .await
        .expect("put");
    let added = within(60, "watch event", lines.next_line())
        .await
        .expect("read")
        .expect("an event line");
    let added: serde_json::Value = serde_json::from_str(&added).expect("event JSON");
    assert_eq!(added["event"], "added");
    assert_eq!(added["instance"]["name"], "zz-later");
    let status = within(30, "watch exit", watch.wait()).await.expect("wait");
    assert!(status.success(), "watch exited with {status}");
}
