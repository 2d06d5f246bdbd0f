//! Real etcd processes for tests: a single server, a multi-member cluster,
//! a fault-injecting TCP proxy and a gRPC-aware shim that silences watches.
//!
//! Everything runs on `127.0.0.1` with fresh ports and temporary data
//! directories, so tests never touch an etcd on 2379. The etcd binary is
//! `$ETCD_BIN` or `etcd` on `PATH` (run `scripts/setup` to install it).
//!
//! Every etcd process is started with `PR_SET_PDEATHSIG(SIGKILL)` from one
//! long-lived thread, so no etcd outlives the test process, even when it
//! panics, is killed, or keeps a server in a static.
//!
//! Most tests should share one server per test binary and isolate themselves
//! by namespace; tests that kill, pause or wipe etcd start their own:
//!
//! ```no_run
//! use etcd_registry_testkit::{shared_server, unique_name};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = shared_server().await;
//! let ns = unique_name("ns");
//! let mut client = etcd.client().await?;
//! client.put(format!("/{ns}/key"), "value", None).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod auth;
mod bulk;
mod cluster;
mod error;
mod grpc_proxy;
mod health_endpoint;
mod http;
mod process;
mod proxy;
mod server;
mod shim;
mod tls;
mod wait;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use auth::ROOT_USER;
pub use bulk::{MAX_TXN_OPS, put_batched};
pub use cluster::EtcdCluster;
pub use error::{Error, Result};
pub use grpc_proxy::{EtcdGrpcProxy, EtcdGrpcProxyBuilder, ProxyUpstream};
pub use health_endpoint::HealthEndpoint;
pub use http::get as http_get;
pub use proxy::{Direction, FaultProxy, ProxyMode};
pub use server::{EtcdServer, EtcdServerBuilder};
pub use shim::{GrpcShim, WATCH_PATH};
pub use tls::{CertSpec, CertifiedKey, KeyType, Openssl, ServerTls, TestCa};
pub use wait::{eventually, within};

/// The etcd server shared by all tests of one test binary.
///
/// Started on first use and never stopped: the process is killed when the
/// test process exits (its temporary directory is swept by a later run).
/// Usable from any tokio runtime, so from every `#[tokio::test]`. Do not
/// kill, pause or wipe it; isolate tests with [`unique_name`] prefixes.
///
/// # Panics
///
/// If etcd cannot be started; the message includes the reason (e.g. the
/// binary is missing) and the log tail.
pub async fn shared_server() -> &'static EtcdServer {
    static SHARED: tokio::sync::OnceCell<EtcdServer> = tokio::sync::OnceCell::const_new();
    match SHARED
        .get_or_try_init(|| EtcdServer::builder().name("shared").start())
        .await
    {
        Ok(server) => server,
        Err(e) => panic!("etcd-registry-testkit: cannot start the shared etcd server: {e}"),
    }
}

/// For examples and demos: the etcd endpoints named by `ETCD_ENDPOINTS`
/// (comma-separated), or else those of a throwaway server started here.
///
/// Keep the returned server alive while the endpoints are in use: dropping
/// it stops etcd.
///
/// ```no_run
/// # async fn demo() -> etcd_registry_testkit::Result<()> {
/// let (endpoints, _etcd) = etcd_registry_testkit::endpoints_from_env_or_start().await?;
/// println!("using {endpoints:?}");
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// As [`EtcdServer::start`], when no `ETCD_ENDPOINTS` is set.
pub async fn endpoints_from_env_or_start() -> Result<(Vec<String>, Option<EtcdServer>)> {
    match std::env::var("ETCD_ENDPOINTS") {
        Ok(list) if !list.trim().is_empty() => {
            Ok((list.split(',').map(|e| e.trim().to_owned()).collect(), None))
        }
        _ => {
            let server = EtcdServer::start().await?;
            Ok((server.endpoints(), Some(server)))
        }
    }
}

/// A name unique within this machine for a while: `<prefix>-<pid>-<counter>-<nanos>`.
///
/// Safe as an etcd key segment: any `/` in `prefix` becomes `_`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{n}-{nanos}",
        prefix.replace('/', "_"),
        std::process::id()
    )
}
