//! Reading and checking what a request carries: its JSON body, names, texts, numbers and
//! timestamps. Every limit here is the one `wire::limits` states and the OpenAPI document
//! declares (`super::dto`), so a request the document allows is never refused here.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use uuid::Uuid;
use wire::limits::{sku_name_ok, text_ok, SKU_BYTES_MAX};

use super::state::AppConfig;
use crate::error::ApiError;

/// Reads at most `limit` bytes and parses them as `T`: 413 over the limit, 415 for a non-JSON
/// content type, 400 for broken JSON, 422 for well-formed JSON of the wrong shape.
pub(super) async fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    config: &AppConfig,
) -> Result<T, ApiError> {
    let limit = config.body_bytes_max;
    // One body, one type: a second Content-Type is a smuggling attempt or a broken client.
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ApiError::UnsupportedMediaType);
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        if !(ct.starts_with("application/json") || ct.contains("+json")) {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    // One deadline for the whole body (not per chunk): a client trickling a byte at a time
    // cannot hold the connection and this handler longer than BODY_READ_TIMEOUT_MS.
    let bytes = tokio::time::timeout(config.body_read_timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout {
            timeout_ms: config.body_read_timeout.as_millis() as u64,
        })?
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
        _ => ApiError::MalformedBody(format!("body is not valid JSON: {e}")),
    })
}

/// SKU names appear in URLs and logs: letters, digits and `._:-` only.
pub(super) fn sku_name(value: &str) -> Result<(), ApiError> {
    if sku_name_ok(value) {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "sku must be 1 to {SKU_BYTES_MAX} characters of A-Z a-z 0-9 . _ : -"
        )))
    }
}

/// User ids and keys: any printable UTF-8 (no control characters), bounded in bytes.
pub(super) fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if text_ok(value, max) {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "{field} must be 1 to {max} bytes of printable text"
        )))
    }
}

/// An integer field within `min..=max` (inclusive, as the document's minimum and maximum).
pub(super) fn integer(field: &str, value: i64, min: i64, max: i64) -> Result<(), ApiError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "{field} must be an integer from {min} to {max}"
        )))
    }
}

/// Deserialises an integer field from any JSON number with no fractional part (`3` or `3.0`):
/// JSON Schema's `integer` is such a number, so a request the document allows is not refused for
/// writing one as `3.0`. Fractions and numbers beyond `i64` are refused (422).
pub(super) fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        // Beyond ±2^63 a float no longer converts exactly; every limit is far below.
        Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(f as i64),
        _ => Err(D::Error::custom(format!(
            "invalid value: {n}, expected an integer"
        ))),
    }
}

/// The idempotency key of a reservation: the body's or the `Idempotency-Key` header's (equal
/// when both are sent), `None` when neither is.
pub(super) fn idempotency_key(
    body_key: Option<String>,
    headers: &HeaderMap,
    max: usize,
) -> Result<Option<String>, ApiError> {
    let header_key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::Invalid("Idempotency-Key header must be visible ASCII".into())
                })?
                .to_owned(),
        ),
        None => None,
    };
    let key = match (body_key, header_key) {
        (Some(a), Some(h)) if a != h => {
            return Err(ApiError::Invalid(
                "idempotency_key in the body and the Idempotency-Key header differ".into(),
            ))
        }
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => return Ok(None),
    };
    text("idempotency_key", &key, max)?;
    Ok(Some(key))
}

pub(super) fn reservation_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(s).map_err(|_| ApiError::NotFound("unknown_reservation"))
}

/// An optional RFC 3339 timestamp, in unix milliseconds.
pub(super) fn time(field: &str, s: Option<&str>) -> Result<Option<i64>, ApiError> {
    s.map(|s| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|_| ApiError::Invalid(format!("{field} must be an RFC 3339 timestamp")))
    })
    .transpose()
}

/// Unix milliseconds as RFC 3339 with milliseconds, UTC.
pub(crate) fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct N {
        #[serde(deserialize_with = "super::integral")]
        n: i64,
    }

    fn parse(json: &str) -> Result<i64, String> {
        serde_json::from_str::<N>(json)
            .map(|v| v.n)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn integers_may_be_written_with_a_zero_fraction() {
        assert_eq!(parse(r#"{"n": 510510}"#), Ok(510510));
        assert_eq!(parse(r#"{"n": 510510.0}"#), Ok(510510));
        assert_eq!(parse(r#"{"n": -2.0}"#), Ok(-2));
        assert_eq!(parse(r#"{"n": 1e12}"#), Ok(1_000_000_000_000));
        assert!(parse(r#"{"n": 1.5}"#).is_err());
        assert!(parse(r#"{"n": 1e30}"#).is_err());
        assert!(parse(r#"{"n": "1"}"#).is_err());
    }
}
