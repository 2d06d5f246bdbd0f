//! (a) Election handover: how fast leadership moves from c1 to a waiting
//! c2, ours against etcd's server-side election API (etcd-client's
//! election client), with the same choreography, alternated sample by sample.

use std::time::{Duration, Instant};

use etcd_client::{Client, ResignOptions};

use crate::measure::{Hist, R, bounded, until_count};
use crate::report::Row;
use crate::{Ctx, connect};

const OP: Duration = Duration::from_secs(30);

/// etcd 3.4 syncs watchers that start at an old revision only every 100 ms;
/// waiting this long after c2's key is visible keeps that timer out of the figure.
const SETTLE: Duration = Duration::from_millis(250);

pub async fn handover(ctx: Ctx) -> R<Vec<Row>> {
    let n = ctx.plan.n(50, 2);
    let warm = if ctx.plan.smoke { 1 } else { 5 };
    let client = ctx.main.client().await?;
    let r1 = connect(&ctx.main.endpoints(), "elect", 60).await?;
    let r2 = connect(&ctx.main.endpoints(), "elect", 60).await?;
    let e1 = r1.election("handover")?;
    let e2 = r2.election("handover")?;
    let ours_prefix = format!("{}/", e1.etcd_name());

    let raw_name = "/raw/elect/handover";
    let raw_prefix = format!("{raw_name}/");
    let mut ec1 = client.election_client();
    let lease1 = client.clone().lease_grant(600, None).await?.id();
    let lease2 = client.clone().lease_grant(600, None).await?.id();

    let (mut ours, mut raw) = (Hist::new(), Hist::new());
    for i in 0..warm + n {
        // Ours: c1 leads, c2 waits in its own task.
        let l1 = bounded("c1 campaign", OP, e1.campaign("c1")).await??;
        let e2c = e2.clone();
        let c2 = tokio::spawn(async move { e2c.campaign("c2").await });
        candidates(&client, &ours_prefix).await?;
        tokio::time::sleep(SETTLE).await;
        let t = Instant::now();
        bounded("c1 resign", OP, l1.resign()).await??;
        let l2 = bounded("c2 campaign", OP, c2).await???;
        let d = t.elapsed();
        bounded("c2 resign", OP, l2.resign()).await??;

        // etcd's election API: Campaign blocks on the server until elected.
        let led = bounded("raw c1 campaign", OP, ec1.campaign(raw_name, "c1", lease1)).await??;
        let k1 = led
            .leader()
            .cloned()
            .ok_or("campaign answered no leader key")?;
        let mut ec2 = client.election_client();
        let c2 = tokio::spawn(async move { ec2.campaign(raw_name, "c2", lease2).await });
        candidates(&client, &raw_prefix).await?;
        tokio::time::sleep(SETTLE).await;
        let t = Instant::now();
        bounded(
            "raw c1 resign",
            OP,
            ec1.resign(Some(ResignOptions::new().with_leader(k1))),
        )
        .await??;
        let led2 = bounded("raw c2 campaign", OP, c2).await???;
        let dr = t.elapsed();
        let k2 = led2
            .leader()
            .cloned()
            .ok_or("campaign answered no leader key")?;
        bounded(
            "raw c2 resign",
            OP,
            ec1.resign(Some(ResignOptions::new().with_leader(k2))),
        )
        .await??;

        if i >= warm {
            ours.record(d);
            raw.record(dr);
        }
    }
    r1.close().await?;
    r2.close().await?;
    for lease in [lease1, lease2] {
        client.clone().lease_revoke(lease).await?;
    }
    Ok(vec![
        Row::new(
            "handover",
            "election handover (resign → next campaign returns)",
        )
        .latency(
            ours.summary("Leadership::resign → Election::campaign"),
            Some(raw.summary("etcd election API (Resign → Campaign)")),
        ),
    ])
}

/// Waits until both candidates' keys are in etcd.
async fn candidates(client: &Client, prefix: &str) -> R<()> {
    until_count(
        client,
        prefix,
        2,
        Duration::from_millis(5),
        Duration::from_secs(20),
    )
    .await
    .map(|_| ())
}
