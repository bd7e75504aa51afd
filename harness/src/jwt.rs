//! Buyer tokens for tests of the ingress's JWT mode.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

/// `claims` signed with HS256 under `secret`, as an identity provider sharing the ingress's
/// `JWT_HS256_SECRET` would sign them.
pub fn hs256(claims: &Value, secret: &str) -> String {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).expect("an HS256 key"),
    )
    .expect("HS256 signs any JSON claims")
}
