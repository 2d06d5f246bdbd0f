//! `register` with health checks and `register ... -- CMD` (the sidecar),
//! with the real binary against testkit etcd: the key is there only while
//! the check passes, SIGTERM deregisters before CMD gets the signal, and
//! CMD's exit status is passed on.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use etcd_registry_testkit::HealthEndpoint;
use tokio::time::Instant;

/// On SIGTERM, appends `term` to $LOG and exits 7; `wait` returns at once
/// on a trapped signal, so the line is written as soon as SIGTERM arrives.
const SERVER: &str = r#"trap 'echo term >> "$LOG"; kill $! 2>/dev/null; exit 7' TERM
echo "started $ETCD_REGISTRY_SERVICE $ETCD_REGISTRY_ID $ETCD_REGISTRY_KEY" >> "$LOG"
sleep 1000 & wait $!"#;

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

async fn key_present(ctx: &Ctx, id: &str) -> bool {
    ctx.raw_keys_under(&format!("services/web/{id}"))
        .await
        .iter()
        .any(|k| k.ends_with(&format!("/web/{id}")))
}

/// Also a mutation check, done by hand: with the `registry.shutdown(drain)`
/// call removed from the drain closure in `register.rs`, the key is still
/// there when CMD records SIGTERM, and the assertion on the log fails.
#[tokio::test]
async fn sidecar_deregisters_before_cmd_gets_sigterm_and_passes_its_status_on() {
    let ctx = Ctx::new("cli-sidecar").await;
    let dir = Dir::new();
    let endpoint = HealthEndpoint::start().await.unwrap();
    endpoint.set_healthy(false);
    let url = endpoint.url("/healthz");
    let drain = Duration::from_secs(2);
    let mut cmd = ctx.command(&[
        "register",
        "web",
        "w-1",
        "127.0.0.1",
        "8080",
        "--check-http",
        &url,
        "--interval",
        "200ms",
        "--rise",
        "1",
        "--fall",
        "1",
        "--drain",
        "2s",
        "--",
        "sh",
        "-c",
        SERVER,
    ]);
    cmd.env("LOG", dir.path("log"));
    let mut cli = Background::start(cmd, &["register ... -- SERVER"]);

    // CMD runs, but the instance stays out while its check fails.
    eventually("CMD started", || async {
        dir.read("log")
            .starts_with("started web w-1 /etcd_registry/")
            .then_some(())
    })
    .await;
    eventually("two failed checks", || async {
        (endpoint.requests() >= 2).then_some(())
    })
    .await;
    assert!(
        !key_present(&ctx, "w-1").await,
        "registered while failing its check"
    );

    endpoint.set_healthy(true);
    eventually("registered once healthy", || async {
        key_present(&ctx, "w-1").await.then_some(())
    })
    .await;

    cli.sigterm();
    let signalled = Instant::now();
    eventually("deregistered on SIGTERM", || async {
        (!key_present(&ctx, "w-1").await).then_some(())
    })
    .await;
    let deregistered = Instant::now();
    assert!(
        !dir.read("log").contains("term"),
        "CMD got SIGTERM before the key was deleted"
    );
    eventually("CMD got SIGTERM", || async {
        dir.read("log").contains("term").then_some(())
    })
    .await;
    let forwarded = Instant::now();
    let status = cli.exit().await;
    assert_eq!(status.code(), Some(7), "CMD's status is the CLI's");
    // The drain waited between the two, give or take the 50 ms polling.
    assert!(
        forwarded - deregistered >= drain - Duration::from_millis(500),
        "SIGTERM reached CMD {:?} after the key was gone, drain {drain:?} (signal sent {:?} before)",
        forwarded - deregistered,
        forwarded - signalled,
    );
    let stderr = cli.stderr().await;
    assert!(
        stderr.contains("etcd-registry: received terminate; deregistering"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sidecar_deregisters_at_once_when_cmd_exits_and_check_cmd_gates_it() {
    let ctx = Ctx::new("cli-sidecar-exit").await;
    let dir = Dir::new();
    let ready = dir.path("ready");
    let stop = dir.path("stop");
    std::fs::write(&ready, "").unwrap();
    let check = format!("test -e '{}'", ready.display());
    let script = format!(
        "while [ ! -e '{}' ]; do sleep 0.05; done; exit 3",
        stop.display()
    );
    let mut cli = ctx.spawn(&[
        "--ttl",
        "30s",
        "register",
        "web",
        "w-2",
        "127.0.0.1",
        "8080",
        "--check-cmd",
        &check,
        "--interval",
        "200ms",
        "--rise",
        "1",
        "--fall",
        "1",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    eventually("registered while the check command passes", || async {
        key_present(&ctx, "w-2").await.then_some(())
    })
    .await;
    std::fs::remove_file(&ready).unwrap();
    eventually("out when the check command fails", || async {
        (!key_present(&ctx, "w-2").await).then_some(())
    })
    .await;
    std::fs::write(&ready, "").unwrap();
    eventually("back when it passes again", || async {
        key_present(&ctx, "w-2").await.then_some(())
    })
    .await;

    std::fs::write(&stop, "").unwrap();
    let status = cli.exit().await;
    assert_eq!(status.code(), Some(3), "CMD's status is the CLI's");
    // Deleted by the CLI on its way out, not left to the 30 s TTL.
    assert!(!key_present(&ctx, "w-2").await, "the key outlived the CLI");
}

#[tokio::test]
async fn register_with_a_check_and_no_cmd_prints_transitions() {
    let ctx = Ctx::new("cli-check").await;
    let endpoint = HealthEndpoint::start().await.unwrap();
    let url = endpoint.url("/");
    let mut cli = ctx.spawn(&[
        "register",
        "web",
        "w-3",
        "127.0.0.1",
        "8080",
        "--check-http",
        &url,
        "--interval",
        "200ms",
        "--rise",
        "1",
        "--fall",
        "1",
    ]);
    assert!(
        cli.next_line()
            .await
            .starts_with("registering web/w-3 at 127.0.0.1:8080")
    );
    assert_eq!(
        cli.line_starting("healthy").await,
        "healthy: registered web/w-3"
    );
    endpoint.set_healthy(false);
    let line = cli.line_starting("unhealthy").await;
    assert!(line.contains("status 503"), "{line}");
    assert!(!key_present(&ctx, "w-3").await);
    cli.sigterm();
    assert!(cli.exit().await.success());
}

#[tokio::test]
async fn bad_check_options_exit_2_before_anything_is_written() {
    let ctx = Ctx::new("cli-check-bad").await;
    let base = ["register", "web", "w-4", "127.0.0.1", "8080"];
    for extra in [
        &["--check-http", "https://127.0.0.1/h"][..],
        &["--check-tcp", "no-port"],
        &["--check-grpc", "127.0.0.1/svc"],
        &["--check-tcp", "127.0.0.1:1", "--rise", "0"],
        &["--interval", "1s"],
        &["--grace", "1s"],
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = ctx.run(&args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(ctx.raw_keys().await, "", "something was written");
}
