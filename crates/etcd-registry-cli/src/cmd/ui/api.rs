//! The JSON API behind the page; scripts may use it too (see docs/operations.md).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::hub::Hub;

#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    /// Cancelled when the server stops: ends the event streams.
    pub cancel: CancellationToken,
}

/// `GET /api/services`: every service with its instance count and history.
pub async fn services(State(s): State<AppState>) -> Json<Value> {
    Json(s.hub.services_json())
}

/// `GET /api/services/{name}[?namespace=NS]`: the service's instances.
pub async fn service(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let namespace = query.get("namespace").map(String::as_str);
    match s.hub.service_json(&name, namespace) {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no service {name:?} with instances")})),
        )
            .into_response(),
    }
}

/// `GET /api/elections`: every election seen, with its leader or `null`.
pub async fn elections(State(s): State<AppState>) -> Json<Value> {
    Json(s.hub.elections_json())
}

/// `GET /api/locks`: every lock with a holder.
pub async fn locks(State(s): State<AppState>) -> Json<Value> {
    Json(s.hub.locks_json())
}

/// `GET /api/status`: endpoints, whether etcd answers, the last revision.
pub async fn status(State(s): State<AppState>) -> Json<Value> {
    Json(s.hub.connection_json())
}
