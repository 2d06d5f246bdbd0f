//! `etcd-registry ui`: a read-only live dashboard of a namespace (or of all).
//!
//! One [`Hub`](hub::Hub) holds what the sources report (see `sources.rs`);
//! the JSON API (`api.rs`) reads it and `/api/events` (`sse.rs`) streams it
//! to each browser: a snapshot first, then every change. The page is three
//! embedded files, with nothing fetched from elsewhere.

mod api;
mod hub;
mod sources;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::common::args::Global;
use crate::common::connect::builder;
use crate::common::error::{CliError, CliResult};
use crate::common::output::line;
use crate::common::shutdown::Shutdown;

use self::hub::Hub;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to serve on; port 0 picks a free one.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Show every namespace under --prefix instead of --namespace.
    #[arg(long)]
    pub all_namespaces: bool,
}

/// Serves the dashboard on `--listen` until SIGINT/SIGTERM.
pub async fn run(g: &Global, args: Args) -> CliResult {
    let Args {
        listen,
        all_namespaces,
    } = args;
    let shutdown = Shutdown::listen()?;
    if !listen.ip().is_loopback() {
        // The page has no authentication: whoever reaches the port sees the registry.
        tracing::warn!(%listen, "the dashboard is unauthenticated and listens beyond this machine");
        eprintln!(
            "warning: listening on {listen}: the dashboard has no authentication; \
             anyone who can reach this address can read the registry"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::msg(format!("cannot listen on {listen}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::msg(format!("cannot read the listening address: {e}")))?;

    let builder = builder(g)?;
    let registry = Arc::new(builder.clone().connect().await?);
    let hub = Hub::new(all_namespaces, registry.config().endpoints());
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    if all_namespaces {
        tasks.spawn(sources::discover_namespaces(
            hub.clone(),
            builder.clone(),
            registry.clone(),
            cancel.clone(),
        ));
    } else {
        tasks.spawn(sources::follow_namespace(
            hub.clone(),
            registry.clone(),
            g.namespace.clone(),
            cancel.clone(),
        ));
    }
    tasks.spawn(sources::probe_endpoints(
        hub.clone(),
        builder,
        registry.clone(),
        cancel.clone(),
    ));
    tasks.spawn(sources::sample_history(hub.clone(), cancel.clone()));

    let scope = if all_namespaces {
        format!("every namespace under {}", g.prefix)
    } else {
        format!("namespace {}", g.namespace)
    };
    line(&format!(
        "dashboard of {scope} at http://{local}/ (read-only; Ctrl-C stops it)"
    ))?;
    let app = router(hub, cancel.clone());
    let stopping = cancel.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let name = shutdown.signalled().await;
            tracing::info!(signal = name, "stopping the dashboard");
            // Ends the event streams, which would otherwise hold the shutdown open.
            stopping.cancel();
        })
        .await;
    cancel.cancel();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done
            && e.is_panic()
        {
            tracing::error!(error = %e, "a dashboard task panicked");
        }
    }
    let closed = match Arc::try_unwrap(registry) {
        Ok(registry) => registry.close().await.map_err(CliError::from),
        Err(_) => Ok(()), // still shared: dropping it stops its work; its lease expires
    };
    served.map_err(|e| CliError::msg(format!("the dashboard server failed: {e}")))?;
    closed
}

fn router(hub: Arc<Hub>, cancel: CancellationToken) -> Router {
    // GET routes only: the dashboard writes nothing, and any other method gets 405.
    Router::new()
        .route("/", get(|| asset(INDEX_HTML, "text/html; charset=utf-8")))
        .route(
            "/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| asset(STYLE_CSS, "text/css; charset=utf-8")),
        )
        .route("/api/services", get(api::services))
        .route("/api/services/{name}", get(api::service))
        .route("/api/elections", get(api::elections))
        .route("/api/locks", get(api::locks))
        .route("/api/status", get(api::status))
        .route("/api/events", get(sse::events))
        .with_state(api::AppState { hub, cancel })
}

async fn asset(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
}
