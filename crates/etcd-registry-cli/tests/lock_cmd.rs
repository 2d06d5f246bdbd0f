//! `lock NAME [--timeout D] [-- CMD]` with the real binary against testkit
//! etcd: mutual exclusion, `etcdctl lock` interop, the fencing token in
//! CMD's environment, --timeout, exit statuses, and a loss stopping CMD.
//!
//! Each CMD is a small `sh` script that appends lines to a shared log file.
//! Appends from several processes land in the order they happen, so the
//! file's order is the real order of starts and stops.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tokio::process::Command;

/// Appends `start NAME TOKEN LOCK LEASE`, then waits; on SIGTERM appends
/// `stop NAME TOKEN` and exits 0. `wait` returns at once on a trapped
/// signal, so the stop line is written as soon as SIGTERM arrives.
const WORKER: &str = r#"trap 'echo "stop $NAME $ETCD_REGISTRY_FENCING_TOKEN" >> "$LOG"; kill $! 2>/dev/null; exit 0' TERM
echo "start $NAME $ETCD_REGISTRY_FENCING_TOKEN $ETCD_REGISTRY_LOCK $ETCD_REGISTRY_LEASE_ID" >> "$LOG"
sleep 1000 & wait $!"#;

/// A short critical section: `start NAME TOKEN`, half a second, `stop NAME`.
const SECTION: &str = r#"echo "start $NAME $ETCD_REGISTRY_FENCING_TOKEN" >> "$LOG"
sleep 0.5
echo "stop $NAME" >> "$LOG""#;

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

    async fn wait_for(&self, prefix: &str) -> String {
        eventually(&format!("a log line starting with {prefix:?}"), || async {
            self.lines().into_iter().find(|l| l.starts_with(prefix))
        })
        .await
    }
}

/// `lock FLAGS... -- sh -c SCRIPT`, with the log file and a NAME for the script.
fn lock(ctx: &Ctx, flags: &[&str], name: &str, log: &Path, script: &str) -> Command {
    let mut cmd = ctx.command(&["lock"]);
    cmd.args(flags)
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

/// The create revision of `key`, read with etcdctl.
async fn create_revision(ctx: &Ctx, key: &str) -> i64 {
    let mut get = ctx.etcd.etcdctl();
    get.args(["get", key, "-w", "json"]);
    let out = run(get, &["etcdctl get -w json"]).await;
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    json["kvs"][0]["create_revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no create_revision for {key}: {json}"))
}

/// Checked by hand: with each CLI locking a name of its own (the process id
/// appended in src/cmd/lock/hold.rs), this test fails with interleaved starts, and so
/// does the etcdctl one.
#[tokio::test]
async fn three_clis_run_their_cmds_one_at_a_time() {
    let ctx = Ctx::new("cli-lock-mutex").await;
    let log = Log::new();
    let mut clis: Vec<Background> = ["a", "b", "c"]
        .into_iter()
        .map(|name| Background::start(lock(&ctx, &["job"], name, &log.path, SECTION), &[name]))
        .collect();
    for cli in &mut clis {
        let status = cli.exit().await;
        assert!(status.success(), "{status}: {}", cli.stderr().await);
    }
    // Without the lock the three sections overlap (each sleeps while the
    // others start); with it, every start is followed by its own stop.
    let lines = log.lines();
    assert_eq!(lines.len(), 6, "{lines:?}");
    let mut tokens = Vec::new();
    for pair in lines.chunks(2) {
        let name = field(&pair[0], 1);
        assert!(pair[0].starts_with("start "), "{lines:?}");
        assert_eq!(pair[1], format!("stop {name}"), "{lines:?}");
        tokens.push(field(&pair[0], 2).parse::<i64>().expect("token"));
    }
    assert!(tokens.is_sorted() && tokens[0] < tokens[2], "{tokens:?}");
    assert_eq!(ctx.raw_keys().await, "", "every CLI released its key");
}

#[tokio::test]
async fn the_cli_waits_while_etcdctl_holds_the_lock_and_cmd_gets_its_fencing_token() {
    let ctx = Ctx::new("cli-lock-etcdctl").await;
    let log = Log::new();
    let name = format!("/etcd_registry/{}/locks/job", ctx.ns);
    let mut hold = ctx.etcd.etcdctl();
    hold.args(["lock", &name]);
    let mut etcdctl = Background::start(hold, &["etcdctl lock"]);
    // etcdctl prints its key once it holds the lock.
    etcdctl.line_starting(&name).await;

    let mut cli = Background::start(
        lock(&ctx, &["job"], "me", &log.path, WORKER),
        &["lock job -- WORKER"],
    );
    let keys = eventually("the CLI's key behind etcdctl's", || async {
        let keys = ctx.raw_keys_under("locks/job/").await;
        (keys.len() == 2).then_some(keys)
    })
    .await;
    // An observation window, not a synchronisation: the CLI is queued behind
    // etcdctl, and CMD may not start while etcdctl holds the lock.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.lines(), Vec::<String>::new(), "CMD ran under etcdctl");
    // `status` names etcdctl as the holder (the older key) and the CLI as its waiter.
    let status: serde_json::Value =
        serde_json::from_str(&ctx.stdout(&["status", "--json"]).await).expect("JSON");
    let mut revisions = Vec::new();
    for key in &keys {
        revisions.push(create_revision(&ctx, key).await);
    }
    let holder = revisions.iter().min().expect("two keys");
    assert_eq!(
        status["namespace"]["locks"],
        serde_json::json!([{
            "name": "job",
            "fencing_token": holder,
            "lease_id": keys[revisions.iter().position(|r| r == holder).expect("holder")]
                .rsplit('/')
                .next(),
            "waiters": 1,
        }]),
        "{status}"
    );

    etcdctl.signal("INT"); // etcdctl lock releases on SIGINT
    assert!(etcdctl.exit().await.success(), "etcdctl lock did not exit");
    let start = log.wait_for("start me ").await;
    let ours = ctx.raw_keys_under("locks/job/").await;
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert!(keys.contains(&ours[0]), "{keys:?} then {ours:?}");
    assert_eq!(
        field(&start, 2),
        create_revision(&ctx, &ours[0]).await.to_string(),
        "ETCD_REGISTRY_FENCING_TOKEN is the key's create revision"
    );
    assert_eq!(field(&start, 3), "job", "ETCD_REGISTRY_LOCK");
    assert!(
        ours[0].ends_with(&format!("/{}", field(&start, 4))),
        "ETCD_REGISTRY_LEASE_ID names the key: {start} {ours:?}"
    );

    // SIGTERM reaches CMD, which exits 0; the CLI releases and exits 0.
    cli.sigterm();
    let status = cli.exit().await;
    let stderr = cli.stderr().await;
    assert!(status.success(), "lock exited with {status}: {stderr}");
    assert!(log.lines().iter().any(|l| l.starts_with("stop me ")));
    assert!(stderr.contains("etcd-registry: released"), "{stderr}");
    assert_eq!(
        cli.rest().await,
        Vec::<String>::new(),
        "CLI lines go to stderr"
    );
    assert_eq!(ctx.raw_keys().await, "");
}

/// Checked by hand: with src/cmd/lock/hold.rs waiting 1000 times --timeout, this test
/// fails (the second CLI does not exit).
#[tokio::test]
async fn timeout_exits_1_and_leaves_no_key_and_the_holder_releases_on_sigterm() {
    let ctx = Ctx::new("cli-lock-timeout").await;
    let mut holder = ctx.spawn(&["lock", "job"]);
    let locked = holder.line_starting("locked (fencing token ").await;

    let out = ctx
        .run(&["lock", "job", "--timeout", "1s", "--", "true"])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("was not acquired within 1s"), "{stderr}");
    let keys = ctx.raw_keys_under("locks/job/").await;
    assert_eq!(keys.len(), 1, "only the holder's key is left: {keys:?}");
    let token = locked
        .trim_start_matches("locked (fencing token ")
        .split(',')
        .next()
        .expect("token");
    assert_eq!(token, create_revision(&ctx, &keys[0]).await.to_string());

    holder.sigterm();
    let status = holder.exit().await;
    assert!(status.success(), "{status}: {}", holder.stderr().await);
    assert_eq!(
        holder.rest().await,
        ["received terminate; releasing", "released"]
    );
    assert_eq!(ctx.raw_keys().await, "");
}

#[tokio::test]
async fn cmd_exit_status_is_passed_on_and_a_bad_name_exits_2() {
    let ctx = Ctx::new("cli-lock-exit").await;
    for (script, code) in [
        ("echo out; exit 7", 7),
        ("kill -KILL $$", 128 + 9),
        ("exit 0", 0),
    ] {
        let out = ctx.run(&["lock", "job", "--", "sh", "-c", script]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{script}: {stderr}");
        assert!(stderr.contains("etcd-registry: released"), "{stderr}");
        if code == 7 {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        }
    }
    let out = ctx.run(&["lock", "job", "--", "/no/such/program"]).await;
    assert_eq!(out.status.code(), Some(127), "{out:?}");

    let out = ctx.run(&["lock", "a/b", "--", "true"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid lock"), "{stderr}");
    assert_eq!(ctx.raw_keys().await, "");
}

/// Checked by hand: with `guard.lost()` replaced by a future that never
/// resolves in src/cmd/lock/hold.rs (`supervise`), this test fails (CMD is never
/// stopped and the CLI does not exit).
#[tokio::test]
async fn a_deleted_key_stops_cmd_with_sigterm_and_exits_1() {
    let ctx = Ctx::new("cli-lock-loss").await;
    let log = Log::new();
    let mut cli = Background::start(
        lock(&ctx, &["job"], "me", &log.path, WORKER),
        &["lock job -- WORKER"],
    );
    log.wait_for("start me ").await;
    let key = ctx.raw_keys_under("locks/job/").await;
    assert_eq!(key.len(), 1, "{key:?}");
    let mut del = ctx.etcd.etcdctl();
    del.args(["del", &key[0]]);
    assert!(run(del, &["etcdctl del"]).await.status.success());

    let status = cli.exit().await;
    let stderr = cli.stderr().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: the lock was lost: the lock key was deleted"),
        "{stderr}"
    );
    let lines = log.lines();
    assert_eq!(lines.len(), 2, "one start, one stop, no restart: {lines:?}");
    assert!(lines[1].starts_with("stop me "), "{lines:?}");
    assert_eq!(ctx.raw_keys().await, "");
}

/// The other direction of the interop: `etcdctl lock` waits while the CLI
/// holds the lock. And a CLI interrupted while waiting runs nothing,
/// withdraws its key and exits 128+15, so `lock NAME -- CMD && next` stops.
///
/// Checked by hand: with src/cmd/lock/hold.rs returning `Ok(())` on a signal while
/// waiting, this test fails (exit status 0).
#[tokio::test]
async fn etcdctl_waits_while_the_cli_holds_and_a_signal_while_waiting_runs_nothing() {
    let ctx = Ctx::new("cli-lock-waiters").await;
    let log = Log::new();
    let mut holder = ctx.spawn(&["lock", "job"]);
    holder.line_starting("locked (fencing token ").await;

    let name = format!("/etcd_registry/{}/locks/job", ctx.ns);
    let mut wait = ctx.etcd.etcdctl();
    // etcdctl runs the command once it holds the lock, then releases and exits.
    wait.args(["lock", &name, "echo", "etcdctl-got-it"]);
    let mut etcdctl = Background::start(wait, &["etcdctl lock"]);
    let mut waiter = Background::start(
        lock(&ctx, &["job"], "waiter", &log.path, "echo ran >> \"$LOG\""),
        &["lock job -- echo (waiter)"],
    );
    eventually(
        "etcdctl's and the waiter's keys behind the holder's",
        || async { (ctx.raw_keys_under("locks/job/").await.len() == 3).then_some(()) },
    )
    .await;
    // An observation window, not a synchronisation: nothing may get the lock
    // while the CLI holds it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        etcdctl.child.try_wait().expect("try_wait").is_none(),
        "etcdctl lock got the lock while the CLI held it"
    );

    waiter.sigterm();
    let status = waiter.exit().await;
    let stderr = waiter.stderr().await;
    assert_eq!(status.code(), Some(128 + 15), "{stderr}");
    assert!(
        stderr.contains("received terminate while waiting; the lock was not acquired"),
        "{stderr}"
    );
    assert_eq!(
        log.lines(),
        Vec::<String>::new(),
        "CMD ran without the lock"
    );
    eventually("the waiter's key withdrawn", || async {
        (ctx.raw_keys_under("locks/job/").await.len() == 2).then_some(())
    })
    .await;

    holder.sigterm();
    assert!(holder.exit().await.success(), "{}", holder.stderr().await);
    assert_eq!(
        etcdctl.line_starting("etcdctl-got-it").await,
        "etcdctl-got-it"
    );
    assert!(etcdctl.exit().await.success(), "{}", etcdctl.stderr().await);
    assert_eq!(ctx.raw_keys().await, "");
}
