//! `--metrics-addr`: the long-running commands serve Prometheus metrics.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use etcd_registry_testkit::http_get;
use tokio::time::timeout;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
}

/// The metrics page at `addr`, or `None` while nothing answers there yet.
async fn scrape(addr: SocketAddr) -> Option<String> {
    match timeout(Duration::from_secs(5), http_get(addr, "/metrics")).await {
        Ok(Ok((200, body))) => Some(body),
        _ => None,
    }
}

// Mutation check by hand: recording `active` as 5 in the library made this
// test fail (no `etcd_registry_state{..} 1` line); restored since.
#[tokio::test]
async fn register_serves_its_state_and_registrations_at_metrics() {
    let ctx = Ctx::new("cli-metrics").await;
    let addr = free_addr();
    let addr_arg = addr.to_string();
    let mut register = ctx.spawn(&[
        "register",
        "web",
        "web-1",
        "10.0.0.7",
        "8080",
        "--metrics-addr",
        &addr_arg,
    ]);
    let registered = register.next_line().await;
    assert!(
        registered.starts_with("registered web/web-1"),
        "{registered}"
    );

    // The exact lines a Prometheus scrape reads: active, one registration.
    let state = format!("etcd_registry_state{{namespace=\"{}\"}} 1", ctx.ns);
    let registrations = format!("etcd_registry_registrations{{namespace=\"{}\"}} 1", ctx.ns);
    let page = eventually("the metrics page to show the registry active", || async {
        scrape(addr)
            .await
            .filter(|page| page.lines().any(|l| l == state))
    })
    .await;
    assert!(
        page.lines().any(|l| l == registrations),
        "no `{registrations}` in:\n{page}"
    );
    assert!(
        page.contains("# TYPE etcd_registry_state gauge"),
        "the page is in the Prometheus text format:\n{page}"
    );

    register.sigterm();
    let status = register.exit().await;
    assert!(status.success(), "register exited with {status}");
}

#[tokio::test]
async fn every_long_running_command_takes_metrics_addr_and_a_taken_one_fails() {
    let ctx = Ctx::new("cli-metrics-flag").await;
    for sub in ["register", "watch", "campaign", "observe", "lock"] {
        let help = ctx.stdout(&[sub, "--help"]).await;
        assert!(
            help.contains("--metrics-addr <HOST:PORT>"),
            "{sub}:\n{help}"
        );
    }
    // A port already in use fails before anything reaches etcd, naming it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local addr").to_string();
    let out = ctx
        .run(&["watch", "web", "--metrics-addr", &addr, "--timeout", "10s"])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")),
        "{stderr}"
    );
    let out = ctx
        .run(&["observe", "x", "--metrics-addr", "nowhere"])
        .await;
    assert_eq!(out.status.code(), Some(2), "a bad address is a usage error");
}
