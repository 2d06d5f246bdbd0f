//! Distributed locks against real etcd: mutual exclusion under
//! contention, try/timeout, `etcdctl lock` interop, a partitioned holder,
//! stale releases, and cleanup when an acquisition or a guard is dropped.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use etcd_registry::{Error, Lock, LockGuard, LostReason, Registry};
use etcd_registry_testkit::{FaultProxy, eventually, shared_server, unique_name, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{Instant, timeout};

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(20);

mod common;

async fn connect(endpoints: Vec<String>, namespace: &str, ttl_secs: u64) -> Registry {
    let builder = common::builder(endpoints, namespace, ttl_secs);
    common::connect_with(builder.request_timeout(Duration::from_secs(2))).await
}

/// The keys under `lock` (a raw read): (key, create revision), oldest first.
async fn lock_keys(client: &Client, lock: &Lock) -> Vec<(String, i64)> {
    let mut c = client.clone();
    let options = GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let resp = within(
        "raw get",
        T,
        c.get(format!("{}/", lock.etcd_name()), Some(options)),
    )
    .await
    .expect("raw get failed");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.create_revision(),
            )
        })
        .collect()
}

async fn acquire(lock: &Lock) -> LockGuard {
    within("acquire", T, lock.acquire())
        .await
        .expect("acquire failed")
}

/// Sends SIGTERM to a child we started, so that `etcdctl lock` unlocks.
async fn terminate(child: &tokio::process::Child) {
    let pid = child.id().expect("child already reaped");
    let status = within(
        "kill -TERM",
        T,
        tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status(),
    )
    .await
    .expect("kill failed to run");
    assert!(status.success());
}

/// Breaking the queue by hand (`wait_deletes` returning at once, so
/// every acquirer holds at once) made this fail with lost updates and a
/// concurrency above 1; restored.
#[tokio::test(flavor = "multi_thread")]
async fn five_registries_increment_a_shared_counter_without_lost_updates() {
    const REGISTRIES: usize = 5;
    const ROUNDS: usize = 20;
    let server = shared_server().await;
    let ns = unique_name("lock");
    let client = server.client().await.unwrap();
    let counter = format!("/{ns}/counter");
    within(
        "init counter",
        T,
        client.clone().put(counter.as_str(), "0", None),
    )
    .await
    .unwrap();
    let active = Arc::new(AtomicUsize::new(0));
    let max_active = Arc::new(AtomicUsize::new(0));

    // One critical section: a read-modify-write of the counter, in two
    // requests, so that two holders at once would lose an update.
    async fn increment(
        client: &Client,
        counter: &str,
        guard: &LockGuard,
        active: &AtomicUsize,
        max_active: &AtomicUsize,
    ) -> (i64, i64) {
        let now = active.fetch_add(1, Ordering::SeqCst) + 1;
        max_active.fetch_max(now, Ordering::SeqCst);
        assert!(guard.is_held());
        let mut c = client.clone();
        let resp = within("read counter", T, c.get(counter, None))
            .await
            .unwrap();
        let value: i64 = std::str::from_utf8(resp.kvs()[0].value())
            .unwrap()
            .parse()
            .unwrap();
        tokio::task::yield_now().await;
        within(
            "write counter",
            T,
            c.put(counter, (value + 1).to_string(), None),
        )
        .await
        .unwrap();
        active.fetch_sub(1, Ordering::SeqCst);
        (value + 1, guard.fencing_token())
    }

    let start = Instant::now();
    let mut workers = Vec::new();
    for i in 0..REGISTRIES {
        let registry = connect(server.endpoints(), &ns, 5).await;
        let (client, counter) = (client.clone(), counter.clone());
        let (active, max_active) = (active.clone(), max_active.clone());
        workers.push(tokio::spawn(async move {
            let lock = registry.lock("counter").unwrap();
            let mut seen = Vec::new();
            for _ in 0..ROUNDS {
                // Half the registries use `with`, half acquire and release.
                let step = if i % 2 == 0 {
                    let guard = acquire(&lock).await;
                    let step = increment(&client, &counter, &guard, &active, &max_active).await;
                    within("release", T, guard.release()).await.unwrap();
                    step
                } else {
                    within(
                        "with",
                        T,
                        lock.with(|guard| {
                            let (client, counter) = (client.clone(), counter.clone());
                            let (active, max_active) = (active.clone(), max_active.clone());
                            async move {
                                increment(&client, &counter, &guard, &active, &max_active).await
                            }
                        }),
                    )
                    .await
                    .unwrap()
                };
                seen.push(step);
            }
            registry.close().await.unwrap();
            seen
        }));
    }
    let mut steps = Vec::new();
    for w in workers {
        steps.extend(within("worker", Duration::from_secs(120), w).await.unwrap());
    }
    eprintln!(
        "{} lock acquisitions across {REGISTRIES} registries took {:?}",
        REGISTRIES * ROUNDS,
        start.elapsed()
    );

    let resp = within(
        "read counter",
        T,
        client.clone().get(counter.as_str(), None),
    )
    .await
    .unwrap();
    let total: usize = std::str::from_utf8(resp.kvs()[0].value())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(total, REGISTRIES * ROUNDS, "lost updates");
    assert_eq!(max_active.load(Ordering::SeqCst), 1, "max concurrency");
    // Each value was written once, and in the order of the fencing tokens.
    steps.sort();
    let values: Vec<i64> = steps.iter().map(|s| s.0).collect();
    assert_eq!(
        values,
        (1..=(REGISTRIES * ROUNDS) as i64).collect::<Vec<_>>()
    );
    assert!(
        steps.windows(2).all(|w| w[0].1 < w[1].1),
        "fencing tokens must rise with every holder"
    );
}

/// Also: a registry asking for a lock it already holds, and lock names.
#[tokio::test(flavor = "multi_thread")]
async fn try_acquire_does_not_wait_and_acquire_timeout_gives_up_leaving_no_key() {
    let server = shared_server().await;
    let ns = unique_name("lock");
    let (r1, r2) = (
        connect(server.endpoints(), &ns, 5).await,
        connect(server.endpoints(), &ns, 5).await,
    );
    let client = server.client().await.unwrap();
    for bad in ["", "a/b", "a\nb"] {
        assert!(
            matches!(r1.lock(bad), Err(Error::InvalidInput { field: "lock", .. })),
            "{bad:?}"
        );
    }
    let (lock1, lock2) = (r1.lock("job").unwrap(), r2.lock("job").unwrap());
    assert_eq!(lock1.etcd_name(), format!("/etcd_registry/{ns}/locks/job"));

    let g1 = within("try_acquire", T, lock1.try_acquire())
        .await
        .unwrap()
        .expect("a free lock is taken at once");
    assert!(g1.is_held());
    assert_eq!(
        g1.key(),
        format!("{}/{:x}", lock1.etcd_name(), r1.lease_id().unwrap())
    );
    let held = vec![(g1.key().to_owned(), g1.fencing_token())];

    // Another registry: `None`, and its key is gone when it returns.
    let other = within("try_acquire", T, lock2.try_acquire()).await.unwrap();
    assert!(other.is_none(), "{other:?}");
    assert_eq!(lock_keys(&client, &lock2).await, held);

    // The same registry: it does not wait for itself either.
    let again = within("try_acquire", T, lock1.try_acquire()).await.unwrap();
    assert!(again.is_none(), "{again:?}");
    assert_eq!(lock_keys(&client, &lock1).await, held);

    // acquire_timeout gives up in time and withdraws its key before returning.
    let d = Duration::from_millis(1500);
    let started = Instant::now();
    let timed = within("acquire_timeout", T, lock2.acquire_timeout(d))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(timed.is_none(), "{timed:?}");
    assert!(took >= d, "gave up after {took:?}");
    assert!(took <= d + Duration::from_secs(5), "gave up after {took:?}");
    assert_eq!(lock_keys(&client, &lock2).await, held);

    // A registry asking for a lock it already holds waits for itself.
    let mut second = tokio::spawn({
        let lock1 = lock1.clone();
        async move { lock1.acquire().await }
    });
    assert!(
        timeout(Duration::from_millis(800), &mut second)
            .await
            .is_err(),
        "a second acquisition of one registry must wait while the first holds"
    );
    within("release", T, g1.release()).await.unwrap();
    assert!(!g1.is_held());
    assert_eq!(within("lost", T, g1.lost()).await, LostReason::Released);
    let g1b = within("second acquisition", T, second)
        .await
        .unwrap()
        .unwrap();
    assert!(g1b.fencing_token() > g1.fencing_token());
    within("release", T, g1b.release()).await.unwrap();

    // Free again: acquire_timeout takes it at once.
    let g2 = within("acquire_timeout", T, lock2.acquire_timeout(d))
        .await
        .unwrap()
        .expect("a free lock");
    assert!(g2.fencing_token() > g1b.fencing_token());
    within("release", T, g2.release()).await.unwrap();
    assert!(lock_keys(&client, &lock2).await.is_empty());
    r1.close().await.unwrap();
    r2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn interop_with_etcdctl_lock() {
    let server = shared_server().await;
    let registry = connect(server.endpoints(), &unique_name("lock"), 5).await;
    let lock = registry.lock("job").unwrap();
    let name = lock.etcd_name().to_owned();

    // etcdctl holds; ours waits.
    let mut ctl = server
        .etcdctl()
        .args(["lock", &name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ctl_out = BufReader::new(ctl.stdout.take().unwrap()).lines();
    let line = within("etcdctl holds the lock", T, ctl_out.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(line.starts_with(&format!("{name}/")), "{line}");
    let none = within("try_acquire", T, lock.try_acquire()).await.unwrap();
    assert!(none.is_none(), "etcdctl holds the lock: {none:?}");
    let mut ours = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire().await }
    });
    assert!(
        timeout(Duration::from_millis(1500), &mut ours)
            .await
            .is_err(),
        "ours must wait while etcdctl holds the lock"
    );

    // etcdctl gets SIGTERM and unlocks; ours acquires.
    terminate(&ctl).await;
    within("etcdctl exits", T, ctl.wait()).await.unwrap();
    let guard = within("ours acquires", Duration::from_secs(5), ours)
        .await
        .unwrap()
        .unwrap();
    assert!(guard.is_held());

    // etcdctl waits while ours holds, and acquires when ours releases.
    let mut ctl2 = server
        .etcdctl()
        .args(["lock", &name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ctl2_out = BufReader::new(ctl2.stdout.take().unwrap()).lines();
    let early = timeout(Duration::from_millis(1500), ctl2_out.next_line()).await;
    assert!(
        early.is_err(),
        "etcdctl must wait while ours holds: {early:?}"
    );
    within("release", T, guard.release()).await.unwrap();
    let line = within(
        "etcdctl acquires",
        Duration::from_secs(5),
        ctl2_out.next_line(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(line.starts_with(&format!("{name}/")), "{line}");
    terminate(&ctl2).await;
    within("etcdctl exits", T, ctl2.wait()).await.unwrap();
    let client = server.client().await.unwrap();
    eventually("etcdctl unlocked", T, || async {
        lock_keys(&client, &lock).await.is_empty()
    })
    .await;
    registry.close().await.unwrap();
}

/// With the lease deadline taken out of the safety bound by hand
/// (`lease_lost` sleeping an hour past the deadline), the cut-off holder
/// never learnt it lost the lock and this failed; restored.
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_holder_loses_the_lock_before_the_next_holder_acquires() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    for round in 0..2 {
        let ns = unique_name("lock-part");
        let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
        let r1 = connect(vec![proxy.endpoint()], &ns, 3).await;
        let r2 = connect(server.endpoints(), &ns, 3).await;
        let lock1 = r1.lock("job").unwrap();
        let lock2 = r2.lock("job").unwrap();

        let g1 = acquire(&lock1).await;
        let lost1 = tokio::spawn({
            let g1 = g1.clone();
            async move {
                let reason = g1.lost().await;
                (Instant::now(), reason, g1.is_held())
            }
        });
        let next = tokio::spawn(async move { lock2.acquire().await.map(|g| (Instant::now(), g)) });
        eventually("the next holder waits with its key", T, || async {
            lock_keys(&client, &lock1).await.len() == 2
        })
        .await;

        let cut = Instant::now();
        proxy.blackhole();
        let (lost_at, reason, still_held) = within("holder 1 notices", T, lost1).await.unwrap();
        let (won_at, g2) = within("holder 2 acquires", T, next).await.unwrap().unwrap();
        assert_eq!(reason, LostReason::LeaseDeadline, "round {round}");
        assert!(!still_held && !g1.is_held(), "round {round}");
        assert!(
            lost_at < won_at,
            "round {round}: holder 1 stopped {:?} after the cut, but 2 acquired {:?} after it",
            lost_at - cut,
            won_at - cut
        );
        assert!(g2.fencing_token() > g1.fencing_token(), "round {round}");
        eprintln!(
            "round {round}: holder 1 lost the lock {:?} after the cut, holder 2 acquired {:?} later",
            lost_at - cut,
            won_at - lost_at
        );
        within("release", T, g2.release()).await.unwrap();
        drop(g1);
        drop(r1);
        r2.close().await.unwrap();
    }
}

/// A release that comes too late never deletes someone else's key.
///
/// Part two is etcd#22082: a peer sharing the holder's lease (as Go's
/// `concurrency.NewSession(WithLease)` allows) re-creates the very same key
/// while the holder is cut off, and the holder's release arrives after it.
/// Making the release delete unconditionally by hand (no create-revision
/// compare) made part two fail with the peer's key deleted; restored.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_release_leaves_the_successors_key() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    let ns = unique_name("lock-stale");

    // Part one: the holder's lease expired and a successor holds the lock.
    let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
    let r1 = connect(vec![proxy.endpoint()], &ns, 3).await;
    let r2 = connect(server.endpoints(), &ns, 3).await;
    let (lock1, lock2) = (r1.lock("job").unwrap(), r2.lock("job").unwrap());
    let g1 = acquire(&lock1).await;
    let lease1 = g1.lease_id();
    proxy.blackhole();
    let g2 = acquire(&lock2).await; // only once etcd expired holder 1's lease
    proxy.heal();
    eventually("registry 1 moved to a new lease", T, || async {
        r1.lease_id().is_some_and(|l| l != lease1)
    })
    .await;
    within("stale release", T, g1.release()).await.unwrap();
    assert_eq!(
        lock_keys(&client, &lock2).await,
        vec![(g2.key().to_owned(), g2.fencing_token())]
    );
    assert!(g2.is_held());
    let third = within("try_acquire", T, lock1.try_acquire()).await.unwrap();
    assert!(third.is_none(), "the successor still holds: {third:?}");
    within("release", T, g2.release()).await.unwrap();
    drop(r1);
    drop(proxy);
    r2.close().await.unwrap();

    // Part two: the same key, re-created by a peer on the same lease, after
    // the holder decided to release but before its delete reached etcd. The
    // TTL is long enough that the lease deadline does not pass meanwhile.
    let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
    let r3 = connect(vec![proxy.endpoint()], &ns, 10).await;
    let lock3 = r3.lock("job").unwrap();
    let g3 = acquire(&lock3).await;
    let key = g3.key().to_owned();
    proxy.blackhole();
    // The holder's key goes (an unlock that the holder never heard of), and
    // the peer locks as `concurrency.Mutex` does: put if absent, same lease.
    let unlock = Txn::new()
        .when([Compare::create_revision(
            key.as_str(),
            CompareOp::Equal,
            g3.fencing_token(),
        )])
        .and_then([TxnOp::delete(key.as_str(), None)]);
    let resp = within("the key goes", T, client.clone().txn(unlock))
        .await
        .unwrap();
    assert!(resp.succeeded());
    let relock = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.as_str(),
            "",
            Some(PutOptions::new().with_lease(g3.lease_id())),
        )]);
    let resp = within("the peer takes the key", T, client.clone().txn(relock))
        .await
        .unwrap();
    assert!(resp.succeeded());
    let peer_rev = resp.header().unwrap().revision();
    let release = tokio::spawn({
        let g3 = g3.clone();
        async move { g3.release().await }
    });
    // `lost` turns `Released` before the release decides what to send.
    eventually("the release has started", T, || async {
        g3.lost_reason() == Some(LostReason::Released)
    })
    .await;
    proxy.heal();
    within("stale release", T, release).await.unwrap().unwrap();
    assert_eq!(
        lock_keys(&client, &lock3).await,
        vec![(key.clone(), peer_rev)],
        "the peer's key must survive the stale release"
    );
    within("clean up", T, client.clone().delete(key.as_str(), None))
        .await
        .unwrap();
    r3.close().await.unwrap();
}

/// A dropped acquisition, a dropped guard and a dropped `with` leave no key;
/// a lost lock cancels the task of `with`. With the withdrawal on drop
/// disabled by hand, the first check failed; restored.
#[tokio::test(flavor = "multi_thread")]
async fn dropping_an_acquisition_or_a_guard_leaves_no_key() {
    let server = shared_server().await;
    let ns = unique_name("lock");
    let (r1, r2) = (
        connect(server.endpoints(), &ns, 5).await,
        connect(server.endpoints(), &ns, 5).await,
    );
    let client = server.client().await.unwrap();
    let (lock1, lock2) = (r1.lock("job").unwrap(), r2.lock("job").unwrap());
    let g1 = acquire(&lock1).await;
    let key2 = format!("{}/{:x}", lock2.etcd_name(), r2.lease_id().unwrap());

    {
        let pending = lock2.acquire();
        tokio::pin!(pending);
        tokio::select! {
            r = &mut pending => panic!("acquired while another holds: {r:?}"),
            _ = eventually("the waiter has written its key", T, || async {
                lock_keys(&client, &lock2).await.iter().any(|(k, _)| *k == key2)
            }) => {}
        }
        // `pending` is dropped here.
    }
    eventually(
        "the dropped waiter's key is deleted",
        Duration::from_secs(5),
        || async {
            lock_keys(&client, &lock2)
                .await
                .iter()
                .all(|(k, _)| *k != key2)
        },
    )
    .await;
    assert!(g1.is_held());

    // A dropped guard (no release) is released in the background.
    let waiter = tokio::spawn({
        let lock2 = lock2.clone();
        async move { lock2.acquire().await }
    });
    eventually("the next waiter has written its key", T, || async {
        lock_keys(&client, &lock2).await.len() == 2
    })
    .await;
    drop(g1);
    let g2 = within("the waiter acquires", T, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lock_keys(&client, &lock2).await.len(), 1);
    drop(g2);
    eventually("the dropped guard's key is deleted", T, || async {
        lock_keys(&client, &lock2).await.is_empty()
    })
    .await;

    // A dropped `with` drops its task and releases.
    let started = Arc::new(AtomicBool::new(false));
    {
        let with = lock1.with(|_guard| {
            let started = started.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await
            }
        });
        tokio::pin!(with);
        let ran = timeout(T, async {
            tokio::select! {
                r = &mut with => panic!("with returned: {r:?}"),
                _ = eventually("the task runs", T, || async { started.load(Ordering::SeqCst) }) => {}
            }
        })
        .await;
        assert!(ran.is_ok());
    }
    eventually("the dropped with's key is deleted", T, || async {
        lock_keys(&client, &lock1).await.is_empty()
    })
    .await;

    // A lock lost under `with` cancels the task and says why.
    let dropped = Arc::new(AtomicBool::new(false));
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let started = Arc::new(AtomicBool::new(false));
    let with = tokio::spawn({
        let (lock1, dropped, started) = (lock1.clone(), dropped.clone(), started.clone());
        async move {
            lock1
                .with(|_guard| async move {
                    let _flag = SetOnDrop(dropped);
                    started.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await
                })
                .await
        }
    });
    eventually("the task runs under the lock", T, || async {
        started.load(Ordering::SeqCst)
    })
    .await;
    let key = lock_keys(&client, &lock1).await.remove(0).0;
    within("admin delete", T, client.clone().delete(key, None))
        .await
        .unwrap();
    let result = within("with returns", T, with).await.unwrap();
    assert!(
        matches!(result, Err(Error::LockLost(LostReason::KeyDeleted))),
        "{result:?}"
    );
    assert!(dropped.load(Ordering::SeqCst), "the task was cancelled");
    r1.close().await.unwrap();
    r2.close().await.unwrap();
}
