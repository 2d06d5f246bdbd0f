//! The binary with certificates made by the `openssl` command line (issue
//! 24, section 2): an X.509 v1 client certificate is refused when loaded,
//! naming the file and the fix; the same key in a v3 certificate works; a
//! failed TLS handshake never gets the "is etcd running there?" hint, which
//! stays for a refused connect.

use std::process::{Output, Stdio};
use std::time::Duration;

use etcd_registry_testkit::{CertifiedKey, EtcdServer, Openssl, ServerTls, TestCa, unique_name};
use tokio::process::Command;
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_etcd-registry");
const STEP: Duration = Duration::from_secs(20);
const RUNNING_HINT: &str = "is etcd running there?";

/// The binary with no connection settings from the environment.
fn command(endpoint: &str, ns: &str, tls: &[(&str, &std::path::Path)]) -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "ETCD_ENDPOINTS",
        "ETCD_REGISTRY_NAMESPACE",
        "ETCD_REGISTRY_PREFIX",
        "ETCD_USER",
        "ETCD_PASSWORD",
        "ETCD_CACERT",
        "ETCD_CERT",
        "ETCD_KEY",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.args([
        "--endpoints",
        endpoint,
        "--namespace",
        ns,
        "--dial-timeout",
        "3",
    ]);
    for (flag, path) in tls {
        cmd.arg(flag).arg(path);
    }
    cmd.args(["list", "web"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> Output {
    timeout(STEP, cmd.output())
        .await
        .expect("the command finished in time")
        .expect("the command ran")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// Checked against mutants, each restored after:
// - the library's v1 check off (etcd-registry src/tls/check.rs): the v1 run
//   still exits 2 (rustls's key check refuses it) but says only "invalid
//   peer certificate: Other(OtherError(UnsupportedCertVersion))", and fails.
// - src/common/error.rs `is_tls_failure` always false: the wrong-CA run gets the
//   hint "is etcd running there?", and fails.
#[tokio::test]
async fn openssl_v1_is_refused_at_load_v3_works_and_tls_failures_say_so() {
    let ssl = Openssl::new().unwrap();
    let run_ssl = |args: &[&str]| ssl.run(args).unwrap();
    // A CA, and an etcd certificate for 127.0.0.1, as the README shows.
    ssl.write(
        "server.ext",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    ssl.write("client.ext", "extendedKeyUsage=clientAuth\n")
        .unwrap();
    run_ssl(&[
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
        "/CN=cli test CA",
        "-days",
        "2",
    ]);
    for (name, ext) in [
        ("server", Some("server.ext")),
        ("v1", None),
        ("v3", Some("client.ext")),
    ] {
        let key = if name == "server" {
            "server.key"
        } else {
            "client.key"
        };
        if name != "v3" {
            run_ssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                key,
            ]);
        }
        let csr = format!("{name}.csr");
        let crt = format!("{name}.crt");
        run_ssl(&[
            "req",
            "-new",
            "-key",
            key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
        ];
        if let Some(ext) = ext {
            args.extend(["-extfile", ext]);
        }
        run_ssl(&args);
    }
    let ca_pem = ssl.read("ca.crt").unwrap();
    let server = CertifiedKey {
        cert_pem: ssl.read("server.crt").unwrap(),
        key_pem: ssl.read("server.key").unwrap(),
    };
    let testkit_ca = TestCa::new("testkit client CA").unwrap();
    let trusted = format!("{ca_pem}{}", testkit_ca.cert_pem());
    let etcd = EtcdServer::builder()
        .name("cli-openssl")
        .tls(
            ServerTls::new(ca_pem, server)
                .trusted_ca(trusted, true)
                .client_identity(testkit_ca.issue("root", &[]).unwrap()),
        )
        .start()
        .await
        .unwrap();
    let ns = unique_name("cli-openssl");
    let (ca, key) = (ssl.path("ca.crt"), ssl.path("client.key"));
    let (v1, v3) = (ssl.path("v1.crt"), ssl.path("v3.crt"));

    // v1: refused before anything is sent, naming the file and the fix.
    let out = run(command(
        &etcd.endpoint(),
        &ns,
        &[("--cacert", &ca), ("--cert", &v1), ("--key", &key)],
    ))
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for w in [
        &v1.display().to_string(),
        "X.509 v1 certificate: no extensions",
        "-extfile",
    ] {
        assert!(err.contains(w), "{w:?} missing from: {err}");
    }
    assert!(!err.contains(RUNNING_HINT), "{err}");

    // The same key in a v3 certificate works.
    let out = run(command(
        &etcd.endpoint(),
        &ns,
        &[("--cacert", &ca), ("--cert", &v3), ("--key", &key)],
    ))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // A CA that did not sign the server: TCP connected, the handshake failed.
    let other = ssl
        .write("other.crt", TestCa::new("other CA").unwrap().cert_pem())
        .unwrap();
    let out = run(command(
        &etcd.endpoint(),
        &ns,
        &[("--cacert", &other), ("--cert", &v3), ("--key", &key)],
    ))
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "TCP connected, TLS handshake failed: invalid peer certificate: UnknownIssuer"
        ),
        "{err}"
    );
    assert!(!err.contains(RUNNING_HINT), "{err}");

    // Nothing listening: the hint stays.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = run(command(
        &format!("https://127.0.0.1:{closed}"),
        &ns,
        &[("--cacert", &ca), ("--cert", &v3), ("--key", &key)],
    ))
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(RUNNING_HINT), "{err}");
    assert!(!err.contains("TLS handshake failed"), "{err}");
}
