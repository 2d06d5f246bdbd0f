//! Waiting in tests without bare sleeps: bounded awaits and polled conditions.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] polls.
const POLL: Duration = Duration::from_millis(25);

/// Awaits `fut`, panicking with `what` if it takes longer than `timeout`.
/// Put every await that could hang under it, so that a bug fails fast.
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// use etcd_registry_testkit::within;
/// within("a quick thing", Duration::from_secs(5), async {}).await;
/// # }
/// ```
pub async fn within<F: Future>(what: &str, timeout: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {timeout:?}: {what}"),
    }
}

/// Polls `check` every 25 ms until it returns true, and returns how long
/// that took; panics with `what` after `timeout`. One check that hangs is
/// cut off at the deadline too.
///
/// ```no_run
/// # async fn demo(etcd: &etcd_registry_testkit::EtcdServer) {
/// use std::time::Duration;
/// use etcd_registry_testkit::eventually;
/// let took = eventually("etcd answers", Duration::from_secs(10), || async {
///     etcd.client().await.is_ok()
/// })
/// .await;
/// # }
/// ```
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        if tokio::time::timeout_at(deadline, check())
            .await
            .unwrap_or(false)
        {
            return start.elapsed();
        }
        if Instant::now() >= deadline {
            panic!("not true within {timeout:?}: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
