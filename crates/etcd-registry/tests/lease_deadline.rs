//! `Leadership::lease_deadline` / `lease_expiring_within` and the same on
//! `LockGuard`: the signal a supervisor uses to start a graceful stop early
//! enough that it ends by the lease deadline.

use std::time::Duration;

use etcd_registry::LostReason;
use etcd_registry_testkit::{FaultProxy, shared_server, unique_name, within};
use tokio::time::Instant;

mod common;

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(3);
/// Less than the deadline is ever away with healthy keep-alives (TTL − TTL/3
/// − margin ≈ 1.7 s), so it resolves only once keep-alives failed.
const WITHIN: Duration = Duration::from_millis(1200);

async fn connect(endpoints: Vec<String>, ns: &str) -> etcd_registry::Registry {
    let builder = common::builder(endpoints, ns, TTL.as_secs());
    common::connect_with(builder.request_timeout(Duration::from_secs(2))).await
}

/// What a partitioned holder sees: `lease_expiring_within` resolves first,
/// with the deadline less than `WITHIN` away, then `lost()` fires at that
/// deadline. While keep-alives are healthy, neither resolves.
async fn check(
    deadline: impl Fn() -> Option<Instant>,
    expiring: impl Future<Output = ()>,
    lost: impl Future<Output = LostReason>,
    proxy: &FaultProxy,
) {
    let first = deadline().expect("a deadline while held");
    let left = first - Instant::now();
    assert!(
        left > WITHIN && left <= TTL,
        "deadline {left:?} away right after the win"
    );
    tokio::pin!(expiring, lost);
    // Healthy for more than a TTL: keep-alives move the deadline on, and
    // neither future resolves.
    let healthy = tokio::time::sleep(TTL + Duration::from_secs(1));
    tokio::select! {
        _ = healthy => {}
        _ = &mut expiring => panic!("lease_expiring_within resolved with healthy keep-alives"),
        reason = &mut lost => panic!("lost with healthy keep-alives: {reason}"),
    }
    let moved = deadline().expect("a deadline while held");
    assert!(moved > first, "keep-alives did not move the deadline on");

    proxy.blackhole();
    let cut = Instant::now();
    tokio::select! {
        _ = &mut expiring => {}
        reason = &mut lost => panic!("lost ({reason}) before lease_expiring_within resolved"),
        _ = tokio::time::sleep(T) => panic!("lease_expiring_within never resolved"),
    }
    let warned = Instant::now();
    let at = deadline().expect("the deadline has not passed yet");
    let left = at - warned;
    assert!(left <= WITHIN, "resolved {left:?} before the deadline");
    let reason = within("lost", T, &mut lost).await;
    let lost_at = Instant::now();
    assert_eq!(reason, LostReason::LeaseDeadline);
    assert!(
        lost_at >= at,
        "lost {:?} before the deadline it reported",
        at - lost_at
    );
    assert_eq!(deadline(), None, "no deadline once it passed");
    println!(
        "cut off: warned after {:?}, lost {:?} later",
        warned - cut,
        lost_at - warned
    );
    proxy.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_is_warned_before_its_lease_deadline_then_loses_at_it() {
    let server = shared_server().await;
    let ns = unique_name("lease-deadline-election");
    let proxy = FaultProxy::start(&server.endpoint()).await.expect("proxy");
    let registry = connect(vec![proxy.endpoint()], &ns).await;
    let election = registry.election("job").expect("election");
    let leadership = within("campaign", T, election.campaign("me"))
        .await
        .expect("campaign");
    check(
        || leadership.lease_deadline(),
        leadership.lease_expiring_within(WITHIN),
        leadership.lost(),
        &proxy,
    )
    .await;
    // Already past: resolves at once.
    within(
        "lease_expiring_within once the lease is gone",
        Duration::from_secs(1),
        leadership.lease_expiring_within(WITHIN),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_lock_holder_is_warned_before_its_lease_deadline_then_loses_at_it() {
    let server = shared_server().await;
    let ns = unique_name("lease-deadline-lock");
    let proxy = FaultProxy::start(&server.endpoint()).await.expect("proxy");
    let registry = connect(vec![proxy.endpoint()], &ns).await;
    let lock = registry.lock("job").expect("lock");
    let guard = within("acquire", T, lock.acquire()).await.expect("acquire");
    check(
        || guard.lease_deadline(),
        guard.lease_expiring_within(WITHIN),
        guard.lost(),
        &proxy,
    )
    .await;
}

#[tokio::test]
async fn the_deadline_belongs_to_the_lease_not_the_key() {
    let server = shared_server().await;
    let ns = unique_name("lease-deadline-resign");
    let registry = connect(server.endpoints(), &ns).await;
    let election = registry.election("job").expect("election");
    let leadership = within("campaign", T, election.campaign("me"))
        .await
        .expect("campaign");
    within("resign", T, leadership.resign())
        .await
        .expect("resign");
    assert!(!leadership.is_leader());
    // The registry's lease lives on, and with it the deadline.
    assert!(leadership.lease_deadline().is_some());
    within("close", T, registry.close()).await.expect("close");
    assert_eq!(leadership.lease_deadline(), None, "closed: no lease");
    within(
        "lease_expiring_within without a lease",
        Duration::from_secs(1),
        leadership.lease_expiring_within(Duration::ZERO),
    )
    .await;
}
