//! Load-balances gRPC calls over tonic's `Channel::balance_channel`, fed by a
//! [`ServiceCache`](etcd_registry::ServiceCache) through `cache.discover()`.
//!
//! Self-contained: starts a throwaway etcd through the testkit and three
//! tonic-health servers on ephemeral ports, registers them, calls them, then
//! deregisters one and adds another; calls keep going with no client restart.
//!
//! ```text
//! cargo run -p etcd-registry --features tower --example balance
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_registry::{Registry, ServiceInstance};
use futures::StreamExt;
use tonic::transport::channel::Change as TonicChange;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::discover::Change;

type Counters = Arc<std::sync::Mutex<BTreeMap<String, Arc<AtomicUsize>>>>;

/// Starts a tonic-health server on 127.0.0.1, counting the calls it serves.
async fn start_server(id: &str, counters: &Counters) -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let calls = Arc::new(AtomicUsize::new(0));
    counters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.to_owned(), calls.clone());
    let (_reporter, health) = tonic_health::server::health_reporter();
    let counted = tonic::service::interceptor::InterceptedService::new(health, move |req| {
        calls.fetch_add(1, Ordering::Relaxed);
        Ok(req)
    });
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        Server::builder()
            .add_service(counted)
            .serve_with_incoming(incoming),
    );
    Ok(port)
}

/// Makes `n` calls and prints how many each server served.
async fn calls(
    client: &mut HealthClient<Channel>,
    counters: &Counters,
    n: usize,
    label: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let before: BTreeMap<String, usize> = counters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
        .collect();
    for _ in 0..n {
        let call = client.check(HealthCheckRequest {
            service: String::new(),
        });
        tokio::time::timeout(Duration::from_secs(5), call).await??;
    }
    let served: Vec<String> = counters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.load(Ordering::Relaxed) - before.get(k).copied().unwrap_or(0)
            )
        })
        .collect();
    println!("{label}: {n} calls ok, served by {}", served.join(" "));
    Ok(())
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
    let counters: Counters = Arc::default();

    let mut registrations = Vec::new();
    for id in ["health-1", "health-2", "health-3"] {
        let port = start_server(id, &counters).await?;
        registrations.push(
            registry
                .register(ServiceInstance::new("health", id, "127.0.0.1", port))
                .await?,
        );
    }

    // The cache's changes drive tonic's balancer.
    let cache = registry.cache("health").await?;
    let (channel, tx) = Channel::balance_channel::<String>(16);
    let mut discover = cache.discover();
    tokio::spawn(async move {
        while let Some(Ok(change)) = discover.next().await {
            let change = match change {
                Change::Insert(id, instance) => {
                    println!("  balancer: + {id} at {}", instance.endpoint());
                    match Endpoint::from_shared(format!("http://{}", instance.endpoint())) {
                        Ok(endpoint) => TonicChange::Insert(
                            id,
                            endpoint.connect_timeout(Duration::from_secs(2)),
                        ),
                        Err(e) => {
                            eprintln!("  balancer: bad endpoint for {id}: {e}");
                            continue;
                        }
                    }
                }
                Change::Remove(id) => {
                    println!("  balancer: - {id}");
                    TonicChange::Remove(id)
                }
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    });
    let mut client = HealthClient::new(channel);
    calls(&mut client, &counters, 60, "three instances").await?;

    // One leaves, one joins: the same client keeps working.
    registrations.remove(0).deregister().await?;
    let port = start_server("health-4", &counters).await?;
    registrations.push(
        registry
            .register(ServiceInstance::new(
                "health",
                "health-4",
                "127.0.0.1",
                port,
            ))
            .await?,
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while cache.get("health-4").is_none() || cache.get("health-1").is_some() {
            let _ = cache.changed().await;
        }
    })
    .await?;
    // Give the balancer a moment to apply the changes it was sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    calls(&mut client, &counters, 60, "health-1 left, health-4 joined").await?;

    registry.close().await?;
    Ok(())
}
