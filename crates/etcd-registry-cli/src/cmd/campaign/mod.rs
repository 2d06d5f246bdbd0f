//! `campaign`: hold leadership until a signal, --for or a loss; with
//! `-- CMD`, run CMD only while leading (see `supervised.rs`).

mod supervised;

use std::ffi::OsString;
use std::time::Duration;

use etcd_registry::Registry;

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::{CliError, CliResult};
use crate::common::metrics::MetricsOpt;
use crate::common::output::line;
use crate::common::shutdown::Shutdown;
use crate::common::time::{duration, sleep_for};
use crate::supervise::Supervisor;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Election name.
    pub election: String,
    /// The value the leader key holds while this candidate leads.
    pub proposal: String,
    /// Resign and exit this long after winning (`30s`, `1h`); not with CMD.
    #[arg(long = "for", value_name = "DURATION", value_parser = duration, conflicts_with = "cmd")]
    pub for_secs: Option<Duration>,
    /// With CMD: exit 1 when leadership is lost, instead of campaigning again.
    #[arg(long, requires = "cmd")]
    pub once: bool,
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
    pub grace: Duration,
    /// The command to run while leading, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
    #[command(flatten)]
    pub metrics: MetricsOpt,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args {
        election,
        proposal,
        for_secs,
        once,
        grace,
        cmd,
        ..
    } = args;
    let mut shutdown = Shutdown::listen()?;
    if cmd.is_empty() {
        return with_registry(g, async |r| {
            campaign(r, &election, proposal, for_secs, shutdown).await
        })
        .await;
    }
    let supervisor = Supervisor::new(cmd, grace)?;
    with_registry(g, async move |r| {
        let run = supervised::Run {
            election: r.election(&election)?,
            proposal,
            once,
            supervisor,
        };
        let result = run.run(&mut shutdown).await;
        // CMD has ended; a signal during the close ends the CLI at once.
        shutdown.exit_on_next();
        result
    })
    .await
}

async fn campaign(
    registry: &Registry,
    election: &str,
    proposal: String,
    for_secs: Option<Duration>,
    shutdown: Shutdown,
) -> CliResult {
    let election = registry.election(election)?;
    let signalled = shutdown.signalled();
    tokio::pin!(signalled);
    line(&format!(
        "campaigning in {} as {proposal:?}",
        election.etcd_name()
    ))?;
    // Dropping the campaign future (on a signal) withdraws the candidacy.
    let leadership = tokio::select! {
        won = election.campaign(proposal) => won?,
        name = &mut signalled => {
            line(&format!("received {name} while campaigning; withdrawing"))?;
            return Ok(());
        }
    };
    line(&format!(
        "leader (fencing token {})",
        leadership.fencing_token()
    ))?;
    let why = tokio::select! {
        reason = leadership.lost() => {
            // Harmless after a loss; deletes the key if it is still ours.
            if let Err(e) = leadership.resign().await {
                tracing::warn!(error = %e, "resign after losing leadership failed");
            }
            return Err(CliError::msg(format!("leadership lost: {reason}")));
        }
        name = &mut signalled => format!("received {name}"),
        _ = sleep_for(for_secs) => "--for elapsed".to_owned(),
    };
    line(&format!("{why}; resigning"))?;
    leadership.resign().await?;
    line("resigned")
}
