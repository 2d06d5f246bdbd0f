//! The dashboard's one view of etcd: what the sources (watches, observe
//! streams, probes) report, and the changes every browser is sent.
//!
//! The sources are the only writers. Each change is applied under one lock
//! and published on a broadcast channel while that lock is held, so a browser
//! that subscribes (snapshot + receiver, also under the lock) sees every
//! change after its snapshot exactly once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_registry::{InstanceRevision, LeaderInfo, LockSummary, ServiceEvent, ServiceInstance};

/// A leader as the page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    pub proposal: String,
    pub fencing_token: i64,
    pub lease_id: i64,
}

impl From<&LeaderInfo> for Leader {
    fn from(l: &LeaderInfo) -> Self {
        Leader {
            proposal: l.proposal_str().into_owned(),
            fencing_token: l.fencing_token,
            lease_id: l.lease_id,
        }
    }
}

/// A lock's holder as the page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockView {
    pub name: String,
    pub fencing_token: i64,
    pub lease_id: i64,
    pub waiters: usize,
}

impl From<LockSummary> for LockView {
    fn from(l: LockSummary) -> Self {
        LockView {
            name: l.name,
            fencing_token: l.fencing_token,
            lease_id: l.lease_id,
            waiters: l.waiters,
        }
    }
}

/// Where an instance key stands in etcd's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRevision {
    pub name: String,
    pub id: String,
    pub create_revision: i64,
    pub lease_id: i64,
}

impl From<InstanceRevision> for KeyRevision {
    fn from(r: InstanceRevision) -> Self {
        KeyRevision {
            name: r.name,
            id: r.id,
            create_revision: r.create_revision,
            lease_id: r.lease_id,
        }
    }
}
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::common::output::lease_hex;

/// How long the instance-count history of a service reaches back.
pub const HISTORY: Duration = Duration::from_secs(10 * 60);
/// How often the instance counts are sampled for the history.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Changes buffered per browser; one that falls further behind is sent a
/// fresh snapshot instead of the changes it missed.
const BROADCAST_CAPACITY: usize = 4096;

/// One change as sent to every browser: an SSE event name and its JSON data,
/// serialised once for all of them.
#[derive(Clone, Debug)]
pub struct Msg {
    pub event: &'static str,
    pub data: Arc<str>,
}

/// (namespace, service, id)
type InstanceKey = (String, String, String);
/// (namespace, name)
type NameKey = (String, String);

pub struct Hub {
    state: Mutex<State>,
    tx: broadcast::Sender<Msg>,
}

struct State {
    all_namespaces: bool,
    started_ms: u64,
    /// Namespaces whose first snapshot arrived, with its time.
    namespaces: BTreeMap<String, u64>,
    instances: BTreeMap<InstanceKey, Inst>,
    counts: BTreeMap<NameKey, usize>,
    /// Samples of the counts, oldest first: (time, counts of the services then present).
    history: VecDeque<(u64, BTreeMap<NameKey, usize>)>,
    elections: BTreeMap<NameKey, ElectionView>,
    /// Locks with a holder, and since when that holder holds it (as seen here).
    locks: BTreeMap<NameKey, (LockView, u64)>,
    connection: Connection,
}

struct Inst {
    instance: ServiceInstance,
    create_revision: Option<i64>,
    lease_id: Option<i64>,
    /// When the dashboard saw it appear; `None` when it was already there
    /// when its namespace was first read (its age is then a lower bound).
    since_ms: Option<u64>,
}

struct ElectionView {
    leader: Option<Leader>,
    candidates: usize,
    /// When the leader last changed, as seen here.
    since_ms: u64,
}

/// What the dashboard knows of its connection to etcd.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Connection {
    pub endpoints: Vec<EndpointView>,
    /// At least one endpoint answered the last probe.
    pub connected: bool,
    pub lost_since_ms: Option<u64>,
    /// The lease state of the dashboard's registry (`Active`, `Degraded`, ...).
    pub registry_state: String,
    /// The last etcd revision the watches caught up to, per namespace.
    pub revisions: BTreeMap<String, i64>,
    /// Recoverable errors the watches met and recovered from, per namespace.
    pub watch_errors: BTreeMap<String, u64>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    pub endpoint: String,
    /// `Ok(version)` or `Err(why it did not answer)`.
    pub result: Result<String, String>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    pub fn new(all_namespaces: bool, endpoints: &[String]) -> Arc<Self> {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let connection = Connection {
            endpoints: endpoints
                .iter()
                .map(|e| EndpointView {
                    endpoint: e.clone(),
                    result: Err("not probed yet".into()),
                })
                .collect(),
            registry_state: "Connecting".into(),
            ..Connection::default()
        };
        Arc::new(Hub {
            state: Mutex::new(State {
                all_namespaces,
                started_ms: now_ms(),
                namespaces: BTreeMap::new(),
                instances: BTreeMap::new(),
                counts: BTreeMap::new(),
                history: VecDeque::new(),
                elections: BTreeMap::new(),
                locks: BTreeMap::new(),
                connection,
            }),
            tx,
        })
    }

    /// The current snapshot and a receiver of every later change.
    pub fn subscribe(&self) -> (Msg, broadcast::Receiver<Msg>) {
        let state = lock(&self.state);
        let rx = self.tx.subscribe();
        (msg("snapshot", state.snapshot()), rx)
    }

    /// Sends a change to every browser; called with the state locked.
    fn publish(&self, event: &'static str, data: Value) {
        // No receiver is not an error: nobody has the page open.
        let _ = self.tx.send(msg(event, data));
    }

    /// Applies the first item of a namespace's watch.
    pub fn namespace_snapshot(&self, namespace: &str, all: Vec<ServiceInstance>, revision: i64) {
        let mut state = lock(&self.state);
        let now = now_ms();
        state.namespaces.insert(namespace.to_owned(), now);
        // A namespace read again (its watch restarted) replaces what was known of it.
        let old: Vec<InstanceKey> = state
            .instances
            .keys()
            .filter(|k| k.0 == namespace)
            .cloned()
            .collect();
        for key in old {
            state.remove(&key);
        }
        for instance in all {
            state.insert(namespace, instance, None);
        }
        state
            .connection
            .revisions
            .insert(namespace.to_owned(), revision);
        let snapshot = state.snapshot();
        self.publish("snapshot", snapshot);
    }

    /// Applies one change of a namespace's watch.
    pub fn apply(&self, namespace: &str, event: ServiceEvent) {
        let mut state = lock(&self.state);
        let (kind, instance) = match event {
            ServiceEvent::Snapshot(all) => {
                drop(state);
                // The library sends one snapshot per watch, first; a second one is
                // not expected, but applying it as such is always right.
                self.namespace_snapshot(namespace, all, 0);
                return;
            }
            ServiceEvent::Added(i) => ("added", i),
            ServiceEvent::Updated(i) => ("updated", i),
            ServiceEvent::Removed(i) => ("removed", i),
        };
        let key = (
            namespace.to_owned(),
            instance.name.clone(),
            instance.id.clone(),
        );
        let data = match kind {
            "removed" => {
                state.remove(&key);
                instance_json(namespace, &instance, None)
            }
            _ => {
                let since = state
                    .instances
                    .get(&key)
                    .map_or(Some(now_ms()), |old| old.since_ms);
                state.insert(namespace, instance, since);
                state.instance_value(&key)
            }
        };
        self.publish(kind, data);
    }

    pub fn set_revision(&self, namespace: &str, revision: i64, errors: u64) {
        let mut state = lock(&self.state);
        let c = &mut state.connection;
        c.revisions.insert(namespace.to_owned(), revision);
        c.watch_errors.insert(namespace.to_owned(), errors);
        // Revisions move with every change; browsers get them with the next
        // connection event or tick rather than one event per write.
    }

    /// Records the create revisions and leases of a namespace's instance keys;
    /// publishes those that changed.
    pub fn set_revisions(&self, namespace: &str, revisions: Vec<KeyRevision>) {
        let mut state = lock(&self.state);
        let mut changed = Vec::new();
        for r in revisions {
            let key = (namespace.to_owned(), r.name, r.id);
            if let Some(inst) = state.instances.get_mut(&key)
                && (inst.create_revision != Some(r.create_revision)
                    || inst.lease_id != Some(r.lease_id))
            {
                inst.create_revision = Some(r.create_revision);
                inst.lease_id = Some(r.lease_id);
                changed.push(json!({
                    "namespace": key.0, "name": key.1, "id": key.2,
                    "create_revision": r.create_revision,
                    "lease": lease_hex(r.lease_id),
                }));
            }
        }
        if !changed.is_empty() {
            self.publish("revisions", Value::Array(changed));
        }
    }

    /// Whether some instance of the namespace lacks its create revision.
    pub fn missing_revisions(&self, namespace: &str) -> bool {
        lock(&self.state)
            .instances
            .iter()
            .any(|(k, i)| k.0 == namespace && i.create_revision.is_none())
    }

    /// The leader an observe stream reported.
    pub fn set_leader(&self, namespace: &str, name: &str, leader: Option<Leader>) {
        let mut state = lock(&self.state);
        let key = (namespace.to_owned(), name.to_owned());
        let view = state.elections.entry(key.clone()).or_insert(ElectionView {
            leader: None,
            candidates: 0,
            since_ms: now_ms(),
        });
        if view.leader == leader {
            return;
        }
        view.leader = leader;
        view.since_ms = now_ms();
        if view.leader.is_none() {
            view.candidates = 0;
        } else {
            view.candidates = view.candidates.max(1);
        }
        let data = election_json(&key, view);
        self.publish("election", data);
    }

    /// The candidate counts of a poll of the namespace's elections; an
    /// election known here and absent from the poll has none. Returns the
    /// names that are new.
    pub fn set_candidates(&self, namespace: &str, counts: &BTreeMap<String, usize>) -> Vec<String> {
        let mut state = lock(&self.state);
        let mut new = Vec::new();
        let mut changed = Vec::new();
        let known: BTreeSet<String> = state
            .elections
            .keys()
            .filter(|k| k.0 == namespace)
            .map(|k| k.1.clone())
            .collect();
        for name in counts.keys().filter(|n| !known.contains(*n)) {
            new.push(name.clone());
        }
        for (key, view) in state.elections.iter_mut().filter(|(k, _)| k.0 == namespace) {
            let n = counts.get(&key.1).copied().unwrap_or(0);
            if view.candidates != n {
                view.candidates = n;
                changed.push(election_json(key, view));
            }
        }
        for data in changed {
            self.publish("election", data);
        }
        new
    }

    /// The locks of a poll of the namespace; publishes a `lock` event for
    /// each that changed, with `holder: null` for one nobody holds any more.
    pub fn set_locks(&self, namespace: &str, locks: Vec<LockView>) {
        let mut state = lock(&self.state);
        let fresh: BTreeMap<NameKey, LockView> = locks
            .into_iter()
            .map(|l| ((namespace.to_owned(), l.name.clone()), l))
            .collect();
        let gone: Vec<NameKey> = state
            .locks
            .keys()
            .filter(|k| k.0 == namespace && !fresh.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            state.locks.remove(&key);
            self.publish("lock", lock_json(&key, None));
        }
        let now = now_ms();
        for (key, view) in fresh {
            let since = match state.locks.get(&key) {
                Some((old, _)) if *old == view => continue,
                Some((old, since)) if old.fencing_token == view.fencing_token => *since,
                _ => now,
            };
            let data = lock_json(&key, Some((&view, since)));
            state.locks.insert(key, (view, since));
            self.publish("lock", data);
        }
    }

    pub fn locks_json(&self) -> Value {
        let state = lock(&self.state);
        Value::Array(
            state
                .locks
                .iter()
                .map(|(k, (v, since))| lock_json(k, Some((v, *since))))
                .collect(),
        )
    }

    pub fn set_connection(&self, update: impl FnOnce(&mut Connection)) {
        let mut state = lock(&self.state);
        let before = state.connection.clone();
        update(&mut state.connection);
        let c = &mut state.connection;
        match (c.connected, c.lost_since_ms) {
            (false, None) => c.lost_since_ms = Some(now_ms()),
            (true, Some(_)) => c.lost_since_ms = None,
            _ => {}
        }
        if state.connection != before {
            let data = state.connection_json();
            self.publish("connection", data);
        }
    }

    /// Samples the instance counts for the history; publishes the sample
    /// and the connection (whose revisions have moved meanwhile).
    pub fn tick(&self) {
        let mut state = lock(&self.state);
        let now = now_ms();
        let sample = state.counts.clone();
        state.history.push_back((now, sample));
        let horizon = now.saturating_sub(HISTORY.as_millis() as u64);
        while state.history.front().is_some_and(|(t, _)| *t < horizon) {
            state.history.pop_front();
        }
        let counts: Vec<Value> = state
            .counts
            .iter()
            .map(|((ns, name), n)| json!({"namespace": ns, "name": name, "instances": n}))
            .collect();
        let connection = state.connection_json();
        self.publish("tick", json!({"time_ms": now, "counts": counts}));
        self.publish("connection", connection);
    }

    pub fn services_json(&self) -> Value {
        Value::Array(lock(&self.state).services())
    }

    /// The instances of service `name` (in `namespace`, or in any), or
    /// `None` when there is no such service.
    pub fn service_json(&self, name: &str, namespace: Option<&str>) -> Option<Value> {
        let state = lock(&self.state);
        let instances: Vec<Value> = state
            .instances
            .keys()
            .filter(|k| k.1 == name && namespace.is_none_or(|ns| k.0 == ns))
            .map(|k| state.instance_value(k))
            .collect();
        let known = state
            .counts
            .keys()
            .any(|k| k.1 == name && namespace.is_none_or(|ns| k.0 == ns));
        (known || !instances.is_empty()).then(|| {
            json!({
                "name": name,
                "namespace": namespace,
                "instances": instances,
            })
        })
    }

    pub fn elections_json(&self) -> Value {
        let state = lock(&self.state);
        Value::Array(
            state
                .elections
                .iter()
                .map(|(k, v)| election_json(k, v))
                .collect(),
        )
    }

    pub fn connection_json(&self) -> Value {
        lock(&self.state).connection_json()
    }
}

impl State {
    fn insert(&mut self, namespace: &str, instance: ServiceInstance, since_ms: Option<u64>) {
        let key = (
            namespace.to_owned(),
            instance.name.clone(),
            instance.id.clone(),
        );
        let old = self.instances.remove(&key);
        if old.is_none() {
            *self
                .counts
                .entry((key.0.clone(), key.1.clone()))
                .or_insert(0) += 1;
        }
        // An update keeps the key, so its create revision and lease stand.
        let (create_revision, lease_id) =
            old.map_or((None, None), |o| (o.create_revision, o.lease_id));
        self.instances.insert(
            key,
            Inst {
                instance,
                create_revision,
                lease_id,
                since_ms,
            },
        );
    }

    fn remove(&mut self, key: &InstanceKey) {
        if self.instances.remove(key).is_some() {
            let service = (key.0.clone(), key.1.clone());
            if let Some(n) = self.counts.get_mut(&service) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.counts.remove(&service);
                }
            }
        }
    }

    fn instance_value(&self, key: &InstanceKey) -> Value {
        match self.instances.get(key) {
            Some(inst) => {
                let mut v = instance_json(&key.0, &inst.instance, inst.since_ms);
                v["create_revision"] = json!(inst.create_revision);
                v["lease"] = json!(inst.lease_id.map(lease_hex));
                v
            }
            None => Value::Null,
        }
    }

    /// Services with instances now or at some point of the history.
    fn services(&self) -> Vec<Value> {
        let mut names: BTreeSet<&NameKey> = self.counts.keys().collect();
        for (_, sample) in &self.history {
            names.extend(sample.keys());
        }
        names
            .into_iter()
            .map(|key| {
                // Samples from before the namespace was read would show a false 0.
                let read = self.namespaces.get(&key.0).copied().unwrap_or(u64::MAX);
                let history: Vec<Value> = self
                    .history
                    .iter()
                    .filter(|(t, _)| *t >= read)
                    .map(|(t, sample)| json!([t, sample.get(key).copied().unwrap_or(0)]))
                    .collect();
                json!({
                    "namespace": key.0,
                    "name": key.1,
                    "instances": self.counts.get(key).copied().unwrap_or(0),
                    "history": history,
                })
            })
            .collect()
    }

    fn connection_json(&self) -> Value {
        let c = &self.connection;
        json!({
            "connected": c.connected,
            "lost_since_ms": c.lost_since_ms,
            "registry_state": c.registry_state,
            "revision": c.revisions.values().copied().max().unwrap_or(0),
            "revisions": c.revisions,
            "watch_errors": c.watch_errors.values().sum::<u64>(),
            "last_error": c.last_error,
            "endpoints": c.endpoints.iter().map(|e| match &e.result {
                Ok(version) => json!({"endpoint": e.endpoint, "reachable": true, "version": version}),
                Err(why) => json!({"endpoint": e.endpoint, "reachable": false, "error": why}),
            }).collect::<Vec<_>>(),
        })
    }

    fn snapshot(&self) -> Value {
        json!({
            "now_ms": now_ms(),
            "started_ms": self.started_ms,
            "all_namespaces": self.all_namespaces,
            "namespaces": self.namespaces.iter().map(|(ns, t)| json!({"name": ns, "read_ms": t})).collect::<Vec<_>>(),
            "ready": !self.namespaces.is_empty() || self.all_namespaces,
            "services": self.services(),
            "instances": self.instances.keys().map(|k| self.instance_value(k)).collect::<Vec<_>>(),
            "elections": self.elections.iter().map(|(k, v)| election_json(k, v)).collect::<Vec<_>>(),
            "locks": self.locks.iter().map(|(k, (v, since))| lock_json(k, Some((v, *since)))).collect::<Vec<_>>(),
            "connection": self.connection_json(),
        })
    }
}

fn msg(event: &'static str, data: Value) -> Msg {
    Msg {
        event,
        data: data.to_string().into(),
    }
}

/// An instance as the API shows it: the Go wire fields (with `port` a
/// number when it is one), its namespace, and when it appeared.
fn instance_json(namespace: &str, i: &ServiceInstance, since_ms: Option<u64>) -> Value {
    json!({
        "namespace": namespace,
        "name": i.name,
        "id": i.id,
        "address": i.address,
        // A number, or the stored string when it is none (Go writes a string).
        "port": i.port.number().map_or_else(|| json!(i.port.as_str()), |n| json!(n)),
        "version": i.version,
        "weight": i.weight,
        "metadata": i.metadata,
        "since_ms": since_ms,
    })
}

fn lock_json(key: &NameKey, holder: Option<(&LockView, u64)>) -> Value {
    json!({
        "namespace": key.0,
        "name": key.1,
        "waiters": holder.map_or(0, |(l, _)| l.waiters),
        "since_ms": holder.map(|(_, since)| since),
        "holder": holder.map(|(l, _)| json!({
            "fencing_token": l.fencing_token,
            "lease": lease_hex(l.lease_id),
        })),
    })
}

fn election_json(key: &NameKey, view: &ElectionView) -> Value {
    json!({
        "namespace": key.0,
        "name": key.1,
        "candidates": view.candidates,
        "since_ms": view.since_ms,
        "leader": view.leader.as_ref().map(|l| json!({
            "proposal": l.proposal,
            "fencing_token": l.fencing_token,
            "lease": lease_hex(l.lease_id),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(id: &str, version: &str) -> ServiceInstance {
        ServiceInstance::new("web", id, "10.0.0.1", 80).with_version(version)
    }

    fn next(rx: &mut broadcast::Receiver<Msg>) -> (&'static str, Value) {
        let m = rx.try_recv().expect("a message");
        (m.event, serde_json::from_str(&m.data).expect("JSON"))
    }

    #[test]
    fn a_subscriber_gets_the_snapshot_then_each_change_once() {
        let hub = Hub::new(false, &["127.0.0.1:2379".into()]);
        hub.namespace_snapshot("ns", vec![web("a", "1")], 5);
        let (first, mut rx) = hub.subscribe();
        let snapshot: Value = serde_json::from_str(&first.data).unwrap();
        assert_eq!(first.event, "snapshot");
        assert_eq!(snapshot["instances"][0]["id"], "a");
        assert_eq!(snapshot["instances"][0]["since_ms"], Value::Null);

        hub.apply("ns", ServiceEvent::Added(web("b", "1")));
        let (event, added) = next(&mut rx);
        assert_eq!((event, added["id"].as_str()), ("added", Some("b")));
        let since = added["since_ms"].as_u64().expect("seen arriving");

        hub.set_revisions(
            "ns",
            vec![KeyRevision {
                name: "web".into(),
                id: "b".into(),
                create_revision: 7,
                lease_id: 0x1f,
            }],
        );
        let (event, revisions) = next(&mut rx);
        assert_eq!(event, "revisions");
        assert_eq!(revisions[0]["create_revision"], 7);
        assert_eq!(revisions[0]["lease"], "1f");

        // An update keeps the key's age, create revision and lease.
        hub.apply("ns", ServiceEvent::Updated(web("b", "2")));
        let (event, updated) = next(&mut rx);
        assert_eq!(event, "updated");
        assert_eq!(updated["version"], "2");
        assert_eq!(updated["since_ms"], since);
        assert_eq!(updated["create_revision"], 7);

        // One already there at the first read stays of unknown age when updated
        // (checked against a mutant that restarted the age on every update).
        hub.apply("ns", ServiceEvent::Updated(web("a", "2")));
        let (event, updated) = next(&mut rx);
        assert_eq!(event, "updated");
        assert_eq!(updated["since_ms"], Value::Null);

        hub.apply("ns", ServiceEvent::Removed(web("a", "2")));
        assert_eq!(next(&mut rx).0, "removed");
        assert!(rx.try_recv().is_err(), "nothing else was sent");
        assert_eq!(hub.services_json()[0]["instances"], 1);
        let service = hub.service_json("web", Some("ns")).unwrap();
        assert_eq!(service["instances"][0]["id"], "b");
        assert!(hub.service_json("web", Some("other")).is_none());
    }

    #[test]
    fn a_lost_leader_shows_as_no_leader_and_the_loss_of_etcd_is_dated() {
        let hub = Hub::new(false, &[]);
        let (_, mut rx) = hub.subscribe();
        hub.set_leader(
            "ns",
            "cron",
            Some(Leader {
                proposal: "a".into(),
                fencing_token: 9,
                lease_id: 0xab,
            }),
        );
        let (_, e) = next(&mut rx);
        assert_eq!(e["leader"]["fencing_token"], 9);
        assert_eq!(e["leader"]["lease"], "ab");
        hub.set_leader("ns", "cron", None);
        let (_, e) = next(&mut rx);
        assert_eq!(e["leader"], Value::Null);
        assert_eq!(e["candidates"], 0);

        hub.set_connection(|c| c.connected = true);
        assert_eq!(next(&mut rx).1["lost_since_ms"], Value::Null);
        hub.set_connection(|c| c.connected = false);
        assert!(next(&mut rx).1["lost_since_ms"].as_u64().is_some());
        // Nothing changed: nothing is sent.
        hub.set_connection(|c| c.connected = false);
        assert!(rx.try_recv().is_err());
    }
}
