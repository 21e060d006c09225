//! Envelope encryption of secret values with XChaCha20-Poly1305.
//!
//! Every secret version gets its own random 32-byte data key. The value is
//! encrypted with the data key; the data key is encrypted ("wrapped") with the
//! master key. Both encryptions carry associated data binding the tenant,
//! profile, key name and version, so a ciphertext copied to another tenant,
//! profile, key or version fails to decrypt, and rotating the master key
//! re-encrypts 48 bytes per version instead of every value ([`rewrap`]).
//!
//! Nonces are 24 random bytes (XChaCha20), so random nonces never need a
//! counter to stay unique. Plaintext data keys and values live only in
//! [`Zeroizing`] buffers; errors name what failed, never key or value bytes.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::SecretValue;

/// Length of master and data keys.
pub const KEY_LEN: usize = 32;
/// Length of XChaCha20-Poly1305 nonces.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;
/// Length of a wrapped data key: the key and its tag.
pub const WRAPPED_KEY_LEN: usize = KEY_LEN + TAG_LEN;

/// The environment variable the master key is conventionally read from. It is
/// deliberately outside the `BULKHEAD_SEALED_VAULT__*` config namespace, so
/// `--dump-config` can never print it.
pub const MASTER_KEY_ENV: &str = "BULKHEAD_SEALED_VAULT_MASTER_KEY";

/// A key file is a line of text; anything much longer is not a key file.
const MAX_KEY_FILE_LEN: usize = 1024;

/// Why a master key could not be loaded or written. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key environment variable {var} is not set")]
    EnvMissing { var: String },
    #[error(
        "master key from {origin} is malformed: expected 32 bytes as 64 hex digits \
         or as standard padded base64 (44 characters)"
    )]
    Malformed { origin: String },
    #[error(
        "master key file {} has mode {mode:04o}: it must be 0600 or stricter (chmod 600 it)",
        .path.display()
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("master key file {} is not a regular file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("master key file {} already exists; refusing to overwrite a master key", .path.display())]
    Exists { path: PathBuf },
    #[error("failed to read master key file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write master key file {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why sealing, opening or re-wrapping failed. Never carries key or value bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("sealed under master key {sealed_with}, but master key {given} was given")]
    WrongMasterKey { sealed_with: String, given: String },
    #[error(
        "the data key did not authenticate (wrong master key, tenant, profile, key or \
         version, or a tampered wrapped key)"
    )]
    Unwrap,
    #[error(
        "the value did not authenticate (wrong tenant, profile, key or version, or a \
         tampered ciphertext)"
    )]
    Decrypt,
    #[error("malformed sealed secret: {0}")]
    Malformed(&'static str),
    #[error("encryption failed")]
    Encrypt,
}

/// The master key: wraps every data key. Zeroized on drop; its `Debug` shows
/// only the key id.
#[derive(Clone)]
pub struct MasterKey {
    key: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl MasterKey {
    /// A fresh random key, for `dev up` and tests. Production keys are loaded
    /// ([`MasterKey::from_env`], [`MasterKey::from_file`]), never generated
    /// silently.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(key.as_mut_slice());
        Self::from_bytes(key)
    }

    /// A key from its bytes.
    pub fn from_bytes(key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let digest = Sha256::digest(key.as_slice());
        let id = hex::encode(&digest[..8]);
        Self { key, id }
    }

    /// Reads the key from the environment variable `var`: 64 hex digits, or
    /// 32 bytes in standard padded base64; surrounding whitespace is ignored.
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let text = match std::env::var(var) {
            Ok(text) => Zeroizing::new(text),
            Err(std::env::VarError::NotPresent) => {
                return Err(KeyError::EnvMissing { var: var.into() });
            }
            // The error would carry the raw value: drop it, say only where.
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(KeyError::Malformed {
                    origin: format!("environment variable {var}"),
                });
            }
        };
        Self::parse(text.as_bytes(), || format!("environment variable {var}"))
    }

    /// Reads the key from a file holding it in the same text forms as
    /// [`MasterKey::from_env`]. The file must be a regular file of mode 0600
    /// or stricter (no bits beyond owner read and write): a key readable by
    /// others is refused, not used.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let read_error = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        // The mode of the file actually opened, not of whatever the path names
        // a moment later.
        let meta = file.metadata().map_err(read_error)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & !0o600 != 0 {
            return Err(KeyError::Mode {
                path: path.to_owned(),
                mode,
            });
        }
        // Capacity fixed up front: the buffer never reallocates, so no
        // unzeroized copy of the key is left behind in freed memory.
        let mut text = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_LEN + 1));
        file.take(MAX_KEY_FILE_LEN as u64 + 1)
            .read_to_end(&mut text)
            .map_err(read_error)?;
        let origin = || format!("file {}", path.display());
        if text.len() > MAX_KEY_FILE_LEN {
            return Err(KeyError::Malformed { origin: origin() });
        }
        Self::parse(&text, origin)
    }

    /// Writes the key, as 64 hex digits and a newline, to a new file of mode
    /// 0600. An existing file is never overwritten: that would lose every
    /// secret sealed under the key it held.
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        let write_error = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_owned(),
                },
                _ => write_error(e),
            })?;
        // The umask can only clear bits, but say exactly what the loader requires.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write_error)?;
        let mut line = self.to_hex();
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(write_error)?;
        file.sync_all().map_err(write_error)
    }

    /// The key id: the first 8 bytes of the key's SHA-256, in lowercase hex.
    /// Recorded beside every wrapped data key; not secret.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as 64 lowercase hex digits, for handing it to a child process
    /// (`dev up`). Treat the result as a secret.
    pub fn to_hex(&self) -> Zeroizing<String> {
        // Written digit by digit into a buffer of the final size, so no
        // intermediate or reallocated copy escapes the zeroizing.
        let mut out = Zeroizing::new(String::with_capacity(2 * KEY_LEN + 1));
        for b in self.key.iter() {
            out.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
            out.push(char::from(HEX_DIGITS[usize::from(b & 0x0f)]));
        }
        out
    }

    fn parse(text: &[u8], origin: impl Fn() -> String) -> Result<Self, KeyError> {
        let malformed = || KeyError::Malformed { origin: origin() };
        let text = text.trim_ascii();
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if text.len() == 2 * KEY_LEN {
            hex::decode_to_slice(text, key.as_mut_slice()).map_err(|_| malformed())?;
        } else {
            // Room for any over-estimate of the decoded length; the exact
            // length is checked below.
            let mut buf = Zeroizing::new([0u8; 2 * KEY_LEN]);
            let n = BASE64
                .decode_slice(text, buf.as_mut_slice())
                .map_err(|_| malformed())?;
            if n != KEY_LEN {
                return Err(malformed());
            }
            key.copy_from_slice(&buf[..KEY_LEN]);
        }
        Ok(Self::from_bytes(key))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(self.key.as_slice()))
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("key", &format_args!("[redacted]"))
            .finish()
    }
}

/// What a ciphertext belongs to. Bound into the associated data of both the
/// value and its wrapped data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aad<'a> {
    pub tenant: &'a str,
    pub profile: &'a str,
    pub key: &'a str,
    pub version: u64,
}

/// Which of the two encryptions associated data is for, so a wrapped data key
/// and a value can never stand in for each other.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    Value,
    DataKey,
}

impl<'a> Aad<'a> {
    pub fn new(tenant: &'a str, profile: &'a str, key: &'a str, version: u64) -> Self {
        Self {
            tenant,
            profile,
            key,
            version,
        }
    }

    /// Every field length-prefixed, so no two different bindings encode alike
    /// (`"a"` + `"bc"` is not `"ab"` + `"c"`).
    fn encode(&self, purpose: Purpose) -> Vec<u8> {
        let purpose = match purpose {
            Purpose::Value => "value",
            Purpose::DataKey => "data-key",
        };
        let fields = [
            "bulkhead.sealed.v1",
            purpose,
            self.tenant,
            self.profile,
            self.key,
        ];
        let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 8).sum::<usize>() + 8);
        for field in fields {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(&self.version.to_be_bytes());
        out
    }
}

/// A sealed value: everything needed to decrypt it given the master key and
/// its [`Aad`]. Nothing in it is secret; binary fields serialize as base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// The data key encrypted by the master key (48 bytes).
    #[serde(with = "b64")]
    pub wrapped_key: Vec<u8>,
    #[serde(with = "b64")]
    pub key_nonce: [u8; NONCE_LEN],
    /// The value encrypted by the data key (its length plus 16).
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
    #[serde(with = "b64")]
    pub nonce: [u8; NONCE_LEN],
    /// The id of the master key that wrapped the data key.
    pub master_key_id: String,
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSecret")
            .field("master_key_id", &self.master_key_id)
            .field("wrapped_key_len", &self.wrapped_key.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// Encrypts `value` under a fresh data key wrapped by `master`, bound to `aad`.
pub fn seal(
    master: &MasterKey,
    aad: &Aad<'_>,
    value: &SecretValue,
) -> Result<SealedSecret, CryptoError> {
    let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
    rand::rng().fill_bytes(data_key.as_mut_slice());
    let nonce = random_nonce();
    let data_cipher = XChaCha20Poly1305::new(Key::from_slice(data_key.as_slice()));
    let ciphertext = encrypt(
        &data_cipher,
        &nonce,
        &aad.encode(Purpose::Value),
        value.expose(),
    )?;
    let key_nonce = random_nonce();
    let wrapped_key = encrypt(
        &master.cipher(),
        &key_nonce,
        &aad.encode(Purpose::DataKey),
        data_key.as_slice(),
    )?;
    Ok(SealedSecret {
        wrapped_key,
        key_nonce,
        ciphertext,
        nonce,
        master_key_id: master.id.clone(),
    })
}

/// Decrypts a sealed value. Fails unless `master` is the key that wrapped its
/// data key and `aad` is exactly what it was sealed with.
pub fn open(
    master: &MasterKey,
    aad: &Aad<'_>,
    sealed: &SealedSecret,
) -> Result<SecretValue, CryptoError> {
    let data_key = unwrap_data_key(master, aad, sealed)?;
    let data_cipher = XChaCha20Poly1305::new(Key::from_slice(data_key.as_slice()));
    let mut buf = Zeroizing::new(sealed.ciphertext.clone());
    data_cipher
        .decrypt_in_place(
            XNonce::from_slice(&sealed.nonce),
            &aad.encode(Purpose::Value),
            &mut *buf,
        )
        .map_err(|_| CryptoError::Decrypt)?;
    // Moves the buffer (no copy) into the value, which zeroizes it in turn.
    Ok(SecretValue::new(std::mem::take(&mut *buf)))
}

/// Re-wraps the data key of a sealed value from `old` to `new`. The value's
/// ciphertext and nonce are unchanged; only the wrapped key, its nonce and the
/// master key id are new.
pub fn rewrap(
    old: &MasterKey,
    new: &MasterKey,
    aad: &Aad<'_>,
    sealed: &SealedSecret,
) -> Result<SealedSecret, CryptoError> {
    let data_key = unwrap_data_key(old, aad, sealed)?;
    let key_nonce = random_nonce();
    let wrapped_key = encrypt(
        &new.cipher(),
        &key_nonce,
        &aad.encode(Purpose::DataKey),
        data_key.as_slice(),
    )?;
    Ok(SealedSecret {
        wrapped_key,
        key_nonce,
        ciphertext: sealed.ciphertext.clone(),
        nonce: sealed.nonce,
        master_key_id: new.id.clone(),
    })
}

fn unwrap_data_key(
    master: &MasterKey,
    aad: &Aad<'_>,
    sealed: &SealedSecret,
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    if sealed.master_key_id != master.id {
        return Err(CryptoError::WrongMasterKey {
            sealed_with: sealed.master_key_id.clone(),
            given: master.id.clone(),
        });
    }
    if sealed.wrapped_key.len() != WRAPPED_KEY_LEN {
        return Err(CryptoError::Malformed("wrapped key is not 48 bytes"));
    }
    let mut buf = Zeroizing::new(sealed.wrapped_key.clone());
    master
        .cipher()
        .decrypt_in_place(
            XNonce::from_slice(&sealed.key_nonce),
            &aad.encode(Purpose::DataKey),
            &mut *buf,
        )
        .map_err(|_| CryptoError::Unwrap)?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(
        buf.get(..KEY_LEN)
            .ok_or(CryptoError::Malformed("wrapped key is not 48 bytes"))?,
    );
    Ok(key)
}

/// Encrypts a copy of `plaintext` in a zeroizing buffer sized for the tag, so
/// the buffer never reallocates while it holds plaintext and is wiped if
/// encryption fails.
fn encrypt(
    cipher: &XChaCha20Poly1305,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_LEN));
    buf.extend_from_slice(plaintext);
    cipher
        .encrypt_in_place(XNonce::from_slice(nonce), aad, &mut *buf)
        .map_err(|_| CryptoError::Encrypt)?;
    Ok(std::mem::take(&mut *buf))
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

/// Serde for byte fields as standard base64 strings.
pub(crate) mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::Error as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: AsRef<[u8]>>(bytes: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes.as_ref()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<Vec<u8>>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = STANDARD.decode(text).map_err(D::Error::custom)?;
        T::try_from(bytes).map_err(|_| D::Error::custom("wrong length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_encoding_is_unambiguous() {
        let a = Aad::new("a", "bc", "K", 1).encode(Purpose::Value);
        let b = Aad::new("ab", "c", "K", 1).encode(Purpose::Value);
        assert_ne!(a, b);
        let v = Aad::new("a", "b", "K", 1);
        assert_ne!(v.encode(Purpose::Value), v.encode(Purpose::DataKey));
    }

    #[test]
    fn hex_and_base64_parse_to_the_same_key() {
        let key = MasterKey::generate();
        let hex = key.to_hex();
        let b64 = BASE64.encode(key.key.as_slice());
        let from_hex = MasterKey::parse(hex.as_bytes(), String::new).expect("hex");
        let from_b64 = MasterKey::parse(format!(" {b64}\n").as_bytes(), String::new).expect("b64");
        assert_eq!(from_hex.id(), key.id());
        assert_eq!(from_b64.id(), key.id());
        assert_eq!(key.id().len(), 16);
        for bad in ["", "zz", &hex[..62], &BASE64.encode([0u8; 31])] {
            assert!(
                MasterKey::parse(bad.as_bytes(), String::new).is_err(),
                "{bad:?}"
            );
        }
    }
}
