#![forbid(unsafe_code)]
//! keygate's vault: everything that touches key material.
//!
//! * [`MasterKey`] — the 256-bit master key, loaded from `KEYGATE_MASTER_KEY`,
//!   `KEYGATE_MASTER_KEY_FILE` or `<data dir>/master.key` (created on first run).
//! * [`Vault`] — AES-256-GCM envelope encryption of secret values: a fresh data
//!   key per secret version, wrapped by the master key, with the secret id and
//!   version bound as AAD. Plaintext is only ever returned in zeroizing buffers.
//!   The vault is a small keyring (the current master key plus the ones it
//!   replaced) so that `keygate key rotate` can switch keys under live traffic.
//! * [`KeySource`] / [`KeyFile`] — where the master key lives, and the
//!   crash-safe file steps of a rotation (`<key file>.next`, then a rename).
//! * [`TokenHasher`] and the token generators — agent/admin tokens and the keyed
//!   hash the store keeps instead of the token.
//! * [`CertificateAuthority`] — the local P-256 CA the agents trust, and the
//!   short-lived leaf certificates minted for intercepted hosts.
//! * [`files`] helpers — private (0700/0600) directories and key files, refusing
//!   key files that group or others can read.
//!
//! Errors ([`VaultError`]) never contain key or secret material.

mod ca;
mod envelope;
mod error;
pub mod files;
mod keyfile;
mod master;
mod token;

pub use ca::{CertificateAuthority, LeafCert};
pub use envelope::{suffix_hint, Vault};
pub use error::VaultError;
pub use files::{create_private_file, ensure_private_dir, read_private_file, write_private_file};
pub use keyfile::{KeyFile, KeySource};
pub use master::MasterKey;
pub use token::{ct_eq, generate_admin_token, generate_agent_token, random_key, TokenHasher};

/// Fills `buf` from the system CSPRNG (aws-lc).
///
/// aws-lc's generator does not report failure in practice (it aborts the
/// process instead); a reported failure means the platform cannot provide
/// randomness at all, and continuing would be unsafe.
pub(crate) fn fill_random(buf: &mut [u8]) {
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(buf).expect("the system random number generator failed");
}
