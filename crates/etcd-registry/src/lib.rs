#![warn(missing_docs)]
//! Service registration, discovery, change watching, leader election and
//! locks on etcd v3.
//!
//! ```no_run
//! use std::time::Duration;
//! use etcd_registry::{Registry, ServiceInstance};
//!
//! # async fn demo() -> etcd_registry::Result<()> {
//! let registry = Registry::builder()
//!     .endpoints(["127.0.0.1:2379"])
//!     .namespace("prod")
//!     .ttl(Duration::from_secs(15))
//!     .connect()
//!     .await?;
//! let _reg = registry
//!     .register(ServiceInstance::new("my-awesome-api", "instance-01", "192.168.1.100", 8080))
//!     .await?;
//! for inst in registry.instances("my-awesome-api").await? {
//!     println!("{} at {}", inst.id, inst.endpoint());
//! }
//! registry.close().await?;
//! # Ok(()) }
//! ```
//!
//! # One lease per registry
//!
//! Each [`Registry`] owns exactly one etcd lease, granted at connect time.
//! Every instance it registers, and every election or lock key it writes,
//! lives under that lease. Keep-alive traffic is one request per TTL/3
//! however many instances there are, and [`Registry::close`] removes
//! everything at once by revoking the lease. This differs from the Go library
//! we descend from, which grants one lease per registration.
//!
//! # Self-healing
//!
//! One owned background task keeps the lease alive. When the lease is lost
//! (expired during an outage, revoked by someone else, answered with TTL 0,
//! or etcd restarted with its data wiped) the registry grants a new lease and
//! re-puts every live registration, retrying with capped exponential backoff
//! and jitter (up to 5 s) until [`Registry::close`]. [`Registry::state`]
//! shows where it is: [`RegistryState`].
//!
//! A second task watches the services this registry registers (one watch
//! stream; the whole namespace only past 64 services), so a registry does not
//! hear every change of a large namespace. It restores the keys it maintains
//! (anti-entropy). The two cases below are told apart by the lease attached
//! to the key:
//!
//! - deleted, or overwritten by a writer **without a lease** (such as a plain
//!   `etcdctl put`): the registry restores its value within moments;
//! - overwritten under **another live lease**: that is a take-over by another
//!   registry (last writer wins, as in the Go library), and the registration
//!   is yielded, not fought for. [`Registration::deregister`] then leaves the
//!   new owner's key alone. Once that key is gone (deleted, or expired with
//!   the other owner's lease, as when a Go process exits), the registration
//!   reclaims it.
//!
//! Writes under this registry's own lease are its own and are left as they are.
//!
//! # Wire format
//!
//! Keys and values are the Go library's: see [`ServiceInstance::to_json`],
//! [`Port`] and the layout `{prefix}/{namespace}/services/{name}/{id}`,
//! composed by plain concatenation for any prefix and namespace, as Go does.

mod backoff;
#[cfg(feature = "tower")]
pub mod balance;
mod cache;
#[cfg(feature = "channel")]
pub mod channel;
mod config;
mod conn;
mod core;
mod election;
mod error;
pub mod health;
mod instance;
mod inventory;
mod keys;
mod lock;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;
pub mod naming;
mod queue;
mod registrations;
mod registry;
mod session;
mod status;
mod stream;
#[cfg(feature = "tls")]
mod tls;
mod watch;

#[cfg(feature = "tower")]
pub use balance::ServiceDiscover;
pub use cache::{Instances, InstancesIter, ServiceCache, Strategy};
#[cfg(feature = "channel")]
pub use channel::{Channel, ChannelBuilder, EndpointState, Idempotent};
pub use config::{
    Config, DEFAULT_DIAL_TIMEOUT, DEFAULT_KEEP_ALIVE_INTERVAL, DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_KEY_PREFIX, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TXN_OPS, DEFAULT_NAMESPACE,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL, MIN_KEEP_ALIVE_INTERVAL, RegistryBuilder,
};
pub use election::{Election, LeaderInfo, LeaderStream, Leadership};
pub use error::{Error, LostReason, Result};
pub use health::{Health, HealthCheck, HealthPolicy, HealthState, InitialState};
pub use instance::{MAX_ENTRY_BYTES, Port, ServiceInstance};
pub use inventory::InstanceRevision;
pub use lock::{Lock, LockGuard};
pub use naming::Publish;
pub use registrations::{Registration, RegistrationState};
pub use registry::Registry;
pub use session::RegistryState;
pub use status::{ElectionSummary, EndpointStatus, LockSummary, MemberStatus};
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
pub use watch::{ServiceEvent, ServiceWatch};

/// The README's code, and every guide's in docs/, is compiled as a doc test,
/// so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/getting-started.md")]
struct GuideGettingStartedDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/registration.md")]
struct GuideRegistrationDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/discovery.md")]
struct GuideDiscoveryDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/elections-and-locks.md")]
struct GuideElectionsAndLocksDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/other-languages.md")]
struct GuideOtherLanguagesDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/deployments.md")]
struct GuideDeploymentsDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/security.md")]
struct GuideSecurityDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/operations.md")]
struct GuideOperationsDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/design.md")]
struct GuideDesignDoctests;
