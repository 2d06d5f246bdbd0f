//! `dev`: a throwaway local etcd until Ctrl-C.

use std::time::Duration;

use etcd_registry_testkit::EtcdServer;

use crate::common::error::{CliError, CliResult};
use crate::common::output::line;
use crate::common::shutdown::Shutdown;

pub async fn run() -> CliResult {
    let shutdown = Shutdown::listen()?;
    let mut server = EtcdServer::builder()
        .name("etcd-registry-dev")
        .start()
        .await
        .map_err(|e| CliError::from(e).context("starting etcd"))?;
    let endpoint = server.endpoint();
    line(&endpoint)?;
    line(&format!("export ETCD_ENDPOINTS={endpoint}"))?;
    eprintln!(
        "etcd is running (pid {}, data in a temporary directory); Ctrl-C stops it and deletes the data",
        server.pid().unwrap_or_default()
    );
    let signalled = shutdown.signalled();
    tokio::pin!(signalled);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut signalled => break,
            _ = check.tick() => {
                if !server.is_running() {
                    return Err(CliError::msg(format!(
                        "etcd exited on its own; last lines of its log:\n{}",
                        server.log_tail(20)
                    )));
                }
            }
        }
    }
    server
        .stop()
        .await
        .map_err(|e| CliError::from(e).context("stopping etcd"))?;
    eprintln!("etcd stopped");
    Ok(())
}
