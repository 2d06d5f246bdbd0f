//! `status`: each endpoint's health, then the namespace at a glance.

use std::collections::BTreeMap;

use etcd_registry::{ElectionSummary, EndpointStatus, LockSummary, Registry, ServiceInstance};
use serde_json::{Value, json};

use crate::common::args::Global;
use crate::common::connect::{builder, with_registry};
use crate::common::error::{CliError, CliResult};
use crate::common::output::{columns, lease_hex, line};

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object: {"endpoints":[..],"namespace":{..}}.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args { json } = args;
    let endpoints = builder(g)?.endpoint_status().await?;
    let answered = endpoints.iter().any(|e| e.result.is_ok());
    if !json {
        for row in endpoint_table(&endpoints) {
            line(&row)?;
        }
    }
    if !answered {
        if json {
            line(
                &json!({ "endpoints": endpoints_json(&endpoints), "namespace": null }).to_string(),
            )?;
        }
        return Err(CliError::msg(format!(
            "no endpoint answered: {}",
            g.endpoints.join(", ")
        ))
        .with_hint("is etcd running there? Check --endpoints (or ETCD_ENDPOINTS) and raise --dial-timeout"));
    }
    // Only the endpoints that answered: a dead one would just add warnings.
    let live = Global {
        endpoints: endpoints
            .iter()
            .filter(|e| e.result.is_ok())
            .map(|e| e.endpoint.clone())
            .collect(),
        ..g.clone()
    };
    let namespace = with_registry(&live, async |r| Namespace::read(r).await).await?;
    if json {
        line(
            &json!({ "endpoints": endpoints_json(&endpoints), "namespace": namespace.json() })
                .to_string(),
        )
    } else {
        line("")?;
        for row in namespace.text() {
            line(&row)?;
        }
        Ok(())
    }
}

/// What the namespace holds, from two reads.
struct Namespace {
    name: String,
    prefix: String,
    services: BTreeMap<String, usize>,
    instances: usize,
    elections: Vec<ElectionSummary>,
    locks: Vec<LockSummary>,
}

impl Namespace {
    async fn read(registry: &Registry) -> CliResult<Self> {
        let instances: Vec<ServiceInstance> = registry.all_instances().await?;
        let mut services = BTreeMap::new();
        for i in &instances {
            *services.entry(i.name.clone()).or_insert(0) += 1;
        }
        Ok(Namespace {
            name: registry.config().namespace().to_owned(),
            prefix: registry.config().key_prefix().to_owned(),
            services,
            instances: instances.len(),
            elections: registry.elections().await?,
            locks: registry.locks().await?,
        })
    }

    fn text(&self) -> Vec<String> {
        let mut rows = vec![format!(
            "namespace {} (prefix {}): {} service{}, {} instance{}, {} election{}",
            self.name,
            self.prefix,
            self.services.len(),
            plural(self.services.len()),
            self.instances,
            plural(self.instances),
            self.elections.len(),
            plural(self.elections.len()),
        )];
        // Only when there are locks, so the line reads as before without them.
        if !self.locks.is_empty() {
            rows[0].push_str(&format!(
                ", {} lock{}",
                self.locks.len(),
                plural(self.locks.len())
            ));
        }
        if !self.services.is_empty() {
            let rows_in = self
                .services
                .iter()
                .map(|(name, n)| [name.clone(), format!("{n} instance{}", plural(*n))]);
            rows.extend(columns(["SERVICE", "INSTANCES"], rows_in));
        }
        if !self.elections.is_empty() {
            let rows_in = self.elections.iter().map(|e| {
                [
                    e.name.clone(),
                    e.leader.proposal_str().into_owned(),
                    e.leader.fencing_token.to_string(),
                    lease_hex(e.leader.lease_id),
                    e.candidates.to_string(),
                ]
            });
            rows.extend(columns(
                ["ELECTION", "LEADER", "FENCING TOKEN", "LEASE", "CANDIDATES"],
                rows_in,
            ));
        }
        if !self.locks.is_empty() {
            let rows_in = self.locks.iter().map(|l| {
                [
                    l.name.clone(),
                    l.fencing_token.to_string(),
                    lease_hex(l.lease_id),
                    l.waiters.to_string(),
                ]
            });
            rows.extend(columns(
                ["LOCK", "FENCING TOKEN", "HOLDER LEASE", "WAITERS"],
                rows_in,
            ));
        }
        rows
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "prefix": self.prefix,
            "instances": self.instances,
            "services": self.services.iter().map(|(name, n)| json!({"name": name, "instances": n})).collect::<Vec<_>>(),
            "elections": self.elections.iter().map(|e| json!({
                "name": e.name,
                "candidates": e.candidates,
                "leader": {
                    "proposal": e.leader.proposal_str(),
                    "fencing_token": e.leader.fencing_token,
                    "lease_id": lease_hex(e.leader.lease_id),
                },
            })).collect::<Vec<_>>(),
            "locks": self.locks.iter().map(|l| json!({
                "name": l.name,
                "fencing_token": l.fencing_token,
                "lease_id": lease_hex(l.lease_id),
                "waiters": l.waiters,
            })).collect::<Vec<_>>(),
        })
    }
}

fn endpoint_table(endpoints: &[EndpointStatus]) -> Vec<String> {
    let rows = endpoints.iter().map(|e| match &e.result {
        Ok(m) => [
            e.endpoint.clone(),
            m.version.clone(),
            format!("{:x}", m.member_id),
            human_bytes(m.db_size),
            if m.is_leader() { "yes" } else { "no" }.to_owned(),
            if m.errors.is_empty() {
                "ok".to_owned()
            } else {
                format!("ok, alarms: {}", m.errors.join("; "))
            },
        ],
        // Last, so that a long reason does not widen the other columns.
        Err(why) => [
            e.endpoint.clone(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            format!("unreachable: {why}"),
        ],
    });
    columns(
        [
            "ENDPOINT",
            "VERSION",
            "MEMBER ID",
            "DB SIZE",
            "RAFT LEADER",
            "STATUS",
        ],
        rows,
    )
}

fn endpoints_json(endpoints: &[EndpointStatus]) -> Vec<Value> {
    endpoints
        .iter()
        .map(|e| match &e.result {
            Ok(m) => json!({
                "endpoint": e.endpoint,
                "reachable": true,
                "version": m.version,
                "member_id": format!("{:x}", m.member_id),
                "db_size": m.db_size,
                "is_leader": m.is_leader(),
                "leader_id": format!("{:x}", m.leader_id),
                "raft_term": m.raft_term,
                "raft_index": m.raft_index,
                "errors": m.errors,
            }),
            Err(why) => json!({
                "endpoint": e.endpoint,
                "reachable": false,
                "error": why,
            }),
        })
        .collect()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `20 kB`, `1.5 MB`: decimal units, as etcdctl prints DB sizes.
fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_etcdctl() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(20_480), "20.5 kB");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
    }
}
