//! The checks a [`TlsConfig`](super::TlsConfig) gets when it is loaded: what
//! rustls would refuse when tonic builds the connection (a v1 certificate, a
//! key that is not the certificate's), and what etcd would refuse during the
//! handshake (an expired client certificate, one not allowed for client
//! authentication), each with a message that names the file and the fix.
//!
//! rustls decides; [`super::x509`] only explains. tonic reads the PEM the
//! same way (`pki_types` PEM parsing, then `with_client_auth_cert`), so what
//! passes here passes there.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::x509;
use crate::error::{Error, Result};

/// How to issue a client certificate that works: X.509 v3, allowed for
/// client authentication.
pub(crate) const REISSUE_CLIENT: &str = "re-issue it as an X.509 v3 certificate with an \
    extensions file, e.g. `printf 'extendedKeyUsage=clientAuth\\n' > client.ext && \
    openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
    -extfile client.ext -out client.crt`";

fn invalid(reason: String) -> Error {
    Error::invalid("tls", reason)
}

/// The PEM labels (`CERTIFICATE`, `PRIVATE KEY`, ...) in `pem`, in order.
fn labels(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .collect()
}

fn is_key_label(label: &str) -> bool {
    label.ends_with("PRIVATE KEY")
}

/// The provider tonic builds its client configuration with: the process
/// default if the application installed one, else ring (etcd-client's
/// `tls` feature).
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn certificates(pem: &str, label: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("the {label} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        let found = labels(pem);
        let swapped = if found.iter().any(|l| is_key_label(l)) {
            "; it holds a private key: are the certificate and key files swapped?"
        } else {
            ""
        };
        return Err(invalid(format!(
            "the {label} holds no CERTIFICATE block (found: {}){swapped}",
            found.join(", ")
        )));
    }
    Ok(certs)
}

/// A CA file or bundle: at least one certificate must be usable as a trust
/// anchor. tonic skips the unusable ones silently, which would surface only
/// as "unknown issuer" at the handshake.
pub(super) fn ca(pem: &str, label: &str) -> Result<()> {
    let certs = certificates(pem, label)?;
    let mut usable = 0;
    let mut refused = Vec::new();
    for (i, cert) in certs.into_iter().enumerate() {
        match RootCertStore::empty().add(cert) {
            Ok(()) => usable += 1,
            Err(e) => refused.push(format!("certificate #{}: {e}", i + 1)),
        }
    }
    if usable == 0 {
        return Err(invalid(format!(
            "no certificate in the {label} can be trusted as a CA ({})",
            refused.join("; ")
        )));
    }
    if !refused.is_empty() {
        tracing::warn!(ca = %label, refused = %refused.join("; "), "some CA certificates are unusable and are ignored");
    }
    Ok(())
}

/// A client certificate (leaf first, then any intermediates) and its key.
pub(super) fn identity(
    cert_pem: &str,
    key_pem: &str,
    cert_label: &str,
    key_label: &str,
) -> Result<()> {
    let certs = certificates(cert_pem, cert_label)?;
    leaf(&certs[0], cert_label)?;
    let key = private_key(key_pem, key_label)?;
    let provider = provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        invalid(format!(
            "the {key_label} is a key that rustls cannot sign with ({e}); use an RSA, \
             ECDSA P-256/P-384 or Ed25519 key"
        ))
    })?;
    let certified = CertifiedKey::new(certs, signing);
    match certified.keys_match() {
        // rustls accepts a key that cannot tell its public key; so do we.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(invalid(format!(
                "the {cert_label} and the {key_label} do not match: the key is not the \
                 private key of the certificate (compare `openssl x509 -noout -pubkey -in CERT` \
                 with `openssl pkey -pubout -in KEY`)"
            )))
        }
        Err(e) => Err(invalid(format!(
            "the {cert_label} cannot be used with the {key_label}: {e}"
        ))),
    }
}

/// The client's own certificate: what rustls parses (v3 only) and what
/// etcd checks (validity, extended key usage).
fn leaf(der: &CertificateDer<'_>, label: &str) -> Result<()> {
    let Some(info) = x509::parse(der) else {
        return Err(invalid(format!(
            "the first certificate in the {label} is not a DER X.509 certificate"
        )));
    };
    if info.version < 3 {
        return Err(invalid(format!(
            "the {label} is an X.509 v{} certificate: no extensions. rustls accepts only v3 \
             certificates (etcdctl, in Go, accepts v1); {REISSUE_CLIENT}",
            info.version
        )));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if now > info.not_after.0 {
        return Err(invalid(format!(
            "the {label} expired on {} (etcd refuses it); re-issue it, e.g. `openssl x509 -req \
             ... -days 365 -extfile client.ext`",
            info.not_after.1
        )));
    }
    if now < info.not_before.0 {
        return Err(invalid(format!(
            "the {label} is not valid before {} (etcd refuses it); check this machine's clock \
             or re-issue it",
            info.not_before.1
        )));
    }
    if let Some(purposes) = &info.ext_key_usage {
        let allowed = |oid: &[u8]| purposes.iter().any(|p| p == oid);
        if !allowed(x509::CLIENT_AUTH) && !allowed(x509::ANY_EKU) {
            let has = if allowed(x509::SERVER_AUTH) {
                "serverAuth"
            } else {
                "other purposes"
            };
            return Err(invalid(format!(
                "the {label} is not allowed for client authentication: its extendedKeyUsage \
                 lists {has} but not clientAuth (etcd refuses it); re-issue it with \
                 `extendedKeyUsage=clientAuth` (or `serverAuth,clientAuth`) in the -extfile"
            )));
        }
    }
    Ok(())
}

/// The first private key in `pem`, as tonic reads it; an encrypted key is
/// refused with how to decrypt it.
fn private_key(pem: &str, label: &str) -> Result<PrivateKeyDer<'static>> {
    let found = labels(pem);
    if found.contains(&"ENCRYPTED PRIVATE KEY") || pem.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(invalid(format!(
            "the {label} is encrypted with a passphrase, which etcd-registry cannot ask for; \
             write a decrypted copy readable only by its user: `openssl pkey -in KEY -out \
             KEY.plain && chmod 600 KEY.plain`"
        )));
    }
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        let swapped = if found.contains(&"CERTIFICATE") {
            "; it holds a certificate: are the certificate and key files swapped?"
        } else {
            ""
        };
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "holds no private key".to_owned(),
            other => format!("is not a valid PEM private key ({other})"),
        };
        invalid(format!(
            "the {label} {why}: expected `BEGIN PRIVATE KEY` (PKCS#8), `BEGIN RSA PRIVATE KEY` \
             (PKCS#1) or `BEGIN EC PRIVATE KEY` (SEC1); found: {}{swapped}",
            found.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_in_order() {
        let pem = "-----BEGIN EC PARAMETERS-----\nBggq\n-----END EC PARAMETERS-----\n\
                   -----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(labels(pem), ["EC PARAMETERS", "EC PRIVATE KEY"]);
    }

    #[test]
    fn an_encrypted_key_says_how_to_decrypt_it() {
        let pem =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = private_key(pem, "client key k.pem")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("k.pem") && e.contains("encrypted") && e.contains("openssl pkey"),
            "{e}"
        );
    }
}
