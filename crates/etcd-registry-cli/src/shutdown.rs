//! Ctrl-C and SIGTERM: the normal way to end the long-running commands.

use nix::sys::signal::Signal as Sig;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::error::{CliError, CliResult};

/// Listens for SIGINT and SIGTERM from the moment it is created, so a signal
/// that arrives while the command is still connecting is not lost.
pub struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
}

/// A SIGINT or SIGTERM received by the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received(pub Sig);

impl Received {
    /// `interrupt` or `terminate`, as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self.0 {
            Sig::SIGINT => "interrupt",
            _ => "terminate",
        }
    }
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

    /// The next SIGINT or SIGTERM. Cancel safe: a signal is never lost.
    pub async fn recv(&mut self) -> Received {
        let received = tokio::select! {
            _ = self.interrupt.recv() => Received(Sig::SIGINT),
            _ = self.terminate.recv() => Received(Sig::SIGTERM),
        };
        tracing::info!(signal = received.name(), "signal received");
        received
    }

    /// Resolves on the first SIGINT or SIGTERM and returns its name.
    ///
    /// From then on, a second signal exits at once (status 130), for when the
    /// clean shutdown hangs on an unreachable etcd.
    pub async fn signalled(mut self) -> &'static str {
        let name = self.recv().await.name();
        self.exit_on_next();
        name
    }

    /// Exits at once (status 130) on the next SIGINT or SIGTERM, for when the
    /// clean shutdown that the previous one started hangs.
    pub fn exit_on_next(mut self) {
        tokio::spawn(async move {
            self.recv().await;
            eprintln!("error: second signal; exiting without a clean shutdown");
            std::process::exit(130);
        });
    }
}
