//! A multi-member etcd cluster on loopback.

use std::time::Duration;

use tokio::time::Instant;

use crate::process;
use crate::server::{EtcdServer, MemberSpec, POLL, connect, is_port_clash, peer_url};
use crate::{Error, Result, unique_name};

/// Start timeout of each member, and of the whole cluster start.
const MEMBER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Per-member timeout of the status request in [`EtcdCluster::leader`].
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// An n-member etcd cluster, every member a real process on loopback.
///
/// Members are reached with [`member`](Self::member) and
/// [`member_mut`](Self::member_mut) to kill, pause or restart them; a
/// restarted member keeps its data directory and rejoins the cluster. Raft
/// timing is etcd's default (100 ms heartbeat, 1 s election timeout), so a
/// new leader is usually elected 1-3 s after the old one dies.
///
/// Dropping the cluster kills every member.
///
/// ```no_run
/// # async fn demo() -> etcd_registry_testkit::Result<()> {
/// use std::time::Duration;
/// use etcd_registry_testkit::EtcdCluster;
///
/// let mut cluster = EtcdCluster::start(3).await?;
/// let leader = cluster.leader().await?;
/// cluster.member_mut(leader).kill().await?;
/// let new_leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
/// assert_ne!(leader, new_leader);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
    /// Raft member id of each member, by index.
    ids: Vec<u64>,
}

impl EtcdCluster {
    /// Starts `n` members (`member0`, `member1`, ...) as a new cluster and
    /// waits until every member is healthy and a leader is elected.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for `n == 0`; otherwise as for
    /// [`EtcdServerBuilder::start`](crate::EtcdServerBuilder::start), or
    /// [`Error::Timeout`] if no leader emerges.
    pub async fn start(n: usize) -> Result<EtcdCluster> {
        if n == 0 {
            return Err(Error::Unsupported(
                "a cluster needs at least one member".into(),
            ));
        }
        let binary = process::resolve_etcd(None)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(n, &binary).await {
                Err(e) if attempt < 3 && is_port_clash(&e) => {
                    tracing::warn!(attempt, "etcd port clash, retrying cluster on new ports");
                }
                other => return other,
            }
        }
    }

    async fn try_start(n: usize, binary: &std::path::Path) -> Result<EtcdCluster> {
        let token = unique_name("cluster");
        let mut ports = Vec::with_capacity(n);
        for _ in 0..n {
            ports.push((process::free_port()?, process::free_port()?));
        }
        let names: Vec<String> = (0..n).map(|i| format!("member{i}")).collect();
        let initial_cluster = names
            .iter()
            .zip(&ports)
            .map(|(name, (_, peer))| format!("{name}={}", peer_url(*peer)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(n);
        for (name, (client_port, peer_port)) in names.into_iter().zip(ports) {
            members.push(EtcdServer::new(MemberSpec {
                name,
                binary: binary.to_path_buf(),
                extra_args: Vec::new(),
                start_timeout: MEMBER_START_TIMEOUT,
                client_port,
                peer_port,
                initial_cluster: initial_cluster.clone(),
                cluster_token: token.clone(),
                clustered: n > 1,
                tls: None,
            })?);
        }
        // All members must be up before any can be healthy (quorum).
        for m in &members {
            m.spawn().await?;
        }
        let deadline = Instant::now() + MEMBER_START_TIMEOUT;
        for m in &members {
            m.wait_healthy(deadline).await?;
        }
        let mut ids = Vec::with_capacity(n);
        for m in &members {
            let mut client = connect(&m.endpoints()).await?;
            let status = tokio::time::timeout_at(deadline, client.status())
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("status of member `{}`", m.name()),
                    timeout: MEMBER_START_TIMEOUT,
                })??;
            ids.push(status.header().map_or(0, |h| h.member_id()));
        }
        let cluster = EtcdCluster { members, ids };
        let leader = cluster
            .wait_for_leader(deadline.saturating_duration_since(Instant::now()))
            .await?;
        tracing::debug!(n, leader, endpoints = ?cluster.endpoints(), "etcd cluster started");
        Ok(cluster)
    }

    /// The client URLs of all members, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always `false`: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    /// Member `i`, to kill, stop, pause or restart it.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn member_mut(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// The index of the current raft leader, as reported by the running,
    /// unpaused members (the most common answer wins).
    ///
    /// Right after a leader dies, the survivors report it until they elect a
    /// new one; use [`wait_for_leader`](Self::wait_for_leader) to get a live leader.
    ///
    /// # Errors
    ///
    /// [`Error::NoLeader`] if no member reports a known leader.
    pub async fn leader(&self) -> Result<usize> {
        let mut votes: Vec<(u64, usize)> = Vec::new();
        let mut answers = Vec::new();
        for m in self
            .members
            .iter()
            .filter(|m| m.is_running() && !m.is_paused())
        {
            let status = tokio::time::timeout(STATUS_TIMEOUT, async {
                Ok::<_, Error>(connect(&m.endpoints()).await?.status().await?)
            })
            .await;
            match status {
                Ok(Ok(s)) if s.leader() != 0 => {
                    match votes.iter_mut().find(|(id, _)| *id == s.leader()) {
                        Some((_, count)) => *count += 1,
                        None => votes.push((s.leader(), 1)),
                    }
                    answers.push(format!("{}: leader {:x}", m.name(), s.leader()));
                }
                Ok(Ok(_)) => answers.push(format!("{}: no leader", m.name())),
                Ok(Err(e)) => answers.push(format!("{}: {e}", m.name())),
                Err(_) => answers.push(format!("{}: status timed out", m.name())),
            }
        }
        votes
            .iter()
            .max_by_key(|(_, count)| *count)
            .and_then(|(id, _)| self.ids.iter().position(|m| m == id))
            .ok_or_else(|| Error::NoLeader {
                detail: if answers.is_empty() {
                    "no member is running".into()
                } else {
                    answers.join("; ")
                },
            })
    }

    /// Polls [`leader`](Self::leader) until it names a member that is running
    /// and not paused, and returns its index.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if that does not happen within `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Ok(i)) = tokio::time::timeout_at(deadline, self.leader()).await
                && self.members[i].is_running()
                && !self.members[i].is_paused()
            {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "a raft leader among the running members".into(),
                    timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
