//! Reading a failed connection for the rustls error in it: tonic reports a
//! failed TLS handshake as "transport error", with the rustls error several
//! sources down (inside an `io::Error`, whose `source()` skips it).

use std::error::Error as StdError;

/// What rustls said, found in `e`'s chain of sources.
#[derive(Debug)]
pub(crate) enum Found {
    /// rustls refused the settings before any connection: tonic builds its
    /// TLS configuration when it makes the endpoint.
    Settings(String),
    /// The TLS handshake failed after TCP connected: rustls's reason, and
    /// what to check.
    Handshake { reason: String, check: &'static str },
}

/// The rustls error behind an etcd-client error, if any, read for people.
/// etcd-client's error reports no source, so its variants are opened here.
pub(crate) fn find_in(e: &etcd_client::Error) -> Option<Found> {
    match e {
        etcd_client::Error::TransportError(t) => find(t),
        etcd_client::Error::GRpcStatus(s) => s.source().and_then(find),
        etcd_client::Error::IoError(io) => find(io),
        _ => None,
    }
}

/// The rustls error in `e`'s chain, if any, read for people.
fn find(e: &(dyn StdError + 'static)) -> Option<Found> {
    let mut node: Option<&(dyn StdError + 'static)> = Some(e);
    let mut under_io = false;
    while let Some(err) = node {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            under_io = true;
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(handshake(r));
            }
        }
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            // A handshake error comes through the connector's I/O; one met
            // directly under tonic's error is about the settings.
            return Some(if under_io || is_handshake(r) {
                handshake(r)
            } else {
                Found::Settings(r.to_string())
            });
        }
        node = err.source();
    }
    None
}

/// rustls's (or tokio-rustls's) own words in the text of an error whose typed rustls error was
/// lost on the way (h2 and hyper pass a received alert on as text), e.g.
/// "received fatal alert: BadCertificate".
pub(crate) fn reason_in_text(detail: &str) -> Option<&str> {
    const RUSTLS_SAYS: [&str; 6] = [
        // tokio-rustls, when the server hangs up mid-handshake.
        "tls handshake eof",
        "received fatal alert: ",
        "invalid peer certificate: ",
        "received corrupt message",
        "peer is incompatible: ",
        "peer misbehaved: ",
    ];
    let start = RUSTLS_SAYS.iter().filter_map(|p| detail.find(p)).min()?;
    let rest = &detail[start..];
    let end = rest.find(['"', '\\']).unwrap_or(rest.len());
    Some(rest[..end].trim_end())
}

/// Errors only a handshake can produce (the rest, such as inconsistent
/// keys or an unparsable certificate, come from building the settings).
fn is_handshake(r: &rustls::Error) -> bool {
    matches!(
        r,
        rustls::Error::AlertReceived(_)
            | rustls::Error::InvalidMessage(_)
            | rustls::Error::PeerIncompatible(_)
            | rustls::Error::PeerMisbehaved(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InappropriateHandshakeMessage { .. }
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::HandshakeNotComplete
    )
}

fn handshake(r: &rustls::Error) -> Found {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let check: &'static str = match r {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the server's certificate is not signed by a trusted CA; check the CA certificate \
             (a bundle may hold several CAs, and intermediates)"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the server's certificate is for another name; check the endpoint's host or the \
             TLS domain name (an IP endpoint needs an IP subjectAltName)"
        }
        E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "the server's certificate is not valid now; re-issue it or check the clock",
        E::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "the server's certificate is not allowed for server authentication; re-issue it \
             with extendedKeyUsage=serverAuth"
        }
        E::InvalidCertificate(C::Other(other)) if other.to_string().contains("CertVersion") => {
            "the server's certificate is X.509 v1 (no extensions, so no subjectAltName), which \
             rustls refuses; re-issue it as v3 with an -extfile giving \
             subjectAltName=IP:...,DNS:... and extendedKeyUsage=serverAuth"
        }
        E::InvalidCertificate(_) => "the server's certificate was refused; check it and the CA",
        E::AlertReceived(
            A::BadCertificate
            | A::CertificateRequired
            | A::UnknownCA
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied,
        ) => {
            "the server refused the client certificate or none was given; check the client \
             certificate and key, and that etcd's --trusted-ca-file holds its CA"
        }
        E::InvalidMessage(_) => {
            "the server did not answer in TLS; is it serving plain text (use http://) or \
             another protocol on that port?"
        }
        _ => "check the CA, the client certificate and the server name",
    };
    Found::Handshake {
        reason: r.to_string(),
        check,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapped(r: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, r)
    }

    #[test]
    fn a_rustls_error_inside_io_is_a_handshake_failure() {
        let io = io_wrapped(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        match find(&io) {
            Some(Found::Handshake { reason, check }) => {
                assert!(reason.contains("UnknownIssuer"), "{reason}");
                assert!(check.contains("CA"), "{check}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rustls_words_are_found_in_text() {
        let d = r#"grpc request error: code: 'Unknown error', message: "transport error", source: tonic::transport::Error(Transport, hyper::Error(Io, Custom { kind: InvalidData, error: "received fatal alert: BadCertificate" }))"#;
        assert_eq!(
            reason_in_text(d),
            Some("received fatal alert: BadCertificate")
        );
        assert_eq!(
            reason_in_text("tcp connect error: Connection refused"),
            None
        );
        let d = r#"message: "tls handshake eof", source: tonic::transport::Error(Transport, ConnectError(Custom { kind: UnexpectedEof, error: "tls handshake eof" }))"#;
        assert_eq!(reason_in_text(d), Some("tls handshake eof"));
    }

    #[test]
    fn inconsistent_keys_on_their_own_are_about_the_settings() {
        let r = rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch);
        assert!(matches!(find(&r), Some(Found::Settings(_))));
        assert!(find(&std::io::Error::other("refused")).is_none());
    }
}
