//! The etcd client with per-request timeouts and retries of idempotent requests.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, StatusResponse};

use crate::config::Config;
use crate::error::{Error, Result, is_transient};

/// How many times an idempotent request is tried. tonic's balancer may send a
/// request to a dead endpoint, which then fails instead of failing over.
const ATTEMPTS: u32 = 4;

#[derive(Clone)]
pub(crate) struct Conn {
    client: Client,
    request_timeout: Duration,
}

impl Conn {
    /// Probes every endpoint on its own, connects to the ones that answered,
    /// then adds the rest so that they are used once they come back.
    pub(crate) async fn connect(config: &Config) -> Result<Self> {
        let options = connect_options(config);
        let probes = config.endpoints.iter().map(|ep| {
            let options = options.clone();
            async move {
                probe(ep, options, config.dial_timeout)
                    .await
                    .map(|_| ep.clone())
                    .map_err(|e| format!("{ep}: {e}"))
            }
        });
        let results = futures::future::join_all(probes).await;
        let (live, dead): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        let live: Vec<String> = live.into_iter().filter_map(|r| r.ok()).collect();
        if live.is_empty() {
            let reason = dead
                .into_iter()
                .filter_map(|r| r.err())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::Connect {
                endpoints: config.endpoints.clone(),
                timeout: config.dial_timeout,
                reason,
            });
        }
        let client =
            tokio::time::timeout(config.dial_timeout, Client::connect(&live, Some(options)))
                .await
                .map_err(|_| Error::Connect {
                    endpoints: config.endpoints.clone(),
                    timeout: config.dial_timeout,
                    reason: "connecting to the live endpoints timed out".into(),
                })?
                .map_err(|e| Error::etcd("connect", e))?;
        for ep in config.endpoints.iter().filter(|e| !live.contains(e)) {
            if let Err(error) = client.add_endpoint(ep).await {
                tracing::warn!(endpoint = %ep, %error, "could not add an unreachable endpoint");
            } else {
                tracing::warn!(endpoint = %ep, "endpoint unreachable at connect; it is kept and used once it answers");
            }
        }
        Ok(Self {
            client,
            request_timeout: config.request_timeout,
        })
    }

    /// A clone of the raw client, for streams (watch, keep-alive).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Runs one request under the request timeout, without retries.
    pub(crate) async fn once<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.request_timeout, f(self.client.clone())).await {
            Ok(r) => r.map_err(|e| Error::etcd(op, e)),
            Err(_) => Err(Error::Timeout {
                op,
                after: self.request_timeout,
            }),
        }
    }

    /// Runs an idempotent request, retrying transient failures a few times.
    pub(crate) async fn retry<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 1;
        loop {
            let result = self.once(op, &mut f).await;
            // A timeout is not retried here: it would multiply the caller's wait.
            let transient =
                matches!(&result, Err(Error::Etcd { source, .. }) if is_transient(source));
            if !transient || attempt >= ATTEMPTS {
                return result;
            }
            tracing::debug!(op, attempt, "transient etcd failure; retrying");
            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            attempt += 1;
        }
    }
}

/// Asks one endpoint, on a connection of its own, for its status within
/// `dial_timeout`: the proof that it answers (`Client::connect` is lazy).
/// The error says why it did not, for people.
pub(crate) async fn probe(
    endpoint: &str,
    options: ConnectOptions,
    dial_timeout: Duration,
) -> std::result::Result<StatusResponse, String> {
    let attempt = async {
        let mut c = Client::connect([endpoint], Some(options)).await?;
        c.status().await
    };
    match tokio::time::timeout(dial_timeout, attempt).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {dial_timeout:?}")),
    }
}

pub(crate) fn connect_options(config: &Config) -> ConnectOptions {
    // No channel-wide timeout: it would cut long-lived watch and keep-alive
    // streams. Unary requests get `request_timeout` in `Conn::once` instead.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.dial_timeout)
        .with_require_leader(true);
    if let Some((interval, timeout)) = config.keep_alive {
        // Pings only while a stream is open: etcd's default enforcement
        // (PermitWithoutStream=false) counts pings on a connection without
        // streams as abuse whatever their interval.
        options = options
            .with_keep_alive(interval, timeout)
            .with_keep_alive_while_idle(false);
    }
    if let Some((user, password)) = &config.auth {
        // etcd's auth tokens expire (simple tokens after 5 idle minutes by
        // default); a long-lived registry must re-authenticate on its own.
        options = options
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        options = options.with_tls(tls.clone());
    }
    options
}

/// Why a [`Watch`] stopped.
#[derive(Debug)]
pub(crate) enum WatchEnd {
    /// etcd compacted the history past the watch's start revision: read the
    /// current state again, then watch from there.
    Compacted {
        /// The oldest revision etcd still holds.
        compact_revision: i64,
    },
    /// The stream broke, ended, did not open in time, or etcd cancelled the
    /// watch for another reason. Resume from the last revision seen + 1.
    Broken(Error),
}

impl std::fmt::Display for WatchEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchEnd::Compacted { compact_revision } => {
                write!(f, "history compacted up to revision {compact_revision}")
            }
            WatchEnd::Broken(e) => e.fmt(f),
        }
    }
}

impl From<WatchEnd> for Error {
    fn from(end: WatchEnd) -> Self {
        match end {
            WatchEnd::Broken(e) => e,
            compacted @ WatchEnd::Compacted { .. } => watch_error(compacted.to_string()),
        }
    }
}

fn watch_options(prefix: bool, from: i64) -> etcd_client::WatchOptions {
    let options = etcd_client::WatchOptions::new().with_start_revision(from);
    if prefix {
        options.with_prefix()
    } else {
        options
    }
}

fn watch_error(reason: impl Into<String>) -> Error {
    Error::etcd("watch", etcd_client::Error::WatchError(reason.into()))
}

/// One etcd watch whose every way of stopping arrives as a [`WatchEnd`].
/// Dropping it cancels the watch.
pub(crate) struct Watch {
    requests: etcd_client::WatchRequestSender,
    responses: etcd_client::WatchResponseStream,
}

impl Conn {
    /// Watches `key` (every key under it when `prefix`) from revision `from`
    /// (0: from now). Opening is bounded by the request timeout.
    pub(crate) async fn watch(
        &self,
        key: impl Into<Vec<u8>>,
        prefix: bool,
        from: i64,
    ) -> Result<Watch, WatchEnd> {
        let options = watch_options(prefix, from);
        let mut client = self.client();
        let stream = tokio::time::timeout(self.request_timeout, client.watch(key, Some(options)))
            .await
            .map_err(|_| {
                WatchEnd::Broken(Error::Timeout {
                    op: "watch",
                    after: self.request_timeout,
                })
            })?
            .map_err(|e| WatchEnd::Broken(Error::etcd("watch", e)))?;
        let (requests, responses) = stream.split();
        Ok(Watch {
            requests,
            responses,
        })
    }
}

impl Watch {
    /// The next response: events, the creation notice, or a progress report.
    ///
    /// Cancel safe: dropping the future loses no response.
    pub(crate) async fn next(&mut self) -> Result<etcd_client::WatchResponse, WatchEnd> {
        let resp = self
            .responses
            .message()
            .await
            .map_err(|e| WatchEnd::Broken(Error::etcd("watch", e)))?
            .ok_or_else(|| WatchEnd::Broken(watch_error("stream ended")))?;
        if resp.canceled() {
            return Err(if resp.compact_revision() > 0 {
                WatchEnd::Compacted {
                    compact_revision: resp.compact_revision(),
                }
            } else {
                WatchEnd::Broken(watch_error(format!(
                    "cancelled by etcd: {}",
                    resp.cancel_reason()
                )))
            });
        }
        Ok(resp)
    }

    /// Adds another watcher to the same stream; its responses arrive through
    /// [`Watch::next`] too.
    pub(crate) async fn add(
        &mut self,
        key: impl Into<Vec<u8>>,
        prefix: bool,
        from: i64,
    ) -> Result<()> {
        self.requests
            .watch(key, Some(watch_options(prefix, from)))
            .await
            .map_err(|e| Error::etcd("watch", e))
    }

    /// Asks etcd for a progress report, which arrives through [`Watch::next`].
    pub(crate) async fn request_progress(&mut self) -> Result<()> {
        self.requests
            .request_progress()
            .await
            .map_err(|e| Error::etcd("watch progress", e))
    }
}
