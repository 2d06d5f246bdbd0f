//! The command line: global connection options and one subcommand.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    Status {
        /// One JSON object: {"endpoints":[..],"namespace":{..}}.
        #[arg(long)]
        json: bool,
    },

    /// List the instances of SERVICE, or of every service, in one consistent read.
    List {
        /// The service; all services of the namespace when omitted.
        service: Option<String>,
        /// One JSON array of instances in the Go library's wire format.
        #[arg(long)]
        json: bool,
        /// Each stored value byte for byte, one per line, as no re-encoding
        /// can: whatever a client wrote, unknown fields and spelling included.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// List the endpoints under gRPC's etcd naming target TARGET
        /// (`{TARGET}/{addr}`, as etcd's Go `naming/endpoints` writes them)
        /// instead of a service: id = address, metadata as read.
        #[arg(long, value_name = "TARGET", conflicts_with_all = ["service", "raw"])]
        grpc_naming: Option<String>,
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
        /// Stop after this long (`30s`, `2m`).
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        timeout: Option<Duration>,
        #[command(flatten)]
        metrics: crate::metrics::MetricsOpt,
    },

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
    #[command(group(clap::ArgGroup::new("check").multiple(true).args(["check_http", "check_tcp", "check_grpc", "check_cmd"])))]
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
        /// Also publish the instance for gRPC clients that use etcd's naming
        /// resolver (`etcd:///TARGET`): `{TARGET}/{address}:{port}`, under
        /// the same lease, written and removed with the instance.
        #[arg(long, value_name = "TARGET")]
        grpc_naming: Option<String>,
        /// Deregister and exit after this long (`30s`, `1h`); not with CMD.
        #[arg(long = "for", value_name = "DURATION", value_parser = duration, conflicts_with = "cmd")]
        for_secs: Option<Duration>,
        #[command(flatten)]
        metrics: crate::metrics::MetricsOpt,
        /// Health check: HTTP GET of URL (http:// only); any 2xx is passing.
        #[arg(long, value_name = "URL")]
        check_http: Option<String>,
        /// Health check: a TCP connection to HOST:PORT succeeds.
        #[arg(long, value_name = "HOST:PORT")]
        check_tcp: Option<String>,
        /// Health check: grpc.health.v1 Check of SERVICE ("" when omitted) returns SERVING.
        #[arg(long, value_name = "HOST:PORT[/SERVICE]")]
        check_grpc: Option<String>,
        /// Health check: `sh -c CMD` exits 0.
        #[arg(long, value_name = "CMD")]
        check_cmd: Option<String>,
        /// With a check: time between two checks.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration, requires = "check")]
        interval: Duration,
        /// With a check: how long one check may take before it fails [default: half the interval].
        #[arg(long, value_name = "DURATION", value_parser = positive_duration, requires = "check")]
        timeout: Option<Duration>,
        /// With a check: passes in a row that bring an unhealthy instance back.
        #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..), requires = "check")]
        rise: u32,
        /// With a check: failures in a row that take a healthy instance out.
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), requires = "check")]
        fall: u32,
        /// On SIGINT/SIGTERM, how long to wait between deregistering and
        /// stopping [default: 5s with CMD, 0s without].
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        drain: Option<Duration>,
        /// With CMD: how long CMD may take to exit after the signal before SIGKILL.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration, requires = "cmd")]
        grace: Duration,
        /// The command to run while registered, after `--`.
        #[arg(last = true, value_name = "CMD")]
        cmd: Vec<OsString>,
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
    Campaign {
        /// Election name.
        election: String,
        /// The value the leader key holds while this candidate leads.
        proposal: String,
        /// Resign and exit this long after winning (`30s`, `1h`); not with CMD.
        #[arg(long = "for", value_name = "DURATION", value_parser = duration, conflicts_with = "cmd")]
        for_secs: Option<Duration>,
        /// With CMD: exit 1 when leadership is lost, instead of campaigning again.
        #[arg(long, requires = "cmd")]
        once: bool,
        /// With CMD: how long CMD gets between SIGTERM and SIGKILL. SIGTERM
        /// comes once keep-alives have failed so long that the lease deadline
        /// is this close (or at once on a loss or signal); SIGKILL comes at the
        /// deadline at the latest. At most TTL/2 − (250ms + 2% of TTL): 4.55s
        /// with --ttl 10s [default: 10s, or that maximum if less].
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "10s",
            hide_default_value = true,
            value_parser = duration,
            requires = "cmd"
        )]
        grace: Duration,
        /// The command to run while leading, after `--`.
        #[arg(last = true, value_name = "CMD")]
        cmd: Vec<OsString>,
        #[command(flatten)]
        metrics: crate::metrics::MetricsOpt,
    },

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
    Lock {
        /// Lock name (no '/').
        name: String,
        /// Exit 1 if the lock is not acquired within this long (`30s`, `2m`).
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        timeout: Option<Duration>,
        /// With CMD: how long CMD gets between SIGTERM and SIGKILL. SIGTERM
        /// comes once keep-alives have failed so long that the lease deadline
        /// is this close (or at once on a loss or signal); SIGKILL comes at the
        /// deadline at the latest. At most TTL/2 − (250ms + 2% of TTL): 4.55s
        /// with --ttl 10s [default: 10s, or that maximum if less].
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "10s",
            hide_default_value = true,
            value_parser = duration,
            requires = "cmd"
        )]
        grace: Duration,
        /// The command to run while holding the lock, after `--`.
        #[arg(last = true, value_name = "CMD")]
        cmd: Vec<OsString>,
        #[command(flatten)]
        metrics: crate::metrics::MetricsOpt,
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
        #[command(flatten)]
        metrics: crate::metrics::MetricsOpt,
    },

    /// Serve a read-only live dashboard: services, instances, elections and
    /// the connection to etcd, updated as they change.
    ///
    /// Prints the address it serves on. The page and its JSON API
    /// (/api/services, /api/services/{name}, /api/elections, /api/locks, /api/status,
    /// /api/events) have no authentication: listening on anything but a
    /// loopback address prints a warning. Runs until Ctrl-C/SIGTERM.
    Ui {
        /// Address to serve on; port 0 picks a free one.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Show every namespace under --prefix instead of --namespace.
        #[arg(long)]
        all_namespaces: bool,
    },

    /// Serve the namespace as DNS, read-only, from a cache of it: no etcd
    /// round trip per query. Runs until Ctrl-C/SIGTERM.
    ///
    /// Names, for service `web` and instance `web-1` under `registry.`:
    /// `_web._tcp.registry.` SRV (one per instance: port, weight, target
    /// `web-1.web.registry.`), `web.registry.` A/AAAA (every instance's
    /// address), `web-1.web.registry.` A/AAAA (its address), or CNAME when
    /// its address is a host name. Unknown names get NXDOMAIN; a known
    /// service with no instance gets an empty answer (NODATA). UDP and TCP on
    /// one port; answers too large for UDP are truncated (TC) and complete
    /// over TCP. Prints the address it serves on.
    Dns {
        /// Address to serve on, UDP and TCP; port 0 picks a free one.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8600")]
        listen: std::net::SocketAddr,
        /// The domain served: names outside it get REFUSED.
        #[arg(long, value_name = "DOMAIN", default_value = "registry.", value_parser = crate::dns::names::parse_domain)]
        domain: hickory_proto::rr::Name,
        /// TTL of every record, whole seconds (`0`, `30s`, `5m`); also how
        /// long resolvers may cache "no such name". 0 (the default): not cached.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = crate::dns::names::parse_record_ttl)]
        record_ttl: u32,
        #[command(flatten)]
        metrics: crate::metrics::MetricsOpt,
    },

    /// Print a shell completion script: `etcd-registry completions bash > /etc/bash_completion.d/etcd-registry`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },

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
        if let Command::Ui {
            all_namespaces: true,
            ..
        } = cli.command
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
        if let Command::Campaign { grace, cmd, .. } | Command::Lock { grace, cmd, .. } =
            &mut cli.command
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

/// A duration in etcdctl's style (`500ms`, `2s`, `1m`) or in whole seconds (`2`).
fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| format!("{s:?}: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; expected a duration such as 500ms, 2s, 1m, or whole seconds"))
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be above zero".to_owned()),
        d => Ok(d),
    }
}

/// etcd grants leases in whole seconds.
fn ttl(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d < Duration::from_secs(2) => Err("must be at least 2s".to_owned()),
        d if d.subsec_nanos() != 0 => Err("must be whole seconds".to_owned()),
        d => Ok(d),
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
    fn durations_take_units_or_whole_seconds() {
        assert_eq!(duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(duration("").is_err());
        assert!(duration("-1s").is_err());
        assert!(duration("2 fortnights").is_err());
        assert!(positive_duration("0s").is_err());
        assert_eq!(ttl("1m"), Ok(Duration::from_secs(60)));
        assert!(ttl("1s").is_err());
        assert!(ttl("2500ms").is_err());
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
