//! The route table, the router built from it, and the layer that counts, times and names every
//! request.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::http::HeaderValue;
use axum::middleware::{from_fn_with_state, Next};
use axum::response::Response;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use uuid::Uuid;

use super::admin::{freeze_all, pause_sku, restock_sku, resume_sku, upsert_sku};
use super::console::{ops_page, ops_summary};
use super::openapi::openapi_json;
use super::ops::{healthz, metrics_text, readyz};
use super::reservations::{
    cancel_reservation, confirm_reservation, create_reservation, get_reservation,
};
use super::skus::{get_sku, list_skus, sku_events};
use super::state::{App, REQUEST_ID};
use super::tickets::get_ticket;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// One route: its method, its path template (axum and OpenAPI spell them alike) and handler.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    handler: MethodRouter<Arc<App>>,
}

impl Route {
    fn new<H, T>(method: &'static str, path: &'static str, handler: H) -> Route
    where
        H: Handler<T, Arc<App>>,
        T: 'static,
    {
        let filter = match method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "PUT" => MethodFilter::PUT,
            "DELETE" => MethodFilter::DELETE,
            other => panic!("route {path}: method {other} is not in the route table's list"),
        };
        Route {
            method,
            path,
            handler: on(filter, handler),
        }
    }
}

/// Every route the ingress serves. Adding one here without documenting it (`#[utoipa::path]`
/// and `super::openapi::ApiDoc`) fails the OpenAPI test.
pub fn routes() -> Vec<Route> {
    vec![
        Route::new("POST", "/v1/reservations", create_reservation),
        Route::new("GET", "/v1/reservations/{id}", get_reservation),
        Route::new("POST", "/v1/reservations/{id}/confirm", confirm_reservation),
        Route::new("POST", "/v1/reservations/{id}/cancel", cancel_reservation),
        Route::new("GET", "/v1/skus", list_skus),
        Route::new("GET", "/v1/skus/{sku}", get_sku),
        Route::new("GET", "/v1/skus/{sku}/events", sku_events),
        Route::new("GET", "/v1/tickets/{id}", get_ticket),
        Route::new("PUT", "/v1/admin/skus/{sku}", upsert_sku),
        Route::new("POST", "/v1/admin/skus/{sku}/restock", restock_sku),
        Route::new("POST", "/v1/admin/skus/{sku}/pause", pause_sku),
        Route::new("POST", "/v1/admin/skus/{sku}/resume", resume_sku),
        Route::new("POST", "/v1/admin/freeze", freeze_all),
        Route::new("GET", "/healthz", healthz),
        Route::new("GET", "/readyz", readyz),
        Route::new("GET", "/metrics", metrics_text),
        Route::new("GET", "/openapi.json", openapi_json),
        Route::new("GET", "/v1/ops/summary", ops_summary),
        Route::new("GET", "/ops", ops_page),
    ]
}

/// `(method, path)` of every route, in [`routes`]'s order (the metrics' route indexes).
pub fn route_table() -> Vec<(&'static str, &'static str)> {
    routes().iter().map(|r| (r.method, r.path)).collect()
}

pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new();
    for (index, route) in routes().into_iter().enumerate() {
        let tracked = Tracked {
            metrics: app.metrics.clone(),
            route: index,
        };
        router = router.route(
            route.path,
            route
                .handler
                .route_layer(from_fn_with_state(tracked, track)),
        );
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

#[derive(Clone)]
struct Tracked {
    metrics: Arc<Metrics>,
    route: usize,
}

/// Counts, times and gauges every request of one route, and gives it an id (UUIDv7) returned in
/// `X-Request-Id`. A write carries that same id as its command's `request_id` through the
/// requests topic, the sequencer's batch and the outcomes topic; it is also the primary key of
/// its decision row in Postgres (and the reservation id when granted), so any answer can be
/// traced end to end.
async fn track(State(t): State<Tracked>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let _in_flight = t.metrics.request_started();
    let first = Uuid::now_v7().as_u128();
    // The handler may tag the id with its write's partition: the header returns the id as the
    // command carried it.
    let (mut response, id) = REQUEST_ID
        .scope(std::cell::Cell::new(first), async {
            let response = next.run(request).await;
            (response, Uuid::from_u128(REQUEST_ID.with(|id| id.get())))
        })
        .await;
    t.metrics
        .request_done(t.route, response.status().as_u16(), start.elapsed());
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    if let Ok(value) = HeaderValue::from_str(text) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn not_found(State(app): State<Arc<App>>) -> ApiError {
    app.metrics.unmatched(404);
    ApiError::NotFound("not_found")
}

async fn method_not_allowed(State(app): State<Arc<App>>) -> ApiError {
    app.metrics.unmatched(405);
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every route the router serves is described, and nothing else is: both sides come from
    /// the code (the route table that builds the router, and the annotated handlers).
    #[test]
    fn the_description_lists_exactly_the_routes_the_router_serves() {
        let served: BTreeSet<(String, String)> = route_table()
            .into_iter()
            .map(|(m, p)| (m.to_ascii_lowercase(), p.to_owned()))
            .collect();
        let doc: serde_json::Value =
            serde_json::from_str(super::super::openapi::json(false)).unwrap();
        let mut described = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    described.insert((method.clone(), path.clone()));
                }
            }
        }
        let undocumented: Vec<_> = served.difference(&described).collect();
        let phantom: Vec<_> = described.difference(&served).collect();
        assert!(
            undocumented.is_empty() && phantom.is_empty(),
            "served but not described: {undocumented:?}; described but not served: {phantom:?}"
        );
        assert_eq!(served.len(), route_table().len(), "no duplicate routes");
    }
}
