//! `campaign ELECTION PROPOSAL -- CMD`: run CMD only while leading.
//!
//! The safety of it rests on the lease deadline, which the library tracks
//! locally and which comes before etcd could expire the lease: the
//! supervisor sends SIGTERM once the deadline is less than `--grace` away
//! and SIGKILL at the deadline at the latest (see `supervise.rs`), so no CMD
//! runs beside a rival's. The leadership is resigned only once CMD's whole
//! process group is gone: what CMD's first process leaves running when it
//! exits is stopped first (SIGTERM, SIGKILL after `--grace` or at the
//! deadline).

use std::time::Duration;

use backon::BackoffBuilder as _;
use etcd_registry::{Election, Error, Leadership};

use crate::common::error::{CliError, CliResult};
use crate::common::output::lease_hex;
use crate::common::shutdown::Shutdown;
use crate::supervise::{Ended, Stop, Supervisor, say};

/// One `campaign -- CMD` invocation.
pub struct Run {
    pub election: Election,
    pub proposal: String,
    /// Exit 1 on a loss instead of campaigning again.
    pub once: bool,
    pub supervisor: Supervisor,
}

impl Run {
    /// Campaigns, runs CMD while leading, and returns how the CLI should exit.
    pub async fn run(&self, shutdown: &mut Shutdown) -> CliResult {
        let mut backoff = retry_delays();
        loop {
            say(format!(
                "campaigning in {} as {:?}",
                self.election.etcd_name(),
                self.proposal
            ));
            // Dropping the campaign future (on a signal) withdraws the candidacy.
            let won = tokio::select! {
                won = self.election.campaign(self.proposal.as_str()) => won,
                signal = shutdown.recv() => {
                    say(format!("received {} while campaigning; withdrawing", signal.name()));
                    return Ok(());
                }
            };
            let leadership = match won {
                Ok(leadership) => leadership,
                Err(Error::Closed) => return Err(CliError::msg("the registry was closed")),
                Err(error) => {
                    let delay = backoff.next().unwrap_or(MAX_DELAY);
                    say(format!(
                        "campaign failed: {error}; campaigning again in {}",
                        humantime::format_duration(round_ms(delay))
                    ));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        signal = shutdown.recv() => {
                            say(format!("received {}; exiting", signal.name()));
                            return Ok(());
                        }
                    }
                }
            };
            backoff = retry_delays();
            if let Some(exit) = self.lead(&leadership, shutdown).await? {
                return exit;
            }
        }
    }

    /// Runs CMD under `leadership`. `None` means: campaign again.
    async fn lead(
        &self,
        leadership: &Leadership,
        shutdown: &mut Shutdown,
    ) -> CliResult<Option<CliResult>> {
        if let Some(reason) = leadership.lost_reason() {
            // Lost between the win and now: do not start CMD only to stop it.
            say(format!(
                "leadership lost before the command started ({reason})"
            ));
            resign(leadership).await;
            return Ok(self
                .once
                .then(|| Err(CliError::msg(format!("leadership lost: {reason}")))));
        }
        let token = leadership.fencing_token();
        let lease = lease_hex(leadership.lease_id());
        say(format!(
            "leader (fencing token {token}, lease {lease}); starting `{}`",
            self.supervisor.display()
        ));
        let env = [
            ("ETCD_REGISTRY_FENCING_TOKEN", token.to_string()),
            ("ETCD_REGISTRY_ELECTION", self.election.name().to_owned()),
            ("ETCD_REGISTRY_LEASE_ID", lease),
        ];
        let ended = self.supervisor.run_held(&env, leadership, shutdown).await;
        let ended = match ended {
            Ok(ended) => ended,
            Err(e) => {
                resign(leadership).await;
                return Err(e);
            }
        };
        match ended {
            Ended::Exited(status) => {
                say(format!("the command {status}; resigning"));
                resign(leadership).await;
                Ok(Some(status.into_result()))
            }
            Ended::Signalled { signal, status } => {
                say(format!(
                    "the command {status} after {}; resigning",
                    signal.name()
                ));
                resign(leadership).await;
                Ok(Some(status.into_result()))
            }
            Ended::Stopped { reason, status } => {
                let why = match (reason, leadership.lost_reason()) {
                    (Stop::Lost(reason), _) | (Stop::Expiring, Some(reason)) => {
                        say(format!("leadership lost ({reason}); the command {status}"));
                        format!("leadership lost: {reason}")
                    }
                    (Stop::Expiring, None) => {
                        say(format!(
                            "leadership about to expire (keep-alives failing); the command {status}; resigning"
                        ));
                        "leadership about to expire: keep-alives failing".to_owned()
                    }
                };
                // Harmless after a loss; deletes the key if it is still ours.
                resign(leadership).await;
                if self.once {
                    return Ok(Some(Err(CliError::msg(why))));
                }
                Ok(None)
            }
        }
    }
}

const MAX_DELAY: Duration = Duration::from_secs(5);

/// Capped exponential backoff with jitter between failed campaigns.
fn retry_delays() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

async fn resign(leadership: &Leadership) {
    if let Err(error) = leadership.resign().await {
        // Closing the registry revokes the lease, which deletes the key anyway.
        say(format!("could not resign: {error}"));
    }
}
