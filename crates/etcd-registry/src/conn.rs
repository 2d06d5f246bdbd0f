//! The etcd client with per-request timeouts and retries of idempotent requests.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

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
                let attempt = async {
                    let mut c = Client::connect([ep.as_str()], Some(options)).await?;
                    c.status().await.map(|_| ())
                };
                match tokio::time::timeout(config.dial_timeout, attempt).await {
                    Ok(Ok(())) => Ok(ep.clone()),
                    Ok(Err(e)) => Err(format!("{ep}: {e}")),
                    Err(_) => Err(format!("{ep}: no answer within {:?}", config.dial_timeout)),
                }
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
            let transient = match &result {
                Err(Error::Etcd { source, .. }) => is_transient(source),
                Err(Error::Timeout { .. }) => false,
                _ => false,
            };
            if !transient || attempt >= ATTEMPTS {
                return result;
            }
            tracing::debug!(op, attempt, "transient etcd failure; retrying");
            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            attempt += 1;
        }
    }
}

fn connect_options(config: &Config) -> ConnectOptions {
    // No channel-wide timeout: it would cut long-lived watch and keep-alive
    // streams. Unary requests get `request_timeout` in `Conn::once` instead.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.dial_timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some((user, password)) = &config.auth {
        options = options.with_user(user.clone(), password.clone());
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        options = options.with_tls(tls.clone());
    }
    options
}
