//! DNS bench: queries per second and latency of `etcd-registry dns`,
//! answering from its cache, with dig-style single queries.
//!
//! ```text
//! cargo bench -p etcd-registry-cli --all-features --bench dns   # release; updates BENCHMARKS.md's "## DNS"
//! cargo test -p etcd-registry-cli --all-features --bench dns    # smoke mode, a few seconds
//! ```
//!
//! `cargo bench` passes `--bench`; run any other way (as `cargo test` does)
//! the harness runs in smoke mode: short phases, the section written to
//! `target/bench/smoke/DNS.md`, and a non-zero exit if any answer was wrong
//! or lost, so the harness cannot rot.
//!
//! Each client is one UDP socket with one question in flight, as `dig`
//! asks: send, wait for the reply, check it, ask again. Clients run
//! concurrently in this process; the server is the release binary, a
//! separate process, on loopback. Both share the machine's cores.

#[path = "../tests/dns_common/mod.rs"]
mod dns_common;

use std::net::SocketAddr;
use std::time::Duration;

use dns_common::{DnsServer, query, udp_client};
use etcd_registry::{Registry, ServiceInstance};
use etcd_registry_testkit::EtcdServer;
use hickory_proto::rr::RecordType;
use tokio::time::{Instant, timeout};

const BIN: &str = env!("CARGO_BIN_EXE_etcd-registry");
const TARGET_QPS: f64 = 20_000.0;
/// A reply that has not come within this long counts as lost.
const REPLY_WAIT: Duration = Duration::from_secs(1);

/// One question of the mix and what its reply must say.
struct Question {
    what: &'static str,
    bytes: Vec<u8>,
    rcode: u8,
    answers: u16,
}

fn mix() -> Vec<Question> {
    vec![
        Question {
            what: "SRV _web._tcp (10 records)",
            bytes: query(0, "_web._tcp.registry.", RecordType::SRV, Some(1232)),
            rcode: 0,
            answers: 10,
        },
        Question {
            what: "A web (10 records)",
            bytes: query(0, "web.registry.", RecordType::A, Some(1232)),
            rcode: 0,
            answers: 10,
        },
        Question {
            what: "A web-3.web (1 record)",
            bytes: query(0, "web-3.web.registry.", RecordType::A, Some(1232)),
            rcode: 0,
            answers: 1,
        },
        Question {
            what: "A nope (NXDOMAIN)",
            bytes: query(0, "nope.registry.", RecordType::A, Some(1232)),
            rcode: 3,
            answers: 0,
        },
    ]
}

#[derive(Default)]
struct Tally {
    /// Microseconds, one per answered query.
    latencies: Vec<u32>,
    lost: u64,
    wrong: u64,
}

/// One client: questions in turn, one in flight, until `stop`.
async fn client(addr: SocketAddr, seed: u16, stop: Instant) -> Tally {
    let socket = udp_client(addr).await;
    let questions = mix();
    let mut tally = Tally::default();
    let mut buf = vec![0u8; 4096];
    let mut id = seed.wrapping_mul(7919);
    let mut turn = usize::from(seed);
    while Instant::now() < stop {
        let q = &questions[turn % questions.len()];
        turn += 1;
        id = id.wrapping_add(1);
        let mut bytes = q.bytes.clone();
        bytes[0..2].copy_from_slice(&id.to_be_bytes());
        let began = std::time::Instant::now();
        if socket.send(&bytes).await.is_err() {
            tally.lost += 1;
            continue;
        }
        // Skip late replies to earlier, lost questions.
        let reply = timeout(REPLY_WAIT, async {
            loop {
                match socket.recv(&mut buf).await {
                    Ok(n) if n >= 12 && buf[0..2] == id.to_be_bytes() => return Some(n),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        })
        .await;
        let Ok(Some(_)) = reply else {
            tally.lost += 1;
            continue;
        };
        let micros = began.elapsed().as_micros();
        let rcode = buf[3] & 0x0f;
        let answers = u16::from_be_bytes([buf[6], buf[7]]);
        if rcode != q.rcode || answers != q.answers {
            tally.wrong += 1;
            if tally.wrong == 1 {
                eprintln!(
                    "wrong reply to {}: rcode {rcode}, {answers} answers",
                    q.what
                );
            }
        }
        tally
            .latencies
            .push(u32::try_from(micros).unwrap_or(u32::MAX));
    }
    tally
}

struct Phase {
    clients: usize,
    seconds: f64,
    answered: usize,
    qps: f64,
    p50: u32,
    p99: u32,
    p999: u32,
    max: u32,
    lost: u64,
    wrong: u64,
    /// The server's CPU time over the phase, as a share of one core.
    server_cpu: Option<f64>,
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_second() -> f64 {
    first_line("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

async fn phase(addr: SocketAddr, pid: u32, clients: usize, length: Duration) -> Phase {
    let ticks = cpu_ticks(pid);
    let began = Instant::now();
    let stop = began + length;
    let tasks: Vec<_> = (0..clients)
        .map(|c| tokio::spawn(client(addr, c as u16, stop)))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.expect("a client task");
        all.latencies.extend(t.latencies);
        all.lost += t.lost;
        all.wrong += t.wrong;
    }
    let seconds = began.elapsed().as_secs_f64();
    let server_cpu = match (ticks, cpu_ticks(pid)) {
        (Some(a), Some(b)) => Some((b - a) as f64 / clock_ticks_per_second() / seconds),
        _ => None,
    };
    all.latencies.sort_unstable();
    let l = &all.latencies;
    Phase {
        clients,
        seconds,
        answered: l.len(),
        qps: l.len() as f64 / seconds,
        p50: percentile(l, 0.50),
        p99: percentile(l, 0.99),
        p999: percentile(l, 0.999),
        max: l.last().copied().unwrap_or(0),
        lost: all.lost,
        wrong: all.wrong,
        server_cpu,
    }
}

/// `runs` real `dig` processes, one after another: wall time per run and
/// dig's own "Query time".
async fn dig_runs(addr: SocketAddr, runs: usize) -> (Vec<u32>, Vec<u32>) {
    let mut walls = Vec::new();
    let mut reported = Vec::new();
    for _ in 0..runs {
        let began = std::time::Instant::now();
        let out = tokio::process::Command::new("dig")
            .arg(format!("@{}", addr.ip()))
            .args(["-p", &addr.port().to_string(), "+tries=1", "+time=2"])
            .args(["web.registry.", "A"])
            .output()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "dig is not installed: run scripts/setup (Debian package bind9-dnsutils)"
                );
                std::process::exit(2);
            }
            Err(e) => panic!("cannot run dig: {e}"),
        };
        walls.push(u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX));
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(ms) = text
            .lines()
            .find_map(|l| l.strip_prefix(";; Query time: "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u32>().ok())
        {
            reported.push(ms);
        }
    }
    walls.sort_unstable();
    reported.sort_unstable();
    (walls, reported)
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `27383.4` as `27,383`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(micros: u32) -> String {
    format!("{:.3} ms", f64::from(micros) / 1000.0)
}

/// Replaces the "## DNS" section of `doc` (up to the next "## " heading),
/// or appends it.
fn with_section(doc: &str, section: &str) -> String {
    let Some(start) = doc.find("\n## DNS\n").map(|i| i + 1) else {
        return format!("{}\n\n{}", doc.trim_end(), section);
    };
    let end = doc[start + 1..]
        .find("\n## ")
        .map_or(doc.len(), |i| start + 1 + i + 1);
    if end == doc.len() {
        format!("{}{}", &doc[..start], section)
    } else {
        format!("{}{}\n{}", &doc[..start], section, &doc[end..])
    }
}

#[tokio::main]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let smoke = std::env::var_os("BENCH_SMOKE").is_some_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let load_before = loadavg();
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut etcd = match EtcdServer::builder().name("bench-dns").start().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot start etcd (run scripts/setup): {e}");
            std::process::exit(2);
        }
    };
    let registry = Registry::builder()
        .endpoints(etcd.endpoints())
        .namespace("bench-dns")
        .connect()
        .await
        .expect("connect");
    let mut registrations = Vec::new();
    for i in 1..=10u16 {
        let instance =
            ServiceInstance::new("web", format!("web-{i}"), format!("10.0.0.{i}"), 8000 + i)
                .with_weight(i64::from(i));
        registrations.push(registry.register(instance).await.expect("register"));
    }
    let mut dns = DnsServer::start(BIN, &etcd.endpoint(), "bench-dns", &[]).await;
    let pid = dns.child.id().expect("the server runs");
    let addr = dns.addr;

    let (sweep, length, dig_count): (&[usize], Duration, usize) = if smoke {
        (&[1, 4], Duration::from_millis(300), 5)
    } else {
        (&[1, 4, 16, 64], Duration::from_secs(5), 200)
    };
    // Warm-up: first-touch allocations, the server's task pool.
    phase(addr, pid, 4, length / 5).await;
    let mut phases = Vec::new();
    for &clients in sweep {
        let p = phase(addr, pid, clients, length).await;
        eprintln!(
            "{clients} clients: {:.0} queries/s, p99 {}, lost {}, wrong {}",
            p.qps,
            ms(p.p99),
            p.lost,
            p.wrong
        );
        phases.push(p);
    }
    let (walls, reported) = dig_runs(addr, dig_count).await;
    let running = dns.is_running();
    let load_after = loadavg();

    let cores = first_line("nproc", &[]);
    let best = phases
        .iter()
        .max_by(|a, b| a.qps.total_cmp(&b.qps))
        .expect("at least one phase");
    let verdict = if best.qps >= TARGET_QPS {
        "met"
    } else {
        "missed"
    };
    let build = if smoke {
        "debug build, **smoke mode: short phases, figures mean nothing**"
    } else {
        "release build"
    };
    let mut md = format!(
        "## DNS\n\n\
         Measured by `cargo bench -p etcd-registry-cli --all-features --bench dns` ({build}) \
         on {date}: {cores} cores, load average {load_before} at the start and {load_after} at the end. \
         Other agents were building and testing on the same machine throughout, so the figures are \
         lower bounds of what the server does on 2 free cores. `etcd-registry dns` (a separate \
         process) answers a namespace of 10 instances of `web` from its cache; the clients run in \
         the bench process on the same 2 cores. Each client is one UDP socket with one question in \
         flight, as `dig` asks (one question, EDNS with a 1232-byte size, recursion desired): send, \
         wait, check the reply's code and answer count, ask again. The questions take turns: SRV \
         `_web._tcp` (10 records), A `web` (10), A `web-3.web` (1), A `nope` (NXDOMAIN). \
         Latency is the round trip seen by the client. Server CPU is its user + system time over \
         the phase, in cores.\n\n\
         | figure | target | measured | verdict |\n| --- | --- | --- | --- |\n\
         | queries/s from the cache, loopback, 2 cores | ≥ 20,000 | {} ({} clients), p99 {} | {verdict} |\n\n\
         | clients | answered | queries/s | p50 | p99 | p99.9 | max | lost | wrong | server CPU |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        thousands(best.qps),
        best.clients,
        ms(best.p99)
    );
    for p in &phases {
        md.push_str(&format!(
            "| {} | {} in {:.1} s | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.clients,
            thousands(p.answered as f64),
            p.seconds,
            thousands(p.qps),
            ms(p.p50),
            ms(p.p99),
            ms(p.p999),
            ms(p.max),
            p.lost,
            p.wrong,
            p.server_cpu
                .map_or("-".to_owned(), |c| format!("{c:.2} cores"))
        ));
    }
    md.push_str(&format!(
        "\nFor comparison, `dig` itself ({}): {} runs one after another, each a new process \
         asking `web.registry. A` once: {:.0} runs/s; wall time per run p50 {} and p99 {}; \
         dig's own \"Query time\" p50 {} ms and p99 {} ms (it counts whole milliseconds). \
         A dig-per-query client measures process start-up, not the server.\n",
        first_line("sh", &["-c", "dig -v 2>&1"]),
        walls.len(),
        walls.len() as f64 / (walls.iter().map(|w| f64::from(*w)).sum::<f64>() / 1e6).max(1e-9),
        ms(percentile(&walls, 0.5)),
        ms(percentile(&walls, 0.99)),
        percentile(&reported, 0.5),
        percentile(&reported, 0.99),
    ));

    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| format!("{}/../../target", env!("CARGO_MANIFEST_DIR")));
    let path = if smoke {
        let dir = format!("{target_dir}/bench/smoke");
        std::fs::create_dir_all(&dir).expect("create the smoke directory");
        let path = format!("{dir}/DNS.md");
        std::fs::write(&path, &md).expect("write DNS.md");
        path
    } else {
        let path = std::env::var("BENCH_OUT")
            .unwrap_or_else(|_| format!("{}/../../BENCHMARKS.md", env!("CARGO_MANIFEST_DIR")));
        let doc = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        std::fs::write(&path, with_section(&doc, &md)).expect("write BENCHMARKS.md");
        path
    };
    println!("{md}");
    eprintln!("wrote {path}");

    let failed =
        phases.iter().any(|p| p.wrong > 0 || p.answered == 0) || !running || reported.is_empty();
    let _ = dns.stop().await;
    drop(registrations);
    let _ = registry.close().await;
    let _ = etcd.stop().await;
    if failed {
        eprintln!("the DNS bench saw wrong answers, no answers, or a dead server");
        std::process::exit(1);
    }
    // A lost query is one without a reply within 1 s: rare even on a busy
    // machine, so more than a tenth lost means the server is not answering.
    if phases.iter().any(|p| p.lost as usize * 10 > p.answered) {
        eprintln!("more than a tenth of the queries got no reply within {REPLY_WAIT:?}");
        std::process::exit(1);
    }
}
