//! The DNS server's metrics, through the `metrics` facade: served at
//! `/metrics` with `--metrics-addr`, like every long-running command's.
//!
//! Every counter has a `type` label: the query type (`A`, `AAAA`, `SRV`,
//! `CNAME`, `SOA`, `ANY`), `other` for any other type, and `none` for a
//! message whose question could not be read.

use hickory_proto::rr::RecordType;

/// Queries received, answered or not.
pub const QUERIES_TOTAL: &str = "etcd_registry_dns_queries_total";
/// Responses with at least one answer record.
pub const ANSWERS_TOTAL: &str = "etcd_registry_dns_answers_total";
/// Responses with NXDOMAIN: a name under the domain that does not exist.
pub const NXDOMAIN_TOTAL: &str = "etcd_registry_dns_nxdomain_total";
/// Responses cut to fit a UDP datagram, with TC set (the client retries
/// over TCP).
pub const TRUNCATED_TOTAL: &str = "etcd_registry_dns_truncated_total";
/// Queries answered with an error code: FORMERR (not one question), NOTIMP,
/// REFUSED or BADVERS; the `rcode` label says which. A message that
/// hickory-server cannot parse gets its FORMERR before the handler sees
/// it, and is not counted.
pub const ERRORS_TOTAL: &str = "etcd_registry_dns_errors_total";

/// The `type` label of a query type, from a fixed set so that a client
/// cannot grow the number of series.
pub fn type_label(qtype: Option<RecordType>) -> &'static str {
    match qtype {
        Some(RecordType::A) => "A",
        Some(RecordType::AAAA) => "AAAA",
        Some(RecordType::SRV) => "SRV",
        Some(RecordType::CNAME) => "CNAME",
        Some(RecordType::SOA) => "SOA",
        Some(RecordType::ANY) => "ANY",
        Some(_) => "other",
        None => "none",
    }
}

pub fn query(qtype: &'static str) {
    metrics::counter!(QUERIES_TOTAL, "type" => qtype).increment(1);
}

pub fn answered(qtype: &'static str) {
    metrics::counter!(ANSWERS_TOTAL, "type" => qtype).increment(1);
}

pub fn nxdomain(qtype: &'static str) {
    metrics::counter!(NXDOMAIN_TOTAL, "type" => qtype).increment(1);
}

pub fn truncated(qtype: &'static str) {
    metrics::counter!(TRUNCATED_TOTAL, "type" => qtype).increment(1);
}

pub fn error(qtype: &'static str, rcode: &'static str) {
    metrics::counter!(ERRORS_TOTAL, "type" => qtype, "rcode" => rcode).increment(1);
}
