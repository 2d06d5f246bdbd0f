//! The command line: the shared flags and one subcommand, composed from
//! each command's own arguments.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::cmd;
use crate::common::args::Global;

/// Service registration, discovery, watching and leader election on etcd v3.
///
/// Every command except `dev` connects to etcd with the options below, does
/// its job and closes the registry (revoking its lease) before it exits.
/// Durations take a unit (`500ms`, `2s`, `1m`, `1h 30m`) or are whole seconds (`2`).
/// Exit status: 0 on success, 1 when the command failed, 2 on a usage error
/// or invalid input; `campaign -- CMD` and `lock -- CMD` exit with CMD's status.
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

#[derive(Debug, Subcommand)]
// Parsed once per run: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Start a throwaway local etcd and keep it running until Ctrl-C.
    ///
    /// Prints its endpoint and an `export ETCD_ENDPOINTS=...` line. Its data
    /// lives in a temporary directory that is removed when it stops.
    Dev,

    /// Show each endpoint's health, then the namespace: services, instances,
    /// elections and their leaders. Exits 1 if no endpoint answers.
    Status(cmd::status::Args),

    /// List the instances of SERVICE, or of every service, in one consistent read.
    List(cmd::list::Args),

    /// Print the instances of SERVICE (or of every service), then every change.
    ///
    /// Runs until Ctrl-C, until --count events have been printed, or until
    /// --timeout. Reaching --timeout before --count events is a failure.
    Watch(cmd::watch::Args),

    /// Register an instance and hold the registration until Ctrl-C/SIGTERM or --for.
    ///
    /// Prints every change of the lease state. On exit the registry is
    /// closed, which revokes the lease: the instance disappears at once.
    ///
    /// With a health check (--check-http, --check-tcp, --check-grpc,
    /// --check-cmd; several must all pass), the instance is in etcd only while
    /// healthy: registered on the first pass, deleted after --fall failures
    /// in a row, back after --rise passes; each check is cut off after
    /// --timeout.
    ///
    /// With `-- CMD [ARGS...]`, a sidecar: runs CMD, registers while it runs
    /// (and passes its checks), and on SIGINT/SIGTERM deregisters first,
    /// waits --drain so that clients stop sending, then forwards the signal
    /// to CMD (SIGKILL after --grace) and exits with CMD's status. If CMD
    /// exits by itself, the instance is deregistered at once and the CLI
    /// exits with CMD's status. CMD gets ETCD_REGISTRY_SERVICE,
    /// ETCD_REGISTRY_ID and ETCD_REGISTRY_KEY in its environment.
    Register(cmd::register::Args),

    /// Delete one instance, whoever registered it (admin).
    ///
    /// A registry that still holds the instance (a running `register`, a
    /// service) puts it back at once: stop that process to remove it for good.
    Deregister(cmd::deregister::Args),

    /// Delete every instance of a service, whoever registered them (admin).
    ///
    /// As with `deregister`, registries that still hold instances put them back.
    DeleteService(cmd::delete_service::Args),

    /// Print the current leader of an election, or "no leader".
    Leader(cmd::leader::Args),

    /// Campaign in an election and hold leadership until Ctrl-C/SIGTERM, --for,
    /// or until it is lost (exit 1). Resigns before it exits.
    ///
    /// With `-- CMD [ARGS...]`, runs CMD only while leading, with
    /// ETCD_REGISTRY_FENCING_TOKEN, ETCD_REGISTRY_ELECTION and
    /// ETCD_REGISTRY_LEASE_ID (hex) in its environment. CMD never outlives
    /// the lease: once keep-alives have failed so long that the lease
    /// deadline is less than --grace away, CMD gets SIGTERM, and SIGKILL at
    /// the deadline at the latest. When leadership is lost otherwise (its
    /// key deleted), CMD gets SIGTERM at once and SIGKILL after --grace. Then
    /// the campaign starts again and CMD is restarted on the next win (with
    /// --once: exit 1 instead). When CMD exits, the CLI resigns and exits
    /// with CMD's status (128+N if killed by signal N). SIGINT/SIGTERM are
    /// forwarded to CMD; once it ended (or --grace passed), the CLI resigns
    /// and exits with CMD's status. The CLI's own lines go to stderr,
    /// prefixed with `etcd-registry: `.
    Campaign(cmd::campaign::Args),

    /// Acquire a lock and hold it until Ctrl-C/SIGTERM, or while CMD runs.
    ///
    /// Waits while another holder (this CLI, the library, `etcdctl lock`)
    /// has it. Without CMD, prints the fencing token and holds the lock until
    /// Ctrl-C/SIGTERM, then releases it; a loss exits 1.
    ///
    /// With `-- CMD [ARGS...]`, runs CMD once the lock is held, with
    /// ETCD_REGISTRY_FENCING_TOKEN, ETCD_REGISTRY_LOCK and
    /// ETCD_REGISTRY_LEASE_ID (hex) in its environment, and releases the lock
    /// when CMD exits, exiting with CMD's status (128+N if killed by signal
    /// N). CMD never outlives the lease: once keep-alives have failed so long
    /// that the lease deadline is less than --grace away, CMD gets SIGTERM,
    /// and SIGKILL at the deadline at the latest. When the lock is lost
    /// otherwise (its key deleted), CMD gets SIGTERM at once and SIGKILL
    /// after --grace. Either way the CLI exits 1: a lost lock is not
    /// acquired again.
    /// SIGINT/SIGTERM are forwarded to CMD; once it ended (or --grace
    /// passed), the CLI releases and exits with CMD's status. A signal while
    /// waiting exits 128+N without running CMD.
    Lock(cmd::lock::Args),

    /// Print the leader of an election, then every change (including "no leader").
    Observe(cmd::observe::Args),

    /// Serve a read-only live dashboard: services, instances, elections and
    /// the connection to etcd, updated as they change.
    ///
    /// Prints the address it serves on. The page and its JSON API
    /// (/api/services, /api/services/{name}, /api/elections, /api/locks, /api/status,
    /// /api/events) have no authentication: listening on anything but a
    /// loopback address prints a warning. Runs until Ctrl-C/SIGTERM.
    Ui(cmd::ui::Args),

    /// Serve the namespace as DNS, read-only, from a cache of it: no etcd
    /// round trip per query. Runs until Ctrl-C/SIGTERM.
    ///
    /// Names, for service `web` and instance `web-1` under `registry.`:
    /// `_web._tcp.registry.` SRV (one per instance: port, weight, target
    /// `web-1.web.registry.`), `web.registry.` A/AAAA (every instance's
    /// address), `web-1.web.registry.` A/AAAA (its address), or CNAME when
    /// its address is a host name. Unknown names (and a literal `*` label)
    /// get NXDOMAIN; a service whose instances are all gone gets an empty
    /// answer (NODATA) for 30 s (or the record TTL if longer), then
    /// NXDOMAIN. UDP and TCP on one port; answers too large for UDP are
    /// truncated (TC) and retried over TCP, which carries up to 65,535
    /// bytes: past that, the first records that fit, with TC. Prints the
    /// address it serves on.
    Dns(cmd::dns::Args),

    /// Print a shell completion script: `etcd-registry completions bash > /etc/bash_completion.d/etcd-registry`.
    Completions(cmd::completions::Args),

    /// Print the man page (roff): `etcd-registry man | man -l -`.
    Man,
}

impl Cli {
    /// Parses the command line; usage errors exit 2 with clap's message.
    ///
    /// `--namespace` is global, so clap cannot tell `ui --all-namespaces`
    /// that it conflicts; this does, for a `--namespace` typed on the command
    /// line (not for ETCD_REGISTRY_NAMESPACE from the environment).
    ///
    /// `--ttl` is global too: this checks that the `--grace` of `campaign`
    /// and `lock -- CMD` fits it, and lowers the default grace to fit.
    pub fn parse_checked() -> Cli {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Cli::command();
        let matches = command.get_matches_mut();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let typed =
            |m: &clap::ArgMatches| m.value_source("namespace") == Some(ValueSource::CommandLine);
        if let Command::Ui(ui) = &cli.command
            && ui.all_namespaces
            && (typed(&matches) || matches.subcommand_matches("ui").is_some_and(typed))
        {
            command
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "the argument '--all-namespaces' cannot be used with '--namespace'",
                )
                .exit();
        }
        // `campaign`/`lock -- CMD`: the grace period must fit the lease.
        let ttl = cli.global.ttl;
        let held = match &mut cli.command {
            Command::Campaign(a) => Some((&mut a.grace, &a.cmd)),
            Command::Lock(a) => Some((&mut a.grace, &a.cmd)),
            _ => None,
        };
        if let Some((grace, cmd)) = held
            && !cmd.is_empty()
        {
            let typed = matches
                .subcommand()
                .is_some_and(|(_, m)| m.value_source("grace") == Some(ValueSource::CommandLine));
            match lease_grace(typed.then_some(*grace), ttl) {
                Ok(fits) => *grace = fits,
                Err(message) => command
                    .error(clap::error::ErrorKind::ArgumentConflict, message)
                    .exit(),
            }
        }
        cli
    }
}

impl Command {
    /// The `--metrics-addr` of a long-running command.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        match self {
            Command::Register(cmd::register::Args { metrics, .. })
            | Command::Watch(cmd::watch::Args { metrics, .. })
            | Command::Campaign(cmd::campaign::Args { metrics, .. })
            | Command::Lock(cmd::lock::Args { metrics, .. })
            | Command::Observe(cmd::observe::Args { metrics, .. })
            | Command::Dns(cmd::dns::Args { metrics, .. }) => metrics.metrics_addr,
            _ => None,
        }
    }
}

/// The `--grace` of `campaign`/`lock -- CMD` under a lease of `ttl`: the
/// one given, if the lease can honour it, else an error naming both flags;
/// when none was given, the default that fits (see `supervise::max_grace`).
fn lease_grace(given: Option<Duration>, ttl: Duration) -> Result<Duration, String> {
    let max = crate::supervise::max_grace(ttl);
    match given {
        None => Ok(crate::supervise::default_grace(ttl)),
        Some(grace) if grace <= max => Ok(grace),
        Some(grace) => Err(format!(
            "--grace {} is more than --ttl {} can honour: at most {} (TTL/2 minus the \
             safety margin of 250ms + 2% of TTL), so that SIGTERM comes only once \
             keep-alives have failed and CMD still stops by the lease deadline; \
             lower --grace or raise --ttl",
            humantime::format_duration(grace),
            humantime::format_duration(ttl),
            humantime::format_duration(max),
        )),
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
    fn grace_must_fit_the_lease() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Not given: 10s, or the most the TTL allows.
        assert_eq!(lease_grace(None, s(10)), Ok(ms(4550)));
        assert_eq!(lease_grace(None, s(3)), Ok(ms(1190)));
        assert_eq!(lease_grace(None, s(60)), Ok(s(10)));
        // Given: kept when it fits, refused naming both flags when not.
        assert_eq!(lease_grace(Some(ms(4550)), s(10)), Ok(ms(4550)));
        assert_eq!(lease_grace(Some(s(0)), s(2)), Ok(s(0)));
        let refused = lease_grace(Some(s(5)), s(10)).unwrap_err();
        assert!(
            refused.starts_with("--grace 5s is more than --ttl 10s can honour: at most 4s 550ms"),
            "{refused}"
        );
        assert!(lease_grace(Some(ms(720)), s(2)).is_err());
    }
}
