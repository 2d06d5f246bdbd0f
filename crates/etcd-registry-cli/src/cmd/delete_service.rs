//! `delete-service`: delete every instance of a service, whoever registered them.

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::CliResult;
use crate::common::output::line;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    pub name: String,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args { name } = args;
    with_registry(g, async |r| {
        let n = r.delete_service(&name).await?;
        let s = if n == 1 { "" } else { "s" };
        line(&format!("deleted {n} instance{s} of {name}"))
    })
    .await
}
