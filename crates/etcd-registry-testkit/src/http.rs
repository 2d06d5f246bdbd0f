//! A tiny HTTP/1.0 GET, enough for etcd's `/health` and `/metrics`.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// GETs `path` from `addr` and returns the status code and body.
///
/// Not cancel-safe in any interesting sense: dropping the future drops the
/// connection. Callers put it under a timeout.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| Error::Http {
        url: url.clone(),
        message: "response has no header terminator".into(),
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| Error::Http {
            url,
            message: format!("malformed status line in {head:?}"),
        })?;
    Ok((status, body.to_string()))
}
