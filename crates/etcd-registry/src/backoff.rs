//! The one retry policy of the crate, capped exponential backoff with
//! jitter, and the one loop that retries a step with it until cancelled.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Capped exponential backoff with jitter (from `backon`).
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    iter: Box<dyn Iterator<Item = Duration> + Send + Sync>,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            iter: Self::build(min, max),
        }
    }

    /// 100 ms doubling to 5 s, with jitter.
    pub(crate) fn standard() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    fn build(min: Duration, max: Duration) -> Box<dyn Iterator<Item = Duration> + Send + Sync> {
        use backon::BackoffBuilder;
        Box::new(
            backon::ExponentialBuilder::default()
                .with_min_delay(min)
                .with_max_delay(max)
                .with_jitter()
                .without_max_times()
                .build(),
        )
    }

    pub(crate) fn reset(&mut self) {
        self.iter = Self::build(self.min, self.max);
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        self.iter.next().unwrap_or(self.max)
    }

    /// Sleeps for the next delay; false when cancelled first.
    pub(crate) async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// The failure side of every retry-until-cancelled loop of a background
/// task (the session's keep-alive, watches, anti-entropy, restores, the
/// deletes that go on in the background): the standard backoff between
/// failed rounds, the cancellation that ends the wait, and the logging.
/// A streak of failures is logged at WARN once, then at DEBUG while it
/// repeats (a warning that repeats in a loop is noise, not news), and its
/// end at INFO.
pub(crate) struct Retry {
    backoff: Backoff,
    /// What is retried, for the log.
    what: String,
    /// Failed rounds since the last success.
    streak: u32,
}

impl Retry {
    pub(crate) fn standard(what: impl Into<String>) -> Self {
        Self {
            backoff: Backoff::standard(),
            what: what.into(),
            streak: 0,
        }
    }

    /// A round failed with `error`: logged, then the next delay waited out.
    /// `false` when `cancel` fired first (the loop ends).
    pub(crate) async fn failed(
        &mut self,
        cancel: &CancellationToken,
        error: &(dyn std::fmt::Display + Sync),
    ) -> bool {
        self.streak += 1;
        if self.streak == 1 {
            tracing::warn!(%error, "{} failed; retrying (repeats at DEBUG)", self.what);
        } else {
            tracing::debug!(%error, attempt = self.streak, "{} failed again; retrying", self.what);
        }
        self.backoff.wait(cancel).await
    }

    /// A round succeeded: the backoff starts over.
    pub(crate) fn succeeded(&mut self) {
        if self.streak > 1 {
            tracing::info!(failures = self.streak, "{} succeeded again", self.what);
        }
        self.streak = 0;
        self.backoff.reset();
    }
}

/// Runs `step` until it succeeds or fails for good, waiting the standard
/// backoff between transient failures (timeouts, an unreachable etcd), each
/// logged at WARN with `what`. Ends with [`Error::Closed`] once `cancel`
/// fires. Errors that retrying cannot cure (permission denied, bad input,
/// a lost lease) are returned at once.
pub(crate) async fn retry_transient<T, F, Fut>(
    cancel: &CancellationToken,
    what: &str,
    mut step: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::standard();
    loop {
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(Error::Closed),
            r = step() => r,
        };
        match result {
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, "{what} failed; retrying");
                if !backoff.wait(cancel).await {
                    return Err(Error::Closed);
                }
            }
            result => return result,
        }
    }
}

/// Runs `f` unless `cancel` fires first (`None`).
pub(crate) async fn cancellable<T>(
    cancel: &CancellationToken,
    f: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        v = f => Some(v),
    }
}
