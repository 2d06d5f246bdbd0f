//! [`RegistryBuilder`]: endpoints, namespace, prefix, TTL, auth, TLS and timeouts.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::registry::Registry;

/// Default namespace, as in the Go library.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Default key prefix, as in the Go library.
pub const DEFAULT_KEY_PREFIX: &str = "/etcd_registry";
/// Default lease TTL, as in the Go library (30 s).
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Default dial timeout (5 s).
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout of one unary etcd request (5 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The validated configuration of a [`Registry`].
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) endpoints: Vec<String>,
    pub(crate) namespace: String,
    pub(crate) key_prefix: String,
    pub(crate) ttl: Duration,
    pub(crate) dial_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) auth: Option<(String, String)>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<etcd_client::TlsOptions>,
}

impl Config {
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

/// Configures and connects a [`Registry`].
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
    auth: Option<(String, String)>,
    #[cfg(feature = "tls")]
    tls: Option<etcd_client::TlsOptions>,
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
    /// It must be non-empty and hold no `/` and no control characters.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The root of every key. Default `/etcd_registry`.
    /// It may hold inner `/` (`/company/registry`) but must not end with one.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The lease TTL. Default 30 s. It must be a whole number of seconds, at least 2.
    /// Keep-alives are sent every TTL/3.
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

    /// etcd user name and password. Default: no authentication.
    pub fn auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some((user.into(), password.into()));
        self
    }

    /// TLS options for `https://` endpoints (cargo feature `tls`).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: etcd_client::TlsOptions) -> Self {
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
        validate_namespace(&self.namespace)?;
        validate_key_prefix(&self.key_prefix)?;
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
        if let Some((user, _)) = &self.auth
            && user.is_empty()
        {
            return Err(Error::invalid("auth", "the user name is empty"));
        }
        Ok(Config {
            endpoints: self.endpoints.clone(),
            namespace: self.namespace.clone(),
            key_prefix: self.key_prefix.clone(),
            ttl: self.ttl,
            dial_timeout: self.dial_timeout,
            request_timeout: self.request_timeout,
            auth: self.auth.clone(),
            #[cfg(feature = "tls")]
            tls: self.tls.clone(),
        })
    }

    /// Validates the settings, reaches etcd and grants the registry's lease.
    ///
    /// Succeeds when any endpoint answers within the dial timeout; otherwise
    /// fails with [`Error::Connect`] naming every endpoint tried.
    pub async fn connect(self) -> Result<Registry> {
        let config = self.build_config()?;
        Registry::connect_with(config).await
    }
}

fn validate_namespace(ns: &str) -> Result<()> {
    if ns.is_empty() {
        return Err(Error::invalid("namespace", "must not be empty"));
    }
    if ns.contains('/') {
        return Err(Error::invalid("namespace", format!("{ns:?} contains '/'")));
    }
    if ns.chars().any(char::is_control) {
        return Err(Error::invalid(
            "namespace",
            format!("{ns:?} contains a control character"),
        ));
    }
    Ok(())
}

fn validate_key_prefix(p: &str) -> Result<()> {
    if p.is_empty() {
        return Err(Error::invalid("key_prefix", "must not be empty"));
    }
    if p.ends_with('/') {
        return Err(Error::invalid("key_prefix", format!("{p:?} ends with '/'")));
    }
    if p.chars().any(char::is_control) {
        return Err(Error::invalid(
            "key_prefix",
            format!("{p:?} contains a control character"),
        ));
    }
    Ok(())
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
        assert_eq!(c.ttl(), Duration::from_secs(30));
    }

    #[test]
    fn rejects_bad_settings_naming_the_field() {
        let b = RegistryBuilder::default;
        assert_eq!(field(b().ttl(Duration::from_millis(1500))), "ttl");
        assert_eq!(field(b().ttl(Duration::from_millis(2500))), "ttl");
        assert_eq!(field(b().endpoints(Vec::<String>::new())), "endpoints");
        assert_eq!(field(b().namespace("")), "namespace");
        assert_eq!(field(b().namespace("a/b")), "namespace");
        assert_eq!(field(b().namespace("a\nb")), "namespace");
        assert_eq!(field(b().key_prefix("")), "key_prefix");
        assert_eq!(field(b().key_prefix("/x/")), "key_prefix");
        assert_eq!(field(b().key_prefix("/x\u{7}")), "key_prefix");
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
}
