//! CMD's processes ([`Tree`]): found in `/proc`, signalled, reaped; and
//! the watchdog that kills CMD's group if the CLI dies first.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::say;

/// How often a stop looks at what is left of CMD.
pub(super) const POLL: Duration = Duration::from_millis(20);

/// Makes the CLI a child subreaper, once. `false` if the kernel refused.
pub(super) fn subreaper() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SET.get_or_init(|| match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "cannot become a child subreaper: a process of the command that leaves its process group is not stopped with it");
            false
        }
    })
}

/// One process, as `/proc/PID/stat` shows it.
#[derive(Clone, Copy, Debug)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    zombie: bool,
}

/// Every process of the system, from `/proc`. Processes that end while it
/// reads are left out.
fn procs() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
        let state = fields.next()?;
        let ppid = fields.next()?.parse().ok()?;
        let pgrp = fields.next()?.parse().ok()?;
        Some(Proc {
            pid,
            ppid,
            pgrp,
            zombie: state == "Z" || state == "X",
        })
    })
    .collect()
}

/// CMD's processes: its process group (whose id is the pid of its first
/// process, the leader), and the processes that left the group: with
/// `adopt`, every descendant of the CLI but the watchdog (the CLI is a
/// subreaper with no other children, so orphans of CMD come back to it);
/// without, the descendants of the leader while it lives.
pub(super) struct Tree {
    pub(super) leader: i32,
    adopt: bool,
    me: i32,
    watchdog: Option<Watchdog>,
}

impl Tree {
    pub(super) fn new(leader: i32, adopt: bool) -> Tree {
        Tree {
            leader,
            adopt,
            me: std::process::id().cast_signed(),
            watchdog: Watchdog::spawn(leader),
        }
    }

    fn watchdog_pid(&self) -> Option<i32> {
        self.watchdog.as_ref().map(|w| w.pid)
    }

    /// The processes of CMD now, zombies included, the CLI never.
    fn members(&self) -> Vec<Proc> {
        let all = procs();
        let root = if self.adopt { self.me } else { self.leader };
        let mut tree = std::collections::HashSet::from([root]);
        // Parents before children is not an order /proc promises: repeat
        // until nothing is added (bounded by the number of processes).
        for _ in 0..all.len() {
            let before = tree.len();
            for p in &all {
                if tree.contains(&p.ppid) && Some(p.pid) != self.watchdog_pid() {
                    tree.insert(p.pid);
                }
            }
            if tree.len() == before {
                break;
            }
        }
        all.into_iter()
            .filter(|p| p.pid != self.me && (p.pgrp == self.leader || tree.contains(&p.pid)))
            .collect()
    }

    /// Reaps the zombies of CMD that are the CLI's children (orphans
    /// re-parented to it as a subreaper), but not the leader, whose status
    /// is tokio's to collect, nor the watchdog.
    pub(super) fn reap(&self) {
        if !self.adopt {
            return;
        }
        for p in self.members() {
            if p.zombie
                && p.ppid == self.me
                && p.pid != self.leader
                && Some(p.pid) != self.watchdog_pid()
            {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(p.pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
        }
    }

    /// The pids of CMD's processes that have not exited, after reaping.
    pub(super) fn remaining(&self) -> Vec<i32> {
        self.reap();
        self.members()
            .into_iter()
            .filter(|p| !p.zombie)
            .map(|p| p.pid)
            .collect()
    }

    /// Resolves once nothing of CMD is left (its zombies reaped).
    pub(super) async fn gone(&self) {
        while !self.remaining().is_empty() {
            tokio::time::sleep(POLL).await;
        }
        self.reap();
    }

    /// Waits for the leader, reaping CMD's orphans as they end meanwhile,
    /// so that a long-running CMD does not fill the CLI with zombies.
    pub(super) async fn wait_leader(&self, child: &mut Child) -> std::io::Result<ExitStatus> {
        let mut chld = match self.adopt {
            true => tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok(),
            false => None,
        };
        loop {
            tokio::select! {
                status = child.wait() => return status,
                Some(()) = async { chld.as_mut()?.recv().await } => self.reap(),
            }
        }
    }

    /// Sends `signal` to the group, and to each process that left it.
    pub(super) fn signal(&self, signal: Signal) {
        match killpg(Pid::from_raw(self.leader), signal) {
            // ESRCH: the group is gone already.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(%error, %signal, pgid = self.leader, "cannot signal the command")
            }
        }
        for p in self.members() {
            if p.pgrp != self.leader && !p.zombie {
                match nix::sys::signal::kill(Pid::from_raw(p.pid), signal) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(error) => {
                        tracing::warn!(%error, %signal, pid = p.pid, "cannot signal a process of the command")
                    }
                }
            }
        }
    }

    /// CMD is gone: the watchdog may go too, without killing anything.
    pub(super) async fn disarm(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm().await;
        }
    }
}

/// Kills CMD's group with SIGKILL if the CLI dies first: a `/bin/sh` in a
/// group of its own (so that a terminal's Ctrl-C or `timeout`'s group
/// signal does not reach it; it ignores them anyway) that reads its stdin,
/// a pipe whose only writer is the CLI. The CLI says `done` once CMD is
/// gone; if the pipe closes without it (the CLI died), the watchdog kills
/// the group.
struct Watchdog {
    child: Child,
    pid: i32,
}

const WATCHDOG: &str = r#"trap '' INT TERM HUP QUIT PIPE
read -r word
[ "$word" = done ] || kill -s KILL -- "-$1" 2>/dev/null"#;

impl Watchdog {
    fn spawn(pgid: i32) -> Option<Watchdog> {
        let spawned = Command::new("/bin/sh")
            .args(["-c", WATCHDOG, "etcd-registry-watchdog", &pgid.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false)
            .spawn();
        match spawned {
            Ok(child) => {
                let pid = child.id().and_then(|id| i32::try_from(id).ok())?;
                Some(Watchdog { child, pid })
            }
            Err(error) => {
                tracing::warn!(%error, pgid, "cannot start the watchdog (/bin/sh)");
                say(format!(
                    "cannot start the watchdog (/bin/sh: {error}): if the CLI is killed, the command's other processes are not"
                ));
                None
            }
        }
    }

    async fn disarm(mut self) {
        use tokio::io::AsyncWriteExt as _;
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"done\n").await;
        }
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(pid = self.pid, "the watchdog did not exit; killing it");
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
        }
    }
}
