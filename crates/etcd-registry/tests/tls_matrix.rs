//! TLS with certificates as `openssl` and common PKIs issue them (issue 24,
//! section 2): every certificate and key here is made in the test, by the
//! `openssl` command line or by rcgen, and each case either works against a
//! real TLS etcd or fails with an error that names the cause.
//!
//! One mutual-TLS etcd serves most cases. Its certificate is openssl's RSA,
//! with an IP subjectAltName only, issued by an intermediate CA and served
//! with it (`server.crt` = leaf + intermediate). It trusts a bundle of
//! several client CAs: openssl's root, an rcgen CA, and an rcgen
//! intermediate whose root it does not know.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_registry::{Error, Registry, ServiceInstance, TlsConfig};
use etcd_registry_testkit::{
    CertSpec, CertifiedKey, EtcdServer, KeyType, Openssl, ServerTls, TestCa, unique_name,
};

/// An extensions file for a client certificate: what makes `openssl x509
/// -req` issue X.509 v3.
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\n\
                          keyUsage=critical,digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=clientAuth\n";
const CA_EXT: &str = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n";

/// The openssl PKI of the shared server: root, intermediate, and the
/// server's certificate (IP SAN only) issued by the intermediate.
fn openssl_pki(ssl: &Openssl) {
    let run = |args: &[&str]| ssl.run(args).unwrap();
    ssl.write("ca.ext", CA_EXT).unwrap();
    ssl.write("client.ext", CLIENT_EXT).unwrap();
    ssl.write(
        "server.ext",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "root.key",
        "-out",
        "root.crt",
        "-subj",
        "/CN=openssl root CA",
        "-days",
        "2",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "inter.key",
        "-out",
        "inter.csr",
        "-subj",
        "/CN=openssl intermediate CA",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "inter.csr",
        "-CA",
        "root.crt",
        "-CAkey",
        "root.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ca.ext",
        "-out",
        "inter.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=etcd server",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "inter.crt",
        "-CAkey",
        "inter.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.leaf.crt",
    ]);
    ssl.concat("server.crt", &["server.leaf.crt", "inter.crt"])
        .unwrap();
}

/// A client certificate for `key` (an existing key file), signed by
/// `ca`/`ca.key`, with `ext` as extensions file (`None`: v1).
fn openssl_client(ssl: &Openssl, name: &str, key: &str, ca: &str, ext: Option<&str>) -> String {
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    ssl.run(&[
        "req",
        "-new",
        "-key",
        key,
        "-out",
        &csr,
        "-subj",
        &format!("/CN={name}"),
    ])
    .unwrap();
    let ca_crt = format!("{ca}.crt");
    let ca_key = format!("{ca}.key");
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        &crt,
    ];
    if let Some(ext) = ext {
        args.extend(["-extfile", ext]);
    }
    ssl.run(&args).unwrap();
    crt
}

/// What a case must do.
enum Expect {
    /// Connects, registers and lists.
    Works,
    /// Refused when loaded, with `InvalidInput { field: "tls" }` whose
    /// reason holds every word (file names included).
    Refused(Vec<String>),
    /// Loads, then connect fails after TCP connected, naming the cause.
    Handshake(Vec<String>),
}

struct Case {
    name: &'static str,
    ca: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
    expect: Expect,
}

fn words(ws: &[&str]) -> Vec<String> {
    ws.iter().map(|w| (*w).to_owned()).collect()
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

fn load(case: &Case) -> etcd_registry::Result<TlsConfig> {
    let tls = TlsConfig::new().ca_certificate_file(&case.ca)?;
    match &case.identity {
        Some((cert, key)) => tls.identity_files(cert, key),
        None => Ok(tls),
    }
}

/// Runs one case against `etcd`: what it saw, or how it went wrong.
async fn run_case(etcd: &EtcdServer, case: &Case) -> Result<String, String> {
    let loaded = load(case);
    match (&case.expect, loaded) {
        (Expect::Refused(ws), Err(Error::InvalidInput { field, reason })) => {
            if field != "tls" {
                return Err(format!("field {field}, not tls: {reason}"));
            }
            match ws.iter().find(|w| !reason.contains(w.as_str())) {
                Some(w) => Err(format!("{w:?} missing from: {reason}")),
                None => Ok(format!("refused at load: {reason}")),
            }
        }
        (Expect::Refused(_), other) => Err(format!("expected a refusal at load, got {other:?}")),
        (_, Err(e)) => Err(format!("refused at load: {e}")),
        (expect, Ok(tls)) => {
            let ns = unique_name("tlsm");
            let builder = common::builder(etcd.endpoints(), &ns, 10).tls(tls);
            let connected = etcd_registry_testkit::within(
                "connect",
                Duration::from_secs(30),
                builder.connect(),
            )
            .await;
            match (expect, connected) {
                (Expect::Works, Ok(registry)) => works(&registry).await.map(|()| "works".into()),
                (Expect::Works, Err(e)) => Err(format!("connect failed: {e}")),
                (Expect::Handshake(ws), Err(Error::Connect { reason, .. })) => {
                    let mut ws = ws.clone();
                    ws.push("TCP connected, TLS handshake failed".into());
                    match ws.iter().find(|w| !reason.contains(w.as_str())) {
                        Some(w) => Err(format!("{w:?} missing from: {reason}")),
                        None => Ok(format!("connect failed: {reason}")),
                    }
                }
                (_, other) => Err(format!("expected a handshake failure, got {other:?}")),
            }
        }
    }
}

async fn works(registry: &Registry) -> Result<(), String> {
    let service = unique_name("svc");
    let steps = async {
        let _reg = registry
            .register(ServiceInstance::new(&service, "i1", "127.0.0.1", 80))
            .await?;
        let n = registry.instances(&service).await?.len();
        registry.close().await?;
        Ok::<_, Error>(n)
    };
    match etcd_registry_testkit::within("register and list", Duration::from_secs(20), steps).await {
        Ok(1) => Ok(()),
        Ok(n) => Err(format!("listed {n} instances, not 1")),
        Err(e) => Err(format!("register/list failed: {e}")),
    }
}

/// Runs every case, then fails listing each one that did not behave.
async fn run_all(etcd: &EtcdServer, cases: &[Case]) {
    let mut failed = Vec::new();
    for case in cases {
        match run_case(etcd, case).await {
            Ok(saw) => eprintln!("case {}: {saw}", case.name),
            Err(why) => failed.push(format!("  {}: {why}", case.name)),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

fn pem_file(ssl: &Openssl, name: &str, pem: &str) -> PathBuf {
    ssl.write(name, pem).unwrap()
}

fn rcgen_files(ssl: &Openssl, name: &str, ck: &CertifiedKey) -> (PathBuf, PathBuf) {
    (
        pem_file(ssl, &format!("{name}.crt"), &ck.cert_pem),
        pem_file(ssl, &format!("{name}.key"), &ck.key_pem),
    )
}

// Checked against mutants, each on its own and restored after (tls/check.rs):
// - no v1 check: "openssl v1 client certificate" fails, with rustls's
//   "invalid peer certificate: Other(OtherError(UnsupportedCertVersion))".
// - no expiry check: both expired cases load without error, and fail.
// - no encrypted-key check: both encrypted cases fail ("holds no private
//   key" for PKCS#8, a base64 error for legacy PKCS#1).
// - a key mismatch taken as a match: "do not match" loads, and fails.
// - no extendedKeyUsage check: "a server-only certificate" loads, and fails.
// And in conn.rs `tls_hint`: before it read a received UnknownCA alert as
// the client refusing the server, "intermediate known to nobody" failed on
// etcd 3.5.30 (which sends UnknownCA where 3.4.23 sends BadCertificate).
#[tokio::test]
async fn openssl_and_rcgen_certificates_work_or_fail_clearly() {
    common::init_tracing();
    let ssl = Openssl::new().unwrap();
    openssl_pki(&ssl);
    let f = |name: &str| ssl.path(name);

    // The client CAs etcd trusts: openssl's root, an rcgen CA, and an rcgen
    // intermediate without its root.
    let rc = TestCa::new("rcgen client CA").unwrap();
    let rc_root = TestCa::new("rcgen root, not trusted by etcd").unwrap();
    let rc_inter = rc_root.intermediate("rcgen intermediate").unwrap();
    let trusted = format!(
        "{}{}{}",
        ssl.read("root.crt").unwrap(),
        rc.cert_pem(),
        rc_inter.cert_pem()
    );
    let server = CertifiedKey {
        cert_pem: ssl.read("server.crt").unwrap(),
        key_pem: ssl.read("server.key").unwrap(),
    };
    let server_tls = ServerTls::new(ssl.read("root.crt").unwrap(), server)
        .trusted_ca(trusted, true)
        .client_identity(rc.issue("root", &[]).unwrap());
    let started = std::time::Instant::now();
    let etcd = EtcdServer::builder()
        .name("tls-matrix")
        .tls(server_tls)
        .start()
        .await
        .unwrap();
    eprintln!("TLS etcd started in {:?}", started.elapsed());

    // Keys, as openssl writes them.
    let run = |args: &[&str]| ssl.run(args).unwrap();
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "rsa.p8.key",
    ]);
    run(&[
        "pkey",
        "-in",
        "rsa.p8.key",
        "-traditional",
        "-out",
        "rsa.p1.key",
    ]);
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-out",
        "ec.sec1.key",
    ]);
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "ec.p8.key",
    ]);
    run(&["genpkey", "-algorithm", "ed25519", "-out", "ed.key"]);
    run(&[
        "pkey",
        "-in",
        "rsa.p8.key",
        "-aes256",
        "-passout",
        "pass:secret",
        "-out",
        "enc.p8.key",
    ]);
    run(&[
        "pkey",
        "-in",
        "rsa.p8.key",
        "-traditional",
        "-aes256",
        "-passout",
        "pass:secret",
        "-out",
        "enc.p1.key",
    ]);
    assert!(
        ssl.read("rsa.p1.key")
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
    assert!(
        ssl.read("ec.sec1.key")
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    assert!(
        ssl.read("enc.p8.key")
            .unwrap()
            .contains("BEGIN ENCRYPTED PRIVATE KEY")
    );
    assert!(
        ssl.read("enc.p1.key")
            .unwrap()
            .contains("Proc-Type: 4,ENCRYPTED")
    );

    // Client certificates from openssl's root (v3 with -extfile unless said).
    let rsa = openssl_client(&ssl, "rsa", "rsa.p8.key", "root", Some("client.ext"));
    let ec = openssl_client(&ssl, "ec", "ec.sec1.key", "root", Some("client.ext"));
    let ed = openssl_client(&ssl, "ed", "ed.key", "root", Some("client.ext"));
    let v1 = openssl_client(&ssl, "v1", "rsa.p8.key", "root", None);
    ssl.write("server-only.ext", "extendedKeyUsage=serverAuth\n")
        .unwrap();
    let srv_only = openssl_client(
        &ssl,
        "srvonly",
        "ec.p8.key",
        "root",
        Some("server-only.ext"),
    );
    // From the intermediate: served with it (a chain), or alone.
    let via_inter = openssl_client(&ssl, "via-inter", "ec.p8.key", "inter", Some("client.ext"));
    ssl.concat("via-inter.chain.crt", &[&via_inter, "inter.crt"])
        .unwrap();
    // CA files for the client side.
    let other = TestCa::new("a CA nobody uses").unwrap();
    pem_file(&ssl, "other.crt", other.cert_pem());
    ssl.concat("bundle.crt", &["other.crt", "root.crt"])
        .unwrap();
    ssl.concat("root-inter.crt", &["root.crt", "inter.crt"])
        .unwrap();

    // rcgen clients.
    let rc_p256 = rcgen_files(
        &ssl,
        "rc-p256",
        &rc.issue_with(&CertSpec::new("p256", &[])).unwrap(),
    );
    let rc_p384 = rcgen_files(
        &ssl,
        "rc-p384",
        &rc.issue_with(&CertSpec::new("p384", &[]).key(KeyType::EcdsaP384))
            .unwrap(),
    );
    let rc_ed = rcgen_files(
        &ssl,
        "rc-ed",
        &rc.issue_with(&CertSpec::new("ed", &[]).key(KeyType::Ed25519))
            .unwrap(),
    );
    let rc_via_inter = rcgen_files(&ssl, "rc-inter", &rc_inter.issue("leaf", &[]).unwrap());
    let rc_expired = rcgen_files(
        &ssl,
        "rc-expired",
        &rc.issue_with(&CertSpec::new("old", &[]).expired()).unwrap(),
    );
    let ossl_expired = {
        let csr = "expired.csr";
        run(&[
            "req",
            "-new",
            "-key",
            "ec.p8.key",
            "-out",
            csr,
            "-subj",
            "/CN=expired",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            "root.crt",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "-1",
            "-extfile",
            "client.ext",
            "-out",
            "expired.crt",
        ]);
        f("expired.crt")
    };

    let root = f("root.crt");
    let id = |cert: &str, key: &str| Some((f(cert), f(key)));
    let case = |name, identity, expect| Case {
        name,
        ca: root.clone(),
        identity,
        expect,
    };
    let cases = vec![
        // Key types and key file formats (openssl).
        case(
            "openssl RSA, PKCS#8 key",
            id(&rsa, "rsa.p8.key"),
            Expect::Works,
        ),
        case(
            "openssl RSA, PKCS#1 key",
            id(&rsa, "rsa.p1.key"),
            Expect::Works,
        ),
        case(
            "openssl ECDSA P-256, SEC1 key",
            id(&ec, "ec.sec1.key"),
            Expect::Works,
        ),
        case(
            "openssl Ed25519, PKCS#8 key",
            id(&ed, "ed.key"),
            Expect::Works,
        ),
        // Key types (rcgen).
        case("rcgen ECDSA P-256", Some(rc_p256.clone()), Expect::Works),
        case("rcgen ECDSA P-384", Some(rc_p384), Expect::Works),
        case("rcgen Ed25519", Some(rc_ed), Expect::Works),
        // Chains.
        case(
            "openssl intermediate in the certificate file",
            id("via-inter.chain.crt", "ec.p8.key"),
            Expect::Works,
        ),
        case(
            "openssl intermediate known to nobody (leaf alone)",
            id(&via_inter, "ec.p8.key"),
            Expect::Handshake(words(&["refused the client certificate"])),
        ),
        case(
            "rcgen intermediate in etcd's CA bundle (leaf alone)",
            Some(rc_via_inter),
            Expect::Works,
        ),
        // The client's CA file.
        Case {
            name: "CA bundle of several CAs",
            ca: f("bundle.crt"),
            identity: id(&rsa, "rsa.p8.key"),
            expect: Expect::Works,
        },
        Case {
            name: "CA bundle of root and intermediate",
            ca: f("root-inter.crt"),
            identity: id(&rsa, "rsa.p8.key"),
            expect: Expect::Works,
        },
        Case {
            name: "the intermediate alone as CA",
            ca: f("inter.crt"),
            identity: id(&rsa, "rsa.p8.key"),
            expect: Expect::Works,
        },
        Case {
            name: "a CA that did not sign the server",
            ca: f("other.crt"),
            identity: id(&rsa, "rsa.p8.key"),
            expect: Expect::Handshake(words(&["UnknownIssuer", "trusted CA"])),
        },
        Case {
            name: "a key given as CA",
            ca: f("rsa.p8.key"),
            identity: None,
            expect: Expect::Refused(words(&["rsa.p8.key", "no CERTIFICATE"])),
        },
        // Refused when loaded.
        case(
            "openssl v1 client certificate",
            id(&v1, "rsa.p8.key"),
            Expect::Refused(vec![
                shown(&f(&v1)),
                "X.509 v1 certificate: no extensions".into(),
                "-extfile".into(),
            ]),
        ),
        case(
            "encrypted PKCS#8 key",
            id(&rsa, "enc.p8.key"),
            Expect::Refused(vec![shown(&f("enc.p8.key")), "encrypted".into()]),
        ),
        case(
            "encrypted PKCS#1 key",
            id(&rsa, "enc.p1.key"),
            Expect::Refused(vec![shown(&f("enc.p1.key")), "encrypted".into()]),
        ),
        case(
            "certificate and key that do not match",
            id(&rsa, "ed.key"),
            Expect::Refused(vec![
                shown(&f(&rsa)),
                shown(&f("ed.key")),
                "do not match".into(),
            ]),
        ),
        case(
            "certificate and key swapped",
            id("rsa.p8.key", &rsa),
            Expect::Refused(words(&["no CERTIFICATE", "swapped"])),
        ),
        case(
            "rcgen expired client certificate",
            Some(rc_expired.clone()),
            Expect::Refused(vec![shown(&rc_expired.0), "expired on 2021-01-01".into()]),
        ),
        Case {
            name: "openssl expired client certificate",
            ca: root.clone(),
            identity: Some((ossl_expired.clone(), f("ec.p8.key"))),
            expect: Expect::Refused(vec![shown(&ossl_expired), "expired".into()]),
        },
        case(
            "a server-only certificate as client",
            id(&srv_only, "ec.p8.key"),
            Expect::Refused(vec![shown(&f(&srv_only)), "clientAuth".into()]),
        ),
    ];
    let started = std::time::Instant::now();
    run_all(&etcd, &cases).await;
    eprintln!("{} cases in {:?}", cases.len(), started.elapsed());

    // The server's certificate names only 127.0.0.1.
    let tls = TlsConfig::new()
        .ca_certificate_file(&root)
        .unwrap()
        .identity_files(&rc_p256.0, &rc_p256.1)
        .unwrap()
        .domain_name("localhost");
    let ns = unique_name("tlsm");
    match common::builder(etcd.endpoints(), &ns, 10)
        .tls(tls)
        .connect()
        .await
    {
        Err(Error::Connect { reason, .. }) => assert!(
            reason.contains("TCP connected, TLS handshake failed") && reason.contains("name"),
            "{reason}"
        ),
        other => panic!("expected a name mismatch, got {other:?}"),
    }
}

/// A server on an Ed25519 key from an Ed25519 CA (rcgen), and a client on
/// the same.
#[tokio::test]
async fn an_ed25519_server_and_client_work() {
    common::init_tracing();
    let ca = TestCa::with_key("ed25519 CA", KeyType::Ed25519).unwrap();
    let server = ca
        .issue_with(&CertSpec::new("etcd", &["127.0.0.1"]).key(KeyType::Ed25519))
        .unwrap();
    let client = ca
        .issue_with(&CertSpec::new("client", &[]).key(KeyType::Ed25519))
        .unwrap();
    let etcd = EtcdServer::builder()
        .name("tls-ed25519")
        .tls(
            ServerTls::new(ca.cert_pem(), server)
                .require_client_certs(&ca)
                .unwrap(),
        )
        .start()
        .await
        .unwrap();
    let ns = unique_name("tlsm");
    let tls = TlsConfig::new()
        .ca_certificate(ca.cert_pem())
        .identity(client.cert_pem, client.key_pem);
    let registry = common::connect_with(common::builder(etcd.endpoints(), &ns, 10).tls(tls)).await;
    works(&registry).await.unwrap();
}

/// etcd serving an openssl X.509 v1 certificate (no extensions, so no
/// subjectAltName): etcdctl would take it, rustls does not, and the error
/// says so.
// Checked against the mutant: without the typed rustls lookup in conn.rs
// `describe_connect_error`, the reason is rustls's bare
// "Other(OtherError(UnsupportedCertVersion))" and this fails.
#[tokio::test]
async fn a_v1_server_certificate_is_named_in_the_handshake_error() {
    common::init_tracing();
    let ssl = Openssl::new().unwrap();
    let run = |args: &[&str]| ssl.run(args).unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=v1 test CA",
        "-days",
        "2",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.crt",
    ]);
    let server = CertifiedKey {
        cert_pem: ssl.read("server.crt").unwrap(),
        key_pem: ssl.read("server.key").unwrap(),
    };
    let etcd = EtcdServer::builder()
        .name("tls-v1-server")
        .tls(ServerTls::new(ssl.read("ca.crt").unwrap(), server))
        .start()
        .await
        .unwrap();
    let tls = TlsConfig::new()
        .ca_certificate_file(ssl.path("ca.crt"))
        .unwrap();
    let ns = unique_name("tlsm");
    match common::builder(etcd.endpoints(), &ns, 10)
        .tls(tls)
        .connect()
        .await
    {
        Err(Error::Connect { reason, .. }) => {
            for w in [
                "TCP connected, TLS handshake failed",
                "X.509 v1",
                "-extfile",
            ] {
                assert!(reason.contains(w), "{w:?} missing from: {reason}");
            }
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }
}

/// A plain-text etcd dialled with TLS settings: TCP connects, etcd hangs up
/// on the ClientHello, and the error says so and suggests http://.
// Checked against the mutant: without the "tls handshake eof" branch of
// conn.rs `tls_hint`, the hint is the generic one and this fails.
#[tokio::test]
async fn a_plain_text_etcd_dialled_with_tls_says_so() {
    common::init_tracing();
    let etcd = EtcdServer::builder()
        .name("tls-plain")
        .start()
        .await
        .unwrap();
    let ca = TestCa::new("unused CA").unwrap();
    let bare = etcd.endpoint().replace("http://", "");
    let ns = unique_name("tlsm");
    match common::builder(vec![bare], &ns, 10)
        .tls(TlsConfig::new().ca_certificate(ca.cert_pem()))
        .connect()
        .await
    {
        Err(Error::Connect { reason, .. }) => {
            for w in [
                "TCP connected, TLS handshake failed",
                "plain text",
                "http://",
            ] {
                assert!(reason.contains(w), "{w:?} missing from: {reason}");
            }
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }
}
