//! A SKU's counters as committed, for everyone: `GET /v1/skus/{sku}`, every SKU's a page at a
//! time (`GET /v1/skus`), and the live stream of them, `GET /v1/skus/{sku}/events` (Server-Sent
//! Events, see [`crate::stock`]).

use std::sync::Arc;

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::answers::ReadErrors;
use super::command::db_unavailable;
use super::dto::{SkuListOut, SkuListQuery, SkuOut, SkuPath, StockEventOut};
use super::state::App;
use super::validate;
use crate::error::{ApiError, ErrorBody};
use crate::stock::{StockState, Subscriber, EVENT_INTERVAL};

/// A comment line this often keeps proxies from closing an idle stream.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

#[utoipa::path(
    get, path = "/v1/skus/{sku}", tag = "skus",
    summary = "A SKU's counters as committed in Postgres",
    params(SkuPath),
    responses(
        (status = 200, description = "the SKU", body = SkuOut),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        ReadErrors,
    )
)]
pub(crate) async fn get_sku(
    State(app): State<Arc<App>>,
    Path(SkuPath { sku }): Path<SkuPath>,
) -> Result<Response, ApiError> {
    validate::sku_name(&sku).map_err(|_| ApiError::NotFound("unknown_sku"))?;
    let view = persistence::reads::sku(app.pool_of_sku(&sku), &sku)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_sku"))?;
    Ok(Json(SkuOut::from(view)).into_response())
}

/// Most SKUs in one answer of `GET /v1/skus`.
pub const SKUS_PAGE_MAX: u32 = 1000;

#[utoipa::path(
    get, path = "/v1/skus", tag = "skus",
    summary = "Every SKU's counters as committed in Postgres, by name, 1000 at a time",
    description = "The SKUs ordered by name, at most 1000 per answer, each as `GET /v1/skus/{sku}` \
        answers it. When there are more, `next_after` names the last one: ask again with \
        `?after=` that name for the next page.",
    params(SkuListQuery),
    responses(
        (status = 200, description = "a page of SKUs", body = SkuListOut),
        (status = 422, description = "invalid_request: `after` is no SKU name", body = ErrorBody),
        ReadErrors,
    )
)]
pub(crate) async fn list_skus(
    State(app): State<Arc<App>>,
    query: Result<Query<SkuListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(SkuListQuery { after }) =
        query.map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))?;
    if let Some(after) = &after {
        validate::sku_name(after)?;
    }
    // One more than a page from each partition, merged by name: whether another page follows.
    let pages = futures_util::future::join_all(
        app.pools
            .iter()
            .map(|pool| persistence::reads::skus(pool, after.as_deref(), SKUS_PAGE_MAX + 1)),
    )
    .await;
    let mut views = Vec::new();
    for page in pages {
        views.extend(page.map_err(db_unavailable)?);
    }
    views.sort_unstable_by(|a, b| a.sku.cmp(&b.sku));
    let more = views.len() > SKUS_PAGE_MAX as usize;
    views.truncate(SKUS_PAGE_MAX as usize);
    let skus: Vec<SkuOut> = views.into_iter().map(SkuOut::from).collect();
    let next_after = more
        .then(|| skus.last().map(|s| s.stock.sku.clone()))
        .flatten();
    Ok(Json(SkuListOut { skus, next_after }).into_response())
}

#[utoipa::path(
    get, path = "/v1/skus/{sku}/events", tag = "skus",
    summary = "A live stream of a SKU's committed counters (Server-Sent Events)",
    description = "An event `stock` with the SKU's counters as committed in Postgres at once, \
        then after every committed batch that changed them, at most 10 per second (what changed \
        meanwhile comes as one event with the newest counts). Each event's `id` is the batch \
        that committed its counts. A comment line every 15 s keeps idle connections open. \
        `status` is computed when the event is sent.",
    params(SkuPath),
    responses(
        (status = 200, description = "the stream: `event: stock`, `data:` a StockEventOut",
            content_type = "text/event-stream", body = StockEventOut),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 503, description = "overloaded, with Retry-After: STREAM_SUBSCRIBERS_MAX streams are open on this ingress; or unavailable: the database is down", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds to wait"))),
    )
)]
pub(crate) async fn sku_events(
    State(app): State<Arc<App>>,
    Path(SkuPath { sku }): Path<SkuPath>,
) -> Result<Response, ApiError> {
    validate::sku_name(&sku).map_err(|_| ApiError::NotFound("unknown_sku"))?;
    let stock = &app.bus.stock;
    let subscriber = stock
        .admit(app.config.stream_subscribers_max)
        .ok_or_else(|| ApiError::Overloaded {
            retry_after_s: 1,
            detail: format!(
                "{} stock streams are open on this ingress (STREAM_SUBSCRIBERS_MAX)",
                app.config.stream_subscribers_max
            ),
        })?;
    // Watch first, then read: an update committed in between is either in the read or seen by
    // the watch (and one older than the read is skipped by its batch number).
    let mut updates = stock.watch(&sku);
    updates.borrow_and_update();
    let (view, batch_seq) =
        match persistence::reads::sku_and_batch(app.pool_of_sku(&sku), &sku).await {
            Ok(Some(found)) => found,
            other => {
                // No stream: leave no slot behind for a name that is no SKU.
                drop(updates);
                stock.forget_unknown(&sku);
                return Err(match other {
                    Err(e) => db_unavailable(e),
                    _ => ApiError::NotFound("unknown_sku"),
                });
            }
        };
    let first = StockState { batch_seq, view };
    Ok(Sse::new(stock_events(first, updates, subscriber))
        .keep_alive(KeepAlive::new().interval(HEARTBEAT))
        .into_response())
}

/// `first`, then every newer state `updates` shows, no more often than [`EVENT_INTERVAL`].
fn stock_events(
    first: StockState,
    updates: watch::Receiver<Option<StockState>>,
    subscriber: Subscriber,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Cursor {
        pending: Option<StockState>,
        sent_batch: u64,
        sent_at: Option<Instant>,
        updates: watch::Receiver<Option<StockState>>,
        _subscriber: Subscriber,
    }
    let cursor = Cursor {
        pending: Some(first),
        sent_batch: 0,
        sent_at: None,
        updates,
        _subscriber: subscriber,
    };
    stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(state) = c.pending.take() {
                if let Some(at) = c.sent_at {
                    tokio::time::sleep_until(at + EVENT_INTERVAL).await;
                    // Whatever arrived while waiting replaces it (coalescing).
                    if let Some(newer) = c.updates.borrow_and_update().clone() {
                        if newer.batch_seq > state.batch_seq {
                            c.pending = Some(newer);
                            continue;
                        }
                    }
                }
                c.sent_batch = state.batch_seq;
                c.sent_at = Some(Instant::now());
                let event = Event::default()
                    .event("stock")
                    .id(state.batch_seq.to_string())
                    .json_data(SkuOut::from(state.view).stock)
                    .expect("the stock event serialises");
                return Some((Ok(event), c));
            }
            // The feed lives as long as the process: this ends only with it.
            c.updates.changed().await.ok()?;
            let newest = c.updates.borrow_and_update().clone();
            c.pending = newest.filter(|s| s.batch_seq > c.sent_batch);
        }
    })
}
