//! `observe`: the leader of an election, then every change.

use etcd_registry::Registry;
use futures::StreamExt;

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::{CliError, CliResult};
use crate::common::metrics::MetricsOpt;
use crate::common::output::{self, line};
use crate::common::shutdown::Shutdown;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Election name.
    pub election: String,
    /// JSON lines: {"leader":{..}} or {"leader":null}.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 after this many changes following the current leader.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub metrics: MetricsOpt,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args {
        election,
        json,
        count,
        ..
    } = args;
    let shutdown = Shutdown::listen()?;
    with_registry(g, async |r| {
        observe(r, &election, json, count, shutdown).await
    })
    .await
}

async fn observe(
    registry: &Registry,
    election: &str,
    json: bool,
    count: Option<u64>,
    shutdown: Shutdown,
) -> CliResult {
    let mut leaders = registry.election(election)?.observe();
    let signalled = shutdown.signalled();
    tokio::pin!(signalled);
    // The first item is the current leader; --count counts the changes after it.
    let mut items = 0u64;
    loop {
        let leader = tokio::select! {
            _ = &mut signalled => return Ok(()),
            leader = leaders.next() => leader,
        };
        let Some(leader) = leader else {
            return Err(CliError::msg(
                "the observation ended: the registry was closed",
            ));
        };
        line(&if json {
            output::leader_json(leader.as_ref())
        } else {
            output::leader_text(leader.as_ref())
        })?;
        if count.is_some_and(|n| items >= n) {
            return Ok(());
        }
        items += 1;
    }
}
