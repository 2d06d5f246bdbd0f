//! `GET /api/events`: one server-sent event stream per browser.
//!
//! The first event is `snapshot`; then `added`, `updated`, `removed`,
//! `revisions`, `election`, `connection` and `tick`, in the order the hub
//! applied them. A browser that falls too far behind gets a new `snapshot`
//! instead of the changes it missed. Browsers reconnect by themselves
//! (`EventSource`) and start again from a snapshot.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

use super::api::AppState;
use super::hub::Msg;

/// A comment line this often keeps proxies and the browser from timing out.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub async fn events(
    State(s): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (first, rx) = s.hub.subscribe();
    let start = (s, Some(first), rx);
    let stream = futures::stream::unfold(start, |(s, pending, mut rx)| async move {
        if let Some(msg) = pending {
            return Some((Ok(event(&msg)), (s, None, rx)));
        }
        let msg = tokio::select! {
            _ = s.cancel.cancelled() => return None,
            m = rx.recv() => m,
        };
        match msg {
            Ok(msg) => Some((Ok(event(&msg)), (s, None, rx))),
            Err(RecvError::Lagged(missed)) => {
                tracing::info!(
                    missed,
                    "a browser fell behind the changes; sending it a new snapshot"
                );
                let (snapshot, rx) = s.hub.subscribe();
                Some((Ok(event(&snapshot)), (s, None, rx)))
            }
            Err(RecvError::Closed) => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn event(msg: &Msg) -> Event {
    Event::default().event(msg.event).data(&*msg.data)
}
