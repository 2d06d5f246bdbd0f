//! The one child-process supervisor, behind every `... -- CMD`: it runs a
//! command until it exits, until its leadership or lock must end, or until
//! the CLI gets SIGINT/SIGTERM.
//!
//! - CMD inherits stdin, stdout and stderr, so its output passes through
//!   untouched; the CLI's own lines go to stderr behind [`PREFIX`] ([`say`]).
//! - CMD runs in a process group of its own: a terminal's Ctrl-C reaches
//!   only the CLI, which forwards it once, to the whole group, so that CMD
//!   does not get it twice and its own children get it too.
//! - Stopping sends SIGTERM to the group at once and SIGKILL after the
//!   grace period (or at once on a second signal to the CLI).
//! - Under a leadership or a lock ([`Supervisor::run_held`]), CMD never
//!   outlives the lease: SIGTERM once the lease deadline is less than the
//!   grace period away (keep-alives have been failing), SIGKILL at the
//!   deadline at the latest, whatever phase the stop is in. The grace period
//!   must fit the TTL: see [`max_grace`].
//! - CMD is killed if the CLI dies without stopping it (`PR_SET_PDEATHSIG`):
//!   a CLI killed with SIGKILL must not leave a CMD running after its
//!   leadership or lock has expired.
//! - The status of a command that ended is its exit code, or 128 + the
//!   signal that killed it, as shells report it.

use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::os::unix::process::ExitStatusExt as _;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use etcd_registry::{Leadership, LockGuard, LostReason};
use futures::FutureExt as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

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

/// What a command supervised by [`Supervisor::run_held`] runs under: a
/// leadership or a held lock, and the lease it lives on.
pub trait Held {
    /// Resolves when the leadership or lock ended, no later than the lease deadline.
    fn lost(&self) -> impl Future<Output = LostReason>;
    /// Resolves once the lease deadline is less than `within` away, or passed.
    fn lease_expiring_within(&self, within: Duration) -> impl Future<Output = ()>;
    /// The local lease deadline; `None` once it passed or the lease is gone.
    fn lease_deadline(&self) -> Option<Instant>;
}

impl Held for Leadership {
    fn lost(&self) -> impl Future<Output = LostReason> {
        Leadership::lost(self)
    }
    fn lease_expiring_within(&self, within: Duration) -> impl Future<Output = ()> {
        Leadership::lease_expiring_within(self, within)
    }
    fn lease_deadline(&self) -> Option<Instant> {
        Leadership::lease_deadline(self)
    }
}

impl Held for LockGuard {
    fn lost(&self) -> impl Future<Output = LostReason> {
        LockGuard::lost(self)
    }
    fn lease_expiring_within(&self, within: Duration) -> impl Future<Output = ()> {
        LockGuard::lease_expiring_within(self, within)
    }
    fn lease_deadline(&self) -> Option<Instant> {
        LockGuard::lease_deadline(self)
    }
}

/// Why [`Supervisor::run_held`] stopped a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The leadership or lock ended (its key was deleted or replaced, the
    /// lease deadline passed, the lease was lost).
    Lost(LostReason),
    /// Keep-alives failed for so long that the lease deadline came within
    /// the grace period: the command was stopped while there was still time
    /// for a graceful stop.
    Expiring,
}

/// The largest `--grace` that a lease of `ttl` can honour: TTL/2 minus the
/// library's safety margin (250 ms + 2% of the TTL).
///
/// With healthy keep-alives (one every TTL/3, each pushing the local
/// deadline to its send time + TTL − margin), the deadline is never less
/// than 2/3·TTL − margin away, so a grace of at most TTL/2 − margin starts
/// a stop only once a keep-alive is at least TTL/6 overdue: a failure, not
/// a routine round trip. A longer grace would stop CMD in normal operation,
/// or could not be given before the deadline. TTL 10 s: 4.55 s; 3 s: 1.19 s;
/// 2 s: 0.71 s.
pub fn max_grace(ttl: Duration) -> Duration {
    let margin = Duration::from_millis(250) + ttl / 50;
    (ttl / 2).saturating_sub(margin)
}

/// The default `--grace` under a lease of `ttl`: 10 s, or [`max_grace`] if less.
pub fn default_grace(ttl: Duration) -> Duration {
    max_grace(ttl).min(Duration::from_secs(10))
}

/// A command line to run under supervision, and how long it may take to stop.
#[derive(Debug, Clone)]
pub struct Supervisor {
    argv: Vec<OsString>,
    grace: Duration,
}

/// What ends a stop early with SIGKILL: resolves with the reason to print.
type Hard<'a> = Pin<&'a mut dyn Future<Output = &'static str>>;

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

    /// Runs the command with `env` added to the CLI's environment while
    /// `held` lasts, until it exits, must stop, or a signal arrives through
    /// `shutdown`.
    ///
    /// - Once the lease deadline is less than the grace period away
    ///   (keep-alives failing), or `held` is lost: SIGTERM ([`Ended::Stopped`]).
    /// - At the lease deadline, or when the lease is gone: SIGKILL, whatever
    ///   the command is doing and whether or not it was asked to stop
    ///   already, so it never outlives the lease.
    /// - SIGINT/SIGTERM to the CLI are forwarded; SIGKILL follows after the
    ///   grace period, on a second signal, or at the lease deadline.
    ///
    /// Always waits for the command to end, so no command outlives this call.
    ///
    /// # Errors
    ///
    /// When the command cannot be started: exit status 127 if it was not
    /// found, 126 otherwise (as shells do), after saying why on stderr.
    pub async fn run_held(
        &self,
        env: &[(&str, String)],
        held: &(impl Held + Sync),
        shutdown: &mut Shutdown,
    ) -> CliResult<Ended<Stop>> {
        let grace = self.grace;
        let soft = async move {
            tokio::select! {
                biased;
                reason = held.lost() => Stop::Lost(reason),
                _ = held.lease_expiring_within(grace) => Stop::Expiring,
            }
        };
        let hard = async move {
            held.lease_expiring_within(Duration::ZERO).await;
            "the lease deadline passed"
        };
        let kill = format!(
            "SIGKILL after {} or at the lease deadline, whichever comes first",
            humantime::format_duration(grace)
        );
        let announce = |stop: &Stop, pid: i32| match stop {
            Stop::Expiring => {
                let left = held
                    .lease_deadline()
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or_default();
                tracing::info!(pid, deadline_in = ?left, "lease deadline within the grace period");
                format!(
                    "keep-alives are failing and the lease deadline is {} away: stopping the command (pid {pid}): SIGTERM, SIGKILL at the deadline at the latest",
                    humantime::format_duration(round_ms(left))
                )
            }
            Stop::Lost(_) => format!("stopping the command (pid {pid}): SIGTERM, {kill}"),
        };
        let hard: Hard<'_> = std::pin::pin!(hard);
        self.supervise(env, soft, announce, hard, &kill, shutdown, async |_| {})
            .await
    }

    /// Runs the command until it exits, `stop` resolves, or a signal arrives
    /// through `shutdown`. On SIGINT/SIGTERM it awaits `drain` (such as
    /// deregistering, then waiting for clients to notice) while CMD keeps
    /// running, and forwards the signal only then. A second signal cuts the
    /// drain short; a CMD that exits meanwhile ends it too.
    ///
    /// Always waits for the command to end (SIGKILL ends it at the latest
    /// after the grace period), so no command outlives this call.
    ///
    /// # Errors
    ///
    /// As [`run_held`](Self::run_held).
    pub async fn run_draining<R>(
        &self,
        env: &[(&str, String)],
        stop: impl Future<Output = R>,
        shutdown: &mut Shutdown,
        drain: impl AsyncFnOnce(Received),
    ) -> CliResult<Ended<R>> {
        let kill = format!("SIGKILL after {}", humantime::format_duration(self.grace));
        let announce =
            |_: &R, pid: i32| format!("stopping the command (pid {pid}): SIGTERM, {kill}");
        let hard: Hard<'_> = std::pin::pin!(std::future::pending::<&'static str>());
        self.supervise(env, stop, announce, hard, &kill, shutdown, drain)
            .await
    }

    /// The one loop behind both: `soft` resolving starts a stop (SIGTERM,
    /// announced by `announce`); `hard` resolving kills the command at once,
    /// in any phase; `kill` says when SIGKILL follows a forwarded signal.
    #[allow(clippy::too_many_arguments)]
    async fn supervise<R>(
        &self,
        env: &[(&str, String)],
        soft: impl Future<Output = R>,
        announce: impl FnOnce(&R, i32) -> String,
        mut hard: Hard<'_>,
        kill: &str,
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
        tokio::pin!(soft);
        tokio::select! {
            biased;
            status = child.wait() => Ok(Ended::Exited(Status(status?))),
            // `soft` resolves no later than `hard` (the lease deadline is
            // within any grace before it passes), so this branch starts every
            // stop; a `hard` already due kills at once, without SIGTERM.
            reason = &mut soft => {
                let status = match (&mut hard).now_or_never() {
                    Some(why) => kill_now(&mut child, group, why).await?,
                    None => {
                        say(announce(&reason, pid));
                        tracing::info!(pid, "stopping the command: SIGTERM");
                        signal_group(group, Signal::SIGTERM);
                        self.wait_grace(&mut child, group, shutdown, hard).await?
                    }
                };
                Ok(Ended::Stopped { reason, status })
            }
            signal = shutdown.recv() => {
                let drained = tokio::select! {
                    biased;
                    status = child.wait() => Some(Status(status?)),
                    why = &mut hard => Some(kill_now(&mut child, group, why).await?),
                    _ = drain(signal) => None,
                    _ = shutdown.recv() => {
                        say("second signal: forwarding it now");
                        None
                    }
                };
                if let Some(status) = drained {
                    return Ok(Ended::Signalled { signal, status });
                }
                say(format!("received {}; forwarding it to the command (pid {pid}), {kill}", signal.name()));
                signal_group(group, signal.0);
                let status = self.wait_grace(&mut child, group, shutdown, hard).await?;
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
    /// period, when `hard` resolves, or at once on another signal to the CLI.
    async fn wait_grace(
        &self,
        child: &mut Child,
        group: Pid,
        shutdown: &mut Shutdown,
        hard: Hard<'_>,
    ) -> CliResult<Status> {
        let grace = tokio::time::sleep(self.grace);
        tokio::pin!(grace);
        let killed = tokio::select! {
            biased;
            status = child.wait() => return Ok(Status(status?)),
            why = hard => why,
            _ = &mut grace => "still running after the grace period",
            _ = shutdown.recv() => "second signal",
        };
        kill_now(child, group, killed).await
    }
}

/// SIGKILL to the command's group, saying `why`; waits for the command.
async fn kill_now(child: &mut Child, group: Pid, why: &str) -> CliResult<Status> {
    say(format!("{why}: SIGKILL"));
    tracing::info!(pgid = group.as_raw(), why, "SIGKILL");
    signal_group(group, Signal::SIGKILL);
    Ok(Status(child.wait().await?))
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
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
