//! Helpers of the dashboard tests: start `etcd-registry ui`, read its JSON
//! API and its event stream with a plain HTTP/1.1 client.
#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::process::Command;
use tokio::time::{Instant, timeout};

use crate::common::{Background, STEP};

/// A running `etcd-registry ui` and the address it printed.
pub struct Dashboard {
    pub process: Background,
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub base: String,
}

impl Dashboard {
    /// Starts `cmd` (an `etcd-registry ... ui` command) and waits for the
    /// line that names its address.
    pub async fn start(cmd: Command, what: &str) -> Dashboard {
        let mut process = Background::start(cmd, &[what]);
        let line = process.line_starting("dashboard of ").await;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Dashboard {
            process,
            base: url.trim_end_matches('/').to_owned(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GETs a JSON path; returns the status and the parsed body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        get_json(&self.url(path)).await
    }

    /// Opens `/api/events`.
    pub async fn events(&self) -> Events {
        let resp = within(
            "opening /api/events",
            client().get(self.url("/api/events").parse().expect("uri")),
        )
        .await
        .expect("GET /api/events");
        assert_eq!(resp.status(), 200, "GET /api/events");
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content type {content_type:?}"
        );
        Events {
            body: resp.into_body(),
            buffer: String::new(),
        }
    }

    /// Stops the dashboard with SIGTERM and checks it exits 0.
    pub async fn stop(mut self) {
        self.process.sigterm();
        let status = self.process.exit().await;
        let stderr = self.process.stderr().await;
        assert!(status.success(), "ui exited with {status}: {stderr}");
    }
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

/// GETs `url`; returns the status and the body parsed as JSON.
pub async fn get_json(url: &str) -> (u16, Value) {
    let (status, body) = request("GET", url).await;
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "GET {url}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, value)
}

/// Sends a bodiless request; returns the status and the body.
pub async fn request(method: &str, url: &str) -> (u16, Bytes) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = within(&format!("{method} {url}"), client().request(req))
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let body = within(&format!("body of {url}"), resp.into_body().collect())
        .await
        .unwrap_or_else(|e| panic!("reading {url}: {e}"))
        .to_bytes();
    (status, body)
}

/// A server-sent event stream, read event by event.
pub struct Events {
    body: Incoming,
    buffer: String,
}

impl Events {
    /// The next event: its name and parsed data. Keep-alive comments are skipped.
    pub async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                let value = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event {name}: data is not JSON ({e}): {data}"));
                return (name, value);
            }
            let frame = within("the next server-sent event", self.body.frame())
                .await
                .expect("the event stream ended")
                .expect("reading the event stream");
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }

    /// Reads events until `pick` accepts one, skipping the others (ticks,
    /// connection updates, ...); fails after `limit`.
    pub async fn until<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut pick: impl FnMut(&str, &Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (name, data) = timeout(left, self.next())
                .await
                .unwrap_or_else(|_| panic!("no event {what} within {limit:?}"));
            if let Some(found) = pick(&name, &data) {
                return found;
            }
        }
    }
}

/// The instance ids in a JSON array of API instances, sorted.
pub fn ids(instances: &Value) -> Vec<String> {
    let mut ids: Vec<String> = instances
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}
