//! A tonic server that is discoverable only while its own gRPC health
//! service says SERVING, and that leaves the registry before it stops.
//!
//! - The instance is registered with [`Registry::register_checked`] and a
//!   `grpc.health.v1` check of the server itself: it appears in etcd on the
//!   first pass and disappears after `fall` failures.
//! - On Ctrl-C (or after `EXAMPLE_SECONDS`, default 60) it drains:
//!   [`Registry::shutdown`] deletes the key at once and waits the grace
//!   period, so that clients' caches drop the instance while the server
//!   still answers; only then does tonic's graceful shutdown stop accepting
//!   and finish the calls in flight.
//!
//! With axum the order is the same: pass the drain to
//! `axum::serve(listener, app).with_graceful_shutdown(async { registry.shutdown(grace).await; })`.
//!
//! Uses the etcd at `ETCD_ENDPOINTS` when set; otherwise it starts a
//! throwaway etcd through the testkit.
//!
//! ```text
//! cargo run -p etcd-registry --features grpc-health --example drain
//! ```

use std::time::Duration;

use etcd_registry::{HealthPolicy, Registry, ServiceInstance, health};
use tonic::transport::Server;
use tonic_health::ServingStatus;

const SERVICE: &str = "echo";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let (endpoints, _etcd) = etcd_registry_testkit::endpoints_from_env_or_start().await?;
    let seconds: u64 = std::env::var("EXAMPLE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let registry = Registry::builder()
        .endpoints(endpoints)
        .namespace("demo")
        .connect()
        .await?;

    // The server: here only the health service; a real one adds its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, ServingStatus::Serving)
        .await;
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );

    // Discoverable only while the server reports SERVING.
    let registration = registry
        .register_checked(
            ServiceInstance::new(SERVICE, "echo-1", "127.0.0.1", port),
            health::grpc(&format!("127.0.0.1:{port}"), SERVICE)?,
            HealthPolicy::new().interval(Duration::from_secs(2)),
        )
        .await?;
    let mut health = registration.health();
    let changes = tokio::spawn(async move {
        // Every check updates the counts; print only the transitions.
        let mut last = health.borrow_and_update().state;
        println!("echo-1 health: {last:?}");
        while health.changed().await.is_ok() {
            let h = health.borrow_and_update().clone();
            if h.state != last {
                println!(
                    "echo-1 health: {:?} (last error: {:?})",
                    h.state, h.last_error
                );
                last = h.state;
            }
        }
    });

    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => println!("{seconds} s elapsed; draining"),
        _ = tokio::signal::ctrl_c() => println!("interrupted; draining"),
    }
    // Leave first: the key goes now, and clients have 5 s to stop sending.
    registry.shutdown(Duration::from_secs(5)).await?;
    // Then stop serving: tonic finishes the calls in flight.
    reporter
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(());
    server.await??;
    changes.abort();
    println!("drained and stopped");
    Ok(())
}
