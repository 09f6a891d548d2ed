//! JWT verification and minting, and topic permission patterns.
//!
//! Verification pins the algorithm from configuration (a token's own `alg` header never picks
//! the key type), requires `sub` and `exp`, and checks `iss`/`aud` when configured. The clock is
//! a parameter: `jsonwebtoken`'s own `exp` and `nbf` checks are disabled and
//! [`Verifier::verify`] compares against the `now` it is given.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The development secret shared by `ringcast serve`, `ringcast token` and the load generator
/// when nothing is configured. Never use it outside a laptop: `serve` warns loudly about it.
pub const DEV_JWT_SECRET: &str = "ringcast-development-secret-do-not-use-in-production";
/// The development API key, likewise.
pub const DEV_API_KEY: &str = "ringcast-dev-api-key";

/// The claims ringcast reads from a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The customer id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience: one name or a list (RFC 7519 §4.1.3 allows both; identity providers issue
    /// either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Roles: the customer receives events published to `role:<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Glob patterns (`*` matches any run of characters) of topics the customer may subscribe to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// Glob patterns of topics the customer may publish to from a client connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Glob patterns of customer ids the customer may send direct messages to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub message: Vec<String>,
}

/// A token's `aud` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "name"`.
    One(String),
    /// `"aud": ["name", ...]`.
    Many(Vec<String>),
}

/// Seconds a token's `nbf` may lie in the future: the issuer's clock may run ahead of ours,
/// and a token minted "now" must work at once.
pub const NBF_LEEWAY_SECS: u64 = 30;

impl Claims {
    /// Whether the token allows subscribing to `topic`.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.channels.iter().any(|p| glob_match(p, topic))
    }

    /// Whether the token allows publishing to `topic` from the client.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|p| glob_match(p, topic))
    }

    /// Whether the token allows sending a direct message to customer `to`.
    pub fn may_message(&self, to: &str) -> bool {
        self.message.iter().any(|p| glob_match(p, to))
    }
}

/// Why a token was refused; `reason()` is the metric label and the JSON error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the query, `Authorization` header or subprotocol list: 401.
    #[error("no token")]
    Missing,
    /// Not a JWT, bad signature, wrong algorithm or missing claims: 401.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` is in the past: 401.
    #[error("token expired")]
    Expired,
    /// `iss` or `aud` do not match the configuration: 401.
    #[error("token issuer or audience not accepted")]
    WrongIssuerOrAudience,
    /// The `Origin` header is not in the allowlist: 403.
    #[error("origin not allowed")]
    OriginRefused,
}

impl AuthError {
    /// Short machine-readable reason.
    pub fn reason(&self) -> crate::error::Code {
        use crate::error::Code;
        match self {
            AuthError::Missing => Code::MissingToken,
            AuthError::Invalid(_) => Code::InvalidToken,
            AuthError::Expired => Code::TokenExpired,
            AuthError::WrongIssuerOrAudience => Code::WrongIssuerOrAudience,
            AuthError::OriginRefused => Code::OriginRefused,
        }
    }

    /// HTTP status before the upgrade.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::OriginRefused => 403,
            _ => 401,
        }
    }
}

/// Which signature algorithm tokens must use, with its key.
#[derive(Clone)]
pub enum KeyConfig {
    /// HMAC-SHA256 with a shared secret.
    Hs256 {
        /// The shared secret.
        secret: Vec<u8>,
    },
    /// RSA-SHA256 with a PEM public key (verification only).
    Rs256 {
        /// PEM-encoded RSA public key.
        public_pem: Vec<u8>,
    },
}

/// Verifies tokens with a pinned algorithm.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// Builds a verifier. `issuer` and `audience` are checked when given.
    pub fn new(
        key: &KeyConfig,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, AuthError> {
        let (key, alg) = match key {
            KeyConfig::Hs256 { secret } => (DecodingKey::from_secret(secret), Algorithm::HS256),
            KeyConfig::Rs256 { public_pem } => (
                DecodingKey::from_rsa_pem(public_pem)
                    .map_err(|e| AuthError::Invalid(format!("RSA key: {e}")))?,
                Algorithm::RS256,
            ),
        };
        let mut validation = Validation::new(alg);
        validation.validate_exp = false; // checked against the caller's clock in `verify`
        validation.validate_nbf = false;
        // A configured issuer or audience must also be present in the token, not just match
        // when present.
        let mut required = vec!["exp", "sub"];
        required.extend(issuer.map(|_| "iss"));
        required.extend(audience.map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Verifier { key, validation })
    }

    /// Verifies `token` at time `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                    AuthError::WrongIssuerOrAudience
                }
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let claims = data.claims;
        if claims.exp <= now {
            return Err(AuthError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + NBF_LEEWAY_SECS) {
            return Err(AuthError::Invalid("token not valid yet (nbf)".into()));
        }
        crate::event::validate_customer(&claims.sub)
            .map_err(|e| AuthError::Invalid(format!("sub: {}", e.message)))?;
        Ok(claims)
    }
}

/// Signs claims with HS256 (what `ringcast token` and the load generator use).
pub fn mint_hs256(claims: &Claims, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of serialisable claims cannot fail")
}

/// Glob match where `*` matches any run of characters (including `:`), everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            channels: vec!["conversation:*".into()],
            ..Claims::default()
        }
    }

    #[test]
    fn verifies_and_rejects() {
        let secret = b"s3cret".to_vec();
        let v = Verifier::new(
            &KeyConfig::Hs256 {
                secret: secret.clone(),
            },
            None,
            None,
        )
        .unwrap();
        let tok = mint_hs256(&claims(1000), &secret);
        assert_eq!(v.verify(&tok, 999).unwrap().sub, "alice");
        assert_eq!(v.verify(&tok, 1000), Err(AuthError::Expired));
        let other = mint_hs256(&claims(1000), b"other");
        assert!(matches!(v.verify(&other, 1), Err(AuthError::Invalid(_))));
        assert!(matches!(v.verify("garbage", 1), Err(AuthError::Invalid(_))));
        // alg=none must never pass.
        let none =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(matches!(v.verify(none, 1), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn audience_and_issuer_are_enforced_when_configured() {
        let secret = b"k".to_vec();
        let v = Verifier::new(
            &KeyConfig::Hs256 {
                secret: secret.clone(),
            },
            Some("me"),
            Some("ringcast"),
        )
        .unwrap();
        let mut c = claims(10);
        assert!(v.verify(&mint_hs256(&c, &secret), 1).is_err());
        c.iss = Some("me".into());
        c.aud = Some(Audience::One("ringcast".into()));
        assert_eq!(
            v.verify(&mint_hs256(&c, &secret), 1).map(|c| c.sub),
            Ok("alice".to_owned())
        );
        c.aud = Some(Audience::One("other".into()));
        assert_eq!(
            v.verify(&mint_hs256(&c, &secret), 1),
            Err(AuthError::WrongIssuerOrAudience)
        );
        c.aud = Some(Audience::Many(vec!["other".into(), "ringcast".into()]));
        assert!(
            v.verify(&mint_hs256(&c, &secret), 1).is_ok(),
            "one of a list"
        );
        c.aud = Some(Audience::Many(vec!["other".into()]));
        assert!(v.verify(&mint_hs256(&c, &secret), 1).is_err());
    }

    #[test]
    fn nbf_sub_and_audience_lists_without_a_configured_audience() {
        let secret = b"k".to_vec();
        let v = Verifier::new(
            &KeyConfig::Hs256 {
                secret: secret.clone(),
            },
            None,
            None,
        )
        .unwrap();
        let mut c = claims(10_000);
        c.aud = Some(Audience::Many(vec!["a".into(), "b".into()]));
        assert!(v.verify(&mint_hs256(&c, &secret), 1).is_ok());
        c.nbf = Some(1000 + 3600);
        let early = mint_hs256(&c, &secret);
        assert!(matches!(v.verify(&early, 1000), Err(AuthError::Invalid(_))));
        assert!(v.verify(&early, 1000 + 3600 - NBF_LEEWAY_SECS).is_ok());
        c.nbf = None;
        c.sub = "x".repeat(257);
        assert!(matches!(
            v.verify(&mint_hs256(&c, &secret), 1),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn rs256_is_verified_and_pinned() {
        let private = include_bytes!("../tests/fixtures/rs256-test-private.pem");
        let public = include_bytes!("../tests/fixtures/rs256-test-public.pem").to_vec();
        let v = Verifier::new(
            &KeyConfig::Rs256 {
                public_pem: public.clone(),
            },
            None,
            None,
        )
        .unwrap();
        let c = claims(100);
        let key = EncodingKey::from_rsa_pem(private).unwrap();
        let rs = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &c, &key).unwrap();
        assert_eq!(v.verify(&rs, 1).unwrap().sub, "alice");
        // Algorithm confusion: an HS256 token signed with the public key as the HMAC secret.
        let confused = mint_hs256(&c, &public);
        assert!(matches!(v.verify(&confused, 1), Err(AuthError::Invalid(_))));
        // And the HS256 verifier refuses RS256 tokens.
        let hs = Verifier::new(
            &KeyConfig::Hs256 {
                secret: b"k".to_vec(),
            },
            None,
            None,
        )
        .unwrap();
        assert!(matches!(hs.verify(&rs, 1), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn globs() {
        assert!(glob_match("conversation:*", "conversation:1"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("hospital:*:alerts", "hospital:7:alerts"));
        assert!(!glob_match("hospital:*:alerts", "hospital:7:other"));
        assert!(!glob_match("conversation:1", "conversation:12"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!claims(1).may_subscribe("product:1"));
    }
}
