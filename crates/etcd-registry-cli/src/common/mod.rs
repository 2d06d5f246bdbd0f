//! The leaf every command uses: the connection flags and connecting, output,
//! errors and exit codes, shutdown signals, durations, and the metrics
//! listener's flag. Nothing here knows any command.

pub mod args;
pub mod connect;
pub mod error;
pub mod metrics;
pub mod output;
pub mod shutdown;
pub mod time;
