//! A SKU's counters as committed, for everyone (`GET /v1/skus/{sku}`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::answers::ReadErrors;
use super::command::db_unavailable;
use super::dto::{SkuOut, SkuPath};
use super::state::App;
use super::validate;
use crate::error::{ApiError, ErrorBody};

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
    let view = persistence::reads::sku(&app.pool, &sku)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_sku"))?;
    Ok(Json(SkuOut::from(view)).into_response())
}
