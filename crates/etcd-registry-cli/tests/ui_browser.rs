//! `etcd-registry ui` in a real browser: Debian's headless Chromium driven
//! over WebDriver (chromedriver), against real etcd.
//!
//! Needs `chromium` and `chromedriver` (`./scripts/setup --chromium`
//! installs them). Without them the test says SKIPPED on stderr and passes,
//! unless ETCD_REGISTRY_REQUIRE_BROWSER is set, when it fails instead.
//! With ETCD_REGISTRY_UPDATE_SCREENSHOT=1 it also rewrites docs/dashboard.png.

mod common;
mod ui_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use etcd_registry::ServiceInstance;
use etcd_registry_testkit::{eventually, within};
use fantoccini::{Client, ClientBuilder};
use futures::StreamExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use common::{Ctx, STEP};
use ui_common::Dashboard;

/// Bound of anything the page should show.
const SHOWN: Duration = Duration::from_secs(20);

fn find(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
    })
}

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    _process: tokio::process::Child,
    url: String,
}

async fn start_driver(chromedriver: &Path) -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let process = tokio::process::Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    eventually("chromedriver listens", STEP, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    Driver {
        _process: process,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            // As root, in a closed network: no sandbox, and nothing that calls out.
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,860",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    within(
        "a Chromium session",
        Duration::from_secs(60),
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url),
    )
    .await
    .expect("start a Chromium session through chromedriver")
}

/// Runs a script in the page and returns its value.
async fn js(client: &Client, script: &str) -> Value {
    within(script, STEP, client.execute(script, vec![]))
        .await
        .unwrap_or_else(|e| panic!("running {script:?}: {e}"))
}

/// The `data-key` of every row of the table's page: `namespace/service/id`.
async fn rows(client: &Client) -> Vec<String> {
    let v = js(
        client,
        "return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.key)",
    )
    .await;
    serde_json::from_value(v).unwrap_or_default()
}

async fn leader_shown(client: &Client) -> String {
    let v = js(
        client,
        "const e = document.querySelector('[data-election] .leader'); return e ? e.textContent : ''",
    )
    .await;
    v.as_str().unwrap_or_default().to_owned()
}

fn instance(service: &str, id: &str, address: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(service, id, address, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_instances_and_leaders_and_follows_changes_without_reloading() {
    let (Some(chromium), Some(chromedriver)) = (find("chromium"), find("chromedriver")) else {
        let why = "chromium or chromedriver is not on PATH; run ./scripts/setup --chromium";
        if std::env::var_os("ETCD_REGISTRY_REQUIRE_BROWSER").is_some() {
            panic!("ETCD_REGISTRY_REQUIRE_BROWSER is set but {why}");
        }
        eprintln!("SKIPPED the browser test of the dashboard: {why}");
        return;
    };
    let ctx = Ctx::new("ui-browser").await;
    let registry = ctx.registry().await;
    let rival = ctx.registry().await;
    let mut held = Vec::new();
    for (service, id, address, port, version, zone) in [
        ("web", "web-1", "10.0.0.7", 8080, "1.0.2", "eu-1"),
        ("web", "web-2", "10.0.0.8", 8080, "1.0.2", "eu-2"),
        ("api", "api-1", "10.0.1.5", 9000, "2.3.0", "eu-1"),
        ("api", "api-2", "10.0.1.6", 9000, "2.3.0", "eu-2"),
        ("billing", "billing-1", "10.0.2.9", 7000, "0.9.1", "eu-1"),
    ] {
        let i = instance(service, id, address, port)
            .with_version(version)
            .with_weight(10)
            .with_metadata("zone", zone);
        held.push(registry.register(i).await.unwrap());
    }
    let first = within(
        "node-a wins",
        STEP,
        registry
            .election("nightly-cron")
            .unwrap()
            .campaign("node-a"),
    )
    .await
    .unwrap();
    let rival_election = rival.election("nightly-cron").unwrap();
    let second = tokio::spawn(async move { rival_election.campaign("node-b").await });

    let lock = within(
        "a lock",
        STEP,
        registry.lock("db-migrations").unwrap().acquire(),
    )
    .await
    .unwrap();

    let ui = Dashboard::start(ctx.command(&["ui", "--listen", "127.0.0.1:0"]), "ui").await;
    let driver = start_driver(&chromedriver).await;
    let profile = tempfile::tempdir().unwrap();
    let client = browser(&driver, &chromium, profile.path()).await;
    within("loading the page", STEP, client.goto(&ui.url("/")))
        .await
        .unwrap();
    let ns = &ctx.ns;
    let key = |service: &str, id: &str| format!("{ns}/{service}/{id}");

    // The page shows the registered instances.
    let mut expected = vec![
        key("api", "api-1"),
        key("api", "api-2"),
        key("billing", "billing-1"),
        key("web", "web-1"),
        key("web", "web-2"),
    ];
    eventually("the registered instances are shown", SHOWN, || async {
        rows(&client).await == expected
    })
    .await;
    eventually("the leader is shown", SHOWN, || async {
        leader_shown(&client).await == "node-a"
    })
    .await;
    eventually("the lock and its holder's token are shown", SHOWN, || async {
        let facts = js(&client, "const e = document.querySelector('[data-lock] .facts'); return e ? e.textContent : ''").await;
        facts
            .as_str()
            .is_some_and(|f| f.contains(&format!("fencing token {}", lock.fencing_token())))
    })
    .await;
    // A marker that a reload would wipe.
    js(&client, "window.__loaded_once = true; return true").await;

    // Registered after the page loaded: it appears without a reload.
    held.push(
        registry
            .register(instance("web", "web-3", "10.0.0.9", 8080).with_version("1.1.0"))
            .await
            .unwrap(),
    );
    expected.push(key("web", "web-3"));
    eventually("web-3 appears", SHOWN, || async {
        rows(&client).await == expected
    })
    .await;
    let highlighted = js(
        &client,
        &format!(
            "return document.querySelector('tr[data-key=\"{}\"]').className",
            key("web", "web-3")
        ),
    )
    .await;
    assert_eq!(
        highlighted, "flash-added",
        "a new row is highlighted for a moment"
    );

    // Removed: it goes.
    let web2 = held.remove(1);
    assert_eq!(web2.instance().id, "web-2");
    web2.deregister().await.unwrap();
    expected.retain(|k| *k != key("web", "web-2"));
    eventually("web-2 goes", SHOWN, || async {
        rows(&client).await == expected
    })
    .await;

    // The leader shown changes after a resign.
    first.resign().await.unwrap();
    let _successor = within("node-b wins", STEP, second).await.unwrap().unwrap();
    eventually("the new leader is shown", SHOWN, || async {
        leader_shown(&client).await == "node-b"
    })
    .await;

    eventually(
        "the resigned candidate is no longer counted",
        SHOWN,
        || async {
            let facts = js(
                &client,
                "return document.querySelector('[data-election] .facts').textContent",
            )
            .await;
            facts.as_str().is_some_and(|f| f.contains("1 candidate ·"))
        },
    )
    .await;

    // The filter narrows the table to what matches.
    let input = within(
        "the filter",
        STEP,
        client.find(fantoccini::Locator::Id("filter")),
    )
    .await
    .unwrap();
    input.send_keys("eu-2").await.unwrap();
    eventually("the filter applies", SHOWN, || async {
        rows(&client).await == [key("api", "api-2")]
    })
    .await;
    input.clear().await.unwrap();
    js(
        &client,
        "document.getElementById('filter').dispatchEvent(new Event('input')); return true",
    )
    .await;
    eventually("the filter is cleared", SHOWN, || async {
        rows(&client).await == expected
    })
    .await;

    assert_eq!(
        js(&client, "return window.__loaded_once === true").await,
        true,
        "the page was never reloaded"
    );

    // The screenshot for the README: a few services and one election.
    let png = within("a screenshot", STEP, client.screenshot())
        .await
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());
    if std::env::var_os("ETCD_REGISTRY_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard.png");
        std::fs::write(&docs, &png).unwrap();
        eprintln!("updated {}", docs.display());
    }

    // 10,000 more instances, written straight to etcd: the page keeps up
    // and stays responsive, since it renders one page of rows.
    const BULK: usize = 10_000;
    let etcd = ctx.etcd.client().await.unwrap();
    let wrote = std::time::Instant::now();
    futures::stream::iter(0..BULK)
        .map(|n| {
            let mut etcd = etcd.clone();
            let i = instance(
                "bulk",
                &format!("bulk-{n:05}"),
                "10.1.0.1",
                8000 + (n % 1000) as u16,
            );
            let key = format!("/etcd_registry/{ns}/services/bulk/{}", i.id);
            async move { etcd.put(key, i.to_json(), None).await }
        })
        .buffer_unordered(32)
        .for_each(|r| async move {
            r.expect("put");
        })
        .await;
    let wrote = wrote.elapsed();
    let total = expected.len() + BULK;
    let shown = || async {
        js(
            &client,
            "return document.getElementById('shown').textContent",
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    };
    let took = eventually(
        "10,000 more instances are counted",
        Duration::from_secs(60),
        || async { shown().await == format!("{total} shown of {total}") },
    )
    .await;
    // A filter over every row, then a page turn: each must come back well
    // within a second or two on a loaded machine if the page does not freeze.
    let t = std::time::Instant::now();
    let filtered = js(
        &client,
        "const f = document.getElementById('filter'); f.value = 'bulk-0999'; \
         f.dispatchEvent(new Event('input')); return true",
    )
    .await;
    assert_eq!(filtered, true);
    eventually("the filter over 10,000 rows", SHOWN, || async {
        rows(&client).await
            == [
                key("bulk", "bulk-09990"),
                key("bulk", "bulk-09991"),
                key("bulk", "bulk-09992"),
                key("bulk", "bulk-09993"),
                key("bulk", "bulk-09994"),
                key("bulk", "bulk-09995"),
                key("bulk", "bulk-09996"),
                key("bulk", "bulk-09997"),
                key("bulk", "bulk-09998"),
                key("bulk", "bulk-09999"),
            ]
    })
    .await;
    let filter_took = t.elapsed();
    eprintln!(
        "10,000 instances: written in {wrote:?}, all counted on the page {took:?} later; \
         a filter over them shown in {filter_took:?}"
    );
    assert!(
        filter_took < Duration::from_secs(10),
        "the filter took {filter_took:?}"
    );

    lock.release().await.unwrap();
    within("closing the browser", STEP, client.close())
        .await
        .unwrap();
    ui.stop().await;
    rival.close().await.unwrap();
    registry.close().await.unwrap();
}
