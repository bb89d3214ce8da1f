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

/// Each file: its path, content type and bytes.
const FILES: [(&str, &str, &str); 6] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../assets/dashboard/index.html"),
    ),
    (
        "/assets/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/dashboard/app.js"),
    ),
    (
        "/assets/app.css",
        "text/css; charset=utf-8",
        include_str!("../assets/dashboard/app.css"),
    ),
    (
        "/assets/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "/assets/uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/vendor/uplot/uPlot.min.css"),
    ),
    (
        "/assets/uPlot.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("../assets/vendor/uplot/LICENSE"),
    ),
];

/// The dashboard's routes: the page and its assets.
pub(crate) fn routes() -> Router<ApiState> {
    FILES
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(path, get(move || file(content_type, body)))
        })
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
