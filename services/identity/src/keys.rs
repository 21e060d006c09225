//! The trust domain's JWT-SVID signing keys, with rotation: a new key takes
//! over signing every `rotation`, the retired one keeps verifying for
//! `overlap` (at least a JWT-SVID's lifetime), then leaves the JWK set. Every
//! change bumps the bundle sequence, which only grows. Keys persist in a file
//! of mode 0600 under the data directory.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bulkhead_mesh::jwt::{Claims, JwtBundle, JwtError, SigningKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is malformed")]
    Malformed(String),
    #[error("jwt key: {0}")]
    Jwt(#[from] JwtError),
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    pkcs8: String,
    created_ms: i64,
    retire_at_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct StoredSet {
    sequence: u64,
    keys: Vec<StoredKey>,
}

#[derive(Debug)]
struct Entry {
    key: SigningKey,
    created_ms: i64,
    retire_at_ms: Option<i64>,
}

#[derive(Debug)]
struct KeySet {
    /// Oldest first; the last one signs.
    keys: Vec<Entry>,
    sequence: u64,
}

#[derive(Debug)]
pub struct JwtKeys {
    set: RwLock<KeySet>,
    path: PathBuf,
    rotation_ms: i64,
    overlap_ms: i64,
}

impl JwtKeys {
    pub fn load_or_create(
        path: &Path,
        rotation_secs: u64,
        overlap_secs: u64,
        now_ms: i64,
    ) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let set = if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let stored: StoredSet = serde_json::from_str(&text)
                .map_err(|_| KeyError::Malformed(path.display().to_string()))?;
            let mut keys = Vec::new();
            for k in stored.keys {
                let der = B64
                    .decode(k.pkcs8)
                    .map_err(|_| KeyError::Malformed(path.display().to_string()))?;
                keys.push(Entry {
                    key: SigningKey::from_pkcs8(&der)?,
                    created_ms: k.created_ms,
                    retire_at_ms: k.retire_at_ms,
                });
            }
            if keys.is_empty() {
                return Err(KeyError::Malformed(path.display().to_string()));
            }
            KeySet {
                keys,
                sequence: stored.sequence,
            }
        } else {
            KeySet {
                keys: vec![Entry {
                    key: SigningKey::generate()?,
                    created_ms: now_ms,
                    retire_at_ms: None,
                }],
                sequence: 1,
            }
        };
        let keys = Self {
            set: RwLock::new(set),
            path: path.to_owned(),
            rotation_ms: i64::try_from(rotation_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            overlap_ms: i64::try_from(overlap_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        };
        keys.persist()?;
        Ok(keys)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeySet> {
        self.set.read().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self) -> Result<(), KeyError> {
        let stored = {
            let s = self.read();
            StoredSet {
                sequence: s.sequence,
                keys: s
                    .keys
                    .iter()
                    .map(|e| StoredKey {
                        pkcs8: B64.encode(e.key.pkcs8()),
                        created_ms: e.created_ms,
                        retire_at_ms: e.retire_at_ms,
                    })
                    .collect(),
            }
        };
        let text = serde_json::to_string(&stored)
            .map_err(|_| KeyError::Malformed(self.path.display().to_string()))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let tmp = self.path.with_extension("tmp");
        bulkhead_mesh::pki::write_private(&tmp, &text).map_err(|e| KeyError::Io {
            path: tmp.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::rename(&tmp, &self.path).map_err(|source| KeyError::Io {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// Signs with the current key.
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        let s = self.read();
        let current = s.keys.last().ok_or(JwtError::Key)?;
        current.key.sign(claims)
    }

    /// The JWK set of every key that still verifies.
    pub fn jwks(&self) -> String {
        let s = self.read();
        serde_json::json!({ "keys": s.keys.iter().map(|e| e.key.public_jwk()).collect::<Vec<_>>() })
            .to_string()
    }

    pub fn bundle(&self) -> JwtBundle {
        JwtBundle::from_jwks(&self.jwks()).unwrap_or_default()
    }

    pub fn sequence(&self) -> u64 {
        self.read().sequence
    }

    pub fn kids(&self) -> Vec<String> {
        self.read()
            .keys
            .iter()
            .map(|e| e.key.kid().to_owned())
            .collect()
    }

    /// Rotates when the current key is due and retires keys past their
    /// overlap. Returns whether the set changed.
    pub fn tick(&self, now_ms: i64) -> Result<bool, KeyError> {
        let changed = {
            let mut s = self.set.write().unwrap_or_else(|p| p.into_inner());
            let mut changed = false;
            let due = s
                .keys
                .last()
                .is_some_and(|e| now_ms - e.created_ms >= self.rotation_ms);
            if due {
                let overlap = self.overlap_ms;
                if let Some(old) = s.keys.last_mut() {
                    old.retire_at_ms = Some(now_ms.saturating_add(overlap));
                }
                s.keys.push(Entry {
                    key: SigningKey::generate()?,
                    created_ms: now_ms,
                    retire_at_ms: None,
                });
                changed = true;
            }
            let before = s.keys.len();
            s.keys.retain(|e| e.retire_at_ms.is_none_or(|r| r > now_ms));
            changed |= s.keys.len() != before;
            if changed {
                s.sequence += 1;
            }
            changed
        };
        if changed {
            self.persist()?;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_mesh::jwt::{Audience, validate};
    use bulkhead_mesh::spiffe::TrustDomain;
    use bulkhead_mesh::tls::NoRevocations;

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "spiffe://bulkhead.test/tenant/acme/run/r1".into(),
            aud: Some(Audience::One("a".into())),
            exp: Some(exp),
            iat: None,
            jti: None,
        }
    }

    #[test]
    fn rotation_keeps_the_old_key_verifying_during_the_overlap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwt-keys.json");
        let keys = JwtKeys::load_or_create(&path, 100, 10, 0).expect("keys");
        let td = TrustDomain::parse("bulkhead.test").expect("td");
        let old_token = keys.sign(&claims(1_000)).expect("sign");
        let seq0 = keys.sequence();
        assert!(!keys.tick(50_000).expect("tick"), "not due yet");

        assert!(keys.tick(100_000).expect("tick"), "rotated");
        assert_eq!(keys.kids().len(), 2);
        assert!(keys.sequence() > seq0);
        let new_token = keys.sign(&claims(1_000)).expect("sign");
        for t in [&old_token, &new_token] {
            validate(t, &keys.bundle(), &td, "a", 100, &NoRevocations)
                .expect("both verify in the overlap");
        }
        // Reloading keeps the set and the sequence.
        let reloaded = JwtKeys::load_or_create(&path, 100, 10, 100_500).expect("reload");
        assert_eq!(reloaded.kids(), keys.kids());
        assert_eq!(reloaded.sequence(), keys.sequence());

        assert!(keys.tick(110_000).expect("tick"), "old key retired");
        assert_eq!(keys.kids().len(), 1);
        assert!(validate(&old_token, &keys.bundle(), &td, "a", 100, &NoRevocations).is_err());
        validate(&new_token, &keys.bundle(), &td, "a", 100, &NoRevocations)
            .expect("new still verifies");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
