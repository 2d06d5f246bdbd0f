//! `register`: hold a registration until a signal or --for; with health
//! checks, a drain or `-- CMD` (a sidecar), see `checked.rs`.

mod checked;

use std::ffi::OsString;
use std::time::Duration;

use etcd_registry::{Registry, ServiceInstance};

use crate::common::args::Global;
use crate::common::connect::{builder, with_builder};
use crate::common::error::{CliError, CliResult};
use crate::common::metrics::MetricsOpt;
use crate::common::output::{self, line};
use crate::common::shutdown::Shutdown;
use crate::common::time::{duration, positive_duration, sleep_for};
use crate::supervise::Supervisor;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("check").multiple(true).args(["check_http", "check_tcp", "check_grpc", "check_cmd"])))]
pub struct Args {
    /// Service name (no '/').
    pub name: String,
    /// Instance id, unique within the service (no '/').
    pub id: String,
    /// Host name or IP address that clients dial.
    pub address: String,
    /// Port that clients dial.
    pub port: u16,
    /// Free-form version.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub version: String,
    /// Relative weight for weighted picking.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub weight: i64,
    /// Metadata entry; repeat for more.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub meta: Vec<(String, String)>,
    /// Also publish the instance for gRPC clients that use etcd's naming
    /// resolver (`etcd:///TARGET`): `{TARGET}/{address}:{port}`, under
    /// the same lease, written and removed with the instance.
    #[arg(long, value_name = "TARGET")]
    pub grpc_naming: Option<String>,
    /// Deregister and exit after this long (`30s`, `1h`); not with CMD.
    #[arg(long = "for", value_name = "DURATION", value_parser = duration, conflicts_with = "cmd")]
    pub for_secs: Option<Duration>,
    #[command(flatten)]
    pub metrics: MetricsOpt,
    /// Health check: HTTP GET of URL (http:// only); any 2xx is passing.
    #[arg(long, value_name = "URL")]
    pub check_http: Option<String>,
    /// Health check: a TCP connection to HOST:PORT succeeds.
    #[arg(long, value_name = "HOST:PORT")]
    pub check_tcp: Option<String>,
    /// Health check: grpc.health.v1 Check of SERVICE ("" when omitted) returns SERVING.
    #[arg(long, value_name = "HOST:PORT[/SERVICE]")]
    pub check_grpc: Option<String>,
    /// Health check: `sh -c CMD` exits 0.
    #[arg(long, value_name = "CMD")]
    pub check_cmd: Option<String>,
    /// With a check: time between two checks.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration, requires = "check")]
    pub interval: Duration,
    /// With a check: how long one check may take before it fails [default: half the interval].
    #[arg(long, value_name = "DURATION", value_parser = positive_duration, requires = "check")]
    pub timeout: Option<Duration>,
    /// With a check: passes in a row that bring an unhealthy instance back.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..), requires = "check")]
    pub rise: u32,
    /// With a check: failures in a row that take a healthy instance out.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), requires = "check")]
    pub fall: u32,
    /// On SIGINT/SIGTERM, how long to wait between deregistering and
    /// stopping [default: 5s with CMD, 0s without].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub drain: Option<Duration>,
    /// With CMD: how long CMD may take to exit after the signal before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration, requires = "cmd")]
    pub grace: Duration,
    /// The command to run while registered, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args {
        name,
        id,
        address,
        port,
        version,
        weight,
        meta,
        for_secs,
        check_http,
        check_tcp,
        check_grpc,
        check_cmd,
        interval,
        timeout,
        rise,
        fall,
        drain,
        grace,
        cmd,
        grpc_naming,
        ..
    } = args;
    let shutdown = Shutdown::listen()?;
    let mut instance = ServiceInstance::new(name, id, address, port)
        .with_version(version)
        .with_weight(weight);
    instance.metadata.extend(meta);
    // Reject bad input before reaching etcd: no connection, no lease, no write.
    instance.validate()?;
    let mut settings = builder(g)?;
    if let Some(target) = grpc_naming {
        etcd_registry::naming::validate_target(&target)?;
        etcd_registry::naming::endpoint_addr(&instance)?;
        settings = settings.publish_grpc_naming(target);
    }
    let checks = checked::Checks::parse(check_http, check_tcp, check_grpc, check_cmd)?;
    if !checks.is_empty() || !cmd.is_empty() || drain.is_some() {
        let run = checked::Run {
            instance,
            checks,
            policy: checked::policy(interval, timeout, rise, fall),
            drain,
            for_secs,
            supervisor: match cmd.is_empty() {
                true => None,
                false => Some(Supervisor::new(cmd, grace)?),
            },
        };
        return with_builder(settings, async |r| run.run(r, shutdown).await).await;
    }
    with_builder(settings, async |r| {
        register(r, instance, for_secs, shutdown).await
    })
    .await?;
    line("closed: lease revoked, the instance is gone")
}

async fn register(
    registry: &Registry,
    instance: ServiceInstance,
    for_secs: Option<Duration>,
    shutdown: Shutdown,
) -> CliResult {
    let mut state = registry.state();
    let registration = registry.register(instance).await?;
    let i = registration.instance();
    let lease = registry
        .lease_id()
        .map_or_else(|| "none yet".to_owned(), output::lease_hex);
    line(&format!(
        "registered {}/{} at {} (lease {lease}, key {})",
        i.name,
        i.id,
        i.endpoint(),
        registration.key()
    ))?;
    state.borrow_and_update();
    let signalled = shutdown.signalled();
    let timer = sleep_for(for_secs);
    tokio::pin!(signalled, timer);
    loop {
        tokio::select! {
            name = &mut signalled => {
                line(&format!("received {name}; closing"))?;
                return Ok(());
            }
            _ = &mut timer => {
                line("--for elapsed; closing")?;
                return Ok(());
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return Err(CliError::msg("the registry stopped unexpectedly"));
                }
                let now = *state.borrow_and_update();
                line(&format!("lease state: {}", output::state_text(&now)))?;
            }
        }
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
