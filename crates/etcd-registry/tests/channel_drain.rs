//! `Registry::channel`: a draining endpoint keeps its streaming calls until
//! their bodies end, whether it left the cache (deregistered) or its server
//! shuts down gracefully (GOAWAY with NO_ERROR).
#![cfg(feature = "channel")]

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use etcd_registry::channel::Phase;
use etcd_registry::{Channel, Registry, ServiceInstance};
use etcd_registry_testkit::{eventually, shared_server, unique_name, within};
use futures::future::BoxFuture;
use http_body::Frame;
use http_body_util::BodyExt;
use tonic::body::Body;
use tower::{Service, ServiceExt};

const T: Duration = Duration::from_secs(15);
/// Messages per stream, one every `TICK`: a stream lasts about 3 s.
const MESSAGES: u64 = 10;
const TICK: Duration = Duration::from_millis(300);

async fn registry(ns: &str) -> Registry {
    let server = shared_server().await;
    common::connect_with(common::builder(server.endpoints(), ns, 5)).await
}

fn instance(id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new("svc", id, "127.0.0.1", port)
}

fn phase(channel: &Channel, id: &str) -> Option<Phase> {
    channel
        .endpoints()
        .into_iter()
        .find(|e| e.id == id)
        .map(|e| e.phase)
}

/// One gRPC message frame carrying `n`.
fn message(n: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(13);
    b.put_u8(0);
    b.put_u32(8);
    b.put_u64(n);
    b.freeze()
}

/// `test.Ticks`: `Stream` sends `MESSAGES` messages, one every `TICK`, then
/// an OK status; any other method answers one message at once. Written by
/// hand (gRPC framing over tonic's server) so that no protoc is needed.
#[derive(Clone)]
struct Ticks {
    streams: Arc<AtomicU64>,
    unary: Arc<AtomicU64>,
}

impl tonic::server::NamedService for Ticks {
    const NAME: &'static str = "test.Ticks";
}

impl Service<http::Request<Body>> for Ticks {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let streaming = request.uri().path().ends_with("/Stream");
        let count = if streaming {
            &self.streams
        } else {
            &self.unary
        };
        count.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let n = if streaming { MESSAGES } else { 1 };
            let frames = futures::stream::unfold(0u64, move |i| async move {
                if i > n {
                    return None;
                }
                if i == n {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    return Some((Ok::<_, tonic::Status>(Frame::trailers(trailers)), i + 1));
                }
                if streaming {
                    tokio::time::sleep(TICK).await;
                }
                Some((Ok(Frame::data(message(i))), i + 1))
            });
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(Body::new(http_body_util::StreamBody::new(frames)))
                .expect("response");
            Ok(response)
        })
    }
}

/// A `test.Ticks` server on 127.0.0.1 with its own runtime.
struct StreamServer {
    port: u16,
    ticks: Ticks,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl StreamServer {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ticks = Ticks {
            streams: Arc::default(),
            unary: Arc::default(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let service = ticks.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let incoming = futures::stream::unfold(listener, |l| async move {
                Some((l.accept().await.map(|(s, _)| s), l))
            });
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            let _ = done_tx.send(());
        });
        Self {
            port,
            ticks,
            shutdown: Some(tx),
            done: Some(done),
            runtime: Some(runtime),
        }
    }

    /// Starts a graceful shutdown: GOAWAY(NO_ERROR) on every connection,
    /// in-flight calls finish.
    fn shut_down_gracefully(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Whether the graceful shutdown is over (every call finished).
    fn is_down(&self) -> bool {
        self.done.as_ref().is_some_and(|d| d.try_recv().is_ok())
    }

    fn streams(&self) -> u64 {
        self.ticks.streams.load(Ordering::SeqCst)
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn request(method: &str) -> http::Request<Body> {
    http::Request::builder()
        .method("POST")
        .uri(format!("/test.Ticks/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::new(http_body_util::Full::new(Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ]))))
        .expect("request")
}

/// What a call received: the numbers in its messages and its grpc-status.
#[derive(Debug, Default)]
struct Received {
    numbers: Vec<u64>,
    status: Option<String>,
    error: Option<String>,
}

/// Reads a response body to its end, recording each message as it comes.
async fn read_all(
    mut body: Body,
    seen: Arc<std::sync::Mutex<Received>>,
) -> Arc<std::sync::Mutex<Received>> {
    let mut buffer = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Err(e)) => {
                seen.lock().unwrap().error = Some(format!("{e:?}"));
                break;
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                buffer.extend_from_slice(&data);
                while buffer.len() >= 13 {
                    let chunk = buffer.split_to(13);
                    let n = u64::from_be_bytes(chunk[5..13].try_into().unwrap());
                    seen.lock().unwrap().numbers.push(n);
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    seen.lock().unwrap().status = trailers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                }
            }
        }
    }
    seen
}

/// Opens a `Stream` call through `channel` and reads it in the background.
async fn open_stream(
    channel: &Channel,
) -> (
    Arc<std::sync::Mutex<Received>>,
    tokio::task::JoinHandle<Arc<std::sync::Mutex<Received>>>,
) {
    let mut channel = channel.clone();
    let response = within("stream headers", T, async {
        channel.ready().await.unwrap().call(request("Stream")).await
    })
    .await
    .expect("stream call");
    assert_eq!(response.status(), http::StatusCode::OK);
    let seen = Arc::new(std::sync::Mutex::new(Received::default()));
    let reading = tokio::spawn(read_all(response.into_body(), seen.clone()));
    (seen, reading)
}

async fn unary(channel: &Channel) -> Result<(), String> {
    let mut channel = channel.clone();
    let call = async {
        let response = channel
            .ready()
            .await
            .map_err(|e| e.to_string())?
            .call(request("Ping"))
            .await
            .map_err(|e| format!("{e:?}"))?;
        let seen = Arc::new(std::sync::Mutex::new(Received::default()));
        let seen = read_all(response.into_body(), seen).await;
        let seen = seen.lock().unwrap();
        match (&seen.error, seen.status.as_deref()) {
            (None, Some("0")) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

fn assert_complete(what: &str, seen: &Received) {
    assert_eq!(
        (
            seen.numbers.clone(),
            seen.status.as_deref(),
            seen.error.as_deref()
        ),
        ((0..MESSAGES).collect::<Vec<_>>(), Some("0"), None),
        "{what}: the stream did not complete"
    );
}

#[tokio::test]
async fn a_stream_survives_the_deregistration_of_its_instance() {
    let registry = registry(&unique_name("ch-drain-stream")).await;
    let s0 = StreamServer::start();
    let s1 = StreamServer::start();
    let r0 = registry.register(instance("s0", s0.port)).await.unwrap();
    let channel = within("channel", T, registry.channel("svc")).await.unwrap();
    eventually("s0 ready", T, || async {
        phase(&channel, "s0") == Some(Phase::Ready)
    })
    .await;
    let (seen, reading) = open_stream(&channel).await;
    eventually("the first message", T, || async {
        !seen.lock().unwrap().numbers.is_empty()
    })
    .await;
    assert_eq!(s0.streams(), 1);
    assert_eq!(
        channel
            .endpoints()
            .iter()
            .find(|e| e.id == "s0")
            .map(|e| e.in_flight),
        Some(1),
        "a stream whose body is still coming counts as in flight"
    );
    let _r1 = registry.register(instance("s1", s1.port)).await.unwrap();
    eventually("s1 ready", T, || async {
        phase(&channel, "s1") == Some(Phase::Ready)
    })
    .await;
    within("deregister s0", T, r0.deregister()).await.unwrap();
    eventually("s0 out of rotation", T, || async {
        phase(&channel, "s0") != Some(Phase::Ready)
    })
    .await;
    // New calls go to s1 while s0 drains.
    for i in 0..5 {
        unary(&channel)
            .await
            .unwrap_or_else(|e| panic!("call {i} during the drain: {e}"));
    }
    let seen = within("the stream ends", T, reading).await.unwrap();
    assert_complete("deregistered", &seen.lock().unwrap());
    // The drain ends with the stream, long before its 30 s timeout.
    eventually("s0's drain over", T, || async {
        phase(&channel, "s0").is_none()
    })
    .await;
    within("close", T, registry.close()).await.ok();
}

#[tokio::test]
async fn a_stream_survives_a_graceful_shutdown_of_its_server() {
    let registry = registry(&unique_name("ch-goaway-stream")).await;
    let mut s0 = StreamServer::start();
    let s1 = StreamServer::start();
    let _r0 = registry.register(instance("s0", s0.port)).await.unwrap();
    let channel = within("channel", T, registry.channel("svc")).await.unwrap();
    eventually("s0 ready", T, || async {
        phase(&channel, "s0") == Some(Phase::Ready)
    })
    .await;
    let (seen, reading) = open_stream(&channel).await;
    eventually("the first message", T, || async {
        !seen.lock().unwrap().numbers.is_empty()
    })
    .await;
    assert_eq!(s0.streams(), 1);
    let _r1 = registry.register(instance("s1", s1.port)).await.unwrap();
    eventually("s1 ready", T, || async {
        phase(&channel, "s1") == Some(Phase::Ready)
    })
    .await;
    // s0 stops gracefully (it stays registered): GOAWAY(NO_ERROR), and it
    // finishes the stream. Unary calls keep coming meanwhile, some of them
    // picking s0 and meeting its GOAWAY.
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                let start = std::time::Instant::now();
                let mut i = 0;
                while start.elapsed() < Duration::from_secs(2) && i < 20_000 {
                    if let Err(e) = unary(&channel).await {
                        failed.push(format!("call {i}: {e}"));
                    }
                    i += 1;
                }
                failed
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s0.shut_down_gracefully();
    let mut failed = Vec::new();
    for caller in callers {
        failed.extend(within("callers", T, caller).await.unwrap());
    }
    let seen = within("the stream ends", T, reading).await.unwrap();
    assert_complete("graceful shutdown", &seen.lock().unwrap());
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    eventually("s0's server is down", T, || async { s0.is_down() }).await;
    within("close", T, registry.close()).await.ok();
}
