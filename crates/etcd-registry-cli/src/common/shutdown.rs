//! Ctrl-C and SIGTERM: the normal way to end the long-running commands.
//!
//! A repeat of the same signal within [`REPEAT`] of the one that counted is
//! one signal: GNU `timeout` sends SIGTERM to its child and then to the
//! child's process group, so the CLI gets it twice at once, and a second
//! signal means "stop waiting for a clean shutdown". A later repeat, or the
//! other signal, counts.

use std::time::Duration;

use nix::sys::signal::Signal as Sig;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

use super::error::{CliError, CliResult};

/// Within this long of a counted signal, the same signal again is a duplicate.
pub const REPEAT: Duration = Duration::from_secs(1);

/// Listens for SIGINT and SIGTERM from the moment it is created, so a signal
/// that arrives while the command is still connecting is not lost.
pub struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
    /// The last signal that counted, and when.
    last: Option<(Received, Instant)>,
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
            last: None,
        })
    }

    /// The next SIGINT or SIGTERM that counts: a repeat of the last one
    /// within [`REPEAT`] is skipped. Cancel safe: a signal is never lost.
    pub async fn recv(&mut self) -> Received {
        loop {
            let received = tokio::select! {
                _ = self.interrupt.recv() => Received(Sig::SIGINT),
                _ = self.terminate.recv() => Received(Sig::SIGTERM),
            };
            let now = Instant::now();
            if is_repeat(self.last, received, now) {
                tracing::info!(
                    signal = received.name(),
                    "signal repeated within 1s; counted once"
                );
                continue;
            }
            self.last = Some((received, now));
            tracing::info!(signal = received.name(), "signal received");
            return received;
        }
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

/// Whether `received` at `now` repeats the signal that counted last.
fn is_repeat(last: Option<(Received, Instant)>, received: Received, now: Instant) -> bool {
    last.is_some_and(|(signal, at)| signal == received && now.duration_since(at) < REPEAT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_signal_within_a_second_is_a_repeat() {
        let t0 = Instant::now();
        let term = Received(Sig::SIGTERM);
        let int = Received(Sig::SIGINT);
        assert!(!is_repeat(None, term, t0));
        let last = Some((term, t0));
        assert!(is_repeat(last, term, t0));
        assert!(is_repeat(last, term, t0 + Duration::from_millis(999)));
        assert!(!is_repeat(last, term, t0 + REPEAT));
        assert!(!is_repeat(last, int, t0 + Duration::from_millis(10)));
    }
}
