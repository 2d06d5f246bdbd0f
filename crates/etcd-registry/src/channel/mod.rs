//! (feature `channel`, on by default) [`Channel`]: a balanced, failure-aware
//! gRPC channel over a [`ServiceCache`], usable by any tonic-generated client.
//!
//! ```no_run
//! use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
//!
//! # async fn demo(registry: etcd_registry::Registry) -> Result<(), Box<dyn std::error::Error>> {
//! let channel = registry.channel("grpc-api").await?;
//! let mut client = HealthClient::new(channel);
//! client.check(HealthCheckRequest { service: String::new() }).await?;
//! # Ok(()) }
//! ```
//!
//! # What it does
//!
//! - **Picks** with tower's power of two choices ([`tower::balance::p2c`])
//!   over [`tower::load::PeakEwma`] (peak-EWMA latency × in-flight requests).
//! - **Connects eagerly**: each instance is one HTTP/2 connection opened as
//!   soon as the instance is known (tonic's `Endpoint::connect_with_connector`),
//!   and it takes requests only once connected. A failed connect or a lost
//!   connection ejects it at once; it comes back after a capped exponential
//!   backoff (with jitter) and a successful connect.
//! - **Retries safely**: a request that surely never reached a server (the
//!   endpoint was gone or closed, the connect failed, the server refused the
//!   stream or sent GOAWAY before it) is sent again to another endpoint. A
//!   request that may have reached a server is sent again only when marked
//!   [`Idempotent`] (or sent through [`Channel::idempotent`]), after a
//!   transport error or an `UNAVAILABLE` answer. A retry always goes to a
//!   ready endpoint this call has not tried yet: when every one was tried,
//!   the call ends with the last answer. Retries draw on a budget
//!   ([`tower::retry::budget::TpsBudget`]).
//! - **Keeps the deadline**: a call's `grpc-timeout` (tonic's
//!   `Request::set_timeout`) bounds the whole call, waiting for a ready
//!   endpoint and retries included: each retry carries what is left of it,
//!   and a call whose deadline passes ends with `DEADLINE_EXCEEDED`, never
//!   retried (as gRPC does).
//! - **Drains**: an instance that leaves the cache (deregistered, set not
//!   serving, drained) gets no new request; its in-flight requests finish, and
//!   its connection closes when they have, or after the drain timeout.
//! - **Protects against empty sets**: when a *re-list* (etcd wiped, restored,
//!   replaced) drops a service below half of what it had, the last known set
//!   is kept for one TTL, so that instances have time to register again.
//!   Deregistrations seen as watch events always apply at once. When fewer
//!   than half the endpoints are ready (panic threshold), endpoints ejected
//!   as outliers (connection up, answering `UNAVAILABLE`) take requests too.
//! - **Prefers its zone**: instances carry their zone in the metadata key
//!   [`ZONE_KEY`] (`"zone"`). Told its own zone, the channel sends to the same
//!   zone, spilling to others as Envoy does: the same zone takes
//!   `min(1, 1.4 × ready/known)` of the requests.
//! - **Subsets**: with [`ChannelBuilder::subset`], it uses at most `k`
//!   endpoints, chosen by deterministic subsetting (Google SRE book, ch. 20)
//!   from the client id, so that many clients spread evenly.
//!
//! A request waits while no endpoint is ready (as tonic's own balanced
//! channel does), for one in any zone: give calls a deadline.

mod endpoint;
mod lane;
mod manager;
mod metrics;
mod replay;
mod subset;

#[cfg(feature = "metrics")]
pub use self::metrics::{
    EJECTIONS_TOTAL, FAILURES_TOTAL, REQUEST_DURATION_SECONDS, REQUESTS_TOTAL, RETRIES_TOTAL,
};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rand::Rng;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::body::Body;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{BoxError, Service, ServiceExt};

use self::lane::{Answer, Lane, Lanes};

use crate::cache::ServiceCache;
use crate::error::{Error, Result};
use crate::registry::Registry;

use self::manager::{Manager, Published};

/// The metadata key that carries an instance's zone (`"zone"`), for
/// [`ChannelBuilder::zone`]: `ServiceInstance::new(..).with_metadata("zone", "eu-1a")`.
pub const ZONE_KEY: &str = "zone";

/// Marks a request as safe to send twice: put it in the request's extensions
/// (`request.extensions_mut().insert(Idempotent)`), and a [`Channel`] may
/// send it again after a failure that happened once it could have reached
/// the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Idempotent;

/// Where an endpoint stands; see [`EndpointState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting; takes no request yet.
    Connecting,
    /// Connected and taking requests.
    Ready,
    /// Out of rotation until the instant given (connect failed, connection
    /// lost, or answering `UNAVAILABLE`), then tried again.
    Ejected {
        /// When it is tried again.
        until: Instant,
    },
    /// Left the service: takes no new request, finishing its in-flight ones.
    Draining,
}

/// One endpoint of a [`Channel`], as [`Channel::endpoints`] reports it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EndpointState {
    /// The instance id.
    pub id: String,
    /// `address:port`.
    pub address: String,
    /// The instance's zone (metadata key [`ZONE_KEY`]).
    pub zone: Option<String>,
    /// Where it stands.
    pub phase: Phase,
    /// Calls sent and not yet finished: a call counts until its response
    /// body has ended (or failed, or was dropped), so a streaming response
    /// counts for as long as it streams.
    pub in_flight: usize,
    /// Requests sent to it.
    pub requests: u64,
    /// Failed connects, lost connections and failed requests.
    pub failures: u64,
    /// EWMA of the time to the answer's headers (`None` before the first).
    pub latency_ewma: Option<Duration>,
}

/// A channel's options; see [`ChannelBuilder`] for each default.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    connect_timeout: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    drain_timeout: Duration,
    protect_below: f64,
    protect_for: Option<Duration>,
    panic_threshold: f64,
    zone: Option<String>,
    overprovisioning: f64,
    subset: Option<usize>,
    client_id: u64,
    outlier_after: Option<u32>,
    max_retries: u32,
    budget: (Duration, u32, f32),
    replay_limit: usize,
    default_rtt: Duration,
    decay: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            protect_below: 0.5,
            protect_for: None,
            panic_threshold: 0.5,
            zone: None,
            overprovisioning: 1.4,
            subset: None,
            client_id: rand::rng().random(),
            outlier_after: Some(5),
            max_retries: 2,
            budget: (Duration::from_secs(10), 3, 0.2),
            replay_limit: 64 * 1024,
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

/// Builds a [`Channel`]: [`Registry::channel_builder`]. Every option has a
/// default, given with its reason.
#[derive(Debug)]
#[must_use]
pub struct ChannelBuilder<'a> {
    registry: &'a Registry,
    service: String,
    options: Options,
}

impl ChannelBuilder<'_> {
    /// Time allowed to connect to an instance (TCP and HTTP/2 handshake).
    /// Default 1 s: on a LAN a connect takes milliseconds, and a slower one is
    /// better ejected and retried than waited for.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Backoff before an ejected endpoint is tried again: `base × 2^n`,
    /// capped at `max`, times a random factor in [0.5, 1]. Default 100 ms to
    /// 5 s: a restarted instance is back within a second, a dead one costs one
    /// connect attempt per 5 s at most.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.options.backoff_base = base;
        self.options.backoff_max = max;
        self
    }

    /// How long a removed instance keeps its in-flight requests before they
    /// are cancelled and its connection closed. Default 30 s: longer than
    /// most unary calls, and what Kubernetes gives a pod to stop.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.options.drain_timeout = timeout;
        self
    }

    /// Empty-set protection: a re-list that leaves fewer than `fraction` of
    /// the known instances keeps the known set (default 0.5, as the issue and
    /// Nacos's push protection do; 0 turns protection off).
    pub fn protect_below(mut self, fraction: f64) -> Self {
        self.options.protect_below = fraction;
        self
    }

    /// How long protection keeps instances a re-list dropped. Default: the
    /// registry's TTL, the time an instance's own registry has to register
    /// it again before its lease could expire.
    pub fn protect_for(mut self, period: Duration) -> Self {
        self.options.protect_for = Some(period);
        self
    }

    /// Panic threshold: when fewer than `fraction` of the endpoints are
    /// ready, outlier-ejected endpoints take requests too. Default 0.5
    /// (Envoy's default is 50%): rather spread load over answering servers
    /// than overload the few left. 0 turns it off.
    pub fn panic_threshold(mut self, fraction: f64) -> Self {
        self.options.panic_threshold = fraction;
        self
    }

    /// This client's zone: endpoints whose metadata [`ZONE_KEY`] equals it are
    /// preferred. Default none: every endpoint is equal.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.options.zone = Some(zone.into());
        self
    }

    /// Envoy's overprovisioning factor: the own zone takes
    /// `min(1, factor × ready/known)` of the requests. Default 1.4 (Envoy's):
    /// nothing spills over until more than ~29% of the zone is down.
    pub fn overprovisioning(mut self, factor: f64) -> Self {
        self.options.overprovisioning = factor;
        self
    }

    /// Uses at most `k` endpoints, chosen by deterministic subsetting. Default
    /// none (every endpoint): subsetting only pays for large services.
    pub fn subset(mut self, k: usize) -> Self {
        self.options.subset = Some(k);
        self
    }

    /// This client's id for subsetting. Clients with consecutive ids
    /// (0, 1, 2, …) spread exactly evenly. Default: random, which spreads
    /// evenly only on average.
    pub fn client_id(mut self, id: u64) -> Self {
        self.options.client_id = id;
        self
    }

    /// Ejects an endpoint after `n` failed calls in a row (outlier
    /// detection): `UNAVAILABLE` answers, and errors that leave the
    /// connection up, such as refused streams. `None` turns it off. Default
    /// 5, as Envoy's consecutive-5xx.
    pub fn outlier_after(mut self, n: Option<u32>) -> Self {
        self.options.outlier_after = n;
        self
    }

    /// At most this many retries per request. Default 2.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.options.max_retries = n;
        self
    }

    /// The retry budget: retries may add `percent` (0.2 = 20%) to the
    /// requests of the last `window` (1–60 s), plus `min_per_sec`. Default
    /// 10 s, 3/s, 20%: Linkerd's and Finagle's, so that retries never
    /// multiply an outage.
    pub fn retry_budget(mut self, window: Duration, min_per_sec: u32, percent: f32) -> Self {
        self.options.budget = (window, min_per_sec, percent);
        self
    }

    /// Requests whose body is larger are not retried (the body is kept in
    /// memory for retries). Default 64 KiB.
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.options.replay_limit = bytes;
        self
    }

    /// PeakEwma's latency guess for an endpoint when none is measured yet
    /// (later ones start at the mean of the measured latencies), and its
    /// decay. Defaults 30 ms and 10 s, as Linkerd's.
    pub fn peak_ewma(mut self, default_rtt: Duration, decay: Duration) -> Self {
        self.options.default_rtt = default_rtt;
        self.options.decay = decay;
        self
    }

    fn check(&self) -> Result<()> {
        let o = &self.options;
        let fraction = |field: &'static str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid(field, "must be between 0 and 1"))
            }
        };
        fraction("protect_below", o.protect_below)?;
        fraction("panic_threshold", o.panic_threshold)?;
        if !(o.overprovisioning >= 1.0 && o.overprovisioning.is_finite()) {
            return Err(Error::invalid("overprovisioning", "must be at least 1"));
        }
        if o.subset == Some(0) {
            return Err(Error::invalid("subset", "must be at least 1"));
        }
        if o.connect_timeout.is_zero() {
            return Err(Error::invalid("connect_timeout", "must be positive"));
        }
        if o.backoff_base.is_zero() || o.backoff_max < o.backoff_base {
            return Err(Error::invalid(
                "backoff",
                "base must be positive and at most max",
            ));
        }
        let (window, _, percent) = o.budget;
        if window < Duration::from_secs(1) || window > Duration::from_secs(60) {
            return Err(Error::invalid("retry_budget", "window must be 1 to 60 s"));
        }
        if !(0.0..=1000.0).contains(&percent) {
            return Err(Error::invalid("retry_budget", "percent must be 0 to 1000"));
        }
        if o.decay.is_zero() {
            return Err(Error::invalid("peak_ewma", "decay must be positive"));
        }
        Ok(())
    }

    /// Opens the service's cache and starts connecting. Resolves once the
    /// cache has its first snapshot (not when endpoints are connected).
    pub async fn build(self) -> Result<Channel> {
        self.check()?;
        let cache = self.registry.cache(&self.service).await?;
        let protect_for = self
            .options
            .protect_for
            .unwrap_or_else(|| self.registry.config().ttl());
        Ok(Channel::start(
            self.service,
            cache,
            self.options,
            protect_for,
        ))
    }
}

type Request = http::Request<Body>;
type Response = http::Response<Body>;

struct Inner {
    service: String,
    options: Arc<Options>,
    /// The same-zone and other-zone balancers, shared by the clones; see
    /// [`lane`]. Unlike a `tower::buffer::Buffer`, they cost no task hop per
    /// call.
    lanes: Arc<Lanes>,
    published: Arc<Published>,
    budget: TpsBudget,
    _stop: DropGuard,
}

/// A balanced, failure-aware gRPC channel to the instances of one service;
/// see the [module documentation](self). Cheap to clone: clones share the
/// connections. Dropping the last clone closes them.
///
/// Implements `tower::Service<http::Request<tonic::body::Body>>` as tonic's
/// own `Channel` does, so any tonic-generated client takes it.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
    idempotent: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("service", &self.inner.service)
            .field("idempotent", &self.idempotent)
            .finish_non_exhaustive()
    }
}

impl Channel {
    fn start(
        service: String,
        cache: ServiceCache,
        options: Options,
        protect_for: Duration,
    ) -> Self {
        let options = Arc::new(options);
        let (lanes, local_tx, remote_tx) = Lanes::new();
        let published = Arc::new(Published::default());
        let stop = CancellationToken::new();
        let manager = Manager::new(
            service.clone(),
            options.clone(),
            cache,
            local_tx,
            remote_tx,
            published.clone(),
            stop.clone(),
            protect_for,
        );
        tokio::spawn(manager.run());
        tokio::spawn(lane::drain(lanes.clone(), stop.clone()));
        let (window, min_per_sec, percent) = options.budget;
        Self {
            inner: Arc::new(Inner {
                service,
                budget: TpsBudget::new(window, min_per_sec, percent),
                options,
                lanes,
                published,
                _stop: stop.drop_guard(),
            }),
            idempotent: false,
        }
    }

    /// The endpoints and where each stands, draining ones included.
    pub fn endpoints(&self) -> Vec<EndpointState> {
        let rows = self
            .inner
            .published
            .rows
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        rows.iter().map(manager::Row::state).collect()
    }

    /// This channel, treating every request as [`Idempotent`].
    pub fn idempotent(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            idempotent: true,
        }
    }

    /// The service this channel calls.
    pub fn service(&self) -> &str {
        &self.inner.service
    }
}

impl Inner {
    /// Same zone or another, as Envoy's priority levels with overprovisioning;
    /// the other lane second.
    fn pick(&self) -> [&Lane; 2] {
        let (local, remote) = (&self.lanes.local, &self.lanes.remote);
        let published = &self.published;
        let local_ready = published.local_ready.load(Ordering::Acquire);
        let remote_ready = published.remote_ready.load(Ordering::Acquire);
        if remote_ready == 0 {
            return [local, remote];
        }
        if local_ready == 0 {
            return [remote, local];
        }
        let known = published.local_known.load(Ordering::Acquire).max(1);
        let share = self.options.overprovisioning * local_ready as f64 / known as f64;
        if share >= 1.0 || rand::rng().random_bool(share.clamp(0.0, 1.0)) {
            [local, remote]
        } else {
            [remote, local]
        }
    }

    /// Hands `request` to the picked balancer's endpoint; when it has none
    /// ready, waits for a ready endpoint in either balancer (a remote one
    /// that connects must serve a call that found none), until `deadline`.
    async fn dispatch(
        &self,
        request: Request,
        deadline: Option<tokio::time::Instant>,
    ) -> std::result::Result<Answer, BoxError> {
        let waker = &self.lanes.waker;
        let [first, _] = self.pick();
        let mut request = Some(request);
        if let Poll::Ready(dispatched) = first.try_call(waker, &mut request) {
            return dispatched;
        }
        loop {
            // Registered before polling, so that no wake-up is lost.
            let notified = self.lanes.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let (Some(deadline), Some(request)) = (deadline, request.as_mut()) {
                // The time waited comes off what the endpoint is given.
                replay::set_timeout(request.headers_mut(), deadline);
            }
            for lane in self.pick() {
                if let Poll::Ready(dispatched) = lane.try_call(waker, &mut request) {
                    return dispatched;
                }
            }
            match deadline {
                None => notified.await,
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(deadline_exceeded("waiting for a ready endpoint"));
                    }
                }
            }
        }
    }
}

/// The error of a call whose deadline passed.
fn deadline_exceeded(while_: &str) -> BoxError {
    tonic::Status::deadline_exceeded(format!("deadline exceeded {while_}")).into()
}

/// Whether an attempt failed because the call's deadline passed (tonic's
/// `grpc-timeout` enforcement, which reports it as `CANCELLED`).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<tonic::TimeoutExpired>())
}

/// The endpoint an attempt went to, if known.
fn served_by(result: &std::result::Result<Response, BoxError>) -> Option<Arc<str>> {
    match result {
        Ok(response) => response
            .extensions()
            .get::<endpoint::ServedBy>()
            .map(|s| s.0.clone()),
        Err(e) => std::iter::successors(
            Some(e.as_ref() as &(dyn std::error::Error + 'static)),
            |e| e.source(),
        )
        .find_map(|e| e.downcast_ref::<endpoint::Failed>())
        .map(|f| f.id.clone()),
    }
}

impl Inner {
    /// An endpoint for a retry: one not tried yet, the less loaded of two
    /// random ones (same zone first); `None` when every one was tried.
    fn pick_untried(&self, tried: &[Arc<str>]) -> Option<endpoint::EndpointService> {
        let ready = self
            .published
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let untried: Vec<&endpoint::EndpointService> =
            ready.iter().filter(|s| !tried.contains(s.id())).collect();
        match untried.len() {
            0 => None,
            1 => Some(untried[0].clone()),
            n => {
                let mut rng = rand::rng();
                let a = untried[rng.random_range(0..n)];
                let b = untried[rng.random_range(0..n)];
                Some(if a.in_flight() <= b.in_flight() { a } else { b }.clone())
            }
        }
    }
}

/// Whether a result is worth sending again, and why.
fn retry_reason(
    result: &std::result::Result<Response, BoxError>,
    idempotent: bool,
) -> Option<&'static str> {
    match result {
        // gRPC never retries DEADLINE_EXCEEDED: no time is left.
        Err(e) if timed_out(e.as_ref()) => None,
        Err(e) if endpoint::never_sent(e.as_ref()) => Some("not_sent"),
        Err(_) if idempotent => Some("idempotent"),
        Ok(r) if idempotent && endpoint::grpc_status(r) == Some(tonic::Code::Unavailable) => {
            Some("idempotent")
        }
        _ => None,
    }
}

impl Service<Request> for Channel {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, std::result::Result<Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // Readiness is awaited per attempt, in the call, since each attempt
        // may go to another balancer.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let inner = self.inner.clone();
        let idempotent = self.idempotent || request.extensions().get::<Idempotent>().is_some();
        let span = tracing::debug_span!("channel call", service = %inner.service, path = %request.uri().path());
        Box::pin(tracing::Instrument::instrument(
            async move {
                let (request, replay) = replay::prepare(request, inner.options.replay_limit)?;
                let deadline = replay::deadline(request.headers());
                inner.budget.deposit();
                // The first attempt is the balancer's pick.
                let mut result = match inner.dispatch(request, deadline).await {
                    Ok(answer) => answer.await,
                    Err(e) => Err(e),
                };
                let mut retries = 0;
                let mut tried: Vec<Arc<str>> = Vec::new();
                loop {
                    match served_by(&result) {
                        Some(id) if !tried.contains(&id) => tried.push(id),
                        _ => {}
                    }
                    let Some(reason) = retry_reason(&result, idempotent) else {
                        return finish(result);
                    };
                    let Some(replay) = &replay else { return result };
                    if retries >= inner.options.max_retries {
                        return result;
                    }
                    // A retry goes to an endpoint not tried yet, or nowhere.
                    let Some(mut endpoint) = inner.pick_untried(&tried) else {
                        return result;
                    };
                    if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
                        return Err(deadline_exceeded("before a retry"));
                    }
                    if !inner.budget.withdraw() {
                        return result;
                    }
                    retries += 1;
                    tried.push(endpoint.id().clone());
                    tracing::debug!(reason, retries, "retrying on another endpoint");
                    metrics::retry(&inner.service, reason);
                    let request = replay.request(deadline);
                    result = match endpoint.ready().await {
                        Ok(endpoint) => endpoint.call(request).await,
                        Err(e) => Err(e),
                    };
                }
            },
            span,
        ))
    }
}

/// A call's last result, a passed deadline reported as `DEADLINE_EXCEEDED`.
fn finish(
    result: std::result::Result<Response, BoxError>,
) -> std::result::Result<Response, BoxError> {
    match result {
        Err(e) if timed_out(e.as_ref()) => Err(deadline_exceeded(&format!("({e})"))),
        other => other,
    }
}

impl Registry {
    /// A [`Channel`] to service `name`, with the default options (see
    /// [`ChannelBuilder`]). Resolves once the service's cache has its first
    /// snapshot; endpoints connect in the background.
    ///
    /// Fails as [`Registry::cache`] does.
    pub async fn channel(&self, name: &str) -> Result<Channel> {
        self.channel_builder(name).build().await
    }

    /// A [`ChannelBuilder`] for service `name`.
    pub fn channel_builder(&self, name: &str) -> ChannelBuilder<'_> {
        ChannelBuilder {
            registry: self,
            service: name.to_owned(),
            options: Options::default(),
        }
    }
}
