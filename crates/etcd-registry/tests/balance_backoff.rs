//! `etcd_registry::balance::Balance`: an endpoint that keeps failing is
//! tried less and less often (capped exponential backoff), not every 100 ms.
#![cfg(feature = "channel")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_registry::ServiceInstance;
use etcd_registry::balance::Balance;
use etcd_registry_testkit::{shared_server, unique_name, within};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{BoxError, Service, ServiceExt};

const T: Duration = Duration::from_secs(15);

/// A listener that accepts each connection and resets it at once (linger
/// 0), counting the connections, each with the time it came.
struct Resetting {
    port: u16,
    connects: Arc<std::sync::Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Resetting {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connects = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counted = connects.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.lock().unwrap().push(Instant::now());
                // Linger 0: the close is a reset. It does not block on drop.
                #[allow(deprecated)]
                let _ = socket.set_linger(Some(Duration::ZERO));
                drop(socket);
            }
        });
        Self {
            port,
            connects,
            task,
        }
    }

    fn connects_since(&self, since: Instant) -> usize {
        self.connects
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t >= since)
            .count()
    }
}

impl Drop for Resetting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain HTTP/1.1 server (keep-alive) answering `200 ok`, counting
/// requests; while `resetting`, it resets each new connection instead.
struct HttpServer {
    port: u16,
    requests: Arc<AtomicU64>,
    connects: Arc<AtomicU64>,
    resetting: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicU64::new(0));
        let connects = Arc::new(AtomicU64::new(0));
        let resetting = Arc::new(AtomicBool::new(false));
        let counted = requests.clone();
        let (connected, reset) = (connects.clone(), resetting.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                connected.fetch_add(1, Ordering::SeqCst);
                if reset.load(Ordering::SeqCst) {
                    #[allow(deprecated)]
                    let _ = socket.set_linger(Some(Duration::ZERO));
                    drop(socket);
                    continue;
                }
                let counted = counted.clone();
                let reset = reset.clone();
                connections.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if reset.load(Ordering::SeqCst) {
                                // A kept-alive connection fails as a new one does.
                                #[allow(deprecated)]
                                let _ = socket.set_linger(Some(Duration::ZERO));
                                return;
                            }
                            counted.fetch_add(1, Ordering::SeqCst);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if socket.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Self {
            port,
            requests,
            connects,
            resetting,
            task,
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// hyper-util's client, sending to one endpoint.
#[derive(Clone)]
struct ToEndpoint {
    client: Client<HttpConnector, Empty<Bytes>>,
    endpoint: String,
}

impl Service<http::Request<Empty<Bytes>>> for ToEndpoint {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Empty<Bytes>>) -> Self::Future {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = format!("http://{}{path}", self.endpoint).parse().unwrap();
        self.client.request(request)
    }
}

async fn get(
    balance: &mut Balance<http::Request<Empty<Bytes>>, http::Response<hyper::body::Incoming>>,
) -> Result<u16, BoxError> {
    let request = http::Request::get("/hello").body(Empty::new())?;
    let call = async { balance.ready().await?.call(request).await };
    let response = tokio::time::timeout(Duration::from_secs(5), call).await??;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn a_port_that_resets_every_connection_is_tried_less_and_less() {
    let server = shared_server().await;
    let registry = common::connect_with(common::builder(
        server.endpoints(),
        &unique_name("bal-backoff"),
        5,
    ))
    .await;
    let good = HttpServer::start().await;
    let bad = Resetting::start().await;
    let _rg = registry
        .register(ServiceInstance::new("web", "good", "127.0.0.1", good.port))
        .await
        .unwrap();
    let _rb = registry
        .register(ServiceInstance::new("web", "bad", "127.0.0.1", bad.port))
        .await
        .unwrap();
    let cache = registry.cache("web").await.unwrap();
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // Made with no connect of its own: the port accepts, so a probe would
    // pass; only the calls fail.
    let make = tower::service_fn(move |endpoint: String| {
        let client = client.clone();
        async move { Ok::<_, std::io::Error>(ToEndpoint { client, endpoint }) }
    });
    let mut balance = Balance::new(&cache, make);
    within("the good endpoint answers", T, async {
        while get(&mut balance).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // Calls for 10 s, one every 5 ms. With the documented backoff (100 ms
    // doubling to 5 s, times [0.5, 1]) the bad endpoint is tried at most
    // about 9 times; tried again every 50-100 ms, it would be over 100.
    let start = Instant::now();
    let half = start + Duration::from_secs(5);
    let (mut failed, mut failed_late, mut calls) = (0u32, 0u32, 0u32);
    while start.elapsed() < Duration::from_secs(10) && calls < 5_000 {
        calls += 1;
        if get(&mut balance).await.is_err() {
            failed += 1;
            if Instant::now() >= half {
                failed_late += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let connects = bad.connects_since(start);
    let connects_late = bad.connects_since(half);
    println!(
        "{calls} calls, {failed} failed ({failed_late} in the last 5 s); \
         {connects} connects to the bad port ({connects_late} in the last 5 s)"
    );
    assert!(
        good.requests.load(Ordering::SeqCst) > 100,
        "the good endpoint took the calls"
    );
    assert!(
        connects < 30 && failed < 30,
        "the bad endpoint was tried too often: {connects} connects, {failed} failed calls in 10 s"
    );
    // By then the delay is near its 5 s cap: at most a few tries.
    assert!(
        connects_late <= 6 && failed_late <= 6,
        "the backoff did not grow: {connects_late} connects, {failed_late} failed calls in the last 5 s"
    );
    within("close", T, registry.close()).await.ok();
}

#[tokio::test]
async fn an_answered_call_starts_the_backoff_over() {
    let server = shared_server().await;
    let registry = common::connect_with(common::builder(
        server.endpoints(),
        &unique_name("bal-backoff-reset"),
        5,
    ))
    .await;
    let good = HttpServer::start().await;
    let flaky = HttpServer::start().await;
    let _rg = registry
        .register(ServiceInstance::new("web", "good", "127.0.0.1", good.port))
        .await
        .unwrap();
    let _rf = registry
        .register(ServiceInstance::new(
            "web",
            "flaky",
            "127.0.0.1",
            flaky.port,
        ))
        .await
        .unwrap();
    let cache = registry.cache("web").await.unwrap();
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let make = tower::service_fn(move |endpoint: String| {
        let client = client.clone();
        async move { Ok::<_, std::io::Error>(ToEndpoint { client, endpoint }) }
    });
    let mut balance = Balance::new(&cache, make);
    let calls_for = async |balance: &mut Balance<_, _>, period: Duration| {
        let start = Instant::now();
        let mut calls = 0;
        while start.elapsed() < period && calls < 5_000 {
            calls += 1;
            let _ = get(balance).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    // Failing for 6 s: the delay grows to seconds.
    flaky.resetting.store(true, Ordering::SeqCst);
    calls_for(&mut balance, Duration::from_secs(6)).await;
    // It recovers and answers a call: that starts the backoff over.
    flaky.resetting.store(false, Ordering::SeqCst);
    let answered = flaky.requests.load(Ordering::SeqCst);
    within("the flaky endpoint answers again", T, async {
        while flaky.requests.load(Ordering::SeqCst) == answered {
            let _ = get(&mut balance).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // It fails again: ejected for 50-100 ms, not for seconds, so it is
    // tried again (and fails again) several times within 2 s.
    flaky.resetting.store(true, Ordering::SeqCst);
    let before = flaky.connects.load(Ordering::SeqCst);
    calls_for(&mut balance, Duration::from_secs(2)).await;
    let tries = flaky.connects.load(Ordering::SeqCst) - before;
    assert!(
        tries >= 3,
        "after an answered call the backoff did not start over: {tries} tries in 2 s"
    );
    within("close", T, registry.close()).await.ok();
}
