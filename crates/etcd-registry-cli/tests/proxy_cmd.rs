//! The command line through etcd's gRPC proxy (`etcd grpc-proxy start`,
//! issue 24 §1): `status`, the issue's reproduction (`register` and `watch`
//! with an event after the stale bound), `observe`/`leader`/`campaign`,
//! `lock -- CMD`, and the `ui` dashboard's JSON API.
//!
//! Each command's stderr goes to a file, not a pipe: a re-list loop writes
//! thousands of warnings, which would fill a pipe and stall the command. The
//! warnings are counted from that file. Runtime: about 30 s (three cases
//! wait out the stale bound, two at a time; 27-28 s measured).

mod common;
mod ui_common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{Background, STEP, bare_command, run};
use etcd_registry::{Registry, ServiceInstance};
use etcd_registry_testkit::{EtcdGrpcProxy, eventually, shared_server, unique_name, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use ui_common::Dashboard;

/// Long enough for a watch whose progress requests go unanswered to be
/// restarted as stale (10 s) before the next event.
const PAST_STALE: Duration = Duration::from_secs(13);
const SEEN: Duration = Duration::from_secs(20);

/// The gRPC proxy in front of this binary's shared etcd; never stopped.
async fn proxy() -> &'static EtcdGrpcProxy {
    static PROXY: tokio::sync::OnceCell<EtcdGrpcProxy> = tokio::sync::OnceCell::const_new();
    let etcd = shared_server().await;
    PROXY
        .get_or_init(|| async {
            within("start the gRPC proxy", STEP, EtcdGrpcProxy::start(etcd))
                .await
                .expect("start the gRPC proxy")
        })
        .await
}

/// One test's namespace, reached through the proxy; stderr of spawned
/// commands goes to files in `dir`.
struct Ctx {
    proxy: &'static EtcdGrpcProxy,
    ns: String,
    dir: tempfile::TempDir,
}

impl Ctx {
    async fn new(prefix: &str) -> Ctx {
        Ctx {
            proxy: proxy().await,
            ns: unique_name(prefix),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = bare_command();
        cmd.arg("--endpoints")
            .arg(self.proxy.endpoint())
            .arg("--namespace")
            .arg(&self.ns)
            .args(args);
        cmd
    }

    async fn stdout(&self, args: &[&str]) -> String {
        let out = run(self.command(args), args).await;
        assert!(
            out.status.success(),
            "`{}` through the proxy failed with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// Spawns a long-running command; its stderr goes to `<dir>/<name>.err`.
    fn spawn(&self, name: &str, args: &[&str]) -> (Background, PathBuf) {
        let path = self.dir.path().join(format!("{name}.err"));
        let err = std::fs::File::create(&path).expect("stderr file");
        let mut cmd = self.command(args);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn etcd-registry");
        let stdout = child.stdout.take().expect("piped stdout");
        let bg = Background {
            what: args.join(" "),
            child,
            lines: BufReader::new(stdout).lines(),
        };
        (bg, path)
    }

    async fn registry(&self) -> Registry {
        within(
            "connect",
            STEP,
            Registry::builder()
                .endpoints(self.proxy.endpoints())
                .namespace(&self.ns)
                .connect(),
        )
        .await
        .expect("connect")
    }
}

/// WARN and ERROR lines of a command's stderr, and a tally of them.
fn warnings(path: &PathBuf) -> (usize, String) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let warns: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for w in &warns {
        // The message: after the target's ": ", before the first field.
        let msg = w.split_once(": ").map_or(*w, |(_, m)| m);
        let msg = msg.split(" service=").next().unwrap_or(msg);
        *tally.entry(msg.to_owned()).or_default() += 1;
    }
    let mut out = format!("{} lines", warns.len());
    for (m, n) in tally.iter().take(10) {
        out.push_str(&format!("\n  {n:6} x {m}"));
    }
    (warns.len(), out)
}

fn instance_json(id: &str, address: &str) -> String {
    format!(
        r#"{{"name":"web","id":"{id}","address":"{address}","port":"80","version":"","weight":0,"metadata":null}}"#
    )
}

/// The issue's reproduction: `register` and `watch` through the proxy, a
/// second `register --for 3s` after the stale bound. The watch prints the
/// add and the remove, and its stderr holds no warning.
#[tokio::test]
async fn register_and_watch_through_the_proxy_without_a_relist_loop() {
    let ctx = Ctx::new("gp-cli-watch").await;
    let (mut w1, w1_err) = ctx.spawn("register-w1", &["register", "web", "w1", "10.0.0.1", "80"]);
    eventually("w1 is listed", SEEN, || async {
        ctx.stdout(&["list", "web", "--json"])
            .await
            .contains("\"w1\"")
    })
    .await;
    let (mut watch, watch_err) = ctx.spawn("watch", &["watch", "web", "--json"]);
    assert_eq!(
        watch.next_line().await,
        format!(
            r#"{{"event":"snapshot","instances":[{}]}}"#,
            instance_json("w1", "10.0.0.1")
        )
    );
    // What the issue's `sleep 14` does.
    tokio::time::sleep(PAST_STALE).await;
    ctx.stdout(&["register", "web", "w2", "10.0.0.2", "80", "--for", "3s"])
        .await;
    let w2 = instance_json("w2", "10.0.0.2");
    assert_eq!(
        watch.next_line().await,
        format!(r#"{{"event":"added","instance":{w2}}}"#)
    );
    assert_eq!(
        watch.next_line().await,
        format!(r#"{{"event":"removed","instance":{w2}}}"#)
    );
    watch.sigterm();
    let status = watch.exit().await;
    w1.sigterm();
    assert!(w1.exit().await.success());
    let (n, tally) = warnings(&watch_err);
    let (n_reg, tally_reg) = warnings(&w1_err);
    eprintln!("watch stderr: {tally}\nregister stderr: {tally_reg}");
    assert!(status.success(), "watch exited with {status}");
    assert_eq!(n, 0, "warnings of `watch` through the proxy: {tally}");
    assert_eq!(
        n_reg, 0,
        "warnings of `register` through the proxy: {tally_reg}"
    );
}

/// `status` through the proxy: the proxy's row (version, member, leader
/// from the etcd behind it) and the namespace's summary.
#[tokio::test]
async fn status_through_the_proxy_shows_the_endpoint_and_the_namespace() {
    let ctx = Ctx::new("gp-cli-status").await;
    let registry = ctx.registry().await;
    let _web = within(
        "register",
        STEP,
        registry.register(ServiceInstance::new("web", "w1", "10.0.0.1", 80)),
    )
    .await
    .unwrap();
    let lead = within(
        "campaign",
        STEP,
        registry.election("cron").unwrap().campaign("boss"),
    )
    .await
    .unwrap();
    let text = ctx.stdout(&["status"]).await;
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ENDPOINT "), "{text}");
    assert!(lines[1].starts_with(&ctx.proxy.endpoint()), "{text}");
    assert!(
        lines[1].contains(" 3.") && lines[1].ends_with(" ok"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "namespace {} (prefix /etcd_registry): 1 service, 1 instance, 1 election",
            ctx.ns
        )),
        "{text}"
    );
    assert!(text.contains("boss"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ctx.stdout(&["status", "--json"]).await).expect("JSON");
    assert!(json.is_object(), "{json}");
    within("resign", STEP, lead.resign()).await.unwrap();
    within("close", STEP, registry.close()).await.unwrap();
}

/// `campaign`, `leader` and `observe` through the proxy (the observer's
/// watch kept past the stale bound), then `lock -- CMD`.
#[tokio::test]
async fn campaign_observe_leader_and_lock_through_the_proxy() {
    let ctx = Ctx::new("gp-cli-elect").await;
    let (mut observe, observe_err) =
        ctx.spawn("observe", &["observe", "cron", "--json", "--count", "3"]);
    assert_eq!(observe.next_line().await, r#"{"leader":null}"#);
    let (mut campaign, campaign_err) = ctx.spawn("campaign", &["campaign", "cron", "c-1"]);
    let won = campaign.line_starting("leader (fencing token ").await;
    let leader: serde_json::Value =
        serde_json::from_str(&ctx.stdout(&["leader", "cron", "--json"]).await).expect("JSON");
    assert_eq!(leader["leader"]["proposal"], "c-1", "{won}");
    let observed: serde_json::Value =
        serde_json::from_str(&observe.next_line().await).expect("JSON");
    assert_eq!(observed, leader);
    // The observer's watch through the proxy, past the stale bound.
    tokio::time::sleep(PAST_STALE).await;
    campaign.sigterm();
    assert!(campaign.exit().await.success());
    assert_eq!(observe.next_line().await, r#"{"leader":null}"#);

    let out = ctx
        .stdout(&[
            "lock",
            "job",
            "--timeout",
            "10s",
            "--",
            "sh",
            "-c",
            "echo token=$ETCD_REGISTRY_FENCING_TOKEN",
        ])
        .await;
    let token: i64 = out
        .trim()
        .trim_start_matches("token=")
        .parse()
        .unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert!(token > 0);
    observe.sigterm();
    let _ = observe.exit().await;
    for (what, path) in [("observe", observe_err), ("campaign", campaign_err)] {
        let (n, tally) = warnings(&path);
        assert_eq!(n, 0, "warnings of `{what}` through the proxy: {tally}");
    }
}

/// The dashboard through the proxy: its JSON API (services, elections,
/// locks, status) and a change arriving through its event stream after the
/// stale bound, with no warning.
#[tokio::test]
async fn the_dashboard_api_works_through_the_proxy() {
    let ctx = Ctx::new("gp-cli-ui").await;
    let registry = ctx.registry().await;
    let _w1 = within(
        "register",
        STEP,
        registry.register(ServiceInstance::new("web", "w1", "10.0.0.1", 80)),
    )
    .await
    .unwrap();
    let lead = within(
        "campaign",
        STEP,
        registry.election("cron").unwrap().campaign("boss"),
    )
    .await
    .unwrap();
    let guard = within("lock", STEP, registry.lock("job").unwrap().acquire())
        .await
        .unwrap();
    let (process, ui_err) = ctx.spawn("ui", &["ui", "--listen", "127.0.0.1:0"]);
    let mut process = process;
    let line = process.line_starting("dashboard of ").await;
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches('/')
        .to_owned();
    let ui = Dashboard { process, base };

    eventually("the service, the election and the lock", SEEN, || async {
        let services = ui.get("/api/services").await.1;
        let elections = ui.get("/api/elections").await.1;
        let locks = ui.get("/api/locks").await.1;
        services[0]["name"] == "web"
            && services[0]["instances"] == 1
            && elections[0]["leader"]["proposal"] == "boss"
            && locks.as_array().is_some_and(|l| l.len() == 1)
    })
    .await;
    let (status, body) = ui.get("/api/status").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.to_string().contains(&ctx.proxy.endpoint()),
        "/api/status names the proxy: {body}"
    );
    let mut events = ui.events().await;
    let (name, _) = events.next().await;
    assert_eq!(name, "snapshot");
    // The dashboard's watches through the proxy, past the stale bound.
    tokio::time::sleep(PAST_STALE).await;
    let _w2 = within(
        "register",
        STEP,
        registry.register(ServiceInstance::new("web", "w2", "10.0.0.2", 80)),
    )
    .await
    .unwrap();
    let added = events
        .until("added w2", SEEN, |name, d| {
            (name == "added").then(|| d.clone())
        })
        .await;
    assert_eq!(added["id"], "w2");
    ui.stop().await;
    let (n, tally) = warnings(&ui_err);
    within("release", STEP, guard.release()).await.unwrap();
    within("resign", STEP, lead.resign()).await.unwrap();
    within("close", STEP, registry.close()).await.unwrap();
    assert_eq!(n, 0, "warnings of `ui` through the proxy: {tally}");
}
