//! JWT-SVIDs: ES256 JWS compact tokens whose `sub` is a SPIFFE ID, with exactly
//! one audience, an expiry and a `kid` naming a key of the trust bundle's JWK
//! set. Minting lives in identity; validation is here, for every service.
//!
//! Validation refuses any algorithm but ES256 (so `none` and HS256 — the
//! classic key-confusion attack — never verify), unknown keys, a missing or
//! foreign audience, more than one audience, a missing or past `exp`, a `sub`
//! outside the trust domain, and revoked subjects.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::tls::RevocationCheck;

/// Clock skew tolerated on `exp`, in seconds.
pub const LEEWAY_SECS: i64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a compact JWS")]
    Malformed,
    #[error("algorithm must be ES256")]
    Algorithm,
    #[error("unknown key id")]
    UnknownKey,
    #[error("signature does not verify")]
    Signature,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token has expired")]
    Expired,
    #[error("token has no aud claim")]
    MissingAudience,
    #[error("token is not for this audience")]
    ForeignAudience,
    #[error("token must carry exactly one audience")]
    MultipleAudiences,
    #[error("subject is not a SPIFFE ID of this trust domain")]
    Subject,
    #[error("subject is revoked")]
    Revoked,
    #[error("key error")]
    Key,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// `aud` may be a string or an array of strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims of a JWT-SVID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub aud: Option<Audience>,
    #[serde(default)]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// An ES256 signing key of the trust domain.
pub struct SigningKey {
    kid: String,
    pair: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl SigningKey {
    /// A new key; its kid is derived from the public key.
    pub fn generate() -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| JwtError::Key)?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|_| JwtError::Key)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        let kid = B64.encode(&digest.as_ref()[..12]);
        Ok(Self {
            kid,
            pair,
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The PKCS#8 document, for persisting the key (mode 0600).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWK of a SPIFFE JWT bundle.
    pub fn public_jwk(&self) -> serde_json::Value {
        let point = self.pair.public_key().as_ref(); // 0x04 || X || Y
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&point[1..33]),
            "y": B64.encode(&point[33..65]),
            "kid": self.kid,
            "use": "jwt-svid",
        })
    }

    /// Signs `claims` into a compact JWS with header {alg: ES256, kid, typ: JWT}.
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        let header = Header {
            alg: "ES256".into(),
            kid: Some(self.kid.clone()),
            typ: Some("JWT".into()),
        };
        let h = B64.encode(serde_json::to_vec(&header).map_err(|_| JwtError::Key)?);
        let c = B64.encode(serde_json::to_vec(claims).map_err(|_| JwtError::Key)?);
        let input = format!("{h}.{c}");
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| JwtError::Key)?;
        Ok(format!("{input}.{}", B64.encode(sig.as_ref())))
    }
}

/// The JWT authorities of a trust domain (its JWK set).
#[derive(Debug, Clone, Default)]
pub struct JwtBundle {
    keys: HashMap<String, Vec<u8>>,
}

impl JwtBundle {
    /// Parses a JWK set (`{"keys": [...]}`); keys that are not P-256 EC keys
    /// with a kid are skipped.
    pub fn from_jwks(jwks: &str) -> Result<Self, JwtError> {
        let v: serde_json::Value = serde_json::from_str(jwks).map_err(|_| JwtError::Malformed)?;
        let mut keys = HashMap::new();
        for k in v
            .get("keys")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
        {
            let field = |n: &str| k.get(n).and_then(|x| x.as_str());
            if field("kty") != Some("EC") || field("crv") != Some("P-256") {
                continue;
            }
            let (Some(kid), Some(x), Some(y)) = (field("kid"), field("x"), field("y")) else {
                continue;
            };
            let (Ok(x), Ok(y)) = (B64.decode(x), B64.decode(y)) else {
                continue;
            };
            if x.len() != 32 || y.len() != 32 {
                continue;
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            keys.insert(kid.to_owned(), point);
        }
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a valid token proves.
#[derive(Debug, Clone)]
pub struct Validated {
    pub subject: SpiffeId,
    pub expires_at: i64,
    pub claims: Claims,
}

/// Validates a JWT-SVID for `audience` at time `now` (seconds since the epoch).
pub fn validate(
    token: &str,
    bundle: &JwtBundle,
    trust_domain: &TrustDomain,
    audience: &str,
    now: i64,
    revocations: &dyn RevocationCheck,
) -> Result<Validated, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: Header = serde_json::from_slice(&B64.decode(h).map_err(|_| JwtError::Malformed)?)
        .map_err(|_| JwtError::Malformed)?;
    if header.alg != "ES256" {
        return Err(JwtError::Algorithm);
    }
    if let Some(typ) = &header.typ
        && typ != "JWT"
        && typ != "JOSE"
    {
        return Err(JwtError::Malformed);
    }
    let kid = header.kid.ok_or(JwtError::UnknownKey)?;
    let key = bundle.keys.get(&kid).ok_or(JwtError::UnknownKey)?;
    let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
    let signed = &token[..h.len() + 1 + c.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| JwtError::Signature)?;
    let claims: Claims = serde_json::from_slice(&B64.decode(c).map_err(|_| JwtError::Malformed)?)
        .map_err(|_| JwtError::Malformed)?;
    let exp = claims.exp.ok_or(JwtError::MissingExp)?;
    if exp + LEEWAY_SECS <= now {
        return Err(JwtError::Expired);
    }
    match &claims.aud {
        None => return Err(JwtError::MissingAudience),
        Some(Audience::One(a)) if a == audience => {}
        Some(Audience::Many(v)) if v.len() > 1 => return Err(JwtError::MultipleAudiences),
        Some(Audience::Many(v)) if v.first().is_some_and(|a| a == audience) => {}
        Some(_) => return Err(JwtError::ForeignAudience),
    }
    let subject = SpiffeId::parse(&claims.sub).map_err(|_| JwtError::Subject)?;
    if !subject.is_member_of(trust_domain) || subject.path().is_empty() {
        return Err(JwtError::Subject);
    }
    if revocations.revoked(&subject, None) {
        return Err(JwtError::Revoked);
    }
    Ok(Validated {
        subject,
        expires_at: exp,
        claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::NoRevocations;

    fn td() -> TrustDomain {
        TrustDomain::parse("bulkhead.test").expect("td")
    }

    fn claims(aud: Option<Audience>, exp: Option<i64>) -> Claims {
        Claims {
            sub: "spiffe://bulkhead.test/tenant/acme/run/r1".into(),
            aud,
            exp,
            iat: Some(1000),
            jti: None,
        }
    }

    fn bundle(keys: &[&SigningKey]) -> JwtBundle {
        let jwks =
            serde_json::json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() });
        JwtBundle::from_jwks(&jwks.to_string()).expect("jwks")
    }

    fn check(token: &str, b: &JwtBundle) -> Result<Validated, JwtError> {
        validate(token, b, &td(), "sealed-vault", 2000, &NoRevocations)
    }

    #[test]
    fn a_conformant_token_validates() {
        let k = SigningKey::generate().expect("key");
        let t = k
            .sign(&claims(
                Some(Audience::One("sealed-vault".into())),
                Some(2100),
            ))
            .expect("sign");
        let v = check(&t, &bundle(&[&k])).expect("valid");
        assert_eq!(
            v.subject.as_str(),
            "spiffe://bulkhead.test/tenant/acme/run/r1"
        );
        // A reloaded key keeps its kid.
        let again = SigningKey::from_pkcs8(k.pkcs8()).expect("reload");
        assert_eq!(again.kid(), k.kid());
    }

    #[test]
    fn non_conformant_tokens_are_refused() {
        let k = SigningKey::generate().expect("key");
        let b = bundle(&[&k]);
        let aud = || Some(Audience::One("sealed-vault".into()));
        let sign = |c: &Claims| k.sign(c).expect("sign");
        assert_eq!(
            check(&sign(&claims(None, Some(2100))), &b).err(),
            Some(JwtError::MissingAudience)
        );
        assert_eq!(
            check(
                &sign(&claims(
                    Some(Audience::One("dispatcher".into())),
                    Some(2100)
                )),
                &b
            )
            .err(),
            Some(JwtError::ForeignAudience)
        );
        assert_eq!(
            check(
                &sign(&claims(
                    Some(Audience::Many(vec!["sealed-vault".into(), "x".into()])),
                    Some(2100)
                )),
                &b
            )
            .err(),
            Some(JwtError::MultipleAudiences)
        );
        assert_eq!(
            check(&sign(&claims(aud(), None)), &b).err(),
            Some(JwtError::MissingExp)
        );
        assert_eq!(
            check(&sign(&claims(aud(), Some(1900))), &b).err(),
            Some(JwtError::Expired)
        );
        let mut foreign = claims(aud(), Some(2100));
        foreign.sub = "spiffe://other.test/tenant/acme/run/r1".into();
        assert_eq!(check(&sign(&foreign), &b).err(), Some(JwtError::Subject));

        // alg none: header swapped, signature dropped.
        let good = sign(&claims(aud(), Some(2100)));
        let mut parts: Vec<&str> = good.split('.').collect();
        let none = B64.encode(br#"{"alg":"none","kid":"x"}"#);
        parts[0] = &none;
        let unsigned = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(check(&unsigned, &b).err(), Some(JwtError::Algorithm));
        // HS256 keyed with the public key bytes (key confusion).
        let hs_header = B64.encode(format!(r#"{{"alg":"HS256","kid":"{}"}}"#, k.kid()));
        let input = format!("{hs_header}.{}", good.split('.').nth(1).expect("claims"));
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.pair.public_key().as_ref()),
            input.as_bytes(),
        );
        let hs = format!("{input}.{}", B64.encode(mac.as_ref()));
        assert_eq!(check(&hs, &b).err(), Some(JwtError::Algorithm));
        // A key not in the bundle, and a flipped signature.
        let other = SigningKey::generate().expect("key");
        let t = other.sign(&claims(aud(), Some(2100))).expect("sign");
        assert_eq!(check(&t, &b).err(), Some(JwtError::UnknownKey));
        let mut tampered = good.clone();
        let last = tampered.pop().expect("char");
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(matches!(
            check(&tampered, &b),
            Err(JwtError::Signature | JwtError::Malformed)
        ));
        assert_eq!(check("a.b", &b).err(), Some(JwtError::Malformed));
    }

    #[test]
    fn both_keys_verify_during_a_rotation() {
        let old = SigningKey::generate().expect("key");
        let new = SigningKey::generate().expect("key");
        let both = bundle(&[&old, &new]);
        let aud = Some(Audience::One("sealed-vault".into()));
        for k in [&old, &new] {
            let t = k.sign(&claims(aud.clone(), Some(2100))).expect("sign");
            check(&t, &both).expect("valid during overlap");
        }
        let retired = bundle(&[&new]);
        let t = old.sign(&claims(aud, Some(2100))).expect("sign");
        assert_eq!(check(&t, &retired).err(), Some(JwtError::UnknownKey));
    }
}
