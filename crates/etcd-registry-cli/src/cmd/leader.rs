//! `leader`: the current leader of an election.

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::CliResult;
use crate::common::output::{self, line};

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Election name.
    pub election: String,
    /// One JSON object: {"leader":{..}} or {"leader":null}.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args { election, json } = args;
    with_registry(g, async |r| {
        let leader = r.election(&election)?.leader().await?;
        line(&if json {
            output::leader_json(leader.as_ref())
        } else {
            output::leader_text(leader.as_ref())
        })
    })
    .await
}
