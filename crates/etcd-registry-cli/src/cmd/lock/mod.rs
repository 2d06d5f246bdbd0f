//! `lock`: hold a lock until a signal, or while `-- CMD` runs (see `hold.rs`).

mod hold;

use std::ffi::OsString;
use std::time::Duration;

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::CliResult;
use crate::common::metrics::MetricsOpt;
use crate::common::shutdown::Shutdown;
use crate::common::time::duration;
use crate::supervise::Supervisor;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Lock name (no '/').
    pub name: String,
    /// Exit 1 if the lock is not acquired within this long (`30s`, `2m`).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub timeout: Option<Duration>,
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
    /// The command to run while holding the lock, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
    #[command(flatten)]
    pub metrics: MetricsOpt,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args {
        name,
        timeout,
        grace,
        cmd,
        ..
    } = args;
    let mut shutdown = Shutdown::listen()?;
    let supervisor = if cmd.is_empty() {
        None
    } else {
        Some(Supervisor::new(cmd, grace)?)
    };
    let run = hold::Run {
        name,
        timeout,
        supervisor,
    };
    with_registry(g, async move |r| {
        let result = run.run(r, &mut shutdown).await;
        // The lock is released; a signal during the close ends the CLI at once.
        shutdown.exit_on_next();
        result
    })
    .await
}
