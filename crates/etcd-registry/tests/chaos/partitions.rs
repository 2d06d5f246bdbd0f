//! Partition rounds: the safety bound of `Leadership::lost()`, counted.
//!
//! Each round: A campaigns through a `FaultProxy` and leads; B campaigns
//! directly and waits. A's proxy is blackholed at a random moment of A's
//! keep-alive cycle. A must step down (its `lost()` fires, and `is_leader()`
//! turns false) before B's campaign returns, because etcd lets A's lease expire
//! only a TTL after the last keep-alive it received, and A stops one safety
//! margin before its own deadline computed from when that keep-alive was sent.
//!
//! A lives on a runtime of its own (one worker thread), so that "slow" rounds
//! can starve it with a busy loop on that thread while B, the proxy and the
//! bookkeeping keep running on the main runtime.

use std::sync::Arc;
use std::time::Duration;

use etcd_registry::{Leadership, LostReason, Registry};
use etcd_registry_testkit::{EtcdServer, FaultProxy, unique_name, within};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::common;

/// TTL of both candidates: the shortest the builder accepts, to keep rounds fast.
const TTL_SECS: u64 = 2;
/// Rounds run side by side, each in its own election with its own proxy.
const LANES: usize = 4;
/// Bound on any single step of a round; a round that hits it is a failure.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct RoundResult {
    slow: bool,
    /// B's campaign returned before A's `lost()` fired.
    overlap_lost: bool,
    /// A's `is_leader()` was still true right after B's campaign returned.
    overlap_is_leader: bool,
    /// B won minus A's `lost()` firing (negative: an overlap), in ms.
    margin_ms: f64,
    /// Blackhole to A's `lost()` firing, in ms.
    detect_ms: f64,
    reason: Option<LostReason>,
    /// A (starved) wrote to the fenced resource after B had claimed it: whether
    /// that write was applied (`Some(Some(true))` would be a fencing failure),
    /// fenced out, or got no answer.
    stale_write: Option<Option<bool>>,
}

pub async fn run(rounds: usize, seed: u64) {
    println!("chaos partitions: {rounds} rounds, seed {seed}, TTL {TTL_SECS} s, {LANES} lanes");
    println!("chaos partitions: replay with: scripts/chaos --partitions {rounds} --seed {seed}");
    let etcd = Arc::new(EtcdServer::start().await.expect("start etcd"));
    println!("chaos partitions: {}", etcd_version(&etcd).await);
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(std::sync::Mutex::new(Vec::with_capacity(rounds)));
    let mut lanes = Vec::new();
    for lane in 0..LANES.min(rounds.max(1)) {
        let (etcd, next, results) = (etcd.clone(), next.clone(), results.clone());
        lanes.push(tokio::spawn(async move {
            let b = common::connect_with(
                common::builder(etcd.endpoints(), &unique_name("part-b"), TTL_SECS)
                    .request_timeout(Duration::from_secs(2)),
            )
            .await;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= rounds {
                    break;
                }
                // Every fourth round starves A's runtime; the seed and the round
                // number fix everything random about the round.
                let slow = i % 4 == 3;
                let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let r = round(&etcd, &b, i, slow, &mut rng).await;
                let line = format!(
                    "round {i:4} lane {lane} {}: margin {:8.1} ms, A detected after {:7.1} ms ({}){}{}{}",
                    if slow { "slow" } else { "fast" },
                    r.margin_ms,
                    r.detect_ms,
                    r.reason.map_or("-".to_owned(), |r| r.to_string()),
                    if r.overlap_lost { ", OVERLAP: B won before A's lost()" } else { "" },
                    if r.overlap_is_leader { ", OVERLAP: A's is_leader() still true" } else { "" },
                    match r.stale_write {
                        Some(Some(true)) => ", A's stale write APPLIED",
                        Some(Some(false)) => ", A's stale write fenced out",
                        Some(None) => ", A's stale write unanswered",
                        None => "",
                    },
                );
                println!("{line}");
                results.lock().unwrap().push(r);
            }
            let _ = tokio::time::timeout(STEP_TIMEOUT, b.close()).await;
        }));
    }
    for lane in lanes {
        lane.await.expect("partition lane panicked");
    }
    let results = results.lock().unwrap().clone();
    let elapsed = started.elapsed();
    let fast: Vec<_> = results.iter().filter(|r| !r.slow).copied().collect();
    let slow: Vec<_> = results.iter().filter(|r| r.slow).copied().collect();
    println!();
    println!(
        "chaos partitions summary (seed {seed}, {} rounds in {:.0} s):",
        results.len(),
        elapsed.as_secs_f64()
    );
    summarize("normal runtime", &fast);
    summarize("starved runtime", &slow);
    let fast_overlaps = fast
        .iter()
        .filter(|r| r.overlap_lost || r.overlap_is_leader)
        .count();
    let stale_applied = results
        .iter()
        .filter(|r| r.stale_write == Some(Some(true)))
        .count();
    println!("chaos partitions: seed {seed}");
    assert_eq!(
        stale_applied, 0,
        "{stale_applied} writes of a stale leader got past the fencing token (seed {seed})"
    );
    assert_eq!(
        fast_overlaps, 0,
        "{fast_overlaps} rounds with a normal runtime let B win while A still led (seed {seed})"
    );
}

fn summarize(label: &str, rs: &[RoundResult]) {
    if rs.is_empty() {
        println!("  {label}: no rounds");
        return;
    }
    let mut margins: Vec<f64> = rs.iter().map(|r| r.margin_ms).collect();
    margins.sort_by(f64::total_cmp);
    let mut detect: Vec<f64> = rs.iter().map(|r| r.detect_ms).collect();
    detect.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let lost = rs.iter().filter(|r| r.overlap_lost).count();
    let is_leader = rs.iter().filter(|r| r.overlap_is_leader).count();
    println!(
        "  {label}: {} rounds; overlaps: {lost} (B won before A's lost() fired), {is_leader} (A's is_leader() still true when B won)",
        rs.len()
    );
    println!(
        "    margin A stepped down -> B won: min {:.1} ms, p50 {:.1} ms, max {:.1} ms",
        margins[0],
        pct(&margins, 0.5),
        margins[margins.len() - 1]
    );
    let stale: Vec<_> = rs.iter().filter_map(|r| r.stale_write).collect();
    if !stale.is_empty() {
        println!(
            "    A's write reached the resource after B's in {} rounds: {} fenced out, {} applied, {} unanswered",
            stale.len(),
            stale.iter().filter(|w| **w == Some(false)).count(),
            stale.iter().filter(|w| **w == Some(true)).count(),
            stale.iter().filter(|w| w.is_none()).count()
        );
    }
    println!(
        "    blackhole -> A's lost(): min {:.1} ms, p50 {:.1} ms, max {:.1} ms",
        detect[0],
        pct(&detect, 0.5),
        detect[detect.len() - 1]
    );
}

pub async fn etcd_version(etcd: &EtcdServer) -> String {
    let Ok(mut c) = etcd.client().await else {
        return "etcd version unknown".into();
    };
    match tokio::time::timeout(Duration::from_secs(5), c.status()).await {
        Ok(Ok(s)) => format!("etcd {}", s.version()),
        _ => "etcd version unknown".into(),
    }
}

async fn round(
    etcd: &EtcdServer,
    b: &Registry,
    i: usize,
    slow: bool,
    rng: &mut StdRng,
) -> RoundResult {
    let proxy = FaultProxy::start(&etcd.endpoint())
        .await
        .expect("start proxy");
    let election = format!("part-{i}");
    // A's own runtime: one worker thread that the slow rounds can starve.
    let a_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("chaos-a-{i}"))
        .enable_all()
        .build()
        .expect("A's runtime");
    // A shares B's namespace, so both campaign in one election.
    let ns = b.config().namespace().to_owned();
    let (a_endpoint, a_election) = (proxy.endpoint(), election.clone());
    let (a_reg, a_lead): (Registry, Leadership) = within(
        "A connects and leads",
        STEP_TIMEOUT,
        a_rt.spawn(async move {
            let reg = common::connect_with(
                common::builder(vec![a_endpoint], &ns, TTL_SECS)
                    .request_timeout(Duration::from_secs(2)),
            )
            .await;
            let lead = reg
                .election(&a_election)
                .expect("election name")
                .campaign("A")
                .await
                .expect("A campaigns alone");
            (reg, lead)
        }),
    )
    .await
    .expect("A's task");

    // A's step-down as A's own runtime sees it: starved, it sees it late.
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    {
        let a_lead = a_lead.clone();
        a_rt.spawn(async move {
            let reason = a_lead.lost().await;
            let _ = lost_tx.send((Instant::now(), reason));
        });
    }
    let b_election = b.election(&election).expect("election name");
    let b_campaign = tokio::spawn(async move {
        let lead = b_election.campaign("B").await;
        (Instant::now(), lead)
    });
    // B's key must be in place before the partition, or B would only be
    // timing its own write.
    let prefix = format!(
        "{}/",
        b.election(&election).expect("election name").etcd_name()
    );
    let raw = etcd.client().await.expect("raw client");
    etcd_registry_testkit::eventually("B's candidate key is written", STEP_TIMEOUT, || {
        let (mut raw, prefix) = (raw.clone(), prefix.clone());
        async move {
            raw.get(
                prefix,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await
            .is_ok_and(|r| r.count() >= 2)
        }
    })
    .await;

    // A random moment of A's keep-alive cycle (one keep-alive every TTL/3).
    let cycle_ms = TTL_SECS * 1000 / 3;
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..cycle_ms * 2))).await;
    proxy.blackhole();
    let cut = Instant::now();
    // The fenced resource: a key holding the newest token that wrote to it.
    // A reaches it directly, not through its blackholed proxy: A is cut off
    // from etcd, not from the resource, which is the case fencing is for.
    let resource = format!("/chaos-fence/{}/{election}", b.config().namespace());
    raw.clone()
        .put(resource.clone(), pad(0), None)
        .await
        .expect("init the fenced resource");
    let a_write = if slow {
        // Starve A: its only worker thread spins for 1-3 s without yielding,
        // so timers, the keep-alive task and the leadership monitor cannot
        // run. The spin sits between A checking that it leads and A writing,
        // which is exactly the pause the safety bound cannot cover.
        let spin = Duration::from_millis(rng.random_range(1000..3000));
        let (a_lead, mut kv, resource) = (a_lead.clone(), raw.clone(), resource.clone());
        Some(a_rt.spawn(async move {
            let checked = a_lead.is_leader();
            let until = std::time::Instant::now() + spin;
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
            if !checked {
                return None;
            }
            let sent = Instant::now();
            let applied = fenced_write(&mut kv, &resource, a_lead.fencing_token()).await;
            Some((sent, applied))
        }))
    } else {
        None
    };
    let (b_won, b_lead) = within("B wins after A's lease expires", STEP_TIMEOUT, b_campaign)
        .await
        .expect("B's task");
    // Read A's local state at once, from this (unstarved) runtime.
    let a_still_leader = a_lead.is_leader();
    let b_lead = b_lead.expect("B's campaign");
    // A new leader's first act: claim the resource with its token.
    let b_wrote = fenced_write(&mut raw.clone(), &resource, b_lead.fencing_token()).await;
    let Some((true, b_rev)) = b_wrote else {
        panic!("B's fenced write must apply: {b_wrote:?}");
    };
    let (a_lost, reason) = within("A's lost() fires", STEP_TIMEOUT, lost_rx)
        .await
        .unwrap_or((Instant::now(), LostReason::Closed));
    let stale_write = match a_write {
        Some(task) => match within("A's write", STEP_TIMEOUT, task)
            .await
            .expect("A's task")
        {
            // Processed after B claimed the resource: a stale write.
            Some((_, Some((applied, rev)))) if rev > b_rev => Some(Some(applied)),
            Some((sent, None)) if sent > b_won => Some(None),
            _ => None,
        },
        None => None,
    };
    let margin_ms = signed_ms(a_lost, b_won);
    let detect_ms = signed_ms(cut, a_lost);

    within("B resigns", STEP_TIMEOUT, b_lead.resign())
        .await
        .expect("B resigns");
    proxy.heal();
    drop(a_lead);
    let _ = within(
        "A closes",
        STEP_TIMEOUT,
        a_rt.spawn(async move {
            let _ = a_reg.close().await;
        }),
    )
    .await;
    // Allowed inside async code, unlike dropping the runtime.
    a_rt.shutdown_background();
    RoundResult {
        slow,
        overlap_lost: b_won < a_lost,
        overlap_is_leader: a_still_leader,
        margin_ms,
        detect_ms,
        reason: Some(reason),
        stale_write,
    }
}

fn pad(token: i64) -> String {
    format!("{token:020}")
}

/// Writes `token` to the resource unless a newer token already wrote there.
/// `Some((applied, revision etcd processed it at))`, or `None` when etcd did not answer.
async fn fenced_write(
    kv: &mut etcd_client::Client,
    resource: &str,
    token: i64,
) -> Option<(bool, i64)> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let txn = Txn::new()
        .when([Compare::value(resource, CompareOp::Less, pad(token + 1))])
        .and_then([TxnOp::put(resource, pad(token), None)]);
    match tokio::time::timeout(STEP_TIMEOUT, kv.txn(txn)).await {
        Ok(Ok(r)) => Some((r.succeeded(), r.header().map_or(0, |h| h.revision()))),
        _ => None,
    }
}

/// `to - from` in milliseconds, negative when `to` came first.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1000.0
    } else {
        -((from - to).as_secs_f64() * 1000.0)
    }
}
