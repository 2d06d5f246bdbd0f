//! [`Registration`]: the handle of one maintained instance.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Registrations, Table};
use crate::error::{Error, Result};
use crate::health::{Gate, Health};
use crate::instance::ServiceInstance;

/// Where a [`Registration`] stands, from [`Registration::state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationState {
    /// Maintained, and meant to be in etcd: written under the registry's
    /// lease, restored if lost.
    Active,
    /// Maintained but out of etcd on purpose: unhealthy, switched off with
    /// [`Registration::set_serving`], or drained by `Registry::shutdown`.
    NotServing,
    /// Another live lease took the key over; it is left alone and reclaimed
    /// once it is gone.
    Yielded,
    /// No longer changed through this handle: a later `register` of the
    /// same id on the same registry replaced it. The newer handle maintains
    /// the key; [`Registration::deregister`] on this one still removes it.
    Replaced,
    /// The instance was deregistered: through this handle or another one of
    /// the same id ([`Registration::deregister`] removes the instance,
    /// whichever handle it is called on, as the Go library's `Deregister`
    /// does), or by an admin call (`delete_instance`, `delete_service`).
    /// Nothing maintains the key; `update` fails with [`Error::Deregistered`].
    Deregistered,
    /// The registry was closed or dropped: nothing maintains the key any
    /// more (it expires with the lease).
    Closed,
}

/// A registered instance, maintained by its [`Registry`](crate::Registry)
/// until [`deregister`](Registration::deregister) or `Registry::close`.
///
/// Dropping a `Registration` does **not** deregister: the instance stays
/// registered (and is restored if lost) until the registry closes. Call
/// [`deregister`](Registration::deregister) to remove it earlier.
///
/// One key has one owner: registering the same service and id again on the
/// same registry replaces the entry and **retires** this handle. A retired
/// handle no longer changes the value: its `update` fails with
/// [`Error::Replaced`], dropping it has no effect, and
/// [`state`](Registration::state) says [`RegistrationState::Replaced`].
/// Its [`deregister`](Registration::deregister) still removes the instance
/// (whichever handle registered it last), as the Go library's
/// `Deregister(id)` does: `Ok` always means the instance is gone. The other
/// handles of the id then say [`RegistrationState::Deregistered`].
#[must_use = "dropping a Registration keeps the instance registered until Registry::close"]
pub struct Registration {
    regs: Registrations,
    key: String,
    instance: ServiceInstance,
    owner: u64,
    /// Health, maintenance switch and the health task's token.
    gate: Arc<Gate>,
}

impl Registration {
    pub(super) fn new(
        regs: Registrations,
        key: String,
        instance: ServiceInstance,
        owner: u64,
        gate: Arc<Gate>,
    ) -> Self {
        Self {
            regs,
            key,
            instance,
            owner,
            gate,
        }
    }

    fn table(&self) -> &Arc<Table> {
        &self.regs.table
    }

    /// The instance as last written.
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    /// The etcd key of the instance.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where this registration stands now; see [`RegistrationState`].
    pub fn state(&self) -> RegistrationState {
        let table = self.table();
        if table.core.is_closed() {
            return RegistrationState::Closed;
        }
        match table.lock().get(&self.key) {
            Some(e) if e.owner != self.owner => RegistrationState::Replaced,
            None => RegistrationState::Deregistered,
            Some(e) if e.yielded => RegistrationState::Yielded,
            Some(e) if !e.serving => RegistrationState::NotServing,
            Some(_) => RegistrationState::Active,
        }
    }

    /// Replaces the instance's version, weight, metadata or address in place,
    /// under the same key. `name` and `id` must not change.
    ///
    /// Writes only a key this registry holds (or an absent or unleased one):
    /// if another lease took the key over, nothing is written, the new value
    /// is kept for when the key is reclaimed, and [`state`](Self::state) says
    /// [`RegistrationState::Yielded`]. A retired handle (see the type's
    /// docs) fails with [`Error::Replaced`].
    pub async fn update(&mut self, instance: ServiceInstance) -> Result<()> {
        let table = self.table().clone();
        let _timer = crate::metrics::timer(table.core.namespace(), "update");
        if instance.name != self.instance.name {
            return Err(Error::invalid(
                "name",
                "update cannot change the service name",
            ));
        }
        if instance.id != self.instance.id {
            return Err(Error::invalid("id", "update cannot change the instance id"));
        }
        let (_, value) = table.encode(&instance)?;
        // Serialised with health transitions; a key that is out stays out.
        let _gate = self.gate.lock().await;
        table
            .update(&self.key, self.owner, &instance, value)
            .await?;
        self.instance = instance;
        Ok(())
    }

    /// Deletes the key and stops maintaining it (and its health check). A
    /// key that another lease took over is left alone: the delete compares
    /// the key's lease with this registry's.
    ///
    /// Any handle of the id will do: on a handle that a later `register` of
    /// the same id retired, this removes the instance all the same (as the
    /// Go library's `Deregister(id)` does), and the newer handle then says
    /// [`RegistrationState::Deregistered`].
    ///
    /// Final: from the moment it is called, nothing puts the key again,
    /// whatever the delete returns (or if the future is dropped). A delete
    /// that failed is retried in the background until it succeeds or the
    /// registry closes, and the error is returned.
    pub async fn deregister(self) -> Result<()> {
        let table = self.table().clone();
        let _timer = crate::metrics::timer(table.core.namespace(), "deregister");
        // Out of the table before anything else: nothing puts the key again.
        let entry = table.take(&self.key);
        // Dropped before the delete answered: it goes on in the background.
        let mut pending = PendingDelete {
            table: table.clone(),
            key: self.key.clone(),
            armed: entry.is_some(),
        };
        self.gate.cancel.cancel();
        // A health transition in flight finishes first (and, finding no
        // entry, leaves nothing behind).
        let _gate = self.gate.lock().await;
        if let Some(entry) = entry {
            let deleted = table.delete_taken(&self.key, entry).await;
            pending.armed = false;
            deleted?;
        }
        tracing::debug!(service = %self.instance.name, id = %self.instance.id, "deregistered");
        Ok(())
    }

    /// The health of this registration: its state after the rise/fall
    /// policy, the last error text, and counts, updated after every check
    /// (compare `state` to see transitions). Every transition is also
    /// logged through `tracing`. A registration without a check reports
    /// [`HealthState::Healthy`](crate::HealthState) and never changes.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.gate.health()
    }

    /// Maintenance switch. `set_serving(false)` deletes the key at once and
    /// keeps it out whatever the health check says; `set_serving(true)` puts
    /// it back if the instance is healthy (a checked one that is not comes
    /// back when it is). Both return once etcd agrees.
    ///
    /// After `Registry::shutdown` started, `set_serving(true)` does nothing.
    pub async fn set_serving(&self, serving: bool) -> Result<()> {
        tracing::info!(service = %self.instance.name, id = %self.instance.id, serving, "maintenance switch");
        let applier = self.regs.applier(&self.key, self.owner);
        self.gate.set_serving(&applier, serving).await
    }

    /// Deletes the key at once, then waits `grace` before returning, so that
    /// clients' caches drop the instance before the caller stops serving.
    /// The registration ends (as with [`deregister`](Registration::deregister)).
    ///
    /// Cancel safety: once the key is deleted, dropping the future only cuts
    /// the wait short.
    pub async fn drain(self, grace: Duration) -> Result<()> {
        let (service, id) = (self.instance.name.clone(), self.instance.id.clone());
        self.deregister().await?;
        tracing::info!(service, id, grace = ?grace, "drained; waiting for clients to drop the instance");
        tokio::time::sleep(grace).await;
        Ok(())
    }
}

/// Deletes the key of a deregistration whose future was dropped before its
/// delete answered.
struct PendingDelete {
    table: Arc<Table>,
    key: String,
    armed: bool,
}

impl Drop for PendingDelete {
    fn drop(&mut self) {
        if self.armed && tokio::runtime::Handle::try_current().is_ok() {
            self.table
                .delete_in_background(std::mem::take(&mut self.key));
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("instance", &self.instance)
            .field("state", &self.state())
            .finish()
    }
}
