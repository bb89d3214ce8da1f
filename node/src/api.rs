//! The local JSON API: `GET /healthz`, `GET /status`, `GET /peers`, `GET /models`, and
//! `POST /publish` (a local safetensors file as the next version of a model).
//!
//! It listens on 127.0.0.1 by default. Handlers only ask the event loop through the
//! [`Client`]; a stopped network answers 503.

use std::path::PathBuf;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::network::{Client, NetworkStatus};

/// What the handlers share.
#[derive(Clone)]
struct ApiState {
    client: Client,
    started: Instant,
    data_dir: PathBuf,
    mdns: bool,
    kad_mode: crate::config::KadMode,
}

/// `GET /status` body.
#[derive(Serialize)]
struct StatusBody {
    #[serde(flatten)]
    network: NetworkStatus,
    uptime_s: u64,
    version: &'static str,
    data_dir: String,
    mdns: bool,
    kad_mode: crate::config::KadMode,
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    client: Client,
    config: &crate::config::NodeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = ApiState {
        client,
        started: Instant::now(),
        data_dir: config.data_dir.clone(),
        mdns: config.mdns,
        kad_mode: config.kad_mode,
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/models", get(models))
        .route("/publish", post(publish))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn status(State(state): State<ApiState>) -> Response {
    match state.client.status().await {
        Ok(network) => Json(StatusBody {
            network,
            uptime_s: state.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION"),
            data_dir: state.data_dir.display().to_string(),
            mdns: state.mdns,
            kad_mode: state.kad_mode,
        })
        .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn peers(State(state): State<ApiState>) -> Response {
    match state.client.peers().await {
        Ok(peers) => Json(peers).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn models(State(state): State<ApiState>) -> Response {
    match state.client.models().await {
        Ok(models) => Json(models).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `POST /publish` body.
#[derive(serde::Deserialize)]
struct PublishBody {
    /// Path of a safetensors file on this machine.
    path: PathBuf,
    /// Model name.
    model: String,
}

async fn publish(State(state): State<ApiState>, Json(body): Json<PublishBody>) -> Response {
    match state.client.publish(&body.path, &body.model).await {
        Ok(announcement) => Json(announcement).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": format!("{e:#}") })),
        )
            .into_response(),
    }
}

fn unavailable(e: anyhow::Error) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}
