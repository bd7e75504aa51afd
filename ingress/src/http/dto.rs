//! The request bodies, path parameters and answers of the v1 API, with their OpenAPI schemas
//! (the limits they declare are in `super::limits`), and the conversions from the wire's views.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use wire::{ReservationView, SkuView};

use super::limits;
use super::validate::{integral, rfc3339};
use crate::bus::now_ms;

/// A reservation request. With JWT verification on, `user_id` may be left out (the token's
/// subject is the buyer); when present it must equal the subject.
#[derive(Deserialize, ToSchema)]
pub struct ReserveBody {
    #[schema(schema_with = limits::sku_name)]
    pub sku: String,
    #[schema(schema_with = limits::user_id)]
    pub user_id: Option<String>,
    /// From 1 to the SKU's per-user limit (at most 1,000,000; above the SKU's limit the answer
    /// is 409 `limit_exceeded`).
    #[schema(schema_with = limits::quantity)]
    #[serde(deserialize_with = "integral")]
    pub quantity: i64,
    #[schema(schema_with = limits::idempotency_key)]
    pub idempotency_key: Option<String>,
}

/// The SKU of a path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SkuPath {
    #[param(schema_with = limits::sku_name)]
    pub sku: String,
}

/// The query of `GET /v1/skus`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SkuListQuery {
    /// Only SKUs whose names sort after this one (the `next_after` of the previous page).
    #[param(schema_with = limits::sku_name)]
    pub after: Option<String>,
}

/// A page of SKUs, ordered by name.
#[derive(Serialize, ToSchema)]
pub struct SkuListOut {
    #[schema(max_items = 1000)]
    pub skus: Vec<SkuOut>,
    /// The last name of this page when more SKUs follow (pass it as `after`); null on the last
    /// page.
    pub next_after: Option<String>,
}

/// Declares the `Idempotency-Key` header of admin commands, for the OpenAPI document (the
/// handlers read it from the request's headers): `$key` is `Option<String>` where it may be left
/// out, `String` where it is required.
macro_rules! admin_key_header {
    ($(#[$doc:meta])* $name:ident: $key:ty, example = $example:tt) => {
        $(#[$doc])*
        #[derive(IntoParams)]
        #[into_params(parameter_in = Header)]
        #[allow(dead_code)]
        pub struct $name {
            // Wrapped as the document shows it: the description keeps these line breaks.
            /// Names this command: it is applied once per key. A retry (the same command under the key,
            /// after a 504 say) gets the first outcome and changes nothing; another command under a used
            /// key is refused with 422 `idempotency_key_reused`. 1-128 visible ASCII characters.
            #[param(
                rename = "Idempotency-Key",
                min_length = 1,
                max_length = 128,
                pattern = "^[\\x21-\\x7E]+$",
                example = $example
            )]
            pub key: $key,
        }
    };
}

admin_key_header! {
    /// The optional `Idempotency-Key` header of an admin command.
    AdminKeyHeader: Option<String>, example = "pause-2026-12-03-tee-1"
}

admin_key_header! {
    /// The `Idempotency-Key` header a restock must carry (a restock is a delta: without a key a
    /// retry would add its units twice).
    RestockKeyHeader: String, example = "restock-2026-12-03-tee-1"
}

/// The reservation of a path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ReservationPath {
    /// The reservation id returned when it was created.
    #[param(schema_with = limits::reservation_id)]
    pub id: String,
}

/// A reservation as its owner sees it.
#[derive(Serialize, ToSchema)]
pub struct ReservationOut {
    pub reservation_id: Uuid,
    pub sku: String,
    pub user_id: String,
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub quantity: u32,
    #[schema(value_type = ReservationStatus)]
    pub status: Cow<'static, str>,
    /// RFC 3339, milliseconds, UTC.
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// When the hold was granted (`GET` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub decided_at: Option<String>,
}

/// The states of a reservation.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // documents the strings of `ReservationOut::status`
pub enum ReservationStatus {
    Held,
    Confirmed,
    Cancelled,
    Expired,
}

/// Why a buyer can or cannot reserve a SKU now.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // documents the strings of `SkuOut::status`
pub enum SaleStatus {
    OnSale,
    SoldOut,
    Paused,
    /// Before the start, with the pre-sale queue open: reservations are queued.
    Queueing,
    NotStarted,
    Ended,
}

/// A SKU's counters and configuration; `available + held + sold == total` always.
#[derive(Serialize, ToSchema)]
pub struct SkuOut {
    /// Its counters and status: what its live stream sends.
    #[serde(flatten)]
    #[schema(inline)]
    pub stock: StockEventOut,
    pub per_user_limit: u32,
    pub hold_ttl_seconds: f64,
    #[schema(format = DateTime)]
    pub starts_at: Option<String>,
    #[schema(format = DateTime)]
    pub ends_at: Option<String>,
    /// The pre-sale queue, if the sale has one.
    pub queue: Option<QueueOut>,
}

#[derive(Serialize, ToSchema)]
pub struct QueueOut {
    #[schema(format = DateTime)]
    pub opens_at: String,
    #[schema(minimum = 1, maximum = 100_000)]
    pub max: u32,
}

/// The emergency freeze's answer.
#[derive(Serialize, ToSchema)]
pub struct FreezeOut {
    pub skus_paused: u32,
}

#[derive(Deserialize, ToSchema)]
pub struct UpsertBody {
    #[schema(schema_with = limits::total_stock)]
    #[serde(deserialize_with = "integral")]
    pub total_stock: i64,
    /// Units one buyer may hold or have bought: 1 to 1,000,000.
    #[schema(schema_with = limits::quantity)]
    #[serde(deserialize_with = "integral")]
    pub per_user_limit: i64,
    #[schema(schema_with = limits::hold_ttl_seconds)]
    pub hold_ttl_seconds: f64,
    #[schema(schema_with = limits::starts_at)]
    pub starts_at: Option<String>,
    #[schema(schema_with = limits::ends_at)]
    pub ends_at: Option<String>,
    /// A pre-sale queue (the waiting room), or null for none. It needs `starts_at`, and opens
    /// before it.
    pub queue: Option<QueueBody>,
}

/// A pre-sale queue: reservations from `opens_at` until the sale's `starts_at` are answered 202
/// with a ticket instead of 409 `sale_not_started`, queued in log order (at most `max`; beyond:
/// 409 `queue_full`; at most the per-user limit of units per buyer), and decided in that order
/// when the sale starts, before anything that arrives later.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct QueueBody {
    #[schema(schema_with = limits::queue_opens_at)]
    pub opens_at: String,
    #[schema(schema_with = limits::queue_max)]
    #[serde(deserialize_with = "integral")]
    pub max: i64,
}

#[derive(Deserialize, ToSchema)]
pub struct RestockBody {
    #[schema(schema_with = limits::restock_quantity)]
    #[serde(deserialize_with = "integral")]
    pub quantity: i64,
}

#[derive(Serialize, ToSchema)]
pub struct StatusOut {
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct ReadyOut {
    /// ready or not_ready.
    pub status: &'static str,
    /// Each check: ok, or why not.
    pub checks: ReadyChecks,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReadyChecks {
    /// The outcomes reader is polling the broker.
    pub outcomes_reader: &'static str,
    /// The producer reached the broker recently.
    pub broker: &'static str,
    /// Some sequencer committed within STALL_MAX_MS, or nothing waits: ok, or stalled.
    pub sequencer: &'static str,
}

impl From<ReservationView> for ReservationOut {
    fn from(v: ReservationView) -> ReservationOut {
        ReservationOut {
            reservation_id: Uuid::from_u128(v.reservation_id),
            sku: v.sku,
            user_id: v.user_id,
            quantity: v.quantity,
            status: Cow::Borrowed(v.status.as_str()),
            expires_at: rfc3339(v.expires_at_ms),
            decided_at: None,
        }
    }
}

/// One event of a SKU's live stream: its counters as committed, and its status then.
#[derive(Serialize, ToSchema)]
pub struct StockEventOut {
    #[schema(example = "tee-1")]
    pub sku: String,
    pub total: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
    #[schema(value_type = SaleStatus)]
    pub status: &'static str,
}

impl From<SkuView> for SkuOut {
    /// `status` summarises why a buyer can or cannot reserve now.
    fn from(v: SkuView) -> SkuOut {
        let now = now_ms();
        let status = if v.paused {
            "paused"
        } else if v.config.queue_open_at(now) {
            "queueing"
        } else if v.config.starts_at_ms.is_some_and(|t| now < t) {
            "not_started"
        } else if v.config.ends_at_ms.is_some_and(|t| now >= t) {
            "ended"
        } else if v.available == 0 {
            "sold_out"
        } else {
            "on_sale"
        };
        SkuOut {
            stock: StockEventOut {
                sku: v.sku,
                total: v.total,
                available: v.available,
                held: v.held,
                sold: v.sold,
                status,
            },
            per_user_limit: v.config.per_user_limit,
            hold_ttl_seconds: v.config.hold_ttl_ms as f64 / 1000.0,
            starts_at: v.config.starts_at_ms.map(rfc3339),
            ends_at: v.config.ends_at_ms.map(rfc3339),
            queue: v.config.queue.map(|q| QueueOut {
                opens_at: rfc3339(q.opens_at_ms),
                max: q.max,
            }),
        }
    }
}
