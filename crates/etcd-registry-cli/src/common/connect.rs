//! Connecting: the registry settings of the connection flags, and running a
//! command's body against a registry that is closed (revoking its lease) on
//! success and on failure alike.

use etcd_registry::{Registry, RegistryBuilder};

use super::args::Global;
use super::error::{CliError, CliResult};

/// Connects, runs `body`, and closes the registry whatever `body` returned.
pub async fn with_registry<T>(
    g: &Global,
    body: impl AsyncFnOnce(&Registry) -> CliResult<T>,
) -> CliResult<T> {
    let registry = connect(g).await?;
    let result = body(&registry).await;
    finish(registry, result).await
}

/// [`with_registry`] with settings beyond the global options.
pub async fn with_builder<T>(
    settings: RegistryBuilder,
    body: impl AsyncFnOnce(&Registry) -> CliResult<T>,
) -> CliResult<T> {
    let registry = settings.connect().await?;
    tracing::debug!(?registry, "connected");
    let result = body(&registry).await;
    finish(registry, result).await
}

async fn connect(g: &Global) -> CliResult<Registry> {
    let registry = builder(g)?.connect().await?;
    tracing::debug!(?registry, "connected");
    Ok(registry)
}

/// The registry settings of the global options. Fails when a TLS file
/// cannot be read.
pub fn builder(g: &Global) -> CliResult<RegistryBuilder> {
    let endpoints: Vec<String> = g
        .endpoints
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    let mut builder = Registry::builder()
        .endpoints(endpoints)
        .namespace(&g.namespace)
        .key_prefix(&g.prefix)
        .ttl(g.ttl)
        .dial_timeout(g.dial_timeout);
    // Checked here rather than with clap's `requires`: clap does not see a
    // global flag's partner when one comes from the environment and the
    // other from the command line.
    match (&g.user, &g.password) {
        (Some(user), Some(password)) => builder = builder.auth(user, password),
        (None, None) => {}
        (Some(_), None) => {
            return Err(CliError::Usage {
                message: "--user needs --password (or ETCD_PASSWORD)".into(),
                hint: None,
            });
        }
        (None, Some(_)) => {
            return Err(CliError::Usage {
                message: "--password needs --user (or ETCD_USER)".into(),
                hint: None,
            });
        }
    }
    if let Some(tls) = tls_config(g)? {
        builder = builder.tls(tls);
    }
    Ok(builder)
}

/// TLS settings from --cacert, --cert and --key; `None` when none is given.
fn tls_config(g: &Global) -> CliResult<Option<etcd_registry::TlsConfig>> {
    if g.cacert.is_none() && g.cert.is_none() {
        return Ok(None);
    }
    let mut tls = etcd_registry::TlsConfig::new();
    if let Some(ca) = &g.cacert {
        tls = tls.ca_certificate_file(ca)?;
    }
    if let (Some(cert), Some(key)) = (&g.cert, &g.key) {
        tls = tls.identity_files(cert, key)?;
    }
    Ok(Some(tls))
}

/// Closes the registry; the command's own error wins over a close error.
async fn finish<T>(registry: Registry, result: CliResult<T>) -> CliResult<T> {
    let closed = registry.close().await;
    match (result, closed) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(CliError::from(e)
            .context("closing the registry")
            .with_hint("its lease (and anything under it) expires after the TTL on its own")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(close)) => {
            tracing::warn!(error = %close, "closing the registry failed");
            Err(e)
        }
    }
}
