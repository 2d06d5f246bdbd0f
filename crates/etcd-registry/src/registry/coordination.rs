//! Coordination and inventory: elections, locks, and what etcd holds of them.

use super::Registry;
use crate::election::Election;
use crate::error::Result;
use crate::inventory::InstanceRevision;
use crate::lock::Lock;
use crate::status::{ElectionSummary, LockSummary};

impl Registry {
    /// An election named `name` in this registry's namespace.
    ///
    /// Every candidate of the election campaigns with the lease of its own
    /// registry. The name is validated like a service name (non-empty, no `/`,
    /// no control characters); an invalid name fails with
    /// [`Error::InvalidInput`](crate::Error::InvalidInput). Nothing is sent to etcd.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// let election = registry.election("nightly-report")?;
    /// let leadership = election.campaign("instance-01").await?;
    /// // ... run the job, then step down so the next candidate wins at once:
    /// leadership.resign().await?;
    /// # Ok(()) }
    /// ```
    pub fn election(&self, name: &str) -> Result<Election> {
        Election::new(self.core(), &self.inner.slots, name)
    }

    /// A lock named `name` in this registry's namespace.
    ///
    /// The name is validated like a service name (non-empty, no `/`, no
    /// control characters); an invalid name fails with
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming the field `lock`. Nothing is sent to etcd.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// let lock = registry.lock("schema-migration")?;
    /// let guard = lock.acquire().await?;
    /// // ... the critical section; pass guard.fencing_token() to what it writes ...
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn lock(&self, name: &str) -> Result<Lock> {
        Lock::new(self.core(), &self.inner.slots, name)
    }

    /// The create and mod revisions and the lease of every instance key of
    /// the namespace, in one consistent keys-only read (values are not
    /// transferred; paged like [`Registry::instances`]).
    /// Keys outside the layout are skipped.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// for r in registry.instance_revisions().await? {
    ///     println!("{}/{} registered at revision {}", r.name, r.id, r.create_revision);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn instance_revisions(&self) -> Result<Vec<InstanceRevision>> {
        crate::inventory::instance_revisions(self.core()).await
    }

    /// Every namespace under this registry's key prefix that holds a service
    /// instance, an election key or a lock key, sorted. This registry's own namespace is
    /// listed only if it holds such a key.
    ///
    /// It skips from one namespace to the next, one keys-only read of a
    /// single key each, so its cost grows with the number of namespaces, not
    /// of keys. At most 10,000 namespaces are returned.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// println!("namespaces: {:?}", registry.namespaces().await?);
    /// # Ok(()) }
    /// ```
    pub async fn namespaces(&self) -> Result<Vec<String>> {
        crate::inventory::namespaces(self.core()).await
    }

    /// Every election of the namespace that has a candidate, by name, with its
    /// leader and number of candidates, in one consistent read. Elections
    /// without candidates leave nothing in etcd and are not listed.
    ///
    /// `etcdctl elect` candidates under the namespace's election prefix are
    /// counted as well.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// for e in registry.elections().await? {
    ///     println!("{}: {} leads, {} candidates", e.name, e.leader.proposal_str(), e.candidates);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn elections(&self) -> Result<Vec<ElectionSummary>> {
        crate::status::elections(self.core()).await
    }

    /// Every lock of the namespace that has a holder, by name, with the
    /// holder's fencing token and lease and the number of waiters, in one
    /// consistent read (paged like [`Registry::instances`]). Locks nobody
    /// holds leave nothing in etcd and are not listed; `etcdctl lock`
    /// holders and waiters under the namespace's lock prefix are included.
    ///
    /// ```no_run
    /// # async fn demo(registry: etcd_registry::Registry) -> etcd_registry::Result<()> {
    /// for l in registry.locks().await? {
    ///     println!("{}: token {}, {} waiting", l.name, l.fencing_token, l.waiters);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn locks(&self) -> Result<Vec<LockSummary>> {
        crate::status::locks(self.core()).await
    }
}
