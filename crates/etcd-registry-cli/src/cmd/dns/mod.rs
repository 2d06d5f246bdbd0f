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
mod names;
mod zone;
#[cfg(test)]
mod zone_tests;

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::Name;
use hickory_server::Server;

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::{CliError, CliResult};
use crate::common::metrics::MetricsOpt;
use crate::common::output::line;
use crate::common::shutdown::Shutdown;

/// A TCP connection that sends no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_BUFFER: usize = 32;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to serve on, UDP and TCP; port 0 picks a free one.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8600")]
    pub listen: SocketAddr,
    /// The domain served: names outside it get REFUSED.
    #[arg(long, value_name = "DOMAIN", default_value = "registry.", value_parser = names::parse_domain)]
    pub domain: Name,
    /// TTL of every record, whole seconds (`0`, `30s`, `5m`); also how
    /// long resolvers may cache "no such name". 0 (the default): not cached.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = names::parse_record_ttl)]
    pub record_ttl: u32,
    #[command(flatten)]
    pub metrics: MetricsOpt,
}

/// What `run` serves: the arguments less the metrics listener.
struct Options {
    listen: SocketAddr,
    domain: Name,
    ttl: u32,
}

/// Serves until SIGINT/SIGTERM.
pub async fn run(g: &Global, args: Args) -> CliResult {
    let opts = Options {
        listen: args.listen,
        domain: args.domain,
        ttl: args.record_ttl,
    };
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
