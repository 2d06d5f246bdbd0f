//! The steps of the queue protocol, each one etcd request or wait.

use super::*;
use crate::conn::first_get_kv;
use crate::stream::Item;

pub(super) fn set_lost(lost: &watch::Sender<Option<LostReason>>, reason: LostReason) -> bool {
    lost.send_if_modified(|r| {
        if r.is_some() {
            return false;
        }
        *r = Some(reason);
        true
    })
}

pub(super) fn lease_error(inner: &Core, e: Error) -> Error {
    if e.is_lease_not_found() {
        inner.session.suspect_lost();
        Error::SessionLost
    } else {
        e
    }
}

// ---------------------------------------------------------------------------
// Protocol steps

/// Runs `step` again through transient failures (timeouts, etcd
/// unreachable), with backoff. Join steps run raced against the loss of the
/// lease, so a join ends with `SessionLost` (or succeeds), not with a slow
/// request. Refusals (permission denied) end it at once.
pub(super) async fn persist<T, F, Fut>(inner: &Core, what: &str, step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    crate::backoff::retry_transient(&inner.cancel, what, step).await
}

/// Writes the queue key if absent (as Go's `Campaign` and `Lock` do) and
/// returns its create revision. A key left by an earlier member of this same
/// lease is reused, with its value updated to `value`.
pub(super) async fn create_key(
    inner: &Core,
    kind: Kind,
    key: &str,
    lease_id: i64,
    value: Vec<u8>,
) -> Result<i64> {
    let resp = inner
        .conn
        .retry_on(kind.join_op(), key, |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease_id)),
                )])
                .or_else([TxnOp::get(key, None)]);
            async move { c.txn(txn).await }
        })
        .await
        .map_err(|e| lease_error(inner, e))?;
    if resp.succeeded() {
        return Ok(resp.header().map_or(0, |h| h.revision()));
    }
    let Some(kv) = first_get_kv(&resp) else {
        // Deleted between the compare and the get: cannot happen in one txn.
        return Err(kind.lost_error(LostReason::KeyDeleted));
    };
    if kv.lease() != lease_id {
        return Err(kind.lost_error(LostReason::KeyReplaced));
    }
    let token = kv.create_revision();
    if kv.value() != value.as_slice() {
        let resp = inner
            .conn
            .retry_on(kind.join_op(), key, |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, token)])
                    .and_then([TxnOp::put(
                        key,
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    )]);
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|e| lease_error(inner, e))?;
        if !resp.succeeded() {
            return Err(kind.lost_error(LostReason::KeyDeleted));
        }
    }
    tracing::debug!(
        key,
        revision = token,
        "reusing this lease's existing queue key"
    );
    Ok(token)
}

/// Deletes `key`, only if its create revision is still `token` when given.
pub(super) async fn delete_key(inner: &Core, key: &str, token: Option<i64>) -> Result<()> {
    inner
        .conn
        .retry("resign", |mut c| {
            let mut txn = Txn::new();
            if let Some(token) = token {
                txn = txn.when([Compare::create_revision(key, CompareOp::Equal, token)]);
            }
            let txn = txn.and_then([TxnOp::delete(key, None)]);
            async move { c.txn(txn).await }
        })
        .await
        .map(|_| ())
}

/// Deletes our key in the background, retrying until it is done, the lease it
/// lives under is gone (and the key with it), or the registry closes.
pub(super) async fn release_key(inner: &Core, key: &str, token: Option<i64>, lease_id: i64) {
    let mut retry = Retry::standard("deleting a queue key");
    loop {
        if inner.cancel.is_cancelled() {
            return;
        }
        match delete_key(inner, key, token).await {
            Ok(()) => {
                tracing::debug!(key, "queue key deleted");
                return;
            }
            Err(error) => {
                if inner.session.lease().is_none_or(|l| l.id != lease_id) {
                    return;
                }
                let error = format!("{key}: {error}");
                if !retry.failed(&inner.cancel, &error).await {
                    return;
                }
            }
        }
    }
}

/// Resolves when the lease `lease_id` can no longer be relied on: the registry
/// moved to another lease or has none (`SessionLost`), or its deadline passed
/// with no newer keep-alive acknowledged (`LeaseDeadline`). Purely local.
pub(super) async fn lease_lost(
    mut leases: watch::Receiver<Option<Lease>>,
    lease_id: i64,
) -> LostReason {
    loop {
        let deadline = match *leases.borrow_and_update() {
            Some(l) if l.id == lease_id => l.expires,
            _ => return LostReason::SessionLost,
        };
        tokio::select! {
            biased;
            changed = leases.changed() => {
                if changed.is_err() {
                    return LostReason::SessionLost;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                // A newer deadline may have been published at the same moment.
                let lease = *leases.borrow_and_update();
                if crate::session::live_deadline(lease, lease_id).is_some() {
                    continue;
                }
                return match lease {
                    Some(l) if l.id == lease_id => LostReason::LeaseDeadline,
                    _ => LostReason::SessionLost,
                };
            }
        }
    }
}

/// Where a member stands in the queue, as one transaction read it.
pub(super) enum Place {
    /// `key` is the newest key created before ours; read at `rev`.
    Behind { key: Vec<u8>, rev: i64 },
    /// At `rev` no key older than ours was left and ours was still ours.
    First { rev: i64 },
    /// Nobody was ahead, but our key was deleted or replaced.
    Lost(LostReason),
}

/// Reads, in one transaction and so at one revision, the newest key under
/// `prefix` created before `token` and our own `key`. One round trip decides
/// the head: the two reads one after the other cost a second round trip on
/// every handover, and were made at two revisions.
pub(super) async fn place(inner: &Core, prefix: &str, key: &str, token: i64) -> Result<Place> {
    let resp = inner
        .conn
        .retry_on("get", prefix, |mut c| {
            let ahead = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(token - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let txn = Txn::new().and_then([TxnOp::get(prefix, Some(ahead)), TxnOp::get(key, None)]);
            async move { c.txn(txn).await }
        })
        .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut reads = resp.op_responses().into_iter().map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    });
    let (ahead, own) = (reads.next().flatten(), reads.next().flatten());
    // Our key decides only once nobody is ahead, as it did when it was read
    // after the wait: a member behind others whose key went (its lease
    // revoked, say) keeps waiting until `on_lease` reports the lost session.
    // A missing answer reads as a missing key: never as a way to the head.
    Ok(match (ahead, own) {
        (Some(ahead), _) => Place::Behind {
            key: ahead.key().to_vec(),
            rev,
        },
        (None, None) => Place::Lost(LostReason::KeyDeleted),
        (None, Some(kv)) if kv.create_revision() != token => Place::Lost(LostReason::KeyReplaced),
        (None, Some(_)) => Place::First { rev },
    })
}

/// Go's `waitDeletes`: waits until no key under `prefix` has a create revision
/// below `token`, by watching the newest such key until it is deleted, and
/// returns the revision at which that was read with `key` still ours (or why
/// it was not). Keys older than ours can only go, never come back (a key
/// written again gets a new create revision), so the head stays the head.
pub(super) async fn wait_deletes(
    inner: &Core,
    prefix: &str,
    key: &str,
    token: i64,
) -> Result<std::result::Result<i64, LostReason>> {
    let mut retry = Retry::standard(format!("waiting in queue {prefix}"));
    loop {
        let (ahead, rev) = match place(inner, prefix, key, token).await {
            Ok(Place::Behind { key, rev }) => (key, rev),
            Ok(Place::First { rev }) => return Ok(Ok(rev)),
            Ok(Place::Lost(reason)) => return Ok(Err(reason)),
            Err(error) if error.is_final() || matches!(error, Error::Closed) => return Err(error),
            Err(error) => {
                let error = format!("reading the members ahead: {error}");
                if !retry.failed(&inner.cancel, &error).await {
                    return Err(Error::Closed);
                }
                continue;
            }
        };
        tracing::debug!(predecessor = %String::from_utf8_lossy(&ahead), "waiting for the member ahead to go");
        match wait_delete(inner, ahead, rev).await {
            Ok(()) => retry.succeeded(),
            Err(error) if error.is_final() || matches!(error, Error::Closed) => return Err(error),
            Err(error) => {
                let error = format!("watching the member ahead: {error}");
                if !retry.failed(&inner.cancel, &error).await {
                    return Err(Error::Closed);
                }
            }
        }
    }
}

/// Waits until `key` is deleted after revision `rev`, through the
/// resumable watch (progress, stale checks, resume from the last revision
/// seen). Returns as well when the history it followed is gone (compacted,
/// etcd wiped): the caller reads the queue again either way.
pub(super) async fn wait_delete(inner: &Core, key: Vec<u8>, rev: i64) -> Result<()> {
    let key = String::from_utf8_lossy(&key).into_owned();
    let mut stream = inner.stream(vec![key], false, "queue");
    stream.start_at(rev + 1);
    loop {
        match stream.next().await? {
            Item::Events(events) => {
                if events.iter().any(|e| e.event_type() == EventType::Delete) {
                    return Ok(());
                }
            }
            // Broken, compacted or another history: the caller reads the queue again.
            Item::Interrupted | Item::Reset(_) => return Ok(()),
        }
    }
}

/// The per-head task: resolves `lost` at the lease deadline, when the lease
/// changes, when our key goes, or when the registry closes. After a deadline
/// it keeps trying to delete the key, which would otherwise hold the queue
/// if the lease survived the outage.
#[allow(clippy::too_many_arguments)]
pub(super) async fn monitor(
    inner: Core,
    key: String,
    lease_id: i64,
    token: i64,
    checked_rev: i64,
    lost: Arc<watch::Sender<Option<LostReason>>>,
    released: Arc<AtomicBool>,
    slot: Arc<KeySlot>,
) {
    let mut lost_rx = lost.subscribe();
    let reason = tokio::select! {
        biased;
        _ = inner.cancel.cancelled() => LostReason::Closed,
        _ = lost_rx.wait_for(Option::is_some) => return, // left, or proclaim saw the loss
        reason = lease_lost(inner.session.leases(), lease_id) => reason,
        reason = watch_own_key(&inner, &key, token, checked_rev) => reason,
    };
    if set_lost(&lost, reason) {
        tracing::warn!(key = %key, fencing_token = token, %reason, "lost the head of the queue");
    }
    match reason {
        LostReason::KeyDeleted | LostReason::KeyReplaced | LostReason::SessionLost => {
            released.store(true, Ordering::SeqCst);
        }
        LostReason::LeaseDeadline => {
            release_key(&inner, &key, Some(token), lease_id).await;
            released.store(true, Ordering::SeqCst);
        }
        LostReason::Resigned | LostReason::Released | LostReason::Closed => {}
    }
    drop(slot);
}

/// Resolves when our key is deleted or replaced, through the resumable
/// watch; when the history it followed is gone, the key is read again.
pub(super) async fn watch_own_key(
    inner: &Core,
    key: &str,
    token: i64,
    checked_rev: i64,
) -> LostReason {
    let mut stream = inner.stream(vec![key.to_owned()], false, "queue key");
    stream.start_at(checked_rev + 1);
    loop {
        match stream.next().await {
            Err(Error::Closed) => return LostReason::Closed,
            Err(error) => {
                // Only a refusal ends the stream; the lease deadline still bounds the head.
                tracing::error!(key, %error, "cannot watch the queue key; the lease deadline alone bounds this head");
                return std::future::pending().await;
            }
            Ok(Item::Events(events)) => {
                for event in events {
                    let Some(kv) = event.kv() else { continue };
                    if event.event_type() == EventType::Delete {
                        return LostReason::KeyDeleted;
                    }
                    if kv.create_revision() != token {
                        return LostReason::KeyReplaced;
                    }
                }
            }
            // Broken, compacted or another history: read the key again.
            Ok(Item::Interrupted | Item::Reset(_)) => {
                let read = crate::backoff::retry_transient(
                    &inner.cancel,
                    "re-reading the queue key",
                    || stream_read_key(inner, key),
                )
                .await;
                match read {
                    Ok((_, None)) => return LostReason::KeyDeleted,
                    Ok((_, Some(kv))) if kv.create_revision() != token => {
                        return LostReason::KeyReplaced;
                    }
                    Ok((rev, Some(_))) => stream.start_at(rev + 1),
                    Err(Error::Closed) => return LostReason::Closed,
                    Err(error) => {
                        tracing::error!(key, %error, "cannot read the queue key; the lease deadline alone bounds this head");
                        return std::future::pending().await;
                    }
                }
            }
        }
    }
}

/// Reads `key`: the revision and the key, if present.
async fn stream_read_key(inner: &Core, key: &str) -> Result<(i64, Option<KeyValue>)> {
    let mut resp = inner
        .conn
        .retry_on("get", key, |mut c| {
            let key = key.to_owned();
            async move { c.get(key, None).await }
        })
        .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    Ok((rev, resp.take_kvs().into_iter().next()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lost_reasons_read_well() {
        assert_eq!(LostReason::Resigned.to_string(), "resigned");
        let e = Error::NotLeader(LostReason::KeyDeleted);
        assert_eq!(
            e.to_string(),
            "leadership was lost: the leader key was deleted"
        );
        let e = Kind::Lock.lost_error(LostReason::KeyDeleted);
        assert_eq!(e.to_string(), "the lock was lost: the lock key was deleted");
        let e = Kind::Lock.lost_error(LostReason::LeaseDeadline);
        assert_eq!(
            e.to_string(),
            "the lock was lost: no keep-alive was acknowledged before the lease deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lease_deadline_fires_without_etcd_and_is_rearmed_by_keep_alives() {
        let start = Instant::now();
        let (tx, rx) = watch::channel(Some(Lease {
            id: 7,
            expires: start + Duration::from_secs(2),
        }));
        let lost = tokio::spawn(lease_lost(rx, 7));
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send_replace(Some(Lease {
            id: 7,
            expires: start + Duration::from_secs(5),
        }));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !lost.is_finished(),
            "a newer deadline must re-arm the timer"
        );
        assert_eq!(lost.await.ok(), Some(LostReason::LeaseDeadline));
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
    }

    // Pins the deadline arithmetic: with the margin set to zero, or with the
    // deadline counted from the answer's arrival, this fails (checked by hand).
    // The integration test `a_leader_behind_slow_answers_stops_before_the_server_deadline`
    // (tests/safety.rs) pins that the session passes the send time in.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_send_time_minus_a_margin() {
        let ttl = Duration::from_secs(3);
        let sent = Instant::now();
        // The answer arrives one second after the keep-alive was sent.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let expires = crate::session::lease_deadline(sent, 3, ttl);
        let server_deadline = sent + ttl;
        assert!(
            server_deadline - expires >= Duration::from_millis(250),
            "the margin must be at least 250 ms, it is {:?}",
            server_deadline - expires
        );
        assert_eq!(expires, sent + ttl - Duration::from_millis(310));
        let (_tx, rx) = watch::channel(Some(Lease { id: 7, expires }));
        assert_eq!(lease_lost(rx, 7).await, LostReason::LeaseDeadline);
        assert!(Instant::now() < server_deadline);
        assert_eq!(Instant::now(), sent + Duration::from_millis(2690));
        // A TTL etcd reports as expired gives no time at all.
        assert!(crate::session::lease_deadline(Instant::now(), -1, ttl) <= Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_lease_id_is_a_lost_session() {
        let now = Instant::now();
        let (tx, rx) = watch::channel(Some(Lease {
            id: 7,
            expires: now + Duration::from_secs(60),
        }));
        let lost = tokio::spawn(lease_lost(rx, 7));
        tx.send_replace(Some(Lease {
            id: 8,
            expires: now + Duration::from_secs(60),
        }));
        assert_eq!(lost.await.ok(), Some(LostReason::SessionLost));
        let (_tx, rx) = watch::channel(None);
        assert_eq!(lease_lost(rx, 7).await, LostReason::SessionLost);
    }

    #[test]
    fn a_taken_slot_is_not_waited_for_by_a_try() {
        let slots = Slots::default();
        let held = KeySlot::try_acquire(&slots, "k".into());
        assert!(held.is_some());
        assert!(KeySlot::try_acquire(&slots, "k".into()).is_none());
        assert!(KeySlot::try_acquire(&slots, "other".into()).is_some());
        drop(held);
        assert!(KeySlot::try_acquire(&slots, "k".into()).is_some());
        assert!(
            slots.lock().unwrap().is_empty(),
            "unused slots are forgotten"
        );
    }
}
