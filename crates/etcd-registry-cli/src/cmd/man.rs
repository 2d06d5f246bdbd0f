//! `man`: the man page (roff).

use crate::common::error::CliResult;

/// Prints the man page of `command`, the whole command line.
pub fn run(command: clap::Command) -> CliResult {
    crate::common::output::man(command)
}
