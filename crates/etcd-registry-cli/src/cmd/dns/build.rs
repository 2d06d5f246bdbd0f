//! Builds a [`Zone`] from the instances of a namespace.
//!
//! Names, for domain `registry.`, service `web` and instance `web-1`:
//! - `_web._tcp.registry.` SRV: one record per instance whose port is a number;
//! - `web.registry.` A / AAAA: the addresses of the instances whose host is an IP;
//! - `web-1.web.registry.` A or AAAA (host is an IP) or CNAME (host is a name);
//! - `registry.` SOA, and `_tcp.registry.` (exists, holds nothing).
//!
//! What cannot be served becomes a [`Problem`], which the caller logs once.
//!
//! A service whose instances all went keeps its names, empty (NODATA), for
//! [`Settings::nodata_hold`] after its last instance went; then they go
//! (NXDOMAIN), so that a service that is gone for good is not answered
//! forever. etcd cannot tell a service that is only empty (drained, being
//! restarted) from one that is gone: both have no key left.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_registry::ServiceInstance;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record};
use tokio::time::Instant;

use super::names::{Host, MAX_ID_LABEL, MAX_SERVICE_LABEL, is_label};
use super::zone::{Node, ServiceZone, Zone};

/// What the zone is built with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The served domain: absolute, lowercase.
    pub domain: Name,
    /// The TTL of every record, and the SOA minimum (how long a resolver may
    /// cache a negative answer).
    pub ttl: u32,
    /// How long a service whose instances all went is still answered, with
    /// nothing (NODATA), before its names go (NXDOMAIN).
    pub nodata_hold: Duration,
}

/// The least [`Settings::nodata_hold`]: 30 s, time for an instance to be
/// restarted or replaced. The record TTL, if longer.
pub const NODATA_HOLD: Duration = Duration::from_secs(30);

impl Settings {
    /// `nodata_hold` from the record TTL: [`NODATA_HOLD`], or the TTL if longer.
    pub fn new(domain: Name, ttl: u32) -> Self {
        Settings {
            domain,
            ttl,
            nodata_hold: NODATA_HOLD.max(Duration::from_secs(ttl.into())),
        }
    }
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
    /// When the next empty service's hold ends: the zone must be built
    /// again then, change or not, to let its names go.
    pub prune_at: Option<Instant>,
}

/// What one build leaves for the next.
#[derive(Default)]
pub struct State {
    /// The (lowercase) names of the services seen, with when each became
    /// empty (`None` while it has instances): a known service whose
    /// instances all went gets NODATA rather than NXDOMAIN, as Consul
    /// answers, so that a resolver does not cache the service as
    /// nonexistent while it is only empty; for [`Settings::nodata_hold`],
    /// after which it is forgotten.
    known: HashMap<String, Option<Instant>>,
    /// Each served service's names, with the instances they were built
    /// from: reused while the cache hands out the same instances.
    services: HashMap<String, Built1>,
}

/// One service, built.
struct Built1 {
    instances: Vec<Arc<ServiceInstance>>,
    zone: Arc<ServiceZone>,
    problems: Vec<Problem>,
}

/// Builds the zone of `instances`, which must be sorted by service name
/// then id (as a cache lists them). A service whose instances are the very
/// ones of the previous build (the cache shares unchanged instances) is not
/// built again: a change costs the changed service, not the namespace.
pub fn build(
    settings: &Settings,
    instances: &[Arc<ServiceInstance>],
    state: &mut State,
    revision: i64,
) -> Built {
    build_at(settings, instances, state, revision, Instant::now())
}

/// [`build`], at `now`.
pub fn build_at(
    settings: &Settings,
    instances: &[Arc<ServiceInstance>],
    state: &mut State,
    revision: i64,
    now: Instant,
) -> Built {
    let domain = &settings.domain;
    let apex = Node {
        soa: Some(soa_record(settings, revision)),
        ..Node::default()
    };
    let mut problems = BTreeSet::new();
    let mut services = HashMap::new();
    let mut reused = HashMap::new();

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
            problems.insert(problem(Issue::ServiceNotLabel));
            continue;
        }
        let lower = name.to_ascii_lowercase();
        if served.get(&lower).is_some_and(|first| *first != name) {
            problems.insert(problem(Issue::ServiceCaseClash));
            continue;
        }
        served.insert(lower.clone(), name);
        state.known.insert(lower.clone(), None);
        let built = match state.services.remove(name) {
            Some(last) if same_instances(&last.instances, group) => last,
            _ => {
                let (zone, service_problems) = service_zone(settings, &lower, group);
                Built1 {
                    instances: group.to_vec(),
                    zone: Arc::new(zone),
                    problems: service_problems,
                }
            }
        };
        problems.extend(built.problems.iter().cloned());
        services.insert(lower.into_bytes(), built.zone.clone());
        reused.insert(name.to_owned(), built);
    }
    state.services = reused;
    // Known services without an instance now: their names still exist,
    // empty, until the hold since they became empty ends.
    let mut prune_at: Option<Instant> = None;
    state.known.retain(|lower, empty_since| {
        if served.contains_key(lower) {
            return true;
        }
        let until = *empty_since.get_or_insert(now) + settings.nodata_hold;
        if now >= until {
            return false;
        }
        prune_at = Some(prune_at.map_or(until, |at| at.min(until)));
        let (zone, _) = service_zone(settings, lower, &[]);
        services.insert(lower.clone().into_bytes(), Arc::new(zone));
        true
    });
    Built {
        zone: Zone::new(domain, apex, services),
        problems,
        prune_at,
    }
}

fn same_instances(a: &[Arc<ServiceInstance>], b: &[Arc<ServiceInstance>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

/// The names of one service (`lower`: its lowercase name) and of its
/// instances, sorted by id, and what of them cannot be served.
fn service_zone(
    settings: &Settings,
    lower: &str,
    instances: &[Arc<ServiceInstance>],
) -> (ServiceZone, Vec<Problem>) {
    let mut zone = ServiceZone::default();
    let mut problems = Vec::new();
    let domain = &settings.domain;
    let record = |name: &Name, rdata| Record::from_rdata(name.clone(), settings.ttl, rdata);
    let (Some(service_name), Some(srv_name)) = (
        child(domain, lower),
        child(domain, "_tcp").and_then(|tcp| child(&tcp, &format!("_{lower}"))),
    ) else {
        // Cannot happen for a domain that parse_domain accepted.
        return (zone, problems);
    };
    let mut addresses = BTreeSet::new();
    for instance in instances {
        let problem = |issue| Problem {
            service: instance.name.clone(),
            id: Some(instance.id.clone()),
            issue,
        };
        if !is_label(&instance.id, MAX_ID_LABEL) {
            problems.push(problem(Issue::IdNotLabel));
            continue;
        }
        let id = instance.id.to_ascii_lowercase();
        if zone.instances.contains_key(id.as_bytes()) {
            problems.push(problem(Issue::IdCaseClash));
            continue;
        }
        let Some(own_name) = child(&service_name, &id) else {
            problems.push(problem(Issue::NameTooLong));
            continue;
        };
        let mut node = Node::default();
        let target = match Host::parse(&instance.address) {
            Host::Ip(ip) => {
                addresses.insert(ip);
                let r = record(&own_name, address_rdata(ip));
                match ip {
                    IpAddr::V4(_) => node.a.push(r),
                    IpAddr::V6(_) => node.aaaa.push(r),
                }
                own_name
            }
            Host::Name(host) => {
                problems.push(problem(Issue::HostIsName(instance.address.clone())));
                node.cname = Some(record(&own_name, RData::CNAME(CNAME(host.clone()))));
                // An SRV target must not be an alias (RFC 2782): the host itself.
                host
            }
            Host::Invalid => {
                problems.push(problem(Issue::HostInvalid(instance.address.clone())));
                continue;
            }
        };
        zone.instances.insert(id.into_bytes(), node);
        match instance.port.number() {
            Some(port) => zone.srv.srv.push(record(
                &srv_name,
                RData::SRV(SRV::new(0, srv_weight(instance.weight), port, target)),
            )),
            None => problems.push(problem(Issue::PortNotNumber(
                instance.port.as_str().to_owned(),
            ))),
        }
    }
    for ip in addresses {
        let r = record(&service_name, address_rdata(ip));
        match ip {
            IpAddr::V4(_) => zone.service.a.push(r),
            IpAddr::V6(_) => zone.service.aaaa.push(r),
        }
    }
    (zone, problems)
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
