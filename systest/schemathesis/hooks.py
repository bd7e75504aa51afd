"""Schemathesis hooks of systest/tests/schemathesis.rs.

- One constraint of the API that JSON Schema cannot state: a sale window's `starts_at` must be
  before its `ends_at` (the document says so in both fields' descriptions). Generated bodies that
  break it are put in order (the earlier time becomes `starts_at`) instead of being sent; the
  phases that do not run `map_body` (coverage) may still send one, and its 422 `starts_at must be
  before ends_at` is then not counted as a schema-valid request refused (only that answer to only
  such a body).
- Another: a pre-sale `queue` needs the sale's `starts_at` and must open before it. A generated
  body whose queue does not is sent without its queue (map_body); sent by a phase that does not
  map bodies, its 422 `queue.opens_at must be before starts_at` is likewise not counted.
- A 422 `idempotency_key_reused` answers the state, not the request's shape: the same key was
  used before with another SKU or quantity (the document's example key is shared by every
  generated body that keeps it). Like a 409, it is not counted as a schema-valid request refused.
- One check: a 503 must be one of the refusals the document declares as legitimate (admission's
  `overloaded` or `no_sequencer`, with Retry-After), never another server failure.
"""

import re
from datetime import datetime

import schemathesis

_FRACTION = re.compile(r"\.(\d+)")


def _unix_ms(text):
    """Milliseconds since 1970 of an RFC 3339 timestamp, truncated as the server does."""
    match = _FRACTION.search(text)
    digits = match.group(1) if match else ""
    whole = _FRACTION.sub("", text, count=1).replace("Z", "+00:00")
    seconds = datetime.fromisoformat(whole).timestamp()
    return int(round(seconds)) * 1000 + int((digits + "000")[:3])


@schemathesis.hook("map_body")
def sale_window_in_order(ctx, body):
    if _window_out_of_order(body):
        if _unix_ms(body["starts_at"]) == _unix_ms(body["ends_at"]):
            del body["ends_at"]
        else:
            body["starts_at"], body["ends_at"] = body["ends_at"], body["starts_at"]
    if _queue_after_start(body):
        del body["queue"]
    return body


def _queue_after_start(body):
    """A body whose queue does not open before its sale's start (or has no start)."""
    if not isinstance(body, dict) or not isinstance(body.get("queue"), dict):
        return False
    opens, starts = body["queue"].get("opens_at"), body.get("starts_at")
    if not isinstance(opens, str):
        return False
    if not isinstance(starts, str):
        return True
    try:
        return _unix_ms(opens) >= _unix_ms(starts)
    except ValueError:
        return False


def _window_out_of_order(body):
    if not isinstance(body, dict):
        return False
    starts, ends = body.get("starts_at"), body.get("ends_at")
    if not (isinstance(starts, str) and isinstance(ends, str)):
        return False
    try:
        return _unix_ms(starts) >= _unix_ms(ends)
    except ValueError:
        return False


@schemathesis.hook("filter_failure")
def state_refusals_are_not_schema_refusals(ctx, failure, case, response):
    """Keeps every failure but a reused key's 422 and the 422 to a sale window out of order
    (see the module's note)."""
    if response.status_code != 422:
        return True
    try:
        body = response.json()
    except ValueError:
        return True
    error, detail = body.get("error"), body.get("detail")
    if error == "idempotency_key_reused":
        return False
    if detail == "queue.opens_at must be before starts_at" and _queue_after_start(case.body):
        return False
    return not (
        detail == "starts_at must be before ends_at" and _window_out_of_order(case.body)
    )


@schemathesis.check
def only_admission_refusals_are_503(ctx, response, case):
    if response.status_code != 503 or case.path == "/readyz":
        return None
    body = response.json()
    if body.get("error") not in ("overloaded", "no_sequencer"):
        raise AssertionError(f"503 that is not an admission refusal: {body}")
    if "Retry-After" not in response.headers:
        raise AssertionError("503 without Retry-After")
    return None
