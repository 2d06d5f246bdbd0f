//! The one error type of the crate.

use std::time::Duration;

/// Everything that can go wrong in `etcd-registry`.
///
/// Variants are typed so that callers can react to them: [`Error::InvalidInput`]
/// names the offending field, [`Error::Connect`] names the endpoints it tried,
/// and [`Error::SessionLost`] tells an election candidate that its lease is gone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value given by the caller was rejected before anything was sent to etcd.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The name of the field or argument, e.g. `ttl` or `name`.
        field: &'static str,
        /// Why the value was rejected.
        reason: String,
    },

    /// No endpoint answered within the dial timeout. The reason says, per
    /// endpoint, what went wrong; a failed TLS handshake (unknown CA, a
    /// certificate for another name, a missing or refused client
    /// certificate) says `TLS` and why.
    #[error("could not reach etcd at any of [{}] within {timeout:?} ({reason})", endpoints.join(", "))]
    Connect {
        /// Every endpoint that was tried.
        endpoints: Vec<String>,
        /// The dial timeout that elapsed.
        timeout: Duration,
        /// What the last attempt reported.
        reason: String,
    },

    /// etcd refused the user name or password at `connect`. The message
    /// names the user, never the password.
    #[error("authentication failed for etcd user {user:?}: {reason}")]
    Auth {
        /// The user name that was refused.
        user: String,
        /// What etcd answered.
        reason: String,
    },

    /// etcd's RBAC refused the operation: the user's roles do not grant it
    /// on the key (or range of keys). Nothing was written.
    #[error("permission denied: etcd refused {op}{} for this user", on_key(key))]
    PermissionDenied {
        /// The operation that was refused, e.g. `put`, `get`, `watch`, `campaign`.
        op: &'static str,
        /// The key, or the prefix of the range, it was refused on (empty when
        /// the request names no key, as a lease revoke).
        key: String,
    },

    /// An etcd request failed.
    #[error("etcd {op} failed: {source}")]
    Etcd {
        /// The operation that failed, e.g. `put` or `lease grant`.
        op: &'static str,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },

    /// An etcd request did not answer in time.
    #[error("etcd {op} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        op: &'static str,
        /// How long it waited.
        after: Duration,
    },

    /// The registry's lease was lost while an operation depended on it
    /// (for example while campaigning in an election).
    #[error("the registry's lease was lost")]
    SessionLost,

    /// Leadership ended before the operation could complete; the reason says why.
    #[error("leadership was lost: {0}")]
    NotLeader(LostReason),

    /// A lock was lost, or its key was deleted or replaced while waiting for
    /// it; the reason says why.
    #[error("the lock was lost: {}", .0.lock_wording())]
    LockLost(LostReason),

    /// The registry was closed (or dropped).
    #[error("the registry is closed")]
    Closed,

    /// This [`Registration`](crate::Registration) handle was retired: a later
    /// `register` of the same service and id on the same registry took the
    /// key over, and only that newer handle changes it now.
    #[error("registration of {key:?} was replaced by a newer register() of the same id")]
    Replaced {
        /// The instance key both handles name.
        key: String,
    },

    /// The instance of this [`Registration`](crate::Registration) handle was
    /// deregistered (through another handle of the same id, or by an admin
    /// call); nothing maintains it, and `update` cannot bring it back:
    /// register it again.
    #[error("registration of {key:?} was deregistered")]
    Deregistered {
        /// The instance key.
        key: String,
    },
}

/// Shorthand for `Result<T, etcd_registry::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// An etcd failure; RBAC refusals become [`Error::PermissionDenied`]
    /// (without a key: see [`Error::on_key`]).
    pub(crate) fn etcd(op: &'static str, source: etcd_client::Error) -> Self {
        if is_permission_denied(&source) {
            return Error::PermissionDenied {
                op,
                key: String::new(),
            };
        }
        Error::Etcd { op, source }
    }

    /// Names the key of a [`Error::PermissionDenied`] that has none yet.
    pub(crate) fn on_key(mut self, k: &str) -> Self {
        if let Error::PermissionDenied { key, .. } = &mut self
            && key.is_empty()
        {
            k.clone_into(key);
        }
        self
    }

    /// True for failures that may pass: a timeout, or a transport-level etcd error.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Etcd { source, .. } => is_transient(source),
            _ => false,
        }
    }

    /// True for errors that retrying cannot cure: etcd's RBAC refused the
    /// request, or it refused the credentials. Campaigns, lock waits and
    /// `lead()` end with these instead of trying again.
    pub(crate) fn is_final(&self) -> bool {
        matches!(self, Error::PermissionDenied { .. } | Error::Auth { .. })
    }

    /// True when etcd answered that a lease does not exist (expired or revoked).
    pub(crate) fn is_lease_not_found(&self) -> bool {
        match self {
            Error::Etcd { source, .. } => is_lease_not_found(source),
            _ => false,
        }
    }
}

fn on_key(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!(" on {key:?}")
    }
}

/// etcd's RBAC refusal: `PermissionDenied` on unary requests; a watch is
/// cancelled with the same text as its reason.
pub(crate) fn is_permission_denied(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::PermissionDenied,
        etcd_client::Error::WatchError(m) => m.contains("permission denied"),
        _ => false,
    }
}

/// etcd's answer to a wrong user name or password.
pub(crate) fn is_auth_failed(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("authentication failed"))
}

/// etcd says "requested lease not found" on requests that attach a lease;
/// etcd-client's keep-alive says "lease not found" when the first answer has TTL 0.
pub(crate) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// Errors worth retrying on another endpoint: transport failures and
/// "unavailable"-like statuses. Deterministic rejections are not retried.
pub(crate) fn is_transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Aborted
                    | tonic::Code::Internal
            ) && !is_lease_not_found(e)
        }
        _ => false,
    }
}

/// Why a [`Leadership`](crate::Leadership) or a [`LockGuard`](crate::LockGuard)
/// ended. Returned by their `lost()` and carried by [`Error::NotLeader`] and
/// [`Error::LockLost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// [`Leadership::resign`](crate::Leadership::resign) was called.
    Resigned,
    /// [`LockGuard::release`](crate::LockGuard::release) was called.
    Released,
    /// The key was deleted by someone else (an admin, `etcdctl del`, ...).
    KeyDeleted,
    /// The key was deleted and written again by someone else: it has a
    /// different create revision, so it is no longer this holder's key.
    KeyReplaced,
    /// No keep-alive of the registry's lease was acknowledged in time: etcd
    /// may let the lease (and with it the key) expire from now on.
    /// This is the local safety bound; it fires with no help from etcd, for
    /// example while the holder is cut off from etcd.
    LeaseDeadline,
    /// The registry's lease is gone (expired, revoked, or etcd lost its data)
    /// and the registry moved on to a new lease.
    SessionLost,
    /// The registry was closed or dropped.
    Closed,
}

/// Worded for elections, as it was before locks existed (the CLI prints it);
/// [`Error::LockLost`] words the key reasons for locks.
impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::Resigned => "resigned",
            LostReason::Released => "released",
            LostReason::KeyDeleted => "the leader key was deleted",
            LostReason::KeyReplaced => "the leader key was replaced",
            LostReason::LeaseDeadline => "no keep-alive was acknowledged before the lease deadline",
            LostReason::SessionLost => "the registry's lease was lost",
            LostReason::Closed => "the registry was closed",
        })
    }
}

impl LostReason {
    /// The reason worded for a lock.
    pub(crate) fn lock_wording(self) -> std::borrow::Cow<'static, str> {
        match self {
            LostReason::KeyDeleted => "the lock key was deleted".into(),
            LostReason::KeyReplaced => "the lock key was replaced".into(),
            reason => reason.to_string().into(),
        }
    }
}
