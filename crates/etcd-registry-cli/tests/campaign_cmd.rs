//! `campaign ELECTION PROPOSAL -- CMD` with the real binary against testkit
//! etcd: CMD runs only while leading, is stopped on a loss before a rival's
//! CMD starts, and its exit status is passed on.
//!
//! Each CMD is a small `sh` script that appends `start`/`stop` lines to a
//! shared log file. Appends from several processes land in the order they
//! happen, so the file's order is the real order of starts and stops.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use etcd_registry_testkit::FaultProxy;
use tokio::process::Command;

/// Appends `start NAME TOKEN ELECTION LEASE`, then waits; on SIGTERM appends
/// `stop NAME TOKEN` and exits 0. `wait` returns at once on a trapped
/// signal, so the stop line is written as soon as SIGTERM arrives.
const WORKER: &str = r#"trap 'echo "stop $NAME $ETCD_REGISTRY_FENCING_TOKEN" >> "$LOG"; kill $! 2>/dev/null; exit 0' TERM
echo "start $NAME $ETCD_REGISTRY_FENCING_TOKEN $ETCD_REGISTRY_ELECTION $ETCD_REGISTRY_LEASE_ID" >> "$LOG"
sleep 1000 & wait $!"#;

/// Like [`WORKER`] but survives SIGTERM (it logs `term NAME`), so only
/// SIGKILL ends it.
const STUBBORN: &str = r#"trap 'echo "term $NAME" >> "$LOG"' TERM
echo "start $NAME $ETCD_REGISTRY_FENCING_TOKEN $ETCD_REGISTRY_ELECTION $ETCD_REGISTRY_LEASE_ID" >> "$LOG"
while :; do sleep 0.1; done"#;

struct Log {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log");
        Log { _dir: dir, path }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until a line starts with `prefix`; returns its index and text.
    async fn wait_for(&self, prefix: &str) -> (usize, String) {
        eventually(&format!("a log line starting with {prefix:?}"), || async {
            self.lines()
                .into_iter()
                .enumerate()
                .find(|(_, l)| l.starts_with(prefix))
        })
        .await
    }
}

/// `campaign` with `-- sh -c SCRIPT`, the log file and a NAME for the script,
/// connected to `endpoint` (the shared etcd when `None`).
fn campaign(
    ctx: &Ctx,
    endpoint: Option<&str>,
    flags: &[&str],
    name: &str,
    log: &Path,
    script: &str,
) -> Command {
    let endpoint = endpoint.map_or_else(|| ctx.etcd.endpoint(), str::to_owned);
    let mut cmd = bare_command();
    cmd.args(["--endpoints", &endpoint, "--namespace", &ctx.ns, "campaign"])
        .args(flags)
        .args(["--", "sh", "-c", script])
        .env("NAME", name)
        .env("LOG", log);
    cmd
}

fn field(line: &str, n: usize) -> &str {
    line.split(' ')
        .nth(n)
        .unwrap_or_else(|| panic!("no field {n} in {line:?}"))
}

#[tokio::test]
async fn cmd_runs_only_after_etcdctl_elect_resigns_and_gets_the_leadership_in_its_env() {
    let ctx = Ctx::new("cli-cmd-etcdctl").await;
    let log = Log::new();
    let election = format!("/etcd_registry/{}/elections/job", ctx.ns);
    let mut elect = ctx.etcd.etcdctl();
    elect.args(["elect", &election, "etcdctl-leader"]);
    let mut etcdctl = Background::start(elect, &["etcdctl elect"]);
    // etcdctl prints the leader key once it leads.
    etcdctl.line_starting(&election).await;

    let mut cli = Background::start(
        campaign(&ctx, None, &["job", "me"], "me", &log.path, WORKER),
        &["campaign job me -- WORKER"],
    );
    eventually("the CLI's candidate key behind etcdctl's", || async {
        (ctx.raw_keys_under("elections/job/").await.len() == 2).then_some(())
    })
    .await;
    // An observation window, not a synchronisation: the CLI is queued behind
    // etcdctl, and nothing may start while etcdctl leads.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        log.lines(),
        Vec::<String>::new(),
        "CMD ran while etcdctl led"
    );
    assert!(
        ctx.stdout(&["leader", "job"])
            .await
            .starts_with("leader: etcdctl-leader "),
    );

    etcdctl.signal("INT"); // etcdctl elect resigns on SIGINT
    assert!(
        etcdctl.exit().await.success(),
        "etcdctl elect did not resign"
    );
    let (_, start) = log.wait_for("start me ").await;

    let leader: serde_json::Value =
        serde_json::from_str(&ctx.stdout(&["leader", "job", "--json"]).await).expect("JSON");
    assert_eq!(leader["leader"]["proposal"], "me");
    assert_eq!(
        field(&start, 2),
        leader["leader"]["fencing_token"].to_string(),
        "ETCD_REGISTRY_FENCING_TOKEN"
    );
    assert_eq!(field(&start, 3), "job", "ETCD_REGISTRY_ELECTION");
    assert_eq!(
        field(&start, 4),
        leader["leader"]["lease_id"].as_str().expect("hex lease"),
        "ETCD_REGISTRY_LEASE_ID"
    );

    // SIGTERM to the CLI reaches CMD; CMD exits 0, the CLI resigns and exits 0.
    cli.sigterm();
    let status = cli.exit().await;
    let stderr = cli.stderr().await;
    assert!(status.success(), "campaign exited with {status}: {stderr}");
    assert!(
        log.lines().iter().any(|l| l.starts_with("stop me ")),
        "{:?}",
        log.lines()
    );
    assert!(
        stderr.contains("etcd-registry: received terminate; forwarding it to the command"),
        "{stderr}"
    );
    assert_eq!(
        cli.rest().await,
        Vec::<String>::new(),
        "the CLI's lines go to stderr"
    );
    assert_eq!(ctx.stdout(&["leader", "job"]).await, "no leader\n");
}

#[tokio::test]
async fn cmd_exit_status_is_passed_on_and_the_cli_resigns() {
    let ctx = Ctx::new("cli-cmd-exit").await;
    for (script, code) in [
        ("echo out; echo err >&2; exit 7", 7),
        ("kill -KILL $$", 128 + 9),
        ("exit 0", 0),
    ] {
        let out = ctx
            .run(&["campaign", "job", "me", "--", "sh", "-c", script])
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{script}: {stderr}");
        assert!(
            stderr.contains("etcd-registry: leader (fencing token "),
            "{stderr}"
        );
        assert!(stderr.contains("; resigning"), "{stderr}");
        if code == 7 {
            // CMD's output passes through untouched.
            assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
            assert!(stderr.lines().any(|l| l == "err"), "{stderr}");
        }
    }
    let out = ctx
        .run(&["campaign", "job", "me", "--", "/no/such/program"])
        .await;
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert_eq!(ctx.stdout(&["leader", "job"]).await, "no leader\n");
    assert_eq!(ctx.raw_keys().await, "");
}

#[tokio::test]
async fn a_loss_stops_cmd_with_sigkill_after_grace_then_it_restarts_on_the_next_win() {
    let ctx = Ctx::new("cli-cmd-loss").await;
    let log = Log::new();
    let mut cli = Background::start(
        campaign(
            &ctx,
            None,
            &["job", "me", "--grace", "1s"],
            "me",
            &log.path,
            STUBBORN,
        ),
        &["campaign job me -- STUBBORN"],
    );
    let (_, first) = log.wait_for("start me ").await;
    let key = ctx.raw_keys_under("elections/job/").await;
    assert_eq!(key.len(), 1, "{key:?}");
    let mut del = ctx.etcd.etcdctl();
    del.args(["del", &key[0]]);
    assert!(run(del, &["etcdctl del"]).await.status.success());

    // lost() fires (key deleted): SIGTERM, ignored, SIGKILL after 1 s, a new
    // campaign, a new win with a higher token, a new start.
    let (term_at, _) = log.wait_for("term me").await;
    let second = eventually("a second start", || async {
        log.lines()
            .into_iter()
            .skip(term_at)
            .find(|l| l.starts_with("start me "))
    })
    .await;
    let token = |l: &str| field(l, 2).parse::<i64>().expect("token");
    assert!(token(&second) > token(&first), "{first} then {second}");

    // SIGTERM to the CLI is forwarded, ignored, and SIGKILL follows the grace.
    cli.sigterm();
    let status = cli.exit().await;
    let stderr = cli.stderr().await;
    assert_eq!(status.code(), Some(128 + 9), "{stderr}");
    assert_eq!(
        stderr
            .matches("still running after the grace period: SIGKILL")
            .count(),
        2,
        "{stderr}"
    );
    assert!(
        stderr.contains("etcd-registry: leadership lost (the leader key was deleted)"),
        "{stderr}"
    );
    assert_eq!(ctx.stdout(&["leader", "job"]).await, "no leader\n");
}

#[tokio::test]
async fn with_once_a_loss_exits_1() {
    let ctx = Ctx::new("cli-cmd-once").await;
    let log = Log::new();
    let mut cli = Background::start(
        campaign(
            &ctx,
            None,
            &["job", "me", "--once"],
            "me",
            &log.path,
            WORKER,
        ),
        &["campaign --once job me -- WORKER"],
    );
    log.wait_for("start me ").await;
    let key = ctx.raw_keys_under("elections/job/").await;
    let mut del = ctx.etcd.etcdctl();
    del.args(["del", &key[0]]);
    assert!(run(del, &["etcdctl del"]).await.status.success());
    let status = cli.exit().await;
    let stderr = cli.stderr().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: leadership lost: the leader key was deleted"),
        "{stderr}"
    );
    let lines = log.lines();
    assert_eq!(lines.len(), 2, "one start, one stop: {lines:?}");
    assert!(lines[1].starts_with("stop me "), "{lines:?}");
}

/// The safety bound end to end: A leads through a proxy that is then
/// blackholed; A's CMD must get SIGTERM before B's CMD starts.
///
/// Checked by hand: with `leadership.lost()` replaced by a future that never
/// resolves in src/cmd/campaign/supervised.rs, this test fails ("start b" with no "stop a"
/// before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_leader_stops_its_cmd_before_the_rival_starts_its_own() {
    let ctx = Ctx::new("cli-cmd-blackhole").await;
    let log = Log::new();
    let proxy = FaultProxy::start(&ctx.etcd.endpoint())
        .await
        .expect("proxy");
    let ttl = ["job", "x", "--ttl", "3"];
    let mut a = Background::start(
        campaign(&ctx, Some(&proxy.endpoint()), &ttl, "a", &log.path, WORKER),
        &["campaign (A, through the proxy)"],
    );
    log.wait_for("start a ").await;
    let mut b = Background::start(
        campaign(&ctx, None, &ttl, "b", &log.path, WORKER),
        &["campaign (B)"],
    );
    eventually("B's candidate key behind A's", || async {
        (ctx.raw_keys_under("elections/job/").await.len() == 2).then_some(())
    })
    .await;

    proxy.blackhole();
    let (b_started, _) = log.wait_for("start b ").await;
    let lines = log.lines();
    let a_stopped = lines.iter().position(|l| l.starts_with("stop a "));
    assert!(
        a_stopped.is_some_and(|i| i < b_started),
        "A's CMD was not stopped before B's started: {lines:?}"
    );
    let token = |l: &str| field(l, 2).parse::<i64>().expect("token");
    assert!(token(&lines[b_started]) > token(&lines[0]), "{lines:?}");

    b.sigterm();
    let status = b.exit().await;
    assert!(
        status.success(),
        "B exited with {status}: {}",
        b.stderr().await
    );
    assert!(log.lines().iter().any(|l| l.starts_with("stop b ")));
    // A is cut off and campaigns in vain; it is SIGKILLed on drop.
    a.signal("KILL");
    a.exit().await;
}

/// A CLI that dies without stopping CMD (SIGKILL) must not leave CMD running
/// past its leadership: CMD is killed with it (`PR_SET_PDEATHSIG`).
///
/// Checked by hand: without the `pre_exec` in src/supervise.rs this test
/// fails (the CMD process is still alive).
#[tokio::test]
async fn cmd_dies_with_a_killed_cli() {
    let ctx = Ctx::new("cli-cmd-orphan").await;
    let log = Log::new();
    // `exec` keeps the pid and the parent-death signal.
    let script = r#"echo "start $NAME $$" >> "$LOG"; exec sleep 1000"#;
    let mut cli = Background::start(
        campaign(&ctx, None, &["job", "me"], "me", &log.path, script),
        &["campaign job me -- sleep"],
    );
    let (_, start) = log.wait_for("start me ").await;
    let pid = nix::unistd::Pid::from_raw(field(&start, 2).parse().expect("pid"));
    assert!(nix::sys::signal::kill(pid, None).is_ok(), "CMD is running");
    cli.signal("KILL");
    cli.exit().await;
    eventually("CMD to die with the CLI", || async {
        // ESRCH: gone. A zombie would still answer, but CMD's parent (the CLI)
        // is gone, so init reaps it.
        nix::sys::signal::kill(pid, None).is_err().then_some(())
    })
    .await;
}

/// Ctrl-C reaches CMD as SIGINT (forwarded once, to CMD's process group), and
/// the CLI exits with CMD's status.
#[tokio::test]
async fn sigint_is_forwarded_as_sigint_and_cmd_status_is_the_exit_status() {
    let ctx = Ctx::new("cli-cmd-sigint").await;
    let log = Log::new();
    let script = r#"trap 'echo "int $NAME" >> "$LOG"; kill $! 2>/dev/null; exit 3' INT
echo "start $NAME" >> "$LOG"
sleep 1000 & wait $!"#;
    let mut cli = Background::start(
        campaign(&ctx, None, &["job", "me"], "me", &log.path, script),
        &["campaign job me -- INT trap"],
    );
    log.wait_for("start me").await;
    cli.signal("INT");
    let status = cli.exit().await;
    let stderr = cli.stderr().await;
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert_eq!(
        log.lines(),
        ["start me", "int me"],
        "one SIGINT, forwarded once"
    );
    assert!(
        stderr.contains("received interrupt; forwarding it"),
        "{stderr}"
    );
    assert_eq!(ctx.stdout(&["leader", "job"]).await, "no leader\n");
}
