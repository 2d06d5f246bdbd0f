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
//! - CMD's first process exiting does not end the stop: whatever it
//!   started and left running is CMD too ([`Tree`]). The supervisor returns
//!   (and the lock is released, the leadership resigned, the instance
//!   deregistered) only once CMD's whole process group is gone: what is
//!   left gets SIGTERM, then SIGKILL after the grace period or at the lease
//!   deadline, whichever comes first.
//! - Under a leadership or a lock, the CLI is also a child subreaper
//!   (`PR_SET_CHILD_SUBREAPER`): a process of CMD that left the group
//!   (`setsid`, `setpgid`, a daemon's double fork) is re-parented to the
//!   CLI rather than to init when its parent exits, so it is still found,
//!   stopped and reaped as one of CMD's. (Not for `register -- CMD`, whose
//!   health-check commands are children of the CLI too.)
//! - CMD is killed if the CLI dies without stopping it: its first process
//!   by `PR_SET_PDEATHSIG`, and its whole group by a watchdog (a `/bin/sh`
//!   child of the CLI, in a group of its own, that sends SIGKILL to CMD's
//!   group when its stdin, the CLI's end of a pipe, closes without a word):
//!   a CLI killed with SIGKILL must not leave CMD running after its
//!   leadership or lock has expired.
//! - The status of a command that ended is its exit code, or 128 + the
//!   signal that killed it, as shells report it.
//!
//! Limits, honestly: a process that left CMD's group is signalled by pid,
//! found in `/proc` (a pid freed and reused between the scan and the
//! signal, a window of microseconds, would be signalled by mistake); when
//! the CLI itself is killed with SIGKILL, only CMD's group is killed (the
//! watchdog cannot know the processes that left it, and they are
//! re-parented away from the dead CLI); outside a leadership or a lock, a
//! process that left the group and whose parent exited is no longer
//! known; a process stuck in the kernel (state D) outlives SIGKILL for as
//! long as it is stuck: the supervisor waits 10 s for it and then goes on,
//! with a warning.

use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::os::unix::process::ExitStatusExt as _;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use etcd_registry::{Leadership, LockGuard, LostReason};
use futures::FutureExt as _;
use futures::future::Fuse;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::common::error::{CliError, CliResult};
use crate::common::shutdown::{Received, Shutdown};

mod tree;
use tree::{POLL, Tree, subreaper};

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
    /// Always waits for the command to end, and for everything it started
    /// (its process group, and the descendants that left it: the CLI
    /// becomes a child subreaper), which gets SIGTERM once the command's
    /// first process ended and SIGKILL after the grace period or at the
    /// lease deadline: nothing of the command outlives this call, so the
    /// caller may release or resign once it returns.
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
        self.supervise(
            env,
            subreaper(),
            soft,
            announce,
            hard,
            &kill,
            shutdown,
            async |_| {},
        )
        .await
    }

    /// Runs the command until it exits, `stop` resolves, or a signal arrives
    /// through `shutdown`. On SIGINT/SIGTERM it awaits `drain` (such as
    /// deregistering, then waiting for clients to notice) while CMD keeps
    /// running, and forwards the signal only then. A second signal cuts the
    /// drain short; a CMD that exits meanwhile ends it too.
    ///
    /// Always waits for the command to end, and for its process group
    /// (SIGKILL ends them at the latest after the grace period), so no
    /// command outlives this call.
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
        self.supervise(env, false, stop, announce, hard, &kill, shutdown, drain)
            .await
    }

    /// The one loop behind both: `soft` resolving starts a stop (SIGTERM,
    /// announced by `announce`); `hard` resolving kills the command at once,
    /// in any phase; `kill` says when SIGKILL follows a forwarded signal.
    /// `adopt`: the CLI is a child subreaper and has no other children than
    /// CMD's processes (see [`Tree`]).
    ///
    /// Returns once CMD's whole tree is gone, whichever way it ended.
    #[allow(clippy::too_many_arguments)]
    async fn supervise<R>(
        &self,
        env: &[(&str, String)],
        adopt: bool,
        soft: impl Future<Output = R>,
        announce: impl FnOnce(&R, i32) -> String,
        hard: Hard<'_>,
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
        let mut tree = Tree::new(pid, adopt);
        tracing::info!(pid, command = %self.display(), "command started");
        // Fused: polled again after it resolved, it stays pending.
        let mut hard = hard.fuse();
        let ended = self
            .stop(
                &mut child, &tree, soft, announce, &mut hard, kill, shutdown, drain,
            )
            .await;
        // Whatever ended the first process (or failed), the rest goes too.
        let finished = self.finish(&mut child, &tree, shutdown, &mut hard).await;
        tree.disarm().await;
        let ended = ended?;
        finished?;
        Ok(ended)
    }

    /// Until CMD's first process ended: by itself, or stopped.
    #[allow(clippy::too_many_arguments)]
    async fn stop<R>(
        &self,
        child: &mut Child,
        tree: &Tree,
        soft: impl Future<Output = R>,
        announce: impl FnOnce(&R, i32) -> String,
        hard: &mut Fuse<Hard<'_>>,
        kill: &str,
        shutdown: &mut Shutdown,
        drain: impl AsyncFnOnce(Received),
    ) -> CliResult<Ended<R>> {
        let pid = tree.leader;
        tokio::pin!(soft);
        tokio::select! {
            biased;
            status = tree.wait_leader(child) => Ok(Ended::Exited(Status(status?))),
            // `soft` resolves no later than `hard` (the lease deadline is
            // within any grace before it passes), so this branch starts every
            // stop; a `hard` already due kills at once, without SIGTERM.
            reason = &mut soft => {
                let status = match hard.now_or_never() {
                    Some(why) => kill_now(child, tree, why).await?,
                    None => {
                        say(announce(&reason, pid));
                        tracing::info!(pid, "stopping the command: SIGTERM");
                        tree.signal(Signal::SIGTERM);
                        self.wait_grace(child, tree, shutdown, hard).await?
                    }
                };
                Ok(Ended::Stopped { reason, status })
            }
            signal = shutdown.recv() => {
                let drained = tokio::select! {
                    biased;
                    status = tree.wait_leader(child) => Some(Status(status?)),
                    why = &mut *hard => Some(kill_now(child, tree, why).await?),
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
                tree.signal(signal.0);
                let status = self.wait_grace(child, tree, shutdown, hard).await?;
                Ok(Ended::Signalled { signal, status })
            }
        }
    }

    /// Once CMD's first process has ended: stops what it left running
    /// (SIGTERM, then SIGKILL after the grace period, when `hard` resolves
    /// or on a signal to the CLI) and waits until nothing of it is left.
    async fn finish(
        &self,
        child: &mut Child,
        tree: &Tree,
        shutdown: &mut Shutdown,
        hard: &mut Fuse<Hard<'_>>,
    ) -> CliResult<()> {
        // The first process, first: its status must not be reaped by anyone but tokio.
        child.wait().await?;
        let left = tree.remaining();
        if left.is_empty() {
            return Ok(());
        }
        let pids: Vec<String> = left.iter().map(ToString::to_string).collect();
        say(format!(
            "the command's first process ended, but {} it started {} still running (pid {}): \
             SIGTERM, SIGKILL after {} or at the lease deadline, whichever comes first",
            if left.len() == 1 {
                "a process"
            } else {
                "processes"
            },
            if left.len() == 1 { "is" } else { "are" },
            pids.join(", "),
            humantime::format_duration(self.grace),
        ));
        tracing::info!(pgid = tree.leader, pids = ?left, "stopping what the command left running: SIGTERM");
        tree.signal(Signal::SIGTERM);
        let grace = tokio::time::sleep(self.grace);
        tokio::pin!(grace);
        let why = tokio::select! {
            biased;
            () = tree.gone() => return Ok(()),
            why = hard => why,
            _ = &mut grace => "still running after the grace period",
            _ = shutdown.recv() => "signal received",
        };
        kill_now(child, tree, why).await.map(drop)
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
                // It is not inherited across fork: the watchdog covers the rest
                // of the group.
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

    /// Waits for a command that was asked to stop, its first process and
    /// everything it started: SIGKILL after the grace period, when `hard`
    /// resolves, or at once on another signal to the CLI.
    async fn wait_grace(
        &self,
        child: &mut Child,
        tree: &Tree,
        shutdown: &mut Shutdown,
        hard: &mut Fuse<Hard<'_>>,
    ) -> CliResult<Status> {
        let grace = tokio::time::sleep(self.grace);
        tokio::pin!(grace);
        let killed = {
            let ended = async {
                let status = tree.wait_leader(child).await?;
                tree.gone().await;
                Ok::<_, std::io::Error>(status)
            };
            tokio::select! {
                biased;
                status = ended => return Ok(Status(status?)),
                why = hard => why,
                _ = &mut grace => "still running after the grace period",
                _ = shutdown.recv() => "second signal",
            }
        };
        kill_now(child, tree, killed).await
    }
}

/// How long processes killed with SIGKILL get to disappear before the
/// supervisor gives up on them, with a warning (a process stuck in the
/// kernel outlives SIGKILL for as long as it is stuck).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// SIGKILL to CMD's tree, saying `why`; waits for its first process, and
/// for the rest for up to [`KILL_WAIT`].
async fn kill_now(child: &mut Child, tree: &Tree, why: &str) -> CliResult<Status> {
    say(format!("{why}: SIGKILL"));
    tracing::info!(pgid = tree.leader, why, "SIGKILL");
    tree.signal(Signal::SIGKILL);
    let status = tree.wait_leader(child).await?;
    let gone = async {
        // SIGKILL again on every look: a process forked by one that was
        // not yet in the last look (outside the group) gets it too.
        while !tree.remaining().is_empty() {
            tree.signal(Signal::SIGKILL);
            tokio::time::sleep(POLL).await;
        }
        tree.reap();
    };
    if tokio::time::timeout(KILL_WAIT, gone).await.is_err() {
        let left = tree.remaining();
        tracing::warn!(pgid = tree.leader, pids = ?left, "processes of the command survived SIGKILL for {KILL_WAIT:?}; going on without them");
        say(format!(
            "processes of the command survived SIGKILL for {}: {left:?}; going on",
            humantime::format_duration(KILL_WAIT)
        ));
    }
    Ok(Status(status))
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
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
