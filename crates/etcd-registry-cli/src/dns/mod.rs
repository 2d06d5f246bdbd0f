//! `etcd-registry dns`: serves a namespace as DNS, read-only, from a cache.
//!
//! One [`ServiceCache`](etcd_registry::ServiceCache) of the whole namespace
//! feeds a [`Feed`](feed::Feed), which rebuilds the zone (`build.rs`,
//! `zone.rs`) after every change; the [`Handler`](handler::Handler) answers
//! each query from the current zone, with no round trip to etcd. While etcd
//! is unreachable the cache keeps its last view, and so do the answers.
//!
//! Edges: `*` is no wildcard (the zone has none), so a `*` label names
//! nothing (NXDOMAIN); a service whose instances all went is NODATA for
//! 30 s (or the record TTL, if longer), then NXDOMAIN (`build.rs`); an
//! answer over 65,535 bytes is cut to the records that fit with TC set,
//! over TCP too (`handler.rs`).

mod build;
mod feed;
mod handler;
mod listen;
mod metrics;
pub mod names;
mod zone;
#[cfg(test)]
mod zone_tests;

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::Name;
use hickory_server::Server;

use crate::args::Global;
use crate::commands::with_registry;
use crate::error::{CliError, CliResult};
use crate::output::line;
use crate::shutdown::Shutdown;

/// A TCP connection that sends no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_BUFFER: usize = 32;

/// The options of `etcd-registry dns`.
pub struct Options {
    pub listen: SocketAddr,
    pub domain: Name,
    pub ttl: u32,
}

/// Serves until SIGINT/SIGTERM.
pub async fn run(g: &Global, opts: Options) -> CliResult {
    let shutdown = Shutdown::listen()?;
    // Bound before connecting: a busy port fails at once, with nothing written.
    let sockets = listen::bind(opts.listen).await?;
    with_registry(g, async |registry| {
        let cache = registry.cache_all().await?;
        let settings = build::Settings::new(opts.domain.clone(), opts.ttl);
        let (feed, zone) = feed::Feed::new(cache, settings);
        let feeding = tokio::spawn(feed.run());
        let mut server = Server::new(handler::Handler::new(zone));
        server.register_socket(sockets.udp);
        server.register_listener(sockets.tcp, TCP_IDLE, TCP_BUFFER);
        line(&format!(
            "serving DNS on {} (UDP and TCP): domain {}, namespace {}, record TTL {}s; \
             Ctrl-C stops it",
            sockets.local, opts.domain, g.namespace, opts.ttl
        ))?;
        let failed =
            |e: &dyn std::fmt::Display| CliError::msg(format!("the DNS server failed: {e}"));
        let signalled = shutdown.signalled();
        tokio::pin!(signalled);
        let stopped: CliResult = tokio::select! {
            name = &mut signalled => {
                tracing::info!(signal = name, "stopping the DNS server");
                server.shutdown_gracefully().await.map_err(|e| failed(&e))
            }
            // Only on a socket error the server cannot recover from.
            done = server.block_until_done() => Err(match done {
                Err(e) => failed(&e),
                Ok(()) => CliError::msg("the DNS server stopped on its own"),
            }),
        };
        feeding.abort();
        stopped
    })
    .await
}
