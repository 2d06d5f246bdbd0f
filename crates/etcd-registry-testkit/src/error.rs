//! The testkit's error type.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while running etcd for a test.
///
/// Errors about a process that failed to start carry the tail of its log, so a
/// failing test shows why etcd did not come up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The etcd executable could not be found.
    #[error(
        "etcd binary not found (looked for `{}` {origin}; set ETCD_BIN to override). \
         Run scripts/setup to install etcd-server.",
        binary.display()
    )]
    BinaryNotFound {
        /// The name or path that was looked for.
        binary: PathBuf,
        /// Where the name came from: on PATH, from `ETCD_BIN`, or set by the builder.
        origin: &'static str,
    },

    /// etcd was started but did not become healthy in time; it has been killed.
    #[error(
        "etcd member `{name}` ({endpoint}) was not healthy within {timeout:?}; log tail:\n{log_tail}"
    )]
    StartTimeout {
        /// The member name.
        name: String,
        /// The client endpoint that was polled.
        endpoint: String,
        /// The start timeout that elapsed.
        timeout: Duration,
        /// The last lines of the etcd log.
        log_tail: String,
    },

    /// etcd exited while it was starting.
    #[error("etcd member `{name}` exited during start-up ({status}); log tail:\n{log_tail}")]
    Exited {
        /// The member name.
        name: String,
        /// The exit status as reported by the OS.
        status: String,
        /// The last lines of the etcd log.
        log_tail: String,
    },

    /// A condition awaited by the testkit (such as a raft leader) did not hold in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the testkit waited.
        timeout: Duration,
    },

    /// No running member of a cluster reports a leader.
    #[error("no raft leader: {detail}")]
    NoLeader {
        /// What each member answered.
        detail: String,
    },

    /// The operation needs a running etcd process but there is none.
    #[error("etcd member `{name}` is not running")]
    NotRunning {
        /// The member name.
        name: String,
    },

    /// The operation is not supported in this situation.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// An HTTP request to etcd's client URL failed or returned a non-200 status.
    #[error("HTTP GET {url} failed: {message}")]
    Http {
        /// The requested URL.
        url: String,
        /// What went wrong.
        message: String,
    },

    /// A test certificate could not be made.
    #[error("test certificate: {0}")]
    Tls(String),

    /// A filesystem, socket or process operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// An etcd request made by the testkit failed.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
}

/// The testkit's result type.
pub type Result<T> = std::result::Result<T, Error>;
