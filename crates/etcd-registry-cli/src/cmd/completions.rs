//! `completions SHELL`: a shell completion script.

use crate::common::error::CliResult;

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// Prints the completion script of `command`, the whole command line.
pub fn run(args: Args, command: clap::Command) -> CliResult {
    crate::common::output::completions(args.shell, command)
}
