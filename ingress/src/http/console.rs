//! The ops console: `GET /ops`, one self-contained page (HTML, CSS and JavaScript in
//! `ingress/console/ops.html`, built into the binary), and `GET /v1/ops/summary`, the figures it
//! shows besides the SKUs (see [`crate::console`]). The page reads everything else from the
//! public API: `GET /v1/skus`, the stock streams, `/readyz`, and the admin routes with the token
//! the operator types in (kept in the page's memory, or the tab's sessionStorage; never sent
//! anywhere but the ingress it came from).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::console::summary::OpsSummaryOut;

use super::state::App;

/// The page, as served.
const PAGE: &str = include_str!("../../console/ops.html");

#[utoipa::path(
    get, path = "/ops", tag = "operations",
    summary = "The ops console: one HTML page that shows the sale live and sends admin commands",
    description = "Self-contained (no external scripts, styles or fonts). It shows every SKU's \
        stock and status (`GET /v1/skus`, and the live stream of each SKU it watches), the \
        figures of `GET /v1/ops/summary` and `/readyz`, and sends the admin commands with the \
        token the operator enters.",
    responses((status = 200, description = "the page", body = String, content_type = "text/html"))
)]
pub(crate) async fn ops_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything it loads comes from this ingress; nothing may frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

#[utoipa::path(
    get, path = "/v1/ops/summary", tag = "operations",
    summary = "What the ops console shows besides the SKUs, sampled by this ingress once a second",
    description = "This ingress's queues and bounds; the requests log's end, committed offset \
        and lag; decisions/s, batch size and commit time over the last 10 s; the writer's \
        fence row (epoch, leader, lease); the requests waiting in each pre-sale queue; each \
        sequencer of SEQUENCER_STATUS_URLS (role, epoch, lag, last batch); and every alert of docs/OPERATIONS.md with its state. Read-only, \
        served from the last sample (no database read per request).",
    responses((status = 200, description = "the newest sample", body = OpsSummaryOut))
)]
pub(crate) async fn ops_summary(State(app): State<Arc<App>>) -> Response {
    let latest = app.console.latest();
    Json(&*latest).into_response()
}
