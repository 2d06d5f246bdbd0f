//! Durations on the command line, and waits on optional ones.

use std::time::Duration;

use tokio::time::{Instant, sleep_until};

/// A duration in etcdctl's style (`500ms`, `2s`, `1m`) or in whole seconds (`2`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| format!("{s:?}: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; expected a duration such as 500ms, 2s, 1m, or whole seconds"))
}

pub fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be above zero".to_owned()),
        d => Ok(d),
    }
}

/// etcd grants leases in whole seconds.
pub fn ttl(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d < Duration::from_secs(2) => Err("must be at least 2s".to_owned()),
        d if d.subsec_nanos() != 0 => Err("must be whole seconds".to_owned()),
        d => Ok(d),
    }
}

/// Sleeps for `d`, or forever when `None`.
pub async fn sleep_for(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever when `None`.
pub async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_whole_seconds() {
        assert_eq!(duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(duration("").is_err());
        assert!(duration("-1s").is_err());
        assert!(duration("2 fortnights").is_err());
        assert!(positive_duration("0s").is_err());
        assert_eq!(ttl("1m"), Ok(Duration::from_secs(60)));
        assert!(ttl("1s").is_err());
        assert!(ttl("2500ms").is_err());
    }
}
