//! How a command fails: a message, what to do about it, and the exit code.

use std::fmt::Write as _;
use std::process::ExitCode;

/// A failed command.
#[derive(Debug)]
pub enum CliError {
    /// stdout was closed (say, piped into `head`): stop quietly and
    /// successfully, as ripgrep does.
    BrokenPipe,
    /// Anything else: printed as `error: ...` (and `hint: ...`), exit 1.
    Failed {
        message: String,
        hint: Option<String>,
    },
    /// Invalid input (a bad name, a bad setting) found after parsing: printed
    /// as [`CliError::Failed`] but exits 2, as clap's usage errors do.
    Usage {
        message: String,
        hint: Option<String>,
    },
    /// Exit with this status and print nothing more: the status of a
    /// supervised command, which has said what it had to say.
    Exit(u8),
}

pub type CliResult<T = ()> = Result<T, CliError>;

impl CliError {
    pub fn msg(message: impl Into<String>) -> Self {
        CliError::Failed {
            message: message.into(),
            hint: None,
        }
    }

    #[must_use]
    pub fn with_hint(self, hint: impl Into<String>) -> Self {
        match self {
            CliError::Failed { message, .. } => CliError::Failed {
                message,
                hint: Some(hint.into()),
            },
            CliError::Usage { message, .. } => CliError::Usage {
                message,
                hint: Some(hint.into()),
            },
            other => other,
        }
    }

    /// Prefixes the message with what was being done.
    #[must_use]
    pub fn context(self, doing: &str) -> Self {
        match self {
            CliError::Failed { message, hint } => CliError::Failed {
                message: format!("{doing}: {message}"),
                hint,
            },
            CliError::Usage { message, hint } => CliError::Usage {
                message: format!("{doing}: {message}"),
                hint,
            },
            other => other,
        }
    }

    /// The exit status: 0 for a closed stdout, 2 for invalid input, 1 for
    /// other failures, or a supervised command's own status.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::BrokenPipe => 0,
            CliError::Failed { .. } => 1,
            CliError::Usage { .. } => 2,
            CliError::Exit(code) => *code,
        }
    }

    /// Prints the error to stderr and returns the exit code.
    pub fn report(self) -> ExitCode {
        let code = self.exit_code();
        if let CliError::Failed { message, hint } | CliError::Usage { message, hint } = self {
            eprintln!("error: {message}");
            if let Some(hint) = hint {
                eprintln!("hint: {hint}");
            }
        }
        ExitCode::from(code)
    }
}

/// The message of an error and of every error it wraps, joined by `: `.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Wrapping errors often repeat their source's text; say it once.
        if !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        source = s.source();
    }
    out
}

impl From<etcd_registry::Error> for CliError {
    fn from(e: etcd_registry::Error) -> Self {
        use etcd_registry::Error as E;
        let hint = match &e {
            E::InvalidInput { field, .. } => match *field {
                "name" | "id" | "election" | "lock" => Some(format!(
                    "a {field} must be non-empty, without '/' or control characters"
                )),
                "ttl" => Some("use --ttl with a whole number of seconds, at least 2".to_owned()),
                "endpoints" => Some(
                    "give --endpoints (or ETCD_ENDPOINTS) as host:port[,host:port...]".to_owned(),
                ),
                "auth" => {
                    Some("give both --user and --password (or ETCD_USER/ETCD_PASSWORD)".into())
                }
                "tls" => Some(
                    "--cacert, --cert and --key (or ETCD_CACERT/ETCD_CERT/ETCD_KEY) take \
                     readable PEM files; the error names the file and how to fix it (docs/deployments.md: \
                     \"TLS with openssl and real PKIs\")"
                        .into(),
                ),
                _ => None,
            },
            // TCP connected, so something listens there: never ask whether
            // etcd is running.
            E::Connect { reason, .. } if is_tls_failure(reason) => Some(
                "the TLS handshake failed: check the CA certificate (--cacert), the client \
                 certificate and key (--cert, --key) and that the server's certificate \
                 names the host in --endpoints"
                    .to_owned(),
            ),
            E::Connect { .. } => Some(
                "is etcd running there? Check --endpoints (or ETCD_ENDPOINTS), \
                 raise --dial-timeout, or start a local one with `etcd-registry dev`"
                    .to_owned(),
            ),
            E::Auth { .. } => {
                Some("check --user and --password (or ETCD_USER/ETCD_PASSWORD)".to_owned())
            }
            E::PermissionDenied { .. } => Some(
                "the etcd user's roles do not grant this; ask an etcd admin to grant the \
                 user read-write on the namespace's keys, or use another --namespace"
                    .to_owned(),
            ),
            E::Timeout { .. } => Some("etcd is slow or unreachable; check its health".to_owned()),
            _ => None,
        };
        if matches!(e, E::InvalidInput { .. }) {
            return CliError::Usage {
                message: chain(&e),
                hint,
            };
        }
        CliError::Failed {
            message: chain(&e),
            hint,
        }
    }
}

/// Whether a connect failure's reason is a TLS failure (the library says
/// so in these words) rather than a refused or timed-out connect.
fn is_tls_failure(reason: &str) -> bool {
    reason.contains("TLS handshake failed") || reason.contains("TLS settings")
}

impl From<etcd_registry_testkit::Error> for CliError {
    fn from(e: etcd_registry_testkit::Error) -> Self {
        CliError::msg(chain(&e))
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::BrokenPipe
        } else {
            CliError::msg(chain(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_input_names_the_field_and_says_what_to_do() {
        let e = etcd_registry::ServiceInstance::new("a/b", "1", "h", 80)
            .validate()
            .unwrap_err();
        let e = CliError::from(e);
        assert_eq!(e.exit_code(), 2, "invalid input is a usage error");
        match e {
            CliError::Usage { message, hint } => {
                assert!(message.starts_with("invalid name"), "{message}");
                assert!(hint.unwrap().contains("without '/'"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn hint_of(reason: &str) -> String {
        let e = etcd_registry::Error::Connect {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            timeout: std::time::Duration::from_secs(3),
            reason: reason.into(),
        };
        match CliError::from(e) {
            CliError::Failed {
                hint: Some(hint), ..
            } => hint,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_tls_failure_never_asks_whether_etcd_runs() {
        let tls = hint_of(
            "https://127.0.0.1:2379: TCP connected, TLS handshake failed: invalid peer \
             certificate: UnknownIssuer (check the CA certificate)",
        );
        assert!(tls.contains("TLS handshake failed"), "{tls}");
        assert!(!tls.contains("running"), "{tls}");
        let refused = hint_of("https://127.0.0.1:2379: tcp connect error: Connection refused");
        assert!(refused.contains("is etcd running there?"), "{refused}");
        let slow = hint_of("https://127.0.0.1:2379: no answer within 3s");
        assert!(slow.contains("is etcd running there?"), "{slow}");
    }

    #[test]
    fn a_closed_stdout_is_not_an_error() {
        let e = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(matches!(CliError::from(e), CliError::BrokenPipe));
    }
}
