//! The tasks that feed the [`Hub`]: one watch per namespace, its elections'
//! observe streams, a keys-only read for create revisions, the endpoint
//! probe and the history sampler.
//!
//! Every task is owned by the server (a `JoinSet`), ends on the server's
//! cancellation token, and reports trouble through `tracing` and through the
//! connection state that the page shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_registry::{Registry, RegistryBuilder, RegistryState};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::hub::{EndpointView, Hub, SAMPLE_EVERY};

/// How often elections are listed to find new ones (leaders themselves
/// arrive through observe streams, as they change), and locks are listed.
const ELECTIONS_EVERY: Duration = Duration::from_secs(2);
/// How often every endpoint is asked for its status.
const PROBE_EVERY: Duration = Duration::from_secs(3);
/// How often namespaces are looked for with `--all-namespaces`.
const NAMESPACES_EVERY: Duration = Duration::from_secs(5);
/// Instances added in a burst share one read of create revisions.
const REVISIONS_DEBOUNCE: Duration = Duration::from_millis(300);
/// Wait before retrying a failed read.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Sleeps for `d`; false when cancelled first.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Follows one namespace until cancelled: its instances and its elections.
pub async fn follow_namespace(
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    namespace: String,
    cancel: CancellationToken,
) {
    let added = Arc::new(Notify::new());
    tokio::join!(
        watch_instances(&hub, &registry, &namespace, &added, &cancel),
        read_revisions(&hub, &registry, &namespace, &added, &cancel),
        follow_elections(&hub, &registry, &namespace, &cancel),
    );
}

async fn watch_instances(
    hub: &Hub,
    registry: &Registry,
    namespace: &str,
    added: &Notify,
    cancel: &CancellationToken,
) {
    let mut watch = match registry.watch_all() {
        Ok(w) => w,
        Err(error) => {
            tracing::error!(namespace, %error, "cannot watch the namespace");
            hub.set_connection(|c| c.last_error = Some(format!("watch {namespace}: {error}")));
            return;
        }
    };
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = watch.next() => e,
        };
        let Some(event) = event else {
            // Only a closed registry ends a watch; the server is stopping.
            tracing::debug!(namespace, "the watch ended");
            return;
        };
        if let etcd_registry::ServiceEvent::Snapshot(all) = event {
            hub.namespace_snapshot(namespace, all, watch.revision());
            added.notify_one();
            continue;
        }
        let is_add = matches!(event, etcd_registry::ServiceEvent::Added(_));
        hub.apply(namespace, event);
        hub.set_revision(namespace, watch.revision(), watch.errors());
        if is_add {
            added.notify_one();
        }
    }
}

/// Reads create revisions and leases once instances appear without them:
/// the watch's events carry instance values only.
async fn read_revisions(
    hub: &Hub,
    registry: &Registry,
    namespace: &str,
    added: &Notify,
    cancel: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = added.notified() => {}
        }
        if !pause(cancel, REVISIONS_DEBOUNCE).await {
            return;
        }
        while hub.missing_revisions(namespace) {
            match registry.instance_revisions().await {
                Ok(revisions) => {
                    hub.set_revisions(namespace, revisions.into_iter().map(Into::into).collect());
                    // A key added after the read but before its event is read next time.
                    break;
                }
                Err(error) => {
                    tracing::warn!(namespace, %error, "reading create revisions failed; retrying");
                    if !pause(cancel, RETRY_AFTER).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Lists the namespace's elections and locks now and then, and observes
/// each election found (lock holders are read by the listing itself).
async fn follow_elections(
    hub: &Arc<Hub>,
    registry: &Registry,
    namespace: &str,
    cancel: &CancellationToken,
) {
    let mut observers = JoinSet::new();
    let mut observed = BTreeSet::new();
    loop {
        match registry.elections().await {
            Ok(list) => {
                let counts: BTreeMap<String, usize> = list
                    .iter()
                    .map(|e| (e.name.clone(), e.candidates))
                    .collect();
                let mut names = hub.set_candidates(namespace, &counts);
                names.extend(counts.into_keys());
                for name in names {
                    if !observed.insert(name.clone()) {
                        continue;
                    }
                    match registry.election(&name) {
                        Ok(election) => {
                            let leaders = election.observe();
                            observers.spawn(observe(
                                hub.clone(),
                                namespace.to_owned(),
                                name,
                                leaders,
                                cancel.clone(),
                            ));
                        }
                        Err(error) => {
                            tracing::warn!(namespace, election = %name, %error, "skipping an election that cannot be observed");
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(namespace, %error, "listing elections failed; retrying");
            }
        }
        match registry.locks().await {
            Ok(locks) => hub.set_locks(namespace, locks.into_iter().map(Into::into).collect()),
            Err(error) => tracing::warn!(namespace, %error, "listing locks failed; retrying"),
        }
        if !pause(cancel, ELECTIONS_EVERY).await {
            break;
        }
    }
    observers.shutdown().await;
}

async fn observe(
    hub: Arc<Hub>,
    namespace: String,
    name: String,
    mut leaders: etcd_registry::LeaderStream,
    cancel: CancellationToken,
) {
    loop {
        let leader = tokio::select! {
            _ = cancel.cancelled() => return,
            l = leaders.next() => l,
        };
        match leader {
            Some(leader) => hub.set_leader(&namespace, &name, leader.as_ref().map(Into::into)),
            None => return, // the registry closed
        }
    }
}

/// Asks every endpoint for its status now and then, and follows the
/// dashboard registry's lease state: together they say whether etcd is lost.
pub async fn probe_endpoints(
    hub: Arc<Hub>,
    builder: RegistryBuilder,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) {
    let mut state = registry.state();
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Transitions are logged, not every failed probe.
    let mut answered = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *state.borrow_and_update();
                hub.set_connection(|c| c.registry_state = state_name(now));
                continue;
            }
        }
        let statuses = tokio::select! {
            _ = cancel.cancelled() => return,
            s = builder.endpoint_status() => s,
        };
        let now = *state.borrow_and_update();
        match statuses {
            Ok(statuses) => {
                let endpoints: Vec<EndpointView> = statuses
                    .into_iter()
                    .map(|s| EndpointView {
                        endpoint: s.endpoint,
                        result: s.result.map(|m| m.version),
                    })
                    .collect();
                let connected = endpoints.iter().any(|e| e.result.is_ok());
                match (answered, connected) {
                    (true, false) => tracing::warn!(
                        "no etcd endpoint answers; the dashboard shows what it saw last"
                    ),
                    (false, true) => tracing::info!("etcd answers again"),
                    _ => {}
                }
                answered = connected;
                hub.set_connection(|c| {
                    if c.connected && !connected {
                        c.last_error = Some("no etcd endpoint answers".into());
                    }
                    c.endpoints = endpoints;
                    c.connected = connected;
                    c.registry_state = state_name(now);
                });
            }
            Err(error) => {
                tracing::error!(%error, "cannot probe the endpoints");
                hub.set_connection(|c| {
                    c.connected = false;
                    c.last_error = Some(error.to_string());
                });
            }
        }
    }
}

fn state_name(state: RegistryState) -> String {
    match state {
        RegistryState::Connecting => "Connecting",
        RegistryState::Active { .. } => "Active",
        RegistryState::Degraded { .. } => "Degraded",
        RegistryState::Recovering => "Recovering",
        RegistryState::Closed => "Closed",
        _ => "Unknown",
    }
    .to_owned()
}

/// Samples the instance counts for the services' charts.
pub async fn sample_history(hub: Arc<Hub>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => hub.tick(),
        }
    }
}

/// With `--all-namespaces`: looks for namespaces now and then and follows
/// each new one with a registry of its own, closed when the server stops.
pub async fn discover_namespaces(
    hub: Arc<Hub>,
    builder: RegistryBuilder,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) {
    let mut followers = JoinSet::new();
    let mut registries: BTreeMap<String, Arc<Registry>> = BTreeMap::new();
    loop {
        match registry.namespaces().await {
            Ok(found) => {
                for namespace in found {
                    if registries.contains_key(&namespace) {
                        continue;
                    }
                    let connect = builder.clone().namespace(&namespace).connect();
                    let ns_registry = tokio::select! {
                        _ = cancel.cancelled() => break,
                        r = connect => r,
                    };
                    match ns_registry {
                        Ok(r) => {
                            tracing::info!(%namespace, "following a namespace");
                            let r = Arc::new(r);
                            registries.insert(namespace.clone(), r.clone());
                            followers.spawn(follow_namespace(
                                hub.clone(),
                                r,
                                namespace,
                                cancel.clone(),
                            ));
                        }
                        Err(error) => {
                            tracing::warn!(%namespace, %error, "cannot follow a namespace yet; retrying");
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "looking for namespaces failed; retrying"),
        }
        if !pause(&cancel, NAMESPACES_EVERY).await {
            break;
        }
    }
    // The followers end on the same token; then their registries close.
    while followers.join_next().await.is_some() {}
    for (namespace, r) in registries {
        if let Err(error) = r.close().await {
            tracing::warn!(%namespace, %error, "closing a namespace's registry failed");
        }
    }
}
