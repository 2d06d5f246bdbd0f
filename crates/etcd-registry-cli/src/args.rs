//! The command line: global connection options and one subcommand.

use clap::{Args, Parser, Subcommand};

/// Service registration, discovery, watching and leader election on etcd v3.
///
/// Every command except `dev` connects to etcd with the options below, does
/// its job and closes the registry (revoking its lease) before it exits.
/// Exit status: 0 on success, 1 when the command failed, 2 on a usage error.
#[derive(Debug, Parser)]
#[command(name = "etcd-registry", version)]
#[command(after_help = "Start a throwaway etcd with `etcd-registry dev`, then \
                        `export ETCD_ENDPOINTS=...` as it prints.")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options that every command accepts, before or after its name.
#[derive(Debug, Args)]
pub struct Global {
    /// etcd endpoints, comma-separated: `host:port` or `http://host:port`.
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

    /// Lease TTL in seconds (at least 2): how long registrations and
    /// leadership outlive this process if it dies without closing.
    #[arg(
        long,
        global = true,
        default_value_t = 10,
        value_name = "SECS",
        value_parser = ttl_secs
    )]
    pub ttl: u64,

    /// How long to wait for an endpoint to answer, in seconds.
    #[arg(
        long,
        global = true,
        default_value_t = 5,
        value_name = "SECS",
        value_parser = positive_secs
    )]
    pub dial_timeout: u64,

    /// etcd user name (needs --password).
    #[arg(
        long,
        global = true,
        env = "ETCD_USER",
        requires = "password",
        value_name = "USER"
    )]
    pub user: Option<String>,

    /// etcd password (needs --user).
    #[arg(
        long,
        global = true,
        env = "ETCD_PASSWORD",
        hide_env_values = true,
        requires = "user",
        value_name = "PASSWORD"
    )]
    pub password: Option<String>,

    /// More logging on stderr: -v info, -vv debug, -vvv trace (default: warnings).
    /// RUST_LOG, when set, takes precedence.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a throwaway local etcd and keep it running until Ctrl-C.
    ///
    /// Prints its endpoint and an `export ETCD_ENDPOINTS=...` line. Its data
    /// lives in a temporary directory that is removed when it stops.
    Dev,

    /// List the instances of SERVICE, or of every service, in one consistent read.
    List {
        /// The service; all services of the namespace when omitted.
        service: Option<String>,
        /// One JSON object per line, in the Go library's wire format.
        #[arg(long)]
        json: bool,
    },

    /// Print the instances of SERVICE (or of every service), then every change.
    ///
    /// Runs until Ctrl-C, until --count events have been printed, or until
    /// --timeout. Reaching --timeout before --count events is a failure.
    Watch {
        /// The service; all services of the namespace when omitted.
        service: Option<String>,
        /// JSON lines: {"event":"snapshot","instances":[..]}, then
        /// {"event":"added"|"updated"|"removed","instance":{..}}.
        #[arg(long)]
        json: bool,
        /// Exit 0 after this many events following the snapshot.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },

    /// Register an instance and hold the registration until Ctrl-C/SIGTERM or --for.
    ///
    /// Prints every change of the lease state. On exit the registry is
    /// closed, which revokes the lease: the instance disappears at once.
    Register {
        /// Service name (no '/').
        name: String,
        /// Instance id, unique within the service (no '/').
        id: String,
        /// Host name or IP address that clients dial.
        address: String,
        /// Port that clients dial.
        port: u16,
        /// Free-form version.
        #[arg(long, default_value = "", hide_default_value = true)]
        version: String,
        /// Relative weight for weighted picking.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        weight: i64,
        /// Metadata entry; repeat for more.
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        meta: Vec<(String, String)>,
        /// Deregister and exit after this many seconds.
        #[arg(long = "for", value_name = "SECS")]
        for_secs: Option<u64>,
    },

    /// Delete one instance, whoever registered it (admin).
    ///
    /// A registry that still holds the instance (a running `register`, a
    /// service) puts it back at once: stop that process to remove it for good.
    Deregister {
        /// Service name.
        name: String,
        /// Instance id.
        id: String,
    },

    /// Delete every instance of a service, whoever registered them (admin).
    ///
    /// As with `deregister`, registries that still hold instances put them back.
    DeleteService {
        /// Service name.
        name: String,
    },

    /// Print the current leader of an election, or "no leader".
    Leader {
        /// Election name.
        election: String,
        /// One JSON object: {"leader":{..}} or {"leader":null}.
        #[arg(long)]
        json: bool,
    },

    /// Campaign in an election and hold leadership until Ctrl-C/SIGTERM, --for,
    /// or until it is lost (exit 1). Resigns before it exits.
    Campaign {
        /// Election name.
        election: String,
        /// The value the leader key holds while this candidate leads.
        proposal: String,
        /// Resign and exit this many seconds after winning.
        #[arg(long = "for", value_name = "SECS")]
        for_secs: Option<u64>,
    },

    /// Print the leader of an election, then every change (including "no leader").
    Observe {
        /// Election name.
        election: String,
        /// JSON lines: {"leader":{..}} or {"leader":null}.
        #[arg(long)]
        json: bool,
        /// Exit 0 after this many changes following the current leader.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

fn ttl_secs(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err("expected a whole number of seconds, at least 2".to_owned()),
    }
}

fn positive_secs(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of seconds, at least 1".to_owned()),
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn meta_needs_a_key_and_an_equals_sign() {
        assert_eq!(
            parse_key_value("zone=eu=1"),
            Ok(("zone".into(), "eu=1".into()))
        );
        assert_eq!(parse_key_value("empty="), Ok(("empty".into(), "".into())));
        assert!(parse_key_value("zone").is_err());
        assert!(parse_key_value("=x").is_err());
    }
}
