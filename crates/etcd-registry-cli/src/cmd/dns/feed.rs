//! Keeps the served [`Zone`] current: rebuilds it from the namespace cache
//! after every change and publishes it, whole, to the query handler.

use std::collections::BTreeSet;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use etcd_registry::ServiceCache;
use tokio::sync::watch;

use super::build::{Problem, Settings, State, build};
use super::zone::Zone;

/// The zone as it is now, for the query handler: one `Arc` clone per query.
pub type Current = watch::Receiver<Arc<Zone>>;

/// The single writer of the zone.
pub struct Feed {
    cache: ServiceCache,
    settings: Settings,
    zone: watch::Sender<Arc<Zone>>,
    /// Services seen since the start, and the last build of each.
    state: State,
    /// What the last zone could not serve: each is logged once, when it
    /// first appears (again after it was gone), not on every rebuild.
    problems: BTreeSet<Problem>,
}

impl Feed {
    /// Builds the first zone from `cache` at once.
    pub fn new(cache: ServiceCache, settings: Settings) -> (Self, Current) {
        let mut state = State::default();
        let revision = cache.revision();
        let instances = cache.instances();
        let built = build(&settings, instances.as_slice(), &mut state, revision);
        let (zone, current) = watch::channel(Arc::new(built.zone));
        let mut feed = Feed {
            cache,
            settings,
            zone,
            state,
            problems: BTreeSet::new(),
        };
        feed.report(built.problems);
        (feed, current)
    }

    /// Rebuilds after every change until the cache ends (the registry
    /// closed); returns then. Cancel safe: dropping it stops the updates.
    pub async fn run(mut self) {
        loop {
            // Subscribe before reading, so that a change between the read
            // and the wait is not missed: `changed()` compares against the
            // version it sees when first polled.
            let cache = self.cache.clone();
            let mut changed = pin!(cache.changed());
            let first = futures::poll!(changed.as_mut());
            if matches!(first, Poll::Ready(Err(_))) {
                break;
            }
            let prune_at = self.rebuild();
            if first.is_pending() {
                // A hold that ends is a change too, with nothing new in etcd.
                let prune = async {
                    match prune_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = changed => if changed.is_err() {
                        break;
                    },
                    () = prune => {}
                }
            }
        }
        tracing::info!("the namespace cache ended; DNS answers stay as they were");
    }

    /// Builds and publishes the zone; returns when it must be built again
    /// even without a change (see [`Built::prune_at`](super::build::Built)).
    fn rebuild(&mut self) -> Option<tokio::time::Instant> {
        // The revision first: if a change lands in between, the zone is
        // labelled older than it is, never newer.
        let revision = self.cache.revision();
        let instances = self.cache.instances();
        // Only changed services are built again, but a first build (or a
        // change of many) of a large namespace takes tens of milliseconds:
        // off the worker that answers queries, which go on from the
        // previous zone meanwhile.
        let built = tokio::task::block_in_place(|| {
            build(
                &self.settings,
                instances.as_slice(),
                &mut self.state,
                revision,
            )
        });
        tracing::debug!(
            revision,
            instances = instances.len(),
            names = built.zone.len(),
            "DNS zone rebuilt"
        );
        self.zone.send_replace(Arc::new(built.zone));
        self.report(built.problems);
        built.prune_at
    }

    fn report(&mut self, problems: BTreeSet<Problem>) {
        for problem in problems.difference(&self.problems) {
            tracing::warn!(
                service = %problem.service,
                id = problem.id.as_deref().unwrap_or(""),
                "{problem}"
            );
        }
        self.problems = problems;
    }
}
