//! The one child-process supervisor, behind every `... -- CMD`: it runs a
//! command until it exits, until a "stop now" future resolves (such as
//! `Leadership::lost()`), or until the CLI gets SIGINT/SIGTERM.
//!
//! - CMD inherits stdin, stdout and stderr, so its output passes through
//!   untouched; the CLI's own lines go to stderr behind [`PREFIX`] ([`say`]).
//! - CMD runs in a process group of its own: a terminal's Ctrl-C reaches
//!   only the CLI, which forwards it once, to the whole group, so that CMD
//!   does not get it twice and its own children get it too.
//! - Stopping sends SIGTERM to the group at once and SIGKILL after the
//!   grace period (or at once on a second signal to the CLI).
//! - CMD is killed if the CLI dies without stopping it (`PR_SET_PDEATHSIG`):
//!   a CLI killed with SIGKILL must not leave a CMD running after its
//!   leadership or lock has expired.
//! - The status of a command that ended is its exit code, or 128 + the
//!   signal that killed it, as shells report it.

use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::error::{CliError, CliResult};
use crate::shutdown::{Received, Shutdown};

/// What the CLI's own lines start with while it supervises a command.
pub const PREFIX: &str = "etcd-registry: ";

/// Prints one of the CLI's own lines to stderr, where CMD's output cannot be
/// mistaken for it.
pub fn say(message: impl fmt::Display) {
    eprintln!("{PREFIX}{message}");
}

/// How a supervised command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(ExitStatus);

impl Status {
    /// The exit code, or 128 + the signal that killed it.
    pub fn code(self) -> u8 {
        match (self.0.code(), self.0.signal()) {
            // Exit codes are 0..=255 on Unix; anything else cannot happen.
            (Some(code), _) => u8::try_from(code).unwrap_or(1),
            (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
            (None, None) => 1,
        }
    }

    /// `Ok` for status 0, else the status to exit with.
    pub fn into_result(self) -> CliResult {
        match self.code() {
            0 => Ok(()),
            code => Err(CliError::Exit(code)),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.code(), self.0.signal()) {
            (Some(code), _) => write!(f, "exited with status {code}"),
            (None, Some(n)) => match Signal::try_from(n) {
                Ok(signal) => write!(f, "was killed by {signal} (status {})", self.code()),
                Err(_) => write!(f, "was killed by signal {n} (status {})", self.code()),
            },
            (None, None) => write!(f, "ended ({})", self.0),
        }
    }
}

/// "exited with status N" or "was killed by SIG... (status N)", as for CMD.
pub fn describe(status: ExitStatus) -> String {
    Status(status).to_string()
}

/// Why a supervised command ended.
#[derive(Debug)]
pub enum Ended<R> {
    /// It exited by itself.
    Exited(Status),
    /// The stop future resolved with `reason`; the command was stopped.
    Stopped { reason: R, status: Status },
    /// The CLI got `signal`, forwarded it, and the command ended.
    Signalled { signal: Received, status: Status },
}

/// A command line to run under supervision, and how long it may take to stop.
#[derive(Debug, Clone)]
pub struct Supervisor {
    argv: Vec<OsString>,
    grace: Duration,
}

impl Supervisor {
    /// `argv[0]` is the program, looked up in `PATH`; `grace` is how long
    /// the command gets between SIGTERM and SIGKILL.
    pub fn new(argv: Vec<OsString>, grace: Duration) -> CliResult<Self> {
        if argv.is_empty() {
            return Err(CliError::Usage {
                message: "no command given after `--`".into(),
                hint: None,
            });
        }
        Ok(Supervisor { argv, grace })
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        self.argv
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command with `env` added to the CLI's environment, until it
    /// exits, `stop` resolves, or a signal arrives through `shutdown`.
    ///
    /// Always waits for the command to end (SIGKILL ends it at the latest
    /// after the grace period), so no command outlives this call.
    ///
    /// # Errors
    ///
    /// When the command cannot be started: exit status 127 if it was not
    /// found, 126 otherwise (as shells do), after saying why on stderr.
    pub async fn run<R>(
        &self,
        env: &[(&str, String)],
        stop: impl Future<Output = R>,
        shutdown: &mut Shutdown,
    ) -> CliResult<Ended<R>> {
        self.run_draining(env, stop, shutdown, async |_| {}).await
    }

    /// As [`run`](Self::run), but on SIGINT/SIGTERM awaits `drain` (such as
    /// deregistering, then waiting for clients to notice) while CMD keeps
    /// running, and forwards the signal only then. A second signal cuts the
    /// drain short; a CMD that exits meanwhile ends it too.
    pub async fn run_draining<R>(
        &self,
        env: &[(&str, String)],
        stop: impl Future<Output = R>,
        shutdown: &mut Shutdown,
        drain: impl AsyncFnOnce(Received),
    ) -> CliResult<Ended<R>> {
        let mut child = self.spawn(env)?;
        let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
            // Only an already reaped child has no id.
            let status = child.wait().await?;
            return Ok(Ended::Exited(Status(status)));
        };
        let group = Pid::from_raw(pid);
        tracing::info!(pid, command = %self.display(), "command started");
        tokio::pin!(stop);
        tokio::select! {
            status = child.wait() => Ok(Ended::Exited(Status(status?))),
            reason = &mut stop => {
                say(format!("stopping the command (pid {pid}): SIGTERM, SIGKILL after {}", humantime::format_duration(self.grace)));
                signal_group(group, Signal::SIGTERM);
                let status = self.wait_grace(&mut child, group, shutdown).await?;
                Ok(Ended::Stopped { reason, status })
            }
            signal = shutdown.recv() => {
                let drained = tokio::select! {
                    _ = drain(signal) => None,
                    status = child.wait() => Some(status?),
                    _ = shutdown.recv() => {
                        say("second signal: forwarding it now");
                        None
                    }
                };
                if let Some(status) = drained {
                    return Ok(Ended::Signalled { signal, status: Status(status) });
                }
                say(format!("received {}; forwarding it to the command (pid {pid}), SIGKILL after {}", signal.name(), humantime::format_duration(self.grace)));
                signal_group(group, signal.0);
                let status = self.wait_grace(&mut child, group, shutdown).await?;
                Ok(Ended::Signalled { signal, status })
            }
        }
    }

    fn spawn(&self, env: &[(&str, String)]) -> CliResult<Child> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            // A panic that unwinds past the supervisor must not leave it running.
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec; it makes two
        // async-signal-safe syscalls and builds io::Errors from raw codes only.
        unsafe {
            cmd.pre_exec(move || {
                // Fires when the forking *thread* exits. This runs on a thread
                // of the CLI's one runtime, which lives until the process exits.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                // The CLI may have died between fork and prctl.
                if nix::unistd::getppid().as_raw().cast_unsigned() != parent {
                    return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| {
            say(format!("cannot run `{}`: {e}", self.display()));
            CliError::Exit(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        })
    }

    /// Waits for a command that was asked to stop: SIGKILL after the grace
    /// period, or at once on another signal to the CLI.
    async fn wait_grace(
        &self,
        child: &mut Child,
        group: Pid,
        shutdown: &mut Shutdown,
    ) -> CliResult<Status> {
        let grace = tokio::time::sleep(self.grace);
        tokio::pin!(grace);
        let killed = tokio::select! {
            status = child.wait() => return Ok(Status(status?)),
            _ = &mut grace => "still running after the grace period",
            _ = shutdown.recv() => "second signal",
        };
        say(format!("{killed}: SIGKILL"));
        signal_group(group, Signal::SIGKILL);
        Ok(Status(child.wait().await?))
    }
}

/// Signals every process of the command's group. A group that is already
/// gone (ESRCH) is fine: the command ended on its own meanwhile.
fn signal_group(group: Pid, signal: Signal) {
    match killpg(group, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(error) => {
            tracing::warn!(%error, %signal, pgid = group.as_raw(), "cannot signal the command")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_the_exit_code_or_128_plus_the_signal() {
        assert_eq!(Status(ExitStatus::from_raw(7 << 8)).code(), 7);
        assert_eq!(Status(ExitStatus::from_raw(15)).code(), 143);
        assert_eq!(Status(ExitStatus::from_raw(9)).code(), 137);
        assert_eq!(
            Status(ExitStatus::from_raw(9)).to_string(),
            "was killed by SIGKILL (status 137)"
        );
        assert_eq!(
            Status(ExitStatus::from_raw(3 << 8)).to_string(),
            "exited with status 3"
        );
        assert!(Status(ExitStatus::from_raw(0)).into_result().is_ok());
    }
}
