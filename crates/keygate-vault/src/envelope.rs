//! AES-256-GCM envelope encryption of secret values.
//!
//! Layout of a [`SealedSecret`]:
//!
//! * `wrapped_key` = nonce (12) ‖ AES-256-GCM(master key, data key (32)) ‖ tag (16)
//! * `ciphertext`  = nonce (12) ‖ AES-256-GCM(data key, value) ‖ tag (16)
//!
//! Each seal draws a fresh random data key, used for exactly one encryption.
//! Both layers bind the secret id and version through the AAD, with a
//! different purpose label per layer so the two cannot be swapped.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use keygate_core::snapshot::SealedSecret;
use zeroize::Zeroizing;

use crate::keyfile::KeySource;
use crate::master::MasterKey;
use crate::VaultError;

const DATA_KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const WRAPPED_KEY_LEN: usize = NONCE_LEN + DATA_KEY_LEN + TAG_LEN;

/// Version/domain prefix of every AAD.
const AAD_DOMAIN: &[u8] = b"keygate/v1";
const PURPOSE_DATA_KEY: &[u8] = b"data-key";
const PURPOSE_VALUE: &[u8] = b"value";
const PURPOSE_BLOB: &[u8] = b"blob";

/// A master key with its id computed once (the id is a SHA-256; `open` looks
/// keys up by it on every injection) and its AES-256-GCM key schedule
/// expanded once: unwrapping a data key on every injection then costs one
/// decryption, not a key expansion as well. The schedule is derived from the
/// master key the entry holds anyway; aws-lc clears it when it is freed.
#[derive(Clone)]
struct KeyEntry {
    id: String,
    key: MasterKey,
    /// `None` only if aws-lc refused the key (it takes any 32 bytes); then
    /// each unwrap expands the key itself.
    opener: Option<Arc<LessSafeKey>>,
}

impl KeyEntry {
    fn new(key: MasterKey) -> KeyEntry {
        let opener = UnboundKey::new(&AES_256_GCM, &key.bytes()[..])
            .ok()
            .map(|k| Arc::new(LessSafeKey::new(k)));
        KeyEntry {
            id: key.id(),
            key,
            opener,
        }
    }

    /// Runs `open` with this key's expanded schedule (expanded now if
    /// aws-lc refused it when the entry was made).
    fn with_opener<T>(
        &self,
        open: impl FnOnce(&LessSafeKey) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        match &self.opener {
            Some(key) => open(key),
            None => open(&LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &self.key.bytes()[..])
                    .map_err(|_| VaultError::Decrypt)?,
            )),
        }
    }

    /// [`aead_open`] under this master key.
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.with_opener(|key| aead_open_with(key, aad, sealed))
    }

    /// Opens a wrapped data key (nonce ‖ key ‖ tag) in a zeroized buffer
    /// on the stack: no heap copy of the key, on every injection.
    fn open_data_key(
        &self,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; DATA_KEY_LEN]>, VaultError> {
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(VaultError::Decrypt);
        }
        let mut buf = Zeroizing::new([0u8; DATA_KEY_LEN + TAG_LEN]);
        self.with_opener(|key| aead_open_into(key, aad, wrapped, &mut buf[..]))?;
        let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        key.copy_from_slice(&buf[..DATA_KEY_LEN]);
        Ok(key)
    }
}

/// The keys a vault knows: the current one, which seals, and older (or
/// pending) ones that still open what they sealed. Immutable; replaced as a
/// whole.
#[derive(Clone)]
struct Keyring {
    current: KeyEntry,
    others: Vec<KeyEntry>,
}

impl Keyring {
    fn find(&self, id: &str) -> Option<&KeyEntry> {
        self.entries().find(|e| e.id == id)
    }

    /// Current key first.
    fn entries(&self) -> impl Iterator<Item = &KeyEntry> {
        std::iter::once(&self.current).chain(self.others.iter())
    }
}

/// Encrypts and decrypts secret values under a master key.
///
/// A keyring: [`Vault::seal`] and [`Vault::wrap_blob`] always use the current
/// master key; [`Vault::open`], [`Vault::rewrap`] and [`Vault::unwrap_blob`]
/// use whichever known key sealed the input. Reading the keyring is lock-free
/// (`ArcSwap`), so the request path never waits on a rotation.
pub struct Vault {
    keys: ArcSwap<Keyring>,
    source: KeySource,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("key_ids", &self.key_ids())
            .field("source", &self.source)
            .finish()
    }
}

impl Vault {
    /// A vault over a key held only in memory (rotation is refused: there is
    /// nowhere to keep a new key). See [`Vault::load`] for keygate's sources.
    pub fn new(master: MasterKey) -> Vault {
        Vault::with_source(master, KeySource::Memory)
    }

    /// A vault whose current key came from `source`.
    pub fn with_source(master: MasterKey, source: KeySource) -> Vault {
        Vault {
            keys: ArcSwap::from_pointee(Keyring {
                current: KeyEntry::new(master),
                others: Vec::new(),
            }),
            source,
        }
    }

    /// Loads the master key as [`MasterKey::load`] resolves it
    /// (`KEYGATE_MASTER_KEY`, `KEYGATE_MASTER_KEY_FILE`, `<data dir>/master.key`)
    /// and remembers where it lives.
    ///
    /// A `<key file>.next` left by an interrupted rotation is not read here:
    /// the store settles it when it opens the database, since only the
    /// database says whether that key is in use.
    pub fn load(
        data_dir: &std::path::Path,
        env_b64: Option<&str>,
        env_file: Option<&std::path::Path>,
    ) -> Result<Vault, VaultError> {
        let (master, source) = MasterKey::load(data_dir, env_b64, env_file)?;
        Ok(Vault::with_source(master, source))
    }

    /// Where the current master key came from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Id of the current master key (see [`MasterKey::id`]); stored in every `SealedSecret`.
    pub fn key_id(&self) -> String {
        self.keys.load().current.id.clone()
    }

    /// Ids of every key this vault can open with, the current one first.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.load().entries().map(|e| e.id.clone()).collect()
    }

    /// Whether a key with this id is in the keyring.
    pub fn holds(&self, key_id: &str) -> bool {
        self.keys.load().find(key_id).is_some()
    }

    /// Adds a key that opens (but does not seal) from now on: the new key of
    /// a rotation before its transaction commits, or a pending key found at
    /// start-up. A key already held is left alone.
    pub fn add_key(&self, key: MasterKey) {
        let entry = KeyEntry::new(key);
        self.keys.rcu(|ring| {
            let mut ring = Keyring::clone(ring);
            if ring.find(&entry.id).is_none() {
                ring.others.push(entry.clone());
            }
            ring
        });
    }

    /// Drops a non-current key (a rotation that was rolled back). The current
    /// key is never removed.
    pub fn forget_key(&self, key_id: &str) {
        self.keys.rcu(|ring| {
            let mut ring = Keyring::clone(ring);
            ring.others.retain(|e| e.id != key_id);
            ring
        });
    }

    /// Makes `key` the current key. The key it replaces is kept (only it) so
    /// that a request still holding an older snapshot decrypts; keys older
    /// than that are dropped. Installing the current key again changes nothing.
    pub fn install_current(&self, key: MasterKey) {
        let entry = KeyEntry::new(key);
        self.keys.rcu(|ring| {
            if ring.current.id == entry.id {
                return Keyring::clone(ring);
            }
            Keyring {
                current: entry.clone(),
                others: vec![ring.current.clone()],
            }
        });
    }

    /// Fresh random 256-bit data key per call; value encrypted AES-256-GCM under the data key; data key wrapped AES-256-GCM
    /// under the master key. Both with random 96-bit nonces stored as prefix, and AAD binding "keygate/v1" + secret_id + version
    /// (length-prefixed so ("ab",1) and ("a","b1")-style confusions are impossible). Data key zeroized after use.
    pub fn seal(
        &self,
        secret_id: &str,
        version: i64,
        plaintext: &[u8],
    ) -> Result<SealedSecret, VaultError> {
        let ring = self.keys.load();
        let mut data_key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        crate::fill_random(&mut data_key[..]);
        let ciphertext = aead_seal(
            &data_key[..],
            &aad(
                PURPOSE_VALUE,
                &[secret_id.as_bytes(), &version.to_be_bytes()],
            ),
            plaintext,
        )?;
        let wrapped_key = wrap_data_key(secret_id, version, &data_key[..], &ring.current.key)?;
        Ok(SealedSecret {
            key_id: ring.current.id.clone(),
            wrapped_key,
            ciphertext,
        })
    }

    /// Reverse of seal, with the key `sealed.key_id` names. Any tampering (bytes, id, version, other master key, key_id
    /// not in the keyring or not the key that wrapped) → VaultError::Decrypt (no detail leak).
    pub fn open(
        &self,
        secret_id: &str,
        version: i64,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let data_key = self.unwrap_data_key(secret_id, version, sealed)?;
        aead_open(
            &data_key[..],
            &aad(
                PURPOSE_VALUE,
                &[secret_id.as_bytes(), &version.to_be_bytes()],
            ),
            &sealed.ciphertext,
        )
    }

    /// Re-wraps the data key under `new_master` without touching the ciphertext (for `keygate key rotate`); returns the new SealedSecret with new key_id.
    ///
    /// Fails with [`VaultError::Decrypt`] if the data key does not unwrap
    /// under the keyring's key named by `sealed.key_id` for
    /// `secret_id`/`version`. The value itself is not decrypted.
    pub fn rewrap(
        &self,
        secret_id: &str,
        version: i64,
        sealed: &SealedSecret,
        new_master: &MasterKey,
    ) -> Result<SealedSecret, VaultError> {
        let data_key = self.unwrap_data_key(secret_id, version, sealed)?;
        let wrapped_key = wrap_data_key(secret_id, version, &data_key[..], new_master)?;
        Ok(SealedSecret {
            key_id: new_master.id(),
            wrapped_key,
            ciphertext: sealed.ciphertext.clone(),
        })
    }

    /// Generic small-blob wrap/unwrap under the master key with a caller-given AAD label (used to store the token-hash key in the DB).
    ///
    /// Output: nonce (12) ‖ ciphertext ‖ tag (16). The label must be given
    /// again, identically, to [`Vault::unwrap_blob`]. Always the current key.
    pub fn wrap_blob(&self, label: &str, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        wrap_blob_with(&self.keys.load().current.key, label, plaintext)
    }

    /// Reverse of [`Vault::wrap_blob`] with any key of the keyring (current
    /// first); wrong label, unknown master key or any modification →
    /// [`VaultError::Decrypt`].
    pub fn unwrap_blob(
        &self,
        label: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.unwrap_blob_tagged(label, wrapped)
            .map(|(plain, _)| plain)
    }

    /// Id of the keyring key that opens this blob, if any.
    pub fn blob_key_id(&self, label: &str, wrapped: &[u8]) -> Option<String> {
        self.unwrap_blob_tagged(label, wrapped)
            .ok()
            .map(|(_, id)| id)
    }

    /// Unwraps a blob with whichever keyring key opens it and wraps it again
    /// under `new_master` (for `keygate key rotate`).
    pub fn rewrap_blob(
        &self,
        label: &str,
        wrapped: &[u8],
        new_master: &MasterKey,
    ) -> Result<Vec<u8>, VaultError> {
        let plain = self.unwrap_blob(label, wrapped)?;
        wrap_blob_with(new_master, label, &plain)
    }

    fn unwrap_blob_tagged(
        &self,
        label: &str,
        wrapped: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, String), VaultError> {
        let ring = self.keys.load();
        let aad = aad(PURPOSE_BLOB, &[label.as_bytes()]);
        for entry in ring.entries() {
            if let Ok(plain) = entry.open(&aad, wrapped) {
                return Ok((plain, entry.id.clone()));
            }
        }
        Err(VaultError::Decrypt)
    }

    fn unwrap_data_key(
        &self,
        secret_id: &str,
        version: i64,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<[u8; DATA_KEY_LEN]>, VaultError> {
        let ring = self.keys.load();
        let master = ring.find(&sealed.key_id).ok_or(VaultError::Decrypt)?;
        master.open_data_key(
            &aad(
                PURPOSE_DATA_KEY,
                &[secret_id.as_bytes(), &version.to_be_bytes()],
            ),
            &sealed.wrapped_key,
        )
    }
}

fn wrap_data_key(
    secret_id: &str,
    version: i64,
    data_key: &[u8],
    master: &MasterKey,
) -> Result<Vec<u8>, VaultError> {
    aead_seal(
        &master.bytes()[..],
        &aad(
            PURPOSE_DATA_KEY,
            &[secret_id.as_bytes(), &version.to_be_bytes()],
        ),
        data_key,
    )
}

fn wrap_blob_with(
    master: &MasterKey,
    label: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, VaultError> {
    aead_seal(
        &master.bytes()[..],
        &aad(PURPOSE_BLOB, &[label.as_bytes()]),
        plaintext,
    )
}

/// AAD = "keygate/v1" ‖ purpose ‖ fields, each as u32-BE length ‖ bytes.
/// Length prefixes make the encoding injective.
fn aad(purpose: &[u8], fields: &[&[u8]]) -> AadBytes {
    let parts = || {
        [AAD_DOMAIN, purpose]
            .into_iter()
            .chain(fields.iter().copied())
    };
    let len: usize = parts().map(|p| 4 + p.len()).sum();
    let mut out = if len <= AAD_INLINE {
        AadBytes::Inline([0; AAD_INLINE], 0)
    } else {
        AadBytes::Heap(Vec::with_capacity(len))
    };
    for part in parts() {
        // Ids and labels are far below 4 GiB; saturate rather than panic.
        let n = u32::try_from(part.len()).unwrap_or(u32::MAX);
        out.push(&n.to_be_bytes());
        out.push(part);
    }
    out
}

/// An AAD of up to this many bytes is built on the stack (ids are short:
/// a value's AAD is 39 bytes and its id).
const AAD_INLINE: usize = 128;

/// The bytes of an AAD: inline (the bytes and how many are used) or, for a
/// long id or label, on the heap.
enum AadBytes {
    Inline([u8; AAD_INLINE], usize),
    Heap(Vec<u8>),
}

impl AadBytes {
    /// Appends `bytes`; an inline AAD was sized to hold every part.
    fn push(&mut self, bytes: &[u8]) {
        match self {
            AadBytes::Inline(buf, used) => {
                buf[*used..*used + bytes.len()].copy_from_slice(bytes);
                *used += bytes.len();
            }
            AadBytes::Heap(v) => v.extend_from_slice(bytes),
        }
    }
}

impl std::ops::Deref for AadBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            AadBytes::Inline(buf, used) => &buf[..*used],
            AadBytes::Heap(v) => v,
        }
    }
}

#[cfg(test)]
impl PartialEq for AadBytes {
    fn eq(&self, other: &AadBytes) -> bool {
        **self == **other
    }
}

#[cfg(test)]
impl fmt::Debug for AadBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// nonce ‖ AES-256-GCM(key, plaintext, aad) ‖ tag, with a random nonce.
fn aead_seal(key: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| VaultError::Encrypt)?);
    let mut nonce = [0u8; NONCE_LEN];
    crate::fill_random(&mut nonce);
    // Exact capacity: the buffer briefly holds plaintext and must not be
    // reallocated (that would leave a copy behind in freed memory).
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let sealed = key.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut out[NONCE_LEN..],
    );
    match sealed {
        Ok(tag) => {
            out.extend_from_slice(tag.as_ref());
            Ok(out)
        }
        Err(_) => {
            // Do not leave the plaintext copy around.
            zeroize::Zeroize::zeroize(&mut out);
            Err(VaultError::Encrypt)
        }
    }
}

/// Reverse of [`aead_seal`]. Every failure is `Decrypt`.
fn aead_open(key: &[u8], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| VaultError::Decrypt)?);
    aead_open_with(&key, aad, sealed)
}

/// [`aead_open`] with the key schedule already expanded.
fn aead_open_with(
    key: &LessSafeKey,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(VaultError::Decrypt);
    }
    let mut buf = Zeroizing::new(vec![0u8; sealed.len() - NONCE_LEN]);
    let plain_len = aead_open_into(key, aad, sealed, &mut buf[..])?;
    buf.truncate(plain_len);
    Ok(buf)
}

/// Opens `sealed` (nonce ‖ ciphertext ‖ tag, at least a nonce and a tag
/// long) into `out`, which is exactly `sealed` without its nonce long;
/// returns the plaintext's length (at the start of `out`).
fn aead_open_into(
    key: &LessSafeKey,
    aad: &[u8],
    sealed: &[u8],
    out: &mut [u8],
) -> Result<usize, VaultError> {
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| VaultError::Decrypt)?;
    out.copy_from_slice(body);
    let plain = key
        .open_in_place(nonce, Aad::from(aad), out)
        .map_err(|_| VaultError::Decrypt)?;
    Ok(plain.len())
}

/// Last 4 characters of the secret (for listings: "…k9Xz"); if the secret is shorter than 12 bytes return "" (don't reveal a large fraction). Non-UTF-8 → "".
///
/// Returns just the characters (e.g. `"k9Xz"`); the caller adds the ellipsis.
/// Also returns "" if any of those characters is a control character, so a
/// listing never prints terminal escapes or line breaks.
pub fn suffix_hint(plaintext: &[u8]) -> String {
    if plaintext.len() < 12 {
        return String::new();
    }
    let Ok(s) = std::str::from_utf8(plaintext) else {
        return String::new();
    };
    let mut tail: Vec<char> = s.chars().rev().take(4).collect();
    if tail.iter().any(|c| c.is_control()) {
        return String::new();
    }
    tail.reverse();
    tail.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vault() -> Vault {
        Vault::new(MasterKey::generate())
    }

    fn assert_decrypt_err<T: fmt::Debug>(r: Result<T, VaultError>, what: &str) {
        match r {
            Err(VaultError::Decrypt) => {}
            other => panic!("{what}: expected Decrypt, got {other:?}"),
        }
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(
            plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
            id in ".{0,40}",
            version in any::<i64>(),
        ) {
            let v = vault();
            let sealed = v.seal(&id, version, &plaintext).unwrap();
            prop_assert_eq!(&sealed.key_id, &v.key_id());
            prop_assert_eq!(sealed.wrapped_key.len(), WRAPPED_KEY_LEN);
            prop_assert_eq!(sealed.ciphertext.len(), NONCE_LEN + plaintext.len() + TAG_LEN);
            let opened = v.open(&id, version, &sealed).unwrap();
            prop_assert_eq!(&opened[..], &plaintext[..]);
        }

        #[test]
        fn blob_round_trip(
            plaintext in proptest::collection::vec(any::<u8>(), 0..256),
            label in ".{0,20}",
        ) {
            let v = vault();
            let w = v.wrap_blob(&label, &plaintext).unwrap();
            prop_assert_eq!(&v.unwrap_blob(&label, &w).unwrap()[..], &plaintext[..]);
        }
    }

    #[test]
    fn every_byte_flip_is_detected() {
        let v = vault();
        let sealed = v.seal("sec_1", 3, b"sk-live-0123456789abcdef").unwrap();
        for i in 0..sealed.wrapped_key.len() {
            for bit in [0x01u8, 0x80] {
                let mut t = sealed.clone();
                t.wrapped_key[i] ^= bit;
                assert_decrypt_err(
                    v.open("sec_1", 3, &t),
                    &format!("wrapped_key[{i}]^{bit:#x}"),
                );
            }
        }
        for i in 0..sealed.ciphertext.len() {
            for bit in [0x01u8, 0x80] {
                let mut t = sealed.clone();
                t.ciphertext[i] ^= bit;
                assert_decrypt_err(v.open("sec_1", 3, &t), &format!("ciphertext[{i}]^{bit:#x}"));
            }
        }
        // Truncation / extension.
        let mut t = sealed.clone();
        t.ciphertext.pop();
        assert_decrypt_err(v.open("sec_1", 3, &t), "truncated ciphertext");
        let mut t = sealed.clone();
        t.ciphertext.push(0);
        assert_decrypt_err(v.open("sec_1", 3, &t), "extended ciphertext");
        let mut t = sealed.clone();
        t.wrapped_key.truncate(10);
        assert_decrypt_err(v.open("sec_1", 3, &t), "truncated wrapped key");
        let mut t = sealed.clone();
        t.ciphertext.clear();
        assert_decrypt_err(v.open("sec_1", 3, &t), "empty ciphertext");
        // Untouched still opens.
        assert_eq!(
            &v.open("sec_1", 3, &sealed).unwrap()[..],
            b"sk-live-0123456789abcdef"
        );
    }

    #[test]
    fn binding_to_id_version_key_and_key_id() {
        let v = vault();
        let sealed = v.seal("ab", 1, b"value").unwrap();
        assert_decrypt_err(v.open("ab", 2, &sealed), "wrong version");
        assert_decrypt_err(v.open("ab", -1, &sealed), "negative version");
        assert_decrypt_err(v.open("a", 1, &sealed), "wrong id");
        assert_decrypt_err(v.open("abc", 1, &sealed), "longer id");
        assert_decrypt_err(v.open("", 1, &sealed), "empty id");
        assert_decrypt_err(vault().open("ab", 1, &sealed), "other master key");

        // Other master key even with the key_id label forged.
        let other = vault();
        let mut forged = sealed.clone();
        forged.key_id = other.key_id();
        assert_decrypt_err(other.open("ab", 1, &forged), "other master, forged key_id");

        // key_id mismatch alone is refused.
        let mut t = sealed.clone();
        t.key_id = "0000000000000000".into();
        assert_decrypt_err(v.open("ab", 1, &t), "key_id mismatch");

        // Swapping the ciphertext between two secrets fails.
        let s2 = v.seal("cd", 1, b"other").unwrap();
        let mut t = sealed.clone();
        t.ciphertext = s2.ciphertext.clone();
        assert_decrypt_err(v.open("ab", 1, &t), "swapped ciphertext");
    }

    #[test]
    fn aad_is_injective() {
        let a = aad(PURPOSE_VALUE, &[b"ab", &1i64.to_be_bytes()]);
        let b = aad(PURPOSE_VALUE, &[b"a", b"b\0\0\0\0\0\0\0\x01"]);
        assert_ne!(a, b);
        let c = aad(PURPOSE_BLOB, &[b"ab"]);
        let d = aad(PURPOSE_BLOB, &[b"a", b"b"]);
        assert_ne!(c, d);
        assert_ne!(
            aad(PURPOSE_VALUE, &[b"x", &1i64.to_be_bytes()]),
            aad(PURPOSE_DATA_KEY, &[b"x", &1i64.to_be_bytes()])
        );
        // Round trip with ids that collide under naive concatenation.
        let v = vault();
        let s = v.seal("ab", 1, b"v").unwrap();
        assert_decrypt_err(v.open("a", 1, &s), "ab vs a");
        let s = v.seal("a:1", 2, b"v").unwrap();
        assert_decrypt_err(v.open("a", 12, &s), "a:1/2 vs a/12");
    }

    #[test]
    fn aad_bytes_are_the_same_on_the_stack_and_on_the_heap() {
        // The documented encoding, written out independently.
        fn reference(purpose: &[u8], fields: &[&[u8]]) -> Vec<u8> {
            let mut out = Vec::new();
            for part in [AAD_DOMAIN, purpose].iter().chain(fields) {
                out.extend_from_slice(&(part.len() as u32).to_be_bytes());
                out.extend_from_slice(part);
            }
            out
        }
        assert_eq!(
            &aad(PURPOSE_VALUE, &[b"x", &1i64.to_be_bytes()])[..],
            b"\0\0\0\x0akeygate/v1\0\0\0\x05value\0\0\0\x01x\0\0\0\x08\0\0\0\0\0\0\0\x01"
        );
        // Ids around the inline size, and far beyond it.
        let fixed = 4 + AAD_DOMAIN.len() + 4 + PURPOSE_VALUE.len() + 4 + 4 + 8;
        for id_len in [
            0,
            1,
            AAD_INLINE - fixed - 1,
            AAD_INLINE - fixed,
            AAD_INLINE - fixed + 1,
            1000,
        ] {
            let id = "i".repeat(id_len);
            let fields: [&[u8]; 2] = [id.as_bytes(), &7i64.to_be_bytes()];
            let got = aad(PURPOSE_VALUE, &fields);
            assert_eq!(
                &got[..],
                &reference(PURPOSE_VALUE, &fields)[..],
                "id of {id_len} bytes"
            );
            assert_eq!(
                matches!(got, AadBytes::Inline(..)),
                fixed + id_len <= AAD_INLINE,
                "id of {id_len} bytes"
            );
            // A long id seals and opens as a short one does.
            let v = vault();
            let sealed = v.seal(&id, 7, b"value").unwrap();
            assert_eq!(&v.open(&id, 7, &sealed).unwrap()[..], b"value");
            assert_decrypt_err(v.open(&format!("{id}j"), 7, &sealed), "another id");
        }
    }

    #[test]
    fn seals_are_randomized() {
        let v = vault();
        let a = v.seal("s", 1, b"same value").unwrap();
        let b = v.seal("s", 1, b"same value").unwrap();
        assert_ne!(a.wrapped_key, b.wrapped_key);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_ne!(a.ciphertext[..NONCE_LEN], b.ciphertext[..NONCE_LEN]);
        assert_ne!(a.wrapped_key[..NONCE_LEN], b.wrapped_key[..NONCE_LEN]);
    }

    #[test]
    fn plaintext_not_in_sealed_bytes() {
        let v = vault();
        let secret = b"sk-live-SUPERSECRET-abcdefghijklmnop";
        let s = v.seal("s", 1, secret).unwrap();
        for hay in [&s.wrapped_key, &s.ciphertext] {
            assert!(!hay.windows(8).any(|w| secret.windows(8).any(|x| x == w)));
        }
        assert!(!s
            .key_id
            .as_bytes()
            .windows(8)
            .any(|w| secret.windows(8).any(|x| x == w)));
        // Nor does Debug show anything but the key id.
        let dbg = format!("{s:?} {v:?}");
        assert!(!dbg.contains("SUPERSECRET"));
    }

    #[test]
    fn rewrap_moves_to_new_master() {
        let old = vault();
        let new_key = MasterKey::generate();
        let sealed = old.seal("sec", 7, b"the value").unwrap();
        let re = old.rewrap("sec", 7, &sealed, &new_key).unwrap();
        assert_eq!(re.key_id, new_key.id());
        assert_ne!(re.key_id, sealed.key_id);
        assert_eq!(
            re.ciphertext, sealed.ciphertext,
            "ciphertext must be untouched"
        );
        assert_ne!(re.wrapped_key, sealed.wrapped_key);

        let new_vault = Vault::new(new_key.clone());
        assert_eq!(&new_vault.open("sec", 7, &re).unwrap()[..], b"the value");
        assert_decrypt_err(old.open("sec", 7, &re), "old vault on rewrapped");
        // Even if the old vault is told the new key id.
        let mut forged = re.clone();
        forged.key_id = old.key_id();
        assert_decrypt_err(old.open("sec", 7, &forged), "old vault, forged key id");
        // The original still opens with the old key only.
        assert_eq!(&old.open("sec", 7, &sealed).unwrap()[..], b"the value");
        assert_decrypt_err(new_vault.open("sec", 7, &sealed), "new vault on original");

        // Rewrap checks id/version and the current master key.
        assert_decrypt_err(
            old.rewrap("sec", 8, &sealed, &new_key),
            "rewrap wrong version",
        );
        assert_decrypt_err(old.rewrap("other", 7, &sealed, &new_key), "rewrap wrong id");
        assert_decrypt_err(
            new_vault.rewrap("sec", 7, &sealed, &new_key),
            "rewrap wrong master",
        );
    }

    #[test]
    fn blob_binding() {
        let v = vault();
        let w = v
            .wrap_blob("token-hash-key", b"0123456789abcdef0123456789abcdef")
            .unwrap();
        assert_decrypt_err(v.unwrap_blob("other-label", &w), "wrong label");
        assert_decrypt_err(vault().unwrap_blob("token-hash-key", &w), "other master");
        for i in 0..w.len() {
            let mut t = w.clone();
            t[i] ^= 0x04;
            assert_decrypt_err(v.unwrap_blob("token-hash-key", &t), "flipped blob");
        }
        assert_decrypt_err(v.unwrap_blob("token-hash-key", &w[..20]), "short blob");
        assert_decrypt_err(v.unwrap_blob("token-hash-key", &[]), "empty blob");
        // A blob is not interchangeable with a wrapped data key.
        let s = v.seal("token-hash-key", 0, b"x").unwrap();
        assert_decrypt_err(
            v.unwrap_blob("token-hash-key", &s.wrapped_key),
            "data key as blob",
        );
    }

    #[test]
    fn keyring_opens_by_key_id_and_seals_with_the_current_key() {
        let old_key = MasterKey::generate();
        let new_key = MasterKey::generate();
        let v = Vault::new(old_key.clone());
        let before = v.seal("s", 1, b"sealed-before").unwrap();
        let blob_before = v.wrap_blob("token-hash-key", b"blob-before").unwrap();

        // A rotation: the new key opens first, then becomes current.
        v.add_key(new_key.clone());
        assert_eq!(v.key_id(), old_key.id(), "add_key does not change sealing");
        assert_eq!(v.key_ids(), vec![old_key.id(), new_key.id()]);
        let re = v.rewrap("s", 1, &before, &new_key).unwrap();
        let blob_re = v
            .rewrap_blob("token-hash-key", &blob_before, &new_key)
            .unwrap();
        assert_eq!(&v.open("s", 1, &re).unwrap()[..], b"sealed-before");
        v.install_current(new_key.clone());
        assert_eq!(v.key_id(), new_key.id());
        assert_eq!(v.key_ids(), vec![new_key.id(), old_key.id()]);

        // New seals and blobs use the new key ...
        let after = v.seal("t", 1, b"sealed-after").unwrap();
        assert_eq!(after.key_id, new_key.id());
        let blob_after = v.wrap_blob("token-hash-key", b"blob-after").unwrap();
        assert_eq!(
            v.blob_key_id("token-hash-key", &blob_after),
            Some(new_key.id())
        );
        assert_decrypt_err(
            Vault::new(old_key.clone()).unwrap_blob("token-hash-key", &blob_after),
            "old key on a new blob",
        );
        // ... and what the old key sealed (an in-flight snapshot) still opens.
        assert_eq!(&v.open("s", 1, &before).unwrap()[..], b"sealed-before");
        assert_eq!(&v.open("s", 1, &re).unwrap()[..], b"sealed-before");
        assert_eq!(
            &v.unwrap_blob("token-hash-key", &blob_before).unwrap()[..],
            b"blob-before"
        );
        assert_eq!(
            v.blob_key_id("token-hash-key", &blob_before),
            Some(old_key.id())
        );
        assert_eq!(
            &v.unwrap_blob("token-hash-key", &blob_re).unwrap()[..],
            b"blob-before"
        );

        // The old key alone opens nothing that was re-wrapped.
        let old_only = Vault::new(old_key.clone());
        assert_decrypt_err(old_only.open("s", 1, &re), "old key on rewrapped");
        assert_decrypt_err(old_only.open("t", 1, &after), "old key on new seal");
        assert_decrypt_err(
            old_only.unwrap_blob("token-hash-key", &blob_re),
            "old key on rewrapped blob",
        );
        // The new key alone opens it all.
        let new_only = Vault::new(new_key.clone());
        assert_eq!(&new_only.open("s", 1, &re).unwrap()[..], b"sealed-before");
        assert_eq!(&new_only.open("t", 1, &after).unwrap()[..], b"sealed-after");

        // A second rotation keeps only the key it replaced.
        let third = MasterKey::generate();
        v.install_current(third.clone());
        assert_eq!(v.key_ids(), vec![third.id(), new_key.id()]);
        assert!(!v.holds(&old_key.id()));
        assert_decrypt_err(v.open("s", 1, &before), "key two rotations old");
        assert_eq!(&v.open("s", 1, &re).unwrap()[..], b"sealed-before");
        // Installing the current key again changes nothing.
        v.install_current(third.clone());
        assert_eq!(v.key_ids(), vec![third.id(), new_key.id()]);
    }

    #[test]
    fn forget_key_drops_a_pending_key_but_never_the_current_one() {
        let cur = MasterKey::generate();
        let pending = MasterKey::generate();
        let v = Vault::new(cur.clone());
        v.add_key(pending.clone());
        v.add_key(pending.clone());
        v.add_key(cur.clone());
        assert_eq!(v.key_ids(), vec![cur.id(), pending.id()]);
        let s = Vault::new(pending.clone()).seal("x", 1, b"v").unwrap();
        assert_eq!(&v.open("x", 1, &s).unwrap()[..], b"v");
        v.forget_key(&pending.id());
        assert_decrypt_err(v.open("x", 1, &s), "forgotten key");
        v.forget_key(&cur.id());
        assert_eq!(v.key_ids(), vec![cur.id()]);
        assert!(matches!(v.source(), KeySource::Memory));
    }

    #[test]
    fn a_key_id_that_names_another_keyring_key_is_refused() {
        // Two keys held; a sealed secret relabelled with the other key's id
        // must not open (the lookup is by id, then the AEAD decides).
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        let v = Vault::new(a.clone());
        v.add_key(b.clone());
        let mut s = v.seal("x", 1, b"v").unwrap();
        s.key_id = b.id();
        assert_decrypt_err(v.open("x", 1, &s), "relabelled key id");
        assert_decrypt_err(
            v.rewrap("x", 1, &s, &MasterKey::generate()),
            "rewrap relabelled",
        );
        assert_eq!(v.blob_key_id("l", b"garbage-garbage-garbage-garbage"), None);
    }

    #[test]
    fn debug_shows_ids_only() {
        let k = MasterKey::generate();
        let v = Vault::new(k.clone());
        let dbg = format!("{v:?}");
        assert!(dbg.contains(&k.id()), "{dbg}");
        assert!(!dbg.contains(k.to_base64().as_str()), "{dbg}");
    }

    #[test]
    fn suffix_hint_rules() {
        assert_eq!(suffix_hint(b"sk-abcdefgh-k9Xz"), "k9Xz");
        assert_eq!(suffix_hint(b"123456789012"), "9012");
        assert_eq!(suffix_hint(b"12345678901"), "");
        assert_eq!(suffix_hint(b""), "");
        assert_eq!(suffix_hint(&[0xff; 20]), "");
        assert_eq!(suffix_hint("pässwörd-tökén".as_bytes()), "ökén");
        assert_eq!(suffix_hint("abcdefghij€€€€".as_bytes()), "€€€€");
        assert_eq!(suffix_hint(b"abcdefghijkl\n"), "");
    }
}
