//! One endpoint of a [`Channel`](super::Channel): a tonic channel over exactly
//! one TCP connection, whose loss is reported to the manager at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tower::{BoxError, Service};

/// What an endpoint tells the channel's manager.
#[derive(Debug)]
pub(crate) enum Event {
    /// An eager connect finished.
    Connected {
        id: String,
        generation: u64,
        result: Result<(tonic::transport::Channel, Arc<AtomicBool>), String>,
    },
    /// The connection of this generation is gone.
    Lost { id: String, generation: u64 },
    /// Too many `UNAVAILABLE` answers in a row.
    Outlier { id: String, generation: u64 },
    /// The server sent a graceful GOAWAY (`NO_ERROR`) on the connection of
    /// this generation: it takes no new request, and finishes its calls.
    GoingAway { id: String, generation: u64 },
}

/// Counters of one endpoint, kept across its reconnections.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Consecutive `UNAVAILABLE` answers.
    unavailable: AtomicU32,
    /// Latency EWMA in nanoseconds (0: no sample yet), for reporting only:
    /// the picks use tower's `PeakEwma`.
    ewma_ns: Mutex<f64>,
}

impl Stats {
    pub(crate) fn latency_ewma(&self) -> Option<Duration> {
        let ns = *self.ewma_ns.lock().unwrap_or_else(|e| e.into_inner());
        (ns > 0.0).then(|| Duration::from_nanos(ns as u64))
    }

    fn record(&self, elapsed: Duration) {
        let sample = elapsed.as_nanos() as f64;
        let mut ewma = self.ewma_ns.lock().unwrap_or_else(|e| e.into_inner());
        *ewma = if *ewma == 0.0 {
            sample
        } else {
            0.8 * *ewma + 0.2 * sample
        };
    }
}

/// The request was not handed to a live connection: safe to send elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("request not sent: {0}")]
pub(crate) struct NotSent(pub(crate) &'static str);

/// The endpoint was drained past its timeout while the request was in flight.
#[derive(Debug, thiserror::Error)]
#[error("endpoint drained before the answer came")]
pub(crate) struct Drained;

/// The endpoint (instance id) that answered, in a response's extensions.
#[derive(Clone, Debug)]
pub(crate) struct ServedBy(pub(crate) Arc<str>);

/// A failure of one endpoint, naming it; the cause is its source.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) id: Arc<str>,
    pub(crate) source: BoxError,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// What the balancer holds for one endpoint: cheap to clone.
#[derive(Clone)]
pub(crate) struct EndpointService {
    channel: tonic::transport::Channel,
    shared: Arc<EndpointShared>,
}

pub(crate) struct EndpointShared {
    pub(crate) id: Arc<str>,
    pub(crate) generation: u64,
    pub(crate) stats: Arc<Stats>,
    /// The connection is gone.
    pub(crate) dead: Arc<AtomicBool>,
    /// Taken out of the balancer: new requests are refused as not sent.
    pub(crate) closed: AtomicBool,
    /// Cancels in-flight requests when a drain times out.
    pub(crate) cancel: CancellationToken,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) outlier_after: Option<u32>,
    pub(crate) labels: super::metrics::Labels,
}

impl EndpointService {
    pub(crate) fn new(channel: tonic::transport::Channel, shared: Arc<EndpointShared>) -> Self {
        Self { channel, shared }
    }

    pub(crate) fn id(&self) -> &Arc<str> {
        &self.shared.id
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.shared.stats.in_flight.load(Ordering::Acquire)
    }

    fn refuses(&self) -> Option<&'static str> {
        if self.shared.dead.load(Ordering::Acquire) {
            Some("connection lost")
        } else if self.shared.closed.load(Ordering::Acquire) {
            Some("endpoint removed")
        } else {
            None
        }
    }
}

/// Decrements the in-flight count however the call ends.
struct InFlight(Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its call in flight until the body ends (its
/// last frame, an error) or is dropped, so that a drain waits for a
/// streaming answer, not just its headers.
struct Counted {
    body: Body,
    in_flight: Option<InFlight>,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Pending => false,
        };
        if ended {
            this.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Service<http::Request<Body>> for EndpointService {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Some(why) = self.refuses() {
            // The balancer drops a service that fails here.
            return Poll::Ready(Err(NotSent(why).into()));
        }
        self.channel.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Some(why) = self.refuses() {
            let id = self.shared.id.clone();
            return Box::pin(async move {
                Err(Failed {
                    id,
                    source: NotSent(why).into(),
                }
                .into())
            });
        }
        let shared = self.shared.clone();
        shared.stats.in_flight.fetch_add(1, Ordering::AcqRel);
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(shared.stats.clone());
        let call = self.channel.call(request);
        Box::pin(async move {
            let start = Instant::now();
            let result: Result<_, BoxError> = tokio::select! {
                r = call => r.map_err(Into::into),
                _ = shared.cancel.cancelled() => Err(Drained.into()),
            };
            let elapsed = start.elapsed();
            shared.stats.record(elapsed);
            // `UNAVAILABLE` answers and errors that leave the connection up
            // (a refused stream, say) count towards outlier ejection: failing
            // fast, such an endpoint would otherwise look fast to PeakEwma.
            let (failed, outlying) = match &result {
                Ok(response) => {
                    let unavailable = grpc_status(response) == Some(tonic::Code::Unavailable);
                    (unavailable, unavailable)
                }
                Err(e) => {
                    let lost = connection_failed(e.as_ref());
                    // A graceful GOAWAY: no new request on this connection,
                    // but the calls the server is finishing keep it open.
                    if lost && !shared.dead.swap(true, Ordering::AcqRel) {
                        let (id, generation) = (shared.id.to_string(), shared.generation);
                        let _ = shared.events.send(if going_away(e.as_ref()) {
                            Event::GoingAway { id, generation }
                        } else {
                            Event::Lost { id, generation }
                        });
                    }
                    (true, !lost && !chain(e.as_ref()).any(|e| e.is::<Drained>()))
                }
            };
            if outlying {
                let n = shared.stats.unavailable.fetch_add(1, Ordering::AcqRel) + 1;
                if shared.outlier_after.is_some_and(|max| n >= max) {
                    shared.stats.unavailable.store(0, Ordering::Release);
                    let _ = shared.events.send(Event::Outlier {
                        id: shared.id.to_string(),
                        generation: shared.generation,
                    });
                }
            } else if !failed {
                shared.stats.unavailable.store(0, Ordering::Release);
            }
            if failed {
                shared.stats.failures.fetch_add(1, Ordering::Relaxed);
            }
            super::metrics::request(&shared.labels, elapsed, failed);
            match result {
                Ok(response) => {
                    // The call stays in flight while its body comes.
                    let mut response = response.map(|body| {
                        Body::new(Counted {
                            body,
                            in_flight: Some(guard),
                        })
                    });
                    response
                        .extensions_mut()
                        .insert(ServedBy(shared.id.clone()));
                    Ok(response)
                }
                Err(source) => Err(Failed {
                    id: shared.id.clone(),
                    source,
                }
                .into()),
            }
        })
    }
}

/// The `grpc-status` of a trailers-only answer, if any.
pub(crate) fn grpc_status(response: &http::Response<Body>) -> Option<tonic::Code> {
    let value = response.headers().get("grpc-status")?;
    let code: i32 = value.to_str().ok()?.parse().ok()?;
    Some(tonic::Code::from_i32(code))
}

/// Walks an error's sources.
fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// Whether the request surely never reached the server: refused before it
/// was handed to a connection, a connect that failed, a stream the server
/// refused (`REFUSED_STREAM`, or beyond a GOAWAY's last stream), or a request
/// hyper cancelled because its connection closed before sending it.
pub(crate) fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    chain(error).any(|e| {
        if e.is::<NotSent>() || e.is::<ConnectFailed>() {
            return true;
        }
        if let Some(e) = e.downcast_ref::<io::Error>() {
            return e.kind() == io::ErrorKind::ConnectionRefused;
        }
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            return e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR));
        }
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            return e.is_canceled();
        }
        e.is::<tower::buffer::error::Closed>()
    })
}

/// Whether an error ends the connection's use without its socket being
/// known to be gone: the server's graceful GOAWAY (`NO_ERROR`), after which
/// hyper cancels the requests it had not sent ("connection closed") and
/// tonic's reconnect meets the one-connection connector's refusal. The
/// connection takes no new request, and the calls on it may still finish;
/// a socket that really is gone is reported by [`Watched`] first.
fn going_away(error: &(dyn std::error::Error + 'static)) -> bool {
    chain(error).any(|e| {
        e.is::<ConnectFailed>()
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(|e| e.is_canceled())
            || e.downcast_ref::<h2::Error>().is_some_and(|e| {
                e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR)
            })
    })
}

/// Whether an error means the endpoint's connection is unusable.
fn connection_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    !chain(error).any(|e| e.is::<Drained>())
        && chain(error).any(|e| {
            e.is::<ConnectFailed>()
                || e.is::<io::Error>()
                || e.downcast_ref::<hyper::Error>()
                    .is_some_and(|e| e.is_closed() || e.is_canceled() || e.is_incomplete_message())
                || e.downcast_ref::<h2::Error>()
                    .is_some_and(|e| e.is_io() || e.is_go_away())
                || e.is::<tower::buffer::error::Closed>()
        })
}

/// The connector refused to open a second connection: each tonic channel of
/// an endpoint is one connection, so that its loss is seen and reconnection
/// is the manager's (with backoff), not tonic's.
#[derive(Debug, thiserror::Error)]
#[error("connection to {0} failed: {1}")]
pub(crate) struct ConnectFailed(String, String);

/// Tells the manager, once, that a connection is gone.
pub(crate) struct LostSignal {
    pub(crate) id: String,
    pub(crate) generation: u64,
    pub(crate) dead: Arc<AtomicBool>,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    /// Cancelled to close the connection (drain over, endpoint gone).
    pub(crate) close: CancellationToken,
}

impl LostSignal {
    fn fire(&self) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            let _ = self.events.send(Event::Lost {
                id: self.id.clone(),
                generation: self.generation,
            });
        }
    }
}

/// A connector that opens one TCP connection (nodelay) and refuses any
/// further one.
pub(crate) struct OneConnection {
    pub(crate) address: String,
    pub(crate) signal: Option<LostSignal>,
}

impl Service<http::Uri> for OneConnection {
    type Response = TokioIo<Watched>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<TokioIo<Watched>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let address = self.address.clone();
        let signal = self.signal.take();
        Box::pin(async move {
            let Some(signal) = signal else {
                return Err(ConnectFailed(address, "connection was lost".into()).into());
            };
            let stream = tokio::net::TcpStream::connect(&address)
                .await
                .map_err(|e| ConnectFailed(address.clone(), e.to_string()))?;
            stream.set_nodelay(true)?;
            let closed = Box::pin(signal.close.clone().cancelled_owned());
            Ok(TokioIo::new(Watched {
                stream,
                signal,
                closed,
            }))
        })
    }
}

/// A TCP stream that reports its end (EOF, error, or drop) to the manager.
pub(crate) struct Watched {
    stream: tokio::net::TcpStream,
    signal: LostSignal,
    closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.signal.fire();
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            self.signal.fire();
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.signal.fire()
            }
            Poll::Ready(Err(_)) => self.signal.fire(),
            _ => {}
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Err(_)) = &result {
            self.signal.fire();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Connects eagerly: resolves once the connection is up (HTTP/2 handshake
/// done), or fails.
pub(crate) async fn connect(
    address: &str,
    connect_timeout: Duration,
    signal: LostSignal,
) -> Result<(tonic::transport::Channel, Arc<AtomicBool>), String> {
    let dead = signal.dead.clone();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad address {address}: {e}"))?
        .connect_timeout(connect_timeout);
    let connector = OneConnection {
        address: address.to_owned(),
        signal: Some(signal),
    };
    match tokio::time::timeout(connect_timeout, endpoint.connect_with_connector(connector)).await {
        Ok(Ok(channel)) => Ok((channel, dead)),
        Ok(Err(e)) => Err(chain(&e)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ")),
        Err(_) => Err(format!("connect timed out after {connect_timeout:?}")),
    }
}
