//! What an operator looks at first: [`EndpointStatus`] of each etcd endpoint
//! ([`RegistryBuilder::endpoint_status`]) and the elections of a namespace
//! ([`Registry::elections`](crate::Registry::elections)) and locks ([`Registry::locks`](crate::Registry::locks)) of a namespace.
//! `etcd-registry status` prints them.

use std::collections::BTreeMap;

use etcd_client::{GetOptions, SortOrder, SortTarget};

use crate::config::RegistryBuilder;
use crate::conn;
use crate::core::Core;
use crate::election::LeaderInfo;
use crate::error::Result;

/// What one endpoint said when asked for its status, or why it did not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The endpoint as configured.
    pub endpoint: String,
    /// The member's answer, or why there was none (refused, timed out, auth
    /// failed, ...), as text for people.
    pub result: std::result::Result<MemberStatus, String>,
}

/// The status an etcd member reports about itself (etcd's `Maintenance.Status`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemberStatus {
    /// The etcd server version, e.g. `3.4.23`.
    pub version: String,
    /// This member's id (etcd shows it in hex).
    pub member_id: u64,
    /// The id of the raft leader this member knows of; 0 when it knows none.
    pub leader_id: u64,
    /// The size of the backend database in bytes.
    pub db_size: i64,
    /// The raft term.
    pub raft_term: u64,
    /// The raft index.
    pub raft_index: u64,
    /// Alarms and errors the member reports (e.g. `NOSPACE`); usually empty.
    pub errors: Vec<String>,
}

impl MemberStatus {
    /// Whether this member is the raft leader.
    pub fn is_leader(&self) -> bool {
        self.member_id != 0 && self.member_id == self.leader_id
    }
}

impl RegistryBuilder {
    /// Asks every configured endpoint for its status, each on a connection of
    /// its own and within the dial timeout, with the builder's credentials.
    /// Grants no lease and writes nothing.
    ///
    /// An endpoint that does not answer is reported in its
    /// [`EndpointStatus::result`], not as an error.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when the settings
    /// are invalid, as [`build_config`](RegistryBuilder::build_config).
    ///
    /// ```no_run
    /// # async fn demo() -> etcd_registry::Result<()> {
    /// let builder = etcd_registry::Registry::builder().endpoints(["127.0.0.1:2379"]);
    /// for s in builder.endpoint_status().await? {
    ///     match s.result {
    ///         Ok(m) => println!("{}: etcd {}, leader: {}", s.endpoint, m.version, m.is_leader()),
    ///         Err(why) => println!("{}: unreachable: {why}", s.endpoint),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn endpoint_status(&self) -> Result<Vec<EndpointStatus>> {
        let config = self.build_config()?;
        let options = conn::connect_options(&config);
        let asks = config.endpoints.iter().map(|endpoint| {
            let options = options.clone();
            async move {
                let result = conn::probe(endpoint, options, config.dial_timeout)
                    .await
                    .map(|s| MemberStatus {
                        version: s.version().to_owned(),
                        member_id: s.header().map_or(0, |h| h.member_id()),
                        leader_id: s.leader(),
                        db_size: s.db_size(),
                        raft_term: s.raft_term(),
                        raft_index: s.raft_index(),
                        errors: s.errors().to_vec(),
                    });
                EndpointStatus {
                    endpoint: endpoint.clone(),
                    result,
                }
            }
        });
        Ok(futures::future::join_all(asks).await)
    }
}

/// An election with at least one candidate, as returned by [`Registry::elections`](crate::Registry::elections).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ElectionSummary {
    /// The election name, as given to [`Registry::election`](crate::Registry::election).
    pub name: String,
    /// How many candidates it has, the leader included.
    pub candidates: usize,
    /// The leader: the candidate with the lowest create revision.
    pub leader: LeaderInfo,
}

/// A lock with at least one holder or waiter, as returned by [`Registry::locks`](crate::Registry::locks).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockSummary {
    /// The lock name, as given to [`Registry::lock`](crate::Registry::lock).
    pub name: String,
    /// The holder's fencing token: the create revision of its key.
    pub fencing_token: i64,
    /// The lease the holder's key lives under.
    pub lease_id: i64,
    /// How many keys wait behind the holder.
    pub waiters: usize,
}

pub(crate) async fn elections(core: &Core) -> Result<Vec<ElectionSummary>> {
    let keys = &core.keys;
    let prefix = keys.elections_prefix().to_owned();
    let resp = core
        .conn
        .retry("get", |mut c| {
            let prefix = prefix.clone();
            // Ascending create revision: the first key seen of an election is its leader.
            let options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend);
            async move { c.get(prefix, Some(options)).await }
        })
        .await?;
    let mut elections: BTreeMap<String, ElectionSummary> = BTreeMap::new();
    for kv in resp.kvs() {
        let Some(name) = kv.key_str().ok().and_then(|k| keys.parse_election_key(k)) else {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping a key outside the election layout");
            continue;
        };
        elections
            .entry(name.to_owned())
            .and_modify(|e| e.candidates += 1)
            .or_insert_with(|| ElectionSummary {
                name: name.to_owned(),
                candidates: 1,
                leader: LeaderInfo::from_kv(kv),
            });
    }
    Ok(elections.into_values().collect())
}

pub(crate) async fn locks(core: &Core) -> Result<Vec<LockSummary>> {
    let keys = &core.keys;
    let prefix = keys.lock_name("");
    let paged = core
            .conn
            .read_prefixes("get", &[prefix], false, BTreeMap::new, |locks, kvs| {
                for kv in kvs {
                    let Some(name) = kv.key_str().ok().and_then(|k| keys.parse_lock_key(k)) else {
                        tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping a key outside the lock layout");
                        continue;
                    };
                    let this = LockSummary {
                        name: name.to_owned(),
                        fencing_token: kv.create_revision(),
                        lease_id: kv.lease(),
                        waiters: 0,
                    };
                    // Pages come in key order: the holder is the lowest create revision seen.
                    locks
                        .entry(name.to_owned())
                        .and_modify(|held: &mut LockSummary| {
                            held.waiters += 1;
                            if this.fencing_token < held.fencing_token {
                                held.fencing_token = this.fencing_token;
                                held.lease_id = this.lease_id;
                            }
                        })
                        .or_insert(this);
                }
            })
            .await?;
    Ok(paged.value.into_values().collect())
}
