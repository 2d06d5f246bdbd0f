//! Snapshots: save one with etcdctl, restore a member from one with
//! etcdutl (etcd 3.5+) or etcdctl (3.4).

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::{EtcdServer, peer_url};
use crate::{Error, Result};

impl EtcdServer {
    /// Saves a snapshot of this member's store to `path` (`etcdctl snapshot save`).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if etcdctl cannot be run or fails.
    pub async fn save_snapshot(&self, path: &Path) -> Result<()> {
        let out = self
            .etcdctl()
            .arg("snapshot")
            .arg("save")
            .arg(path)
            .output()
            .await?;
        if !out.status.success() {
            return Err(Error::Io(std::io::Error::other(format!(
                "etcdctl snapshot save failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))));
        }
        Ok(())
    }

    /// Replaces this member's store with the snapshot at `path`, as an
    /// operator restoring a backup does: stops etcd, restores the snapshot
    /// into a fresh data directory with the member's own name, peer URL and
    /// cluster token (so the cluster id stays the same), and starts it on the
    /// same ports. Keys, leases and revisions are those of the snapshot.
    /// Uses `etcdutl` (`$ETCDUTL_BIN`, or on `PATH`) when there is one, else
    /// `etcdctl snapshot restore`.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for a member of a multi-member cluster;
    /// [`Error::Io`] if the restore fails; otherwise as for
    /// [`restart`](Self::restart).
    pub async fn restore_snapshot(&mut self, path: &Path) -> Result<()> {
        if self.clustered {
            return Err(Error::Unsupported(format!(
                "restore_snapshot of member `{}` of a multi-member cluster",
                self.name
            )));
        }
        self.stop().await?;
        match std::fs::remove_dir_all(self.data_dir()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let peer = peer_url(self.peer_port);
        let tool = restore_tool();
        let out = tokio::process::Command::new(&tool)
            .env("ETCDCTL_API", "3")
            .arg("snapshot")
            .arg("restore")
            .arg(path)
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-token={}", self.cluster_token))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                Error::Io(std::io::Error::other(format!(
                    "could not run {} (install etcd's client tools: scripts/setup): {e}",
                    tool.display()
                )))
            })?;
        if !out.status.success() {
            return Err(Error::Io(std::io::Error::other(format!(
                "{} snapshot restore failed: {}",
                tool.display(),
                String::from_utf8_lossy(&out.stderr)
            ))));
        }
        self.spawn().await?;
        self.wait_healthy(Instant::now() + self.start_timeout.max(Duration::from_secs(10)))
            .await
    }
}

/// etcdutl where there is one (it took snapshot restore over in 3.5 and is
/// the only one in 3.6), else etcdctl.
fn restore_tool() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("ETCDUTL_BIN").filter(|v| !v.is_empty()) {
        return bin.into();
    }
    // Beside the etcdctl in use (the version matrix points ETCDCTL_BIN at it).
    if let Some(ctl) = std::env::var_os("ETCDCTL_BIN").filter(|v| !v.is_empty()) {
        let utl = Path::new(&ctl).with_file_name("etcdutl");
        if utl.is_file() {
            return utl;
        }
        return ctl.into();
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcdutl").is_file()))
        .unwrap_or(false);
    if on_path { "etcdutl" } else { "etcdctl" }.into()
}
