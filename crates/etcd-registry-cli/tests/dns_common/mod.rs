//! Shared by the DNS tests and the DNS bench: start `etcd-registry dns`,
//! and ask it questions in the wire format hickory-proto writes and reads.
#![allow(dead_code)] // the test binary and the bench each use a subset

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::Query;
use hickory_proto::op::{Edns, Message, MessageType, OpCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio::process::{Child, Command};
use tokio::time::timeout;

/// Bound of one start or one exchange.
pub const STEP: Duration = Duration::from_secs(20);

/// A running `etcd-registry dns`; killed when dropped.
pub struct DnsServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything it wrote to stderr so far (drained continuously, so that
    /// a chatty server never blocks on a full pipe).
    pub stderr: Arc<Mutex<String>>,
}

impl DnsServer {
    /// Starts `bin --endpoints endpoint --namespace ns dns --listen
    /// 127.0.0.1:0 extra...` and waits for the line that names its address.
    pub async fn start(bin: &str, endpoint: &str, ns: &str, extra: &[&str]) -> DnsServer {
        let mut cmd = Command::new(bin);
        for var in [
            "ETCD_ENDPOINTS",
            "ETCD_REGISTRY_NAMESPACE",
            "ETCD_REGISTRY_PREFIX",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        cmd.args(["--endpoints", endpoint, "--namespace", ns, "dns"])
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn etcd-registry dns");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push_str(&text);
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let line = match timeout(STEP, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "`etcd-registry dns` printed no address ({other:?}); stderr: {}",
                    stderr.lock().unwrap()
                )
            }
        };
        // serving DNS on 127.0.0.1:PORT (UDP and TCP): ...
        let addr = line
            .strip_prefix("serving DNS on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        // Keep reading stdout so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        DnsServer {
            child,
            addr,
            stderr,
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, then its exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        timeout(STEP, self.child.wait())
            .await
            .expect("dns exits within the step")
            .expect("wait")
    }
}

/// One question, as dig asks it: recursion desired, EDNS with a 1232-byte
/// UDP size (dig 9.18's default) unless `edns` is `None`.
pub fn query(id: u16, name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("a valid name"),
        qtype,
    ));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        message.set_edns(e);
    }
    message.to_vec().expect("encode the query")
}

/// Sends `bytes` over `socket` (connected) and returns the reply, or `None`
/// if none came within `wait`.
pub async fn udp_exchange(socket: &UdpSocket, bytes: &[u8], wait: Duration) -> Option<Message> {
    socket.send(bytes).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    let n = timeout(wait, socket.recv(&mut buf)).await.ok()?.ok()?;
    Some(Message::from_vec(&buf[..n]).expect("the reply parses as a DNS message"))
}

/// A UDP socket connected to `addr`.
pub async fn udp_client(addr: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    socket.connect(addr).await.expect("connect udp");
    socket
}

/// One exchange over a new TCP connection (2-byte length prefix).
pub async fn tcp_exchange(addr: SocketAddr, bytes: &[u8]) -> Message {
    timeout(STEP, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect tcp");
        let len = u16::try_from(bytes.len()).expect("a small query");
        stream.write_all(&len.to_be_bytes()).await.expect("write");
        stream.write_all(bytes).await.expect("write");
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.expect("read length");
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.expect("read reply");
        Message::from_vec(&buf).expect("the reply parses as a DNS message")
    })
    .await
    .expect("a TCP exchange within the step")
}
