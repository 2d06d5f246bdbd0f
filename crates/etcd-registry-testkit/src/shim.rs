//! An HTTP/2-aware proxy in front of etcd that can silence watch streams
//! while every other call goes through.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::Result;
use crate::server::POLL;

/// The gRPC path of etcd's watch streams.
pub const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

type ShimBody = BoxBody<Bytes, hyper::Error>;

/// What the shim's connections share with its handle.
#[derive(Debug, Default)]
struct Shared {
    /// Bumped by [`GrpcShim::silence_watches`]: a watch stream opened
    /// before the bump delivers nothing more.
    generation: AtomicU64,
    /// Progress requests on watch streams are dropped.
    drop_progress: AtomicBool,
    /// Watch responses held back from silenced streams.
    swallowed: AtomicU64,
    /// Requests forwarded, by gRPC path.
    calls: Mutex<HashMap<String, u64>>,
}

impl Shared {
    fn count(&self, path: &str) {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *calls.entry(path.to_owned()).or_default() += 1;
    }
}

/// An HTTP/2 (gRPC) proxy from `127.0.0.1:<random port>` to one etcd
/// endpoint, which understands calls: it can hold etcd's watch streams open
/// and silent while unary calls (and lease keep-alives) pass, and it counts
/// the calls it forwards.
///
/// This is what a client sees behind a proxy whose watch went silent
/// (etcd's gRPC proxy with a stuck watcher, say): the connection is healthy,
/// requests are answered, the watch stream stays open, and no event arrives.
///
/// * [`silence_watches`](Self::silence_watches) silences the watch streams
///   open now: they stay open, what the client sends on them still reaches
///   etcd, and nothing etcd answers on them reaches the client any more.
///   Watch streams opened afterwards work normally, as a client that
///   restarts a dead watch would find.
/// * [`drop_progress_requests`](Self::drop_progress_requests) makes the shim
///   drop watch progress requests, as etcd's gRPC proxy leaves them
///   unanswered.
///
/// Each client connection gets its own upstream connection. Dropping the
/// shim closes its listener and every connection. Its tasks run on the
/// tokio runtime that called [`start`](Self::start).
///
/// ```no_run
/// # async fn demo() -> etcd_registry_testkit::Result<()> {
/// use etcd_registry_testkit::{EtcdServer, GrpcShim};
///
/// let etcd = EtcdServer::start().await?;
/// let shim = GrpcShim::start(&etcd.endpoint()).await?;
/// let mut client = etcd_client::Client::connect([shim.endpoint()], None).await?;
/// let _events = client.watch("k", None).await?;
/// shim.silence_watches(); // `_events` now hears nothing, `client.get` still works
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct GrpcShim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl GrpcShim {
    /// Listens on a fresh loopback port and forwards each connection to
    /// `upstream` (`"http://127.0.0.1:P"` or `"127.0.0.1:P"`, plaintext
    /// HTTP/2), connecting upstream when the client connects.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the listener cannot be bound.
    pub async fn start(upstream: &str) -> Result<GrpcShim> {
        let upstream: Arc<str> = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .into();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        tracing::debug!(%addr, %upstream, "gRPC shim listening");
        let accept_task = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(GrpcShim {
            addr,
            shared,
            accept_task,
        })
    }

    /// The shim's URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Silences every watch stream open now (see the type's docs).
    pub fn silence_watches(&self) {
        tracing::debug!(addr = %self.addr, "gRPC shim: silencing the open watch streams");
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// From now on, drops every watch progress request (on every stream).
    pub fn drop_progress_requests(&self) {
        self.shared.drop_progress.store(true, Ordering::SeqCst);
    }

    /// How many requests on the gRPC method `path` were forwarded so far,
    /// e.g. `"/etcdserverpb.KV/Range"`, or [`WATCH_PATH`] for watch streams.
    pub fn calls(&self, path: &str) -> u64 {
        let calls = self
            .shared
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        calls.get(path).copied().unwrap_or(0)
    }

    /// How many watch responses silenced streams have held back so far.
    pub fn swallowed(&self) -> u64 {
        self.shared.swallowed.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcShim {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet): aborting it
        // drops them all.
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: Arc<str>, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    tracing::trace!(%peer, "gRPC shim: accepted");
                    connections.spawn(connection(socket, upstream.clone(), shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC shim: accept failed");
                    tokio::time::sleep(POLL).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves one client connection over one upstream HTTP/2 connection.
async fn connection(client: TcpStream, upstream: Arc<str>, shared: Arc<Shared>) {
    let server = match TcpStream::connect(&*upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%upstream, error = %e, "gRPC shim: upstream unreachable, closing client");
            return;
        }
    };
    let (sender, upstream_conn) =
        match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(server))
            .await
        {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "gRPC shim: upstream handshake failed");
                return;
            }
        };
    let service = hyper::service::service_fn(move |req| {
        forward(req, sender.clone(), upstream.clone(), shared.clone())
    });
    let serve = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(client), service);
    // Either side closing ends the other.
    tokio::select! {
        r = serve => if let Err(e) = r {
            tracing::debug!(error = %e, "gRPC shim: client connection ended");
        },
        r = upstream_conn => if let Err(e) = r {
            tracing::debug!(error = %e, "gRPC shim: upstream connection ended");
        },
    }
}

async fn forward(
    req: Request<Incoming>,
    mut sender: hyper::client::conn::http2::SendRequest<ShimBody>,
    upstream: Arc<str>,
    shared: Arc<Shared>,
) -> std::result::Result<Response<ShimBody>, hyper::Error> {
    // Read before counting: a stream counted before `silence_watches` is silenced.
    let opened = shared.generation.load(Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    shared.count(&path);
    let watch = path == WATCH_PATH;
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
    match format!("http://{upstream}{path_and_query}").parse() {
        Ok(uri) => parts.uri = uri,
        Err(e) => {
            tracing::warn!(error = %e, "gRPC shim: cannot rebuild the URI; forwarding it as is")
        }
    }
    let body = if watch {
        Messages {
            inner: body,
            buf: BytesMut::new(),
            keep: Keep::Requests(shared.clone()),
        }
        .boxed()
    } else {
        body.boxed()
    };
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    let (parts, body) = resp.into_parts();
    let body = if watch {
        Messages {
            inner: body,
            buf: BytesMut::new(),
            keep: Keep::Responses { shared, opened },
        }
        .boxed()
    } else {
        body.boxed()
    };
    Ok(Response::from_parts(parts, body))
}

/// Which gRPC messages of a watch stream go through.
enum Keep {
    /// From the client: all but progress requests, when those are dropped.
    Requests(Arc<Shared>),
    /// From etcd: all while the stream (opened at generation `opened`) is
    /// not silenced.
    Responses { shared: Arc<Shared>, opened: u64 },
}

impl Keep {
    fn keep(&self, message: &[u8]) -> bool {
        match self {
            // A WatchRequest is a oneof; field 3 (tag byte 0x1a) is the
            // progress request.
            Keep::Requests(shared) => {
                !(shared.drop_progress.load(Ordering::SeqCst) && message.first() == Some(&0x1a))
            }
            Keep::Responses { shared, opened } => {
                let silent = shared.generation.load(Ordering::SeqCst) > *opened;
                if silent {
                    shared.swallowed.fetch_add(1, Ordering::SeqCst);
                }
                !silent
            }
        }
    }
}

/// A gRPC body passed on whole message by whole message, each kept or
/// dropped (a dropped message leaves the stream open).
struct Messages {
    inner: Incoming,
    /// Bytes of an incomplete message.
    buf: BytesMut,
    keep: Keep,
}

/// gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

impl Messages {
    /// The complete messages buffered, with their prefixes, minus those
    /// dropped.
    fn take_complete(&mut self) -> BytesMut {
        let mut out = BytesMut::new();
        loop {
            if self.buf.len() < PREFIX {
                return out;
            }
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            let total = PREFIX + len as usize;
            if self.buf.len() < total {
                return out;
            }
            let message = self.buf.split_to(total);
            if self.keep.keep(&message[PREFIX..]) {
                out.extend_from_slice(&message);
            }
        }
    }
}

impl Body for Messages {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            let Some(frame) = ready!(Pin::new(&mut self.inner).poll_frame(cx)) else {
                return Poll::Ready(None);
            };
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            match frame.into_data() {
                Ok(mut data) => {
                    while data.has_remaining() {
                        let chunk = data.chunk().len();
                        self.buf.extend_from_slice(data.chunk());
                        data.advance(chunk);
                    }
                    let out = self.take_complete();
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                }
                // Trailers pass.
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.buf.is_empty()
    }
}
