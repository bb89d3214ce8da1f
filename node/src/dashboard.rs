//! The live dashboard at `GET /`: a static page embedded in the binary that polls the JSON
//! API (`/status`, `/peers`, `/models`, `/history`) every two seconds and draws, with the
//! vendored uPlot charting library (MIT, `node/assets/vendor/uplot`), the loss and accuracy
//! curves of this node and of the peers whose checkpoints it has seen, the swarm's progress
//! per version, the peers and recent events. No build step, no network: the files are
//! compiled in with `include_str!`.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::api::ApiState;

const INDEX_HTML: &str = include_str!("../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../assets/dashboard/app.css");
const UPLOT_JS: &str = include_str!("../assets/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/vendor/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../assets/vendor/uplot/LICENSE");

/// The dashboard's routes: the page and its assets.
pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| file("text/html; charset=utf-8", INDEX_HTML)))
        .route(
            "/assets/app.js",
            get(|| file("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/assets/app.css",
            get(|| file("text/css; charset=utf-8", APP_CSS)),
        )
        .route(
            "/assets/uPlot.iife.min.js",
            get(|| file("text/javascript; charset=utf-8", UPLOT_JS)),
        )
        .route(
            "/assets/uPlot.min.css",
            get(|| file("text/css; charset=utf-8", UPLOT_CSS)),
        )
        .route(
            "/assets/uPlot.LICENSE",
            get(|| file("text/plain; charset=utf-8", UPLOT_LICENSE)),
        )
}

async fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
