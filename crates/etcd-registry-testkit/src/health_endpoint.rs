//! A switchable HTTP health endpoint, for tests of health-gated registration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::Result;

/// Answers every HTTP request on `127.0.0.1` with `200 OK` or `503 Service
/// Unavailable`, as switched with [`set_healthy`](HealthEndpoint::set_healthy),
/// and counts the requests. It reads the request head and ignores the path
/// and method: enough for a health check, no more. Stops when dropped.
///
/// ```no_run
/// # async fn demo() -> etcd_registry_testkit::Result<()> {
/// use etcd_registry_testkit::HealthEndpoint;
/// let endpoint = HealthEndpoint::start().await?;
/// let url = endpoint.url("/healthz"); // http://127.0.0.1:PORT/healthz
/// endpoint.set_healthy(false);        // 503 from now on
/// # Ok(()) }
/// ```
pub struct HealthEndpoint {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl HealthEndpoint {
    /// Listens on a fresh port of `127.0.0.1`, healthy.
    pub async fn start() -> Result<HealthEndpoint> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let healthy = Arc::new(AtomicBool::new(true));
        let requests = Arc::new(AtomicU64::new(0));
        let (flag, count) = (healthy.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (flag, count) = (flag.clone(), count.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    // Switched between requests, not between accept and answer.
                    let status = if flag.load(Ordering::SeqCst) {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Ok(HealthEndpoint {
            addr,
            healthy,
            requests,
            task,
        })
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer 200 (`true`) or 503 (`false`) from now on.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HealthEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}
