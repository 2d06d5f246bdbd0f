//! Builds a [`Zone`] from the instances of a namespace.
//!
//! Names, for domain `registry.`, service `web` and instance `web-1`:
//! - `_web._tcp.registry.` SRV: one record per instance whose port is a number;
//! - `web.registry.` A / AAAA: the addresses of the instances whose host is an IP;
//! - `web-1.web.registry.` A or AAAA (host is an IP) or CNAME (host is a name);
//! - `registry.` SOA, and `_tcp.registry.` (exists, holds nothing).
//!
//! What cannot be served becomes a [`Problem`], which the caller logs once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use etcd_registry::ServiceInstance;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record};

use super::names::{Host, MAX_ID_LABEL, MAX_SERVICE_LABEL, is_label};
use super::zone::{Node, Zone};

/// What the zone is built with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The served domain: absolute, lowercase.
    pub domain: Name,
    /// The TTL of every record, and the SOA minimum (how long a resolver may
    /// cache a negative answer).
    pub ttl: u32,
}

/// Something of an instance (or a whole service) that is not served, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    pub service: String,
    /// `None` when the whole service is left out.
    pub id: Option<String>,
    pub issue: Issue,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Issue {
    /// The service name is not a DNS label: the service is left out.
    ServiceNotLabel,
    /// Another service has the same name but for case, and is served.
    ServiceCaseClash,
    /// The id is not a DNS label: the instance is left out.
    IdNotLabel,
    /// Another instance of the service has the same id but for case.
    IdCaseClash,
    /// `{id}.{service}.{domain}` is over 255 bytes: the instance is left out.
    NameTooLong,
    /// The address is neither an IP nor a host name: the instance is left out.
    HostInvalid(String),
    /// The address is a host name: it is the instance's CNAME and SRV target,
    /// and is left out of the service's A / AAAA records.
    HostIsName(String),
    /// The port is not a number: the instance is left out of SRV.
    PortNotNumber(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let instance = match &self.id {
            Some(id) => format!("instance {}/{id}", self.service),
            None => format!("service {}", self.service),
        };
        match &self.issue {
            Issue::ServiceNotLabel => write!(
                f,
                "{instance} is not served by DNS: its name is not a DNS label \
                 (1 to {MAX_SERVICE_LABEL} letters, digits, '-' or '_')"
            ),
            Issue::ServiceCaseClash => write!(
                f,
                "{instance} is not served by DNS: DNS names ignore case, and a service \
                 spelled the same but for case is served"
            ),
            Issue::IdNotLabel => write!(
                f,
                "{instance} is not served by DNS: its id is not a DNS label \
                 (1 to {MAX_ID_LABEL} letters, digits, '-' or '_')"
            ),
            Issue::IdCaseClash => write!(
                f,
                "{instance} is not served by DNS: DNS names ignore case, and an instance \
                 whose id is the same but for case is served"
            ),
            Issue::NameTooLong => write!(
                f,
                "{instance} is not served by DNS: its name would be over 255 bytes"
            ),
            Issue::HostInvalid(host) => write!(
                f,
                "{instance} is not served by DNS: its address {host:?} is neither an IP \
                 address nor a host name"
            ),
            Issue::HostIsName(host) => write!(
                f,
                "{instance} has a host name ({host}), not an IP: it is served as a CNAME \
                 at its own name and as its SRV target, and left out of the service's \
                 A/AAAA records"
            ),
            Issue::PortNotNumber(port) => write!(
                f,
                "{instance} is left out of SRV: its port {port:?} is not a number"
            ),
        }
    }
}

/// A zone and what could not be served in it.
pub struct Built {
    pub zone: Zone,
    pub problems: BTreeSet<Problem>,
}

/// Builds the zone of `instances`, which must be sorted by service name
/// then id (as a cache lists them).
///
/// `known` holds the (lowercase) names of the services seen so far, and
/// gains the ones seen now: a known service whose instances all went gets
/// NODATA rather than NXDOMAIN, as Consul answers, so that a resolver does
/// not cache the service as nonexistent while it is only empty.
pub fn build(
    settings: &Settings,
    instances: &[Arc<ServiceInstance>],
    known: &mut HashSet<String>,
    revision: i64,
) -> Built {
    let mut b = Builder {
        settings,
        nodes: HashMap::new(),
        problems: BTreeSet::new(),
    };
    let domain = &settings.domain;
    let apex = b.node(domain);
    let soa = soa_record(settings, revision);
    apex.soa = Some(soa.clone());
    if let Some(tcp) = child(domain, "_tcp") {
        b.node(&tcp);
    }

    // Original spelling of each served (lowercase) service name.
    let mut served: HashMap<String, &str> = HashMap::new();
    for group in instances.chunk_by(|x, y| x.name == y.name) {
        let name = group[0].name.as_str();
        let problem = |issue| Problem {
            service: name.to_owned(),
            id: None,
            issue,
        };
        if !is_label(name, MAX_SERVICE_LABEL) {
            b.problems.insert(problem(Issue::ServiceNotLabel));
            continue;
        }
        let lower = name.to_ascii_lowercase();
        if served.get(&lower).is_some_and(|first| *first != name) {
            b.problems.insert(problem(Issue::ServiceCaseClash));
            continue;
        }
        served.insert(lower.clone(), name);
        known.insert(lower.clone());
        b.service(&lower, group);
    }
    // Known services without an instance now: their names still exist.
    for lower in known.iter() {
        if !served.contains_key(lower) {
            b.service(lower, &[]);
        }
    }
    Built {
        zone: Zone::new(domain, soa, b.nodes),
        problems: b.problems,
    }
}

struct Builder<'s> {
    settings: &'s Settings,
    nodes: HashMap<LowerName, Node>,
    problems: BTreeSet<Problem>,
}

impl Builder<'_> {
    fn node(&mut self, name: &Name) -> &mut Node {
        self.nodes.entry(LowerName::new(name)).or_default()
    }

    fn record(&self, name: &Name, rdata: RData) -> Record {
        Record::from_rdata(name.clone(), self.settings.ttl, rdata)
    }

    /// The names of one service (`lower`: its lowercase name) and of its
    /// instances, sorted by id.
    fn service(&mut self, lower: &str, instances: &[Arc<ServiceInstance>]) {
        let domain = self.settings.domain.clone();
        let (Some(service_name), Some(srv_name)) = (
            child(&domain, lower),
            child(&domain, "_tcp").and_then(|tcp| child(&tcp, &format!("_{lower}"))),
        ) else {
            // Cannot happen for a domain that parse_domain accepted.
            return;
        };
        // Both names exist, with or without records.
        self.node(&service_name);
        self.node(&srv_name);
        let mut srv = Vec::new();
        let mut addresses = BTreeSet::new();
        let mut ids = HashSet::new();
        for instance in instances {
            let problem = |issue| Problem {
                service: instance.name.clone(),
                id: Some(instance.id.clone()),
                issue,
            };
            if !is_label(&instance.id, MAX_ID_LABEL) {
                self.problems.insert(problem(Issue::IdNotLabel));
                continue;
            }
            if !ids.insert(instance.id.to_ascii_lowercase()) {
                self.problems.insert(problem(Issue::IdCaseClash));
                continue;
            }
            let Some(own_name) = child(&service_name, &instance.id.to_ascii_lowercase()) else {
                self.problems.insert(problem(Issue::NameTooLong));
                continue;
            };
            let target = match Host::parse(&instance.address) {
                Host::Ip(ip) => {
                    addresses.insert(ip);
                    let record = self.record(&own_name, address_rdata(ip));
                    let node = self.node(&own_name);
                    match ip {
                        IpAddr::V4(_) => node.a.push(record),
                        IpAddr::V6(_) => node.aaaa.push(record),
                    }
                    own_name
                }
                Host::Name(host) => {
                    self.problems
                        .insert(problem(Issue::HostIsName(instance.address.clone())));
                    let record = self.record(&own_name, RData::CNAME(CNAME(host.clone())));
                    self.node(&own_name).cname = Some(record);
                    // An SRV target must not be an alias (RFC 2782): the host itself.
                    host
                }
                Host::Invalid => {
                    self.problems
                        .insert(problem(Issue::HostInvalid(instance.address.clone())));
                    continue;
                }
            };
            match instance.port.number() {
                Some(port) => srv.push(self.record(
                    &srv_name,
                    RData::SRV(SRV::new(0, srv_weight(instance.weight), port, target)),
                )),
                None => {
                    self.problems.insert(problem(Issue::PortNotNumber(
                        instance.port.as_str().to_owned(),
                    )));
                }
            }
        }
        for ip in addresses {
            let record = self.record(&service_name, address_rdata(ip));
            let node = self.node(&service_name);
            match ip {
                IpAddr::V4(_) => node.a.push(record),
                IpAddr::V6(_) => node.aaaa.push(record),
            }
        }
        self.node(&srv_name).srv = srv;
    }
}

/// `label.parent`, or `None` when it would be over 255 bytes.
fn child(parent: &Name, label: &str) -> Option<Name> {
    parent.prepend_label(label.as_bytes()).ok()
}

fn address_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// The SRV weight of an instance weight: 0 or below counts as 1, as the
/// library's weighted picker counts it (an SRV weight of 0 would mean
/// "almost never" next to weighted records); above 65535 is capped.
pub fn srv_weight(weight: i64) -> u16 {
    u16::try_from(weight.clamp(1, i64::from(u16::MAX))).unwrap_or(u16::MAX)
}

/// The domain's SOA. The serial is the etcd revision (low 32 bits), so it
/// moves with every change; the minimum is the record TTL (RFC 2308: how
/// long a negative answer may be cached). Refresh, retry and expire are for
/// secondaries, which this server does not feed; they hold common values.
fn soa_record(settings: &Settings, revision: i64) -> Record {
    let domain = &settings.domain;
    let hostmaster = child(domain, "hostmaster").unwrap_or_else(|| domain.clone());
    let serial = (revision & 0xffff_ffff) as u32;
    let soa = SOA::new(
        domain.clone(),
        hostmaster,
        serial,
        3600,
        600,
        86400,
        settings.ttl,
    );
    Record::from_rdata(domain.clone(), settings.ttl, RData::SOA(soa))
}
