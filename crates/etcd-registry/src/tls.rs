//! [`TlsConfig`]: how the registry talks TLS to etcd (cargo feature `tls`, on
//! by default).

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};

/// TLS settings for `https://` etcd endpoints: the CA to trust, a client
/// certificate for mutual TLS, and the name to expect on the server's
/// certificate. etcd-client's own types do not appear in this API.
///
/// Defaults:
/// * **CA:** without [`ca_certificate`](Self::ca_certificate), the system's
///   trust roots (as for an `https://` endpoint given without any `TlsConfig`).
/// * **Client certificate:** none. etcd started with `--client-cert-auth`
///   refuses such a client.
/// * **Server name:** the endpoint's host.
///
/// With a `TlsConfig`, endpoints without a scheme (`host:port`) are reached
/// over TLS; `http://` endpoints are refused with
/// [`Error::InvalidInput`](crate::Error::InvalidInput).
///
/// `Debug` never shows the private key.
///
/// ```no_run
/// # async fn demo() -> etcd_registry::Result<()> {
/// use etcd_registry::{Registry, TlsConfig};
///
/// let tls = TlsConfig::from_files("ca.crt", "client.crt", "client.key")?;
/// let registry = Registry::builder()
///     .endpoints(["https://10.0.0.1:2379"])
///     .tls(tls)
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct TlsConfig {
    ca_pem: Option<String>,
    identity: Option<(String, String)>,
    domain_name: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_certificate", &self.ca_pem.as_ref().map(|_| "<PEM>"))
            .field(
                "identity",
                &self
                    .identity
                    .as_ref()
                    .map(|_| "<certificate PEM, key redacted>"),
            )
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

impl TlsConfig {
    /// Trusts the system roots, presents no client certificate, and expects
    /// the endpoint's host name on the server's certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts only this CA certificate (PEM) for the server's certificate,
    /// instead of the system roots.
    pub fn ca_certificate(mut self, pem: impl Into<String>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this client certificate and private key (both PEM) for mutual
    /// TLS. Default: none.
    pub fn identity(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Expects this name on the server's certificate instead of the
    /// endpoint's host (as etcdctl's certificates often name `localhost` or a
    /// DNS name while clients dial an IP address).
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// Reads PEM files for mutual TLS: the CA certificate, the client
    /// certificate and its key, as etcdctl's `--cacert`, `--cert` and `--key`.
    /// Same as `TlsConfig::new().ca_certificate_file(ca)?.identity_files(cert, key)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] with field `tls` naming the file that cannot
    /// be read or holds no PEM block.
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        Self::new()
            .ca_certificate_file(ca)?
            .identity_files(cert, key)
    }

    /// Like [`ca_certificate`](Self::ca_certificate), read from a PEM file.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] with field `tls` naming the file that cannot
    /// be read or holds no PEM block.
    pub fn ca_certificate_file(self, ca: impl AsRef<Path>) -> Result<Self> {
        Ok(self.ca_certificate(read_pem(ca.as_ref(), "CA certificate")?))
    }

    /// Like [`identity`](Self::identity), read from PEM files.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] with field `tls` naming the file that cannot
    /// be read or holds no PEM block.
    pub fn identity_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        Ok(self.identity(
            read_pem(cert.as_ref(), "client certificate")?,
            read_pem(key.as_ref(), "client key")?,
        ))
    }

    /// Checks what can be checked without connecting: every PEM holds a PEM block.
    pub(crate) fn validate(&self) -> Result<()> {
        let pem = |what: &str, text: &str| {
            if text.contains("-----BEGIN ") {
                Ok(())
            } else {
                Err(Error::invalid("tls", format!("the {what} is not PEM")))
            }
        };
        if let Some(ca) = &self.ca_pem {
            pem("CA certificate", ca)?;
        }
        if let Some((cert, key)) = &self.identity {
            pem("client certificate", cert)?;
            pem("client key", key)?;
        }
        if let Some(name) = &self.domain_name
            && (name.is_empty() || name.chars().any(|c| c.is_control() || c == '/'))
        {
            return Err(Error::invalid("tls", format!("bad domain name {name:?}")));
        }
        Ok(())
    }

    /// etcd-client's options for this configuration.
    pub(crate) fn to_options(&self) -> etcd_client::TlsOptions {
        let mut options = etcd_client::TlsOptions::new();
        options = match &self.ca_pem {
            Some(ca) => options.ca_certificate(etcd_client::Certificate::from_pem(ca)),
            None => options.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            options = options.identity(etcd_client::Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.domain_name {
            options = options.domain_name(name.clone());
        }
        options
    }
}

fn read_pem(path: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::invalid(
            "tls",
            format!("cannot read the {what} {}: {e}", path.display()),
        )
    })?;
    if !text.contains("-----BEGIN ") {
        return Err(Error::invalid(
            "tls",
            format!("the {what} {} holds no PEM block", path.display()),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n";
        let tls = TlsConfig::new().identity("-----BEGIN CERTIFICATE-----\n", key);
        let debug = format!("{tls:?}");
        assert!(!debug.contains("SECRETKEYBYTES"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }

    #[test]
    fn from_files_names_the_unreadable_file() {
        let err = TlsConfig::from_files("/nonexistent/ca.crt", "c.crt", "c.key").unwrap_err();
        match err {
            Error::InvalidInput { field, reason } => {
                assert_eq!(field, "tls");
                assert!(reason.contains("/nonexistent/ca.crt"), "{reason}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
}
