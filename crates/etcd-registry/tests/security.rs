//! TLS, mutual TLS, auth and RBAC against real etcd: every server here is
//! started by the testkit with certificates generated at run time.

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_registry::{Error, Registry, RegistryBuilder, ServiceEvent, ServiceInstance, TlsConfig};
use etcd_registry_testkit::{CertifiedKey, EtcdServer, ROOT_USER, TestCa, unique_name};
use futures::StreamExt;
use tokio::time::Instant;

const ROOT_PASSWORD: &str = "root-pw-8c1f";
const PREFIX: &str = "/etcd_registry";

async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    etcd_registry_testkit::within(what, Duration::from_secs(secs), f).await
}

fn inst(name: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(name, id, "127.0.0.1", port)
}

fn tls_for(ca: &TestCa) -> TlsConfig {
    TlsConfig::new().ca_certificate(ca.cert_pem())
}

fn mtls_for(ca: &TestCa, client: &CertifiedKey) -> TlsConfig {
    tls_for(ca).identity(client.cert_pem.clone(), client.key_pem.clone())
}

/// Connects and expects failure; returns the error and how long it took.
async fn connect_err(builder: RegistryBuilder) -> (Error, Duration) {
    let started = Instant::now();
    match within(30, "failing connect", builder.connect()).await {
        Ok(_) => panic!("connect should have failed"),
        Err(e) => (e, started.elapsed()),
    }
}

/// Register, list, watch, cache and elect all work on `registry`.
async fn everything_works(registry: &Registry, tag: &str) {
    let service = unique_name("svc");
    let _me = within(
        20,
        "register",
        registry.register(inst(&service, "i1", 8080)),
    )
    .await
    .expect("register");
    let listed = within(20, "list", registry.instances(&service))
        .await
        .expect("list");
    assert_eq!(listed.len(), 1, "{tag}: list");
    let mut watch = registry.watch(&service).expect("watch");
    match within(20, "watch snapshot", watch.next()).await {
        Some(ServiceEvent::Snapshot(all)) => assert_eq!(all.len(), 1, "{tag}: watch"),
        other => panic!("{tag}: expected a snapshot, got {other:?}"),
    }
    let cache = within(20, "cache", registry.cache(&service))
        .await
        .expect("cache");
    assert_eq!(cache.instances().len(), 1, "{tag}: cache");
    let election = registry.election(&unique_name("job")).expect("election");
    let leadership = within(20, "campaign", election.campaign("me"))
        .await
        .expect("campaign");
    let leader = within(20, "leader", election.leader())
        .await
        .expect("leader")
        .expect("a leader");
    assert_eq!(leader.fencing_token, leadership.fencing_token(), "{tag}");
    within(20, "resign", leadership.resign())
        .await
        .expect("resign");
}

fn assert_tls_connect_error(e: &Error, expect: &[&str]) {
    match e {
        Error::Connect { reason, .. } => {
            assert!(reason.contains("TLS"), "not labelled as TLS: {reason}");
            for word in expect {
                assert!(reason.contains(word), "{word:?} missing from: {reason}");
            }
        }
        other => panic!("expected Error::Connect, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_works_and_a_wrong_ca_or_name_fails_clearly() {
    common::init_tracing();
    let ca = TestCa::new("etcd test CA").unwrap();
    let etcd = EtcdServer::builder()
        .name("tls")
        .tls(ca.server_tls().unwrap())
        .start()
        .await
        .unwrap();
    assert!(etcd.endpoint().starts_with("https://"));
    let ns = unique_name("tls");

    let registry =
        common::connect_with(common::builder(etcd.endpoints(), &ns, 10).tls(tls_for(&ca))).await;
    everything_works(&registry, "tls").await;
    registry.close().await.unwrap();

    // A CA that did not sign the server's certificate.
    let other = TestCa::new("another CA").unwrap();
    let dial = Duration::from_secs(3);
    let (e, took) =
        connect_err(common::builder(etcd.endpoints(), &ns, 10).tls(tls_for(&other))).await;
    assert_tls_connect_error(&e, &["CA", &etcd.endpoint()]);
    assert!(took < dial + Duration::from_secs(5), "took {took:?}");

    // The certificate names localhost and 127.0.0.1, not this name.
    let (e, _) = connect_err(
        common::builder(etcd.endpoints(), &ns, 10)
            .tls(tls_for(&ca).domain_name("db.example.invalid")),
    )
    .await;
    assert_tls_connect_error(&e, &["name"]);

    // A plain-text client cannot talk to it either, and says where it failed.
    let plain = etcd.endpoint().replace("https://", "http://");
    let (e, _) = connect_err(common::builder(vec![plain.clone()], &ns, 10)).await;
    assert!(
        matches!(&e, Error::Connect { reason, .. } if reason.contains(&plain)),
        "{e}"
    );
}

// Checked against the mutant: with the "connection closed right after the
// handshake" reading of a refused client certificate turned off (conn.rs
// `tls_hint`), this failed in 4 of 6 runs; etcd's refusal races the first request.
#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_trusted_ca() {
    common::init_tracing();
    let ca = TestCa::new("etcd test CA").unwrap();
    let server_tls = ca.server_tls().unwrap().require_client_certs(&ca).unwrap();
    let etcd = EtcdServer::builder()
        .name("mtls")
        .tls(server_tls)
        .start()
        .await
        .unwrap();
    let ns = unique_name("mtls");
    let client = ca.issue("client-1", &[]).unwrap();

    let registry = common::connect_with(
        common::builder(etcd.endpoints(), &ns, 10).tls(mtls_for(&ca, &client)),
    )
    .await;
    everything_works(&registry, "mtls").await;
    registry.close().await.unwrap();

    // Bare host:port endpoints go over TLS when a TlsConfig is set.
    let bare = etcd.endpoint().replace("https://", "");
    let registry =
        common::connect_with(common::builder(vec![bare], &ns, 10).tls(mtls_for(&ca, &client)))
            .await;
    registry.close().await.unwrap();

    let (e, _) = connect_err(common::builder(etcd.endpoints(), &ns, 10).tls(tls_for(&ca))).await;
    assert_tls_connect_error(&e, &["client certificate"]);

    let other = TestCa::new("another CA").unwrap();
    let stranger = other.issue("client-1", &[]).unwrap();
    let (e, _) =
        connect_err(common::builder(etcd.endpoints(), &ns, 10).tls(mtls_for(&ca, &stranger))).await;
    assert_tls_connect_error(&e, &["client certificate"]);
}

/// Everything under `{PREFIX}/{ns}/`, read as root.
async fn keys_under(etcd: &EtcdServer, ns: &str) -> usize {
    let mut root = etcd.client_as(ROOT_USER, ROOT_PASSWORD).await.unwrap();
    let resp = within(
        10,
        "root get",
        root.get(
            format!("{PREFIX}/{ns}/"),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        ),
    )
    .await
    .unwrap();
    resp.count() as usize
}

fn assert_denied<T: std::fmt::Debug>(r: etcd_registry::Result<T>, op: &str, key_part: &str) {
    match r {
        Err(Error::PermissionDenied { op: o, key }) => {
            assert_eq!(o, op);
            assert!(key.contains(key_part), "{key:?} should name {key_part:?}");
        }
        other => panic!("expected PermissionDenied for {op}, got {other:?}"),
    }
}

// Checked against the mutant: with etcd's PermissionDenied status not mapped
// (error.rs `is_permission_denied`), this fails at the first refused put.
#[tokio::test]
async fn rbac_confines_a_user_to_its_namespace() {
    common::init_tracing();
    let etcd = EtcdServer::builder().name("rbac").start().await.unwrap();
    let (own, foreign) = (unique_name("own"), unique_name("foreign"));
    etcd.enable_auth(ROOT_PASSWORD).await.unwrap();
    etcd.add_namespace_user(ROOT_PASSWORD, "alice", "alice-pw-77", PREFIX, &own)
        .await
        .unwrap();
    // Someone else's instance in the foreign namespace, to see that alice's
    // admin deletes do not remove it.
    let root = common::connect_with(
        common::builder(etcd.endpoints(), &foreign, 10).auth(ROOT_USER, ROOT_PASSWORD),
    )
    .await;
    let _theirs = root.register(inst("web", "theirs", 1)).await.unwrap();
    let before = keys_under(&etcd, &foreign).await;
    assert_eq!(before, 1);

    let mine = common::connect_with(
        common::builder(etcd.endpoints(), &own, 10).auth("alice", "alice-pw-77"),
    )
    .await;
    everything_works(&mine, "own namespace").await;
    mine.close().await.unwrap();

    let other = common::connect_with(
        common::builder(etcd.endpoints(), &foreign, 10).auth("alice", "alice-pw-77"),
    )
    .await;
    let web = format!("{PREFIX}/{foreign}/services/web/");
    assert_denied(
        within(20, "register", other.register(inst("web", "i1", 1))).await,
        "put",
        &format!("{web}i1"),
    );
    assert_denied(
        within(20, "list", other.instances("web")).await,
        "get",
        &web,
    );
    assert_denied(
        within(20, "list all", other.all_instances()).await,
        "get",
        &foreign,
    );
    assert_denied(
        within(20, "cache", other.cache("web")).await,
        "watch list",
        &web,
    );
    let mut watch = other.watch("web").unwrap();
    assert!(
        within(20, "refused watch ends", watch.next())
            .await
            .is_none(),
        "a refused watch ends"
    );
    assert_denied(watch.error().map_or(Ok(()), Err), "watch list", &web);
    let election = other.election("job").unwrap();
    assert_denied(
        within(20, "campaign", election.campaign("me")).await,
        "campaign",
        &format!("{PREFIX}/{foreign}/elections/job"),
    );
    assert_denied(within(20, "leader", election.leader()).await, "get", "job");
    assert_denied(
        within(
            20,
            "delete instance",
            other.delete_instance("web", "theirs"),
        )
        .await,
        "delete",
        &format!("{web}theirs"),
    );
    assert_denied(
        within(20, "delete service", other.delete_service("web")).await,
        "delete",
        &web,
    );
    assert_eq!(
        keys_under(&etcd, &foreign).await,
        before,
        "nothing was written or deleted"
    );
    other.close().await.unwrap();
    root.close().await.unwrap();

    // A wrong password is an authentication error at connect, naming the user.
    let (e, _) =
        connect_err(common::builder(etcd.endpoints(), &own, 10).auth("alice", "wrong-pw-31")).await;
    match &e {
        Error::Auth { user, .. } => assert_eq!(user, "alice"),
        other => panic!("expected Error::Auth, got {other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("authentication failed") && text.contains("alice"),
        "{text}"
    );
    assert!(!text.contains("wrong-pw-31"), "{text}");
    assert!(
        !text.contains("timed out") && !text.contains("could not reach"),
        "{text}"
    );
}

/// With 2 s auth tokens, 15 s of work sees no error: the tokens are renewed.
#[tokio::test]
async fn expiring_auth_tokens_are_renewed_without_errors() {
    common::init_tracing();
    let etcd = EtcdServer::builder()
        .name("token-ttl")
        .auth_token_ttl(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let ns = unique_name("tokens");
    etcd.enable_auth(ROOT_PASSWORD).await.unwrap();
    etcd.add_namespace_user(ROOT_PASSWORD, "bob", "bob-pw-5", PREFIX, &ns)
        .await
        .unwrap();
    let connect =
        || common::connect_with(common::builder(etcd.endpoints(), &ns, 4).auth("bob", "bob-pw-5"));
    let (writer, reader) = (connect().await, connect().await);

    let mut regs = Vec::new();
    for i in 0..10 {
        regs.push(
            within(
                20,
                "register",
                writer.register(inst("api", &format!("i{i}"), 8000 + i)),
            )
            .await
            .expect("register"),
        );
    }
    let cache = within(20, "cache", reader.cache("api"))
        .await
        .expect("cache");
    assert_eq!(cache.instances().len(), 10);
    let election = writer.election("cron").unwrap();
    let leadership = within(20, "campaign", election.campaign("writer"))
        .await
        .expect("campaign");
    let candidate_election = reader.election("cron").unwrap();
    let candidate = tokio::spawn(async move { candidate_election.campaign("reader").await });

    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(15) {
        round += 1;
        // Idle longer than the token TTL, so every round starts on an expired token.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let version = format!("v{round}");
        within(
            20,
            "update",
            regs[0].update(inst("api", "i0", 8000).with_version(&version)),
        )
        .await
        .expect("update after token expiry");
        etcd_registry_testkit::eventually(
            "the cache keeps seeing changes",
            Duration::from_secs(10),
            || {
                let version = version.clone();
                let cache = &cache;
                async move { cache.get("i0").is_some_and(|i| i.version == version) }
            },
        )
        .await;
        assert!(
            leadership.lost_reason().is_none(),
            "leadership lost at round {round}"
        );
        assert!(
            !candidate.is_finished(),
            "the candidate stopped campaigning"
        );
        let listed = within(20, "list", reader.instances("api"))
            .await
            .expect("list");
        assert_eq!(listed.len(), 10);
    }
    assert!(round >= 4, "only {round} rounds");
    assert!(matches!(
        *writer.state().borrow(),
        etcd_registry::RegistryState::Active { .. }
    ));
    assert!(matches!(
        *reader.state().borrow(),
        etcd_registry::RegistryState::Active { .. }
    ));
    within(20, "resign", leadership.resign())
        .await
        .expect("resign");
    let taken = within(20, "candidate wins", candidate)
        .await
        .expect("join")
        .expect("the candidate wins once the leader resigns");
    drop(taken);
    reader.close().await.unwrap();
    writer.close().await.unwrap();
}

/// Collects every formatted log line, at every level, of every crate.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

// Checked against the mutant: with `Credentials`' Debug showing the password,
// this fails on the builder's Debug output.
#[tokio::test]
async fn secrets_appear_in_no_log_line_debug_output_or_error() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    // The test runtime is single-threaded: every task of this test logs here.
    let _guard = tracing::subscriber::set_default(subscriber);

    let ca = TestCa::new("etcd test CA").unwrap();
    let server_tls = ca.server_tls().unwrap().require_client_certs(&ca).unwrap();
    let etcd = EtcdServer::builder()
        .name("secrets")
        .tls(server_tls)
        .start()
        .await
        .unwrap();
    let ns = unique_name("secrets");
    let password = "pw-Zq7-never-logged";
    etcd.enable_auth(ROOT_PASSWORD).await.unwrap();
    etcd.add_namespace_user(ROOT_PASSWORD, "carol", password, PREFIX, &ns)
        .await
        .unwrap();
    let client = ca.issue("carol", &[]).unwrap();
    // The key's base64 body, without the PEM armour that every key shares.
    let key_body: String = client
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(key_body.len() > 40);
    let tls = mtls_for(&ca, &client);
    let builder = Registry::builder()
        .endpoints(etcd.endpoints())
        .namespace(&ns)
        .ttl(Duration::from_secs(4))
        .auth("carol", password)
        .tls(tls.clone());

    let mut debug = vec![format!("{builder:?}"), format!("{tls:?}")];
    let registry = within(30, "connect", builder.clone().connect())
        .await
        .expect("connect");
    debug.push(format!("{registry:?}"));
    debug.push(format!("{:?}", registry.config()));
    everything_works(&registry, "secrets").await;
    registry.close().await.unwrap();

    let (e, _) = connect_err(builder.clone().auth("carol", "wrong-pw-Zq7")).await;
    debug.push(format!("{e:?}"));
    debug.push(e.to_string());
    let (e, _) = connect_err(builder.tls(tls_for(&ca))).await;
    debug.push(format!("{e:?}"));
    debug.push(e.to_string());

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.lines().count() > 50,
        "trace logging captured too little to prove anything:\n{logs}"
    );
    let key_part = &key_body[..40];
    for (what, text) in debug
        .iter()
        .map(|d| ("debug/error", d.as_str()))
        .chain([("logs", logs.as_str())])
    {
        for secret in [password, "wrong-pw-Zq7", key_part] {
            assert!(
                !text.contains(secret),
                "{what} holds a secret ({secret}):\n{text}"
            );
        }
    }
}
