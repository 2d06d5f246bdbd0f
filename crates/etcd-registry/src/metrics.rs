//! Metrics through the [`metrics`](https://docs.rs/metrics/0.24) facade,
//! major version **0.24** (cargo feature `metrics`).
//!
//! The library only records; the application installs a recorder of the
//! same major version of `metrics` (a recorder built on another major
//! version does not see these metrics), for example
//! `metrics-exporter-prometheus`, as the `etcd-registry` command line does
//! with `--metrics-addr`. Without a recorder a metric costs about one atomic
//! load. Without the feature nothing is recorded and no `metrics` crate is
//! compiled.
//!
//! Every metric has a `namespace` label (the registry's namespace); watch and
//! cache metrics add `service` (`*` for a watch or cache of the whole
//! namespace) and election metrics add `election`. No label carries an
//! instance id or a lease id, so the number of series stays bounded by the
//! number of namespaces, services and elections a process uses. Two
//! registries of one process in the same namespace share their series.
//!
//! | metric | kind | labels | meaning |
//! |---|---|---|---|
//! | [`STATE`] | gauge | `namespace` | 0 connecting, 1 active, 2 degraded, 3 recovering, 4 closed |
//! | [`KEEPALIVE_TOTAL`] | counter | `namespace` | keep-alives acknowledged by etcd |
//! | [`KEEPALIVE_FAILURES_TOTAL`] | counter | `namespace` | keep-alive attempts that failed (stream broken, no answer in time) |
//! | [`LEASE_RECOVERIES_TOTAL`] | counter | `namespace` | leases granted again after the lease was lost |
//! | [`LEASE_DEADLINE_SECONDS`] | gauge | `namespace` | time left, at the last keep-alive answer or failure, before etcd could expire the lease; 0 once it is lost |
//! | [`REGISTRATIONS`] | gauge | `namespace` | registrations the registry maintains |
//! | [`RESTORES_TOTAL`] | counter | `namespace`, `service` | keys restored by anti-entropy after someone else deleted or overwrote them |
//! | [`WATCH_RESTARTS_TOTAL`] | counter | `namespace`, `service`, `cause` | watch restarts; `cause` is `broken`, `compacted`, `stale` or `wiped` |
//! | [`WATCH_EVENTS_TOTAL`] | counter | `namespace`, `service`, `kind` | events delivered; `kind` is `snapshot`, `added`, `updated` or `removed` |
//! | [`CACHE_INSTANCES`] | gauge | `namespace`, `service` | instances in a cache |
//! | [`CACHE_STALENESS_SECONDS`] | gauge | `namespace`, `service` | time since the cache's watch last heard from etcd (an event or a progress report); updated every second |
//! | [`LEADER`] | gauge | `namespace`, `election` | 1 while this process leads the election |
//! | [`LEADERSHIP_LOST_TOTAL`] | counter | `namespace`, `election`, `reason` | leaderships that ended; `reason` is `resigned`, `key_deleted`, `key_replaced`, `lease_deadline`, `session_lost`, `closed` or `dropped` |
//! | [`HEALTH_CHECKS_TOTAL`] | counter | `namespace`, `service`, `result` | health checks run by [`register_checked`](crate::Registry::register_checked); `result` is `pass` or `fail` (a timeout is a `fail`) |
//! | [`HEALTH_TRANSITIONS_TOTAL`] | counter | `namespace`, `service`, `state` | checked registrations that turned `healthy` (key put back) or `unhealthy` (key taken out) |
//! | [`REQUEST_DURATION_SECONDS`] | histogram | `namespace`, `operation` | duration of the public operations: `register`, `update`, `deregister`, `list`, `delete`, `cache`, `campaign`, `resign`, `leader`, `lock` (any acquire), `unlock`, `close` |

#[cfg(feature = "metrics")]
use ::metrics::{counter, gauge, histogram};
#[cfg(feature = "metrics")]
use tokio::sync::watch;

use crate::error::LostReason;

/// `etcd_registry_state`: the [`RegistryState`](crate::RegistryState) as a number.
#[cfg(feature = "metrics")]
pub const STATE: &str = "etcd_registry_state";
/// `etcd_registry_keepalive_total`: acknowledged keep-alives.
#[cfg(feature = "metrics")]
pub const KEEPALIVE_TOTAL: &str = "etcd_registry_keepalive_total";
/// `etcd_registry_keepalive_failures_total`: failed keep-alives.
#[cfg(feature = "metrics")]
pub const KEEPALIVE_FAILURES_TOTAL: &str = "etcd_registry_keepalive_failures_total";
/// `etcd_registry_lease_recoveries_total`: leases re-granted after a loss.
#[cfg(feature = "metrics")]
pub const LEASE_RECOVERIES_TOTAL: &str = "etcd_registry_lease_recoveries_total";
/// `etcd_registry_lease_deadline_seconds`: time left before etcd could expire the lease.
#[cfg(feature = "metrics")]
pub const LEASE_DEADLINE_SECONDS: &str = "etcd_registry_lease_deadline_seconds";
/// `etcd_registry_registrations`: live registrations.
#[cfg(feature = "metrics")]
pub const REGISTRATIONS: &str = "etcd_registry_registrations";
/// `etcd_registry_restores_total`: keys restored by anti-entropy.
#[cfg(feature = "metrics")]
pub const RESTORES_TOTAL: &str = "etcd_registry_restores_total";
/// `etcd_registry_watch_restarts_total`: watch restarts by cause.
#[cfg(feature = "metrics")]
pub const WATCH_RESTARTS_TOTAL: &str = "etcd_registry_watch_restarts_total";
/// `etcd_registry_watch_events_total`: delivered watch events by kind.
#[cfg(feature = "metrics")]
pub const WATCH_EVENTS_TOTAL: &str = "etcd_registry_watch_events_total";
/// `etcd_registry_cache_instances`: instances per cached service.
#[cfg(feature = "metrics")]
pub const CACHE_INSTANCES: &str = "etcd_registry_cache_instances";
/// `etcd_registry_cache_staleness_seconds`: time since a cache last heard from etcd.
#[cfg(feature = "metrics")]
pub const CACHE_STALENESS_SECONDS: &str = "etcd_registry_cache_staleness_seconds";
/// `etcd_registry_health_checks_total`: health checks run, by result.
#[cfg(feature = "metrics")]
pub const HEALTH_CHECKS_TOTAL: &str = "etcd_registry_health_checks_total";
/// `etcd_registry_health_transitions_total`: health state changes, by new state.
#[cfg(feature = "metrics")]
pub const HEALTH_TRANSITIONS_TOTAL: &str = "etcd_registry_health_transitions_total";
/// `etcd_registry_leader`: 1 while this process leads an election.
#[cfg(feature = "metrics")]
pub const LEADER: &str = "etcd_registry_leader";
/// `etcd_registry_leadership_lost_total`: ended leaderships by reason.
#[cfg(feature = "metrics")]
pub const LEADERSHIP_LOST_TOTAL: &str = "etcd_registry_leadership_lost_total";
/// `etcd_registry_request_duration_seconds`: public operations' durations.
#[cfg(feature = "metrics")]
pub const REQUEST_DURATION_SECONDS: &str = "etcd_registry_request_duration_seconds";

/// Why a watch restarted: the `cause` label of [`WATCH_RESTARTS_TOTAL`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Restart {
    /// The stream failed or could not be opened.
    Broken,
    /// The revision to resume from was compacted.
    Compacted,
    /// Nothing (no event, no progress report) arrived for too long.
    Stale,
    /// etcd's history differs from what was seen (wiped, replaced, restored).
    Wiped,
}

#[cfg(feature = "metrics")]
impl Restart {
    fn label(self) -> &'static str {
        match self {
            Restart::Broken => "broken",
            Restart::Compacted => "compacted",
            Restart::Stale => "stale",
            Restart::Wiped => "wiped",
        }
    }
}

/// A state change of the session.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
/// `code` is 0 connecting, 1 active, 2 degraded, 3 recovering, 4 closed.
pub(crate) fn state(namespace: &str, code: u8) {
    #[cfg(feature = "metrics")]
    {
        gauge!(STATE, "namespace" => namespace.to_owned()).set(f64::from(code));
        if code >= 3 {
            gauge!(LEASE_DEADLINE_SECONDS, "namespace" => namespace.to_owned()).set(0.0);
        }
    }
}

/// A keep-alive answered (`ok`) or failed; `expires` is the lease's current
/// deadline (after the answer, or the one still in force after a failure).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn keep_alive(namespace: &str, ok: bool, expires: Option<tokio::time::Instant>) {
    #[cfg(feature = "metrics")]
    {
        let name = if ok {
            KEEPALIVE_TOTAL
        } else {
            KEEPALIVE_FAILURES_TOTAL
        };
        counter!(name, "namespace" => namespace.to_owned()).increment(1);
        if let Some(expires) = expires {
            let left = expires.saturating_duration_since(tokio::time::Instant::now());
            gauge!(LEASE_DEADLINE_SECONDS, "namespace" => namespace.to_owned())
                .set(left.as_secs_f64());
        }
    }
}

/// A lease granted again after the previous one was lost.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn lease_recovered(namespace: &str) {
    #[cfg(feature = "metrics")]
    counter!(LEASE_RECOVERIES_TOTAL, "namespace" => namespace.to_owned()).increment(1);
}

/// The number of registrations maintained now.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn registrations(namespace: &str, count: usize) {
    #[cfg(feature = "metrics")]
    gauge!(REGISTRATIONS, "namespace" => namespace.to_owned()).set(count as f64);
}

/// One health check of a registration of `service`, and whether it changed
/// the registration's state (`Some(true)`: now healthy).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn health_check(
    namespace: &str,
    service: &str,
    passed: bool,
    now_healthy: Option<bool>,
) {
    #[cfg(feature = "metrics")]
    {
        let result = if passed { "pass" } else { "fail" };
        counter!(HEALTH_CHECKS_TOTAL, "namespace" => namespace.to_owned(), "service" => service.to_owned(), "result" => result)
            .increment(1);
        if let Some(healthy) = now_healthy {
            let state = if healthy { "healthy" } else { "unhealthy" };
            counter!(HEALTH_TRANSITIONS_TOTAL, "namespace" => namespace.to_owned(), "service" => service.to_owned(), "state" => state)
                .increment(1);
        }
    }
}

/// A key of `service` restored by anti-entropy.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn restored(namespace: &str, service: &str) {
    #[cfg(feature = "metrics")]
    counter!(RESTORES_TOTAL, "namespace" => namespace.to_owned(), "service" => service.to_owned())
        .increment(1);
}

/// A watch of `service` (`*`: the namespace) restarting.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn watch_restart(namespace: &str, service: &str, cause: Restart) {
    #[cfg(feature = "metrics")]
    counter!(
        WATCH_RESTARTS_TOTAL,
        "namespace" => namespace.to_owned(),
        "service" => service.to_owned(),
        "cause" => cause.label()
    )
    .increment(1);
}

/// Events of a watch of `service` handed to its consumer, counted as
/// snapshots, additions, updates and removals.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn watch_events(namespace: &str, service: &str, counts: [u64; 4]) {
    #[cfg(feature = "metrics")]
    {
        for (kind, n) in ["snapshot", "added", "updated", "removed"]
            .into_iter()
            .zip(counts)
        {
            if n > 0 {
                counter!(
                    WATCH_EVENTS_TOTAL,
                    "namespace" => namespace.to_owned(),
                    "service" => service.to_owned(),
                    "kind" => kind
                )
                .increment(n);
            }
        }
    }
}

/// The number of instances a cache of `service` holds now.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn cache_instances(namespace: &str, service: &str, count: usize) {
    #[cfg(feature = "metrics")]
    gauge!(CACHE_INSTANCES, "namespace" => namespace.to_owned(), "service" => service.to_owned())
        .set(count as f64);
}

/// When a watch last heard from etcd; read by the staleness gauge of the
/// cache the watch feeds. Without the feature it holds nothing.
#[derive(Clone, Default)]
pub(crate) struct Heard {
    #[cfg(feature = "metrics")]
    at: std::sync::Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl Heard {
    /// Something (an event, a progress report, a read) arrived from etcd now.
    pub(crate) fn now(&self) {
        #[cfg(feature = "metrics")]
        if let Ok(mut at) = self.at.lock() {
            *at = Some(tokio::time::Instant::now());
        }
    }
}

/// Spawns the task that sets the staleness gauge of a cache of `service`
/// every second from `heard`, until `stop` (the cache is gone) or `closed`
/// (the registry closed) is cancelled. Without the feature it spawns nothing.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn track_cache_staleness(
    namespace: &str,
    service: &str,
    heard: &Heard,
    stop: &tokio_util::sync::CancellationToken,
    closed: &tokio_util::sync::CancellationToken,
) {
    #[cfg(feature = "metrics")]
    {
        let gauge = gauge!(
            CACHE_STALENESS_SECONDS,
            "namespace" => namespace.to_owned(),
            "service" => service.to_owned()
        );
        let (heard, stop, closed) = (heard.clone(), stop.clone(), closed.clone());
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = closed.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Before the first answer, the cache has been waiting since it started.
                let at = heard.at.lock().ok().and_then(|at| *at).unwrap_or(started);
                gauge.set(at.elapsed().as_secs_f64());
            }
        });
    }
}

/// For the head of an election queue (locks have no such metrics): keeps the
/// leader gauge of `election` at 1 from now until `lost` resolves (or its
/// sender is dropped: the leadership was dropped without a reason), then
/// counts the loss by reason. Without the feature it spawns nothing.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn track_leadership(
    namespace: &str,
    election: &str,
    lost: &tokio::sync::watch::Receiver<Option<LostReason>>,
) {
    #[cfg(feature = "metrics")]
    {
        let (ns, el) = (namespace.to_owned(), election.to_owned());
        let leader = gauge!(LEADER, "namespace" => ns.clone(), "election" => el.clone());
        leader.increment(1.0);
        let mut lost: watch::Receiver<Option<LostReason>> = lost.clone();
        tokio::spawn(async move {
            let reason = match lost.wait_for(Option::is_some).await {
                Ok(reason) => reason.map_or("dropped", lost_label),
                Err(_) => "dropped",
            };
            leader.decrement(1.0);
            counter!(LEADERSHIP_LOST_TOTAL, "namespace" => ns, "election" => el, "reason" => reason)
                .increment(1);
        });
    }
}

#[cfg(feature = "metrics")]
fn lost_label(reason: LostReason) -> &'static str {
    match reason {
        LostReason::Resigned => "resigned",
        LostReason::Released => "released",
        LostReason::KeyDeleted => "key_deleted",
        LostReason::KeyReplaced => "key_replaced",
        LostReason::LeaseDeadline => "lease_deadline",
        LostReason::SessionLost => "session_lost",
        LostReason::Closed => "closed",
    }
}

/// Records the time from its creation to its drop as the duration of
/// `operation`, whether the operation succeeded, failed or was cancelled.
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    start: std::time::Instant,
    #[cfg(feature = "metrics")]
    histogram: ::metrics::Histogram,
}

/// Starts timing `operation` (see [`REQUEST_DURATION_SECONDS`] for the names);
/// keep the guard alive for the whole operation: `let _timer = timer(..);`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn timer(namespace: &str, operation: &'static str) -> Timer {
    Timer {
        #[cfg(feature = "metrics")]
        start: std::time::Instant::now(),
        #[cfg(feature = "metrics")]
        histogram: histogram!(
            REQUEST_DURATION_SECONDS,
            "namespace" => namespace.to_owned(),
            "operation" => operation
        ),
    }
}

#[cfg(feature = "metrics")]
impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.record(self.start.elapsed().as_secs_f64());
    }
}
