//! The Go library's README leader-election example, translated.
//!
//! Two registries stand for two nodes. Candidate 1 campaigns first and leads;
//! candidate 2 campaigns a second later and blocks until candidate 1 resigns,
//! then takes over. Leaders hold for 2 s (10 s and 5 s in the Go example), so
//! the example ends on its own in about 5 s.
//!
//! Uses the etcd at `ETCD_ENDPOINTS` (comma-separated) when set; otherwise it
//! starts a throwaway etcd through the testkit.
//!
//! ```text
//! cargo run -p etcd-registry --example election
//! ```

use std::time::Duration;

use etcd_registry::{Error, Registry};

const HOLD: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("warn").init();

    // Keep the throwaway server (if any) alive for the whole example; dropping it stops etcd.
    let (endpoints, _etcd) = etcd_registry_testkit::endpoints_from_env_or_start().await?;

    // Two separate registries to simulate two different nodes.
    let reg1 = Registry::builder()
        .endpoints(endpoints.clone())
        .connect()
        .await?;
    let reg2 = Registry::builder().endpoints(endpoints).connect().await?;

    // --- Candidate 1 ---
    let election1 = reg1.election("my-critical-task")?;
    let candidate1 = tokio::spawn(async move {
        // Campaign for leadership: this waits until leadership is won.
        let leadership = election1.campaign("candidate-1").await?;
        println!(
            "candidate-1: I am the leader! (fencing token {})",
            leadership.fencing_token()
        );

        // Hold leadership for a while, then resign.
        tokio::select! {
            _ = tokio::time::sleep(HOLD) => {}
            reason = leadership.lost() => println!("candidate-1: lost leadership early: {reason}"),
        }
        println!("candidate-1: Resigning from leadership.");
        leadership.resign().await?;
        Ok::<(), Error>(())
    });

    // --- Candidate 2 ---
    let election2 = reg2.election("my-critical-task")?;
    let candidate2 = tokio::spawn(async move {
        // Give candidate 1 a head start.
        tokio::time::sleep(Duration::from_secs(1)).await;

        println!("candidate-2: Campaigning for leadership...");
        let leadership = election2.campaign("candidate-2").await?;

        // This part only runs after candidate-1 has resigned.
        println!(
            "candidate-2: I am the leader now! (fencing token {})",
            leadership.fencing_token()
        );
        if let Some(leader) = election2.leader().await? {
            println!(
                "candidate-2: etcd agrees: the leader is {:?}",
                leader.proposal_str()
            );
        }
        tokio::time::sleep(HOLD).await;
        println!("candidate-2: Resigning from leadership.");
        leadership.resign().await?;
        Ok::<(), Error>(())
    });

    candidate1.await??;
    candidate2.await??;
    reg1.close().await?;
    reg2.close().await?;
    println!("Example finished.");
    Ok(())
}
