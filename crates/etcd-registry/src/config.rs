//! [`RegistryBuilder`]: endpoints, namespace, prefix, TTL, auth, TLS and timeouts.

use std::time::Duration;

use crate::error::{Error, Result};
#[cfg(feature = "tls")]
use crate::tls::TlsConfig;

/// An etcd user name and password. `Debug` shows the user, never the password.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) user: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Default namespace, as in the Go library.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Default key prefix, as in the Go library.
pub const DEFAULT_KEY_PREFIX: &str = "/etcd_registry";
/// Default lease TTL (10 s, as go-zero uses).
///
/// A registry has one lease however many instances it holds, so the TTL does
/// not change keep-alive cost much: one keep-alive every TTL/3 per process.
/// It bounds how long a crashed process stays listed and how long a crashed
/// leader blocks its successor. Raise it if your etcd can be unreachable for
/// longer than that without your instances being gone for real.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default interval of HTTP/2 keep-alive pings on the etcd connection (10 s).
///
/// etcd's `--grpc-keepalive-min-time` (default 5 s) is the shortest interval
/// it tolerates between pings; a client that pings more often is sent
/// `GOAWAY too_many_pings` and its connection is dropped with every stream on
/// it. etcd's Go client never pings more often than every 10 s.
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default time to wait for the answer to an HTTP/2 keep-alive ping (10 s).
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest HTTP/2 keep-alive interval the builder accepts: etcd's
/// default `--grpc-keepalive-min-time`.
pub const MIN_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// etcd's default `--max-request-bytes`: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;
/// etcd's default `--max-txn-ops`: 128.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// The smallest `max_request_bytes` the builder accepts: 4 KiB.
const MIN_REQUEST_BYTES: usize = 4096;
/// Default dial timeout (5 s).
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout of one unary etcd request (5 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The validated configuration of a [`Registry`](crate::Registry).
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) endpoints: Vec<String>,
    pub(crate) namespace: String,
    pub(crate) key_prefix: String,
    pub(crate) ttl: Duration,
    pub(crate) dial_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) auth: Option<Credentials>,
    pub(crate) keep_alive: Option<(Duration, Duration)>,
    pub(crate) max_request_bytes: usize,
    pub(crate) max_txn_ops: usize,
    /// The gRPC naming target template every registration is also published under.
    pub(crate) grpc_naming: Option<String>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<TlsConfig>,
}

impl Config {
    /// The largest request the registry sends (see [`RegistryBuilder::etcd_limits`]).
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }
    /// The most operations the registry puts in one transaction.
    pub fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }
    /// The etcd endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }
    /// The namespace that isolates this registry's services.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The root prefix of every key.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }
    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// Configures and connects a [`Registry`](crate::Registry).
///
/// Every setting has a default; only the endpoints usually need to be given.
///
/// ```no_run
/// # async fn demo() -> etcd_registry::Result<()> {
/// use std::time::Duration;
/// use etcd_registry::Registry;
///
/// let registry = Registry::builder()
///     .endpoints(["127.0.0.1:2379", "127.0.0.1:22379"])
///     .namespace("prod")
///     .ttl(Duration::from_secs(15))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct RegistryBuilder {
    endpoints: Vec<String>,
    namespace: String,
    key_prefix: String,
    ttl: Duration,
    dial_timeout: Duration,
    request_timeout: Duration,
    auth: Option<Credentials>,
    keep_alive: Option<(Duration, Duration)>,
    max_request_bytes: usize,
    max_txn_ops: usize,
    grpc_naming: Option<String>,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
}

impl Default for RegistryBuilder {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:2379".to_owned()],
            namespace: DEFAULT_NAMESPACE.to_owned(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            auth: None,
            keep_alive: Some((DEFAULT_KEEP_ALIVE_INTERVAL, DEFAULT_KEEP_ALIVE_TIMEOUT)),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            grpc_naming: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl RegistryBuilder {
    /// The etcd endpoints, `host:port` or `http://host:port`.
    /// Default: `127.0.0.1:2379`. `connect` succeeds when any one answers.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The namespace that isolates services. Default `default`.
    ///
    /// Any string the Go library accepts is accepted, including an empty one
    /// and one holding `/`: keys are composed by plain concatenation,
    /// `{prefix}/{namespace}/services/...`, exactly as Go composes them, so a
    /// Rust service joins a Go deployment with the same settings.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The root of every key. Default `/etcd_registry`.
    ///
    /// Any string the Go library accepts is accepted: `/company/registry`,
    /// an empty prefix (keys start `/{namespace}/`), or one ending with `/`
    /// (`/etcd_registry/` gives `/etcd_registry//{namespace}/...`, as in Go).
    /// Nothing is normalised: `/etcd_registry/` and `/etcd_registry` are two
    /// different deployments, in Go and here.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The lease TTL. Default 10 s ([`DEFAULT_TTL`]). It must be a whole
    /// number of seconds, at least 2. Keep-alives are sent every TTL/3.
    ///
    /// Trade-off: a crashed process's instances, and a crashed leader's
    /// claim, last up to one TTL; an etcd outage longer than the TTL expires
    /// the lease (the registry then re-registers everything on a new one).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long `connect` waits for an endpoint to answer. Default 5 s.
    pub fn dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// How long one unary request (get, put, delete, grant) may take
    /// before it counts as failed. Default 5 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive pings on the etcd connection: one every `interval`
    /// while a stream (keep-alive, watch) is open, and the connection is
    /// dropped when a ping is not answered within `timeout`. Default 10 s and
    /// 10 s. No pings are sent on a connection with no open stream.
    ///
    /// etcd sends `GOAWAY too_many_pings` and drops the connection of a
    /// client that pings more often than its `--grpc-keepalive-min-time`
    /// (default 5 s), so `interval` must be at least 5 s
    /// ([`MIN_KEEP_ALIVE_INTERVAL`]). etcd's own `--grpc-keepalive-interval`
    /// (default 2 h) and `--grpc-keepalive-timeout` (20 s) are the server's
    /// pings to the client and need nothing from this setting.
    ///
    /// Nothing safety-related depends on these pings: the lease deadline
    /// behind `lost()`, and the progress requests that restart a silent watch,
    /// detect a blackholed connection on their own. The pings only let a dead
    /// connection be replaced sooner.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = Some((interval, timeout));
        self
    }

    /// Sends no HTTP/2 keep-alive pings at all (see [`keep_alive`](Self::keep_alive)).
    pub fn no_keep_alive(mut self) -> Self {
        self.keep_alive = None;
        self
    }

    /// etcd user name and password. Default: no authentication.
    ///
    /// `connect` fails with [`Error::Auth`] naming the user if etcd refuses
    /// them. Tokens are renewed on their own when etcd expires them
    /// (`--auth-token-ttl`). The password never appears in `Debug` output,
    /// logs or errors.
    pub fn auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// TLS settings (cargo feature `tls`, on by default): the CA, a client
    /// certificate for mutual TLS, the server name. Default: none, and then
    /// `https://` endpoints trust the system's roots while `host:port` and
    /// `http://` endpoints are plain text. With a `TlsConfig`, `host:port`
    /// endpoints use TLS and `http://` ones are refused with
    /// [`Error::InvalidInput`] naming the endpoint.
    ///
    /// A failed handshake (unknown CA, a certificate for another name, a
    /// refused client certificate) makes `connect` fail with
    /// [`Error::Connect`] saying TLS and why, per endpoint.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Validates the settings without connecting.
    ///
    /// Fails with [`Error::InvalidInput`] naming the field.
    pub fn build_config(&self) -> Result<Config> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid(
                "endpoints",
                "at least one endpoint is needed",
            ));
        }
        for e in &self.endpoints {
            if e.trim().is_empty() || e.chars().any(char::is_control) {
                return Err(Error::invalid("endpoints", format!("bad endpoint {e:?}")));
            }
        }
        // Prefix and namespace are not checked: listings always use the whole
        // `{prefix}/{namespace}/services/` string, so no value Go accepts can
        // make one deployment's listing ambiguous, and rejecting one would
        // shut us out of a Go deployment that uses it.
        if self.ttl < Duration::from_secs(2) {
            return Err(Error::invalid(
                "ttl",
                format!("{:?} is under the 2 s minimum", self.ttl),
            ));
        }
        if self.ttl.subsec_nanos() != 0 {
            return Err(Error::invalid(
                "ttl",
                format!("{:?} is not a whole number of seconds", self.ttl),
            ));
        }
        if self.dial_timeout.is_zero() {
            return Err(Error::invalid("dial_timeout", "must be above zero"));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::invalid("request_timeout", "must be above zero"));
        }
        if let Some((interval, timeout)) = self.keep_alive {
            if interval < MIN_KEEP_ALIVE_INTERVAL {
                return Err(Error::invalid(
                    "keep_alive",
                    format!(
                        "an interval of {interval:?} is under etcd's default --grpc-keepalive-min-time \
                         of 5 s; etcd would drop the connection with GOAWAY too_many_pings"
                    ),
                ));
            }
            if timeout.is_zero() {
                return Err(Error::invalid(
                    "keep_alive",
                    "the timeout must be above zero",
                ));
            }
        }
        if let Some(c) = &self.auth
            && c.user.is_empty()
        {
            return Err(Error::invalid("auth", "the user name is empty"));
        }
        if self.max_request_bytes < MIN_REQUEST_BYTES {
            return Err(Error::invalid(
                "max_request_bytes",
                format!(
                    "{} is under the {MIN_REQUEST_BYTES}-byte minimum",
                    self.max_request_bytes
                ),
            ));
        }
        if self.max_txn_ops < 2 {
            return Err(Error::invalid(
                "max_txn_ops",
                "must be at least 2 (a compare and a write)",
            ));
        }
        if let Some(template) = &self.grpc_naming {
            crate::naming::validate_target(&crate::naming::target_for(template, "service"))
                .map_err(|e| match e {
                    Error::InvalidInput { reason, .. } => Error::invalid("grpc_naming", reason),
                    e => e,
                })?;
        }
        self.validate_tls()?;
        Ok(Config {
            endpoints: self.endpoints.clone(),
            namespace: self.namespace.clone(),
            key_prefix: self.key_prefix.clone(),
            ttl: self.ttl,
            dial_timeout: self.dial_timeout,
            request_timeout: self.request_timeout,
            auth: self.auth.clone(),
            keep_alive: self.keep_alive,
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            grpc_naming: self.grpc_naming.clone(),
            #[cfg(feature = "tls")]
            tls: self.tls.clone(),
        })
    }

    /// Also publishes every registration for gRPC clients that use etcd's
    /// naming resolver (`etcd:///{target}`): at `{target}/{host:port}` in
    /// the layout of etcd's Go `naming/endpoints`, under the registry's
    /// lease, written, deleted, restored and reclaimed in the same
    /// transactions as the instance's own key (see [`crate::naming`]).
    /// Every `{name}` in `target` is replaced by the instance's service name,
    /// so `"grpc/{name}"` publishes service `web` under `grpc/web`. Default:
    /// none. For one registration only, see
    /// [`Registry::register_with`](crate::Registry::register_with).
    ///
    /// `connect` fails with [`Error::InvalidInput`] for `grpc_naming` when
    /// the target is empty, ends with `/` or holds a control character;
    /// `register` fails for `port` when the port is not a number.
    pub fn publish_grpc_naming(mut self, target: impl Into<String>) -> Self {
        self.grpc_naming = Some(target.into());
        self
    }

    /// The request limits of the etcd cluster: `--max-request-bytes`
    /// (default 1.5 MiB) and `--max-txn-ops` (default 128). Set them when
    /// the cluster's operators lowered etcd's defaults.
    ///
    /// Batched writes (restoring every registration under a new lease,
    /// draining) are sized to fit both, and a registration that could never
    /// fit in one request is refused by `register` with
    /// [`Error::InvalidInput`] naming its size and the limit. A batch etcd
    /// still refuses for its size or its count of operations is split in
    /// two and sent again, never repeated as it was.
    pub fn etcd_limits(mut self, max_request_bytes: usize, max_txn_ops: usize) -> Self {
        self.max_request_bytes = max_request_bytes;
        self.max_txn_ops = max_txn_ops;
        self
    }
}

impl RegistryBuilder {
    /// The endpoints' schemes must agree with the TLS settings.
    fn validate_tls(&self) -> Result<()> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            tls.validate()?;
            if let Some(e) = self.endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(Error::invalid(
                    "endpoints",
                    format!(
                        "{e} is plain http:// but a TLS config is set; use https://{}",
                        &e[7..]
                    ),
                ));
            }
        } else if self.endpoints.iter().any(|e| e.starts_with("https://"))
            && let Some(e) = self.endpoints.iter().find(|e| e.starts_with("http://"))
        {
            return Err(Error::invalid(
                "endpoints",
                format!("{e} is plain http:// while others are https://; use one scheme"),
            ));
        }
        #[cfg(not(feature = "tls"))]
        if let Some(e) = self.endpoints.iter().find(|e| e.starts_with("https://")) {
            return Err(Error::invalid(
                "endpoints",
                format!("{e} needs TLS, which this build lacks (cargo feature `tls`)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(b: RegistryBuilder) -> &'static str {
        match b.build_config() {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_go_library() {
        let c = RegistryBuilder::default().build_config().unwrap();
        assert_eq!(c.namespace(), "default");
        assert_eq!(c.key_prefix(), "/etcd_registry");
        assert_eq!(c.ttl(), Duration::from_secs(10));
    }

    #[test]
    fn rejects_bad_settings_naming_the_field() {
        let b = RegistryBuilder::default;
        assert_eq!(field(b().ttl(Duration::from_millis(1500))), "ttl");
        assert_eq!(field(b().ttl(Duration::from_millis(2500))), "ttl");
        assert_eq!(field(b().endpoints(Vec::<String>::new())), "endpoints");
        let (two, ten) = (Duration::from_secs(2), Duration::from_secs(10));
        assert_eq!(field(b().keep_alive(two, ten)), "keep_alive");
        assert_eq!(field(b().keep_alive(ten, Duration::ZERO)), "keep_alive");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let b = RegistryBuilder::default().auth("alice", "s3cret-pw");
        let config = b.build_config().unwrap();
        for text in [format!("{b:?}"), format!("{config:?}")] {
            assert!(!text.contains("s3cret-pw"), "{text}");
            assert!(text.contains("alice"), "{text}");
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_with_a_plain_http_endpoint_names_the_endpoint() {
        let pem = "-----BEGIN CERTIFICATE-----\n";
        let b = RegistryBuilder::default()
            .endpoints(["https://127.0.0.1:2379", "http://127.0.0.1:22379"])
            .tls(TlsConfig::new().ca_certificate(pem));
        match b.build_config() {
            Err(Error::InvalidInput { field, reason }) => {
                assert_eq!(field, "endpoints");
                assert!(reason.contains("http://127.0.0.1:22379"), "{reason}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
        let ok = RegistryBuilder::default()
            .endpoints(["127.0.0.1:2379"])
            .tls(TlsConfig::new().ca_certificate(pem));
        assert!(ok.build_config().is_ok());
    }

    #[test]
    fn accepts_nested_prefixes_and_two_second_ttl() {
        let c = RegistryBuilder::default()
            .key_prefix("/company/registry")
            .ttl(Duration::from_secs(2))
            .build_config()
            .unwrap();
        assert_eq!(c.key_prefix(), "/company/registry");
        assert!(
            RegistryBuilder::default()
                .key_prefix("noslash")
                .build_config()
                .is_ok()
        );
    }

    #[test]
    fn accepts_every_prefix_and_namespace_go_accepts() {
        for (prefix, namespace) in [
            ("/etcd_registry/", "default"),
            ("", "default"),
            ("/etcd_registry", "team/a"),
            ("/etcd_registry", ""),
        ] {
            let c = RegistryBuilder::default()
                .key_prefix(prefix)
                .namespace(namespace)
                .build_config()
                .unwrap();
            assert_eq!((c.key_prefix(), c.namespace()), (prefix, namespace));
        }
    }
}
