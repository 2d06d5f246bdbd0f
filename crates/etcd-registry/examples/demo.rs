//! The demo behind `./scripts/demo`: a throwaway etcd, two registered
//! instances, a listing, a self-healing check, and a clean stop.

use std::time::Duration;

use etcd_registry::{Registry, RegistryState, ServiceInstance};
use etcd_registry_testkit::EtcdServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();

    println!("==> starting a throwaway etcd on loopback");
    let server = EtcdServer::start().await?;
    println!("    etcd is up at {}", server.endpoint());

    let registry = Registry::builder()
        .endpoints(server.endpoints())
        .namespace("demo")
        .ttl(Duration::from_secs(10))
        .connect()
        .await?;
    println!(
        "==> connected; lease {:x}",
        registry.lease_id().unwrap_or_default()
    );

    let _a = registry
        .register(ServiceInstance::new("web", "web-1", "127.0.0.1", 8081).with_version("1.0.0"))
        .await?;
    let _b = registry
        .register(
            ServiceInstance::new("web", "web-2", "127.0.0.1", 8082)
                .with_version("1.0.0")
                .with_weight(2)
                .with_metadata("zone", "eu-1"),
        )
        .await?;
    println!("==> registered two instances of `web`");

    for inst in registry.instances("web").await? {
        println!(
            "    {:<6} {:<16} version={} weight={} metadata={:?}",
            inst.id,
            inst.endpoint(),
            inst.version,
            inst.weight,
            inst.metadata
        );
    }

    println!("==> revoking the lease behind the registry's back");
    let old = registry.lease_id().unwrap_or_default();
    let mut client = server.client().await?;
    client.lease_revoke(old).await?;
    let mut state = registry.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| matches!(s, RegistryState::Active { lease_id } if *lease_id != old)),
    )
    .await??;
    println!(
        "    healed: lease {:x}, {} instances registered again",
        registry.lease_id().unwrap_or_default(),
        registry.instances("web").await?.len()
    );

    registry.close().await?;
    println!("==> closed: lease revoked, {} instances left", {
        let probe = Registry::builder()
            .endpoints(server.endpoints())
            .namespace("demo")
            .connect()
            .await?;
        let n = probe.instances("web").await?.len();
        probe.close().await?;
        n
    });
    drop(server);
    println!("==> etcd stopped; done");
    Ok(())
}
