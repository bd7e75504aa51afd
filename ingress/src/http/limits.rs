//! The limits the server enforces, as the OpenAPI document declares them: every bound comes from
//! `wire::limits` (or the checks in `super::validate` that use them), so that a request the
//! document allows is never refused as invalid. Fields and parameters name these functions with
//! `schema_with`.
//!
//! JSON Schema counts string lengths in characters, the server in UTF-8 bytes: a text limit of
//! `max` bytes is declared as printable ASCII of at most `max` characters, or any text without
//! control characters of at most `max / 4` characters (a character is at most 4 bytes). Both
//! alternatives are accepted by the server; the rest of what it accepts (longer non-ASCII text
//! within `max` bytes) cannot be said in JSON Schema.

use serde_json::json;
use utoipa::openapi::schema::{AnyOfBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};
use wire::limits::{
    HOLD_TTL_MS_MAX, IDEMPOTENCY_KEY_BYTES_MAX, QUANTITY_MAX, QUEUE_MAX, SKU_BYTES_MAX, STOCK_MAX,
    USER_ID_BYTES_MAX,
};

/// `wire::limits::sku_name_ok`: 1 to `SKU_BYTES_MAX` of `A-Z a-z 0-9 . _ : -`.
pub const SKU_PATTERN: &str = "^[A-Za-z0-9._:-]+$";
/// Printable ASCII (what `wire::limits::text_ok` accepts byte by byte).
pub const ASCII_TEXT_PATTERN: &str = "^[\\x20-\\x7E]+$";
/// Any text without control characters (Unicode category Cc, `char::is_control`).
pub const UNICODE_TEXT_PATTERN: &str = "^[^\\x00-\\x1F\\x7F-\\x9F]+$";

/// RFC 3339 timestamps between 1970 and the end of 9999 (`wire::limits::TIME_MS_MAX`), as
/// `chrono` parses them: years 1971 to 9998 with `Z` or any offset, 1970 and 9999 in UTC (an
/// offset could move them outside the range). The day is checked against its month (29 February
/// is left out: a pattern cannot tell leap years).
pub const TIMESTAMP_PATTERN: &str = concat!(
    "^(?:(?:197[1-9]|19[89][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])",
    "-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)",
    "T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
    "|(?:1970|9999)",
    "-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)",
    "T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?Z)$"
);

fn string(pattern: &str, max_length: usize) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max_length))
        .pattern(Some(pattern))
}

/// A schema of `schema_type` in the well-known `format`.
fn formatted(schema_type: Type, format: KnownFormat) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(schema_type)
        .format(Some(SchemaFormat::KnownFormat(format)))
}

/// An RFC 3339 timestamp between 1970 and 9999 ([`TIMESTAMP_PATTERN`]).
fn timestamp() -> ObjectBuilder {
    formatted(Type::String, KnownFormat::DateTime).pattern(Some(TIMESTAMP_PATTERN))
}

fn integer(min: u64, max: u64) -> ObjectBuilder {
    formatted(Type::Integer, KnownFormat::Int64)
        .minimum(Some(min as f64))
        .maximum(Some(max as f64))
}

/// A text of 1 to `max_bytes` bytes of printable UTF-8 (see the module's note on bytes).
fn text(max_bytes: usize, description: &str, example: &str) -> Schema {
    AnyOfBuilder::new()
        .item(string(ASCII_TEXT_PATTERN, max_bytes))
        .item(string(UNICODE_TEXT_PATTERN, max_bytes / 4))
        .description(Some(description))
        .examples([json!(example)])
        .into()
}

pub fn sku_name() -> RefOr<Schema> {
    string(SKU_PATTERN, SKU_BYTES_MAX)
        .description(Some("1-64 characters of `A-Z a-z 0-9 . _ : -`."))
        .examples([json!("tee-1")])
        .into()
}

pub fn user_id() -> RefOr<Schema> {
    text(
        USER_ID_BYTES_MAX,
        "The buyer: 1-128 bytes of printable UTF-8. Required unless JWT verification is on \
         (then it may be left out, and must equal the token's subject when present).",
        "alice",
    )
    .into()
}

pub fn idempotency_key() -> RefOr<Schema> {
    text(
        IDEMPOTENCY_KEY_BYTES_MAX,
        "Names this request: repeating it returns the first outcome. 1-128 bytes of printable \
         UTF-8. The server also takes the key from an `Idempotency-Key` header (when both are \
         sent they must be equal); this document declares the body field only.",
        "alice-1",
    )
    .into()
}

/// Units of one reservation (and the per-user limit): 1 to `QUANTITY_MAX`.
pub fn quantity() -> RefOr<Schema> {
    integer(1, u64::from(QUANTITY_MAX))
        .examples([json!(1)])
        .into()
}

pub fn total_stock() -> RefOr<Schema> {
    integer(0, STOCK_MAX)
        .description(Some(
            "From 0 to 10^12; may not go below held + sold (409 `stock_below_committed`).",
        ))
        .examples([json!(100)])
        .into()
}

pub fn restock_quantity() -> RefOr<Schema> {
    integer(1, STOCK_MAX)
        .description(Some("Units to add, from 1 to 10^12."))
        .examples([json!(50)])
        .into()
}

pub fn hold_ttl_seconds() -> RefOr<Schema> {
    formatted(Type::Number, KnownFormat::Double)
        .minimum(Some(0.001))
        .maximum(Some((HOLD_TTL_MS_MAX / 1000) as f64))
        .description(Some("From 0.001 (1 ms) to 604800 (7 days)."))
        .examples([json!(300)])
        .into()
}

/// An optional RFC 3339 timestamp of the sale window (null or absent: no bound).
pub fn sale_time(description: &str) -> Schema {
    AnyOfBuilder::new()
        .item(timestamp())
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(description))
        .into()
}

pub fn starts_at() -> RefOr<Schema> {
    sale_time(
        "RFC 3339, 1970 to 9999; reservations before it are refused with `sale_not_started`. \
         When both are given, starts_at must be before ends_at.",
    )
    .into()
}

pub fn ends_at() -> RefOr<Schema> {
    sale_time(
        "RFC 3339, 1970 to 9999; reservations at or after it are refused with `sale_ended`. \
         When both are given, ends_at must be after starts_at.",
    )
    .into()
}

pub fn queue_opens_at() -> RefOr<Schema> {
    timestamp()
        .description(Some(
            "RFC 3339, 1970 to 9999, before the sale's `starts_at` (which a queue needs).",
        ))
        .into()
}

pub fn queue_max() -> RefOr<Schema> {
    integer(1, u64::from(QUEUE_MAX))
        .description(Some("Requests the queue holds: 1 to 100,000."))
        .examples([json!(5000)])
        .into()
}

/// A reservation id: a UUID (anything else is 404 `unknown_reservation`).
pub fn reservation_id() -> RefOr<Schema> {
    formatted(Type::String, KnownFormat::Uuid).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The declared patterns are the server's checks: every name and text the document allows
    /// is accepted by `wire::limits`, and the edges of the sale window parse to the range.
    #[test]
    fn declared_patterns_agree_with_the_server_checks() {
        assert_eq!((0.001_f64 * 1000.0), 1.0, "the smallest TTL is 1 ms");
        for ok in [
            "1970-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
            "1971-01-01T00:00:00+23:59",
        ] {
            let ms = chrono::DateTime::parse_from_rfc3339(ok)
                .unwrap()
                .timestamp_millis();
            assert!((0..=wire::limits::TIME_MS_MAX).contains(&ms), "{ok}");
        }
        assert!(wire::limits::text_ok(
            &"\u{10FFFF}".repeat(USER_ID_BYTES_MAX / 4),
            USER_ID_BYTES_MAX
        ));
        assert!(wire::limits::text_ok(
            &"~".repeat(USER_ID_BYTES_MAX),
            USER_ID_BYTES_MAX
        ));
        assert!(wire::limits::sku_name_ok(
            &"a.:_-Z9".repeat(10)[..SKU_BYTES_MAX]
        ));
    }
}
