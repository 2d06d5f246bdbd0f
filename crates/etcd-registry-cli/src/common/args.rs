//! The flags every command shares: where etcd is and how to reach it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::time::{positive_duration, ttl};

/// Options that every command accepts, before or after its name.
#[derive(Clone, Debug, Args)]
pub struct Global {
    /// etcd endpoints, comma-separated: `host:port`, `http://host:port` or
    /// `https://host:port` (`host:port` is TLS when --cacert or --cert is given).
    #[arg(
        long,
        global = true,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        value_name = "LIST"
    )]
    pub endpoints: Vec<String>,

    /// Namespace that isolates services and elections.
    #[arg(
        long,
        global = true,
        env = "ETCD_REGISTRY_NAMESPACE",
        default_value = etcd_registry::DEFAULT_NAMESPACE,
        value_name = "NAME"
    )]
    pub namespace: String,

    /// Root of every key.
    #[arg(
        long,
        global = true,
        env = "ETCD_REGISTRY_PREFIX",
        default_value = etcd_registry::DEFAULT_KEY_PREFIX,
        value_name = "PREFIX"
    )]
    pub prefix: String,

    /// Lease TTL, whole seconds, at least 2 (`10`, `10s`, `1m`): how long
    /// registrations and leadership outlive this process if it dies without closing.
    #[arg(
        long,
        global = true,
        default_value = "10s",
        value_name = "DURATION",
        value_parser = ttl
    )]
    pub ttl: Duration,

    /// How long to wait for an endpoint to answer (`5s`, `500ms`).
    #[arg(
        long,
        global = true,
        default_value = "5s",
        value_name = "DURATION",
        value_parser = positive_duration
    )]
    pub dial_timeout: Duration,

    /// etcd user name (needs --password).
    #[arg(long, global = true, env = "ETCD_USER", value_name = "USER")]
    pub user: Option<String>,

    /// etcd password (needs --user).
    #[arg(
        long,
        global = true,
        env = "ETCD_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub password: Option<String>,

    /// CA certificate (PEM file) that signed etcd's server certificate; turns
    /// on TLS. Without it, `https://` endpoints trust the system's roots.
    #[arg(long, global = true, env = "ETCD_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Client certificate (PEM file) for mutual TLS (needs --key); turns on TLS.
    #[arg(
        long,
        global = true,
        env = "ETCD_CERT",
        requires = "key",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,

    /// Private key (PEM file) of the client certificate (needs --cert).
    #[arg(
        long,
        global = true,
        env = "ETCD_KEY",
        requires = "cert",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,

    /// More logging on stderr: -v info, -vv debug, -vvv trace (default: warnings).
    /// RUST_LOG, when set, takes precedence.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}
