//! Metrics of [`Channel`](super::Channel)s, through the `metrics` facade
//! (feature `metrics`; see [`crate::metrics`] for the conventions).
//!
//! Each metric has the labels `service` and `endpoint` (the instance's
//! `address:port`). Unlike the registry's own metrics these name instances,
//! as per-endpoint figures are what a balancer is judged by; the number of
//! series is bounded by the endpoints a channel uses (see `subset`).
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `etcd_registry_channel_requests_total` | counter | requests sent to the endpoint |
//! | `etcd_registry_channel_failures_total` | counter | requests that failed (transport error or `UNAVAILABLE`) |
//! | `etcd_registry_channel_retries_total` | counter | requests sent again (label `endpoint` is `*`; `reason` is `not_sent` or `idempotent`) |
//! | `etcd_registry_channel_ejections_total` | counter | times the endpoint was ejected (`reason`: `connect`, `lost` or `outlier`) |
//! | `etcd_registry_channel_request_duration_seconds` | histogram | time to the answer's headers |

#[cfg(feature = "metrics")]
use ::metrics::{counter, histogram};

/// Requests sent to an endpoint.
#[cfg(feature = "metrics")]
pub const REQUESTS_TOTAL: &str = "etcd_registry_channel_requests_total";
/// Failed requests.
#[cfg(feature = "metrics")]
pub const FAILURES_TOTAL: &str = "etcd_registry_channel_failures_total";
/// Retried requests.
#[cfg(feature = "metrics")]
pub const RETRIES_TOTAL: &str = "etcd_registry_channel_retries_total";
/// Ejections.
#[cfg(feature = "metrics")]
pub const EJECTIONS_TOTAL: &str = "etcd_registry_channel_ejections_total";
/// Request latency.
#[cfg(feature = "metrics")]
pub const REQUEST_DURATION_SECONDS: &str = "etcd_registry_channel_request_duration_seconds";

/// The labels of one endpoint, built once.
#[derive(Clone, Debug, Default)]
pub(crate) struct Labels {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    service: String,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    endpoint: String,
}

impl Labels {
    pub(crate) fn new(service: &str, endpoint: &str) -> Self {
        Self {
            service: service.to_owned(),
            endpoint: endpoint.to_owned(),
        }
    }
}

/// One request answered (or failed) after `elapsed`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn request(labels: &Labels, elapsed: std::time::Duration, failed: bool) {
    #[cfg(feature = "metrics")]
    {
        let l = [
            ("service", labels.service.clone()),
            ("endpoint", labels.endpoint.clone()),
        ];
        counter!(REQUESTS_TOTAL, &l).increment(1);
        if failed {
            counter!(FAILURES_TOTAL, &l).increment(1);
        }
        histogram!(REQUEST_DURATION_SECONDS, &l).record(elapsed.as_secs_f64());
    }
}

/// A request sent again.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn retry(service: &str, reason: &'static str) {
    #[cfg(feature = "metrics")]
    counter!(RETRIES_TOTAL, "service" => service.to_owned(), "endpoint" => "*", "reason" => reason)
        .increment(1);
}

/// An endpoint ejected.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn ejected(labels: &Labels, reason: &'static str) {
    #[cfg(feature = "metrics")]
    counter!(
        EJECTIONS_TOTAL,
        "service" => labels.service.clone(),
        "endpoint" => labels.endpoint.clone(),
        "reason" => reason
    )
    .increment(1);
}
