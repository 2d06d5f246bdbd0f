//! What the harness measures with: latency histograms, the heap counter,
//! the resident set, etcd's `/metrics`, and polling of etcd with a raw client.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// The error type of every phase: a phase that fails reports it in the
/// tables instead of aborting the run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A phase step's result.
pub type R<T> = Result<T, BoxError>;

pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Live heap bytes of the whole process (all threads), from the counting allocator.
pub fn heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Resident set size in bytes as the OS sees it (`VmRSS` in `/proc/self/status`).
pub fn rss() -> R<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmRSS line in /proc/self/status")?;
    Ok(kb * 1024)
}

/// Heap and resident set once the allocator has settled: background tasks
/// get a moment to finish what they were doing, and glibc hands freed pages
/// back to the OS (without `malloc_trim`, freed memory of earlier phases
/// would hide or inflate a growth).
pub async fn settled() -> R<(isize, u64)> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory held by glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    Ok((heap(), rss()?))
}

/// A latency distribution: an HDR histogram in nanoseconds (3 significant
/// digits, 1 ns to 1 hour), plus the wall time of the whole series.
pub struct Hist {
    h: Histogram<u64>,
    wall: Duration,
}

impl Hist {
    pub fn new() -> Self {
        Self {
            h: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("static histogram bounds are valid"),
            wall: Duration::ZERO,
        }
    }

    pub fn record(&mut self, d: Duration) {
        // Saturates at the upper bound instead of failing on an outlier.
        self.h.saturating_record(d.as_nanos().max(1) as u64);
    }

    pub fn add_wall(&mut self, d: Duration) {
        self.wall += d;
    }

    pub fn summary(&self, label: &str) -> Summary {
        let us = |ns: f64| ns / 1000.0;
        let n = self.h.len();
        Summary {
            label: label.to_owned(),
            n,
            mean_us: us(self.h.mean()),
            p50_us: us(self.h.value_at_quantile(0.50) as f64),
            p99_us: us(self.h.value_at_quantile(0.99) as f64),
            p999_us: us(self.h.value_at_quantile(0.999) as f64),
            per_sec: (self.wall > Duration::ZERO).then(|| n as f64 / self.wall.as_secs_f64()),
        }
    }
}

/// One side of a comparison.
#[derive(Clone, Debug)]
pub struct Summary {
    pub label: String,
    pub n: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Operations per second of wall time, where the series had one.
    pub per_sec: Option<f64>,
}

impl Summary {
    pub fn json(&self) -> Value {
        json!({
            "label": self.label,
            "n": self.n,
            "mean_us": round(self.mean_us),
            "p50_us": round(self.p50_us),
            "p99_us": round(self.p99_us),
            "p999_us": round(self.p999_us),
            "per_sec": self.per_sec.map(round),
        })
    }
}

pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A latency for a table: ns under 10 µs, µs under 10 ms, else ms.
pub fn fmt_us(us: f64) -> String {
    if us < 10.0 {
        format!("{:.0} ns", us * 1000.0)
    } else if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// Times one future.
pub async fn time<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let v = f.await;
    (v, t.elapsed())
}

/// Sum of every sample of the metric `name` whose labels contain all of
/// `labels`, from etcd's Prometheus text.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// How many keys are under `prefix` now (a count-only read).
pub async fn count(client: &Client, prefix: &str) -> R<i64> {
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.clone().get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        ),
    )
    .await??;
    Ok(resp.count())
}

/// Polls a raw client every `every` until exactly `n` keys are under
/// `prefix`; returns the time it took. Failed reads (etcd still coming back)
/// count as "not yet". Fails after `limit`.
pub async fn until_count(
    client: &Client,
    prefix: &str,
    n: i64,
    every: Duration,
    limit: Duration,
) -> R<Duration> {
    let start = Instant::now();
    loop {
        if let Ok(c) = count(client, prefix).await
            && c == n
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            let now = count(client, prefix).await.map_or(-1, |c| c);
            return Err(format!("{prefix}: {now} keys, not {n}, after {limit:?}").into());
        }
        tokio::time::sleep(every).await;
    }
}

/// Awaits `fut` for at most `limit`; a hang becomes an error naming `what`.
pub async fn bounded<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> R<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("timed out after {limit:?}: {what}").into())
}
