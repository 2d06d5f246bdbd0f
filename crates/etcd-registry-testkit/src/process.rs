//! Process plumbing: finding the binary, spawning children that die with the
//! test process, free loopback ports, temporary directories and log tails.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, Once, PoisonError, mpsc};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::{Error, Result};

/// Prefix of every temporary directory the testkit creates; followed by the pid.
const TEMP_PREFIX: &str = "etcd-testkit-";

/// Locks a mutex, ignoring poisoning: the data guarded here stays consistent
/// even if a panicking test held the lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Finds the etcd executable: the explicit path, else `$ETCD_BIN`, else `etcd` on `PATH`.
pub(crate) fn resolve_etcd(explicit: Option<&Path>) -> Result<PathBuf> {
    let (name, origin) = match explicit {
        Some(p) => (p.to_path_buf(), "as set by EtcdServerBuilder::binary"),
        None => match std::env::var_os("ETCD_BIN").filter(|v| !v.is_empty()) {
            Some(v) => (PathBuf::from(v), "from ETCD_BIN"),
            None => (PathBuf::from("etcd"), "on PATH"),
        },
    };
    find_executable(&name).ok_or(Error::BinaryNotFound {
        binary: name,
        origin,
    })
}

/// Resolves a name the way a shell would: a name with a `/` is a path, anything
/// else is searched on `PATH`.
fn find_executable(name: &Path) -> Option<PathBuf> {
    let is_exe = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.components().count() > 1 || name.is_absolute() {
        return is_exe(name).then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_exe(p))
}

struct SpawnRequest {
    cmd: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

/// Spawns `cmd` so that the child is SIGKILLed when the test process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, and
/// test threads come and go with each test. All children are therefore forked
/// by one long-lived thread that only exits with the process.
pub(crate) async fn spawn(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec; it only makes two
    // async-signal-safe syscalls and builds io::Errors from raw codes (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died between fork and prctl.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, rx) = oneshot::channel();
    spawner()?
        .send(SpawnRequest { cmd, reply })
        .map_err(|_| io::Error::other("testkit spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("testkit spawner thread dropped the request"))?
}

fn spawner() -> io::Result<mpsc::Sender<SpawnRequest>> {
    let mut guard = lock(&SPAWNER);
    if let Some(tx) = guard.as_ref() {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("etcd-testkit-spawner".into())
        .spawn(move || {
            // The sender lives in a static, so this loop only ends with the process.
            for SpawnRequest { mut cmd, reply } in rx {
                let result = cmd.spawn();
                if let Err(Ok(mut orphan)) = reply.send(result) {
                    // The caller went away (cancelled); do not leak the child.
                    let _ = orphan.kill();
                    let _ = orphan.wait();
                }
            }
        })?;
    *guard = Some(tx.clone());
    Ok(tx)
}

/// Sends `sig` to `pid`.
pub(crate) fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(io::Error::other)?;
    nix::sys::signal::kill(Pid::from_raw(pid), sig).map_err(io::Error::from)
}

/// Waits (up to `limit`) until every thread of `pid` is stopped. SIGSTOP
/// returns before a busy multi-threaded process has stopped all its threads,
/// and a thread still running could answer a request sent right after.
pub(crate) fn wait_stopped(pid: u32, limit: Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut all_stopped = true;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name: "T" or "t" is stopped.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            all_stopped &= matches!(state, Some('T' | 't'));
        }
        if all_stopped {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "process {pid} did not stop within {limit:?} of SIGSTOP"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

static PORTS_HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that was free a moment ago and has not been handed out by
/// this process before (so two servers of one test binary never race for it).
pub(crate) fn free_port() -> io::Result<u16> {
    let mut used = lock(&PORTS_HANDED_OUT);
    let used = used.get_or_insert_with(HashSet::new);
    for _ in 0..64 {
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if used.insert(port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "no fresh loopback port found",
    ))
}

/// A fresh temporary directory, removed when the returned value is dropped.
///
/// Servers kept in statics are never dropped, so their directories (with a
/// 64 MB pre-allocated WAL each) would pile up. The first call in a process
/// therefore removes directories left behind by testkit processes that no
/// longer exist.
pub(crate) fn temp_dir() -> io::Result<tempfile::TempDir> {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep_stale_dirs);
    tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .tempdir()
}

fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::debug!(dir = ?entry.path(), pid, "removing stale testkit directory");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
