//! Leader election against real etcd: campaign, handover, crash
//! failover, partition safety, lease loss while campaigning, withdrawal on
//! drop, `etcdctl elect` interop, observe across a restart, mutual exclusion
//! under churn, and `lead()`.

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_registry::{Election, Error, LeaderInfo, Leadership, LostReason, Registry};
use etcd_registry_testkit::{
    EtcdServer, FaultProxy, eventually, shared_server, unique_name, within,
};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{Instant, timeout};

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(20);

mod common;
use common::init_tracing;

async fn connect(endpoints: Vec<String>, namespace: &str, ttl_secs: u64) -> Registry {
    let builder = common::builder(endpoints, namespace, ttl_secs);
    common::connect_with(builder.request_timeout(Duration::from_secs(2))).await
}

/// Raw read of every key under `prefix`: (key, value, create revision).
async fn raw(client: &Client, prefix: &str) -> Vec<(String, String, i64)> {
    let mut c = client.clone();
    let resp = within(
        "raw get",
        T,
        c.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    .expect("raw get failed");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.create_revision(),
            )
        })
        .collect()
}

/// The candidate keys of `election` (a raw read).
async fn candidates(client: &Client, election: &Election) -> Vec<(String, String, i64)> {
    raw(client, &format!("{}/", election.etcd_name())).await
}

async fn campaign(election: &Election, proposal: &str) -> Leadership {
    within("campaign", T, election.campaign(proposal))
        .await
        .expect("campaign failed")
}

fn proposal(l: &Option<LeaderInfo>) -> Option<String> {
    l.as_ref().map(|l| l.proposal_str().into_owned())
}

/// Sends SIGTERM to a child we started, so that `etcdctl elect` resigns.
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

#[tokio::test(flavor = "multi_thread")]
async fn one_candidate_leads_and_leader_shows_it_until_resign() {
    let server = shared_server().await;
    let ns = unique_name("el");
    let registry = connect(server.endpoints(), &ns, 5).await;
    let election = registry.election("job").unwrap();
    assert_eq!(
        election.etcd_name(),
        format!("/etcd_registry/{ns}/elections/job")
    );
    assert!(
        within("leader", T, election.leader())
            .await
            .unwrap()
            .is_none()
    );

    let leadership = campaign(&election, "candidate-1").await;
    assert!(leadership.is_leader());
    assert_eq!(leadership.lost_reason(), None);
    let lease = registry.lease_id().unwrap();
    assert_eq!(
        leadership.key(),
        format!("{}/{lease:x}", election.etcd_name())
    );

    let leader = within("leader", T, election.leader())
        .await
        .unwrap()
        .expect("a leader");
    assert_eq!(leader.proposal_str(), "candidate-1");
    assert_eq!(leader.fencing_token, leadership.fencing_token());
    assert_eq!(leader.lease_id, lease);

    within("resign", T, leadership.resign()).await.unwrap();
    assert!(!leadership.is_leader());
    assert_eq!(
        within("lost", T, leadership.lost()).await,
        LostReason::Resigned
    );
    assert!(
        within("leader", T, election.leader())
            .await
            .unwrap()
            .is_none()
    );
    let err = within("proclaim", T, leadership.proclaim("late"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotLeader(LostReason::Resigned)),
        "{err:?}"
    );
    registry.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn election_names_are_validated_like_service_names() {
    let server = shared_server().await;
    let registry = connect(server.endpoints(), &unique_name("el"), 5).await;
    for bad in ["", "a/b", "a\nb"] {
        assert!(
            matches!(
                registry.election(bad),
                Err(Error::InvalidInput {
                    field: "election",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
    registry.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn handover_to_a_waiting_candidate_within_a_second_of_resign() {
    let server = shared_server().await;
    let ns = unique_name("el");
    let (r1, r2) = (
        connect(server.endpoints(), &ns, 5).await,
        connect(server.endpoints(), &ns, 5).await,
    );
    let client = server.client().await.unwrap();
    let e1 = r1.election("job").unwrap();
    let e2 = r2.election("job").unwrap();

    let l1 = campaign(&e1, "candidate-1").await;
    let mut c2 = tokio::spawn(async move {
        e2.campaign("candidate-2")
            .await
            .map(|l| (Instant::now(), l))
    });
    eventually("candidate 2 has written its key", T, || async {
        candidates(&client, &e1).await.len() == 2
    })
    .await;
    assert!(
        timeout(Duration::from_millis(500), &mut c2).await.is_err(),
        "candidate 2 must wait while 1 leads"
    );
    assert!(l1.is_leader());

    let resigned = Instant::now();
    within("resign", T, l1.resign()).await.unwrap();
    let (won, l2) = within("candidate 2 wins", T, c2).await.unwrap().unwrap();
    let handover = won - resigned;
    assert!(
        handover < Duration::from_secs(1),
        "handover took {handover:?}"
    );
    assert!(l2.is_leader());
    assert!(l2.fencing_token() > l1.fencing_token());
    let leader = within("leader", T, e1.leader()).await.unwrap().unwrap();
    assert_eq!(leader.proposal_str(), "candidate-2");
    assert_eq!(leader.fencing_token, l2.fencing_token());
    within("resign", T, l2.resign()).await.unwrap();
    r1.close().await.unwrap();
    r2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_failover_after_about_the_ttl() {
    let server = shared_server().await;
    let ns = unique_name("el");
    let ttl = Duration::from_secs(3);
    let (r1, r2) = (
        connect(server.endpoints(), &ns, 3).await,
        connect(server.endpoints(), &ns, 3).await,
    );
    let client = server.client().await.unwrap();
    let e1 = r1.election("job").unwrap();
    let e2 = r2.election("job").unwrap();
    let l1 = campaign(&e1, "candidate-1").await;
    let c2 = tokio::spawn({
        let e2 = e2.clone();
        async move {
            e2.campaign("candidate-2")
                .await
                .map(|l| (Instant::now(), l))
        }
    });
    eventually("candidate 2 has written its key", T, || async {
        candidates(&client, &e2).await.len() == 2
    })
    .await;

    // A crash: no resign, no close, no revocation.
    let crashed = Instant::now();
    drop(r1);
    assert_eq!(within("lost", T, l1.lost()).await, LostReason::Closed);
    drop(l1);
    let (won, l2) = within("candidate 2 wins", T, c2).await.unwrap().unwrap();
    let took = won - crashed;
    // The lease expires between 2/3 TTL (just after a keep-alive) and TTL after the crash.
    assert!(
        took >= ttl * 2 / 3 - Duration::from_millis(300),
        "won after {took:?}: the key must have expired, not been deleted"
    );
    assert!(took <= ttl + Duration::from_secs(2), "won after {took:?}");
    assert!(l2.is_leader());
    within("resign", T, l2.resign()).await.unwrap();
    r2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_leader_loses_before_anyone_else_wins() {
    let server = shared_server().await;
    let client = server.client().await.unwrap();
    for round in 0..4 {
        let ns = unique_name("el-part");
        let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
        let r1 = connect(vec![proxy.endpoint()], &ns, 3).await;
        let r2 = connect(server.endpoints(), &ns, 3).await;
        let e1 = r1.election("job").unwrap();
        let e2 = r2.election("job").unwrap();

        let l1 = campaign(&e1, "candidate-1").await;
        let lost1 = tokio::spawn({
            let l1 = l1.clone();
            async move {
                let reason = l1.lost().await;
                (Instant::now(), reason, l1.is_leader())
            }
        });
        let c2 = tokio::spawn(async move {
            e2.campaign("candidate-2")
                .await
                .map(|l| (Instant::now(), l))
        });
        eventually("candidate 2 has written its key", T, || async {
            candidates(&client, &e1).await.len() == 2
        })
        .await;

        let cut = Instant::now();
        proxy.blackhole();
        let (lost_at, reason, still_leader) = within("leader 1 notices", T, lost1).await.unwrap();
        let (won_at, l2) = within("candidate 2 wins", T, c2).await.unwrap().unwrap();
        assert_eq!(reason, LostReason::LeaseDeadline, "round {round}");
        assert!(!still_leader && !l1.is_leader(), "round {round}");
        assert!(
            lost_at < won_at,
            "round {round}: leader 1 stopped {:?} after the cut, but 2 won {:?} after it",
            lost_at - cut,
            won_at - cut
        );
        assert!(
            lost_at - cut <= Duration::from_secs(3),
            "round {round}: lost after {:?}",
            lost_at - cut
        );
        assert!(l2.fencing_token() > l1.fencing_token());
        eprintln!(
            "round {round}: leader 1 lost {:?} after the cut, candidate 2 won {:?} later",
            lost_at - cut,
            won_at - lost_at
        );
        within("resign", T, l2.resign()).await.unwrap();
        drop(l1);
        drop(r1);
        r2.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn campaign_fails_with_session_lost_when_the_lease_is_revoked() {
    let server = shared_server().await;
    let ns = unique_name("el");
    let (r1, r2) = (
        connect(server.endpoints(), &ns, 5).await,
        connect(server.endpoints(), &ns, 3).await,
    );
    let client = server.client().await.unwrap();
    let e1 = r1.election("job").unwrap();
    let e2 = r2.election("job").unwrap();
    let l1 = campaign(&e1, "candidate-1").await;
    let c2 = tokio::spawn({
        let e2 = e2.clone();
        async move { e2.campaign("candidate-2").await }
    });
    eventually("candidate 2 has written its key", T, || async {
        candidates(&client, &e1).await.len() == 2
    })
    .await;

    let lease = r2.lease_id().unwrap();
    within("revoke", T, client.clone().lease_revoke(lease))
        .await
        .unwrap();
    let result = within("campaign gives up", Duration::from_secs(5), c2)
        .await
        .unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    assert!(l1.is_leader(), "leader 1 is not affected");

    // The registry recovers with a new lease, and campaigning works again.
    eventually("registry 2 has a new lease", T, || async {
        r2.lease_id().is_some_and(|l| l != lease)
    })
    .await;
    within("resign", T, l1.resign()).await.unwrap();
    let l2 = campaign(&e2, "candidate-2").await;
    assert_eq!(l2.lease_id(), r2.lease_id().unwrap());
    within("resign", T, l2.resign()).await.unwrap();
    r1.close().await.unwrap();
    r2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn campaign_fails_with_session_lost_when_cut_off_from_etcd() {
    let server = shared_server().await;
    let ns = unique_name("el");
    let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
    let r1 = connect(server.endpoints(), &ns, 5).await;
    let r2 = connect(vec![proxy.endpoint()], &ns, 3).await;
    let client = server.client().await.unwrap();
    let e1 = r1.election("job").unwrap();
    let e2 = r2.election("job").unwrap();
    let l1 = campaign(&e1, "candidate-1").await;
    let c2 = tokio::spawn(async move { e2.campaign("candidate-2").await });
    eventually("candidate 2 has written its key", T, || async {
        candidates(&client, &e1).await.len() == 2
    })
    .await;

    let cut = Instant::now();
    proxy.blackhole();
    let result = within("campaign gives up", Duration::from_secs(6), c2)
        .await
        .unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    assert!(
        cut.elapsed() <= Duration::from_secs(4),
        "gave up after {:?}",
        cut.elapsed()
    );
    within("resign", T, l1.resign()).await.unwrap();
    drop(r2);
    r1.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_pending_campaign_removes_its_key() {
    let server = shared_server().await;
    let ns = unique_name("el");
    let (r1, r2) = (
        connect(server.endpoints(), &ns, 5).await,
        connect(server.endpoints(), &ns, 5).await,
    );
    let client = server.client().await.unwrap();
    let e1 = r1.election("job").unwrap();
    let e2 = r2.election("job").unwrap();
    let l1 = campaign(&e1, "candidate-1").await;
    let key2 = format!("{}/{:x}", e2.etcd_name(), r2.lease_id().unwrap());

    {
        let pending = e2.campaign("candidate-2");
        tokio::pin!(pending);
        tokio::select! {
            r = &mut pending => panic!("campaign returned while 1 leads: {r:?}"),
            _ = eventually("candidate 2 has written its key", T, || async {
                candidates(&client, &e2).await.iter().any(|(k, v, _)| *k == key2 && v == "candidate-2")
            }) => {}
        }
        // `pending` is dropped here.
    }
    eventually(
        "the dropped candidate's key is deleted",
        Duration::from_secs(5),
        || async {
            candidates(&client, &e2)
                .await
                .iter()
                .all(|(k, _, _)| *k != key2)
        },
    )
    .await;
    let left = candidates(&client, &e2).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].1, "candidate-1");
    assert!(l1.is_leader());

    // The same registry can campaign again at once.
    within("resign", T, l1.resign()).await.unwrap();
    let l2 = campaign(&e2, "candidate-2b").await;
    assert_eq!(
        proposal(&within("leader", T, e1.leader()).await.unwrap()).as_deref(),
        Some("candidate-2b")
    );
    within("resign", T, l2.resign()).await.unwrap();
    r1.close().await.unwrap();
    r2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_campaigns_of_one_registry_take_turns() {
    let server = shared_server().await;
    let registry = connect(server.endpoints(), &unique_name("el"), 5).await;
    let election = registry.election("job").unwrap();
    let l1 = campaign(&election, "same").await;
    let mut second = tokio::spawn({
        let election = election.clone();
        async move { election.campaign("same").await }
    });
    assert!(
        timeout(Duration::from_millis(800), &mut second)
            .await
            .is_err(),
        "a second candidacy of the same registry must not lead while the first does"
    );
    within("resign", T, l1.resign()).await.unwrap();
    let l2 = within("second campaign", T, second).await.unwrap().unwrap();
    assert!(l2.is_leader());
    assert!(l2.fencing_token() > l1.fencing_token());
    within("resign", T, l2.resign()).await.unwrap();
    registry.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn proclaim_updates_the_value_and_a_deleted_key_ends_leadership() {
    let server = shared_server().await;
    let registry = connect(server.endpoints(), &unique_name("el"), 5).await;
    let client = server.client().await.unwrap();
    let election = registry.election("job").unwrap();
    let mut observed = election.observe();
    assert_eq!(within("observe", T, observed.next()).await, Some(None));

    let l = campaign(&election, "v1").await;
    let first = within("observe", T, observed.next()).await.unwrap();
    assert_eq!(proposal(&first).as_deref(), Some("v1"));
    within("proclaim", T, l.proclaim("v2")).await.unwrap();
    let second = within("observe", T, observed.next()).await.unwrap();
    assert_eq!(proposal(&second).as_deref(), Some("v2"));
    assert_eq!(second.unwrap().fencing_token, l.fencing_token());

    within("admin delete", T, client.clone().delete(l.key(), None))
        .await
        .unwrap();
    assert_eq!(within("lost", T, l.lost()).await, LostReason::KeyDeleted);
    assert!(!l.is_leader());
    assert_eq!(within("observe", T, observed.next()).await, Some(None));
    let err = within("proclaim", T, l.proclaim("v3")).await.unwrap_err();
    assert!(
        matches!(err, Error::NotLeader(LostReason::KeyDeleted)),
        "{err:?}"
    );
    assert!(
        candidates(&client, &election).await.is_empty(),
        "proclaim must not recreate the key"
    );
    registry.close().await.unwrap();
    assert_eq!(
        within("observe ends on close", T, observed.next()).await,
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn interop_with_etcdctl_elect() {
    let server = shared_server().await;
    let registry = connect(server.endpoints(), &unique_name("el"), 5).await;
    let election = registry.election("job").unwrap();
    let name = election.etcd_name().to_owned();

    // etcdctl leads; ours waits.
    let mut ctl = server
        .etcdctl()
        .args(["elect", &name, "ctl-proposal"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ctl_out = BufReader::new(ctl.stdout.take().unwrap()).lines();
    let line = within("etcdctl is elected", T, ctl_out.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(line.starts_with(&format!("{name}/")), "{line}");
    let leader = within("leader", T, election.leader())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leader.proposal_str(), "ctl-proposal");

    let mut ours = tokio::spawn({
        let election = election.clone();
        async move { election.campaign("ours").await }
    });
    assert!(
        timeout(Duration::from_millis(1500), &mut ours)
            .await
            .is_err(),
        "ours must wait while etcdctl leads"
    );

    // etcdctl is killed (SIGTERM: it resigns); ours wins.
    terminate(&ctl).await;
    within("etcdctl exits", T, ctl.wait()).await.unwrap();
    let l = within("ours wins", Duration::from_secs(5), ours)
        .await
        .unwrap()
        .unwrap();
    assert!(l.is_leader());

    // `etcdctl elect -l` shows our proposal.
    let mut listen = server
        .etcdctl()
        .args(["elect", "-l", &name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut listen_out = BufReader::new(listen.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    within("etcdctl elect -l shows our proposal", T, async {
        while let Some(line) = listen_out.next_line().await.unwrap() {
            seen.push(line.clone());
            if line == "ours" {
                return;
            }
        }
        panic!("etcdctl elect -l ended; it printed {seen:?}");
    })
    .await;
    assert!(seen.iter().any(|l2| l2 == l.key()), "{seen:?}");
    listen.kill().await.unwrap();

    // etcdctl as a follower: it waits while ours leads and wins when ours resigns.
    let mut ctl2 = server
        .etcdctl()
        .args(["elect", &name, "ctl-2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ctl2_out = BufReader::new(ctl2.stdout.take().unwrap()).lines();
    let early = timeout(Duration::from_millis(1500), ctl2_out.next_line()).await;
    assert!(
        early.is_err(),
        "etcdctl must wait while ours leads: {early:?}"
    );
    within("resign", T, l.resign()).await.unwrap();
    let line = within("etcdctl wins", Duration::from_secs(5), ctl2_out.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(line.starts_with(&format!("{name}/")), "{line}");
    let leader = within("leader", T, election.leader())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leader.proposal_str(), "ctl-2");
    terminate(&ctl2).await;
    within("etcdctl exits", T, ctl2.wait()).await.unwrap();
    eventually("etcdctl resigned", T, || async {
        election.leader().await.is_ok_and(|l| l.is_none())
    })
    .await;
    registry.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_reports_every_leader_across_an_etcd_restart() {
    init_tracing();
    let mut server = EtcdServer::start().await.unwrap();
    let ns = unique_name("el");
    // The observer reaches etcd through a proxy, so that the test decides when
    // it comes back after the restart: only after the leaders changed twice.
    let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
    let r1 = connect(server.endpoints(), &ns, 10).await;
    let r2 = connect(server.endpoints(), &ns, 10).await;
    let r3 = connect(vec![proxy.endpoint()], &ns, 10).await;
    let client = server.client().await.unwrap();
    let e1 = r1.election("job").unwrap();
    let e2 = r2.election("job").unwrap();
    let mut observed = r3.election("job").unwrap().observe();
    assert_eq!(within("observe", T, observed.next()).await, Some(None));

    let l1 = campaign(&e1, "one").await;
    let first = within("observe", T, observed.next()).await.unwrap();
    assert_eq!(proposal(&first).as_deref(), Some("one"));
    assert_eq!(first.unwrap().fencing_token, l1.fencing_token());
    let c2 = tokio::spawn({
        let e2 = e2.clone();
        async move { e2.campaign("two").await }
    });
    eventually("candidate 2 has written its key", T, || async {
        candidates(&client, &e1).await.len() == 2
    })
    .await;

    proxy.blackhole();
    proxy.reset();
    within("restart", T, server.restart()).await.unwrap();
    eventually("leader 1 resigns after the restart", T, || async {
        l1.resign().await.is_ok()
    })
    .await;
    let l2 = within("candidate 2 wins", T, c2).await.unwrap().unwrap();
    within("resign", T, l2.resign()).await.unwrap();
    assert!(
        timeout(Duration::from_millis(300), observed.next())
            .await
            .is_err(),
        "the observer is still cut off"
    );
    proxy.heal();

    // Leader 2 came and went while the observer was away: it is still reported.
    let mut after = Vec::new();
    while after.last() != Some(&None) {
        let next = within("observe after the restart", T, observed.next())
            .await
            .expect("stream ended");
        after.push(proposal(&next));
    }
    assert_eq!(after, vec![Some("two".to_owned()), None]);
    drop(observed);
    r1.close().await.unwrap();
    r2.close().await.unwrap();
    r3.close().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_reports_the_current_leader_after_its_history_was_compacted() {
    let server = EtcdServer::start().await.unwrap();
    let ns = unique_name("el");
    let proxy = FaultProxy::start(&server.endpoint()).await.unwrap();
    let r1 = connect(server.endpoints(), &ns, 10).await;
    let r2 = connect(server.endpoints(), &ns, 10).await;
    let observer = connect(vec![proxy.endpoint()], &ns, 10).await;
    let mut client = server.client().await.unwrap();
    let mut observed = observer.election("job").unwrap().observe();
    assert_eq!(within("observe", T, observed.next()).await, Some(None));
    let l1 = campaign(&r1.election("job").unwrap(), "one").await;
    let first = within("observe", T, observed.next()).await.unwrap();
    assert_eq!(proposal(&first).as_deref(), Some("one"));

    // Cut the observer off, change leaders, and compact away that history.
    proxy.blackhole();
    proxy.reset();
    within("resign", T, l1.resign()).await.unwrap();
    let l2 = campaign(&r2.election("job").unwrap(), "two").await;
    let rev = client
        .get("compact-me", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(rev, None).await.unwrap();
    proxy.heal();

    // The observer's revision is gone from history: it re-reads and reports
    // the leader it missed, then keeps following.
    let after = within("observe after compaction", T, observed.next())
        .await
        .expect("stream ended");
    assert_eq!(proposal(&after).as_deref(), Some("two"));
    assert_eq!(after.unwrap().fencing_token, l2.fencing_token());
    within("resign", T, l2.resign()).await.unwrap();
    assert_eq!(within("observe", T, observed.next()).await, Some(None));
    drop(observed);
    for r in [r1, r2, observer] {
        r.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn five_registries_churning_never_lead_at_once() {
    let server = shared_server().await;
    let ns = unique_name("el-churn");
    const RUN: Duration = Duration::from_secs(20);
    const MAX_TERMS: usize = 400;
    let mut registries = Vec::new();
    for _ in 0..5 {
        registries.push(connect(server.endpoints(), &ns, 5).await);
    }
    // (candidate, won, stepped down, fencing token)
    let terms = Arc::new(Mutex::new(Vec::<(usize, Instant, Instant, i64)>::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, registry) in registries.iter().enumerate() {
        let election = registry.election("job").unwrap();
        let terms = terms.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < RUN && terms.lock().unwrap().len() < MAX_TERMS {
                let l = election.campaign(format!("c{i}")).await.expect("campaign");
                let won = Instant::now();
                assert!(l.is_leader());
                n += 1;
                tokio::time::sleep(Duration::from_millis(10 + (n * 37 + i as u64 * 11) % 60)).await;
                assert!(
                    l.is_leader(),
                    "candidate {i} lost leadership while holding it: {:?}",
                    l.lost_reason()
                );
                let stepped = Instant::now();
                l.resign().await.expect("resign");
                assert_eq!(l.lost().await, LostReason::Resigned);
                terms
                    .lock()
                    .unwrap()
                    .push((i, won, stepped, l.fencing_token()));
            }
        }));
    }
    for task in tasks {
        within("churn task", RUN + Duration::from_secs(30), task)
            .await
            .unwrap();
    }
    let mut terms = terms.lock().unwrap().clone();
    terms.sort_by_key(|t| t.1);
    assert!(terms.len() >= 10, "only {} terms", terms.len());
    for i in 0..5 {
        assert!(terms.iter().any(|t| t.0 == i), "candidate {i} never led");
    }
    for pair in terms.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a.2 < b.1,
            "candidate {} still led when candidate {} won",
            a.0,
            b.0
        );
        assert!(
            a.3 < b.3,
            "fencing tokens must increase: {} then {}",
            a.3,
            b.3
        );
    }
    eprintln!("{} terms in {:?}", terms.len(), start.elapsed());
    for r in registries {
        r.close().await.unwrap();
    }
}

/// Decrements the running count when the task's future is dropped.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lead_runs_the_task_on_exactly_one_candidate_and_moves_it_on_drop() {
    let server = shared_server().await;
    let ns = unique_name("el-lead");
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let starts = Arc::new(Mutex::new(Vec::<(usize, i64)>::new()));
    let mut registries = Vec::new();
    let mut leads = Vec::new();
    for i in 0..3 {
        let registry = connect(server.endpoints(), &ns, 3).await;
        let election = registry.election("cron").unwrap();
        registries.push(Some(registry));
        let (running, max_running, starts) = (running.clone(), max_running.clone(), starts.clone());
        leads.push(tokio::spawn(async move {
            election
                .lead(format!("c{i}"), move |leadership| {
                    let (running, max_running, starts) =
                        (running.clone(), max_running.clone(), starts.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        max_running.fetch_max(now, Ordering::SeqCst);
                        let _running = Running(running);
                        starts.lock().unwrap().push((i, leadership.fencing_token()));
                        std::future::pending::<()>().await;
                    }
                })
                .await
        }));
    }
    eventually("one task runs", T, || async {
        !starts.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await; // give a wrong second start time to show
    assert_eq!(starts.lock().unwrap().len(), 1);
    assert_eq!(running.load(Ordering::SeqCst), 1);
    let (first, first_token) = starts.lock().unwrap()[0];

    // Drop (not close) the leader's registry: its task is cancelled at once;
    // another candidate starts once the lease expires.
    let dropped = Instant::now();
    drop(registries[first].take());
    let result = within("lead returns on drop", T, &mut leads[first])
        .await
        .unwrap();
    assert!(matches!(result, Err(Error::Closed)), "{result:?}");
    assert_eq!(
        running.load(Ordering::SeqCst),
        0,
        "the task must be cancelled with its registry"
    );
    eventually(
        "the task starts on another candidate",
        Duration::from_secs(6),
        || async { starts.lock().unwrap().len() == 2 },
    )
    .await;
    let (second, second_token) = starts.lock().unwrap()[1];
    assert_ne!(second, first);
    assert!(second_token > first_token);
    assert!(
        dropped.elapsed() >= Duration::from_secs(1),
        "the second start must wait for the lease to expire"
    );
    assert_eq!(running.load(Ordering::SeqCst), 1);
    assert_eq!(
        max_running.load(Ordering::SeqCst),
        1,
        "two tasks ran at once"
    );

    for r in registries.into_iter().flatten() {
        r.close().await.unwrap();
    }
    for lead in leads
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, l)| l)
    {
        let result = within("lead returns on close", T, lead).await.unwrap();
        assert!(matches!(result, Err(Error::Closed)), "{result:?}");
    }
    assert_eq!(running.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn lead_returns_the_task_output_and_resigns() {
    let server = shared_server().await;
    let registry = connect(server.endpoints(), &unique_name("el"), 5).await;
    let election = registry.election("once").unwrap();
    let token = within(
        "lead",
        T,
        election.lead("only", |leadership| async move {
            assert!(leadership.is_leader());
            leadership.fencing_token()
        }),
    )
    .await
    .unwrap();
    assert!(token > 0);
    assert!(
        within("leader", T, election.leader())
            .await
            .unwrap()
            .is_none(),
        "lead must resign when the task ends"
    );
    registry.close().await.unwrap();
}
