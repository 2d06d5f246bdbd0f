//! One etcd process: start, stop, kill, restart, pause.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::process::{self, lock};
use crate::tls::ServerTls;
use crate::{Error, Result, http, unique_name};

mod snapshot;

/// Lines of log included in start-up errors.
const ERROR_LOG_LINES: usize = 40;
/// How long [`EtcdServer::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the testkit waits for a SIGKILLed process to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Interval of every poll loop in the testkit.
pub(crate) const POLL: Duration = Duration::from_millis(25);

/// A real etcd process on loopback, with its own temporary data directory.
///
/// The process is started with `PR_SET_PDEATHSIG`, so it never outlives the
/// test process, even when the server sits in a static or the test binary is
/// killed. Dropping the server SIGKILLs and reaps the process and then removes
/// its temporary directory (data and log).
///
/// The server does not depend on a tokio runtime: it can be shared by tests
/// that each run their own runtime (see [`shared_server`](crate::shared_server)).
///
/// ```no_run
/// # async fn demo() -> etcd_registry_testkit::Result<()> {
/// use etcd_registry_testkit::EtcdServer;
///
/// let mut etcd = EtcdServer::start().await?;
/// let mut client = etcd.client().await?;
/// client.put("greeting", "hello", None).await?;
/// etcd.restart().await?; // same data directory, same ports
/// assert_eq!(client.get("greeting", None).await?.kvs()[0].value(), b"hello");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdServer {
    name: String,
    binary: PathBuf,
    extra_args: Vec<String>,
    start_timeout: Duration,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`; only read by etcd when the data directory is empty.
    initial_cluster: String,
    cluster_token: String,
    /// Member of a cluster of more than one member (cannot be wiped alone).
    clustered: bool,
    /// TLS on the client URL, and the plain-HTTP metrics port that the
    /// testkit's health checks use instead of it.
    tls: Option<(ServerTls, u16)>,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
    paused: AtomicBool,
}

/// Configures and starts an [`EtcdServer`]; see [`EtcdServer::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct EtcdServerBuilder {
    name: String,
    args: Vec<String>,
    start_timeout: Duration,
    binary: Option<PathBuf>,
    tls: Option<ServerTls>,
}

impl Default for EtcdServerBuilder {
    fn default() -> Self {
        EtcdServerBuilder {
            name: "etcd".into(),
            args: Vec::new(),
            start_timeout: Duration::from_secs(10),
            binary: None,
            tls: None,
        }
    }
}

impl EtcdServerBuilder {
    /// Adds one etcd command-line flag, e.g. `"--auth-token=simple"`.
    ///
    /// Extra flags come after the testkit's own, so for etcd's single-valued
    /// flags they win.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds several etcd command-line flags; see [`arg`](Self::arg).
    pub fn args<I, S>(mut self, it: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }

    /// How long [`start`](Self::start) and restarts wait for etcd to become
    /// healthy. Default: 10 s, ample for a loopback single-member start
    /// (typically well under a second) even on a loaded CI machine.
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }

    /// The member name (`--name`). Default: `"etcd"`. Useful to tell servers
    /// apart in logs and errors.
    pub fn name(mut self, n: &str) -> Self {
        self.name = n.to_string();
        self
    }

    /// Uses this etcd executable instead of `$ETCD_BIN` or `etcd` on `PATH`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Serves clients over TLS (see [`ServerTls`] and [`TestCa`](crate::TestCa)).
    /// Default: plain HTTP. [`EtcdServer::endpoint`] then says `https://`.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// etcd's `--auth-token-ttl`: how long a simple auth token lives
    /// unused, in whole seconds (at least 1). etcd's default is 300 s; a
    /// short one makes token expiry happen inside a test.
    pub fn auth_token_ttl(self, ttl: Duration) -> Self {
        let secs = ttl.as_secs().max(1);
        self.arg(format!("--auth-token-ttl={secs}"))
    }

    /// Starts etcd on fresh loopback ports and waits until it serves requests.
    ///
    /// # Errors
    ///
    /// [`Error::BinaryNotFound`] if there is no etcd executable;
    /// [`Error::Exited`] or [`Error::StartTimeout`] (with the log tail) if
    /// etcd did not come up. A port taken by someone else between choosing it
    /// and etcd binding it is retried on new ports.
    pub async fn start(self) -> Result<EtcdServer> {
        let binary = process::resolve_etcd(self.binary.as_deref())?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client_port = process::free_port()?;
            let peer_port = process::free_port()?;
            let tls = match &self.tls {
                Some(tls) => Some((tls.clone(), process::free_port()?)),
                None => None,
            };
            let initial_cluster = format!("{}={}", self.name, peer_url(peer_port));
            let server = EtcdServer::new(MemberSpec {
                name: self.name.clone(),
                binary: binary.clone(),
                extra_args: self.args.clone(),
                start_timeout: self.start_timeout,
                client_port,
                peer_port,
                initial_cluster,
                cluster_token: unique_name("token"),
                clustered: false,
                tls,
            })?;
            server.spawn().await?;
            match server
                .wait_healthy(Instant::now() + self.start_timeout)
                .await
            {
                Ok(()) => return Ok(server),
                Err(e) if attempt < 3 && is_port_clash(&e) => {
                    tracing::warn!(name = %self.name, attempt, "etcd port clash, retrying on new ports");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether a start failed because a port was taken.
pub(crate) fn is_port_clash(e: &Error) -> bool {
    matches!(e, Error::Exited { log_tail, .. } if log_tail.contains("address already in use"))
}

pub(crate) fn peer_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Everything needed to launch one member.
pub(crate) struct MemberSpec {
    pub(crate) name: String,
    pub(crate) binary: PathBuf,
    pub(crate) extra_args: Vec<String>,
    pub(crate) start_timeout: Duration,
    pub(crate) client_port: u16,
    pub(crate) peer_port: u16,
    pub(crate) initial_cluster: String,
    pub(crate) cluster_token: String,
    pub(crate) clustered: bool,
    pub(crate) tls: Option<(ServerTls, u16)>,
}

impl EtcdServer {
    /// Starts a single-member etcd with default settings; same as
    /// `EtcdServer::builder().start()`.
    ///
    /// # Errors
    ///
    /// See [`EtcdServerBuilder::start`].
    pub async fn start() -> Result<EtcdServer> {
        Self::builder().start().await
    }

    /// A builder for a server with extra flags, a custom start timeout, name or binary.
    pub fn builder() -> EtcdServerBuilder {
        EtcdServerBuilder::default()
    }

    /// Prepares directories for a member without starting it.
    pub(crate) fn new(spec: MemberSpec) -> Result<EtcdServer> {
        Ok(EtcdServer {
            name: spec.name,
            binary: spec.binary,
            extra_args: spec.extra_args,
            start_timeout: spec.start_timeout,
            client_port: spec.client_port,
            peer_port: spec.peer_port,
            initial_cluster: spec.initial_cluster,
            cluster_token: spec.cluster_token,
            clustered: spec.clustered,
            tls: spec.tls,
            dir: process::temp_dir()?,
            child: Mutex::new(None),
            paused: AtomicBool::new(false),
        })
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    /// Stable across restarts.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client_addr())
    }

    /// The TLS settings, when the server serves clients over TLS.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref().map(|(tls, _)| tls)
    }

    /// Where `/health` and `/metrics` are served over plain HTTP: the client
    /// port, or the metrics port when the client URL is TLS.
    fn http_addr(&self) -> SocketAddr {
        match &self.tls {
            Some((_, metrics_port)) => SocketAddr::from((Ipv4Addr::LOCALHOST, *metrics_port)),
            None => self.client_addr(),
        }
    }

    /// The client URLs: just [`endpoint`](Self::endpoint).
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The client socket address on loopback.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// The member name given with `--name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The etcd data directory (`--data-dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The log file: etcd's stdout and stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Whether the etcd process is alive (a paused process counts as running).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// The process id while the process is alive.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = lock(&self.child);
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            Ok(Some(status)) => {
                tracing::debug!(name = %self.name, %status, "etcd exited");
                *guard = None;
                None
            }
            Err(e) => {
                tracing::warn!(name = %self.name, error = %e, "cannot query etcd process");
                None
            }
        }
    }

    /// A client connected to this server only.
    ///
    /// The connection is lazy (see etcd-client): the first request proves it.
    /// Only a connect timeout is set, so watches and keep-alives are not cut
    /// short; put your own timeouts around requests.
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`] if the client cannot be built.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect(self.endpoints(), Some(self.connect_options())).await?)
    }

    /// The options of [`client`](Self::client): a connect timeout, and TLS
    /// with the server's CA and the testkit's client certificate if any.
    /// Add `with_user` to act as a user of an etcd with auth on.
    pub fn connect_options(&self) -> etcd_client::ConnectOptions {
        let options =
            etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        match self.tls() {
            Some(tls) => options.with_tls(tls.client_options()),
            None => options,
        }
    }

    /// The body of `GET /metrics` on the client URL (Prometheus text format).
    ///
    /// # Errors
    ///
    /// [`Error::Http`] on a non-200 status or a 5 s timeout, [`Error::Io`] if
    /// the connection fails.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.http_addr());
        match tokio::time::timeout(
            Duration::from_secs(5),
            http::get(self.http_addr(), "/metrics"),
        )
        .await
        {
            Ok(Ok((200, body))) => Ok(body),
            Ok(Ok((status, _))) => Err(Error::Http {
                url,
                message: format!("status {status}"),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Http {
                url,
                message: "timed out after 5s".into(),
            }),
        }
    }

    /// How many gRPC streams of `method` (such as `"Watch"` or
    /// `"LeaseKeepAlive"`) are open on this server now: started minus
    /// finished, from its `/metrics`. Tells which member of a cluster a
    /// client's streams went to.
    ///
    /// # Errors
    ///
    /// As [`EtcdServer::metrics`].
    pub async fn open_streams(&self, method: &str) -> Result<u64> {
        let text = self.metrics().await?;
        let wanted = format!("grpc_method=\"{method}\"");
        let (mut started, mut handled) = (0u64, 0u64);
        for line in text.lines() {
            if !line.contains(&wanted) || !line.contains("grpc_type=\"bidi_stream\"") {
                continue;
            }
            let value = line
                .rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            if line.starts_with("grpc_server_started_total{") {
                started += value;
            } else if line.starts_with("grpc_server_handled_total{") {
                handled += value;
            }
        }
        Ok(started.saturating_sub(handled))
    }

    /// An `etcdctl` command (or `$ETCDCTL_BIN`) with `ETCDCTL_API=3` and
    /// `--endpoints=<endpoint>` preset; add the subcommand and run it.
    ///
    /// The command is killed if its handle is dropped.
    ///
    /// ```no_run
    /// # async fn demo(etcd: &etcd_registry_testkit::EtcdServer) -> std::io::Result<()> {
    /// let out = etcd.etcdctl().args(["get", "--prefix", "/"]).output().await?;
    /// assert!(out.status.success());
    /// # Ok(())
    /// # }
    /// ```
    pub fn etcdctl(&self) -> tokio::process::Command {
        let bin = std::env::var_os("ETCDCTL_BIN")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "etcdctl".into());
        let mut cmd = tokio::process::Command::new(bin);
        // etcdctl rejects a flag that an environment variable also sets.
        cmd.env("ETCDCTL_API", "3")
            .env_remove("ETCDCTL_ENDPOINTS")
            .arg(format!("--endpoints={}", self.endpoint()))
            .kill_on_drop(true);
        if let Some(tls) = self.tls() {
            let file = |name: &str| self.dir.path().join(name).display().to_string();
            cmd.arg(format!("--cacert={}", file("ca.crt")));
            if tls.client().is_some() {
                cmd.arg(format!("--cert={}", file("client.crt")))
                    .arg(format!("--key={}", file("client.key")));
            }
        }
        cmd
    }

    /// Stops etcd gracefully: SIGTERM, up to 5 s to exit, then SIGKILL. Reaps
    /// the process. Does nothing if it is not running.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if signalling fails, [`Error::Timeout`] if even SIGKILL
    /// did not end the process within 10 s.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        tracing::debug!(name = %self.name, pid, "stopping etcd");
        process::signal(pid, Signal::SIGTERM)?;
        if self.paused.swap(false, Ordering::SeqCst) {
            process::signal(pid, Signal::SIGCONT)?;
        }
        if self.wait_exit(STOP_GRACE).await {
            return Ok(());
        }
        tracing::warn!(name = %self.name, pid, "etcd ignored SIGTERM for 5s; killing");
        self.kill().await
    }

    /// Kills etcd with SIGKILL and reaps it. Does nothing if it is not running.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the process did not go away within 10 s.
    pub async fn kill(&mut self) -> Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        tracing::debug!(name = %self.name, pid, "killing etcd");
        process::signal(pid, Signal::SIGKILL)?;
        self.paused.store(false, Ordering::SeqCst);
        if self.wait_exit(KILL_WAIT).await {
            Ok(())
        } else {
            Err(Error::Timeout {
                what: format!(
                    "etcd member `{}` (pid {pid}) to exit after SIGKILL",
                    self.name
                ),
                timeout: KILL_WAIT,
            })
        }
    }

    /// Restarts etcd with the same data directory and ports, stopping it first
    /// (gracefully) if it runs, and waits until it is healthy. A cluster member
    /// rejoins its cluster; it is healthy once the cluster has a leader, so a
    /// majority of members must be up.
    ///
    /// # Errors
    ///
    /// As for [`stop`](Self::stop) and [`EtcdServerBuilder::start`].
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await?;
        self.wait_healthy(Instant::now() + self.start_timeout).await
    }

    /// Kills etcd if it runs, deletes its data and starts a brand-new
    /// single-member cluster on the same ports (all keys, leases and revisions
    /// are gone; the log is kept). Waits until it is healthy.
    ///
    /// The new cluster gets a new cluster token, so clients see a new
    /// cluster id in every response header; see
    /// [`restart_wiped_same_cluster`](Self::restart_wiped_same_cluster) for
    /// a wiped store that keeps its id.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for a member of a multi-member cluster (it would
    /// rejoin with an empty raft log, which etcd rejects); otherwise as for
    /// [`restart`](Self::restart).
    pub async fn restart_wiped(&mut self) -> Result<()> {
        self.wipe_and_start(true).await
    }

    /// Like [`restart_wiped`](Self::restart_wiped), but the new store keeps
    /// the old cluster id: same name, peer URL and cluster token, from
    /// which etcd derives the member and cluster ids.
    ///
    /// This is what a production etcd that lost its data directory and was
    /// restarted with its usual configuration looks like: the cluster id in
    /// response headers does not change, and only the revisions and keys
    /// tell a client that the history it saw is gone.
    ///
    /// ```no_run
    /// # async fn demo() -> etcd_registry_testkit::Result<()> {
    /// let mut etcd = etcd_registry_testkit::EtcdServer::start().await?;
    /// let mut client = etcd.client().await?;
    /// let before = client.status().await?.header().map(|h| h.cluster_id());
    /// etcd.restart_wiped_same_cluster().await?;
    /// let after = client.status().await?.header().map(|h| h.cluster_id());
    /// assert_eq!(before, after);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`restart_wiped`](Self::restart_wiped).
    pub async fn restart_wiped_same_cluster(&mut self) -> Result<()> {
        self.wipe_and_start(false).await
    }

    async fn wipe_and_start(&mut self, new_cluster: bool) -> Result<()> {
        if self.clustered {
            return Err(Error::Unsupported(format!(
                "restart_wiped of member `{}` of a multi-member cluster",
                self.name
            )));
        }
        self.kill().await?;
        match std::fs::remove_dir_all(self.data_dir()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        if new_cluster {
            self.cluster_token = unique_name("token");
        }
        self.spawn().await?;
        self.wait_healthy(Instant::now() + self.start_timeout).await
    }

    /// Freezes the process with SIGSTOP: connections stay open but nothing is
    /// answered, like a hung server. Returns once every thread has stopped.
    ///
    /// # Errors
    ///
    /// [`Error::NotRunning`] if there is no process, [`Error::Io`] if signalling
    /// fails or the process has not stopped within 5 s.
    pub fn pause(&self) -> Result<()> {
        let pid = self.running_pid()?;
        process::signal(pid, Signal::SIGSTOP)?;
        self.paused.store(true, Ordering::SeqCst);
        process::wait_stopped(pid, Duration::from_secs(5))?;
        Ok(())
    }

    /// Lets a paused process continue with SIGCONT.
    ///
    /// # Errors
    ///
    /// [`Error::NotRunning`] if there is no process, [`Error::Io`] if signalling fails.
    pub fn resume(&self) -> Result<()> {
        let pid = self.running_pid()?;
        process::signal(pid, Signal::SIGCONT)?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the process was paused with [`pause`](Self::pause) and not resumed.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst) && self.is_running()
    }

    /// The last `lines` lines of the log (all starts of this server).
    pub fn log_tail(&self, lines: usize) -> String {
        process::tail(&self.log_path(), lines)
    }

    fn running_pid(&self) -> Result<u32> {
        self.pid().ok_or_else(|| Error::NotRunning {
            name: self.name.clone(),
        })
    }

    /// Launches the process (does not wait for health).
    pub(crate) async fn spawn(&self) -> Result<()> {
        let client_url = self.endpoint();
        let peer = peer_url(self.peer_port);
        let mut args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir().display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={}", self.initial_cluster),
            "--initial-cluster-state=new".to_string(),
            format!("--initial-cluster-token={}", self.cluster_token),
            "--logger=zap".to_string(),
            "--log-outputs=stderr".to_string(),
        ];
        if let Some((tls, metrics_port)) = &self.tls {
            args.extend(tls.write_args(self.dir.path())?);
            args.push(format!(
                "--listen-metrics-urls=http://127.0.0.1:{metrics_port}"
            ));
        }
        args.extend(self.extra_args.iter().cloned());

        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        writeln!(
            log,
            "--- etcd-registry-testkit: starting {} {}",
            self.binary.display(),
            args.join(" ")
        )?;

        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // etcd 3.4 refuses to start if an ETCD_* variable repeats a flag.
        for (key, _) in std::env::vars_os() {
            if key
                .to_str()
                .is_some_and(|k| k.starts_with("ETCD_") && k != "ETCD_UNSUPPORTED_ARCH")
            {
                cmd.env_remove(key);
            }
        }
        let child = process::spawn(cmd).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::BinaryNotFound {
                    binary: self.binary.clone(),
                    origin: "(it disappeared after lookup)",
                }
            } else {
                Error::Io(e)
            }
        })?;
        tracing::debug!(name = %self.name, pid = child.id(), endpoint = %client_url, "etcd spawned");
        self.paused.store(false, Ordering::SeqCst);
        *lock(&self.child) = Some(child);
        Ok(())
    }

    /// Polls `GET /health` until etcd reports healthy. On failure the process
    /// is killed and the error carries the log tail.
    pub(crate) async fn wait_healthy(&self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(status) = self.take_exit_status() {
                return Err(Error::Exited {
                    name: self.name.clone(),
                    status,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            match tokio::time::timeout(attempt, http::get(self.http_addr(), "/health")).await {
                Ok(Ok((200, body))) if body.contains(r#""health":"true""#) => {
                    tracing::debug!(name = %self.name, endpoint = %self.endpoint(), "etcd healthy");
                    return Ok(());
                }
                Ok(Ok((status, body))) => {
                    tracing::trace!(name = %self.name, status, body = %body.trim(), "etcd not healthy yet")
                }
                Ok(Err(e)) => {
                    tracing::trace!(name = %self.name, error = %e, "etcd not reachable yet")
                }
                Err(_) => tracing::trace!(name = %self.name, "health check timed out"),
            }
            if Instant::now() >= deadline {
                self.kill_sync();
                return Err(Error::StartTimeout {
                    name: self.name.clone(),
                    endpoint: self.endpoint(),
                    timeout: self.start_timeout,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// If the process has exited, reaps it and describes its exit status.
    fn take_exit_status(&self) -> Option<String> {
        let mut guard = lock(&self.child);
        match guard.as_mut()?.try_wait() {
            Ok(Some(status)) => {
                *guard = None;
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(e) => {
                *guard = None;
                Some(format!("unknown: {e}"))
            }
        }
    }

    /// Polls until the process has exited (and is reaped) or `limit` passes.
    async fn wait_exit(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL and a blocking reap: for drop and failed starts, where the
    /// process must be gone before anything else happens.
    fn kill_sync(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill_sync();
    }
}

/// A client for `endpoints` with a connect timeout only.
pub(crate) async fn connect(endpoints: &[String]) -> Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    Ok(etcd_client::Client::connect(endpoints, Some(options)).await?)
}
