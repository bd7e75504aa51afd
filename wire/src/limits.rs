//! Limits shared by the ingress (which refuses larger input with 422) and the engine (which
//! refuses it again, so a foreign producer cannot break them either).

/// Largest total stock of one SKU. Far below `i64::MAX` so that Postgres `bigint` sums of
/// counters can never overflow.
pub const STOCK_MAX: u64 = 1_000_000_000_000;
/// Largest quantity of one reservation and largest per-user limit.
pub const QUANTITY_MAX: u32 = 1_000_000;
/// Longest hold: a week. Keeps `decided_at + ttl` far inside `i64` milliseconds.
pub const HOLD_TTL_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// Longest SKU name, user id and idempotency key, in bytes.
pub const SKU_BYTES_MAX: usize = 64;
pub const USER_ID_BYTES_MAX: usize = 128;
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
/// Sale windows lie between 1970 and the end of year 9999 (Unix milliseconds): inside what
/// Postgres `timestamptz` and RFC 3339 can say, and far from `i64` overflow.
pub const TIME_MS_MAX: i64 = 253_402_300_799_999;
/// Longest pre-sale queue of one SKU: the whole queue is decided in the first batch at the
/// sale's start, in one transaction.
pub const QUEUE_MAX: u32 = 100_000;

/// A SKU name appears in URLs and logs: 1 to [`SKU_BYTES_MAX`] of `A-Z a-z 0-9 . _ : -`.
pub fn sku_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= SKU_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// User ids and idempotency keys: 1 to `max` bytes of printable UTF-8 (no control
/// characters: a NUL byte cannot even be stored in Postgres `text`).
pub fn text_ok(text: &str, max: usize) -> bool {
    if text.is_empty() || text.len() > max {
        return false;
    }
    // ASCII (nearly every id) is checked byte by byte; anything else char by char (C1
    // controls are two-byte characters).
    if text.is_ascii() {
        text.bytes().all(|b| (0x20..0x7f).contains(&b))
    } else {
        !text.chars().any(char::is_control)
    }
}
