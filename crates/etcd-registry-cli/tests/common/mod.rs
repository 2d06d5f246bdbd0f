//! Helpers shared by the CLI's test binaries: run the built binary against
//! the testkit's shared etcd, each test in its own namespace.
#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use etcd_registry::Registry;
use etcd_registry_testkit::{EtcdServer, shared_server, unique_name};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::{Instant, timeout};

pub const BIN: &str = env!("CARGO_BIN_EXE_etcd-registry");
/// Bound of any one step: a command run, a line read, a process exit.
pub const STEP: Duration = Duration::from_secs(20);
/// Bound of a polled condition.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// The binary with the connection flags of one test's namespace.
pub struct Ctx {
    pub etcd: &'static EtcdServer,
    pub ns: String,
}

impl Ctx {
    pub async fn new(prefix: &str) -> Self {
        Ctx {
            etcd: shared_server().await,
            ns: unique_name(prefix),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = bare_command();
        cmd.arg("--endpoints")
            .arg(self.etcd.endpoint())
            .arg("--namespace")
            .arg(&self.ns)
            .args(args);
        cmd
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        run(self.command(args), args).await
    }

    /// Runs a command that must succeed and returns its stdout.
    pub async fn stdout(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "`{}` failed with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    pub fn spawn(&self, args: &[&str]) -> Background {
        Background::start(self.command(args), args)
    }

    /// Every key under `{prefix}/{ns}/{sub}`, read with etcdctl.
    pub async fn raw_keys_under(&self, sub: &str) -> Vec<String> {
        let prefix = format!("/etcd_registry/{}/{sub}", self.ns);
        let mut cmd = self.etcd.etcdctl();
        cmd.args(["get", "--prefix", "--keys-only", &prefix]);
        let out = run(cmd, &["etcdctl get"]).await;
        assert!(out.status.success(), "etcdctl get failed: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// A library registry in the same namespace, as a service would use it.
    pub async fn registry(&self) -> Registry {
        timeout(
            STEP,
            Registry::builder()
                .endpoints(self.etcd.endpoints())
                .namespace(&self.ns)
                .connect(),
        )
        .await
        .expect("connect timed out")
        .expect("connect")
    }

    /// Every key of the namespace, read with etcdctl (not through our code).
    pub async fn raw_keys(&self) -> String {
        let prefix = format!("/etcd_registry/{}/", self.ns);
        let mut cmd = self.etcd.etcdctl();
        cmd.args(["get", "--prefix", "--keys-only", &prefix]);
        let out = run(cmd, &["etcdctl get"]).await;
        assert!(out.status.success(), "etcdctl get failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// The binary with no inherited configuration.
pub fn bare_command() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "ETCD_ENDPOINTS",
        "ETCD_REGISTRY_NAMESPACE",
        "ETCD_REGISTRY_PREFIX",
        "ETCD_USER",
        "ETCD_PASSWORD",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

pub async fn run(mut cmd: Command, what: &[&str]) -> Output {
    timeout(STEP, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`{}` did not finish within {STEP:?}", what.join(" ")))
        .expect("run etcd-registry")
}

/// A long-running command: its stdout read line by line.
pub struct Background {
    pub what: String,
    pub child: Child,
    pub lines: Lines<BufReader<ChildStdout>>,
}

impl Background {
    /// Spawns `cmd` with stdout and stderr piped.
    pub fn start(mut cmd: Command, args: &[&str]) -> Background {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcd-registry");
        let stdout = child.stdout.take().expect("piped stdout");
        Background {
            what: args.join(" "),
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Sends `signal` to this child only, by its PID.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the child is still running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    pub async fn next_line(&mut self) -> String {
        match timeout(STEP, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let stderr = self.stderr().await;
                panic!("`{}` ended its output early; stderr: {stderr}", self.what)
            }
            Ok(Err(e)) => panic!("reading from `{}`: {e}", self.what),
            Err(_) => panic!("`{}` printed nothing for {STEP:?}", self.what),
        }
    }

    /// Reads lines until one starts with `prefix`; returns it.
    pub async fn line_starting(&mut self, prefix: &str) -> String {
        loop {
            let line = self.next_line().await;
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// SIGTERM to this child only, by its PID.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub async fn exit(&mut self) -> ExitStatus {
        timeout(STEP, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("`{}` did not exit within {STEP:?}", self.what))
            .expect("wait for child")
    }

    /// The rest of stdout, once the process has exited.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Ok(Ok(Some(line))) = timeout(STEP, self.lines.next_line()).await {
            rest.push(line);
        }
        rest
    }

    pub async fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = timeout(Duration::from_secs(2), err.read_to_string(&mut text)).await;
        }
        text
    }
}

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
