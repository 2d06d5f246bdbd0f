//! The handover path of the candidate queue (elections and locks share it):
//! once the member ahead goes, one read at one revision decides whether a
//! waiting candidate leads. These tests pin what that read must still see:
//! an older key that is still there, and a candidate's own key that was
//! deleted or replaced while it waited.

use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_registry::{Election, Error, Leadership, LostReason, Registry};
use etcd_registry_testkit::{eventually, shared_server, unique_name, within};
use tokio::time::timeout;

/// Bound for any single await that could hang.
const T: Duration = Duration::from_secs(20);

mod common;
use common::init_tracing;

async fn connect(endpoints: Vec<String>, namespace: &str) -> Registry {
    let builder = common::builder(endpoints, namespace, 10);
    common::connect_with(builder.request_timeout(Duration::from_secs(2))).await
}

/// The candidate keys of `election` in create order: (key, create revision).
async fn candidates(client: &Client, election: &Election) -> Vec<(String, i64)> {
    let mut c = client.clone();
    let opts = GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let resp = within(
        "raw get",
        T,
        c.get(format!("{}/", election.etcd_name()), Some(opts)),
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

async fn until_candidates(client: &Client, election: &Election, n: usize) -> Vec<(String, i64)> {
    eventually("the candidates' keys are written", T, || async {
        candidates(client, election).await.len() == n
    })
    .await;
    candidates(client, election).await
}

type Pending = tokio::task::JoinHandle<etcd_registry::Result<Leadership>>;

fn spawn_campaign(election: &Election, proposal: &'static str) -> Pending {
    let election = election.clone();
    tokio::spawn(async move { election.campaign(proposal).await })
}

/// c3 waits behind c2, which waits behind the leader c1. When c2 leaves, c3
/// must go on waiting for c1: the delete it was woken by is not the end of
/// the queue. Checked by hand against the mutant that treats the wake-up as
/// the head (`wait_deletes` returning right after `wait_delete`): c3 stopped
/// waiting while c1 led and this failed at "c3 must wait".
#[tokio::test(flavor = "multi_thread")]
async fn a_candidate_woken_by_a_leaving_predecessor_still_waits_for_the_leader() {
    init_tracing();
    let server = shared_server().await;
    let ns = unique_name("ho");
    let (r1, r2, r3) = (
        connect(server.endpoints(), &ns).await,
        connect(server.endpoints(), &ns).await,
        connect(server.endpoints(), &ns).await,
    );
    let client = server.client().await.unwrap();
    let (e1, e2, e3) = (
        r1.election("job").unwrap(),
        r2.election("job").unwrap(),
        r3.election("job").unwrap(),
    );
    let l1 = within("campaign", T, e1.campaign("c1")).await.unwrap();
    let c2 = spawn_campaign(&e2, "c2");
    until_candidates(&client, &e1, 2).await;
    let mut c3 = spawn_campaign(&e3, "c3");
    until_candidates(&client, &e1, 3).await;

    // A dropped campaign withdraws its key: c3's predecessor goes.
    c2.abort();
    until_candidates(&client, &e1, 2).await;
    assert!(
        timeout(Duration::from_secs(1), &mut c3).await.is_err(),
        "c3 must wait while c1 leads"
    );
    assert!(l1.is_leader());

    within("resign", T, l1.resign()).await.unwrap();
    let l3 = within("c3 leads", T, c3).await.unwrap().unwrap();
    assert!(l3.is_leader());
    let leader = within("leader", T, e1.leader()).await.unwrap().unwrap();
    assert_eq!(leader.proposal_str(), "c3");
    assert_eq!(leader.fencing_token, l3.fencing_token());
    within("resign", T, l3.resign()).await.unwrap();
    for r in [r1, r2, r3] {
        within("close", T, r.close()).await.unwrap();
    }
}

/// A waiting candidate whose key is deleted, or deleted and written again
/// by someone else, must not lead when the leader goes. Checked by hand
/// against the mutant that skips the own-key check in the handover read
/// (`place` ignoring the own key's answer): c2 then led with its deleted
/// key and this failed at "c2 led".
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_candidate_whose_key_was_deleted_or_replaced_does_not_lead() {
    init_tracing();
    let server = shared_server().await;
    for replaced in [false, true] {
        let ns = unique_name("ho");
        let (r1, r2) = (
            connect(server.endpoints(), &ns).await,
            connect(server.endpoints(), &ns).await,
        );
        let mut client = server.client().await.unwrap();
        let (e1, e2) = (r1.election("job").unwrap(), r2.election("job").unwrap());
        let l1 = within("campaign", T, e1.campaign("c1")).await.unwrap();
        let c2 = spawn_campaign(&e2, "c2");
        let keys = until_candidates(&client, &e1, 2).await;
        let (c2_key, _) = keys[1].clone();

        within("delete c2's key", T, client.delete(c2_key.clone(), None))
            .await
            .unwrap();
        if replaced {
            // Someone else's key now: a new create revision, no lease.
            within("rewrite c2's key", T, client.put(c2_key.clone(), "x", None))
                .await
                .unwrap();
        }
        within("resign", T, l1.resign()).await.unwrap();
        let outcome = within("c2's campaign ends", T, c2).await.unwrap();
        let expected = if replaced {
            LostReason::KeyReplaced
        } else {
            LostReason::KeyDeleted
        };
        match outcome {
            Err(Error::NotLeader(reason)) => assert_eq!(reason, expected),
            Ok(l) => panic!(
                "c2 led (token {}) with a key that was not its own",
                l.fencing_token()
            ),
            Err(other) => panic!("expected NotLeader({expected:?}), got {other:?}"),
        }
        // Someone else's key is left alone.
        let left = candidates(&client, &e1).await;
        assert_eq!(left.len(), usize::from(replaced), "{left:?}");
        if replaced {
            within("clean up", T, client.delete(c2_key, None))
                .await
                .unwrap();
        }
        for r in [r1, r2] {
            within("close", T, r.close()).await.unwrap();
        }
    }
}
