//! (feature `tower`) [`ServiceDiscover`]: a [`ServiceCache`] as a
//! [`tower::discover::Discover`] stream of [`Change`]s.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::stream::BoxStream;
use tower::discover::Change;

use crate::cache::{Instances, ServiceCache};
use crate::instance::ServiceInstance;

/// The changes of a [`ServiceCache`] as a stream of
/// `Result<Change<String, ServiceInstance>, Infallible>`, which implements
/// [`tower::discover::Discover`].
///
/// Created by [`ServiceCache::discover`]. The first items insert every
/// instance present; then each addition is a [`Change::Insert`], each update
/// a [`Change::Insert`] of the new value under the same key (replacing the
/// old one), and each removal a [`Change::Remove`]. Keys are instance ids; in
/// a whole-namespace cache, where ids are unique only within a service, they
/// are `name/id`.
///
/// Each poll compares the cache's current instances with what was already
/// emitted, so a slow consumer skips intermediate states but always ends in
/// step with the cache. What was emitted is kept as the cache's own shared
/// [`Instances`], not as a copy; the comparison walks
/// pointers, and only changed instances are cloned into [`Change`]s. The
/// stream ends when the registry is closed.
///
/// ```no_run
/// use futures::StreamExt;
/// use tower::discover::Change;
///
/// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
/// let cache = registry.cache("grpc-api").await?;
/// let mut changes = cache.discover();
/// while let Some(Ok(change)) = changes.next().await {
///     match change {
///         Change::Insert(id, instance) => println!("+ {id} at {}", instance.endpoint()),
///         Change::Remove(id) => println!("- {id}"),
///     }
/// }
/// # Ok(()) }
/// ```
pub struct ServiceDiscover {
    inner: BoxStream<'static, Result<Change<String, ServiceInstance>, Infallible>>,
}

impl Stream for ServiceDiscover {
    type Item = Result<Change<String, ServiceInstance>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for ServiceDiscover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceDiscover").finish_non_exhaustive()
    }
}

struct DiscoverState {
    cache: ServiceCache,
    versions: tokio::sync::watch::Receiver<crate::cache::Version>,
    /// The cache's instances as last emitted: a shared view, not a copy.
    emitted: Instances,
    pending: VecDeque<Change<String, ServiceInstance>>,
}

impl DiscoverState {
    fn key(&self, instance: &ServiceInstance) -> String {
        if self.cache.is_namespace() {
            format!("{}/{}", instance.name, instance.id)
        } else {
            instance.id.clone()
        }
    }

    /// Queues the changes from what was emitted to the cache's current view.
    ///
    /// Both are sorted by (name, id), so one merge walk finds the changes;
    /// instances the cache did not change are the same `Arc` in both and
    /// cost a pointer comparison. Only changed instances are copied.
    fn catch_up(&mut self) {
        let current = self.cache.instances();
        let (old, new) = (self.emitted.as_slice(), current.as_slice());
        let (mut i, mut j) = (0, 0);
        let mut inserted = Vec::new();
        loop {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => (i, j) = (i + 1, j + 1),
                (Some(a), Some(b)) => match (&a.name, &a.id).cmp(&(&b.name, &b.id)) {
                    Ordering::Less => {
                        self.pending.push_back(Change::Remove(self.key(a)));
                        i += 1;
                    }
                    Ordering::Greater => {
                        inserted.push(b);
                        j += 1;
                    }
                    Ordering::Equal => {
                        if a != b {
                            inserted.push(b);
                        }
                        (i, j) = (i + 1, j + 1);
                    }
                },
                (Some(a), None) => {
                    self.pending.push_back(Change::Remove(self.key(a)));
                    i += 1;
                }
                (None, Some(b)) => {
                    inserted.push(b);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        // Removals first, then insertions, as the stream always sent them.
        for b in inserted {
            self.pending
                .push_back(Change::Insert(self.key(b), ServiceInstance::clone(b)));
        }
        self.emitted = current;
    }
}

impl ServiceCache {
    /// This cache as a [`tower::discover::Discover`] stream (feature `tower`).
    /// See [`ServiceDiscover`].
    pub fn discover(&self) -> ServiceDiscover {
        let state = DiscoverState {
            cache: self.clone(),
            versions: self.versions(),
            emitted: Instances::default(),
            pending: VecDeque::new(),
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(change) = state.pending.pop_front() {
                    return Some((Ok(change), state));
                }
                // Mark the version seen before reading, so that a change made
                // after the read wakes the wait below.
                if state.versions.borrow_and_update().closed {
                    return None;
                }
                state.catch_up();
                if state.pending.is_empty() && state.versions.changed().await.is_err() {
                    return None;
                }
            }
        });
        ServiceDiscover {
            inner: Box::pin(stream),
        }
    }
}

#[cfg(feature = "channel")]
pub use generic::Balance;

/// (feature `channel`) A load balancer over any `MakeService` keyed by
/// instance endpoint.
#[cfg(feature = "channel")]
mod generic {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use futures::future::BoxFuture;
    use rand::Rng;
    use tokio::sync::mpsc;
    use tokio_util::sync::{CancellationToken, DropGuard};
    use tower::buffer::Buffer;
    use tower::discover::Change;
    use tower::load::{CompleteOnResponse, PeakEwma};
    use tower::{BoxError, Service, ServiceExt};

    use crate::cache::ServiceCache;

    type Boxed<Req, Resp> = tower::util::BoxService<Req, Resp, BoxError>;

    /// A balancer over the instances of a [`ServiceCache`], for any client
    /// that can be made per endpoint: `make` is a `tower::MakeService` (a
    /// `Service<String>` whose response is the endpoint's service), called
    /// with the instance's `address:port`.
    ///
    /// It does what [`Channel`](crate::Channel) does that does not need to
    /// know the protocol: power of two choices over `PeakEwma`
    /// (`tower::balance::p2c`; a new endpoint counts as fast, so that it is
    /// tried), an endpoint made (connected) eagerly and used only once made,
    /// ejected at once when making it fails or a call to it fails with an
    /// error, and made again after a capped exponential backoff: 100 ms
    /// doubling with each failure in a row up to 5 s (times a random factor
    /// in [0.5, 1]), back to 100 ms once a call to it is answered. An
    /// endpoint made again after a failure starts at the mean latency
    /// measured over the endpoints, not as the fastest, so that it does not
    /// take the next request at once. An instance that leaves the cache is removed
    /// at once; calls in flight on it finish. It does not retry: which
    /// requests are safe to send again depends on the protocol.
    ///
    /// Cheap to clone. See `examples/http_balance.rs` for hyper-util's
    /// HTTP/1.1 client.
    pub struct Balance<Req, Resp> {
        inner: Buffer<Req, BoxFuture<'static, Result<Resp, BoxError>>>,
        _stop: Arc<DropGuard>,
    }

    impl<Req, Resp> Clone for Balance<Req, Resp>
    where
        Req: Send + 'static,
        Resp: 'static,
    {
        fn clone(&self) -> Self {
            Self {
                inner: self.inner.clone(),
                _stop: self._stop.clone(),
            }
        }
    }

    impl<Req, Resp> std::fmt::Debug for Balance<Req, Resp> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Balance").finish_non_exhaustive()
        }
    }

    /// A call failed with an error: the endpoint is ejected. An answered
    /// call is remembered (it resets the backoff) and its latency kept (it
    /// seeds the endpoints made again after a failure).
    struct Failing<S> {
        inner: S,
        id: String,
        generation: u64,
        lost: mpsc::UnboundedSender<(String, u64)>,
        seen: Arc<Seen>,
    }

    /// What the calls to one made endpoint showed.
    #[derive(Default)]
    struct Seen {
        /// A call was answered since it was made.
        answered: AtomicBool,
        /// Latency EWMA in nanoseconds of the endpoint's answered calls
        /// (0: none yet), kept across its generations.
        rtt_ns: Arc<AtomicU64>,
    }

    impl Seen {
        fn answered(&self, elapsed: Duration) {
            if !self.answered.load(Ordering::Relaxed) {
                self.answered.store(true, Ordering::Relaxed);
            }
            let sample = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
            // Racing updates may lose a sample: a guess for seeding only.
            let old = self.rtt_ns.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample
            } else {
                old - old / 5 + sample / 5
            };
            self.rtt_ns.store(new.max(1), Ordering::Relaxed);
        }
    }

    impl<S, Req> Service<Req> for Failing<S>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        type Response = S::Response;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            let result = self.inner.poll_ready(cx).map_err(Into::into);
            if let Poll::Ready(Err(_)) = &result {
                let _ = self.lost.send((self.id.clone(), self.generation));
            }
            result
        }

        fn call(&mut self, request: Req) -> Self::Future {
            let call = self.inner.call(request);
            let lost = self.lost.clone();
            let key = (self.id.clone(), self.generation);
            let seen = self.seen.clone();
            let start = Instant::now();
            Box::pin(async move {
                let result = call.await.map_err(Into::into);
                if result.is_err() {
                    let _ = lost.send(key);
                } else {
                    seen.answered(start.elapsed());
                }
                result
            })
        }
    }

    /// An endpoint's state; the `u32` counts failures in a row (the
    /// backoff's exponent), reset once a call is answered.
    enum Slot {
        Making(u64, u32),
        Ready(u64, u32, Arc<Seen>),
        Ejected(tokio::time::Instant, u32),
    }

    /// What an endpoint made again after a failure starts at: the mean of
    /// the latencies measured, or `FALLBACK_RTT` (Linkerd's default) when
    /// none is. A new endpoint starts at 1 µs instead, so that it is tried.
    const FALLBACK_RTT: Duration = Duration::from_millis(30);

    impl<Req, Resp> Balance<Req, Resp>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
    {
        /// Starts balancing over `cache`'s instances, made with `make`.
        /// Needs a Tokio runtime.
        pub fn new<M, S>(cache: &ServiceCache, make: M) -> Self
        where
            M: Service<String, Response = S> + Clone + Send + 'static,
            M::Error: Into<BoxError> + Send,
            M::Future: Send + 'static,
            S: Service<Req, Response = Resp> + Send + 'static,
            S::Error: Into<BoxError>,
            S::Future: Send + 'static,
        {
            let (tx, mut rx) = mpsc::unbounded_channel::<Change<String, _>>();
            let discover = futures::stream::poll_fn(move |cx| {
                rx.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>))
            });
            let balance = tower::balance::p2c::Balance::new(discover);
            let inner = Buffer::new(Boxed::new(balance), 1024);
            let stop = CancellationToken::new();
            tokio::spawn(run(cache.clone(), make, tx, stop.clone()));
            Self {
                inner,
                _stop: Arc::new(stop.drop_guard()),
            }
        }
    }

    type Made<S> = PeakEwma<Failing<S>>;

    async fn run<M, S, Req>(
        cache: ServiceCache,
        make: M,
        tx: mpsc::UnboundedSender<Change<String, Made<S>>>,
        stop: CancellationToken,
    ) where
        M: Service<String, Response = S> + Clone + Send + 'static,
        M::Error: Into<BoxError> + Send,
        M::Future: Send + 'static,
        S: Service<Req> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let (made_tx, mut made_rx) =
            mpsc::unbounded_channel::<(String, u64, Result<S, BoxError>)>();
        let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<(String, u64)>();
        let mut versions = cache.versions();
        // Per instance id: address, state, latency EWMA (ns, 0: none).
        let mut slots: BTreeMap<String, (String, Slot, Arc<AtomicU64>)> = BTreeMap::new();
        let mut generation = 0u64;
        let backoff = |attempts: u32| {
            let d = Duration::from_millis(100)
                .saturating_mul(1 << attempts.min(10))
                .min(Duration::from_secs(5));
            d.mul_f64(rand::rng().random_range(0.5..=1.0))
        };
        loop {
            // Membership.
            let instances = cache.instances();
            let current: BTreeMap<String, String> = instances
                .iter()
                .map(|i| (i.id.clone(), i.endpoint()))
                .collect();
            let gone: Vec<String> = slots
                .iter()
                .filter(|(id, (addr, _, _))| current.get(*id) != Some(addr))
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                slots.remove(&id);
                let _ = tx.send(Change::Remove(id));
            }
            for (id, address) in current {
                if let std::collections::btree_map::Entry::Vacant(slot) = slots.entry(id) {
                    generation += 1;
                    spawn_make(
                        make.clone(),
                        made_tx.clone(),
                        slot.key(),
                        &address,
                        generation,
                    );
                    slot.insert((address, Slot::Making(generation, 0), Arc::default()));
                }
            }
            let next = slots
                .values()
                .filter_map(|(_, s, _)| match s {
                    Slot::Ejected(until, _) => Some(*until),
                    _ => None,
                })
                .min()
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = versions.changed() => {
                    if changed.is_err() || versions.borrow_and_update().closed {
                        // The registry closed: keep the endpoints as they are.
                        stop.cancelled().await;
                        return;
                    }
                }
                Some((id, g, result)) = made_rx.recv() => {
                    let seed = if matches!(slots.get(&id), Some((_, Slot::Making(_, 0), _))) {
                        // Optimistic: a new endpoint is tried first (until
                        // its first answer), so that p2c ever measures it.
                        Duration::from_micros(1)
                    } else {
                        // Made again after a failure: not the fastest, or
                        // it would take the next request at once.
                        mean_rtt(&slots)
                    };
                    if let Some((address, slot, rtt_ns)) = slots.get_mut(&id)
                        && let Slot::Making(x, attempts) = *slot
                        && x == g
                    {
                        match result {
                            Ok(service) => {
                                let seen = Arc::new(Seen { answered: AtomicBool::new(false), rtt_ns: rtt_ns.clone() });
                                *slot = Slot::Ready(g, attempts, seen.clone());
                                let failing = Failing { inner: service, id: id.clone(), generation: g, lost: lost_tx.clone(), seen };
                                let _ = tx.send(Change::Insert(id, PeakEwma::new(
                                    failing,
                                    seed,
                                    Duration::from_secs(10).as_nanos() as f64,
                                    CompleteOnResponse::default(),
                                )));
                            }
                            Err(error) => {
                                tracing::warn!(id, %address, %error, "making the endpoint's service failed; ejected");
                                *slot = Slot::Ejected(tokio::time::Instant::now() + backoff(attempts), attempts + 1);
                            }
                        }
                    }
                }
                Some((id, g)) = lost_rx.recv() => {
                    if let Some((_, slot, _)) = slots.get_mut(&id)
                        && let Slot::Ready(x, attempts, seen) = &*slot
                        && *x == g
                    {
                        // Failures in a row grow the backoff; an answered
                        // call since the endpoint was made starts it over.
                        let attempts = if seen.answered.load(Ordering::Relaxed) { 0 } else { *attempts };
                        let delay = backoff(attempts);
                        tracing::info!(id, back_in = ?delay, "endpoint failed a call; ejected");
                        *slot = Slot::Ejected(tokio::time::Instant::now() + delay, attempts.saturating_add(1));
                        let _ = tx.send(Change::Remove(id));
                    }
                }
                _ = tokio::time::sleep_until(next) => {
                    let now = tokio::time::Instant::now();
                    for (id, (address, slot, _)) in slots.iter_mut() {
                        if let Slot::Ejected(until, attempts) = *slot && until <= now {
                            generation += 1;
                            spawn_make(make.clone(), made_tx.clone(), id, address, generation);
                            *slot = Slot::Making(generation, attempts);
                        }
                    }
                }
            }
        }
    }

    /// The mean of the latencies measured over the endpoints.
    fn mean_rtt(slots: &BTreeMap<String, (String, Slot, Arc<AtomicU64>)>) -> Duration {
        let (sum, n) = slots
            .values()
            .map(|(_, _, rtt)| rtt.load(Ordering::Relaxed))
            .filter(|ns| *ns > 0)
            .fold((0u128, 0u128), |(sum, n), ns| (sum + u128::from(ns), n + 1));
        match sum.checked_div(n) {
            Some(mean) => Duration::from_nanos(u64::try_from(mean).unwrap_or(u64::MAX)),
            None => FALLBACK_RTT,
        }
    }

    /// Makes one endpoint's service in the background.
    fn spawn_make<M, S>(
        mut make: M,
        made_tx: mpsc::UnboundedSender<(String, u64, Result<S, BoxError>)>,
        id: &str,
        address: &str,
        generation: u64,
    ) where
        M: Service<String, Response = S> + Send + 'static,
        M::Error: Into<BoxError> + Send,
        M::Future: Send + 'static,
        S: Send + 'static,
    {
        let (id, address) = (id.to_owned(), address.to_owned());
        tokio::spawn(async move {
            let result: Result<S, BoxError> = match make.ready().await {
                Ok(make) => {
                    let call = make.call(address);
                    call.await.map_err(Into::into)
                }
                Err(e) => Err(e.into()),
            };
            let _ = made_tx.send((id, generation, result));
        });
    }

    impl<Req, Resp> Service<Req> for Balance<Req, Resp>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
    {
        type Response = Resp;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Resp, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, request: Req) -> Self::Future {
            let call = self.inner.call(request);
            Box::pin(call)
        }
    }
}
