//! Envelope encryption: what a sealed value is bound to, what opens it, and
//! what never leaks from its keys.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bulkhead_sealed_vault::crypto::{
    self, Aad, CryptoError, KeyError, MasterKey, NONCE_LEN, SealedSecret, WRAPPED_KEY_LEN,
};
use bulkhead_sealed_vault::secret::SecretValue;

const VALUE: &[u8] = b"sk-ant-api03-CANARY-0f3a9c";

fn aad(version: u64) -> Aad<'static> {
    Aad::new("acme", "default", "ANTHROPIC_API_KEY", version)
}

fn value(bytes: &[u8]) -> SecretValue {
    SecretValue::from_slice(bytes)
}

#[test]
fn round_trip() {
    let master = MasterKey::generate();
    for len in [1usize, 31, 32, 33, 4096, 64 * 1024] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let sealed = crypto::seal(&master, &aad(1), &value(&plain)).expect("seal");
        assert_eq!(sealed.master_key_id, master.id());
        assert_eq!(sealed.wrapped_key.len(), WRAPPED_KEY_LEN);
        assert_eq!(sealed.ciphertext.len(), len + 16);
        // A short ciphertext equals its plaintext by chance (one byte: once
        // in 256 runs); from 16 bytes on, a match means no encryption.
        if len >= 16 {
            assert_ne!(&sealed.ciphertext[..len], plain.as_slice());
        }
        let opened = crypto::open(&master, &aad(1), &sealed).expect("open");
        assert_eq!(opened.expose(), plain.as_slice());
    }
}

#[test]
fn every_seal_uses_fresh_keys_and_nonces() {
    let master = MasterKey::generate();
    let a = crypto::seal(&master, &aad(1), &value(VALUE)).expect("seal");
    let b = crypto::seal(&master, &aad(1), &value(VALUE)).expect("seal");
    assert_ne!(a.nonce, b.nonce);
    assert_ne!(a.key_nonce, b.key_nonce);
    assert_ne!(a.ciphertext, b.ciphertext);
    assert_ne!(a.wrapped_key, b.wrapped_key);
}

#[test]
fn a_ciphertext_moved_to_another_tenant_profile_key_or_version_fails() {
    let master = MasterKey::generate();
    let original = Aad::new("acme", "default", "API_KEY", 3);
    let sealed = crypto::seal(&master, &original, &value(VALUE)).expect("seal");
    let elsewhere = [
        Aad::new("globex", "default", "API_KEY", 3),
        Aad::new("acme", "staging", "API_KEY", 3),
        Aad::new("acme", "default", "OTHER_KEY", 3),
        Aad::new("acme", "default", "API_KEY", 2),
        Aad::new("acme", "default", "API_KEY", 4),
        // Field boundaries count: the encoding is length-prefixed.
        Aad::new("acmedefault", "", "API_KEY", 3),
        Aad::new("acm", "edefault", "API_KEY", 3),
        Aad::new("acme", "defaultAPI_KEY", "", 3),
    ];
    for aad in elsewhere {
        let err = crypto::open(&master, &aad, &sealed).expect_err("bound elsewhere");
        assert_eq!(err, CryptoError::Unwrap, "{aad:?}");
    }
    assert_eq!(
        crypto::open(&master, &original, &sealed)
            .expect("open")
            .expose(),
        VALUE
    );
}

#[test]
fn parts_swapped_between_two_secrets_fail() {
    let master = MasterKey::generate();
    let (a_aad, b_aad) = (
        Aad::new("acme", "p", "K", 1),
        Aad::new("globex", "p", "K", 1),
    );
    let a = crypto::seal(&master, &a_aad, &value(b"value of acme")).expect("seal");
    let b = crypto::seal(&master, &b_aad, &value(b"value of globex")).expect("seal");
    // The whole sealed row of tenant A copied over tenant B's.
    assert!(crypto::open(&master, &b_aad, &a).is_err());
    // A's value under B's (authentic) data key.
    let mixed = SealedSecret {
        ciphertext: a.ciphertext.clone(),
        nonce: a.nonce,
        ..b.clone()
    };
    assert_eq!(
        crypto::open(&master, &b_aad, &mixed).expect_err("mixed"),
        CryptoError::Decrypt
    );
    // B's data key moved into A's row.
    let mixed = SealedSecret {
        wrapped_key: b.wrapped_key.clone(),
        key_nonce: b.key_nonce,
        ..a.clone()
    };
    assert_eq!(
        crypto::open(&master, &a_aad, &mixed).expect_err("mixed"),
        CryptoError::Unwrap
    );
}

#[test]
fn any_tampered_byte_fails() {
    let master = MasterKey::generate();
    let sealed = crypto::seal(&master, &aad(1), &value(VALUE)).expect("seal");
    let fails = |s: &SealedSecret| crypto::open(&master, &aad(1), s).is_err();
    for i in 0..sealed.wrapped_key.len() {
        let mut s = sealed.clone();
        s.wrapped_key[i] ^= 0x01;
        assert!(fails(&s), "wrapped_key byte {i}");
    }
    for i in 0..NONCE_LEN {
        let mut s = sealed.clone();
        s.key_nonce[i] ^= 0x80;
        assert!(fails(&s), "key_nonce byte {i}");
        let mut s = sealed.clone();
        s.nonce[i] ^= 0x80;
        assert!(fails(&s), "nonce byte {i}");
    }
    for i in 0..sealed.ciphertext.len() {
        let mut s = sealed.clone();
        s.ciphertext[i] ^= 0x01;
        assert!(fails(&s), "ciphertext byte {i}");
    }
    let mut truncated = sealed.clone();
    truncated.ciphertext.pop();
    assert!(fails(&truncated));
    let mut short = sealed.clone();
    short.wrapped_key.pop();
    assert!(matches!(
        crypto::open(&master, &aad(1), &short),
        Err(CryptoError::Malformed(_))
    ));
    assert!(!fails(&sealed));
}

#[test]
fn a_wrong_master_key_fails() {
    let master = MasterKey::generate();
    let other = MasterKey::generate();
    assert_ne!(master.id(), other.id());
    let sealed = crypto::seal(&master, &aad(1), &value(VALUE)).expect("seal");
    assert!(matches!(
        crypto::open(&other, &aad(1), &sealed),
        Err(CryptoError::WrongMasterKey { .. })
    ));
    // Even with the key id forged to match, the data key does not unwrap.
    let forged = SealedSecret {
        master_key_id: other.id().to_owned(),
        ..sealed
    };
    assert_eq!(
        crypto::open(&other, &aad(1), &forged).expect_err("forged"),
        CryptoError::Unwrap
    );
}

#[test]
fn rewrap_moves_every_secret_to_the_new_key() {
    let old = MasterKey::generate();
    let new = MasterKey::generate();
    let values: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("secret number {i}").into_bytes())
        .collect();
    let sealed: Vec<SealedSecret> = values
        .iter()
        .enumerate()
        .map(|(i, v)| crypto::seal(&old, &aad(i as u64 + 1), &value(v)).expect("seal"))
        .collect();
    for (i, (s, v)) in sealed.iter().zip(&values).enumerate() {
        let aad = aad(i as u64 + 1);
        let r = crypto::rewrap(&old, &new, &aad, s).expect("rewrap");
        // Only the data key was re-encrypted.
        assert_eq!(r.ciphertext, s.ciphertext);
        assert_eq!(r.nonce, s.nonce);
        assert_ne!(r.wrapped_key, s.wrapped_key);
        assert_ne!(r.key_nonce, s.key_nonce);
        assert_eq!(r.master_key_id, new.id());
        assert_eq!(
            crypto::open(&new, &aad, &r).expect("new key").expose(),
            v.as_slice()
        );
        assert!(crypto::open(&old, &aad, &r).is_err(), "old key refused");
        let forged = SealedSecret {
            master_key_id: old.id().to_owned(),
            ..r.clone()
        };
        assert!(
            crypto::open(&old, &aad, &forged).is_err(),
            "old key refused"
        );
        // Re-wrapping is bound to the same associated data as opening.
        assert!(crypto::rewrap(&new, &old, &Aad::new("x", "y", "z", 1), &r).is_err());
        assert!(
            crypto::rewrap(&new, &old, &aad, s).is_err(),
            "not sealed by new"
        );
    }
}

fn write_key_file(dir: &Path, name: &str, mode: u32) -> (MasterKey, std::path::PathBuf) {
    let key = MasterKey::generate();
    let path = dir.join(name);
    key.write_new_file(&path).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    (key, path)
}

#[test]
fn key_files_must_be_0600_or_stricter() {
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in [0o600, 0o400] {
        let (key, path) = write_key_file(dir.path(), &format!("ok-{mode:o}.key"), mode);
        let loaded = MasterKey::from_file(&path).expect("a strict mode loads");
        assert_eq!(loaded.id(), key.id());
    }
    for mode in [0o644, 0o640, 0o604, 0o660, 0o700, 0o610, 0o4600] {
        let (_, path) = write_key_file(dir.path(), &format!("loose-{mode:o}.key"), mode);
        let err = MasterKey::from_file(&path).expect_err("a loose mode is refused");
        assert!(
            matches!(err, KeyError::Mode { mode: m, .. } if m == mode),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("{mode:04o}")), "{message}");
    }
}

#[test]
fn written_key_files_are_0600_and_never_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("master.key");
    let key = MasterKey::generate();
    key.write_new_file(&path).expect("write");
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let text = std::fs::read_to_string(&path).expect("read");
    assert_eq!(text, format!("{}\n", key.to_hex().as_str()));
    assert_eq!(MasterKey::from_file(&path).expect("load").id(), key.id());

    let err = MasterKey::generate()
        .write_new_file(&path)
        .expect_err("exists");
    assert!(matches!(err, KeyError::Exists { .. }), "{err:?}");
    assert_eq!(
        MasterKey::from_file(&path).expect("load").id(),
        key.id(),
        "the first key survives"
    );
}

#[test]
fn missing_or_malformed_keys_are_errors_never_new_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("absent.key");
    assert!(matches!(
        MasterKey::from_file(&missing),
        Err(KeyError::Read { .. })
    ));
    assert!(matches!(
        MasterKey::from_file(dir.path()),
        Err(KeyError::NotAFile { .. })
    ));
    let hex = MasterKey::generate().to_hex();
    let almost = &hex[..63];
    let bad_contents = [
        String::new(),
        "\n".into(),
        almost.to_owned(),
        format!("{almost}g"),
        format!("{}{}", hex.as_str(), "00"),
        "c2hvcnQ=".into(),
        "x".repeat(5000),
    ];
    for (i, contents) in bad_contents.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.key"));
        std::fs::write(&path, contents).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = MasterKey::from_file(&path).expect_err("malformed");
        assert!(matches!(err, KeyError::Malformed { .. }), "{i}: {err:?}");
        let message = format!("{err} {err:?}");
        assert!(message.contains(&path.display().to_string()));
        if contents.len() > 8 {
            assert!(
                !message.contains(contents.trim()),
                "content leaked: {message}"
            );
        }
    }
}

#[test]
fn env_keys_missing_or_malformed_are_errors() {
    let unset = "BULKHEAD_TEST_SURELY_UNSET_MASTER_KEY";
    assert!(matches!(
        MasterKey::from_env(unset),
        Err(KeyError::EnvMissing { .. })
    ));
    // PATH is set and is no key; its value must not reach the error.
    let err = MasterKey::from_env("PATH").expect_err("malformed");
    assert!(matches!(err, KeyError::Malformed { .. }));
    let path = std::env::var("PATH").unwrap_or_default();
    let message = format!("{err} {err:?}");
    assert!(!path.is_empty() && !message.contains(&path), "{message}");
}

/// Setting a variable in this process needs `unsafe` (edition 2024), so the
/// environment case runs in a child: this test binary again, running only
/// [`env_child`] with the variables set.
#[test]
fn env_keys_load_from_hex_and_base64() {
    let key = MasterKey::generate();
    let hex = key.to_hex();
    let b64 = STANDARD.encode(hex::decode(hex.as_str()).expect("hex"));
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args(["env_child", "--exact", "--test-threads=1"])
        .env("BULKHEAD_TEST_MK_HEX", hex.as_str())
        .env("BULKHEAD_TEST_MK_B64", format!("  {b64}\n"))
        .env("BULKHEAD_TEST_MK_ID", key.id())
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "child failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child ran env_child"
    );
}

#[test]
fn env_child() {
    let Ok(id) = std::env::var("BULKHEAD_TEST_MK_ID") else {
        return; // run directly: nothing to do (see env_keys_load_from_hex_and_base64)
    };
    let hex = MasterKey::from_env("BULKHEAD_TEST_MK_HEX").expect("hex");
    let b64 = MasterKey::from_env("BULKHEAD_TEST_MK_B64").expect("base64");
    assert_eq!(hex.id(), id);
    assert_eq!(b64.id(), id);
}

#[test]
fn debug_output_carries_no_key_or_value_material() {
    let master = MasterKey::generate();
    let hex = master.to_hex();
    let shown = format!("{master:?}");
    assert!(shown.contains("[redacted]"), "{shown}");
    assert!(shown.contains(master.id()), "{shown}");
    assert!(!shown.contains(&hex[..16]), "{shown}");
    assert!(!shown.contains(&hex[16..32]), "{shown}");
    assert!(!shown.contains(&hex[48..]), "{shown}");

    let secret = value(VALUE);
    assert_eq!(format!("{secret:?}"), "[redacted]");
    let sealed = crypto::seal(&master, &aad(1), &secret).expect("seal");
    let shown = format!("{sealed:?}");
    assert!(!shown.contains("CANARY"), "{shown}");
    let opened = crypto::open(&master, &aad(1), &sealed).expect("open");
    assert_eq!(format!("{opened:?}"), "[redacted]");

    // Errors say what failed, never with what.
    let wrong = MasterKey::generate();
    for err in [
        crypto::open(&wrong, &aad(1), &sealed).expect_err("wrong key"),
        crypto::open(&master, &aad(2), &sealed).expect_err("wrong version"),
    ] {
        let text = format!("{err} {err:?}");
        assert!(!text.contains("CANARY"), "{text}");
        assert!(!text.contains(&hex[..16]), "{text}");
    }
}
