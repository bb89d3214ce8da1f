//! The local API: JSON at `GET /healthz`, `GET /status`, `GET /peers`, `GET /models`,
//! `GET /history` and `POST /publish` (a local safetensors file as the next version of a
//! model); Prometheus metrics at `GET /metrics` ([`crate::metrics`]); the live dashboard at
//! `GET /` ([`crate::dashboard`]).
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
pub(crate) struct ApiState {
    client: Client,
    started: Instant,
    data_dir: PathBuf,
    mdns: bool,
    kad_mode: crate::config::KadMode,
    models_dir: PathBuf,
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
        models_dir: config.models_dir(),
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
        .route("/history", get(history))
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::routes())
        .layer(axum::middleware::from_fn(only_local_host_names))
        .with_state(state)
}

/// Refuses requests whose `Host` is a name other than `localhost` (403): a web page on
/// another site can make a browser send requests to this port, and with DNS rebinding read
/// the answers and `POST /publish`, but only under its own host name. Addresses (`127.0.0.1`,
/// `[::1]`, a LAN address) and `localhost` pass; so do clients that send no `Host`.
async fn only_local_host_names(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .map(|h| h.to_str().unwrap_or("?"));
    match host {
        Some(host) if !host_allowed(host) => (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({
                "error": "Host not allowed: use the node's address (e.g. 127.0.0.1) or localhost"
            })),
        )
            .into_response(),
        _ => next.run(request).await,
    }
}

/// Whether a `Host` header value (with or without a port) is an IP address or `localhost`.
fn host_allowed(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_addresses_and_localhost_are_allowed_hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:4002",
            "[::1]:80",
            "[::1]",
            "localhost",
            "LOCALHOST:9",
            "192.168.1.7:4002",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:4002",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "",
            "?",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }
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

async fn history(State(state): State<ApiState>) -> Response {
    Json(state.client.history().body()).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let (status, models) = match (state.client.status().await, state.client.models().await) {
        (Ok(status), Ok(models)) => (status, models),
        (Err(e), _) | (_, Err(e)) => return unavailable(e),
    };
    let dir = state.models_dir.clone();
    let store_disk_bytes = tokio::task::spawn_blocking(move || crate::metrics::disk_usage(&dir))
        .await
        .unwrap_or(0);
    let snapshot = crate::metrics::Snapshot {
        status,
        models,
        store_disk_bytes,
        uptime_seconds: state.started.elapsed().as_secs_f64(),
    };
    match crate::metrics::render(&snapshot, state.client.metrics_registry()) {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
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
