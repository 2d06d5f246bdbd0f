//! `register --grpc-naming TARGET` and `list --grpc-naming TARGET`: the
//! instance is also published in gRPC's etcd naming layout, byte for byte as
//! etcd's Go endpoints manager writes it, and removed with it; endpoints
//! written by Go are listed.

mod common;

use common::*;
use etcd_registry::{ServiceInstance, naming};
use etcd_registry_testkit::unique_name;

/// The value stored at `key`, read with etcdctl (not through our code).
async fn raw_value(ctx: &Ctx, key: &str) -> Option<String> {
    let mut cmd = ctx.etcd.etcdctl();
    cmd.args(["get", "--print-value-only", key]);
    let out = run(cmd, &["etcdctl get"]).await;
    assert!(out.status.success(), "etcdctl get failed: {out:?}");
    let value = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    (!value.is_empty()).then_some(value)
}

#[tokio::test]
async fn register_publishes_the_go_naming_value_and_removes_it_on_exit() {
    let ctx = Ctx::new("cli-naming").await;
    let target = format!("{}/grpc/web", unique_name("cli-naming"));
    let key = naming::naming_key(&target, "10.0.0.7:8080");
    let mut register = ctx.spawn(&[
        "register",
        "web",
        "web-1",
        "10.0.0.7",
        "8080",
        "--meta",
        "zone=eu-1",
        "--grpc-naming",
        &target,
    ]);
    let registered = register.next_line().await;
    assert!(
        registered.starts_with("registered web/web-1"),
        "{registered}"
    );

    let value = eventually("the naming key to appear", || async {
        raw_value(&ctx, &key).await
    })
    .await;
    assert_eq!(
        value,
        r#"{"Op":0,"Addr":"10.0.0.7:8080","Metadata":{"zone":"eu-1"}}"#
    );
    let listed = ctx
        .stdout(&["list", "--json", "--grpc-naming", &target])
        .await;
    let want = ServiceInstance::new(target.as_str(), "10.0.0.7:8080", "10.0.0.7", 8080)
        .with_metadata("zone", "eu-1");
    assert_eq!(
        listed,
        format!("[{}]\n", String::from_utf8(want.to_json()).unwrap())
    );

    register.sigterm();
    let status = register.exit().await;
    assert!(status.success(), "register exited with {status}");
    assert_eq!(raw_value(&ctx, &key).await, None);
    let empty = ctx.run(&["list", "--grpc-naming", &target]).await;
    assert!(empty.status.success());
    assert_eq!(String::from_utf8_lossy(&empty.stdout), "");
}

#[tokio::test]
async fn list_shows_endpoints_go_wrote_and_bad_targets_are_usage_errors() {
    let ctx = Ctx::new("cli-naming-list").await;
    let target = unique_name("cli-naming-go");
    // What Go's endpoints manager writes (see the library's grpc_naming test).
    for (addr, value) in [
        (
            "[::1]:50051",
            r#"{"Op":0,"Addr":"[::1]:50051","Metadata":null}"#,
        ),
        (
            "10.0.0.9:7000",
            r#"{"Op":0,"Addr":"10.0.0.9:7000","Metadata":"x"}"#,
        ),
        ("broken", "not json"),
    ] {
        let mut cmd = ctx.etcd.etcdctl();
        cmd.args(["put", &naming::naming_key(&target, addr), value]);
        assert!(run(cmd, &["etcdctl put"]).await.status.success());
    }
    let table = ctx.stdout(&["list", "--grpc-naming", &target]).await;
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].contains("10.0.0.9:7000"), "{table}");
    assert!(rows[0].contains(r#"grpc.metadata="x""#), "{table}");
    assert!(rows[1].contains("[::1]:50051"), "{table}");

    for bad in ["", "svc/"] {
        let out = ctx.run(&["list", "--grpc-naming", bad]).await;
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("target"), "{stderr}");
    }
    let out = ctx
        .run(&["register", "web", "w", "h", "1", "--grpc-naming", "svc/"])
        .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
