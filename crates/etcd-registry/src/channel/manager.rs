//! The task behind a [`Channel`](super::Channel): turns the cache's instances
//! into the balancers' endpoints.
//!
//! It decides membership (empty-set protection, then subsetting), connects
//! each member eagerly, ejects on connect failure, lost connection or too
//! many `UNAVAILABLE` answers, reconnects after capped exponential backoff,
//! drains removed members, and feeds the two balancers (same zone, other
//! zones) with `Change`s. Everything here is decided in one task, so no lock
//! is held across the request path: the request path reads only atomics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwma};

use super::endpoint::{EndpointService, EndpointShared, Event, LostSignal, Stats, connect};
use super::metrics::Labels;
use super::{EndpointState, Options, Phase};
use crate::cache::{ServiceCache, Version};
use crate::instance::ServiceInstance;

/// What a balancer holds per endpoint.
pub(crate) type Balanced = PeakEwma<EndpointService>;
pub(crate) type ChangeTx = mpsc::UnboundedSender<Change<String, Balanced>>;

/// What the manager publishes to the channel handles.
#[derive(Default)]
pub(crate) struct Published {
    pub(crate) rows: Mutex<Vec<Row>>,
    /// Endpoints in the same-zone balancer, in the other one, and members of
    /// the same zone: the request path's locality split.
    pub(crate) local_ready: std::sync::atomic::AtomicUsize,
    pub(crate) remote_ready: std::sync::atomic::AtomicUsize,
    pub(crate) local_known: std::sync::atomic::AtomicUsize,
    /// The endpoints in either balancer (same zone first), for retries,
    /// which must go to an endpoint not tried yet.
    pub(crate) ready: Mutex<Arc<Vec<EndpointService>>>,
}

/// One line of [`Channel::endpoints`](super::Channel::endpoints).
pub(crate) struct Row {
    id: String,
    address: String,
    zone: Option<String>,
    phase: Phase,
    stats: Arc<Stats>,
}

impl Row {
    pub(crate) fn state(&self) -> EndpointState {
        EndpointState {
            id: self.id.clone(),
            address: self.address.clone(),
            zone: self.zone.clone(),
            phase: self.phase,
            in_flight: self.stats.in_flight.load(Ordering::Acquire),
            requests: self.stats.requests.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
            latency_ewma: self.stats.latency_ewma(),
        }
    }
}

enum State {
    Connecting {
        generation: u64,
    },
    Ready,
    /// Out of the balancer until `until`; `outlier`: the connection is up.
    Ejected {
        until: Instant,
        outlier: bool,
    },
}

struct Live {
    shared: Arc<EndpointShared>,
    channel: tonic::transport::Channel,
    since: Instant,
}

struct Member {
    instance: Arc<ServiceInstance>,
    local: bool,
    state: State,
    live: Option<Live>,
    /// Failed attempts since the last stable connection (backoff exponent).
    attempts: u32,
    /// Closes the socket of the current (or pending) connection.
    close: CancellationToken,
    stats: Arc<Stats>,
    labels: Labels,
}

struct Drain {
    id: String,
    address: String,
    zone: Option<String>,
    live: Live,
    deadline: Instant,
}

pub(crate) struct Manager {
    pub(crate) service: String,
    pub(crate) options: Arc<Options>,
    pub(crate) cache: ServiceCache,
    pub(crate) local: ChangeTx,
    pub(crate) remote: ChangeTx,
    pub(crate) published: Arc<Published>,
    pub(crate) stop: CancellationToken,
    /// The protection period: the registry's TTL unless set.
    pub(crate) protect_for: Duration,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    members: BTreeMap<String, Member>,
    drains: Vec<Drain>,
    /// What each balancer was told: id → (same zone, generation).
    inserted: HashMap<String, (bool, u64)>,
    /// The latency guess an endpoint not measured yet was inserted with.
    seeded: HashMap<String, Duration>,
    /// The ids the cache held at the last change.
    last_view: BTreeSet<String>,
    /// The membership before subsetting, as last decided.
    known: BTreeMap<String, Arc<ServiceInstance>>,
    /// Instances a re-list dropped, kept until `held_until`.
    held: BTreeMap<String, Arc<ServiceInstance>>,
    held_until: Option<Instant>,
    held_base: usize,
    generation: u64,
    /// The cache's re-list count when last read: a re-list happened since
    /// when it moved, however many publications came after it.
    relists: u64,
}

impl Manager {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        service: String,
        options: Arc<Options>,
        cache: ServiceCache,
        local: ChangeTx,
        remote: ChangeTx,
        published: Arc<Published>,
        stop: CancellationToken,
        protect_for: Duration,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            service,
            options,
            cache,
            local,
            remote,
            published,
            stop,
            protect_for,
            events_tx,
            events_rx,
            members: BTreeMap::new(),
            drains: Vec::new(),
            inserted: HashMap::new(),
            seeded: HashMap::new(),
            last_view: BTreeSet::new(),
            known: BTreeMap::new(),
            held: BTreeMap::new(),
            held_until: None,
            held_base: 0,
            generation: 0,
            relists: 0,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut versions = self.cache.versions();
        self.relists = versions.borrow_and_update().relists;
        self.refresh(false);
        self.reconcile();
        let mut watching = true;
        loop {
            let deadline = tokio::time::Instant::from_std(self.next_deadline());
            tokio::select! {
                _ = self.stop.cancelled() => break,
                changed = versions.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                    } else {
                        let version: Version = *versions.borrow_and_update();
                        watching = !version.closed;
                        let relisted = version.relists != self.relists;
                        self.relists = version.relists;
                        self.refresh(relisted);
                    }
                }
                Some(event) = self.events_rx.recv() => self.on_event(event),
                _ = tokio::time::sleep_until(deadline) => {}
            }
            self.tick();
            self.reconcile();
        }
        for member in self.members.values() {
            member.close.cancel();
        }
        for drain in &self.drains {
            drain.live.shared.cancel.cancel();
        }
    }

    /// Applies the cache's current instances.
    fn refresh(&mut self, relisted: bool) {
        let now = Instant::now();
        let view = self.cache.instances();
        let current: BTreeMap<String, Arc<ServiceInstance>> = view
            .as_slice()
            .iter()
            .map(|i| (i.id.clone(), i.clone()))
            .collect();
        if !relisted {
            // Explicit deregistrations apply at once, protected or not.
            for id in self
                .last_view
                .iter()
                .filter(|id| !current.contains_key(*id))
            {
                self.held.remove(id);
            }
        }
        let base = self.known.len();
        let below = self.options.protect_below;
        if relisted && base > 0 && (current.len() as f64) < base as f64 * below {
            for (id, instance) in &self.known {
                if !current.contains_key(id) {
                    self.held.insert(id.clone(), instance.clone());
                }
            }
            if self.held_until.is_none() {
                self.held_until = Some(now + self.protect_for);
                self.held_base = base;
                tracing::warn!(
                    service = %self.service, before = base, after = current.len(),
                    keep_for = ?self.protect_for,
                    "a re-list dropped most instances; keeping the last known set"
                );
            }
        }
        if self.held_until.is_some()
            && (current.len() as f64 >= self.held_base as f64 * below || self.held.is_empty())
        {
            tracing::info!(service = %self.service, instances = current.len(), "instances are back; protection ends");
            self.end_protection();
        }
        self.last_view = current.keys().cloned().collect();
        let mut known = current;
        for (id, instance) in &self.held {
            known.entry(id.clone()).or_insert_with(|| instance.clone());
        }
        self.known = known;
        self.apply_known();
    }

    fn end_protection(&mut self) {
        self.held.clear();
        self.held_until = None;
        self.held_base = 0;
    }

    /// Chooses the members from the known set and adds or retires endpoints.
    fn apply_known(&mut self) {
        let all: Vec<&Arc<ServiceInstance>> = self.known.values().collect();
        let chosen: BTreeMap<String, Arc<ServiceInstance>> = match self.options.subset {
            Some(k) => super::subset::subset(&all, self.options.client_id, k)
                .into_iter()
                .map(|i| (all[i].id.clone(), all[i].clone()))
                .collect(),
            None => all.iter().map(|i| (i.id.clone(), (*i).clone())).collect(),
        };
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(id, m)| {
                chosen
                    .get(*id)
                    .is_none_or(|i| i.endpoint() != m.instance.endpoint())
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.retire(&id);
        }
        for (id, instance) in chosen {
            let local = self.is_local(&instance);
            match self.members.get_mut(&id) {
                Some(member) => {
                    member.instance = instance;
                    member.local = local;
                }
                None => self.add(id, instance, local),
            }
        }
    }

    fn is_local(&self, instance: &ServiceInstance) -> bool {
        match &self.options.zone {
            None => true,
            Some(zone) => instance.metadata.get(super::ZONE_KEY) == Some(zone),
        }
    }

    fn add(&mut self, id: String, instance: Arc<ServiceInstance>, local: bool) {
        let labels = Labels::new(&self.service, &instance.endpoint());
        let member = Member {
            instance,
            local,
            state: State::Ejected {
                until: Instant::now(),
                outlier: false,
            },
            live: None,
            attempts: 0,
            close: CancellationToken::new(),
            stats: Arc::default(),
            labels,
        };
        self.members.insert(id.clone(), member);
        self.start_connect(&id);
    }

    fn start_connect(&mut self, id: &str) {
        let Some(member) = self.members.get_mut(id) else {
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        member.close = CancellationToken::new();
        member.state = State::Connecting { generation };
        let signal = LostSignal {
            id: id.to_owned(),
            generation,
            dead: Arc::new(AtomicBool::new(false)),
            events: self.events_tx.clone(),
            close: member.close.clone(),
        };
        let address = member.instance.endpoint();
        let events = self.events_tx.clone();
        let timeout = self.options.connect_timeout;
        let id = id.to_owned();
        tokio::spawn(async move {
            let result = connect(&address, timeout, signal).await;
            let _ = events.send(Event::Connected {
                id,
                generation,
                result,
            });
        });
    }

    /// Takes a member out: no new requests; its in-flight ones finish.
    fn retire(&mut self, id: &str) {
        let Some(member) = self.members.remove(id) else {
            return;
        };
        match member.live {
            Some(live) => {
                live.shared.closed.store(true, Ordering::Release);
                tracing::debug!(service = %self.service, id, "draining");
                self.drains.push(Drain {
                    id: id.to_owned(),
                    address: member.instance.endpoint(),
                    zone: member.instance.metadata.get(super::ZONE_KEY).cloned(),
                    live,
                    deadline: Instant::now() + self.options.drain_timeout,
                });
            }
            None => member.close.cancel(),
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let base = self.options.backoff_base;
        let capped = base
            .saturating_mul(1u32 << attempts.min(20))
            .min(self.options.backoff_max);
        capped.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn eject(&mut self, id: &str, outlier: bool, reason: &'static str) {
        let Some(attempts) = self.members.get(id).map(|m| m.attempts) else {
            return;
        };
        let delay = self.backoff(attempts);
        let Some(member) = self.members.get_mut(id) else {
            return;
        };
        member.attempts = attempts.saturating_add(1);
        member.stats.failures.fetch_add(
            u64::from(!matches!(reason, "outlier" | "goaway")),
            Ordering::Relaxed,
        );
        member.state = State::Ejected {
            until: Instant::now() + delay,
            outlier,
        };
        super::metrics::ejected(&member.labels, reason);
        tracing::info!(
            service = %self.service, id, address = %member.instance.endpoint(), reason,
            back_in = ?delay, "endpoint ejected"
        );
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected {
                id,
                generation,
                result,
            } => {
                let Some(member) = self.members.get_mut(&id) else {
                    return;
                };
                if !matches!(member.state, State::Connecting { generation: g } if g == generation) {
                    return;
                }
                // A connection lost before this event came (its `Lost` was
                // ignored while connecting) counts as a failed connect.
                let result = result.and_then(|(channel, dead)| {
                    if dead.load(Ordering::Acquire) {
                        Err("connection closed right after connecting".to_owned())
                    } else {
                        Ok((channel, dead))
                    }
                });
                match result {
                    Ok((channel, dead)) => {
                        let shared = Arc::new(EndpointShared {
                            id: Arc::from(id.as_str()),
                            generation,
                            stats: member.stats.clone(),
                            dead,
                            closed: AtomicBool::new(false),
                            cancel: member.close.clone(),
                            events: self.events_tx.clone(),
                            outlier_after: self.options.outlier_after,
                            labels: member.labels.clone(),
                        });
                        member.live = Some(Live {
                            shared,
                            channel,
                            since: Instant::now(),
                        });
                        member.state = State::Ready;
                        tracing::debug!(service = %self.service, id, "endpoint connected");
                    }
                    Err(error) => {
                        // Warned once per outage, not at every retry.
                        if member.attempts == 0 {
                            tracing::warn!(service = %self.service, id, %error, "connect failed");
                        } else {
                            tracing::debug!(service = %self.service, id, %error, "connect failed");
                        }
                        self.eject(&id, false, "connect");
                    }
                }
            }
            Event::GoingAway { id, generation } => self.going_away(&id, generation),
            Event::Lost { id, generation } => {
                if let Some(i) = self
                    .drains
                    .iter()
                    .position(|d| d.live.shared.generation == generation)
                {
                    self.drains.swap_remove(i);
                    return;
                }
                let Some(member) = self.members.get_mut(&id) else {
                    return;
                };
                if member
                    .live
                    .as_ref()
                    .is_none_or(|l| l.shared.generation != generation)
                {
                    return;
                }
                let Some(live) = member.live.take() else {
                    return;
                };
                live.shared.dead.store(true, Ordering::Release);
                member.close.cancel();
                if live.since.elapsed() > Duration::from_secs(10) {
                    member.attempts = 0;
                }
                self.eject(&id, false, "lost");
            }
            Event::Outlier { id, generation } => {
                let Some(member) = self.members.get(&id) else {
                    return;
                };
                let current = member
                    .live
                    .as_ref()
                    .is_some_and(|l| l.shared.generation == generation);
                if current && matches!(member.state, State::Ready) {
                    self.eject(&id, true, "outlier");
                }
            }
        }
    }

    /// The server closes the member's connection gracefully: it drains (its
    /// calls finish, or the drain timeout cancels them) while the member
    /// connects again after the usual backoff.
    fn going_away(&mut self, id: &str, generation: u64) {
        let Some(member) = self.members.get_mut(id) else {
            return;
        };
        if member
            .live
            .as_ref()
            .is_none_or(|l| l.shared.generation != generation)
        {
            return;
        }
        let Some(live) = member.live.take() else {
            return;
        };
        live.shared.dead.store(true, Ordering::Release);
        if live.since.elapsed() > Duration::from_secs(10) {
            member.attempts = 0;
        }
        tracing::debug!(service = %self.service, id, "server going away; draining its connection");
        self.drains.push(Drain {
            id: id.to_owned(),
            address: member.instance.endpoint(),
            zone: member.instance.metadata.get(super::ZONE_KEY).cloned(),
            live,
            deadline: Instant::now() + self.options.drain_timeout,
        });
        // A fresh token for the next connection: the drained one keeps its own.
        member.close = CancellationToken::new();
        self.eject(id, false, "goaway");
    }

    /// Acts on what is due.
    fn tick(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, bool)> = self
            .members
            .iter()
            .filter_map(|(id, m)| match m.state {
                State::Ejected { until, .. } if until <= now => {
                    Some((id.clone(), m.live.is_some()))
                }
                _ => None,
            })
            .collect();
        for (id, live) in due {
            if live {
                if let Some(member) = self.members.get_mut(&id) {
                    member.state = State::Ready;
                }
            } else {
                self.start_connect(&id);
            }
        }
        self.drains.retain(|d| {
            let idle = d.live.shared.stats.in_flight.load(Ordering::Acquire) == 0;
            if idle || d.deadline <= now {
                if !idle {
                    tracing::warn!(id = %d.id, "drain timed out; cancelling in-flight requests");
                }
                d.live.shared.cancel.cancel();
                false
            } else {
                true
            }
        });
        if self.held_until.is_some_and(|t| t <= now) {
            tracing::warn!(
                service = %self.service, held = self.held.len(),
                "protection expired; dropping instances that did not come back"
            );
            self.end_protection();
            self.refresh(false);
        }
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        for member in self.members.values() {
            if let State::Ejected { until, .. } = member.state {
                next = next.min(until);
            }
        }
        if !self.drains.is_empty() {
            // In-flight counts are polled while draining.
            next = next.min(now + Duration::from_millis(20));
        }
        if let Some(until) = self.held_until {
            next = next.min(until);
        }
        if !self.seeded.is_empty() {
            // Endpoints still unmeasured are re-seeded now and then.
            next = next.min(now + Duration::from_millis(500));
        }
        next
    }

    /// Tells the balancers what changed, and publishes the state.
    fn reconcile(&mut self) {
        let known = self.members.len();
        let ready = self
            .members
            .values()
            .filter(|m| matches!(m.state, State::Ready) && m.live.is_some())
            .count();
        let panic = known > 0 && (ready as f64) < self.options.panic_threshold * known as f64;
        let mut wanted: HashMap<String, (bool, u64)> = HashMap::new();
        for (id, member) in &self.members {
            let Some(live) = &member.live else { continue };
            let eligible = match member.state {
                State::Ready => true,
                State::Ejected { outlier: true, .. } => panic,
                _ => false,
            };
            if eligible {
                wanted.insert(id.clone(), (member.local, live.shared.generation));
            }
        }
        let stale: Vec<(String, bool)> = self
            .inserted
            .iter()
            .filter(|(id, v)| wanted.get(*id) != Some(*v))
            .map(|(id, (local, _))| (id.clone(), *local))
            .collect();
        for (id, local) in stale {
            self.inserted.remove(&id);
            let tx = if local { &self.local } else { &self.remote };
            let _ = tx.send(Change::Remove(id));
        }
        // An endpoint not measured yet starts at the mean of those measured
        // (its own past latency, if any, counts): a fixed guess above the
        // real latency would make p2c never try it, one below would flood it.
        let measured: Vec<Duration> = self
            .members
            .values()
            .filter_map(|m| m.stats.latency_ewma())
            .collect();
        let mean_rtt = if measured.is_empty() {
            self.options.default_rtt
        } else {
            measured.iter().sum::<Duration>() / measured.len() as u32
        };
        self.seeded.retain(|id, _| wanted.contains_key(id));
        for (id, value) in &wanted {
            let Some(member) = self.members.get(id) else {
                continue;
            };
            let unmeasured = member.stats.latency_ewma().is_none();
            if self.inserted.get(id) == Some(value) {
                // Re-seed an endpoint still unmeasured when the others'
                // latency moved far from its guess, or p2c may never try it.
                let stale = self.seeded.get(id).is_some_and(|seed| {
                    unmeasured && (*seed > mean_rtt * 2 || *seed * 2 < mean_rtt)
                });
                if !stale {
                    continue;
                }
            }
            let Some(live) = member.live.as_ref() else {
                continue;
            };
            if unmeasured {
                self.seeded.insert(id.clone(), mean_rtt);
            } else {
                self.seeded.remove(id);
            }
            let service = PeakEwma::new(
                EndpointService::new(live.channel.clone(), live.shared.clone()),
                mean_rtt,
                self.options.decay.as_nanos() as f64,
                CompleteOnResponse::default(),
            );
            let tx = if value.0 { &self.local } else { &self.remote };
            let _ = tx.send(Change::Insert(id.clone(), service));
            self.inserted.insert(id.clone(), *value);
        }
        let local_ready = wanted.values().filter(|v| v.0).count();
        let mut ready: Vec<(bool, EndpointService)> = wanted
            .iter()
            .filter_map(|(id, (local, _))| {
                let live = self.members.get(id)?.live.as_ref()?;
                Some((
                    !*local,
                    EndpointService::new(live.channel.clone(), live.shared.clone()),
                ))
            })
            .collect();
        ready.sort_by_key(|(remote, _)| *remote);
        *self
            .published
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            Arc::new(ready.into_iter().map(|(_, s)| s).collect());
        let published = &self.published;
        published.local_ready.store(local_ready, Ordering::Release);
        published
            .remote_ready
            .store(wanted.len() - local_ready, Ordering::Release);
        published.local_known.store(
            self.members.values().filter(|m| m.local).count(),
            Ordering::Release,
        );
        let mut rows: Vec<Row> = self
            .members
            .iter()
            .map(|(id, m)| Row {
                id: id.clone(),
                address: m.instance.endpoint(),
                zone: m.instance.metadata.get(super::ZONE_KEY).cloned(),
                phase: match m.state {
                    State::Connecting { .. } => Phase::Connecting,
                    State::Ready => Phase::Ready,
                    State::Ejected { until, .. } => Phase::Ejected { until },
                },
                stats: m.stats.clone(),
            })
            .collect();
        rows.extend(self.drains.iter().map(|d| Row {
            id: d.id.clone(),
            address: d.address.clone(),
            zone: d.zone.clone(),
            phase: Phase::Draining,
            stats: d.live.shared.stats.clone(),
        }));
        *published.rows.lock().unwrap_or_else(|e| e.into_inner()) = rows;
    }
}
