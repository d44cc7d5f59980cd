//! The master key: wraps every data key and the token-hash key.

use std::fmt;
use std::path::Path;

use aws_lc_rs::digest;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::files::{create_private_file, ensure_private_dir, read_private_file_opt};
use crate::keyfile::{KeyFile, KeySource};
use crate::VaultError;

/// Length of the master key in bytes.
pub(crate) const MASTER_KEY_LEN: usize = 32;

/// File name of the generated master key inside the data dir.
const MASTER_KEY_FILE: &str = "master.key";

/// Standard alphabet; padding optional on input (what `openssl rand -base64 32`
/// prints is accepted, and so is the same without the trailing `=`).
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const BAD_BASE64: &str =
    "expected standard base64 of exactly 32 bytes (generate one with `openssl rand -base64 32`)";

/// The 256-bit master key. Zeroized on drop; `Debug` shows only its id.
#[derive(Clone)]
pub struct MasterKey {
    key: Zeroizing<[u8; MASTER_KEY_LEN]>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id()).finish()
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> MasterKey {
        let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        crate::fill_random(&mut key[..]);
        MasterKey { key }
    }

    /// Parses standard base64 of exactly 32 bytes (surrounding whitespace is ignored).
    pub fn from_base64(s: &str) -> Result<MasterKey, VaultError> {
        Self::parse(s, None)
    }

    fn parse(s: &str, origin: Option<&str>) -> Result<MasterKey, VaultError> {
        let err = |reason| VaultError::InvalidMasterKey {
            origin: origin.map(str::to_owned),
            reason,
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        // Decode into a fixed stack buffer (no heap copy of the key). Anything
        // that would decode to more than the buffer holds is wrong anyway. The
        // decoder's own error is not shown: it can quote input bytes.
        let mut buf = Zeroizing::new([0u8; 48]);
        let n = LENIENT_STANDARD
            .decode_slice(s.as_bytes(), &mut buf[..])
            .map_err(|_| err(BAD_BASE64))?;
        if n != MASTER_KEY_LEN {
            return Err(err(BAD_BASE64));
        }
        let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        key.copy_from_slice(&buf[..MASTER_KEY_LEN]);
        Ok(MasterKey { key })
    }

    /// Standard base64 (with padding) of the key.
    pub fn to_base64(&self) -> Zeroizing<String> {
        // Reserve the exact size so encoding does not reallocate.
        let mut out = Zeroizing::new(String::with_capacity(48));
        STANDARD.encode_string(&self.key[..], &mut out);
        out
    }

    /// Short stable identifier: first 8 bytes of SHA-256("keygate master key id" || key), hex (16 chars).
    pub fn id(&self) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"keygate master key id");
        ctx.update(&self.key[..]);
        let d = ctx.finish();
        hex::encode(&d.as_ref()[..8])
    }

    /// The raw key bytes, for the envelope code.
    pub(crate) fn bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.key
    }

    /// Resolution order: `env_b64` (KEYGATE_MASTER_KEY) if Some; else `env_file` (KEYGATE_MASTER_KEY_FILE) if Some (file holds base64, perms checked);
    /// else `<data_dir>/master.key` (base64 text, created 0600 with a fresh key if missing, perms checked if present).
    pub fn load_or_create(
        data_dir: &Path,
        env_b64: Option<&str>,
        env_file: Option<&Path>,
    ) -> Result<MasterKey, VaultError> {
        Self::load(data_dir, env_b64, env_file).map(|(key, _)| key)
    }

    /// [`MasterKey::load_or_create`], also telling where the key lives: that
    /// decides whether `keygate key rotate` can replace it.
    pub fn load(
        data_dir: &Path,
        env_b64: Option<&str>,
        env_file: Option<&Path>,
    ) -> Result<(MasterKey, KeySource), VaultError> {
        if let Some(b64) = env_b64 {
            return Ok((
                Self::parse(b64, Some("KEYGATE_MASTER_KEY"))?,
                KeySource::Env,
            ));
        }
        if let Some(path) = env_file {
            let file = KeyFile::new(path);
            return Ok((file.read()?, KeySource::File(file)));
        }

        ensure_private_dir(data_dir)?;
        let file = KeyFile::new(data_dir.join(MASTER_KEY_FILE));
        let path = file.path();
        if let Some(bytes) = read_private_file_opt(path)? {
            let key = Self::parse_file(&bytes, path)?;
            return Ok((key, KeySource::File(file)));
        }
        let key = MasterKey::generate();
        if create_private_file(path, key.to_file_text().as_bytes())? {
            Ok((key, KeySource::File(file)))
        } else {
            // Another process created it first: use theirs.
            let key = file.read()?;
            Ok((key, KeySource::File(file)))
        }
    }

    /// What a key file holds: the base64 key and a newline.
    pub(crate) fn to_file_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(64));
        text.push_str(&self.to_base64());
        text.push('\n');
        text
    }

    pub(crate) fn parse_file(bytes: &[u8], path: &Path) -> Result<MasterKey, VaultError> {
        let origin = path.display().to_string();
        let text = std::str::from_utf8(bytes).map_err(|_| VaultError::InvalidMasterKey {
            origin: Some(origin.clone()),
            reason: BAD_BASE64,
        })?;
        Self::parse(text, Some(&origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn base64_round_trip_and_id() {
        let k = MasterKey::generate();
        let b = k.to_base64();
        assert_eq!(b.len(), 44);
        let k2 = MasterKey::from_base64(&format!("  {}\n", &*b)).unwrap();
        assert_eq!(k.bytes(), k2.bytes());
        assert_eq!(k.id(), k2.id());
        assert_eq!(k.id().len(), 16);
        assert!(k.id().bytes().all(|c| c.is_ascii_hexdigit()));
        // Unpadded is accepted too.
        let k3 = MasterKey::from_base64(b.trim_end_matches('=')).unwrap();
        assert_eq!(k.bytes(), k3.bytes());
        assert_ne!(k.id(), MasterKey::generate().id());
    }

    #[test]
    fn id_matches_definition() {
        let k = MasterKey::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        let mut input = b"keygate master key id".to_vec();
        input.extend_from_slice(&[7u8; 32]);
        let d = digest::digest(&digest::SHA256, &input);
        assert_eq!(k.id(), hex::encode(&d.as_ref()[..8]));
    }

    #[test]
    fn rejects_wrong_length_and_garbage() {
        for bad in [
            STANDARD.encode([1u8; 31]),
            STANDARD.encode([1u8; 33]),
            STANDARD.encode([1u8; 64]),
            STANDARD.encode([1u8; 16]),
            String::new(),
            "   ".to_owned(),
            "not base64 at all!!".to_owned(),
            "-_-_".repeat(11),
        ] {
            match MasterKey::from_base64(&bad) {
                Err(VaultError::InvalidMasterKey { .. }) => {}
                other => panic!("{bad:?}: expected InvalidMasterKey, got {other:?}"),
            }
        }
    }

    #[test]
    fn error_does_not_echo_input() {
        let secretish = "c2VjcmV0LXZhbHVlLXRoYXQtaXMtbm90LTMyLWJ5dGVz!";
        let err = MasterKey::load_or_create(Path::new("/nonexistent"), Some(secretish), None)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("KEYGATE_MASTER_KEY"), "{msg}");
        assert!(!msg.contains("c2VjcmV0"), "{msg}");
    }

    #[test]
    fn debug_shows_only_id() {
        let k = MasterKey::generate();
        let dbg = format!("{k:?}");
        assert!(dbg.contains(&k.id()));
        assert!(!dbg.contains(k.to_base64().as_str()));
        assert!(!dbg.contains(&hex::encode(k.bytes())));
    }

    #[test]
    fn load_or_create_creates_then_reuses() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let k1 = MasterKey::load_or_create(&data, None, None).unwrap();
        let file = data.join("master.key");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.trim(), k1.to_base64().as_str());

        let k2 = MasterKey::load_or_create(&data, None, None).unwrap();
        assert_eq!(k1.id(), k2.id());
        assert_eq!(k1.bytes(), k2.bytes());

        // A group-readable key file is refused.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            MasterKey::load_or_create(&data, None, None),
            Err(VaultError::InsecurePermissions { .. })
        ));
    }

    #[test]
    fn load_or_create_rejects_corrupt_file() {
        let tmp = tempfile::tempdir().unwrap();
        crate::write_private_file(&tmp.path().join("master.key"), b"short\n").unwrap();
        let err = MasterKey::load_or_create(tmp.path(), None, None).unwrap_err();
        assert!(matches!(err, VaultError::InvalidMasterKey { .. }));
        assert!(err.to_string().contains("master.key"), "{err}");
    }

    #[test]
    fn env_b64_takes_precedence() {
        let tmp = tempfile::tempdir().unwrap();
        let k = MasterKey::generate();
        let other = tmp.path().join("other.key");
        crate::write_private_file(&other, MasterKey::generate().to_base64().as_bytes()).unwrap();
        let got =
            MasterKey::load_or_create(tmp.path(), Some(&k.to_base64()), Some(&other)).unwrap();
        assert_eq!(got.id(), k.id());
        // Nothing was written to the data dir.
        assert!(!tmp.path().join("master.key").exists());

        let err = MasterKey::load_or_create(tmp.path(), Some(&STANDARD.encode([0u8; 16])), None);
        assert!(matches!(err, Err(VaultError::InvalidMasterKey { .. })));
    }

    #[test]
    fn env_file_is_used_and_perms_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let k = MasterKey::generate();
        let f = tmp.path().join("mk");
        let mut content = k.to_base64().to_string();
        content.push('\n');
        crate::write_private_file(&f, content.as_bytes()).unwrap();
        let got = MasterKey::load_or_create(tmp.path(), None, Some(&f)).unwrap();
        assert_eq!(got.id(), k.id());
        assert!(!tmp.path().join("master.key").exists());

        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(
            MasterKey::load_or_create(tmp.path(), None, Some(&f)),
            Err(VaultError::InsecurePermissions { .. })
        ));

        // A missing file is an error, not a fallback to a generated key.
        let missing = tmp.path().join("nope");
        let err = MasterKey::load_or_create(tmp.path(), None, Some(&missing)).unwrap_err();
        assert!(err.is_not_found());
        assert!(!tmp.path().join("master.key").exists());

        crate::write_private_file(&f, STANDARD.encode([3u8; 40]).as_bytes()).unwrap();
        assert!(matches!(
            MasterKey::load_or_create(tmp.path(), None, Some(&f)),
            Err(VaultError::InvalidMasterKey { .. })
        ));
    }
}
