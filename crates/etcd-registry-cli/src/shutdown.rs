//! Ctrl-C and SIGTERM: the normal way to end the long-running commands.

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::error::{CliError, CliResult};

/// Listens for SIGINT and SIGTERM from the moment it is created, so a signal
/// that arrives while the command is still connecting is not lost.
pub struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
}

impl Shutdown {
    pub fn listen() -> CliResult<Self> {
        let install = |kind| {
            signal(kind).map_err(|e| CliError::msg(format!("cannot listen for signals: {e}")))
        };
        Ok(Shutdown {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    /// Resolves on the first SIGINT or SIGTERM and returns its name.
    ///
    /// From then on, a second signal exits at once (status 130), for when the
    /// clean shutdown hangs on an unreachable etcd.
    pub async fn signalled(mut self) -> &'static str {
        let name = tokio::select! {
            _ = self.interrupt.recv() => "interrupt",
            _ = self.terminate.recv() => "terminate",
        };
        tracing::info!(signal = name, "shutting down");
        tokio::spawn(async move {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
            eprintln!("error: second signal; exiting without a clean shutdown");
            std::process::exit(130);
        });
        name
    }
}
