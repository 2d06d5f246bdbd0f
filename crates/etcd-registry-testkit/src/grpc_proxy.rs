//! etcd's own gRPC proxy (`etcd grpc-proxy start`) in front of a server or cluster.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::process::{self, lock};
use crate::server::POLL;
use crate::{Error, EtcdCluster, EtcdServer, FaultProxy, Result, http};

/// Lines of log included in start-up errors.
const ERROR_LOG_LINES: usize = 40;
/// How long the testkit waits for a SIGKILLed proxy to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Something a gRPC proxy can forward to: its client endpoints.
///
/// Implemented for [`EtcdServer`], [`EtcdCluster`] and [`FaultProxy`] (to put
/// a fault proxy between the gRPC proxy and etcd), and for a list of
/// endpoints.
pub trait ProxyUpstream {
    /// The endpoints passed to the proxy's `--endpoints`.
    fn upstream_endpoints(&self) -> Vec<String>;
}

impl ProxyUpstream for EtcdServer {
    fn upstream_endpoints(&self) -> Vec<String> {
        self.endpoints()
    }
}

impl ProxyUpstream for EtcdCluster {
    fn upstream_endpoints(&self) -> Vec<String> {
        self.endpoints()
    }
}

impl ProxyUpstream for FaultProxy {
    fn upstream_endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }
}

impl ProxyUpstream for [FaultProxy] {
    fn upstream_endpoints(&self) -> Vec<String> {
        self.iter().map(FaultProxy::endpoint).collect()
    }
}

impl ProxyUpstream for Vec<String> {
    fn upstream_endpoints(&self) -> Vec<String> {
        self.clone()
    }
}

/// `etcd grpc-proxy start` on a fresh loopback port, forwarding to a server,
/// a cluster or a [`FaultProxy`] in front of one.
///
/// The proxy is etcd's own component for fanning many clients out over a
/// few server connections. It is the same etcd binary the testkit resolves
/// for servers (`$ETCD_BIN`, else `etcd` on `PATH`), started with
/// `PR_SET_PDEATHSIG`, so it never outlives the test process. Dropping the
/// value SIGKILLs the process by its PID and removes its temporary directory.
///
/// `--advertise-client-url` is set to the proxy's own listen address: etcd
/// 3.5's proxy dials that address for its own health checks and exits after
/// about 5 s when nothing listens there (the default is `127.0.0.1:23790`).
///
/// A [`FaultProxy`] goes between a client and this proxy with
/// `FaultProxy::start(&proxy.endpoint())`, and between this proxy and etcd
/// by starting this proxy on the fault proxy:
///
/// ```no_run
/// # async fn demo() -> etcd_registry_testkit::Result<()> {
/// use etcd_registry_testkit::{EtcdGrpcProxy, EtcdServer, FaultProxy};
///
/// let etcd = EtcdServer::start().await?;
/// let link = FaultProxy::start(&etcd.endpoint()).await?; // proxy -> etcd
/// let proxy = EtcdGrpcProxy::start(&link).await?;
/// let client_link = FaultProxy::start(&proxy.endpoint()).await?; // client -> proxy
/// let mut client = etcd_client::Client::connect([client_link.endpoint()], None).await?;
/// client.put("k", "v", None).await?;
/// link.blackhole(); // the proxy is cut off from etcd; the client still reaches the proxy
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdGrpcProxy {
    binary: PathBuf,
    upstream: Vec<String>,
    namespace: Option<String>,
    extra_args: Vec<String>,
    start_timeout: Duration,
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

/// Configures and starts an [`EtcdGrpcProxy`]; see [`EtcdGrpcProxy::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct EtcdGrpcProxyBuilder {
    namespace: Option<String>,
    args: Vec<String>,
    start_timeout: Duration,
    binary: Option<PathBuf>,
}

impl Default for EtcdGrpcProxyBuilder {
    fn default() -> Self {
        EtcdGrpcProxyBuilder {
            namespace: None,
            args: Vec::new(),
            start_timeout: Duration::from_secs(15),
            binary: None,
        }
    }
}

impl EtcdGrpcProxyBuilder {
    /// The proxy's `--namespace`: a prefix it adds to every key, so that
    /// clients of the proxy see only that part of etcd, without the prefix.
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    /// Adds one flag to `etcd grpc-proxy start`, after the testkit's own.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// How long [`start`](Self::start) and [`EtcdGrpcProxy::restart`] wait
    /// for the proxy to answer. Default: 15 s.
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }

    /// Uses this etcd executable instead of `$ETCD_BIN` or `etcd` on `PATH`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Starts the proxy in front of `upstream` and waits until it answers a
    /// request forwarded to etcd.
    ///
    /// # Errors
    ///
    /// [`Error::BinaryNotFound`] if there is no etcd executable;
    /// [`Error::Unsupported`] for an `https://` upstream (the testkit passes
    /// no TLS flags to the proxy) or no upstream at all; [`Error::Exited`] or
    /// [`Error::StartTimeout`] (with the log tail) if the proxy did not come
    /// up. A port taken by someone else is retried on a new port.
    pub async fn start(self, upstream: &(impl ProxyUpstream + ?Sized)) -> Result<EtcdGrpcProxy> {
        let upstream = upstream.upstream_endpoints();
        if upstream.is_empty() {
            return Err(Error::Unsupported("a gRPC proxy needs an upstream".into()));
        }
        if let Some(tls) = upstream.iter().find(|e| e.starts_with("https://")) {
            return Err(Error::Unsupported(format!(
                "gRPC proxy in front of the TLS endpoint {tls}"
            )));
        }
        let binary = process::resolve_etcd(self.binary.as_deref())?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let proxy = EtcdGrpcProxy {
                binary: binary.clone(),
                upstream: upstream.clone(),
                namespace: self.namespace.clone(),
                extra_args: self.args.clone(),
                start_timeout: self.start_timeout,
                port: process::free_port()?,
                dir: process::temp_dir()?,
                child: Mutex::new(None),
            };
            match proxy.spawn_and_wait().await {
                Ok(()) => return Ok(proxy),
                Err(e) if attempt < 3 && is_port_clash(&e) => {
                    tracing::warn!(attempt, "gRPC proxy port clash, retrying on a new port");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_port_clash(e: &Error) -> bool {
    matches!(e, Error::Exited { log_tail, .. } if log_tail.contains("address already in use"))
}

impl EtcdGrpcProxy {
    /// Starts a proxy in front of `upstream` with default settings; same as
    /// `EtcdGrpcProxy::builder().start(upstream)`.
    ///
    /// # Errors
    ///
    /// See [`EtcdGrpcProxyBuilder::start`].
    pub async fn start(upstream: &(impl ProxyUpstream + ?Sized)) -> Result<EtcdGrpcProxy> {
        Self::builder().start(upstream).await
    }

    /// A builder for a proxy with a namespace, extra flags or another binary.
    pub fn builder() -> EtcdGrpcProxyBuilder {
        EtcdGrpcProxyBuilder::default()
    }

    /// The proxy's URL, `http://127.0.0.1:PORT`. Stable across restarts.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Just [`endpoint`](Self::endpoint), as a list.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The listen address on loopback.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The endpoints the proxy forwards to.
    pub fn upstream(&self) -> &[String] {
        &self.upstream
    }

    /// The `--namespace` it was started with, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The process id while the process is alive.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = lock(&self.child);
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => {
                *guard = None;
                None
            }
        }
    }

    /// Whether the proxy process is alive.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// The log file: the proxy's stdout and stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("grpc-proxy.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::tail(&self.log_path(), lines)
    }

    /// A client connected to the proxy only (lazy; the first request proves it).
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`] if the client cannot be built.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        let options =
            etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        Ok(etcd_client::Client::connect(self.endpoints(), Some(options)).await?)
    }

    /// The proxy's own metrics (`GET /proxy/metrics`, Prometheus text): its
    /// gRPC server's streams and calls, as clients of the proxy made them.
    ///
    /// etcd 3.5 added this endpoint. etcd 3.4's proxy has none (its
    /// `/metrics` forwards etcd's), and then this returns
    /// [`Error::Unsupported`].
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] as above, [`Error::Http`] on another non-200
    /// status or a 5 s timeout, [`Error::Io`] if the connection fails.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/proxy/metrics", self.addr());
        match tokio::time::timeout(
            Duration::from_secs(5),
            http::get(self.addr(), "/proxy/metrics"),
        )
        .await
        {
            Ok(Ok((200, body))) => Ok(body),
            Ok(Ok((404, _))) => Err(Error::Unsupported(format!(
                "{url}: this etcd's gRPC proxy has no metrics of its own (etcd 3.5 added them)"
            ))),
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

    /// How many gRPC streams of `method` (such as `"Watch"`) clients have
    /// ever started on the proxy, from [`metrics`](Self::metrics): a
    /// restarted or reopened stream raises it.
    ///
    /// # Errors
    ///
    /// As [`metrics`](Self::metrics) (so [`Error::Unsupported`] on etcd 3.4).
    pub async fn streams_started(&self, method: &str) -> Result<u64> {
        Ok(count_streams(&self.metrics().await?, method).0)
    }

    /// How many gRPC streams of `method` are open on the proxy now: started
    /// minus finished.
    ///
    /// # Errors
    ///
    /// As [`metrics`](Self::metrics).
    pub async fn open_streams(&self, method: &str) -> Result<u64> {
        let (started, handled) = count_streams(&self.metrics().await?, method);
        Ok(started.saturating_sub(handled))
    }

    /// Kills the proxy with SIGKILL (by its PID) and reaps it. Clients see
    /// their connections to it reset. Does nothing if it is not running.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the process did not go away within 10 s.
    pub async fn kill(&mut self) -> Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        process::signal(pid, nix::sys::signal::Signal::SIGKILL)?;
        let deadline = Instant::now() + KILL_WAIT;
        while self.is_running() {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("gRPC proxy (pid {pid}) to exit after SIGKILL"),
                    timeout: KILL_WAIT,
                });
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Kills the proxy if it runs and starts it again on the same port, with
    /// the same flags; waits until it answers.
    ///
    /// # Errors
    ///
    /// As [`kill`](Self::kill) and [`EtcdGrpcProxyBuilder::start`].
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.spawn_and_wait().await
    }

    fn args(&self) -> Vec<String> {
        let listen = self.addr().to_string();
        let mut args = vec![
            "grpc-proxy".to_owned(),
            "start".to_owned(),
            format!("--endpoints={}", self.upstream.join(",")),
            format!("--listen-addr={listen}"),
            // etcd 3.5's proxy dials this for itself; see the type's docs.
            format!("--advertise-client-url={listen}"),
            // etcd 3.4's default is `default.proxy` in the working directory.
            format!("--data-dir={}", self.dir.path().join("data").display()),
        ];
        if let Some(ns) = &self.namespace {
            args.push(format!("--namespace={ns}"));
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    async fn spawn_and_wait(&self) -> Result<()> {
        let args = self.args();
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
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // etcd refuses to start if an ETCD_* variable repeats a flag.
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
        tracing::debug!(pid = child.id(), endpoint = %self.endpoint(), upstream = ?self.upstream, "gRPC proxy spawned");
        *lock(&self.child) = Some(child);
        self.wait_ready(Instant::now() + self.start_timeout).await
    }

    /// Polls until the proxy answers a read that it must forward to etcd:
    /// `GET /health` (the proxy reads a key through its client), then a
    /// gRPC range request through the proxy. On failure the process is
    /// killed and the error carries the log tail.
    async fn wait_ready(&self, deadline: Instant) -> Result<()> {
        let mut health_ok = false;
        loop {
            if let Some(status) = self.take_exit_status() {
                return Err(Error::Exited {
                    name: "grpc-proxy".into(),
                    status,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            if !health_ok {
                health_ok = matches!(
                    tokio::time::timeout(attempt, http::get(self.addr(), "/health")).await,
                    Ok(Ok((200, body))) if body.contains(r#""health":"true""#)
                );
            }
            if health_ok {
                let read = tokio::time::timeout(attempt, async {
                    let mut client = self.client().await?;
                    client.get("etcd-registry-testkit-probe", None).await?;
                    Ok::<_, Error>(())
                })
                .await;
                if let Ok(Ok(())) = read {
                    tracing::debug!(endpoint = %self.endpoint(), "gRPC proxy answers");
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.kill_sync();
                return Err(Error::StartTimeout {
                    name: "grpc-proxy".into(),
                    endpoint: self.endpoint(),
                    timeout: self.start_timeout,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

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

    /// SIGKILL by PID and a blocking reap.
    fn kill_sync(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdGrpcProxy {
    fn drop(&mut self) {
        self.kill_sync();
    }
}

/// Started and handled totals of the bidi streams of `method` in a
/// Prometheus text dump of a gRPC server.
fn count_streams(text: &str, method: &str) -> (u64, u64) {
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
    (started, handled)
}

#[cfg(test)]
mod tests {
    use super::count_streams;

    #[test]
    fn counts_bidi_streams_of_one_method() {
        let text = r#"
grpc_server_started_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 7
grpc_server_handled_total{grpc_code="Canceled",grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 2
grpc_server_handled_total{grpc_code="OK",grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 1
grpc_server_started_total{grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"} 3
grpc_server_started_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 40
"#;
        assert_eq!(count_streams(text, "Watch"), (7, 3));
        assert_eq!(count_streams(text, "LeaseKeepAlive"), (3, 0));
        assert_eq!(count_streams(text, "Range"), (0, 0));
    }
}
