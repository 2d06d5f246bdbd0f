//! `list --raw` prints stored values byte for byte, for a deployment with a
//! prefix that ends with '/', as the Go library accepts it.

use std::process::Stdio;
use std::time::Duration;

use etcd_registry_testkit::{shared_server, unique_name, within};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_etcd-registry");
const STEP: Duration = Duration::from_secs(20);

#[tokio::test]
async fn list_raw_prints_the_stored_bytes() {
    let etcd = shared_server().await;
    let ns = unique_name("raw");
    // Go's bytes ({} and \u003c as Go writes them), and a value from another
    // writer (numeric port, an extra field) that a re-encoding would change.
    let go = r#"{"name":"web","id":"1","address":"10.0.0.1","port":"http","version":"\u003c2\u003e","weight":0,"metadata":{}}"#;
    let other = r#"{"name":"web","id":"2","address":"10.0.0.2","port":8080,"extra":true}"#;
    for (id, value) in [("1", go), ("2", other)] {
        let key = format!("/etcd_registry//{ns}/services/web/{id}");
        let put = within(
            "etcdctl put",
            STEP,
            etcd.etcdctl().args(["put", &key, value]).output(),
        )
        .await
        .unwrap();
        assert!(put.status.success(), "{put:?}");
    }
    let out = within(
        "list --raw",
        STEP,
        Command::new(BIN)
            .env_remove("RUST_LOG")
            .args(["--endpoints", &etcd.endpoint(), "--namespace", &ns])
            .args(["--prefix", "/etcd_registry/", "list", "--raw", "web"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{go}\n{other}\n")
    );
}
