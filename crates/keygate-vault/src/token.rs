//! Agent and admin tokens, and the keyed hash the store keeps instead of them.

use std::fmt;

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const TOKEN_BYTES: usize = 32;

fn token_with_prefix(prefix: &str) -> String {
    let mut raw = Zeroizing::new([0u8; TOKEN_BYTES]);
    crate::fill_random(&mut raw[..]);
    let mut out = String::with_capacity(prefix.len() + 44);
    out.push_str(prefix);
    URL_SAFE_NO_PAD.encode_string(&raw[..], &mut out);
    out
}

/// "kg_" + base64url-no-pad of 32 random bytes.
pub fn generate_agent_token() -> String {
    token_with_prefix("kg_")
}

/// Admin token: "kga_" + base64url-no-pad of 32 random bytes.
pub fn generate_admin_token() -> String {
    token_with_prefix("kga_")
}

/// Random 32 bytes (e.g. for the token-hash key).
pub fn random_key() -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    crate::fill_random(&mut k[..]);
    k
}

/// HMAC-SHA256 of tokens under a secret key. Only the hash is stored, so a
/// leaked database does not yield usable tokens (nor, without the key, a way
/// to test guesses offline).
pub struct TokenHasher {
    key: hmac::Key,
}

impl fmt::Debug for TokenHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHasher { .. }")
    }
}

impl TokenHasher {
    pub fn new(key: &[u8]) -> TokenHasher {
        TokenHasher {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// HMAC-SHA256(key, token).
    pub fn hash(&self, token: &str) -> [u8; 32] {
        let tag = hmac::sign(&self.key, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Constant-time equality (for equal lengths; a length mismatch returns
/// false, and lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn check_format(t: &str, prefix: &str) {
        let body = t
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{t} lacks {prefix}"));
        assert_eq!(body.len(), 43, "{t}");
        assert!(body
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        let raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        assert_eq!(raw.len(), 32);
    }

    #[test]
    fn token_formats() {
        for _ in 0..50 {
            check_format(&generate_agent_token(), "kg_");
            let admin = generate_admin_token();
            check_format(&admin, "kga_");
        }
        assert!(!generate_agent_token().starts_with("kga_"));
    }

    #[test]
    fn tokens_are_unique() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(generate_agent_token()));
            assert!(seen.insert(generate_admin_token()));
        }
        let a = random_key();
        let b = random_key();
        assert_ne!(*a, *b);
        assert_ne!(*a, [0u8; 32]);
    }

    #[test]
    fn hasher_is_deterministic_and_key_dependent() {
        let k1 = random_key();
        let k2 = random_key();
        let h1 = TokenHasher::new(&k1[..]);
        let h1b = TokenHasher::new(&k1[..]);
        let h2 = TokenHasher::new(&k2[..]);
        let t = generate_agent_token();
        assert_eq!(h1.hash(&t), h1.hash(&t));
        assert_eq!(h1.hash(&t), h1b.hash(&t));
        assert_ne!(h1.hash(&t), h2.hash(&t));
        assert_ne!(h1.hash(&t), h1.hash(&generate_agent_token()));
        assert_ne!(h1.hash("kg_a"), h1.hash("kg_b"));
        assert_eq!(format!("{h1:?}"), "TokenHasher { .. }");
    }

    #[test]
    fn hasher_is_hmac_sha256() {
        // RFC 4231 test case 2.
        let h = TokenHasher::new(b"Jefe");
        assert_eq!(
            hex::encode(h.hash("what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"", b"a"));
    }
}
