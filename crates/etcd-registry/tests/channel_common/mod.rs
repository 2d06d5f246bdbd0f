//! Test servers for the channel tests: real tonic-health servers on
//! loopback, each on its own runtime (so that a "kill" drops every
//! connection at once), with a layer that counts, delays or answers
//! `UNAVAILABLE`; and a raw HTTP/2 server that refuses every stream.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::Server;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// What a test server does, changeable while it runs.
#[derive(Clone, Default)]
pub struct Control {
    pub calls: Arc<AtomicU64>,
    pub delay_ms: Arc<AtomicU64>,
    pub unavailable: Arc<AtomicBool>,
    /// Whether to keep each request's `grpc-timeout` in `timeouts`.
    pub record_timeouts: Arc<AtomicBool>,
    /// The `grpc-timeout` header of each request, in arrival order.
    pub timeouts: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl Control {
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Ctl<S> {
    inner: S,
    ctl: Control,
}

impl<S, B> tower::Service<http::Request<B>> for Ctl<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.ctl.calls.fetch_add(1, Ordering::SeqCst);
        if self.ctl.record_timeouts.load(Ordering::SeqCst) {
            let timeout = req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            self.ctl.timeouts.lock().unwrap().push(timeout);
        }
        let delay = self.ctl.delay_ms.load(Ordering::SeqCst);
        let unavailable = self.ctl.unavailable.load(Ordering::SeqCst);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if unavailable {
                return Ok(tonic::Status::unavailable("test server says no").into_http());
            }
            inner.call(req).await
        })
    }
}

/// A tonic-health server on 127.0.0.1 with its own runtime.
pub struct TestServer {
    pub port: u16,
    pub ctl: Control,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    /// Starts on an ephemeral port.
    pub fn start() -> Self {
        Self::start_on(0, Control::default())
    }

    /// Starts on `port` (0: any) with `ctl`.
    pub fn start_on(port: u16, ctl: Control) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let layer_ctl = ctl.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let incoming = futures::stream::unfold(listener, |l| async move {
                Some((l.accept().await.map(|(s, _)| s), l))
            });
            let (_reporter, health) = tonic_health::server::health_reporter();
            let _ = Server::builder()
                .layer(tower::layer::layer_fn(move |inner| Ctl {
                    inner,
                    ctl: layer_ctl.clone(),
                }))
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            port,
            ctl,
            runtime: Some(runtime),
            shutdown: Some(tx),
        }
    }

    /// Kills it: every connection drops at once, as with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Starts again on the same port, with the same control.
    pub fn restart(&mut self) {
        self.kill();
        *self = Self::start_on(self.port, self.ctl.clone());
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.kill();
    }
}

/// A raw HTTP/2 server that refuses every stream (`REFUSED_STREAM`): a
/// request sent to it never reached any handler.
pub struct RefusingServer {
    pub port: u16,
    pub streams: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RefusingServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let streams = Arc::new(AtomicU64::new(0));
        let counted = streams.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        counted.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                });
            }
        });
        Self {
            port,
            streams,
            task,
        }
    }
}

impl Drop for RefusingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port nothing listens on.
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// One health check through `client`, under a timeout.
pub async fn check<T>(client: &mut HealthClient<T>) -> Result<(), tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(tonic::Status::deadline_exceeded("test timeout")),
    }
}

/// A health check marked idempotent.
pub async fn check_idempotent(
    client: &mut HealthClient<etcd_registry::Channel>,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.extensions_mut().insert(etcd_registry::Idempotent);
    match tokio::time::timeout(Duration::from_secs(5), client.check(request)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(tonic::Status::deadline_exceeded("test timeout")),
    }
}
