//! `--metrics-addr HOST:PORT`: the long-running commands serve the library's
//! metrics (see `etcd_registry::metrics`) at `/metrics` in the Prometheus
//! text format, through `metrics-exporter-prometheus`.

use std::net::{SocketAddr, ToSocketAddrs};

use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use super::error::{CliError, CliResult};

/// The option shared by every long-running command.
#[derive(Clone, Debug, Default, Args)]
pub struct MetricsOpt {
    /// Serve Prometheus metrics at http://HOST:PORT/metrics while the command
    /// runs (`127.0.0.1:9464`, `[::]:9464`). Off by default.
    #[arg(long, value_name = "HOST:PORT", value_parser = socket_addr)]
    pub metrics_addr: Option<SocketAddr>,
}

/// Buckets of `etcd_registry_request_duration_seconds`: from a fast loopback
/// request to a campaign that waited for minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Installs the Prometheus recorder and serves it at `addr`, if given. Fails
/// (exit 1) when the address cannot be bound, before anything reaches etcd.
pub fn serve(addr: Option<SocketAddr>) -> CliResult {
    let Some(addr) = addr else { return Ok(()) };
    let failed = |e: &dyn std::fmt::Display| {
        CliError::msg(format!("cannot serve metrics on {addr}: {e}"))
            .with_hint("pick a free port with --metrics-addr HOST:PORT")
    };
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(etcd_registry::metrics::REQUEST_DURATION_SECONDS.to_owned()),
            DURATION_BUCKETS,
        )
        .and_then(PrometheusBuilder::build)
        .map_err(|e| failed(&e))?;
    metrics::set_global_recorder(recorder).map_err(|e| failed(&e))?;
    tokio::spawn(async move {
        // The listener only ends on an I/O error; the command goes on without it.
        if let Err(error) = exporter.await {
            tracing::error!(%addr, ?error, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

/// `HOST:PORT`, resolved now: the first address it names.
fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{e}; expected HOST:PORT such as 127.0.0.1:9464"))?
        .next()
        .ok_or_else(|| format!("{s:?} names no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses_are_host_and_port() {
        assert_eq!(
            socket_addr("127.0.0.1:9464"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert!(socket_addr("localhost:9464").is_ok_and(|a| a.ip().is_loopback()));
        assert!(socket_addr("127.0.0.1").is_err());
        assert!(socket_addr("9464").is_err());
    }
}
