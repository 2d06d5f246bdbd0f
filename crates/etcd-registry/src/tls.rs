//! [`TlsConfig`]: how the registry talks TLS to etcd (cargo feature `tls`, on
//! by default).

use std::fmt;
use std::path::{Path, PathBuf};

mod check;
pub(crate) mod handshake;
mod x509;

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
    /// The files the identity came from, to name them in errors.
    identity_files: Option<(PathBuf, PathBuf)>,
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
    /// instead of the system roots. The PEM may hold several certificates
    /// (a bundle of CAs, or a root and its intermediates); each is trusted.
    /// Only its PEM form is checked (at connect);
    /// [`ca_certificate_file`](Self::ca_certificate_file) checks more.
    pub fn ca_certificate(mut self, pem: impl Into<String>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this client certificate and private key (both PEM) for mutual
    /// TLS. Default: none. The certificate PEM may go on with the
    /// intermediate CAs that issued it (leaf first). Both are checked when the
    /// registry connects, as [`identity_files`](Self::identity_files) describes.
    pub fn identity(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self.identity_files = None;
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
    /// [`Error::InvalidInput`] with field `tls`, naming the file, when a file
    /// cannot be read or holds nothing usable; see
    /// [`ca_certificate_file`](Self::ca_certificate_file) and
    /// [`identity_files`](Self::identity_files).
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        Self::new()
            .ca_certificate_file(ca)?
            .identity_files(cert, key)
    }

    /// Like [`ca_certificate`](Self::ca_certificate), read from a PEM file
    /// and checked now.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] with field `tls`, naming the file, when it
    /// cannot be read, holds no certificate, or none of its certificates can
    /// be a trust anchor. A bundle in which only some certificates are
    /// unusable is accepted, with a warning naming them.
    pub fn ca_certificate_file(self, ca: impl AsRef<Path>) -> Result<Self> {
        let path = ca.as_ref();
        let pem = read_pem(path, "CA certificate")?;
        check::ca(&pem, &format!("CA certificate {}", path.display()))?;
        Ok(self.ca_certificate(pem))
    }

    /// Like [`identity`](Self::identity), read from PEM files and checked
    /// now, as rustls (the TLS stack) and etcd would at connect.
    ///
    /// The certificate must be X.509 v3 (an `openssl x509 -req` run without
    /// `-extfile` makes a v1 certificate, which rustls refuses), valid now,
    /// and, if it lists extended key usages, allowed `clientAuth` (etcd
    /// checks it). The key may be PKCS#8 (`BEGIN PRIVATE KEY`), PKCS#1
    /// (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`): RSA,
    /// ECDSA P-256 or P-384, or Ed25519, unencrypted, and the certificate's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] with field `tls` when a file cannot be read or
    /// breaks a rule above. The message names the file (both files for a
    /// certificate and key that do not match), says why, and how to re-issue
    /// or convert it.
    pub fn identity_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let cert_pem = read_pem(cert, "client certificate")?;
        let key_pem = read_pem(key, "client key")?;
        check::identity(
            &cert_pem,
            &key_pem,
            &format!("client certificate {}", cert.display()),
            &format!("client key {}", key.display()),
        )?;
        let mut tls = self.identity(cert_pem, key_pem);
        tls.identity_files = Some((cert.to_owned(), key.to_owned()));
        Ok(tls)
    }

    /// Checks what can be checked without connecting: the client
    /// certificate and its key as [`identity_files`](Self::identity_files)
    /// does, that the CA is PEM (a CA file was checked in full when loaded;
    /// a CA given as text that cannot be used shows as an unknown issuer at
    /// the handshake), and the name.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(ca) = &self.ca_pem
            && !ca.contains("-----BEGIN ")
        {
            return Err(Error::invalid("tls", "the CA certificate is not PEM"));
        }
        if let Some((cert, key)) = &self.identity {
            let (cert_label, key_label) = match &self.identity_files {
                Some((c, k)) => (
                    format!("client certificate {}", c.display()),
                    format!("client key {}", k.display()),
                ),
                None => ("client certificate".to_owned(), "client key".to_owned()),
            };
            check::identity(cert, key, &cert_label, &key_label)?;
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
            format!(
                "the {what} {} holds no PEM block (DER files can be converted with \
                 `openssl x509 -inform der` or `openssl pkey -inform der`)",
                path.display()
            ),
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
