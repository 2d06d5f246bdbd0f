//! `etcd-registry dns`, queried with a real resolver (`dig`, from Debian's
//! bind9-dnsutils, which scripts/setup installs) and with raw messages.

mod common;
mod dns_common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use dns_common::{DnsServer, query, tcp_exchange, udp_client, udp_exchange};
use etcd_registry::ServiceInstance;
use futures::StreamExt;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::time::{Instant, timeout};

/// What dig printed: the status, the header flags and the answer records
/// (each as its fields joined by one space).
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answers: Vec<String>,
}

impl Dig {
    fn truncated(&self) -> bool {
        self.flags.iter().any(|f| f == "tc")
    }

    /// The answers' data (the fields after name, TTL, class and type).
    fn data(&self) -> Vec<String> {
        self.answers
            .iter()
            .map(|a| a.split(' ').skip(4).collect::<Vec<_>>().join(" "))
            .collect()
    }
}

/// `dig @addr -p port ARGS`, one try of a few seconds per attempt.
async fn dig(addr: SocketAddr, args: &[&str]) -> Dig {
    let mut cmd = tokio::process::Command::new("dig");
    cmd.arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string()])
        .args(["+noall", "+comments", "+answer", "+tries=2", "+time=2"])
        .args(args)
        .kill_on_drop(true);
    let out = match timeout(STEP, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "dig is not installed: run scripts/setup, which installs it \
             (Debian package bind9-dnsutils)"
        ),
        Ok(Err(e)) => panic!("cannot run dig: {e}"),
        Err(_) => panic!("dig {args:?} did not finish within {STEP:?}"),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dig {args:?} failed: {text}");
    let mut status = None;
    let mut flags = Vec::new();
    let mut answers = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            status = rest.split(',').next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            let list = rest.split(';').next().unwrap_or("");
            flags = list.split_whitespace().map(str::to_owned).collect();
        } else if !line.starts_with(';') && !line.trim().is_empty() {
            answers.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    Dig {
        status: status.unwrap_or_else(|| panic!("no status in dig's output:\n{text}")),
        flags,
        answers,
    }
}

async fn start(ctx: &Ctx, extra: &[&str]) -> DnsServer {
    DnsServer::start(BIN, &ctx.etcd.endpoint(), &ctx.ns, extra).await
}

async fn register(
    registry: &etcd_registry::Registry,
    instance: ServiceInstance,
) -> etcd_registry::Registration {
    timeout(STEP, registry.register(instance))
        .await
        .expect("register within the step")
        .expect("register")
}

// Mutation checks by hand: sending the raw instance weight as the SRV weight
// (0 for an unweighted instance) made this test fail on the SRV data;
// logging every problem on every rebuild (not only new ones) made it fail
// on the count of host-name warnings (2).
#[tokio::test]
async fn dig_gets_srv_a_aaaa_cname_nxdomain_and_nodata() {
    let ctx = Ctx::new("dns-types").await;
    let registry = ctx.registry().await;
    let _r1 = register(
        &registry,
        ServiceInstance::new("web", "web-1", "10.0.0.1", 8080).with_weight(5),
    )
    .await;
    let _r2 = register(&registry, ServiceInstance::new("web", "web-2", "::1", 8081)).await;
    let _r3 = register(
        &registry,
        ServiceInstance::new("web", "web-3", "db.internal", 8082),
    )
    .await;
    let api = register(
        &registry,
        ServiceInstance::new("api", "a-1", "10.0.1.1", 9000),
    )
    .await;
    let dns = start(&ctx, &["--domain", "Svc.Example", "--record-ttl", "5s"]).await;
    let at = dns.addr;

    let srv = dig(at, &["_web._tcp.svc.example.", "SRV"]).await;
    assert_eq!(srv.status, "NOERROR");
    assert!(srv.flags.contains(&"aa".to_owned()), "{srv:?}");
    let mut data = srv.data();
    data.sort();
    assert_eq!(
        data,
        [
            "0 1 8081 web-2.web.svc.example.",
            "0 1 8082 db.internal.",
            "0 5 8080 web-1.web.svc.example.",
        ]
    );
    assert!(
        srv.answers.iter().all(|a| a.split(' ').nth(1) == Some("5")),
        "TTL 5: {srv:?}"
    );

    let a = dig(at, &["web.svc.example.", "A"]).await;
    assert_eq!(
        (a.status.as_str(), a.data()),
        ("NOERROR", vec!["10.0.0.1".to_owned()])
    );
    let aaaa = dig(at, &["web.svc.example.", "AAAA"]).await;
    assert_eq!(aaaa.data(), ["::1"]);
    let one = dig(at, &["web-1.web.svc.example.", "A"]).await;
    assert_eq!(one.data(), ["10.0.0.1"]);
    // Over TCP too.
    let one = dig(at, &["+tcp", "web-2.web.svc.example.", "AAAA"]).await;
    assert_eq!(one.data(), ["::1"]);
    // A host name: a CNAME to it, whatever the type asked.
    let cname = dig(at, &["web-3.web.svc.example.", "A"]).await;
    assert_eq!(
        cname.answers,
        ["web-3.web.svc.example. 5 IN CNAME db.internal."]
    );

    for (name, qtype) in [
        ("nope.svc.example.", "A"),
        ("web-9.web.svc.example.", "A"),
        ("_nope._tcp.svc.example.", "SRV"),
    ] {
        let missing = dig(at, &[name, qtype]).await;
        assert_eq!(missing.status, "NXDOMAIN", "{name}: {missing:?}");
        assert!(missing.answers.is_empty());
    }
    // Not ours to answer.
    assert_eq!(dig(at, &["example.com.", "A"]).await.status, "REFUSED");

    // A service whose instance stopped serving: known, so NODATA.
    let before = dig(at, &["api.svc.example.", "A"]).await;
    assert_eq!(before.data(), ["10.0.1.1"]);
    timeout(STEP, api.set_serving(false))
        .await
        .expect("set_serving within the step")
        .expect("set_serving(false)");
    for (name, qtype) in [("api.svc.example.", "A"), ("_api._tcp.svc.example.", "SRV")] {
        let after = eventually("the drained instance to leave DNS", || async {
            Some(dig(at, &[name, qtype]).await).filter(|d| d.answers.is_empty())
        })
        .await;
        assert_eq!(after.status, "NOERROR", "NODATA for {name}: {after:?}");
    }
    assert_eq!(
        dig(at, &["a-1.api.svc.example.", "A"]).await.status,
        "NXDOMAIN"
    );

    let warnings = dns.stderr();
    assert_eq!(
        warnings.matches("web/web-3 has a host name").count(),
        1,
        "one warning for the host-name instance, not one per query or change:\n{warnings}"
    );
    let status = dns.stop().await;
    assert!(status.success(), "dns exited with {status}");
    registry.close().await.expect("close");
}

/// How long after etcd acknowledged a change an answer may still miss it.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);

/// Asks until `expected` holds. Returns how long after `since` the query
/// that first showed it was sent; fails if none within [`VISIBLE_WITHIN`]
/// (plus one query in flight) did.
async fn seen_after(
    at: SocketAddr,
    args: &[&str],
    since: Instant,
    expected: impl Fn(&Dig) -> bool,
) -> Duration {
    loop {
        let sent = Instant::now();
        let answer = dig(at, args).await;
        if expected(&answer) {
            return sent - since;
        }
        assert!(
            sent - since <= VISIBLE_WITHIN,
            "{args:?}: a query sent {:?} after the change still got {answer:?}",
            sent - since
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Mutation check by hand: a feed that never rebuilt after the start made
// this test fail: a query 1.09 s after the first change still got NXDOMAIN.
#[tokio::test]
async fn a_change_in_etcd_shows_in_answers_within_a_second() {
    let ctx = Ctx::new("dns-follow").await;
    let registry = ctx.registry().await;
    let dns = start(&ctx, &[]).await;
    let at = dns.addr;
    assert_eq!(dig(at, &["db.registry.", "A"]).await.status, "NXDOMAIN");

    let mut reg = register(
        &registry,
        ServiceInstance::new("db", "db-1", "10.0.2.1", 5432),
    )
    .await;
    let added = seen_after(at, &["db.registry.", "A"], Instant::now(), |d| {
        d.data() == ["10.0.2.1"]
    })
    .await;

    let changed_at = Instant::now();
    timeout(
        STEP,
        reg.update(ServiceInstance::new("db", "db-1", "10.0.2.2", 5433)),
    )
    .await
    .expect("update within the step")
    .expect("update");
    let updated = seen_after(at, &["_db._tcp.registry.", "SRV"], changed_at, |d| {
        d.data() == ["0 1 5433 db-1.db.registry."]
    })
    .await;

    // Written and deleted by another client (etcdctl, as Go would write it).
    let key = format!("/etcd_registry/{}/services/db/db-2", ctx.ns);
    let value = r#"{"name":"db","id":"db-2","address":"10.0.2.3","port":"5432","version":"","weight":3,"metadata":null}"#;
    let mut put = ctx.etcd.etcdctl();
    put.args(["put", &key, value]);
    let put_at = Instant::now();
    assert!(run(put, &["etcdctl put"]).await.status.success());
    let written = seen_after(at, &["db-2.db.registry.", "A"], put_at, |d| {
        d.data() == ["10.0.2.3"]
    })
    .await;
    let mut del = ctx.etcd.etcdctl();
    del.args(["del", &key]);
    let deleted_at = Instant::now();
    assert!(run(del, &["etcdctl del"]).await.status.success());
    let removed = seen_after(at, &["db-2.db.registry.", "A"], deleted_at, |d| {
        d.status == "NXDOMAIN"
    })
    .await;
    eprintln!(
        "visible after: added {added:?}, updated {updated:?}, written {written:?}, removed {removed:?}"
    );

    assert!(dns.stop().await.success());
    registry.close().await.expect("close");
}

// Mutation check by hand: a handler that cut answers to 20 records (to
// "fit" UDP without TC) made this test fail: no TC over UDP.
#[tokio::test]
async fn three_hundred_instances_truncate_over_udp_and_come_whole_over_tcp() {
    let ctx = Ctx::new("dns-large").await;
    let registry = ctx.registry().await;
    let registrations: Vec<_> = futures::stream::iter(0..300u32)
        .map(|i| {
            let instance = ServiceInstance::new(
                "big",
                format!("big-{i:03}"),
                format!("10.1.{}.{}", i / 250, i % 250 + 1),
                10_000 + u16::try_from(i).expect("small"),
            );
            registry.register(instance)
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let registrations: Vec<_> = registrations
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("register 300 instances");
    let dns = start(&ctx, &[]).await;
    let at = dns.addr;

    for qtype in ["SRV", "A"] {
        let name = if qtype == "SRV" {
            "_big._tcp.registry."
        } else {
            "big.registry."
        };
        // +ignore: dig keeps the truncated UDP answer instead of retrying over TCP.
        for size in ["+bufsize=4096", "+noedns"] {
            let udp = dig(at, &["+ignore", size, name, qtype]).await;
            assert!(
                udp.truncated(),
                "{qtype} {size}: TC expected: {:?}",
                udp.flags
            );
            assert!(
                udp.answers.len() < 300,
                "{qtype} {size}: {} answers over UDP",
                udp.answers.len()
            );
        }
        let tcp = dig(at, &["+tcp", name, qtype]).await;
        assert!(!tcp.truncated(), "{qtype} over TCP: {:?}", tcp.flags);
        let mut data = tcp.data();
        data.sort();
        data.dedup();
        assert_eq!(data.len(), 300, "{qtype}: every instance over TCP");
        // dig's default: retry a truncated answer over TCP, and get it all.
        assert_eq!(dig(at, &[name, qtype]).await.answers.len(), 300);
    }
    let srv = tcp_exchange(at, &query(7, "_big._tcp.registry.", RecordType::SRV, None)).await;
    let mut ports: Vec<String> = srv.answers.iter().map(|r| r.data.to_string()).collect();
    ports.sort();
    assert_eq!(
        ports.first().map(String::as_str),
        Some("0 1 10000 big-000.big.registry.")
    );
    assert_eq!(
        ports.last().map(String::as_str),
        Some("0 1 10299 big-299.big.registry.")
    );

    assert!(dns.stop().await.success());
    drop(registrations);
    registry.close().await.expect("close");
}

/// A small, seeded generator, so that a failing run replays exactly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Packet `i` of the fuzz loop: random bytes, a valid query with bytes
/// flipped, a header with a random question count and random rest, or a
/// valid query cut short.
fn fuzz_packet(rng: &mut XorShift, i: usize, valid: &[u8]) -> Vec<u8> {
    match i % 4 {
        0 => {
            let n = rng.below(600) as usize;
            rng.bytes(n)
        }
        1 => {
            let mut p = valid.to_vec();
            for _ in 0..=rng.below(8) {
                let at = rng.below(p.len() as u64) as usize;
                p[at] = rng.next() as u8;
            }
            p
        }
        2 => {
            let mut p = rng.bytes(12);
            p[2] &= 0x7f; // a query, not a response
            p[4] = 0;
            p[5] = rng.below(4) as u8; // question count
            let n = rng.below(300) as usize;
            p.extend(rng.bytes(n));
            p
        }
        _ => {
            let n = rng.below(valid.len() as u64) as usize;
            valid[..n].to_vec()
        }
    }
}

const FUZZ_PACKETS: usize = 10_000;
const FUZZ_SEED: u64 = 0x05ee_dd15_c0dd_ba11;

// Mutation checks by hand: a handler that panicked on class CH left that
// query unanswered (test failed at "a reply"); one that aborted the process
// on an unusual query type failed the loop (the server was gone).
#[tokio::test]
async fn malformed_queries_get_formerr_or_nothing_and_the_server_stays_up() {
    let ctx = Ctx::new("dns-fuzz").await;
    let registry = ctx.registry().await;
    let _reg = register(
        &registry,
        ServiceInstance::new("web", "w-1", "10.0.0.9", 80),
    )
    .await;
    let mut dns = start(&ctx, &[]).await;
    let at = dns.addr;
    let wait = Duration::from_secs(3);
    let client = udp_client(at).await;

    // Deterministic cases first, each with its exact answer.
    let valid = query(0x1234, "web.registry.", RecordType::A, Some(1232));
    let mut no_question = valid[..12].to_vec(); // says 1 question, has none
    no_question[0..2].copy_from_slice(&[0xab, 0xcd]);
    let reply = udp_exchange(&client, &no_question, wait)
        .await
        .expect("a reply");
    assert_eq!(
        (reply.metadata.id, reply.metadata.response_code),
        (0xabcd, ResponseCode::FormErr)
    );
    let mut two = Message::from_vec(&valid).expect("parse");
    let q = two.queries[0].clone();
    two.add_query(q);
    let reply = udp_exchange(&client, &two.to_vec().expect("encode"), wait)
        .await
        .expect("a reply");
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::FormErr,
        "two questions"
    );
    let mut status = Message::from_vec(&valid).expect("parse");
    status.metadata.op_code = hickory_proto::op::OpCode::Status;
    let reply = udp_exchange(&client, &status.to_vec().expect("encode"), wait)
        .await
        .expect("a reply");
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NotImp,
        "opcode STATUS"
    );
    let mut chaos = Message::from_vec(&valid).expect("parse");
    chaos.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
    let reply = udp_exchange(&client, &chaos.to_vec().expect("encode"), wait)
        .await
        .expect("a reply");
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::Refused,
        "class CH"
    );
    let mut future = Message::from_vec(&valid).expect("parse");
    future.edns.as_mut().expect("EDNS").set_version(1);
    let reply = udp_exchange(&client, &future.to_vec().expect("encode"), wait)
        .await
        .expect("a reply");
    // 16 is BADVERS in an answer to EDNS (hickory reads it as BADSIG, its twin).
    assert_eq!(
        u16::from(reply.metadata.response_code),
        16,
        "EDNS version 1"
    );

    // The loop: every reply that comes back is a well-formed response that
    // says FORMERR, or answers what the mangled bytes still asked.
    let fuzzer = udp_client(at).await;
    let began = Instant::now();
    let (replies, codes) = timeout(Duration::from_secs(30), async {
        let mut rng = XorShift(FUZZ_SEED);
        let mut replies = 0usize;
        let mut codes = std::collections::BTreeMap::new();
        let mut buf = vec![0u8; 65_535];
        for i in 0..FUZZ_PACKETS {
            let packet = fuzz_packet(&mut rng, i, &valid);
            fuzzer
                .send(&packet)
                .await
                .unwrap_or_else(|e| panic!("packet {i}: send failed ({e}): is the server gone?"));
            // Drain what came back so far, without waiting for it.
            while let Ok(n) = fuzzer.try_recv(&mut buf) {
                let reply = Message::from_vec(&buf[..n])
                    .unwrap_or_else(|e| panic!("packet {i}: a reply that does not parse: {e}"));
                assert_eq!(reply.metadata.message_type, MessageType::Response);
                assert_ne!(
                    reply.metadata.response_code,
                    ResponseCode::ServFail,
                    "packet {i}: the server failed"
                );
                *codes
                    .entry(reply.metadata.response_code.to_string())
                    .or_insert(0) += 1;
                replies += 1;
            }
            if i % 64 == 63 {
                // Pace the sender so that the loop tests the parser, not the socket buffer.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        (replies, codes)
    })
    .await
    .expect("the fuzz loop finishes within 30 s");
    eprintln!(
        "fuzz: {FUZZ_PACKETS} packets in {:?}, {replies} replies drained: {codes:?}",
        began.elapsed()
    );
    assert!(replies > 0, "no reply at all to {FUZZ_PACKETS} packets");
    assert!(
        codes.contains_key("Form Error") || codes.contains_key("FORMERR"),
        "{codes:?}"
    );

    // Garbage over TCP: connections that send junk are closed, nothing else.
    let mut rng = XorShift(FUZZ_SEED ^ 1);
    for _ in 0..20 {
        if let Ok(Ok(mut s)) = timeout(wait, tokio::net::TcpStream::connect(at)).await {
            use tokio::io::AsyncWriteExt;
            let n = rng.below(200) as usize;
            let _ = s.write_all(&rng.bytes(n)).await;
        }
    }

    assert!(dns.is_running(), "the server died: {}", dns.stderr());
    let after = dig(at, &["web.registry.", "A"]).await;
    assert_eq!(after.data(), ["10.0.0.9"], "still answering over UDP");
    let after = dig(at, &["+tcp", "web.registry.", "A"]).await;
    assert_eq!(after.data(), ["10.0.0.9"], "still answering over TCP");
    assert!(dns.stop().await.success());
    registry.close().await.expect("close");
}

// Mutation check by hand: counting answers as NXDOMAINs made this test fail
// (the expected counter lines never appeared).
#[tokio::test]
async fn metrics_count_queries_answers_and_nxdomains_by_type() {
    let ctx = Ctx::new("dns-metrics").await;
    let registry = ctx.registry().await;
    let _reg = register(
        &registry,
        ServiceInstance::new("web", "w-1", "10.0.0.9", 80),
    )
    .await;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let dns = start(&ctx, &["--metrics-addr", &metrics.to_string()]).await;
    let at = dns.addr;
    assert_eq!(
        dig(at, &["_web._tcp.registry.", "SRV"]).await.answers.len(),
        1
    );
    assert_eq!(dig(at, &["web.registry.", "A"]).await.answers.len(), 1);
    assert_eq!(dig(at, &["nope.registry.", "A"]).await.status, "NXDOMAIN");
    assert_eq!(dig(at, &["web.registry.", "AAAA"]).await.status, "NOERROR");

    let expected = [
        r#"etcd_registry_dns_queries_total{type="SRV"} 1"#,
        r#"etcd_registry_dns_queries_total{type="A"} 2"#,
        r#"etcd_registry_dns_queries_total{type="AAAA"} 1"#,
        r#"etcd_registry_dns_answers_total{type="SRV"} 1"#,
        r#"etcd_registry_dns_answers_total{type="A"} 1"#,
        r#"etcd_registry_dns_nxdomain_total{type="A"} 1"#,
    ];
    let page = eventually("the DNS counters on /metrics", || async {
        match timeout(STEP, etcd_registry_testkit::http_get(metrics, "/metrics")).await {
            Ok(Ok((200, body))) if expected.iter().all(|l| body.lines().any(|b| b == *l)) => {
                Some(body)
            }
            _ => None,
        }
    })
    .await;
    assert!(
        !page.contains(r#"etcd_registry_dns_answers_total{type="AAAA"}"#),
        "NODATA is not an answer:\n{page}"
    );
    assert!(dns.stop().await.success());
    registry.close().await.expect("close");
}

// Mutation check by hand: accepting a --record-ttl with a fraction of a
// second made this test fail (the command started serving instead).
#[tokio::test]
async fn bad_options_are_usage_errors_and_a_taken_port_fails() {
    let ctx = Ctx::new("dns-usage").await;
    for (args, field) in [
        (vec!["dns", "--domain", "."], "--domain"),
        (vec!["dns", "--domain", "a b"], "--domain"),
        (vec!["dns", "--record-ttl", "1500ms"], "--record-ttl"),
        (vec!["dns", "--listen", "nowhere"], "--listen"),
    ] {
        let out = ctx.run(&args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?} names {field}: {stderr}");
    }
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = ctx.run(&["dns", "--listen", &addr]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

/// `*` is not a wildcard here (the zone has none): a literal `*` label is a
/// name like any other, and no such name exists. hickory's label count
/// leaves a leading `*` out, which made `*.registry.` the apex and
/// `*.web.registry.` the service name.
#[tokio::test]
async fn a_literal_wildcard_label_is_a_name_that_does_not_exist() {
    let ctx = Ctx::new("dns-wildcard").await;
    let registry = ctx.registry().await;
    let _web = register(
        &registry,
        ServiceInstance::new("web", "web-1", "10.0.0.1", 8080),
    )
    .await;
    let dns = start(&ctx, &[]).await;
    let at = dns.addr;
    for (name, qtype) in [
        ("*.registry.", "SOA"),
        ("*.registry.", "A"),
        ("*.web.registry.", "A"),
        ("*._tcp.registry.", "SRV"),
        ("*.web-1.web.registry.", "A"),
    ] {
        // +authority: the SOA of a negative answer is dig's only other line.
        let answer = dig(at, &["+authority", name, qtype]).await;
        assert_eq!(answer.status, "NXDOMAIN", "{name} {qtype}: {answer:?}");
        assert_eq!(
            answer
                .answers
                .iter()
                .map(|a| a.split(' ').take(4).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>(),
            ["registry. 0 IN SOA"],
            "{name} {qtype}: only the SOA, in the authority section: {answer:?}"
        );
    }
    // The real names still answer.
    assert_eq!(dig(at, &["web.registry.", "A"]).await.data(), ["10.0.0.1"]);
    let apex = dig(at, &["registry.", "SOA"]).await;
    assert_eq!((apex.status.as_str(), apex.answers.len()), ("NOERROR", 1));
    assert!(dns.stop().await.success());
    registry.close().await.expect("close");
}

/// A DNS message over TCP holds at most 65,535 bytes: about 1,000 SRV
/// records of this shape, or 2,300 A records (hickory compresses the first
/// 120 names of a message only). A service with more gets, over TCP, the
/// records that fit, with TC set: the first ones in id (or address) order,
/// the same ones on every query.
///
/// This pins what the server does; it passed before the docs were fixed
/// (which said TCP gets everything).
#[tokio::test]
async fn over_tcp_a_too_large_answer_is_the_first_records_that_fit_with_tc() {
    const TOTAL: usize = 2500;
    let ctx = Ctx::new("dns-huge").await;
    let client = timeout(STEP, ctx.etcd.client())
        .await
        .expect("client within the step")
        .expect("client");
    let kvs = (0..TOTAL).map(|i| {
        let instance = ServiceInstance::new(
            "huge",
            format!("huge-{i:04}"),
            format!("10.3.{}.{}", i / 250, i % 250 + 1),
            8000,
        );
        (
            format!("/etcd_registry/{}/services/huge/huge-{i:04}", ctx.ns),
            instance.to_json(),
        )
    });
    timeout(STEP, etcd_registry_testkit::put_batched(&client, kvs))
        .await
        .expect("load within the step")
        .expect("load");
    let dns = start(&ctx, &[]).await;
    let at = dns.addr;
    eventually("the last instance served", || async {
        let last = dig(at, &["+tcp", "huge-2499.huge.registry.", "A"]).await;
        (last.data() == ["10.3.9.250"]).then_some(())
    })
    .await;

    // The service's addresses: as many as fit, TC set, the lowest ones.
    let a = dig(at, &["+tcp", "huge.registry.", "A"]).await;
    assert!(a.truncated(), "TC over TCP: {:?}", a.flags);
    let n = a.answers.len();
    assert!((1000..TOTAL).contains(&n), "{n} A records over TCP");
    let want: Vec<String> = (0..n)
        .map(|i| format!("10.3.{}.{}", i / 250, i % 250 + 1))
        .collect();
    assert_eq!(a.data(), want, "the lowest {n} addresses, in order");

    let first = dig(at, &["+tcp", "_huge._tcp.registry.", "SRV"]).await;
    assert_eq!(first.status, "NOERROR");
    assert!(first.truncated(), "TC over TCP: {:?}", first.flags);
    let n = first.answers.len();
    assert!((1000..TOTAL).contains(&n), "{n} SRV records over TCP");
    let want: Vec<String> = (0..n)
        .map(|i| format!("0 1 8000 huge-{i:04}.huge.registry."))
        .collect();
    assert_eq!(first.data(), want, "the first {n} instances, in id order");
    // The same over and over, and after dig's own UDP-then-TCP retry.
    for _ in 0..3 {
        assert_eq!(
            dig(at, &["+tcp", "_huge._tcp.registry.", "SRV"])
                .await
                .data(),
            want
        );
    }
    assert_eq!(dig(at, &["_huge._tcp.registry.", "SRV"]).await.data(), want);
    let raw = tcp_exchange(at, &query(9, "_huge._tcp.registry.", RecordType::SRV, None)).await;
    assert!(raw.metadata.truncation);
    assert_eq!(raw.answers.len(), n);
    assert!(raw.to_vec().expect("re-encode").len() <= usize::from(u16::MAX));
    assert!(dns.stop().await.success());
}

/// A service whose instances all went is answered NODATA for a while (30 s
/// with a record TTL under that), then not at all (NXDOMAIN): its names are
/// not kept forever. A service that comes back within the hold is served
/// again at once.
#[tokio::test]
async fn an_empty_service_is_nodata_for_a_while_then_its_names_go() {
    let ctx = Ctx::new("dns-prune").await;
    let registry = ctx.registry().await;
    let gone = register(
        &registry,
        ServiceInstance::new("gone", "g-1", "10.0.5.1", 80),
    )
    .await;
    let back = register(
        &registry,
        ServiceInstance::new("back", "b-1", "10.0.6.1", 80),
    )
    .await;
    let dns = start(&ctx, &["--record-ttl", "1s"]).await;
    let at = dns.addr;
    assert_eq!(dig(at, &["gone.registry.", "A"]).await.data(), ["10.0.5.1"]);
    let went = tokio::time::Instant::now();
    timeout(STEP, gone.deregister())
        .await
        .expect("deregister within the step")
        .expect("deregister");
    timeout(STEP, back.set_serving(false))
        .await
        .expect("set_serving within the step")
        .expect("set_serving(false)");
    for name in ["gone.registry.", "back.registry."] {
        let nodata = eventually(&format!("{name} NODATA"), || async {
            Some(dig(at, &[name, "A"]).await).filter(|d| d.answers.is_empty())
        })
        .await;
        assert_eq!(nodata.status, "NOERROR", "{name}: {nodata:?}");
    }
    // Back within the hold.
    timeout(STEP, back.set_serving(true))
        .await
        .expect("set_serving within the step")
        .expect("set_serving(true)");
    eventually("back.registry. served again", || async {
        (dig(at, &["back.registry.", "A"]).await.data() == ["10.0.6.1"]).then_some(())
    })
    .await;
    // No change in etcd after this: the prune must come by itself.
    let bound = Duration::from_secs(90);
    let pruned = loop {
        let srv = dig(at, &["_gone._tcp.registry.", "SRV"]).await;
        let a = dig(at, &["gone.registry.", "A"]).await;
        if srv.status == "NXDOMAIN" && a.status == "NXDOMAIN" {
            break went.elapsed();
        }
        assert!(
            went.elapsed() < bound,
            "gone.registry. still {} / {} after {bound:?}",
            a.status,
            srv.status
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        pruned >= Duration::from_secs(25),
        "NODATA for the hold (30 s), not less: pruned after {pruned:?}"
    );
    assert_eq!(dig(at, &["back.registry.", "A"]).await.data(), ["10.0.6.1"]);
    eprintln!("gone.registry. pruned {pruned:?} after its last instance went");
    assert!(dns.stop().await.success());
    registry.close().await.expect("close");
}
