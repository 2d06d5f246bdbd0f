//! gRPC's etcd naming layout against real Go: etcd's own
//! `naming/endpoints` manager and `naming/resolver` with grpc-go, built
//! from Debian's packages (`scripts/setup --go`) into
//! `target/go-naming/go-naming` from `interop/go-naming`.
//!
//! Without Go or those packages these tests fail, naming the set-up step;
//! they never skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use etcd_registry::ServiceInstance;
use etcd_registry::naming;
use etcd_registry_testkit::{EtcdServer, eventually, shared_server, unique_name, within};

mod common;

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(60);

/// The Debian packages the Go program is built from.
const GO_PACKAGES: &str = "golang-go, golang-etcd-server-dev and golang-google-grpc-dev";
const GOCODE: &str = "/usr/share/gocode";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `interop/go-naming` in GOPATH mode with `go` (the command name or
/// path), into `out_dir`. Go's build cache under `out_dir` makes a rebuild
/// of unchanged sources take about a second.
fn build_go_naming(go: &str, out_dir: &Path) -> Result<PathBuf, String> {
    let setup = format!("run `scripts/setup --go` (Debian: {GO_PACKAGES})");
    let version = std::process::Command::new(go).arg("version").output();
    match version {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "`{go} version` failed ({}): {}; {setup}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Err(e) => return Err(format!("Go is not installed (`{go}`: {e}); {setup}")),
    }
    for pkg in [
        "go.etcd.io/etcd/clientv3/naming/endpoints",
        "go.etcd.io/etcd/clientv3/naming/resolver",
        "google.golang.org/grpc/health/grpc_health_v1",
    ] {
        if !Path::new(GOCODE).join("src").join(pkg).is_dir() {
            return Err(format!(
                "the Go package {pkg} is missing from {GOCODE}; {setup}"
            ));
        }
    }
    let gopath = out_dir.join("gopath");
    std::fs::create_dir_all(&gopath).map_err(|e| format!("create {}: {e}", gopath.display()))?;
    let bin = out_dir.join("go-naming");
    let out = std::process::Command::new(go)
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(workspace().join("interop/go-naming"))
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{GOCODE}:{}", gopath.display()))
        .env("GOCACHE", out_dir.join("cache"))
        .env("GOFLAGS", "")
        .output()
        .map_err(|e| format!("run `{go} build`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building interop/go-naming failed ({}):\n{}\n{setup}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

/// The Go program, built once per test binary; panics naming the set-up step.
async fn go_naming() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = tokio::task::spawn_blocking(|| {
        BIN.get_or_init(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace().join("target"));
            build_go_naming("go", &target.join("go-naming"))
        })
        .clone()
    });
    match within("go build", Duration::from_secs(300), built).await {
        Ok(Ok(bin)) => bin,
        Ok(Err(why)) => panic!("gRPC naming interop test cannot run: {why}"),
        Err(e) => panic!("go build task: {e}"),
    }
}

/// Runs the Go program against `server`; its stdout lines, or a panic with
/// its stderr.
async fn go(server: &EtcdServer, args: &[&str]) -> Vec<String> {
    let bin = go_naming().await;
    let child = tokio::process::Command::new(&bin)
        .args(args)
        .env("ETCD_ENDPOINTS", server.endpoints().join(","))
        .env("GO_NAMING_TIMEOUT_SECS", "30")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(&format!("go-naming {args:?}"), T, child)
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "go-naming {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn stored(client: &Client, key: &str) -> Option<Vec<u8>> {
    let mut c = client.clone();
    let resp = within("get", T, c.get(key, None)).await.unwrap();
    resp.kvs().first().map(|kv| kv.value().to_vec())
}

async fn count_under(client: &Client, prefix: &str) -> usize {
    let mut c = client.clone();
    let opts = GetOptions::new().with_prefix().with_keys_only();
    let resp = within("get", T, c.get(prefix, Some(opts))).await.unwrap();
    resp.kvs().len()
}

/// A gRPC server with only the health service, `service` SERVING, on
/// loopback; its address.
async fn health_server(
    service: &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service, tonic_health::ServingStatus::Serving)
        .await;
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let task = tokio::spawn(async move {
        let _keep = reporter;
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, task)
}

#[test]
fn a_missing_go_fails_naming_the_setup_step() {
    let dir = std::env::temp_dir().join(unique_name("no-go"));
    let err = build_go_naming("/nonexistent/go", &dir).unwrap_err();
    assert!(err.contains("scripts/setup --go"), "{err}");
    assert!(err.contains("Go is not installed"), "{err}");
}

#[tokio::test]
async fn our_encoding_is_the_go_managers_bytes() {
    let server = shared_server().await;
    let target = unique_name("naming-bytes");
    // Go's caller passes the metadata as the JSON of a map of strings.
    // (Addr, host, port, metadata entries)
    type Case = (
        &'static str,
        &'static str,
        u16,
        &'static [(&'static str, &'static str)],
    );
    let cases: &[Case] = &[
        ("10.0.0.1:50051", "10.0.0.1", 50051, &[]),
        (
            "[::1]:50051",
            "::1",
            50051,
            &[
                ("zone", "eu-1"),
                ("a", "<b>&"),
                ("Z", "\u{2028}\u{8}\u{c}\n\u{1}\u{7f}\"\\é"),
            ],
        ),
        ("h<&>:1", "h<&>", 1, &[("", "")]),
    ];
    for (addr, host, port, md) in cases {
        let mut inst = ServiceInstance::new("svc", "1", *host, *port);
        for (k, v) in *md {
            inst = inst.with_metadata(*k, *v);
        }
        let mut args = vec!["print-bytes", target.as_str(), addr];
        let md_json = serde_json::to_string(&inst.metadata).unwrap();
        if !md.is_empty() {
            args.push(&md_json);
        }
        let go_bytes = go(server, &args).await;
        let ours = String::from_utf8(naming::encode(&inst).unwrap()).unwrap();
        assert_eq!(go_bytes, vec![ours], "{addr} {md:?}");
    }

    // Metadata that is not an object of strings: read, then written back as Go wrote it.
    let foreign = [
        r#""str""#,
        "1.5",
        r#"[1,"a",null,true,{"b":1,"a":2}]"#,
        "12345678901234567890",
        "1e21",
        "1e-7",
        r#"{"weight":10,"tags":["x"]}"#,
        "{}",
    ];
    let mut args = vec!["print-bytes", target.as_str(), "[::1]:1"];
    args.extend(foreign);
    let go_values = go(server, &args).await;
    assert_eq!(go_values.len(), foreign.len());
    for (arg, value) in foreign.iter().zip(&go_values) {
        let inst = naming::decode(&target, value.as_bytes()).unwrap();
        assert_eq!(inst.id, "[::1]:1");
        let back = String::from_utf8(naming::encode(&inst).unwrap()).unwrap();
        if *arg == "{}" {
            // An empty map reads as no metadata, which we write as null.
            assert_eq!(back, r#"{"Op":0,"Addr":"[::1]:1","Metadata":null}"#);
        } else {
            assert_eq!(&back, value, "{arg}");
        }
    }
}

#[tokio::test]
async fn go_manager_adds_and_deletes_decode_as_instances() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let target = format!("{}/grpc/svc", unique_name("naming-go"));

    go(
        server,
        &["add", &target, "10.1.2.3:50051", r#"{"zone":"eu-1"}"#],
    )
    .await;
    go(server, &["add", &target, "[::1]:7000"]).await;
    go(
        server,
        &["add", &target, "10.1.2.4:50051", r#"{"weight":3}"#],
    )
    .await;
    assert_eq!(
        count_under(&client, &naming::naming_prefix(&target)).await,
        3
    );

    let key = naming::naming_key(&target, "10.1.2.3:50051");
    let inst = naming::decode(&target, &stored(&client, &key).await.unwrap()).unwrap();
    let want = ServiceInstance::new(target.as_str(), "10.1.2.3:50051", "10.1.2.3", 50051)
        .with_metadata("zone", "eu-1");
    assert_eq!(inst, want);

    let key = naming::naming_key(&target, "[::1]:7000");
    let inst = naming::decode(&target, &stored(&client, &key).await.unwrap()).unwrap();
    assert_eq!(
        (inst.address.as_str(), inst.port.number()),
        ("::1", Some(7000))
    );
    assert!(inst.metadata.is_empty());

    let key = naming::naming_key(&target, "10.1.2.4:50051");
    let inst = naming::decode(&target, &stored(&client, &key).await.unwrap()).unwrap();
    assert_eq!(inst.metadata[naming::GRPC_METADATA_KEY], r#"{"weight":3}"#);

    // The manager deletes the key itself: nothing is left to read.
    go(server, &["del", &target, "10.1.2.3:50051"]).await;
    assert_eq!(
        stored(&client, &naming::naming_key(&target, "10.1.2.3:50051")).await,
        None
    );
    assert_eq!(
        count_under(&client, &naming::naming_prefix(&target)).await,
        2
    );
}

/// Runs `go-naming resolve TARGET SERVICE` with `GO_NAMING_AUTHORITY` set
/// to `authority` (when given); its output, whether it succeeded or not.
async fn resolve(
    server: &EtcdServer,
    target: &str,
    authority: Option<&str>,
    timeout_secs: u32,
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(go_naming().await);
    cmd.args(["resolve", target, "echo"])
        .env("ETCD_ENDPOINTS", server.endpoints().join(","))
        .env("GO_NAMING_TIMEOUT_SECS", timeout_secs.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(authority) = authority {
        cmd.env("GO_NAMING_AUTHORITY", authority);
    }
    within(&format!("go-naming resolve {target}"), T, cmd.output())
        .await
        .unwrap()
}

/// Writes `inst` at `{target}/{host:port}` as our publish does, under a new lease.
async fn publish(client: &mut Client, target: &str, inst: &ServiceInstance) -> i64 {
    let key = naming::naming_key(target, &naming::endpoint_addr(inst).unwrap());
    let lease = within("grant", T, client.lease_grant(30, None))
        .await
        .unwrap()
        .id();
    let value = naming::encode(inst).unwrap();
    within(
        "put",
        T,
        client.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await
    .unwrap();
    lease
}

#[tokio::test]
async fn gos_resolver_dials_an_endpoint_we_wrote_and_its_health_check_passes() {
    let server = shared_server().await;
    let mut client = server.client().await.unwrap();
    let (addr, grpc) = health_server("echo").await;
    let inst = ServiceInstance::new("echo", "echo-1", "127.0.0.1", addr.port())
        .with_metadata("zone", "eu-1");
    let serving = format!("SERVING {addr}\n");

    // A target without '/': grpc-go's default :authority is fine.
    let plain = unique_name("naming-dial");
    let lease = publish(&mut client, &plain, &inst).await;

    // Go's own List reads what we wrote.
    let listed = go(server, &["list", &plain]).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let listed: serde_json::Value = serde_json::from_str(&listed[0]).unwrap();
    assert_eq!(listed["addr"], addr.to_string());
    assert_eq!(listed["metadata"]["zone"], "eu-1");

    // A real grpc.Dial("etcd:///target") through etcd's resolver, then a health check.
    let out = resolve(server, &plain, None, 30).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), serving, "{out:?}");

    // A target with '/', as etcd's docs write them: grpc-go 1.33 sends it
    // as :authority, which tonic's HTTP/2 server refuses; with
    // grpc.WithAuthority the same dial works.
    let nested = format!("{}/grpc/echo", unique_name("naming-dial"));
    publish(&mut client, &nested, &inst).await;
    let out = resolve(server, &nested, Some("echo"), 30).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), serving, "{out:?}");
    let out = resolve(server, &nested, None, 30).await;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PROTOCOL_ERROR"), "{stderr}");

    // Once the key is gone with its lease, the Go resolver has nothing to dial.
    within("revoke", T, client.lease_revoke(lease))
        .await
        .unwrap();
    eventually("key gone with its lease", T, || async {
        count_under(&client, &naming::naming_prefix(&plain)).await == 0
    })
    .await;
    let out = resolve(server, &plain, None, 2).await;
    assert!(!out.status.success(), "resolved with no endpoint: {out:?}");
    grpc.abort();
}

/// The value and lease of `key`, if any.
async fn stored_with_lease(client: &Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let mut c = client.clone();
    let resp = within("get", T, c.get(key, None)).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.lease()))
}

fn ids(cache: &etcd_registry::ServiceCache) -> Vec<String> {
    cache.instances().iter().map(|i| i.id.clone()).collect()
}

#[tokio::test]
async fn our_cache_and_watch_follow_the_go_managers_adds_and_deletes() {
    let server = shared_server().await;
    let mut client = server.client().await.unwrap();
    let target = format!("{}/grpc/svc", unique_name("naming-cache"));
    let registry =
        common::connect_with(common::builder(server.endpoints(), &unique_name("ns"), 10)).await;

    go(
        server,
        &["add", &target, "10.1.0.1:50051", r#"{"zone":"eu-1"}"#],
    )
    .await;
    let cache = within("cache", T, registry.cache_grpc_naming(&target))
        .await
        .unwrap();
    assert_eq!(ids(&cache), ["10.1.0.1:50051"]);
    let first = cache.get("10.1.0.1:50051").unwrap();
    assert_eq!(
        *first,
        ServiceInstance::new(target.as_str(), "10.1.0.1:50051", "10.1.0.1", 50051)
            .with_metadata("zone", "eu-1")
    );
    let mut watch = registry.watch_grpc_naming(&target).unwrap();
    use futures::StreamExt;
    let snapshot = within("snapshot", T, watch.next()).await.unwrap();
    assert!(
        matches!(&snapshot, etcd_registry::ServiceEvent::Snapshot(all) if all.len() == 1),
        "{snapshot:?}"
    );

    // Go adds one (IPv6) and one under a lease; a value that is no endpoint is skipped.
    go(server, &["add", &target, "[::1]:7000"]).await;
    let key = naming::naming_key(&target, "broken");
    within("put", T, client.put(key, "not json", None))
        .await
        .unwrap();
    let mut leased = tokio::process::Command::new(go_naming().await)
        .args(["add-lease", "3", &target, "10.1.0.2:50051"])
        .env("ETCD_ENDPOINTS", server.endpoints().join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("the cache to hold Go's three endpoints", T, || async {
        ids(&cache) == ["10.1.0.1:50051", "10.1.0.2:50051", "[::1]:7000"]
    })
    .await;
    let v6 = cache.get("[::1]:7000").unwrap();
    assert_eq!((v6.address.as_str(), v6.port.number()), ("::1", Some(7000)));
    match within("added", T, watch.next()).await.unwrap() {
        etcd_registry::ServiceEvent::Added(i) => assert_eq!(i.id, "[::1]:7000"),
        other => panic!("{other:?}"),
    }

    // Go's delete, and a Go process whose lease expires (stdin closed, then killed).
    go(server, &["del", &target, "10.1.0.1:50051"]).await;
    drop(leased.stdin.take());
    let _ = leased.kill().await;
    eventually(
        "the cache to drop the deleted and the expired endpoint",
        T,
        || async { ids(&cache) == ["[::1]:7000"] },
    )
    .await;
    assert!(
        registry
            .grpc_naming_instances(&target)
            .await
            .unwrap()
            .iter()
            .map(|i| i.id.as_str())
            .eq(["[::1]:7000"])
    );
    registry.close().await.unwrap();
}

#[tokio::test]
async fn we_publish_and_gos_resolver_dials_us_until_we_deregister() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let (addr, grpc) = health_server("echo").await;
    let registry =
        common::connect_with(common::builder(server.endpoints(), &unique_name("ns"), 10)).await;
    let target = unique_name("naming-pub");
    let inst = ServiceInstance::new("echo", "echo-1", "127.0.0.1", addr.port())
        .with_metadata("zone", "eu-1");
    let key = naming::naming_key(&target, &addr.to_string());

    let reg = within(
        "register_with",
        T,
        registry.register_with(
            inst.clone(),
            etcd_registry::Publish::GrpcNaming {
                target: target.clone(),
            },
        ),
    )
    .await
    .unwrap();
    let (value, lease) = stored_with_lease(&client, &key).await.expect("published");
    assert_eq!(value, naming::encode(&inst).unwrap());
    assert_eq!(Some(lease), registry.lease_id());
    let (_, own_lease) = stored_with_lease(&client, reg.key()).await.unwrap();
    assert_eq!(own_lease, lease, "one lease for both keys");

    let out = resolve(server, &target, None, 30).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("SERVING {addr}\n"),
        "{out:?}"
    );

    within("deregister", T, reg.deregister()).await.unwrap();
    assert_eq!(stored_with_lease(&client, &key).await, None);
    let out = resolve(server, &target, None, 2).await;
    assert!(!out.status.success(), "resolved after deregister: {out:?}");
    registry.close().await.unwrap();
    grpc.abort();
}

#[tokio::test]
async fn a_published_endpoint_is_restored_reclaimed_and_drained_with_its_instance() {
    let server = shared_server().await;
    let mut client = server.client().await.unwrap();
    let target = unique_name("naming-life");
    let registry = common::connect_with(
        common::builder(server.endpoints(), &unique_name("ns"), 10)
            .publish_grpc_naming(format!("{target}/{{name}}")),
    )
    .await;
    let inst = ServiceInstance::new("web", "web-1", "10.2.0.1", 8080);
    let reg = within("register", T, registry.register(inst.clone()))
        .await
        .unwrap();
    let key = naming::naming_key(&format!("{target}/web"), "10.2.0.1:8080");
    let (value, first_lease) = stored_with_lease(&client, &key).await.expect("published");
    assert_eq!(value, naming::encode(&inst).unwrap());

    // Lost lease: both keys come back under the new one.
    within("revoke", T, client.lease_revoke(first_lease))
        .await
        .unwrap();
    eventually("the naming key restored under a new lease", T, || async {
        stored_with_lease(&client, &key)
            .await
            .is_some_and(|(_, l)| l != first_lease && Some(l) == registry.lease_id())
    })
    .await;

    // Taken over by another lease (and the naming key deleted meanwhile):
    // once the other owner's key is gone, both are reclaimed.
    let other = within("grant", T, client.lease_grant(60, None))
        .await
        .unwrap()
        .id();
    let value = String::from_utf8(inst.to_json()).unwrap();
    within(
        "take over",
        T,
        client.put(reg.key(), value, Some(PutOptions::new().with_lease(other))),
    )
    .await
    .unwrap();
    eventually("the registration to yield", T, || async {
        stored_with_lease(&client, reg.key())
            .await
            .is_some_and(|(_, l)| l == other)
    })
    .await;
    within("delete naming key", T, client.delete(key.as_str(), None))
        .await
        .unwrap();
    within("revoke other", T, client.lease_revoke(other))
        .await
        .unwrap();
    eventually("both keys reclaimed", T, || async {
        let ours = registry.lease_id();
        stored_with_lease(&client, reg.key())
            .await
            .is_some_and(|(_, l)| Some(l) == ours)
            && stored_with_lease(&client, &key)
                .await
                .is_some_and(|(_, l)| Some(l) == ours)
    })
    .await;

    // Drained with the instance: both keys go at once, while the lease
    // still lives (the close after the grace would take them anyway).
    let draining = tokio::spawn({
        let registry = registry.clone();
        async move { registry.shutdown(Duration::from_secs(10)).await }
    });
    eventually("both keys deleted by the drain", T, || async {
        stored_with_lease(&client, reg.key()).await.is_none()
            && stored_with_lease(&client, &key).await.is_none()
    })
    .await;
    assert!(!draining.is_finished(), "the drain's grace ended first");
    let lease = registry.lease_id().unwrap();
    let leases = within("leases", T, client.leases()).await.unwrap();
    assert!(
        leases.leases().iter().any(|l| l.id() == lease),
        "lease still alive"
    );
    within("shutdown", T, draining).await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_targets_and_ports_fail_before_anything_is_written() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("ns");
    let err = common::builder(server.endpoints(), &ns, 10)
        .publish_grpc_naming("grpc/")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            etcd_registry::Error::InvalidInput {
                field: "grpc_naming",
                ..
            }
        ),
        "{err}"
    );
    let registry = common::connect_with(common::builder(server.endpoints(), &ns, 10)).await;
    for (target, port, field) in [
        ("", "80", "target"),
        ("t/", "80", "target"),
        ("t", "http", "port"),
    ] {
        let inst = ServiceInstance::new("web", "w-1", "10.0.0.1", 0).with_port(port);
        let err = registry
            .register_with(
                inst,
                etcd_registry::Publish::GrpcNaming {
                    target: target.to_owned(),
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, etcd_registry::Error::InvalidInput { field: f, .. } if *f == field),
            "{target:?} {port:?}: {err}"
        );
    }
    assert_eq!(
        count_under(&client, &format!("/etcd_registry/{ns}/")).await,
        0
    );
    registry.close().await.unwrap();
}

#[tokio::test]
async fn an_update_and_the_serving_switch_move_and_remove_the_endpoint_key() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let registry =
        common::connect_with(common::builder(server.endpoints(), &unique_name("ns"), 10)).await;
    let target = unique_name("naming-update");
    let publish = etcd_registry::Publish::GrpcNaming {
        target: target.clone(),
    };
    let inst = ServiceInstance::new("web", "web-1", "10.3.0.1", 8080);
    let mut reg = within("register_with", T, registry.register_with(inst, publish))
        .await
        .unwrap();
    let old_key = naming::naming_key(&target, "10.3.0.1:8080");
    assert!(stored_with_lease(&client, &old_key).await.is_some());

    // A new port: the endpoint key moves, in step with the instance.
    let moved = ServiceInstance::new("web", "web-1", "10.3.0.1", 9090).with_metadata("v", "2");
    within("update", T, reg.update(moved.clone()))
        .await
        .unwrap();
    let new_key = naming::naming_key(&target, "10.3.0.1:9090");
    let (value, _) = stored_with_lease(&client, &new_key).await.expect("moved");
    assert_eq!(value, naming::encode(&moved).unwrap());
    assert_eq!(stored_with_lease(&client, &old_key).await, None);

    // Out of service and back: the endpoint key goes and comes back with it.
    within("set_serving false", T, reg.set_serving(false))
        .await
        .unwrap();
    assert_eq!(stored_with_lease(&client, &new_key).await, None);
    assert_eq!(stored_with_lease(&client, reg.key()).await, None);
    within("set_serving true", T, reg.set_serving(true))
        .await
        .unwrap();
    assert!(stored_with_lease(&client, &new_key).await.is_some());
    registry.close().await.unwrap();
}
