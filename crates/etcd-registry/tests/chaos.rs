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
