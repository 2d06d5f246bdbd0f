//! A TCP proxy that can partition, slow down or reset a client's connections to etcd.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Result;
use crate::server::POLL;

/// Whether a [`FaultProxy`] forwards traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Bytes flow both ways.
    Pass,
    /// Connections are accepted but no byte is forwarded in either direction.
    Blackhole,
}

/// Which way bytes travel through a [`FaultProxy`]; see [`FaultProxy::set_latency`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From etcd to the client: answers, watch events, keep-alive responses.
    ToClient,
    /// From the client to etcd: requests.
    ToServer,
    /// Both ways.
    Both,
}

#[derive(Debug, Clone, Copy)]
struct State {
    mode: ProxyMode,
    /// Bumped by [`FaultProxy::reset`]; a connection dies when it changes.
    generation: u64,
    /// Delay of every byte from etcd to the client.
    to_client: Duration,
    /// Delay of every byte from the client to etcd.
    to_server: Duration,
}

impl State {
    fn latency(&self, direction: Direction) -> Duration {
        match direction {
            Direction::ToClient => self.to_client,
            Direction::ToServer => self.to_server,
            Direction::Both => self.to_client.max(self.to_server),
        }
    }
}

/// A TCP proxy from `127.0.0.1:<random port>` to one upstream endpoint, for
/// injecting network faults between a client and etcd.
///
/// Connect the client to [`endpoint`](Self::endpoint) instead of etcd's.
/// [`blackhole`](Self::blackhole) models a network partition as the client
/// sees it (TCP stays up, nothing arrives), [`reset`](Self::reset) a dropped
/// connection and [`set_latency`](Self::set_latency) a slow network or a
/// stalled server. Dropping the proxy closes its listener and all connections.
///
/// The proxy's tasks run on the tokio runtime that called
/// [`start`](Self::start); they stop when that runtime shuts down.
///
/// ```no_run
/// # async fn demo() -> etcd_registry_testkit::Result<()> {
/// use etcd_registry_testkit::{EtcdServer, FaultProxy};
///
/// let etcd = EtcdServer::start().await?;
/// let proxy = FaultProxy::start(&etcd.endpoint()).await?;
/// let mut client = etcd_client::Client::connect([proxy.endpoint()], None).await?;
/// proxy.blackhole(); // requests through `client` now hang
/// proxy.heal(); // and complete again
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a fresh loopback port and forwards each connection to
    /// `upstream` (`"http://127.0.0.1:P"` or `"127.0.0.1:P"`), connecting
    /// upstream when the client connects. Starts in [`ProxyMode::Pass`].
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the listener cannot be bound.
    pub async fn start(upstream: &str) -> Result<FaultProxy> {
        let upstream: Arc<str> = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .into();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (state, rx) = watch::channel(State {
            mode: ProxyMode::Pass,
            generation: 0,
            to_client: Duration::ZERO,
            to_server: Duration::ZERO,
        });
        tracing::debug!(%addr, %upstream, "fault proxy listening");
        let accept_task = tokio::spawn(accept_loop(listener, upstream, rx));
        Ok(FaultProxy {
            addr,
            state,
            accept_task,
        })
    }

    /// The proxy's URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding on existing and new connections (which are still
    /// accepted). Nothing more is read, and bytes already read but not yet
    /// delivered (held back by a latency) wait until [`heal`](Self::heal),
    /// as TCP would retransmit them once a partition ends.
    pub fn blackhole(&self) {
        tracing::debug!(addr = %self.addr, "fault proxy: blackhole");
        self.state.send_modify(|s| s.mode = ProxyMode::Blackhole);
    }

    /// Forwards traffic again, on existing and new connections.
    pub fn heal(&self) {
        tracing::debug!(addr = %self.addr, "fault proxy: heal");
        self.state.send_modify(|s| s.mode = ProxyMode::Pass);
    }

    /// Aborts every current connection with a TCP reset, on both sides.
    /// Connections accepted afterwards work normally (in the current mode).
    pub fn reset(&self) {
        tracing::debug!(addr = %self.addr, "fault proxy: reset");
        self.state.send_modify(|s| s.generation += 1);
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        self.state.borrow().mode
    }

    /// Delays every byte travelling in `direction` by `delay`, on existing
    /// and new connections; `Duration::ZERO` (the default) forwards at once.
    ///
    /// Bytes are read as soon as they arrive and delivered `delay` after
    /// that, in order, so the delay adds to each request's or answer's
    /// latency without limiting throughput: what `delay` models is a long
    /// network path or a stalled server. A new delay applies to bytes read
    /// from then on; bytes never overtake earlier ones. Setting one
    /// direction leaves the other as it was.
    ///
    /// ```no_run
    /// # async fn demo(proxy: &etcd_registry_testkit::FaultProxy) {
    /// use std::time::Duration;
    /// use etcd_registry_testkit::Direction;
    ///
    /// // Every answer of etcd reaches the client one second late.
    /// proxy.set_latency(Direction::ToClient, Duration::from_secs(1));
    /// # }
    /// ```
    pub fn set_latency(&self, direction: Direction, delay: Duration) {
        tracing::debug!(addr = %self.addr, ?direction, ?delay, "fault proxy: latency");
        self.state.send_modify(|s| match direction {
            Direction::ToClient => s.to_client = delay,
            Direction::ToServer => s.to_server = delay,
            Direction::Both => {
                s.to_client = delay;
                s.to_server = delay;
            }
        });
    }

    /// The delay currently added in `direction` (for `Both`, the larger one).
    pub fn latency(&self, direction: Direction) -> Duration {
        self.state.borrow().latency(direction)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Connection tasks end when the `state` sender is dropped with `self`.
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: Arc<str>, mut rx: watch::Receiver<State>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let generation = rx.borrow().generation;
                    tracing::trace!(%peer, generation, "fault proxy: accepted");
                    tokio::spawn(connection(socket, upstream.clone(), rx.clone(), generation));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fault proxy: accept failed");
                    tokio::time::sleep(POLL).await;
                }
            },
            changed = rx.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

async fn connection(
    mut client: TcpStream,
    upstream: Arc<str>,
    rx: watch::Receiver<State>,
    generation: u64,
) {
    let reset = wait_reset(rx.clone(), generation);
    tokio::pin!(reset);
    let connect = async {
        wait_pass(&mut rx.clone()).await?;
        TcpStream::connect(&*upstream).await.ok()
    };
    let mut server = tokio::select! {
        server = connect => match server {
            Some(s) => s,
            None => {
                tracing::debug!(%upstream, "fault proxy: upstream unreachable, closing client");
                return;
            }
        },
        was_reset = &mut reset => {
            if was_reset {
                let _ = client.set_zero_linger();
            }
            return;
        }
    };
    let was_reset = {
        let (client_rd, client_wr) = client.split();
        let (server_rd, server_wr) = server.split();
        let pumps = async {
            tokio::try_join!(
                pump(client_rd, server_wr, rx.clone(), Direction::ToServer),
                pump(server_rd, client_wr, rx.clone(), Direction::ToClient)
            )
        };
        tokio::select! {
            _ = pumps => false,
            was_reset = &mut reset => was_reset,
        }
    };
    if was_reset {
        // SO_LINGER 0: close() sends RST, so both peers see a reset at once.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies `from` to `to` while the mode is `Pass`, each chunk delivered
/// the `direction`'s latency after it was read. `Ok` on end of stream (after
/// passing the half-close on), `Err` when the connection is broken or the
/// proxy is gone, which ends the other direction too.
///
/// Reading and writing are separate halves joined by a queue, so a latency
/// delays bytes without throttling the stream to one chunk per delay.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    rx: watch::Receiver<State>,
    direction: Direction,
) -> std::result::Result<(), ()> {
    // `None` marks the end of stream, delivered in order like the bytes.
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let mut read_rx = rx.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            wait_pass(&mut read_rx).await.ok_or(())?;
            // `read` is cancel-safe: a mode change drops it without losing bytes.
            tokio::select! {
                changed = read_rx.changed() => changed.map_err(|_| ())?,
                read = from.read(&mut buf) => {
                    let due = Instant::now() + read_rx.borrow().latency(direction);
                    match read {
                        Ok(0) => {
                            let _ = queue.send((due, None));
                            return Ok(());
                        }
                        Ok(n) => queue.send((due, Some(buf[..n].to_vec()))).map_err(|_| ())?,
                        Err(_) => return Err(()),
                    }
                }
            }
        }
    };
    let mut write_rx = rx;
    let write = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            // Held bytes wait out a blackhole, like a retransmitting TCP.
            wait_pass(&mut write_rx).await.ok_or(())?;
            match chunk {
                Some(bytes) => to.write_all(&bytes).await.map_err(|_| ())?,
                None => {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
            }
        }
        Ok(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Returns once the mode is `Pass`; `None` if the proxy is gone.
async fn wait_pass(rx: &mut watch::Receiver<State>) -> Option<()> {
    loop {
        if rx.borrow_and_update().mode == ProxyMode::Pass {
            return Some(());
        }
        rx.changed().await.ok()?;
    }
}

/// `true` once the generation differs from `generation`; `false` if the proxy is gone.
async fn wait_reset(mut rx: watch::Receiver<State>, generation: u64) -> bool {
    loop {
        if rx.borrow_and_update().generation != generation {
            return true;
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}
