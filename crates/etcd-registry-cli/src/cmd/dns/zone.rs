//! [`Zone`]: every record the server can answer with, built once per change
//! of the namespace (see `build.rs`) and read by every query without a lock
//! on the cache or a round trip to etcd.

use std::collections::HashMap;
use std::sync::Arc;

use hickory_proto::rr::{LowerName, Name, Record, RecordType};

/// The records at one name. Empty for a name that exists but holds nothing
/// of the asked type (a service with no serving instance, `_tcp.{domain}`).
#[derive(Debug, Default)]
pub struct Node {
    pub a: Vec<Record>,
    pub aaaa: Vec<Record>,
    pub srv: Vec<Record>,
    /// An instance whose host is a name: the only record at its name.
    pub cname: Option<Record>,
    /// The domain's SOA, at the apex only.
    pub soa: Option<Record>,
}

/// What a query gets.
#[derive(Debug)]
pub enum Outcome<'z> {
    /// NOERROR with these records; all empty is NODATA (the name exists).
    Records([&'z [Record]; 4]),
    /// NXDOMAIN: the name is under the domain but does not exist.
    NxDomain,
    /// REFUSED: the name is not under the domain; this server answers
    /// nothing else and does not recurse.
    Refused,
}

impl Outcome<'_> {
    /// The answer records (none for NODATA, NXDOMAIN and REFUSED).
    pub fn answers(&self) -> impl Iterator<Item = &Record> + Send {
        let parts: [&[Record]; 4] = match self {
            Outcome::Records(parts) => *parts,
            _ => [&[], &[], &[], &[]],
        };
        parts.into_iter().flatten()
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Outcome::Records(parts) => parts.iter().all(|p| p.is_empty()),
            _ => true,
        }
    }
}

/// The names of one service: `{service}.{domain}`, `_{service}._tcp.{domain}`
/// and `{id}.{service}.{domain}` for each id (lowercase label bytes).
/// Shared between successive zones while the service's instances stay the same.
#[derive(Debug, Default)]
pub struct ServiceZone {
    pub service: Node,
    pub srv: Node,
    pub instances: HashMap<Vec<u8>, Node>,
}

/// A name that exists and holds nothing: `_tcp.{domain}`.
static EMPTY: Node = Node {
    a: Vec::new(),
    aaaa: Vec::new(),
    srv: Vec::new(),
    cname: None,
    soa: None,
};

/// The served names of one namespace at one moment. Immutable: a change
/// builds a new one (reusing the services that did not change).
#[derive(Debug)]
pub struct Zone {
    origin: LowerName,
    apex: Node,
    /// By lowercase service label.
    services: HashMap<Vec<u8>, Arc<ServiceZone>>,
}

impl Zone {
    pub fn new(origin: &Name, apex: Node, services: HashMap<Vec<u8>, Arc<ServiceZone>>) -> Self {
        Zone {
            origin: LowerName::new(origin),
            apex,
            services,
        }
    }

    /// The SOA sent in the authority section of negative answers, so that
    /// resolvers may cache them for its minimum (the record TTL).
    pub fn soa(&self) -> Option<&Record> {
        self.apex.soa.as_ref()
    }

    /// The records at `name`, if it exists.
    ///
    /// Labels are counted one by one: hickory's `num_labels` leaves out a
    /// leading `*` (as RRSIG counts labels), which would make `*.{domain}`
    /// the apex and `*.{service}.{domain}` the service. The zone has no
    /// wildcards, and `*` is never a service or id label (`is_label`), so a
    /// literal `*` label names nothing: NXDOMAIN.
    fn node(&self, name: &LowerName) -> Option<&Node> {
        let extra = name
            .iter()
            .count()
            .checked_sub(self.origin.iter().count())?;
        let mut labels = name.iter();
        match (extra, labels.next(), labels.next()) {
            (0, _, _) => Some(&self.apex),
            (1, Some(b"_tcp"), _) => Some(&EMPTY),
            (1, Some(service), _) => self.services.get(service).map(|s| &s.service),
            (2, Some(first), Some(b"_tcp")) if first.starts_with(b"_") => {
                self.services.get(&first[1..]).map(|s| &s.srv)
            }
            (2, Some(id), Some(service)) => self.services.get(service)?.instances.get(id),
            _ => None,
        }
    }

    /// The answer to `qtype` at `name`.
    ///
    /// A CNAME answers every type but CNAME itself with the alias, as
    /// RFC 1034 section 3.6.2 asks; the resolver follows it. `ANY` gets
    /// every record at the name.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Outcome<'_> {
        if !self.origin.zone_of(name) {
            return Outcome::Refused;
        }
        let Some(node) = self.node(name) else {
            return Outcome::NxDomain;
        };
        let none: &[Record] = &[];
        if let Some(cname) = &node.cname {
            return Outcome::Records([std::slice::from_ref(cname), none, none, none]);
        }
        let soa = node.soa.as_slice();
        Outcome::Records(match qtype {
            RecordType::A => [&node.a, none, none, none],
            RecordType::AAAA => [&node.aaaa, none, none, none],
            RecordType::SRV => [&node.srv, none, none, none],
            RecordType::SOA => [soa, none, none, none],
            RecordType::ANY => [soa, &node.a, &node.aaaa, &node.srv],
            _ => [none, none, none, none],
        })
    }

    /// How many names the zone holds.
    pub fn len(&self) -> usize {
        2 + self
            .services
            .values()
            .map(|s| 2 + s.instances.len())
            .sum::<usize>()
    }

    /// The names of service `lower`, shared with the zone it was built for.
    #[cfg(test)]
    pub fn service(&self, lower: &str) -> Option<&Arc<ServiceZone>> {
        self.services.get(lower.as_bytes())
    }
}
