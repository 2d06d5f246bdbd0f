//! Health checks that gate a registration: an instance is in etcd only while
//! it is healthy.
//!
//! A lease proves that a process is alive, not that it can serve. With
//! [`Registry::register_checked`](crate::Registry::register_checked), a
//! [`HealthCheck`] runs every [`HealthPolicy::interval`] on a task of its
//! own; the instance's key is deleted after [`fall`](HealthPolicy::fall)
//! failures in a row and put back after [`rise`](HealthPolicy::rise) passes.
//! While it is out, nothing the registry does on its own (anti-entropy,
//! recovery after a lost lease or a wiped etcd) puts it back.
//!
//! The built-in checks are functions of this module, not associated
//! functions of the trait, because a trait cannot name the concrete type
//! such a constructor returns: [`http()`], [`tcp`], [`grpc`] (cargo feature
//! `grpc-health`) and [`from_fn`]. Any type can be a check by implementing
//! [`HealthCheck`].
//!
//! ```no_run
//! # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
//! use std::time::Duration;
//! use etcd_registry::{HealthPolicy, ServiceInstance, health};
//!
//! let reg = registry
//!     .register_checked(
//!         ServiceInstance::new("web", "web-1", "10.0.0.7", 8080),
//!         health::http("http://127.0.0.1:8080/healthz")?,
//!         HealthPolicy::new().interval(Duration::from_secs(5)).fall(2),
//!     )
//!     .await?;
//! let mut health = reg.health();
//! while health.changed().await.is_ok() {
//!     println!("web-1 is {:?}", health.borrow().state);
//! }
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// A health check: `Ok(())` is a pass, `Err(text)` a failure saying why.
///
/// The registry puts every call under [`HealthPolicy::timeout`]: a check
/// that takes longer is dropped and counts as a failure. Checks of different
/// registrations run on tasks of their own and never wait for each other,
/// but a check must not block its thread (use async I/O, or
/// `tokio::task::spawn_blocking` inside it).
///
/// ```
/// use etcd_registry::HealthCheck;
///
/// struct DiskNotFull;
///
/// impl HealthCheck for DiskNotFull {
///     async fn check(&self) -> Result<(), String> {
///         let free_percent = 42; // ask the system
///         if free_percent > 5 { Ok(()) } else { Err(format!("disk {free_percent}% free")) }
///     }
/// }
/// ```
pub trait HealthCheck: Send + Sync + 'static {
    /// Runs the check once.
    fn check(&self) -> impl Future<Output = std::result::Result<(), String>> + Send;
}

/// Whether a new checked registration is in etcd before its first check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitialState {
    /// Not registered until the first pass (the default); `fall` failures
    /// in a row before any pass make it [`HealthState::Unhealthy`], and from
    /// there it needs `rise` passes.
    #[default]
    Pending,
    /// Registered at once, as if `rise` checks had passed.
    Healthy,
    /// Not registered until `rise` passes in a row.
    Unhealthy,
}

/// When a check runs and how its results gate the registration.
///
/// Defaults: interval 10 s, timeout half the interval, rise 2, fall 3,
/// initial state [`InitialState::Pending`] (registered on the first pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    interval: Duration,
    timeout: Option<Duration>,
    rise: u32,
    fall: u32,
    pub(crate) initial: InitialState,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            interval: Duration::from_secs(10),
            timeout: None,
            rise: 2,
            fall: 3,
            initial: InitialState::Pending,
        }
    }
}

impl HealthPolicy {
    /// The defaults: see [`HealthPolicy`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Time between the starts of two checks (default 10 s). The first check
    /// runs at once.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How long one check may take before it counts as a failure (default:
    /// half the interval). It is capped at the interval.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Passes in a row that make an unhealthy instance healthy again (default 2).
    #[must_use]
    pub fn rise(mut self, rise: u32) -> Self {
        self.rise = rise;
        self
    }

    /// Failures in a row that make a healthy instance unhealthy (default 3).
    #[must_use]
    pub fn fall(mut self, fall: u32) -> Self {
        self.fall = fall;
        self
    }

    /// The state before the first check (default [`InitialState::Pending`]).
    #[must_use]
    pub fn initial(mut self, initial: InitialState) -> Self {
        self.initial = initial;
        self
    }

    /// The effective timeout of one check.
    pub fn check_timeout(&self) -> Duration {
        self.timeout.unwrap_or(self.interval / 2).min(self.interval)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.interval.is_zero() {
            return Err(Error::invalid("interval", "must be above zero"));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::invalid("timeout", "must be above zero"));
        }
        if self.rise == 0 {
            return Err(Error::invalid("rise", "must be at least 1"));
        }
        if self.fall == 0 {
            return Err(Error::invalid("fall", "must be at least 1"));
        }
        Ok(())
    }
}

/// Where a checked registration stands. Only `Healthy` is in etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthState {
    /// Not checked successfully yet ([`InitialState::Pending`]): not registered.
    Pending,
    /// Passing: registered (unless out of service, see
    /// [`Registration::set_serving`](crate::Registration::set_serving)).
    Healthy,
    /// Failed `fall` times in a row, and has not passed `rise` times in a row since: not registered.
    Unhealthy,
}

/// The health of a registration, as [`Registration::health`](crate::Registration::health) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The state after the rise/fall policy.
    pub state: HealthState,
    /// The text of the most recent failure, kept after a recovery so that
    /// it says why the instance was last out; `None` if no check failed yet.
    pub last_error: Option<String>,
    /// Passes in a row, up to the latest check.
    pub passes: u32,
    /// Failures in a row, up to the latest check.
    pub failures: u32,
    /// Checks run so far.
    pub checks: u64,
}

impl Health {
    fn new(state: HealthState) -> Self {
        Health {
            state,
            last_error: None,
            passes: 0,
            failures: 0,
            checks: 0,
        }
    }

    /// Counts one result and moves the state by the policy; returns whether
    /// the state changed.
    fn record(&mut self, result: std::result::Result<(), String>, policy: &HealthPolicy) -> bool {
        self.checks += 1;
        let before = self.state;
        match result {
            Ok(()) => {
                self.passes = self.passes.saturating_add(1);
                self.failures = 0;
                let healthy = match self.state {
                    HealthState::Pending | HealthState::Healthy => true,
                    HealthState::Unhealthy => self.passes >= policy.rise,
                };
                if healthy {
                    self.state = HealthState::Healthy;
                }
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                self.passes = 0;
                self.last_error = Some(error);
                if self.failures >= policy.fall {
                    self.state = HealthState::Unhealthy;
                }
            }
        }
        self.state != before
    }
}

/// Makes etcd agree with a registration's presence: puts its key back
/// (`true`) or deletes it and keeps it out (`false`). Given by whoever owns
/// the registration; health knows nothing of how.
pub(crate) type Applier =
    Arc<dyn Fn(bool) -> futures::future::BoxFuture<'static, Result<()>> + Send + Sync>;

/// What decides whether one registration's key is in etcd: its health, the
/// manual switch, and what was last applied to etcd. Every change of the
/// key's presence goes through the lock, so they never interleave.
pub(crate) struct Gate {
    state: Mutex<GateState>,
    health: watch::Sender<Health>,
    /// Stops the health task (a child of the registry's token).
    pub(crate) cancel: CancellationToken,
}

pub(crate) struct GateState {
    healthy: bool,
    serving: bool,
    /// What etcd was last successfully told; `None` after a failed attempt,
    /// so that the next one tries again.
    applied: Option<bool>,
}

impl Gate {
    /// The gate of a registration without a check: healthy, in etcd.
    pub(crate) fn unchecked(cancel: CancellationToken) -> Arc<Self> {
        Self::with(HealthState::Healthy, Some(true), cancel)
    }

    fn with(state: HealthState, applied: Option<bool>, cancel: CancellationToken) -> Arc<Self> {
        Arc::new(Gate {
            state: Mutex::new(GateState {
                healthy: state == HealthState::Healthy,
                serving: true,
                applied,
            }),
            health: watch::Sender::new(Health::new(state)),
            cancel,
        })
    }

    pub(crate) fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Holds off every change of the key's presence while held.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, GateState> {
        self.state.lock().await
    }

    /// Maintenance switch: records it and makes etcd agree.
    pub(crate) async fn set_serving(&self, applier: &Applier, serving: bool) -> Result<()> {
        let mut st = self.state.lock().await;
        if self.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        st.serving = serving;
        apply(applier, &mut st).await
    }
}

/// Puts or deletes the key so that etcd matches the gate.
async fn apply(applier: &Applier, st: &mut GateState) -> Result<()> {
    let want = st.healthy && st.serving;
    if st.applied == Some(want) {
        return Ok(());
    }
    st.applied = None;
    applier(want).await?;
    st.applied = Some(want);
    Ok(())
}

/// Starts the gate of a checked registration and its owned health task.
pub(crate) fn start<C: HealthCheck>(
    cancel: CancellationToken,
    namespace: String,
    applier: Applier,
    service: String,
    id: String,
    check: C,
    policy: HealthPolicy,
) -> (Arc<Gate>, tokio::task::JoinHandle<()>) {
    let (state, applied) = match policy.initial {
        InitialState::Pending => (HealthState::Pending, Some(false)),
        InitialState::Healthy => (HealthState::Healthy, Some(true)),
        InitialState::Unhealthy => (HealthState::Unhealthy, Some(false)),
    };
    let gate = Gate::with(state, applied, cancel);
    let task = tokio::spawn(run(
        namespace,
        applier,
        gate.clone(),
        service,
        id,
        check,
        policy,
    ));
    (gate, task)
}

/// The health task: one check per interval, each under the timeout; a state
/// change (or an earlier failure to apply one) is applied to etcd.
async fn run<C: HealthCheck>(
    namespace: String,
    applier: Applier,
    gate: Arc<Gate>,
    service: String,
    id: String,
    check: C,
    policy: HealthPolicy,
) {
    let timeout = policy.check_timeout();
    let mut ticks = tokio::time::interval(policy.interval);
    // After a slow check, keep the interval between checks rather than catching up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cancel = gate.cancel.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(timeout, check.check()) => match r {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            },
        };
        let mut changed = false;
        let mut health = Health::new(HealthState::Pending);
        gate.health.send_modify(|h| {
            changed = h.record(result, &policy);
            health = h.clone();
        });
        if changed {
            log_transition(&service, &id, &health);
        } else if health.failures == 1 {
            tracing::debug!(
                service,
                id,
                error = health.last_error.as_deref().unwrap_or(""),
                "health check failed"
            );
        }
        crate::metrics::health_check(
            &namespace,
            &service,
            health.failures == 0,
            changed.then_some(health.state == HealthState::Healthy),
        );
        let mut st = gate.state.lock().await;
        if cancel.is_cancelled() {
            return;
        }
        st.healthy = health.state == HealthState::Healthy;
        let applied = tokio::select! {
            _ = cancel.cancelled() => return,
            r = apply(&applier, &mut st) => r,
        };
        if let Err(error) = applied {
            tracing::warn!(service, id, %error, "could not apply the health state to etcd; retrying after the next check");
        }
    }
}

fn log_transition(service: &str, id: &str, health: &Health) {
    let error = health.last_error.as_deref().unwrap_or("");
    match health.state {
        HealthState::Healthy => tracing::info!(
            service,
            id,
            passes = health.passes,
            "instance healthy: registering it"
        ),
        HealthState::Unhealthy => tracing::warn!(
            service,
            id,
            failures = health.failures,
            error,
            "instance unhealthy: deregistering it"
        ),
        HealthState::Pending => {}
    }
}

/// An HTTP GET check: any 2xx status is a pass. See [`http()`].
#[derive(Clone, Debug)]
pub struct HttpCheck {
    uri: http::Uri,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        String,
    >,
}

/// Checks with an HTTP GET of `url`; any 2xx status is a pass, anything
/// else (another status, no connection, no answer within the timeout) a
/// failure. HTTP/1.1 over plain TCP (`http://` only: health endpoints are
/// usually local), on hyper's client, one connection per check.
///
/// Fails with [`Error::InvalidInput`] (field `url`) when `url` does not parse
/// or is not `http://host[:port]/...`.
pub fn http(url: &str) -> Result<HttpCheck> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::invalid("url", format!("{url:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(Error::invalid(
                "url",
                format!("{url:?}: scheme {other:?} is not supported; use http://"),
            ));
        }
        None => {
            return Err(Error::invalid(
                "url",
                format!("{url:?}: expected http://host[:port]/path"),
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(Error::invalid("url", format!("{url:?}: no host")));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        // A health check must see the server as a new client would: no reused connection.
        .pool_max_idle_per_host(0)
        .build_http();
    Ok(HttpCheck { uri, client })
}

impl HealthCheck for HttpCheck {
    async fn check(&self) -> std::result::Result<(), String> {
        let request = http::Request::get(self.uri.clone())
            .header(http::header::USER_AGENT, "etcd-registry health check")
            .body(String::new())
            .map_err(|e| format!("GET {}: {e}", self.uri))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("GET {}: {}", self.uri, error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("GET {}: status {status}", self.uri))
        }
    }
}

/// A TCP connect check. See [`tcp`].
#[derive(Clone, Debug)]
pub struct TcpCheck {
    addr: String,
}

/// Checks that a TCP connection to `addr` (`host:port`, resolved at each
/// check) succeeds; the connection is closed at once.
///
/// Fails with [`Error::InvalidInput`] (field `addr`) when `addr` has no port.
pub fn tcp(addr: impl Into<String>) -> Result<TcpCheck> {
    let addr = addr.into();
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(TcpCheck { addr })
        }
        _ => Err(Error::invalid(
            "addr",
            format!("{addr:?}: expected host:port"),
        )),
    }
}

impl HealthCheck for TcpCheck {
    async fn check(&self) -> std::result::Result<(), String> {
        tokio::net::TcpStream::connect(self.addr.as_str())
            .await
            .map(drop)
            .map_err(|e| format!("connect {}: {e}", self.addr))
    }
}

/// A `grpc.health.v1` check. See [`grpc`].
#[cfg(feature = "grpc-health")]
#[derive(Clone, Debug)]
pub struct GrpcCheck {
    endpoint: tonic::transport::Endpoint,
    service: String,
}

/// Checks with the standard gRPC health protocol (`grpc.health.v1.Health/Check`,
/// through `tonic-health`): `SERVING` is a pass; any other status, an error
/// or no answer is a failure. `endpoint` is `http://host:port` (or
/// `host:port`); `service` is the name the server reports on, `""` for the
/// server as a whole. Each check makes a new connection. Needs the cargo
/// feature `grpc-health`.
///
/// Fails with [`Error::InvalidInput`] (field `endpoint`) when `endpoint` does not parse.
#[cfg(feature = "grpc-health")]
pub fn grpc(endpoint: &str, service: impl Into<String>) -> Result<GrpcCheck> {
    let uri = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| Error::invalid("endpoint", format!("{endpoint:?}: {e}")))?;
    Ok(GrpcCheck {
        endpoint,
        service: service.into(),
    })
}

#[cfg(feature = "grpc-health")]
impl HealthCheck for GrpcCheck {
    async fn check(&self) -> std::result::Result<(), String> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let uri = self.endpoint.uri();
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|e| format!("connect {uri}: {}", error_chain(&e)))?;
        let response = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: self.service.clone(),
            })
            .await
            .map_err(|s| {
                format!(
                    "{uri} health of {:?}: {} ({})",
                    self.service,
                    s.message(),
                    s.code()
                )
            })?;
        match response.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!(
                "{uri} health of {:?}: {}",
                self.service,
                other.as_str_name()
            )),
        }
    }
}

/// A check made of a closure. See [`from_fn`].
#[derive(Clone)]
pub struct FnCheck<F>(F);

impl<F> std::fmt::Debug for FnCheck<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCheck")
    }
}

/// A check made of a closure that returns a future.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use etcd_registry::health;
///
/// let ready = Arc::new(AtomicBool::new(false));
/// let check = health::from_fn(move || {
///     let ready = ready.clone();
///     async move {
///         if ready.load(Ordering::Relaxed) { Ok(()) } else { Err("warming up".to_owned()) }
///     }
/// });
/// ```
pub fn from_fn<F, Fut>(f: F) -> FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), String>> + Send,
{
    FnCheck(f)
}

impl<F, Fut> HealthCheck for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), String>> + Send,
{
    fn check(&self) -> impl Future<Output = std::result::Result<(), String>> + Send {
        (self.0)()
    }
}

/// An error and its sources, `: `-separated (hyper's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: HealthPolicy, start: HealthState, results: &[bool]) -> Vec<HealthState> {
        let mut h = Health::new(start);
        results
            .iter()
            .map(|&ok| {
                h.record(if ok { Ok(()) } else { Err("no".into()) }, &policy);
                h.state
            })
            .collect()
    }

    #[test]
    fn rise_and_fall_count_results_in_a_row() {
        use HealthState::*;
        let p = HealthPolicy::new().rise(2).fall(3);
        assert_eq!(run(p, Pending, &[true]), [Healthy]);
        assert_eq!(
            run(p, Pending, &[false, false, false]),
            [Pending, Pending, Unhealthy]
        );
        assert_eq!(
            run(p, Healthy, &[false, false, true, false, false, false]),
            [Healthy, Healthy, Healthy, Healthy, Healthy, Unhealthy]
        );
        assert_eq!(
            run(p, Unhealthy, &[true, false, true, true]),
            [Unhealthy, Unhealthy, Unhealthy, Healthy]
        );
    }

    #[test]
    fn the_last_error_outlives_a_recovery() {
        let p = HealthPolicy::new().rise(1).fall(1);
        let mut h = Health::new(HealthState::Healthy);
        h.record(Err("down".into()), &p);
        h.record(Ok(()), &p);
        assert_eq!(h.state, HealthState::Healthy);
        assert_eq!(h.last_error.as_deref(), Some("down"));
        assert_eq!((h.passes, h.failures, h.checks), (1, 0, 2));
    }

    #[test]
    fn bad_policies_and_targets_name_the_field() {
        let field = |r: Result<()>| match r {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("expected InvalidInput, got {other:?}"),
        };
        assert_eq!(
            field(HealthPolicy::new().interval(Duration::ZERO).validate()),
            "interval"
        );
        assert_eq!(
            field(HealthPolicy::new().timeout(Duration::ZERO).validate()),
            "timeout"
        );
        assert_eq!(field(HealthPolicy::new().rise(0).validate()), "rise");
        assert_eq!(field(HealthPolicy::new().fall(0).validate()), "fall");
        assert_eq!(field(http("https://x/h").map(drop)), "url");
        assert_eq!(field(http("localhost:80/h").map(drop)), "url");
        assert_eq!(field(tcp("localhost").map(drop)), "addr");
        assert!(http("http://127.0.0.1:8080/healthz").is_ok());
        assert!(tcp("localhost:80").is_ok());
    }

    #[test]
    fn the_timeout_defaults_to_half_the_interval_and_never_exceeds_it() {
        let p = HealthPolicy::new().interval(Duration::from_secs(4));
        assert_eq!(p.check_timeout(), Duration::from_secs(2));
        assert_eq!(
            p.timeout(Duration::from_secs(9)).check_timeout(),
            Duration::from_secs(4)
        );
    }
}
