//! `deregister`: delete one instance, whoever registered it.

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::{CliError, CliResult};
use crate::common::output::line;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service name.
    pub name: String,
    /// Instance id.
    pub id: String,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args { name, id } = args;
    with_registry(g, async |r| {
        if r.delete_instance(&name, &id).await? {
            line(&format!("deleted {name}/{id}"))
        } else {
            let ns = r.config().namespace();
            Err(CliError::msg(format!(
                "no instance {name}/{id} in namespace {ns}"
            )))
        }
    })
    .await
}
