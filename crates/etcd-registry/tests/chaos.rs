//! Chaos: a seeded soak of mixed faults on a 3-member cluster, and partition
//! rounds that count the leader safety bound. Run them with `scripts/chaos`
//! (see its header); both are `#[ignore]`d so that `cargo test` alone does
//! not spend minutes on them. They read their settings from the environment:
//!
//! - `CHAOS_SECONDS` (soak length, default 60), `CHAOS_SEED` (default: from
//!   the clock, printed), `CHAOS_PARTITIONS` (rounds, default 20).
//!
//! Both print the seed first and last; a failure replays with the same seed
//! (the schedule of faults and workload choices; timing differs run to run).

mod common;
#[path = "chaos/partitions.rs"]
mod partitions;
#[path = "chaos/soak.rs"]
mod soak;

fn env_u64(name: &str) -> Option<u64> {
    let raw = std::env::var(name).ok()?;
    match raw.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={raw:?} is not a whole number"),
    }
}

fn seed() -> u64 {
    env_u64("CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run through scripts/chaos"]
async fn soak() {
    let seconds = env_u64("CHAOS_SECONDS").unwrap_or(60);
    soak::run(std::time::Duration::from_secs(seconds), seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run through scripts/chaos --partitions N"]
async fn partitions() {
    let rounds = env_u64("CHAOS_PARTITIONS").unwrap_or(20) as usize;
    partitions::run(rounds, seed()).await;
}

/// Found by the soak (seed 20261129, a worker blackholed past its TTL): an
/// update acknowledged while the registry re-put everything under its new
/// lease was overwritten by the re-put of the value before it, and stayed
/// stale for good. Here 250 updates are in flight when a lost lease is
/// recovered; every acknowledged value must be what etcd holds.
///
/// Fails without the re-write in `put_entry` (checked by hand: 150, 150 and
/// 167 of 250 keys kept the old value in three runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_racing_a_lease_recovery_are_not_lost() {
    use std::time::Duration;

    use etcd_registry::ServiceInstance;
    use etcd_registry_testkit::{EtcdServer, FaultProxy, eventually, unique_name, within};

    const N: usize = 250;
    let etcd = EtcdServer::start().await.expect("start etcd");
    let proxy = FaultProxy::start(&etcd.endpoint()).await.expect("proxy");
    let ns = unique_name("race");
    let registry = common::connect_with(
        common::builder(vec![proxy.endpoint()], &ns, 2).request_timeout(Duration::from_secs(1)),
    )
    .await;
    let instance = |i: usize, version: &str| {
        ServiceInstance::new("svc", format!("i{i}"), "127.0.0.1", 8000).with_version(version)
    };
    let mut registrations = Vec::new();
    for i in 0..N {
        registrations.push(
            within(
                "register",
                Duration::from_secs(10),
                registry.register(instance(i, "old")),
            )
            .await
            .expect("register"),
        );
    }
    let prefix = format!("/etcd_registry/{ns}/services/");
    let raw = etcd.client().await.expect("raw client");
    let versions = || {
        let (mut raw, prefix) = (raw.clone(), prefix.clone());
        async move {
            let resp = raw
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .ok()?;
            Some(
                resp.kvs()
                    .iter()
                    .filter_map(|kv| ServiceInstance::from_json(kv.value()).ok())
                    .map(|i| i.version)
                    .collect::<Vec<_>>(),
            )
        }
    };
    // Cut off until etcd lets the lease expire and deletes every key.
    proxy.blackhole();
    eventually(
        "the lease expires in etcd",
        Duration::from_secs(20),
        || async { versions().await.is_some_and(|v| v.is_empty()) },
    )
    .await;
    // The updates start while cut off and finish after the heal, racing the
    // recovery that re-puts every registration under the new lease.
    let updates: Vec<_> = registrations
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            tokio::spawn(async move {
                loop {
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        r.update(instance(i, "new")),
                    )
                    .await
                    {
                        Ok(Ok(())) => return r,
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();
    proxy.heal();
    let mut kept = Vec::new();
    for u in updates {
        kept.push(
            within("an update is acknowledged", Duration::from_secs(60), u)
                .await
                .expect("update task"),
        );
    }
    // Every update was acknowledged: etcd must hold the new value of each.
    // A stale value is never repaired (it is under the registry's own lease),
    // so waiting a few seconds more tells "late" from "lost".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = versions().await.unwrap_or_default();
        if now.len() == N && now.iter().all(|v| v == "new") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {N} keys hold an older value than the update acknowledged for them, {} are missing",
            now.iter().filter(|v| *v != "new").count(),
            N - now.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(kept);
    within("close", Duration::from_secs(10), registry.close())
        .await
        .expect("close");
}
