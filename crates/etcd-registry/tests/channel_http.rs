//! `etcd_registry::balance::Balance` over hyper-util's HTTP/1.1 client,
//! against plain HTTP/1.1 servers on loopback.
#![cfg(feature = "channel")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// A plain HTTP/1.1 server (keep-alive) answering `200 ok`, counting requests.
struct HttpServer {
    port: u16,
    requests: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<()>,
}

impl HttpServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let counted = counted.clone();
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
            tasks,
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
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
async fn http_endpoints_are_balanced_and_failed_ones_ejected() {
    let server = shared_server().await;
    let registry = common::connect_with(common::builder(
        server.endpoints(),
        &unique_name("ch-http"),
        5,
    ))
    .await;
    let mut a = HttpServer::start().await;
    let mut b = HttpServer::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _ra = registry
        .register(ServiceInstance::new("web", "a", "127.0.0.1", a.port))
        .await
        .unwrap();
    let _rb = registry
        .register(ServiceInstance::new("web", "b", "127.0.0.1", b.port))
        .await
        .unwrap();
    let _rd = registry
        .register(ServiceInstance::new("web", "dead", "127.0.0.1", dead))
        .await
        .unwrap();
    let cache = registry.cache("web").await.unwrap();

    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // Made per endpoint: a TCP connect first, so that an endpoint is used
    // only once it answers.
    let make = tower::service_fn(move |endpoint: String| {
        let client = client.clone();
        async move {
            tokio::net::TcpStream::connect(&endpoint).await?;
            Ok::<_, std::io::Error>(ToEndpoint { client, endpoint })
        }
    });
    let mut balance = Balance::new(&cache, make);
    for i in 0..40 {
        assert_eq!(
            get(&mut balance)
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}")),
            200
        );
    }
    assert!(
        a.requests() > 0 && b.requests() > 0,
        "a {} b {}",
        a.requests(),
        b.requests()
    );

    // The busier one dies: at most the call in flight on it fails, then it
    // is ejected (without ejection p2c keeps picking it: failing fast, it
    // looks fast).
    let victim = if a.requests() >= b.requests() {
        &mut a
    } else {
        &mut b
    };
    victim.tasks.abort_all();
    while victim.tasks.join_next().await.is_some() {}
    let mut failed = 0;
    for _ in 0..40 {
        if get(&mut balance).await.is_err() {
            failed += 1;
        }
    }
    assert!(failed <= 2, "{failed} of 40 calls failed after one died");
    within("close", T, registry.close()).await.unwrap();
}
