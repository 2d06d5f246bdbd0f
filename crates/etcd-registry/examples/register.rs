//! The Go library's README registration example, translated.
//!
//! Registers `my-awesome-api/instance-01` in namespace `prod` with a 15 s
//! lease, keeps it alive while "serving", then closes (revoking the lease).
//!
//! Uses the etcd at `ETCD_ENDPOINTS` (comma-separated) when set; otherwise it
//! starts a throwaway etcd through the testkit. `EXAMPLE_SECONDS` sets how
//! long it serves (default 60, as in the Go example).
//!
//! ```text
//! cargo run -p etcd-registry --example register
//! ```

use std::time::Duration;

use etcd_registry::{Registry, ServiceInstance};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();

    // Keep the throwaway server (if any) alive for the whole example; dropping it stops etcd.
    let (endpoints, _etcd) = etcd_registry_testkit::endpoints_from_env_or_start().await?;
    let seconds: u64 = std::env::var("EXAMPLE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);

    // Create a new registry instance.
    let registry = Registry::builder()
        .endpoints(endpoints)
        .ttl(Duration::from_secs(15)) // lease TTL of 15 seconds
        .namespace("prod") // a namespace for services
        .connect()
        .await?;

    // Define the service to be registered.
    let service = ServiceInstance::new("my-awesome-api", "instance-01", "192.168.1.100", 8080)
        .with_version("1.0.2");

    // Register the service, with a 10 s bound as in the Go example.
    let registration =
        tokio::time::timeout(Duration::from_secs(10), registry.register(service)).await??;
    println!(
        "Service registered successfully under {}. It will be kept alive automatically.",
        registration.key()
    );

    // Keep the application running to simulate a live service.
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {
            println!("Shutting down after {seconds} seconds...");
        }
        _ = tokio::signal::ctrl_c() => println!("Interrupted; shutting down..."),
    }

    // Ensure the registry is closed on exit: revokes the lease, removing the instance at once.
    registry.close().await?;
    Ok(())
}
