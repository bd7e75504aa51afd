//! Who is calling: the admin token for `/v1/admin` routes, and (optionally) a JWT for buyers.
//!
//! With JWT verification on, `POST /v1/reservations` needs `Authorization: Bearer <jwt>` and the
//! buyer is the token's `sub`; the reservation routes by id only act on the caller's own
//! reservations. The algorithm is pinned by the configured key (HS256 secret or RS256 public
//! key): a token signed with another algorithm, `alg: none`, a forged or expired signature, or a
//! token without `exp` and `sub` is refused with 401.

use axum::http::{header, HeaderMap};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// Longest bearer token looked at; anything longer is refused without parsing.
const TOKEN_BYTES_MAX: usize = 8 * 1024;
/// Shortest HS256 secret accepted: RFC 7518 asks for a key at least as long as the hash.
const HS256_SECRET_BYTES_MIN: usize = 32;

pub struct JwtConfig {
    pub hs256_secret: Option<String>,
    pub rs256_public_key_pem: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_s: u64,
}

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl JwtVerifier {
    /// `None` when neither a secret nor a public key is configured (JWT verification off).
    pub fn from_config(c: &JwtConfig) -> anyhow::Result<Option<JwtVerifier>> {
        // The provider this build links; an error means one is installed already.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let (key, alg) = match (
            non_empty(&c.hs256_secret),
            non_empty(&c.rs256_public_key_pem),
        ) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => anyhow::bail!(
                "set JWT_HS256_SECRET or JWT_RS256_PUBLIC_KEY_PEM, not both: the algorithm must be unambiguous"
            ),
            (Some(secret), None) => {
                anyhow::ensure!(
                    secret.len() >= HS256_SECRET_BYTES_MIN,
                    "JWT_HS256_SECRET must be at least {HS256_SECRET_BYTES_MIN} bytes"
                );
                (
                    DecodingKey::from_secret(secret.as_bytes())
                        .map_err(|e| anyhow::anyhow!("JWT_HS256_SECRET is not usable: {e}"))?,
                    Algorithm::HS256,
                )
            }
            (None, Some(pem)) => (
                DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                    anyhow::anyhow!("JWT_RS256_PUBLIC_KEY_PEM is not an RSA public key in PEM: {e}")
                })?,
                Algorithm::RS256,
            ),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = c.leeway_s;
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when the token has them unless they are
        // also required claims: a configured issuer or audience must be present, not optional.
        let mut required = vec!["exp", "sub"];
        match non_empty(&c.issuer) {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match non_empty(&c.audience) {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(JwtVerifier { key, validation }))
    }

    /// The verified subject of the request's bearer token.
    pub fn subject(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
        if token.len() > TOKEN_BYTES_MAX {
            return Err(ApiError::Unauthorized);
        }
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            tracing::debug!(error = %e, "bearer token refused");
            ApiError::Unauthorized
        })?;
        let sub = data.claims.sub;
        if sub.is_empty()
            || sub.len() > wire::limits::USER_ID_BYTES_MAX
            || sub.chars().any(char::is_control)
        {
            return Err(ApiError::Unauthorized);
        }
        Ok(sub)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Admin routes: the bearer token must equal ADMIN_TOKEN, compared in constant time so that the
/// comparison does not reveal how much of a guess was right.
pub fn require_admin(admin_token: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = bearer(headers).ok_or(ApiError::Unauthorized)?;
    if bool::from(presented.as_bytes().ct_eq(admin_token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness::jwt::hs256;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-test-secret-that-is-32-bytes-long!";

    fn config(secret: Option<&str>, pem: Option<&str>) -> JwtConfig {
        JwtConfig {
            hs256_secret: secret.map(str::to_owned),
            rs256_public_key_pem: pem.map(str::to_owned),
            issuer: None,
            audience: None,
            leeway_s: 0,
        }
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn now() -> i64 {
        crate::bus::now_ms() / 1000
    }

    fn is_unauthorized(r: Result<String, ApiError>) -> bool {
        matches!(r, Err(ApiError::Unauthorized))
    }

    #[test]
    fn hs256_accepts_a_valid_token_and_refuses_forged_expired_and_incomplete_ones() {
        let v = JwtVerifier::from_config(&config(Some(SECRET), None))
            .unwrap()
            .unwrap();
        let good = hs256(&json!({"sub": "alice", "exp": now() + 60}), SECRET);
        assert_eq!(v.subject(&headers(&good)).unwrap(), "alice");

        let forged = hs256(
            &json!({"sub": "alice", "exp": now() + 60}),
            "another-secret-that-is-32-bytes-long",
        );
        assert!(is_unauthorized(v.subject(&headers(&forged))));
        let expired = hs256(&json!({"sub": "alice", "exp": now() - 10}), SECRET);
        assert!(is_unauthorized(v.subject(&headers(&expired))));
        let no_exp = hs256(&json!({"sub": "alice"}), SECRET);
        assert!(is_unauthorized(v.subject(&headers(&no_exp))));
        let no_sub = hs256(&json!({"exp": now() + 60}), SECRET);
        assert!(is_unauthorized(v.subject(&headers(&no_sub))));
        let not_yet = hs256(
            &json!({"sub": "alice", "exp": now() + 60, "nbf": now() + 30}),
            SECRET,
        );
        assert!(is_unauthorized(v.subject(&headers(&not_yet))));
        let control = hs256(&json!({"sub": "al\u{0}ice", "exp": now() + 60}), SECRET);
        assert!(is_unauthorized(v.subject(&headers(&control))));

        // Tampered payload with the original signature.
        let parts: Vec<&str> = good.split('.').collect();
        let evil_payload = {
            use base64_engine::encode_url;
            encode_url(&json!({"sub": "mallory", "exp": now() + 60}).to_string())
        };
        let tampered = format!("{}.{}.{}", parts[0], evil_payload, parts[2]);
        assert!(is_unauthorized(v.subject(&headers(&tampered))));

        // alg: none.
        let none = format!(
            "{}.{}.",
            base64_engine::encode_url(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(is_unauthorized(v.subject(&headers(&none))));

        assert!(is_unauthorized(v.subject(&HeaderMap::new())));
        assert!(is_unauthorized(v.subject(&headers("garbage"))));
        assert!(is_unauthorized(v.subject(&headers(&"a".repeat(10_000)))));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let mut c = config(Some(SECRET), None);
        c.issuer = Some("https://id.example".into());
        c.audience = Some("flash".into());
        let v = JwtVerifier::from_config(&c).unwrap().unwrap();
        let ok = hs256(
            &json!({"sub": "a", "exp": now() + 60, "iss": "https://id.example", "aud": "flash"}),
            SECRET,
        );
        assert_eq!(v.subject(&headers(&ok)).unwrap(), "a");
        let other_aud = hs256(
            &json!({"sub": "a", "exp": now() + 60, "iss": "https://id.example", "aud": "other"}),
            SECRET,
        );
        assert!(is_unauthorized(v.subject(&headers(&other_aud))));
        let no_iss = hs256(
            &json!({"sub": "a", "exp": now() + 60, "aud": "flash"}),
            SECRET,
        );
        assert!(is_unauthorized(v.subject(&headers(&no_iss))));
        let no_aud = hs256(
            &json!({"sub": "a", "exp": now() + 60, "iss": "https://id.example"}),
            SECRET,
        );
        assert!(is_unauthorized(v.subject(&headers(&no_aud))));
    }

    #[test]
    fn configuration_errors_are_refused() {
        assert!(JwtVerifier::from_config(&config(None, None))
            .unwrap()
            .is_none());
        assert!(JwtVerifier::from_config(&config(Some("short"), None)).is_err());
        assert!(JwtVerifier::from_config(&config(Some(SECRET), Some("pem"))).is_err());
        assert!(JwtVerifier::from_config(&config(None, Some("not a pem"))).is_err());
    }

    /// RS256 with a key pair made by the `openssl` command; an HS256 token made with the public
    /// key as its secret (the classic algorithm-confusion attack) is refused.
    #[test]
    fn rs256_accepts_tokens_of_the_private_key_and_refuses_algorithm_confusion() {
        let dir = std::env::temp_dir().join(format!("ingress-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let private = dir.join("private.pem");
        let public = dir.join("public.pem");
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("the openssl command")
                .success();
            assert!(ok, "openssl {args:?}");
        };
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            private.to_str().unwrap(),
        ]);
        run(&[
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        let private_pem = std::fs::read(&private).unwrap();
        let public_pem = std::fs::read_to_string(&public).unwrap();
        std::fs::remove_dir_all(&dir).ok();

        let v = JwtVerifier::from_config(&config(None, Some(&public_pem)))
            .unwrap()
            .unwrap();
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let token = encode(
            &Header::new(Algorithm::RS256),
            &json!({"sub": "bob", "exp": now() + 60}),
            &EncodingKey::from_rsa_pem(&private_pem).unwrap(),
        )
        .unwrap();
        assert_eq!(v.subject(&headers(&token)).unwrap(), "bob");
        let confused = hs256(&json!({"sub": "bob", "exp": now() + 60}), &public_pem);
        assert!(is_unauthorized(v.subject(&headers(&confused))));
    }

    #[test]
    fn admin_token_must_match_exactly() {
        let token = "0123456789abcdef0123";
        assert!(require_admin(token, &headers(token)).is_ok());
        assert!(require_admin(token, &headers("0123456789abcdef012")).is_err());
        assert!(require_admin(token, &headers("0123456789abcdef01234")).is_err());
        assert!(require_admin(token, &HeaderMap::new()).is_err());
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            format!("Basic {token}").parse().unwrap(),
        );
        assert!(require_admin(token, &basic).is_err());
    }

    /// Unpadded base64url, enough to hand-craft hostile tokens.
    mod base64_engine {
        pub fn encode_url(s: &str) -> String {
            const A: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let b = s.as_bytes();
            let mut out = String::new();
            for chunk in b.chunks(3) {
                let n = chunk.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x))
                    << (8 * (3 - chunk.len()));
                for i in 0..=chunk.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
