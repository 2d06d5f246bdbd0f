//! The binary against a secured etcd: mutual TLS through --cacert/--cert/--key
//! (and their environment variables), clear failures for a missing client
//! certificate or CA, and RBAC refusals that name the key.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use etcd_registry_testkit::{EtcdServer, TestCa, unique_name};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_etcd-registry");
const STEP: Duration = Duration::from_secs(20);

/// The binary with no connection settings from the environment.
fn command(endpoint: &str, ns: &str) -> Command {
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
    ])
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

/// PEM files of one test, removed when dropped.
struct Files(PathBuf);

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("etcd-registry-cli-tls"));
        std::fs::create_dir_all(&dir).unwrap();
        Files(dir)
    }
    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn arg(flag: &str, path: &Path) -> [String; 2] {
    [flag.to_owned(), path.display().to_string()]
}

#[tokio::test]
async fn mutual_tls_register_and_list_and_clear_tls_failures() {
    let ca = TestCa::new("cli test CA").unwrap();
    let server_tls = ca.server_tls().unwrap().require_client_certs(&ca).unwrap();
    let etcd = EtcdServer::builder()
        .name("cli-mtls")
        .tls(server_tls)
        .start()
        .await
        .unwrap();
    let ns = unique_name("cli-mtls");
    let files = Files::new();
    let client = ca.issue("cli", &[]).unwrap();
    let cacert = files.write("ca.crt", ca.cert_pem());
    let cert = files.write("client.crt", &client.cert_pem);
    let key = files.write("client.key", &client.key_pem);

    // register through the environment variables...
    let mut register = command(&etcd.endpoint(), &ns);
    register
        .env("ETCD_CACERT", &cacert)
        .env("ETCD_CERT", &cert)
        .env("ETCD_KEY", &key)
        .args([
            "register", "web", "web-1", "10.0.0.7", "8080", "--for", "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = register.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = timeout(STEP, lines.next_line())
        .await
        .expect("register printed in time")
        .unwrap()
        .unwrap_or_default();
    assert!(first.starts_with("registered web/web-1"), "{first}");

    // ...and list through the flags.
    let mut list = command(&etcd.endpoint(), &ns);
    list.args(arg("--cacert", &cacert))
        .args(arg("--cert", &cert))
        .args(arg("--key", &key))
        .args(["list", "web"]);
    let out = run(list).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("web-1"));
    child.kill().await.unwrap();

    // No client certificate: refused by etcd, exit 1, and says what to check.
    let mut list = command(&etcd.endpoint(), &ns);
    list.args(arg("--cacert", &cacert)).args(["list", "web"]);
    let out = run(list).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("TLS") && err.contains("client certificate"),
        "{err}"
    );

    // No CA: the system roots do not know the test CA.
    let mut list = command(&etcd.endpoint(), &ns);
    list.args(arg("--cert", &cert))
        .args(arg("--key", &key))
        .args(["list", "web"]);
    let out = run(list).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("TLS") && err.contains("CA"), "{err}");

    // An unreadable CA file is named before anything is sent (a usage error).
    let mut list = command(&etcd.endpoint(), &ns);
    list.args(["--cacert", "/nonexistent/ca.crt", "list"]);
    let out = run(list).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/ca.crt"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_refused_permission_exits_1_naming_the_key() {
    let etcd = EtcdServer::builder()
        .name("cli-rbac")
        .start()
        .await
        .unwrap();
    let (own, foreign) = (unique_name("own"), unique_name("foreign"));
    etcd.enable_auth("root-pw-cli").await.unwrap();
    etcd.add_namespace_user("root-pw-cli", "dave", "dave-pw", "/etcd_registry", &own)
        .await
        .unwrap();
    let user = ["--user", "dave", "--password", "dave-pw"];

    let mut ok = command(&etcd.endpoint(), &own);
    ok.args(user).args(["list"]);
    let out = run(ok).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // The password from the environment and the user from the command line.
    let mut mixed = command(&etcd.endpoint(), &own);
    mixed
        .env("ETCD_PASSWORD", "dave-pw")
        .args(["--user", "dave", "list"]);
    let out = run(mixed).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let mut refused = command(&etcd.endpoint(), &foreign);
    refused
        .args(user)
        .args(["register", "web", "web-1", "127.0.0.1", "80", "--for", "1"]);
    let out = run(refused).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains(&format!("/etcd_registry/{foreign}/services/web/web-1")),
        "{err}"
    );

    let mut wrong = command(&etcd.endpoint(), &own);
    wrong.args(["--user", "dave", "--password", "nope-pw", "list"]);
    let out = run(wrong).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("authentication failed") && err.contains("dave"),
        "{err}"
    );
    assert!(!err.contains("nope-pw"), "{err}");
}
