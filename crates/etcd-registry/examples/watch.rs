//! Watches a service while instances come, change and go.
//!
//! Self-contained: starts a throwaway etcd through the testkit, prints every
//! event of `registry.watch("web")`, and exits.
//!
//! ```text
//! cargo run -p etcd-registry --example watch
//! ```

use std::time::Duration;

use etcd_registry::{Registry, ServiceEvent, ServiceInstance};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the throwaway server (if any) alive for the whole example; dropping it stops etcd.
    let (endpoints, _etcd) = etcd_registry_testkit::endpoints_from_env_or_start().await?;
    let registry = Registry::builder()
        .endpoints(endpoints)
        .namespace("demo")
        .connect()
        .await?;

    let web1 = registry
        .register(ServiceInstance::new("web", "web-1", "127.0.0.1", 8081))
        .await?;
    let mut watch = registry.watch("web")?;
    let cache = registry.cache("web").await?;

    // Changes happen in the background while the watch prints them.
    let writer = async {
        let mut web2 = registry
            .register(ServiceInstance::new("web", "web-2", "127.0.0.1", 8082))
            .await?;
        web2.update(
            ServiceInstance::new("web", "web-2", "127.0.0.1", 8082)
                .with_weight(5)
                .with_version("1.1"),
        )
        .await?;
        web1.deregister().await?;
        Ok::<_, etcd_registry::Error>(web2)
    };
    let printer = async {
        // Snapshot, then added web-2, updated web-2, removed web-1.
        for _ in 0..4 {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.next()).await?;
            match event {
                Some(ServiceEvent::Snapshot(all)) => println!(
                    "snapshot: {:?}",
                    all.iter().map(|i| &i.id).collect::<Vec<_>>()
                ),
                Some(ServiceEvent::Added(i)) => println!("added:    {} at {}", i.id, i.endpoint()),
                Some(ServiceEvent::Updated(i)) => println!(
                    "updated:  {} (version {}, weight {})",
                    i.id, i.version, i.weight
                ),
                Some(ServiceEvent::Removed(i)) => {
                    println!("removed:  {} at {}", i.id, i.endpoint())
                }
                None => break,
            }
            println!("          caught up to revision {}", watch.revision());
        }
        Ok::<_, tokio::time::error::Elapsed>(())
    };
    let (written, printed) = tokio::join!(writer, printer);
    let _web2 = written?;
    printed?;

    // The cache answers from memory and picks round-robin.
    tokio::time::timeout(Duration::from_secs(10), async {
        while cache.get("web-1").is_some() {
            let _ = cache.changed().await;
        }
    })
    .await?;
    println!(
        "cache: {} instance(s), pick -> {:?}",
        cache.instances().len(),
        cache.pick().map(|i| i.endpoint())
    );

    registry.close().await?;
    println!("closed; the watch ends: {:?}", watch.next().await.is_none());
    Ok(())
}
