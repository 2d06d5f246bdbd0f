//! `lock -- CMD` and `campaign -- CMD` leave nothing of CMD behind: when
//! CMD's first process exits, the processes it started (its process group,
//! and on Linux any descendant that left the group) are stopped, SIGTERM
//! then SIGKILL, before the lock is released or the leadership resigned;
//! and a CLI killed with SIGKILL takes CMD's group with it.
//!
//! Every CMD writes the pids it starts to a log (`leader PID`, `worker
//! PID`); a [`Reap`] guard kills whatever of them is still running when a
//! test ends, pass or fail, by PID.

mod common;

use std::path::PathBuf;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;

struct Log {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log");
        Log { dir, path }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The pid logged as `{what} PID`.
    fn pid(&self, what: &str) -> i32 {
        self.pids(what)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no `{what} PID` line in {:?}", self.lines()))
    }

    fn pids(&self, what: &str) -> Vec<i32> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix(what)?.strip_prefix(' ')?.parse().ok())
            .collect()
    }

    async fn wait_for(&self, line: &str) {
        eventually(&format!("the log line {line:?}"), || async {
            self.lines()
                .iter()
                .any(|l| l.starts_with(line))
                .then_some(())
        })
        .await;
    }
}

/// Kills, by PID, every process the log names that is still there (and
/// still a `sh` or `sleep`, against pid reuse) when the test ends.
struct Reap<'a>(&'a Log);

impl Drop for Reap<'_> {
    fn drop(&mut self) {
        for line in self.0.lines() {
            let Some(pid) = line.split(' ').nth(1).and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if matches!(comm.trim(), "sh" | "sleep") {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// The processes of group `pgid` (`pgrep -g`, zombies included).
async fn group(pgid: i32) -> Vec<String> {
    let mut cmd = Command::new("pgrep");
    cmd.args(["-a", "-g", &pgid.to_string()]);
    let out = run(cmd, &["pgrep -g"]).await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether `pid` is a process that has not exited (zombies do not count).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `{leader} $$`, a background worker that logs `{worker} $!`, and then
/// waits for the file `go` (at most 20 s) and exits 0. The worker loops
/// until SIGTERM; then it logs `{name}-worker-stopped` after half a second
/// and exits.
const DETACHING: &str = r#"echo "leader $$" >> "$LOG"
( trap 'sleep 0.5; echo "$NAME-worker-stopped" >> "$LOG"; exit 0' TERM
  while :; do sleep 0.1; done ) &
echo "worker $!" >> "$LOG"
i=0; while [ ! -e "$DIR/go" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
exit 0"#;

/// A second holder: logs `{name}-start` as soon as it runs.
const STARTS: &str = r#"echo "$NAME-start" >> "$LOG""#;

fn cli(ctx: &Ctx, log: &Log, args: &[&str], name: &str, script: &str) -> Command {
    let mut cmd = ctx.command(args);
    cmd.args(["--", "sh", "-c", script])
        .env("LOG", &log.path)
        .env("DIR", log.dir.path())
        .env("NAME", name);
    cmd
}

/// CLI `a` runs [`DETACHING`]; CLI `b` queues behind it with [`STARTS`].
/// Once `a`'s first process exits, its worker must be stopped (and log so)
/// before `b` may start, and nothing of `a`'s group is left when `a` exits.
async fn the_group_goes_before_the_next_holder_starts(
    prefix: &str,
    a_args: &[&str],
    b_args: &[&str],
    queue: &str,
) {
    let ctx = Ctx::new(prefix).await;
    let log = Log::new();
    let _reap = Reap(&log);
    let mut a = Background::start(cli(&ctx, &log, a_args, "a", DETACHING), a_args);
    log.wait_for("worker ").await;
    let (leader, worker) = (log.pid("leader"), log.pid("worker"));
    let mut b = Background::start(cli(&ctx, &log, b_args, "b", STARTS), b_args);
    eventually("b queued behind a", || async {
        (ctx.raw_keys_under(queue).await.len() == 2).then_some(())
    })
    .await;
    std::fs::write(log.dir.path().join("go"), "").expect("write go");
    let status = a.exit().await;
    let stderr = a.stderr().await;
    assert!(status.success(), "a exited with {status}: {stderr}");
    assert_eq!(group(leader).await, Vec::<String>::new(), "a: {stderr}");
    assert!(
        !exists(worker),
        "a's worker {worker} still exists: {stderr}"
    );
    assert!(b.exit().await.success(), "b: {}", b.stderr().await);
    let lines = log.lines();
    let stopped = lines.iter().position(|l| l == "a-worker-stopped");
    let started = lines.iter().position(|l| l == "b-start");
    assert!(
        matches!((stopped, started), (Some(s), Some(b)) if s < b),
        "a's worker must stop (gracefully) before b starts: {lines:?}\n{stderr}"
    );
}

/// Checked by hand: see the report.
#[tokio::test]
async fn lock_stops_the_commands_group_before_releasing() {
    the_group_goes_before_the_next_holder_starts(
        "cli-group-lock",
        &["lock", "job"],
        &["lock", "job"],
        "locks/job/",
    )
    .await;
}

#[tokio::test]
async fn campaign_stops_the_commands_group_before_resigning() {
    the_group_goes_before_the_next_holder_starts(
        "cli-group-campaign",
        &["campaign", "job", "a"],
        &["campaign", "job", "b"],
        "elections/job/",
    )
    .await;
}

/// A worker that ignores SIGTERM is killed after `--grace`; one that left
/// the group with setsid(2) is stopped too. The CLI exits with the status
/// of CMD's first process (0).
#[tokio::test]
async fn a_stubborn_worker_is_killed_after_the_grace_and_a_setsid_one_is_stopped_too() {
    const SCRIPT: &str = r#"echo "leader $$" >> "$LOG"
( trap '' TERM; while :; do sleep 0.1; done ) &
echo "worker $!" >> "$LOG"
setsid sleep 277 &
echo "setsid $!" >> "$LOG"
sleep 0.2
exit 0"#;
    let ctx = Ctx::new("cli-group-stubborn").await;
    let log = Log::new();
    let _reap = Reap(&log);
    for args in [
        &["lock", "job", "--grace", "1s"][..],
        &["campaign", "job", "me", "--grace", "1s"][..],
    ] {
        std::fs::write(&log.path, "").expect("truncate the log");
        let out = run(cli(&ctx, &log, args, "me", SCRIPT), args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {}: {stderr}", out.status);
        let (leader, worker, setsid) = (log.pid("leader"), log.pid("worker"), log.pid("setsid"));
        assert_eq!(
            group(leader).await,
            Vec::<String>::new(),
            "{args:?}: {stderr}"
        );
        assert!(!exists(worker), "{args:?}: worker {worker} left: {stderr}");
        assert!(
            !exists(setsid),
            "{args:?}: the setsid worker {setsid} left: {stderr}"
        );
        assert!(
            stderr.contains("still running after the grace period: SIGKILL"),
            "{args:?}: {stderr}"
        );
    }
}

/// A CLI killed with SIGKILL cannot stop CMD itself: CMD's whole group is
/// killed anyway (not only its first process), well before the lease
/// would let another holder in.
#[tokio::test]
async fn a_cli_killed_with_sigkill_takes_the_commands_group_with_it() {
    const SCRIPT: &str = r#"echo "leader $$" >> "$LOG"
sleep 277 &
echo "worker $!" >> "$LOG"
wait"#;
    let ctx = Ctx::new("cli-group-sigkill").await;
    for args in [&["lock", "job"][..], &["campaign", "job", "me"][..]] {
        let log = Log::new();
        let _reap = Reap(&log);
        let mut cli = Background::start(cli(&ctx, &log, args, "me", SCRIPT), args);
        log.wait_for("worker ").await;
        let (leader, worker) = (log.pid("leader"), log.pid("worker"));
        cli.signal("KILL");
        cli.exit().await;
        eventually(&format!("{args:?}: group {leader} to end"), || async {
            (!alive(leader) && !alive(worker)).then_some(())
        })
        .await;
        // Zombies, if any, are for init to reap: wait for it, bounded.
        eventually(&format!("{args:?}: group {leader} reaped"), || async {
            group(leader).await.is_empty().then_some(())
        })
        .await;
    }
}
