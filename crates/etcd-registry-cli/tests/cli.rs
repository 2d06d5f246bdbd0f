//! The `etcd-registry` binary against a real etcd from the testkit.
//!
//! Every test runs the built binary in its own namespace of the shared server.
//! Every await that could hang is under a timeout, and conditions are polled
//! with a deadline.

mod common;

use std::time::Duration;

use common::*;
use etcd_registry::ServiceInstance;
use tokio::time::{Instant, timeout};

const WEB_1_JSON: &str = r#"{"name":"web","id":"web-1","address":"10.0.0.7","port":"8080","version":"1.0.2","weight":10,"metadata":{"zone":"eu-1"}}"#;

#[tokio::test]
async fn register_is_listed_in_go_format_and_sigterm_revokes_it() {
    let ctx = Ctx::new("cli-register").await;
    let mut register = ctx.spawn(&[
        "register",
        "web",
        "web-1",
        "10.0.0.7",
        "8080",
        "--version",
        "1.0.2",
        "--weight",
        "10",
        "--meta",
        "zone=eu-1",
    ]);
    let registered = register.next_line().await;
    assert!(
        registered.starts_with("registered web/web-1 at 10.0.0.7:8080 (lease "),
        "{registered}"
    );

    let listed = eventually("list --json to show web-1", || async {
        let out = ctx.stdout(&["list", "--json"]).await;
        (out != "[]\n").then_some(out)
    })
    .await;
    // One JSON document, an array of wire-format instances.
    assert_eq!(listed, format!("[{WEB_1_JSON}]\n"));
    let parsed: serde_json::Value = serde_json::from_str(&listed).expect("one JSON document");
    assert_eq!(
        parsed[0]["port"], "8080",
        "the Go wire format keeps port a string"
    );
    assert_eq!(ctx.stdout(&["list", "--json", "web"]).await, listed);
    let table = ctx.stdout(&["list", "web"]).await;
    assert_eq!(
        table.lines().nth(1),
        Some("web      web-1  10.0.0.7:8080  1.0.2    10      zone=eu-1"),
        "{table}"
    );

    register.sigterm();
    let status = register.exit().await;
    assert!(status.success(), "register exited with {status}");
    let rest = register.rest().await;
    assert_eq!(
        rest.last().map(String::as_str),
        Some("closed: lease revoked, the instance is gone"),
        "{rest:?}"
    );
    // The TTL is 10 s: only the revocation on close explains an empty list now.
    assert_eq!(ctx.stdout(&["list", "--json"]).await, "[]\n");
    assert_eq!(ctx.raw_keys().await, "");
}

#[tokio::test]
async fn invalid_input_names_the_field_exits_2_and_writes_nothing() {
    let ctx = Ctx::new("cli-invalid").await;
    let out = ctx.run(&["register", "a/b", "1", "h", "80"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("error: invalid name: \"a/b\" contains '/'"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: "), "{stderr}");
    // Names checked by the library after connecting are input errors too.
    for args in [
        &["leader", "a/b"][..],
        &["campaign", "a\tb", "p"],
        &["list", "a/b"],
        &["deregister", "web", "x/y"],
    ] {
        let out = ctx.run(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("error: invalid "), "{args:?}: {stderr}");
    }
    // A setting the library rejects, and one the parser rejects.
    // (A prefix with a trailing '/' is valid: the Go library accepts it.)
    let out = ctx.run(&["--user", "", "--password", "x", "list"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: invalid auth"));
    let out = ctx.run(&["--user", "alice", "list"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--user needs --password"));
    let out = ctx.run(&["--ttl", "1s", "list"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(ctx.stdout(&["list", "--json"]).await, "[]\n");
    assert_eq!(ctx.raw_keys().await, "", "no key of any kind was written");
}

#[tokio::test]
async fn unreachable_endpoint_fails_naming_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let mut cmd = bare_command();
    cmd.args(["--endpoints", &endpoint, "--dial-timeout", "700ms", "list"]);
    let started = Instant::now();
    let out = run(cmd, &["list (unreachable)"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(&endpoint), "{stderr}");
    assert!(stderr.contains("hint: is etcd running there?"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the dial timeout of 700 ms was not honoured: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn watch_prints_the_snapshot_then_library_events_as_json_lines() {
    let ctx = Ctx::new("cli-watch").await;
    let registry = ctx.registry().await;
    let _a1 = registry
        .register(ServiceInstance::new("api", "a-1", "10.0.0.1", 9000).with_version("2"))
        .await
        .expect("register a-1");

    let mut watch = ctx.spawn(&["watch", "api", "--json", "--count", "2"]);
    assert_eq!(
        watch.next_line().await,
        r#"{"event":"snapshot","instances":[{"name":"api","id":"a-1","address":"10.0.0.1","port":"9000","version":"2","weight":0,"metadata":null}]}"#
    );

    let a2 = registry
        .register(ServiceInstance::new("api", "a-2", "10.0.0.2", 9001).with_metadata("k", "v"))
        .await
        .expect("register a-2");
    a2.deregister().await.expect("deregister a-2");
    let a2_json = r#"{"name":"api","id":"a-2","address":"10.0.0.2","port":"9001","version":"","weight":0,"metadata":{"k":"v"}}"#;
    assert_eq!(
        watch.next_line().await,
        format!(r#"{{"event":"added","instance":{a2_json}}}"#)
    );
    assert_eq!(
        watch.next_line().await,
        format!(r#"{{"event":"removed","instance":{a2_json}}}"#)
    );
    let status = watch.exit().await;
    assert!(status.success(), "watch exited with {status}");
    assert_eq!(watch.rest().await, Vec::<String>::new());
    timeout(STEP, registry.close())
        .await
        .expect("close timed out")
        .expect("close");
}

#[tokio::test]
async fn campaign_leads_until_sigterm_then_resigns_and_observe_sees_it_all() {
    let ctx = Ctx::new("cli-election").await;
    let mut observe = ctx.spawn(&["observe", "cron", "--json", "--count", "2"]);
    assert_eq!(observe.next_line().await, r#"{"leader":null}"#);

    let mut campaign = ctx.spawn(&["campaign", "cron", "candidate-1"]);
    let won = campaign.line_starting("leader (fencing token ").await;
    let token: i64 = won
        .trim_start_matches("leader (fencing token ")
        .trim_end_matches(')')
        .parse()
        .unwrap_or_else(|e| panic!("bad token in {won:?}: {e}"));

    let leader: serde_json::Value =
        serde_json::from_str(&ctx.stdout(&["leader", "cron", "--json"]).await).expect("JSON");
    assert_eq!(leader["leader"]["proposal"], "candidate-1");
    assert_eq!(leader["leader"]["fencing_token"], token);
    let text = ctx.stdout(&["leader", "cron"]).await;
    assert!(
        text.starts_with(&format!(
            "leader: candidate-1 (fencing token {token}, lease "
        )),
        "{text}"
    );

    let observed: serde_json::Value =
        serde_json::from_str(&observe.next_line().await).expect("JSON");
    assert_eq!(observed, leader);

    campaign.sigterm();
    let status = campaign.exit().await;
    assert!(status.success(), "campaign exited with {status}");
    let rest = campaign.rest().await;
    assert_eq!(
        rest,
        ["received terminate; resigning", "resigned"],
        "campaign output after SIGTERM"
    );
    assert_eq!(observe.next_line().await, r#"{"leader":null}"#);
    assert!(observe.exit().await.success());
    assert_eq!(ctx.stdout(&["leader", "cron"]).await, "no leader\n");
    assert_eq!(
        ctx.stdout(&["leader", "cron", "--json"]).await,
        "{\"leader\":null}\n"
    );
}

#[tokio::test]
async fn help_lists_every_subcommand_and_a_bad_flag_is_a_usage_error() {
    let out = run(
        {
            let mut c = bare_command();
            c.arg("--help");
            c
        },
        &["--help"],
    )
    .await;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "dev",
        "list",
        "watch",
        "register",
        "deregister",
        "delete-service",
        "leader",
        "campaign",
        "observe",
        "status",
        "completions",
        "man",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{sub} "))),
            "--help does not list `{sub}`:\n{help}"
        );
    }

    let out = run(
        {
            let mut c = bare_command();
            c.args(["list", "--no-such-flag"]);
            c
        },
        &["list --no-such-flag"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));

    // The CMD-only flags need a CMD; --for and CMD exclude each other.
    for args in [
        &["campaign", "e", "p", "--grace", "1s"][..],
        &["campaign", "e", "p", "--once"],
        &["campaign", "e", "p", "--for", "1s", "--", "true"],
    ] {
        let mut c = bare_command();
        c.args(args);
        let out = run(c, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}

#[tokio::test]
async fn admin_deletes_report_what_existed_for_values_written_by_go() {
    let ctx = Ctx::new("cli-admin").await;
    for id in ["g-1", "g-2"] {
        // What the Go library writes: port as a string, metadata null.
        let key = format!("/etcd_registry/{}/services/legacy/{id}", ctx.ns);
        let value = format!(
            r#"{{"name":"legacy","id":"{id}","address":"10.1.0.1","port":"7000","version":"go","weight":1,"metadata":null}}"#
        );
        let mut put = ctx.etcd.etcdctl();
        put.args(["put", &key, &value]);
        assert!(run(put, &["etcdctl put"]).await.status.success());
    }
    let table = ctx.stdout(&["list"]).await;
    assert_eq!(
        table,
        "SERVICE  ID   ADDRESS        VERSION  WEIGHT  METADATA\n\
         legacy   g-1  10.1.0.1:7000  go       1       -\n\
         legacy   g-2  10.1.0.1:7000  go       1       -\n"
    );
    assert_eq!(
        ctx.stdout(&["deregister", "legacy", "g-1"]).await,
        "deleted legacy/g-1\n"
    );
    let out = ctx.run(&["deregister", "legacy", "g-1"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!("error: no instance legacy/g-1 in namespace {}", ctx.ns)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        ctx.stdout(&["delete-service", "legacy"]).await,
        "deleted 1 instance of legacy\n"
    );
    assert_eq!(ctx.raw_keys().await, "");
}

#[tokio::test]
async fn status_shows_each_endpoint_then_the_namespace() {
    let ctx = Ctx::new("cli-status").await;
    let registry = ctx.registry().await;
    for (service, id) in [("web", "w-1"), ("web", "w-2"), ("api", "a-1")] {
        let _ = registry
            .register(ServiceInstance::new(service, id, "10.0.0.1", 80))
            .await
            .expect("register");
    }
    let leadership = timeout(
        STEP,
        registry.election("cron").expect("name").campaign("boss"),
    )
    .await
    .expect("campaign timed out")
    .expect("campaign");
    let token = leadership.fencing_token();
    let lease = format!("{:x}", leadership.lease_id());
    // A second candidate, queued behind the leader: etcdctl, a peer.
    let mut elect = ctx.etcd.etcdctl();
    elect.args([
        "elect",
        &format!("/etcd_registry/{}/elections/cron", ctx.ns),
        "etcdctl",
    ]);
    let _etcdctl = Background::start(elect, &["etcdctl elect"]);
    eventually("etcdctl's candidate key", || async {
        (ctx.raw_keys_under("elections/cron/").await.len() == 2).then_some(())
    })
    .await;
    let dead = format!("127.0.0.1:{}", free_port());
    let endpoints = format!("{},{dead}", ctx.etcd.endpoint());

    let mut cmd = bare_command();
    cmd.args(["--endpoints", &endpoints, "--namespace", &ctx.ns])
        .args(["--dial-timeout", "2s", "status"]);
    let out = run(cmd, &["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ENDPOINT "), "{text}");
    let live = lines[1];
    assert!(live.starts_with(&ctx.etcd.endpoint()), "{text}");
    assert!(
        live.contains(" 3.") && live.contains(" yes ") && live.ends_with(" ok"),
        "{text}"
    );
    assert!(
        lines[2].starts_with(&dead) && lines[2].contains("unreachable: "),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "namespace {} (prefix /etcd_registry): 2 services, 3 instances, 1 election",
            ctx.ns
        )),
        "{text}"
    );
    assert!(
        text.contains("\napi      1 instance\nweb      2 instances\n"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["cron", "boss", &token.to_string(), &lease, "2"]),
        "{text}"
    );

    let mut cmd = bare_command();
    cmd.args(["--endpoints", &endpoints, "--namespace", &ctx.ns])
        .args(["--dial-timeout", "2s", "status", "--json"]);
    let out = run(cmd, &["status --json"]).await;
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(json["endpoints"][0]["reachable"], true);
    assert_eq!(json["endpoints"][0]["is_leader"], true);
    assert!(json["endpoints"][0]["db_size"].as_i64().unwrap() > 0);
    assert_eq!(json["endpoints"][1]["reachable"], false);
    assert!(!json["endpoints"][1]["error"].as_str().unwrap().is_empty());
    assert_eq!(json["namespace"]["instances"], 3);
    assert_eq!(
        json["namespace"]["services"][1],
        serde_json::json!({"name": "web", "instances": 2})
    );
    assert_eq!(
        json["namespace"]["elections"],
        serde_json::json!([{"name": "cron", "candidates": 2,
            "leader": {"proposal": "boss", "fencing_token": token, "lease_id": lease}}])
    );

    // No endpoint answers: each says why, and the exit status is 1.
    let mut cmd = bare_command();
    cmd.args(["--endpoints", &dead, "--dial-timeout", "500ms", "status"]);
    let out = run(cmd, &["status (unreachable)"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("unreachable: "));
    assert!(
        stderr.contains(&format!("error: no endpoint answered: {dead}")),
        "{stderr}"
    );
    timeout(STEP, registry.close())
        .await
        .expect("close timed out")
        .expect("close");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

#[tokio::test]
async fn durations_take_units_or_whole_seconds() {
    let ctx = Ctx::new("cli-durations").await;
    // --for and --ttl with units: registered, then gone after 1 s on its own.
    let started = Instant::now();
    let out = ctx
        .run(&[
            "--ttl", "1m", "register", "web", "w", "h", "1", "--for", "1s",
        ])
        .await;
    assert!(out.status.success(), "{out:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("--for elapsed; closing"), "{stdout}");
    // --timeout with a unit; whole seconds still work.
    for t in ["500ms", "1"] {
        let out = ctx
            .run(&["watch", "web", "--count", "1", "--timeout", t])
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--timeout elapsed after 0 of 1 events"),
            "{stderr}"
        );
    }
    for bad in [
        ["--dial-timeout", "soon"],
        ["--dial-timeout", "0s"],
        ["--ttl", "2500ms"],
    ] {
        let out = ctx.run(&[bad[0], bad[1], "list"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains(bad[0]), "{stderr}");
    }
}

#[tokio::test]
async fn completions_and_man_page_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let mut cmd = bare_command();
        cmd.args(["completions", shell]);
        let out = run(cmd, &["completions", shell]).await;
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in [
            "etcd-registry",
            "campaign",
            "status",
            "dial-timeout",
            "grace",
        ] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let mut cmd = bare_command();
    cmd.arg("man");
    let out = run(cmd, &["man"]).await;
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH etcd-registry"),
        "{page}"
    );
    for sub in ["campaign", "status", "completions", "deregister"] {
        assert!(page.contains(sub), "man page lacks {sub}");
    }
    let mut cmd = bare_command();
    cmd.args(["completions", "tcsh"]);
    assert_eq!(run(cmd, &["completions tcsh"]).await.status.code(), Some(2));
}
