//! `watch`: the instances of one service or of all, then every change.

use std::time::Duration;

use etcd_registry::{Registry, ServiceEvent};
use futures::StreamExt;
use tokio::time::Instant;

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::{CliError, CliResult};
use crate::common::metrics::MetricsOpt;
use crate::common::output::{self, line};
use crate::common::shutdown::Shutdown;
use crate::common::time::{duration, sleep_until_opt};

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The service; all services of the namespace when omitted.
    pub service: Option<String>,
    /// JSON lines: {"event":"snapshot","instances":[..]}, then
    /// {"event":"added"|"updated"|"removed","instance":{..}}.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 after this many events following the snapshot.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this long (`30s`, `2m`).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub metrics: MetricsOpt,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args {
        service,
        json,
        count,
        timeout,
        ..
    } = args;
    let shutdown = Shutdown::listen()?;
    let deadline = timeout.map(|d| Instant::now() + d);
    with_registry(g, async |r| {
        watch(r, service.as_deref(), json, count, deadline, shutdown).await
    })
    .await
}

async fn watch(
    registry: &Registry,
    service: Option<&str>,
    json: bool,
    count: Option<u64>,
    deadline: Option<Instant>,
    shutdown: Shutdown,
) -> CliResult {
    let mut events = match service {
        Some(name) => registry.watch(name)?,
        None => registry.watch_all()?,
    };
    let signalled = shutdown.signalled();
    let timer = sleep_until_opt(deadline);
    tokio::pin!(signalled, timer);
    let mut seen = 0u64;
    loop {
        let event = tokio::select! {
            _ = &mut signalled => return Ok(()),
            _ = &mut timer => {
                return match count {
                    Some(n) => Err(CliError::msg(format!(
                        "--timeout elapsed after {seen} of {n} events"
                    ))),
                    None => Ok(()),
                };
            }
            event = events.next() => event,
        };
        let Some(event) = event else {
            return Err(match events.error() {
                Some(e) => e.into(),
                None => CliError::msg("the watch ended: the registry was closed"),
            });
        };
        match &event {
            ServiceEvent::Snapshot(all) => {
                if json {
                    line(&output::snapshot_json(all))?;
                } else {
                    let s = if all.len() == 1 { "" } else { "s" };
                    line(&format!("snapshot: {} instance{s}", all.len()))?;
                    for i in all {
                        line(&format!("  {}", output::instance_line(i)))?;
                    }
                }
            }
            ServiceEvent::Added(instance)
            | ServiceEvent::Updated(instance)
            | ServiceEvent::Removed(instance) => {
                seen += 1;
                let kind = output::event_name(&event);
                if json {
                    line(&output::event_json(kind, instance))?;
                } else {
                    line(&format!("{kind} {}", output::instance_line(instance)))?;
                }
            }
        }
        if count.is_some_and(|n| seen >= n) {
            return Ok(());
        }
    }
}
