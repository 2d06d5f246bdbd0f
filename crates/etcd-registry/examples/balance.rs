//! Calls a service through `registry.channel`: a balanced, failure-aware
//! tonic channel over the registry's cache.
//!
//! Self-contained: starts a throwaway etcd through the testkit and three
//! tonic-health servers on ephemeral ports, registers them, calls them, then
//! deregisters one and adds another; calls keep going with no client restart.
//!
//! ```text
//! cargo run -p etcd-registry --example balance
//! ```

use std::time::Duration;

use etcd_registry::{Registry, ServiceInstance};
use tonic::transport::Server;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Starts a tonic-health server on 127.0.0.1; returns its port.
async fn start_server() -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    Ok(port)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the throwaway server (if any) alive for the whole example; dropping it stops etcd.
    let (endpoints, _etcd) = etcd_registry_testkit::endpoints_from_env_or_start().await?;
    let registry = Registry::builder()
        .endpoints(endpoints)
        .namespace("demo")
        .connect()
        .await?;

    let mut registrations = Vec::new();
    for id in ["health-1", "health-2", "health-3"] {
        let instance = ServiceInstance::new("health", id, "127.0.0.1", start_server().await?);
        registrations.push(registry.register(instance).await?);
    }

    // The whole client side: one line.
    let channel = registry.channel("health").await?;
    let mut client = HealthClient::new(channel.clone());

    let call = |mut client: HealthClient<etcd_registry::Channel>| async move {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        tokio::time::timeout(Duration::from_secs(5), client.check(request)).await??;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    for _ in 0..60 {
        call(client.clone()).await?;
    }
    print_endpoints("three instances", &channel);

    // One leaves (its in-flight calls finish first), one joins.
    registrations.remove(0).deregister().await?;
    let instance = ServiceInstance::new("health", "health-4", "127.0.0.1", start_server().await?);
    registrations.push(registry.register(instance).await?);
    for _ in 0..60 {
        call(client.clone()).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    print_endpoints("health-1 left, health-4 joined", &channel);

    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    registry.close().await?;
    Ok(())
}

fn print_endpoints(label: &str, channel: &etcd_registry::Channel) {
    println!("{label}:");
    for e in channel.endpoints() {
        println!(
            "  {:<9} {:<16} {:?} requests={} failures={} latency={:?}",
            e.id, e.address, e.phase, e.requests, e.failures, e.latency_ewma
        );
    }
}
