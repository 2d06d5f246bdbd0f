//! Balances plain HTTP/1.1 calls (hyper-util's client) over the instances of
//! a service with `etcd_registry::balance::Balance`.
//!
//! Self-contained: starts a throwaway etcd through the testkit and three tiny
//! HTTP/1.1 servers on ephemeral ports, registers them and calls them.
//!
//! ```text
//! cargo run -p etcd-registry --example http_balance
//! ```

use std::time::Duration;

use bytes::Bytes;
use etcd_registry::balance::Balance;
use etcd_registry::{Registry, ServiceInstance};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Service, ServiceExt};

/// A tiny keep-alive HTTP/1.1 server answering its name; returns its port.
async fn start_server(name: &'static str) -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
                while let Ok(n @ 1..) = socket.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                            name.len()
                        );
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(port)
}

/// hyper-util's client, sending to one endpoint: what `Balance` makes per instance.
#[derive(Clone)]
struct ToEndpoint {
    client: Client<HttpConnector, Empty<Bytes>>,
    endpoint: String,
}

impl Service<http::Request<Empty<Bytes>>> for ToEndpoint {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Empty<Bytes>>) -> Self::Future {
        let client = self.client.clone();
        let uri = format!("http://{}{}", self.endpoint, request.uri().path());
        Box::pin(async move {
            *request.uri_mut() = uri.parse()?;
            Ok(client.request(request).await?)
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (endpoints, _etcd) = etcd_registry_testkit::endpoints_from_env_or_start()
        .await
        .map_err(|e| e.to_string())?;
    let registry = Registry::builder()
        .endpoints(endpoints)
        .namespace("demo")
        .connect()
        .await?;
    let mut registrations = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let port = start_server(name).await?;
        let instance = ServiceInstance::new("web", name, "127.0.0.1", port);
        registrations.push(registry.register(instance).await?);
    }

    let client = Client::builder(TokioExecutor::new()).build_http();
    // Made per instance endpoint; a TCP connect first, so that an instance
    // takes requests only once it answers.
    let make = tower::service_fn(move |endpoint: String| {
        let client = client.clone();
        async move {
            tokio::net::TcpStream::connect(&endpoint).await?;
            Ok::<_, std::io::Error>(ToEndpoint { client, endpoint })
        }
    });
    let mut balance = Balance::new(&registry.cache("web").await?, make);

    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..300 {
        let request = http::Request::get("/").body(Empty::new())?;
        let call = async { balance.ready().await?.call(request).await };
        let response = tokio::time::timeout(Duration::from_secs(5), call).await??;
        let body = http_body_util::BodyExt::collect(response.into_body()).await?;
        *served
            .entry(String::from_utf8_lossy(&body.to_bytes()).into_owned())
            .or_default() += 1;
    }
    println!("300 calls served by {served:?}");
    registry.close().await?;
    Ok(())
}
