//! The registry's one lease: grant, keep-alive, loss detection, re-grant, state.
//!
//! One background task owns the lease. Everything else reads it through a
//! [`tokio::sync::watch`] channel of [`Lease`] values and is told when it
//! changes; whoever keeps keys under the lease reacts to a new one itself
//! (there is no callback from here upward). Keep-alive runs on a new lease
//! from the moment it is granted, whatever else is going on. The task publishes a fresh [`Lease::expires`] after every
//! acknowledged keep-alive: the local instant by which the server may have let
//! the lease expire, which elections use to step down before anyone else can win.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Retry, cancellable};
use crate::conn::Conn;
use crate::error::{Error, Result};

/// What a [`Registry`](crate::Registry) is doing with its lease.
///
/// Read it with [`Registry::state`](crate::Registry::state). Every transition
/// is logged through `tracing` with the lease id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryState {
    /// Connecting to etcd and granting the first lease.
    Connecting,
    /// The lease is alive and every registration is in etcd.
    Active {
        /// The current lease.
        lease_id: i64,
    },
    /// Keep-alives are failing; the lease may still live. Registrations are
    /// kept; if the lease turns out to be gone, the state moves to `Recovering`.
    Degraded {
        /// The lease being kept alive.
        lease_id: i64,
    },
    /// The lease is gone; a new one is being granted and every registration
    /// re-put (keep-alive already runs on the new lease meanwhile).
    Recovering,
    /// `close()` was called or the registry was dropped.
    Closed,
}

/// A lease as the rest of the crate sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) id: i64,
    /// Local instant by which the server may have expired the lease: the send
    /// time of the last acknowledged keep-alive (or grant) plus the TTL, minus
    /// a safety margin. Assumes clocks here and on the server run at the same rate.
    pub(crate) expires: Instant,
}

impl Lease {
    /// Whether its local deadline is still ahead.
    pub(crate) fn is_live(&self) -> bool {
        self.expires > Instant::now()
    }
}

/// The deadline of lease `id` if `lease` is that lease and still live: the
/// one comparison every holder of a lease (queue heads, promotions, lost()
/// monitors) makes.
pub(crate) fn live_deadline(lease: Option<Lease>, id: i64) -> Option<Instant> {
    lease
        .filter(|l| l.id == id && l.is_live())
        .map(|l| l.expires)
}

/// The safety margin taken off every lease deadline: 250 ms plus 2% of the TTL.
pub(crate) fn safety_margin(ttl: Duration) -> Duration {
    Duration::from_millis(250) + ttl / 50
}

/// [`Lease::expires`] for a grant or keep-alive sent at `sent` and answered
/// with `granted_secs`. Counted from the send time, never from the answer's
/// arrival: etcd may have refreshed the lease at any moment after the send,
/// and an answer that comes late (slow network, stalled etcd) must not
/// stretch the deadline past the server's.
pub(crate) fn lease_deadline(sent: Instant, granted_secs: i64, ttl: Duration) -> Instant {
    sent + Duration::from_secs(granted_secs.max(0) as u64) - safety_margin(ttl)
}

/// Shared lease bookkeeping. Written only by the session task (and by
/// `close`); read by registrations, watches and elections.
pub(crate) struct Session {
    lease_tx: watch::Sender<Option<Lease>>,
    state_tx: watch::Sender<RegistryState>,
    /// Woken when someone saw "lease not found": the task checks at once
    /// instead of waiting for the next keep-alive tick.
    suspect: Notify,
    /// Leases this registry has held, newest last (a few are enough to tell
    /// our own old keys from another registry's).
    owned: Mutex<VecDeque<i64>>,
    ttl: Duration,
    /// The lease whose keys are all back in etcd (0: none yet). The state is
    /// `Active` only while the current lease is this one.
    restored: AtomicI64,
    /// The registry's namespace: the `namespace` label of its metrics.
    pub(crate) namespace: String,
}

impl RegistryState {
    /// The code of the `etcd_registry_state` metric.
    fn code(self) -> u8 {
        match self {
            RegistryState::Connecting => 0,
            RegistryState::Active { .. } => 1,
            RegistryState::Degraded { .. } => 2,
            RegistryState::Recovering => 3,
            RegistryState::Closed => 4,
        }
    }
}

impl Session {
    pub(crate) fn new(ttl: Duration, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            lease_tx: watch::Sender::new(None),
            state_tx: watch::Sender::new(RegistryState::Connecting),
            suspect: Notify::new(),
            owned: Mutex::new(VecDeque::new()),
            ttl,
            restored: AtomicI64::new(0),
        }
    }

    pub(crate) fn state(&self) -> watch::Receiver<RegistryState> {
        self.state_tx.subscribe()
    }

    pub(crate) fn leases(&self) -> watch::Receiver<Option<Lease>> {
        self.lease_tx.subscribe()
    }

    /// The current lease, if there is one.
    pub(crate) fn lease(&self) -> Option<Lease> {
        *self.lease_tx.borrow()
    }

    pub(crate) fn is_owned(&self, lease_id: i64) -> bool {
        self.owned.lock().is_ok_and(|o| o.contains(&lease_id))
    }

    /// Tells the task that a request saw the lease missing.
    pub(crate) fn suspect_lost(&self) {
        self.suspect.notify_one();
    }

    /// Waits until there is a lease, up to `timeout`; `Closed` once cancelled.
    pub(crate) async fn wait_lease(
        &self,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Lease> {
        let mut rx = self.leases();
        let wait = rx.wait_for(Option::is_some);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(Error::Closed),
            r = tokio::time::timeout(timeout, wait) => match r {
                Ok(Ok(lease)) => lease.ok_or(Error::SessionLost),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => Err(Error::Timeout { op: "wait for a lease", after: timeout }),
            },
        }
    }

    fn set_state(&self, state: RegistryState) {
        let changed = self.state_tx.send_if_modified(|s| {
            if *s == state || *s == RegistryState::Closed {
                return false;
            }
            *s = state;
            true
        });
        if changed {
            crate::metrics::state(&self.namespace, state.code());
            match state {
                RegistryState::Active { lease_id } => {
                    tracing::info!(lease = %format_args!("{lease_id:x}"), "registry state: active")
                }
                RegistryState::Degraded { lease_id } => {
                    tracing::warn!(lease = %format_args!("{lease_id:x}"), "registry state: degraded (keep-alives failing)")
                }
                RegistryState::Recovering => {
                    tracing::warn!(lost_lease = %self.lease_hex(), "registry state: recovering (lease lost)")
                }
                RegistryState::Closed => {
                    tracing::info!(lease = %self.lease_hex(), "registry state: closed")
                }
                RegistryState::Connecting => tracing::info!("registry state: connecting"),
            }
        }
    }

    fn lease_hex(&self) -> String {
        self.lease()
            .map_or_else(|| "none".to_owned(), |l| format!("{:x}", l.id))
    }

    fn publish(&self, lease: Option<Lease>) {
        if let Some(l) = lease
            && let Ok(mut owned) = self.owned.lock()
            && !owned.contains(&l.id)
        {
            owned.push_back(l.id);
            if owned.len() > 16 {
                owned.pop_front();
            }
        }
        self.lease_tx.send_replace(lease);
    }

    /// Marks the session closed: no lease, state `Closed`. Returns the lease
    /// that was current, for revocation.
    pub(crate) fn close(&self) -> Option<Lease> {
        self.set_state(RegistryState::Closed);
        self.lease_tx.send_replace(None)
    }

    /// Grants a lease. `expires` counts from before the request was sent.
    pub(crate) async fn grant(&self, conn: &Conn) -> Result<Lease> {
        let ttl = self.ttl.as_secs() as i64;
        let sent = Instant::now();
        let resp = conn
            .retry("lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        let lease = Lease {
            id: resp.id(),
            expires: lease_deadline(sent, resp.ttl(), self.ttl),
        };
        tracing::info!(lease = %format_args!("{:x}", lease.id), ttl = resp.ttl(), "lease granted");
        Ok(lease)
    }

    /// Installs the first lease (granted by `connect`, with nothing to
    /// restore under it) and marks the session active.
    pub(crate) fn start(&self, lease: Lease) {
        self.restored.store(lease.id, Ordering::SeqCst);
        self.publish(Some(lease));
        self.set_state(RegistryState::Active { lease_id: lease.id });
    }

    /// Told by the registrations once every key is back under `lease_id`:
    /// the state turns `Active` if that is still the current lease.
    pub(crate) fn mark_restored(&self, lease_id: i64) {
        self.restored.store(lease_id, Ordering::SeqCst);
        if self.lease().is_some_and(|l| l.id == lease_id) {
            self.set_state(RegistryState::Active { lease_id });
        }
    }

    /// The state a healthy keep-alive of `lease_id` stands for.
    fn healthy(&self, lease_id: i64) -> RegistryState {
        if self.restored.load(Ordering::SeqCst) == lease_id {
            RegistryState::Active { lease_id }
        } else {
            RegistryState::Recovering
        }
    }

    /// The lease's local deadline has passed with no newer keep-alive
    /// acknowledged: etcd may have let it expire. The one check of it.
    pub(crate) fn past_deadline(lease: &Lease) -> bool {
        lease.expires <= Instant::now()
    }
}

enum KeepAlive {
    /// etcd said the lease is gone (TTL <= 0).
    Lost,
    /// The stream failed; the lease may live.
    Broken(String),
    Cancelled,
}

/// The session task: keeps the lease alive, and on loss grants a new one
/// and publishes it, until cancelled. Keep-alive starts on a new lease at
/// once: restoring the keys under it is the registrations' job, beside it.
pub(crate) async fn run(session: std::sync::Arc<Session>, conn: Conn, cancel: CancellationToken) {
    let mut retry = Retry::standard("the lease (grant or keep-alive)");
    let mut current = session.lease();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match current {
            None => {
                session.set_state(RegistryState::Recovering);
                session.publish(None);
                match cancellable(&cancel, session.grant(&conn)).await {
                    None => return,
                    Some(Ok(lease)) => {
                        crate::metrics::lease_recovered(&session.namespace);
                        session.publish(Some(lease));
                        current = Some(lease);
                        retry.succeeded();
                    }
                    Some(Err(error)) => {
                        let error = format!("lease grant: {error}");
                        if !retry.failed(&cancel, &error).await {
                            return;
                        }
                    }
                }
            }
            Some(lease) => match keep_alive(&session, &conn, lease, &cancel, &mut retry).await {
                KeepAlive::Cancelled => return,
                KeepAlive::Lost => {
                    tracing::warn!(lease = %format_args!("{:x}", lease.id), "lease lost (expired, revoked or etcd wiped)");
                    current = None;
                }
                KeepAlive::Broken(reason) => {
                    crate::metrics::keep_alive(
                        &session.namespace,
                        false,
                        session.lease().map(|l| l.expires),
                    );
                    session.set_state(RegistryState::Degraded { lease_id: lease.id });
                    let error = format!(
                        "keep-alive stream of lease {:x} broken ({reason}); reopening",
                        lease.id
                    );
                    if !retry.failed(&cancel, &error).await {
                        return;
                    }
                }
            },
        }
    }
}

/// Keeps `lease` alive on one keep-alive stream: one request every TTL/3.
async fn keep_alive(
    session: &Session,
    conn: &Conn,
    mut lease: Lease,
    cancel: &CancellationToken,
    retry: &mut Retry,
) -> KeepAlive {
    let ttl = session.ttl;
    let period = ttl / 3;
    let open = async {
        let mut lc = conn.client().lease_client();
        tokio::time::timeout(conn.request_timeout(), lc.keep_alive(lease.id)).await
    };
    let (mut keeper, mut stream) = match cancellable(cancel, open).await {
        None => return KeepAlive::Cancelled,
        Some(Ok(Ok(pair))) => pair,
        Some(Ok(Err(e))) if crate::error::is_lease_not_found(&e) => return KeepAlive::Lost,
        Some(Ok(Err(e))) => return KeepAlive::Broken(e.to_string()),
        Some(Err(_)) => return KeepAlive::Broken("opening the keep-alive stream timed out".into()),
    };
    loop {
        let sent = Instant::now();
        if let Err(e) = keeper.keep_alive().await {
            return KeepAlive::Broken(e.to_string());
        }
        // A late answer still extends the lease (from its send time), so it
        // is worth waiting for until the current deadline: giving up after
        // one period would make a lease behind a slow link, whose answers
        // take longer than TTL/3, look lost while etcd keeps it alive.
        let patience = lease
            .expires
            .saturating_duration_since(sent)
            .max(period)
            .max(Duration::from_millis(500));
        let answer = tokio::time::timeout(patience, stream.message());
        match cancellable(cancel, answer).await {
            None => return KeepAlive::Cancelled,
            Some(Err(_)) => return KeepAlive::Broken("no keep-alive answer in time".into()),
            Some(Ok(Err(e))) => return KeepAlive::Broken(e.to_string()),
            Some(Ok(Ok(None))) => return KeepAlive::Broken("keep-alive stream ended".into()),
            Some(Ok(Ok(Some(resp)))) if resp.ttl() <= 0 => return KeepAlive::Lost,
            Some(Ok(Ok(Some(resp)))) => {
                lease.expires = lease_deadline(sent, resp.ttl(), ttl);
                session.publish(Some(lease));
                crate::metrics::keep_alive(&session.namespace, true, Some(lease.expires));
                session.set_state(session.healthy(lease.id));
                retry.succeeded();
            }
        }
        // Between ticks, keep reading the stream: a broken connection (etcd
        // restarted, member lost) shows up here at once, not at the next tick.
        // Ticks are a period apart from send to send: counting the period
        // from the answer would space keep-alives by period + latency, and a
        // latency above TTL/3 would then let the deadline pass between them.
        tokio::select! {
            _ = cancel.cancelled() => return KeepAlive::Cancelled,
            _ = tokio::time::sleep_until(sent + period) => {}
            _ = session.suspect.notified() => {
                tracing::debug!(lease = %format_args!("{:x}", lease.id), "lease reported missing; checking now");
            }
            msg = stream.message() => match msg {
                Err(e) => return KeepAlive::Broken(e.to_string()),
                Ok(None) => return KeepAlive::Broken("keep-alive stream ended".into()),
                Ok(Some(resp)) if resp.ttl() <= 0 => return KeepAlive::Lost,
                Ok(Some(_)) => {}
            },
        }
    }
}
