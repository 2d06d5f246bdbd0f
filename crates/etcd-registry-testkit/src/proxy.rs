//! A TCP proxy that can partition or reset a client's connections to etcd.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

#[derive(Debug, Clone, Copy)]
struct State {
    mode: ProxyMode,
    /// Bumped by [`FaultProxy::reset`]; a connection dies when it changes.
    generation: u64,
}

/// A TCP proxy from `127.0.0.1:<random port>` to one upstream endpoint, for
/// injecting network faults between a client and etcd.
///
/// Connect the client to [`endpoint`](Self::endpoint) instead of etcd's.
/// [`blackhole`](Self::blackhole) models a network partition as the client
/// sees it (TCP stays up, nothing arrives), [`reset`](Self::reset) a dropped
/// connection. Dropping the proxy closes its listener and all connections.
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
    /// accepted). Bytes already read are delivered; nothing more is read.
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
                pump(client_rd, server_wr, rx.clone()),
                pump(server_rd, client_wr, rx.clone())
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

/// Copies `from` to `to` while the mode is `Pass`. `Ok` on end of stream
/// (after passing the half-close on), `Err` when the connection is broken or
/// the proxy is gone, which ends the other direction too.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut rx: watch::Receiver<State>,
) -> std::result::Result<(), ()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_pass(&mut rx).await.ok_or(())?;
        // `read` is cancel-safe: a mode change drops it without losing bytes.
        tokio::select! {
            changed = rx.changed() => changed.map_err(|_| ())?,
            read = from.read(&mut buf) => match read {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                Ok(n) => to.write_all(&buf[..n]).await.map_err(|_| ())?,
                Err(_) => return Err(()),
            },
        }
    }
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
