//! Binds the UDP socket and the TCP listener on one address and port.

use std::net::SocketAddr;

use tokio::net::{TcpListener, UdpSocket};

use crate::common::error::{CliError, CliResult};

/// With port 0, how many free UDP ports to try before giving up on finding
/// one whose TCP twin is free too.
const PORT_ATTEMPTS: usize = 20;

/// UDP and TCP bound to the same address and port. Port 0 picks a port that
/// is free for both.
pub struct Sockets {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
    pub local: SocketAddr,
}

pub async fn bind(listen: SocketAddr) -> CliResult<Sockets> {
    let failed = |proto: &str, e: std::io::Error| {
        CliError::msg(format!("cannot listen on {listen} ({proto}): {e}"))
            .with_hint("pick a free address with --listen ADDR:PORT (port 0 picks one)")
    };
    let attempts = if listen.port() == 0 { PORT_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|e| failed("udp", e))?;
        let local = udp.local_addr().map_err(|e| failed("udp", e))?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok(Sockets { udp, tcp, local }),
            Err(e) => last = Some(e),
        }
    }
    Err(failed(
        "tcp",
        last.unwrap_or_else(|| std::io::Error::other("no attempt made")),
    ))
}
