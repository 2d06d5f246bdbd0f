//! (b) Recovery: how long until every key of a registry is back after a
//! fault, seen by a raw client polling every 10 ms. Raw etcd-client has no
//! recovery of its own, so there is no baseline; the faults are alternated
//! sample by sample instead.

use std::time::Duration;

use etcd_registry::{Registry, RegistryState};
use etcd_registry_testkit::EtcdServer;

use crate::measure::{Hist, R, bounded, until_count};
use crate::report::Row;
use crate::{Ctx, connect, inst};

const POLL: Duration = Duration::from_millis(10);
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
enum Fault {
    WipedRestart,
    OutsideDelete,
    OutsideRevoke,
}

/// The smoke run fails here if the library stops healing: checked by hand
/// with the restore of deleted keys removed from the registry's
/// anti-entropy, when it failed with "9 keys, not 10, after 60s".
pub async fn recovery(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(10, 1);
    let warm = usize::from(!ctx.plan.smoke);
    let mut etcd = EtcdServer::builder().name("recovery").start().await?;
    let client = etcd.client().await?;
    let reg = connect(&etcd.endpoints(), "rec", 5).await?;
    let mut keep = Vec::new();
    for i in 0..10 {
        keep.push(reg.register(inst("rec", i)).await?);
    }
    let prefix = "/etcd_registry/rec/services/rec/";
    let faults = [
        (
            Fault::WipedRestart,
            "recovery_wiped",
            "recovery after a wiped restart",
        ),
        (
            Fault::OutsideDelete,
            "recovery_delete",
            "recovery after an outside delete of one key",
        ),
        (
            Fault::OutsideRevoke,
            "recovery_revoke",
            "recovery after an outside lease revoke",
        ),
    ];
    let mut hists: Vec<Hist> = faults.iter().map(|_| Hist::new()).collect();
    for i in 0..warm + n {
        for (f, (fault, ..)) in faults.iter().enumerate() {
            steady(&reg, &client, prefix).await?;
            let took = match fault {
                Fault::WipedRestart => {
                    // restart_wiped returns once etcd answers health: the clock starts there.
                    etcd.restart_wiped().await?;
                    until_count(&client, prefix, 10, POLL, LIMIT).await?
                }
                Fault::OutsideDelete => {
                    client
                        .clone()
                        .delete(format!("{prefix}id-{}", i % 10), None)
                        .await?;
                    until_count(&client, prefix, 10, POLL, LIMIT).await?
                }
                Fault::OutsideRevoke => {
                    let lease = reg.lease_id().ok_or("the registry holds no lease")?;
                    client.clone().lease_revoke(lease).await?;
                    until_count(&client, prefix, 10, POLL, LIMIT).await?
                }
            };
            if i >= warm {
                hists[f].record(took);
            }
        }
    }
    drop(keep);
    reg.close().await?;
    Ok(faults
        .iter()
        .zip(&hists)
        .map(|((_, id, title), h)| {
            Row::new(id, *title).latency(h.summary("all 10 keys back"), None)
        })
        .collect())
}

/// Before a fault: the registry is active and all 10 keys are in etcd.
async fn steady(reg: &Registry, client: &etcd_client::Client, prefix: &str) -> R<()> {
    let mut state = reg.state();
    bounded(
        "registry active",
        LIMIT,
        state.wait_for(|s| matches!(s, RegistryState::Active { .. })),
    )
    .await??;
    until_count(client, prefix, 10, POLL, LIMIT).await?;
    Ok(())
}
