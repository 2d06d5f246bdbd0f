//! `lock NAME [--timeout D] [-- CMD]`: hold a lock, and run CMD only while
//! holding it.
//!
//! A lost lock is not acquired again: the lock guards one run of a critical
//! section, and running CMD a second time after someone else may have run
//! theirs in between is not what `lock -- CMD` promises. A loss stops CMD
//! (through the supervisor, as `campaign -- CMD` does) and exits 1, like
//! `campaign --once`; a caller that wants another attempt runs the CLI again.
//!
//! The safety of it rests on the lease deadline, which the library tracks
//! locally and which comes before etcd could expire the lease: the
//! supervisor sends SIGTERM once the deadline is less than `--grace` away
//! and SIGKILL at the deadline at the latest (see `supervise.rs`). The lock
//! is released only once CMD's whole process group is gone: what CMD's first
//! process leaves running when it exits is stopped first (SIGTERM, SIGKILL
//! after `--grace` or at the deadline).

use std::time::Duration;

use etcd_registry::{Error, Lock, LockGuard, LostReason, Registry};

use crate::common::error::{CliError, CliResult};
use crate::common::output::{lease_hex, line};
use crate::common::shutdown::{Received, Shutdown};
use crate::supervise::{Ended, Stop, Supervisor, say};

/// One `lock` invocation.
pub struct Run {
    pub name: String,
    /// Give up (exit 1) when the lock is not acquired within this long.
    pub timeout: Option<Duration>,
    /// `None`: hold the lock until SIGINT/SIGTERM.
    pub supervisor: Option<Supervisor>,
}

impl Run {
    /// Acquires the lock, holds it (running CMD, if any), releases it, and
    /// returns how the CLI should exit.
    pub async fn run(&self, registry: &Registry, shutdown: &mut Shutdown) -> CliResult {
        let lock = registry.lock(&self.name)?;
        // With CMD, stdout belongs to CMD: the CLI's own lines go to stderr.
        let tell = |message: String| match self.supervisor {
            Some(_) => {
                say(message);
                Ok(())
            }
            None => line(&message),
        };
        tell(format!("waiting for the lock {}", lock.etcd_name()))?;
        let guard = match self.acquire(&lock, shutdown).await? {
            Acquired::Held(guard) => guard,
            Acquired::TimedOut(timeout) => {
                return Err(CliError::msg(format!(
                    "the lock {} was not acquired within {}",
                    lock.etcd_name(),
                    humantime::format_duration(timeout)
                ))
                .with_hint("another holder has it; see `etcd-registry status`"));
            }
            Acquired::Interrupted(signal) => {
                // The dropped acquisition withdrew its key. Not 0: a script
                // running `lock NAME -- CMD && next` must not go on as if CMD ran.
                tell(format!(
                    "received {} while waiting; the lock was not acquired",
                    signal.name()
                ))?;
                return Err(CliError::Exit(signal_status(signal)));
            }
        };
        let token = guard.fencing_token();
        let lease = lease_hex(guard.lease_id());
        let result = match &self.supervisor {
            None => {
                line(&format!("locked (fencing token {token}, lease {lease})"))?;
                hold(&guard, shutdown).await
            }
            Some(supervisor) => {
                say(format!(
                    "locked (fencing token {token}, lease {lease}); starting `{}`",
                    supervisor.display()
                ));
                let env = [
                    ("ETCD_REGISTRY_FENCING_TOKEN", token.to_string()),
                    ("ETCD_REGISTRY_LOCK", self.name.clone()),
                    ("ETCD_REGISTRY_LEASE_ID", lease),
                ];
                supervise(supervisor, &guard, &env, shutdown).await
            }
        };
        // Harmless after a loss: the delete is conditional on our key's
        // create revision, so it never deletes a successor's key.
        let held = guard.is_held();
        match guard.release().await {
            Ok(()) if held => tell("released".to_owned())?,
            Ok(()) => {}
            // Closing the registry revokes the lease, which deletes the key anyway.
            Err(error) => tell(format!("could not release: {error}"))?,
        }
        result
    }

    async fn acquire(&self, lock: &Lock, shutdown: &mut Shutdown) -> CliResult<Acquired> {
        // Dropping an acquisition (on a signal) withdraws its key.
        let acquired = async {
            match self.timeout {
                Some(timeout) => Ok(match lock.acquire_timeout(timeout).await? {
                    Some(guard) => Acquired::Held(guard),
                    None => Acquired::TimedOut(timeout),
                }),
                None => Ok(Acquired::Held(lock.acquire().await?)),
            }
        };
        tokio::select! {
            acquired = acquired => acquired.map_err(|e: Error| CliError::from(e).context("acquiring the lock")),
            signal = shutdown.recv() => Ok(Acquired::Interrupted(signal)),
        }
    }
}

enum Acquired {
    Held(LockGuard),
    TimedOut(Duration),
    Interrupted(Received),
}

/// Without CMD: holds the lock until a signal (exit 0) or a loss (exit 1).
async fn hold(guard: &LockGuard, shutdown: &mut Shutdown) -> CliResult {
    tokio::select! {
        reason = guard.lost() => Err(lost(reason)),
        signal = shutdown.recv() => line(&format!("received {}; releasing", signal.name())),
    }
}

/// With CMD: runs it while the lock is held, and returns CMD's status, or
/// exit 1 when the lock was lost.
async fn supervise(
    supervisor: &Supervisor,
    guard: &LockGuard,
    env: &[(&str, String)],
    shutdown: &mut Shutdown,
) -> CliResult {
    if let Some(reason) = guard.lost_reason() {
        // Lost between the acquisition and now: do not start CMD only to stop it.
        say("the lock was lost before the command started");
        return Err(lost(reason));
    }
    match supervisor.run_held(env, guard, shutdown).await? {
        Ended::Exited(status) => {
            say(format!("the command {status}; releasing"));
            status.into_result()
        }
        Ended::Signalled { signal, status } => {
            say(format!(
                "the command {status} after {}; releasing",
                signal.name()
            ));
            status.into_result()
        }
        Ended::Stopped { reason, status } => match (reason, guard.lost_reason()) {
            (Stop::Lost(reason), _) | (Stop::Expiring, Some(reason)) => {
                say(format!("{}; the command {status}", Error::LockLost(reason)));
                Err(lost(reason))
            }
            (Stop::Expiring, None) => {
                say(format!(
                    "the lock is about to expire (keep-alives failing); the command {status}"
                ));
                Err(CliError::msg(
                    "the lock was about to expire: keep-alives failing",
                ))
            }
        },
    }
}

fn lost(reason: LostReason) -> CliError {
    CliError::msg(Error::LockLost(reason).to_string())
}

/// 128 + the signal, as shells report a command that a signal ended.
fn signal_status(signal: Received) -> u8 {
    u8::try_from(128 + signal.0 as i32).unwrap_or(1)
}
