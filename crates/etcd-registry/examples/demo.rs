//! The demo behind `./scripts/demo`: a throwaway etcd on loopback, then the
//! main job end to end: register, list, cache and pick, watch changes, elect
//! a leader with a handover, heal a lost lease, and close cleanly.

use std::time::Duration;

use etcd_registry::{Registry, RegistryState, ServiceEvent, ServiceInstance, Strategy};
use etcd_registry_testkit::EtcdServer;
use futures::StreamExt;

/// Bound for every step, so the demo can never hang.
const STEP: Duration = Duration::from_secs(15);

async fn step<T, E>(f: impl Future<Output = Result<T, E>>) -> Result<T, Box<dyn std::error::Error>>
where
    E: std::error::Error + 'static,
{
    Ok(tokio::time::timeout(STEP, f).await??)
}

async fn connect(server: &EtcdServer) -> etcd_registry::Result<Registry> {
    Registry::builder()
        .endpoints(server.endpoints())
        .namespace("demo")
        .ttl(Duration::from_secs(10))
        .connect()
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .init();

    println!("==> starting a throwaway etcd on loopback");
    let server = EtcdServer::start().await?;
    println!("    etcd is up at {}", server.endpoint());

    let node_a = step(connect(&server)).await?;
    let node_b = step(connect(&server)).await?;
    println!(
        "==> two registries connected, one lease each: {:x} and {:x}",
        node_a.lease_id().unwrap_or_default(),
        node_b.lease_id().unwrap_or_default()
    );

    let _web1 =
        step(node_a.register(
            ServiceInstance::new("web", "web-1", "127.0.0.1", 8081).with_version("1.0.0"),
        ))
        .await?;
    let _web2 = step(
        node_a.register(
            ServiceInstance::new("web", "web-2", "127.0.0.1", 8082)
                .with_version("1.0.0")
                .with_weight(3)
                .with_metadata("zone", "eu-1"),
        ),
    )
    .await?;
    println!("==> node A registered two instances of `web`; one consistent read lists:");
    for inst in step(node_a.instances("web")).await? {
        println!(
            "    {:<6} {:<16} version={} weight={} metadata={:?}",
            inst.id,
            inst.endpoint(),
            inst.version,
            inst.weight,
            inst.metadata
        );
    }

    let cache = step(node_b.cache("web")).await?;
    let picks: Vec<String> = (0..4)
        .filter_map(|_| cache.pick())
        .map(|i| i.id.clone())
        .collect();
    let weighted = (0..1000)
        .filter_map(|_| cache.pick_with(Strategy::Weighted))
        .filter(|i| i.id == "web-2")
        .count();
    println!(
        "==> node B's cache answers from memory: round-robin {picks:?}; weighted picks web-2 {weighted}/1000 (weight 3 of 4)"
    );

    let mut watch = node_b.watch("web")?;
    if let Some(ServiceEvent::Snapshot(all)) =
        step(async { Ok::<_, std::io::Error>(watch.next().await) }).await?
    {
        println!(
            "==> node B watches `web`: snapshot of {} instances, then every change",
            all.len()
        );
    }
    let web3 =
        step(node_b.register(ServiceInstance::new("web", "web-3", "127.0.0.1", 8083))).await?;
    web3.deregister().await?;
    for _ in 0..2 {
        match step(async { Ok::<_, std::io::Error>(watch.next().await) }).await? {
            Some(ServiceEvent::Added(i)) => println!("    added   {} at {}", i.id, i.endpoint()),
            Some(ServiceEvent::Removed(i)) => println!("    removed {} at {}", i.id, i.endpoint()),
            other => println!("    {other:?}"),
        }
    }

    println!("==> leader election for `nightly-cron` on the same leases");
    let leadership_a = step(node_a.election("nightly-cron")?.campaign("node-a")).await?;
    println!(
        "    node A leads (fencing token {})",
        leadership_a.fencing_token()
    );
    let election_b = node_b.election("nightly-cron")?;
    let candidates = election_b.etcd_name().to_owned() + "/";
    let candidate_b = tokio::spawn(async move { election_b.campaign("node-b").await });
    let mut client = server.client().await?;
    // Wait until node B's candidate key is in etcd, behind node A's.
    step(async {
        loop {
            let options = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            if client
                .get(candidates.as_str(), Some(options))
                .await?
                .count()
                == 2
            {
                return Ok::<_, etcd_client::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    println!("    node B is waiting behind it; node A resigns");
    leadership_a.resign().await?;
    let leadership_b = tokio::time::timeout(STEP, candidate_b).await???;
    println!(
        "    node B leads (fencing token {}, higher than A's)",
        leadership_b.fencing_token()
    );
    leadership_b.resign().await?;

    println!("==> revoking node A's lease behind its back");
    let old = node_a.lease_id().unwrap_or_default();
    step(client.lease_revoke(old)).await?;
    let mut state = node_a.state();
    step(state.wait_for(|s| matches!(s, RegistryState::Active { lease_id } if *lease_id != old)))
        .await?;
    println!(
        "    healed on its own: lease {:x}, {} instances registered again",
        node_a.lease_id().unwrap_or_default(),
        step(node_a.instances("web")).await?.len()
    );

    drop((watch, cache));
    step(node_a.close()).await?;
    step(node_b.close()).await?;
    let left = step(client.get(
        "/etcd_registry/demo/",
        Some(etcd_client::GetOptions::new().with_prefix()),
    ))
    .await?;
    println!(
        "==> both registries closed: leases revoked, {} keys left",
        left.kvs().len()
    );
    drop(server);
    println!("==> etcd stopped; done");
    Ok(())
}
