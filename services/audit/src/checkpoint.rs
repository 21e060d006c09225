//! Signed tree heads: Ed25519 over "bulkhead-audit-tree-head-v1" ‖ 0x00 ‖
//! tree_size (u64 BE) ‖ timestamp ms (u64 BE) ‖ root, with the key id the first
//! 8 bytes of SHA-256 of the raw public key, in hex.

use std::path::Path;

use bulkhead_proto::audit::v1 as pb;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

const CONTEXT: &[u8] = b"bulkhead-audit-tree-head-v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is readable by others (mode {mode:o}); it must be 0600")]
    LooseMode { path: String, mode: u32 },
    #[error("{0} does not hold an ed25519 key")]
    Malformed(String),
}

/// A signed tree head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    pub tree_size: u64,
    pub root: Hash,
    pub timestamp_ms: u64,
    pub signature: [u8; 64],
    pub key_id: String,
}

fn message(tree_size: u64, timestamp_ms: u64, root: &Hash) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 1 + 8 + 8 + 32);
    m.extend_from_slice(CONTEXT);
    m.push(0);
    m.extend_from_slice(&tree_size.to_be_bytes());
    m.extend_from_slice(&timestamp_ms.to_be_bytes());
    m.extend_from_slice(root);
    m
}

pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public.as_bytes())[..8])
}

impl TreeHead {
    /// Checks the signature with `public`, and that the key id names it.
    pub fn verify(&self, public: &VerifyingKey) -> bool {
        key_id(public) == self.key_id
            && public
                .verify(
                    &message(self.tree_size, self.timestamp_ms, &self.root),
                    &Signature::from_bytes(&self.signature),
                )
                .is_ok()
    }

    pub fn to_pb(&self) -> pb::SignedTreeHead {
        pb::SignedTreeHead {
            tree_size: self.tree_size,
            root_hash: self.root.to_vec().into(),
            timestamp: Some(prost_types::Timestamp {
                seconds: (self.timestamp_ms / 1000) as i64,
                nanos: ((self.timestamp_ms % 1000) * 1_000_000) as i32,
            }),
            signature: self.signature.to_vec().into(),
            key_id: self.key_id.clone(),
        }
    }

    /// The JSON form used on an export's last line.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tree_size": self.tree_size,
            "root_hash": hex::encode(self.root),
            "timestamp": self.timestamp_ms,
            "signature": hex::encode(self.signature),
            "key_id": self.key_id,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let root = hex::decode(v.get("root_hash")?.as_str()?).ok()?;
        let sig = hex::decode(v.get("signature")?.as_str()?).ok()?;
        Some(Self {
            tree_size: v.get("tree_size")?.as_u64()?,
            root: root.try_into().ok()?,
            timestamp_ms: v.get("timestamp")?.as_u64()?,
            signature: sig.try_into().ok()?,
            key_id: v.get("key_id")?.as_str()?.to_owned(),
        })
    }
}

/// The audit service's signing key.
pub struct Signer {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Signer {
    pub fn generate() -> Self {
        Self::from_key(SigningKey::from_bytes(&rand::random()))
    }

    fn from_key(key: SigningKey) -> Self {
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn sign(&self, tree_size: u64, root: Hash, timestamp_ms: u64) -> TreeHead {
        let sig = self.key.sign(&message(tree_size, timestamp_ms, &root));
        TreeHead {
            tree_size,
            root,
            timestamp_ms,
            signature: sig.to_bytes(),
            key_id: self.key_id.clone(),
        }
    }

    /// Loads the key from `path` (hex of the 32-byte seed, mode 0600), or makes
    /// one there and writes its public key beside it as `<path>.pub`.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        if path.exists() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::LooseMode {
                        path: path.display().to_string(),
                        mode,
                    });
                }
            }
            let text = std::fs::read_to_string(path).map_err(io)?;
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| KeyError::Malformed(path.display().to_string()))?;
            return Ok(Self::from_key(SigningKey::from_bytes(&seed)));
        }
        let signer = Self::generate();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        bulkhead_mesh::pki::write_private(path, &hex::encode(signer.key.to_bytes())).map_err(
            |e| KeyError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            },
        )?;
        write_public(&public_path(path), &signer.public()).map_err(io)?;
        Ok(signer)
    }
}

/// Where the public key of the signing key at `path` is written.
pub fn public_path(key_path: &Path) -> std::path::PathBuf {
    let mut p = key_path.as_os_str().to_owned();
    p.push(".pub");
    p.into()
}

/// Writes a public key as hex.
pub fn write_public(path: &Path, key: &VerifyingKey) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", hex::encode(key.as_bytes())))
}

/// Reads a public key written by [`write_public`].
pub fn read_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_public(text.trim()).ok_or_else(|| KeyError::Malformed(path.display().to_string()))
}

pub fn parse_public(hex_key: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_verify_and_any_change_breaks_them() {
        let s = Signer::generate();
        let head = s.sign(8, [7; 32], 1_700_000_000_123);
        assert!(head.verify(&s.public()));
        assert!(!head.verify(&Signer::generate().public()), "another key");
        for tampered in [
            TreeHead {
                tree_size: 7,
                ..head.clone()
            },
            TreeHead {
                root: [8; 32],
                ..head.clone()
            },
            TreeHead {
                timestamp_ms: 1,
                ..head.clone()
            },
        ] {
            assert!(!tampered.verify(&s.public()));
        }
        let back = TreeHead::from_json(&head.to_json()).expect("json");
        assert_eq!(back, head);
    }

    #[test]
    fn keys_persist_with_mode_0600_and_loose_modes_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit-signing.key");
        let a = Signer::load_or_create(&path).expect("create");
        let b = Signer::load_or_create(&path).expect("load");
        assert_eq!(a.public(), b.public());
        assert_eq!(read_public(&public_path(&path)).expect("pub"), a.public());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Signer::load_or_create(&path),
            Err(KeyError::LooseMode { .. })
        ));
    }
}
