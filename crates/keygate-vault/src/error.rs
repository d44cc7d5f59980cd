//! The vault's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the vault.
///
/// Messages are meant for operators: they name the file involved and what to
/// do, and never contain key or secret material (not even fragments of
/// malformed input).
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("reading", "creating directory", ...).
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A key file can be read or written by group or others.
    #[error(
        "refusing to use {path}: its mode is {mode:04o}, so group or others can access it; \
         run `chmod 600 {path}`"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },

    /// A key file is not a regular file, or is implausibly large.
    #[error("refusing to use {path}: {reason}")]
    BadKeyFile { path: PathBuf, reason: &'static str },

    /// The master key could not be parsed.
    #[error("invalid master key{}: {reason}", origin_suffix(.origin))]
    InvalidMasterKey {
        /// Where the key came from (`KEYGATE_MASTER_KEY`, a file path), if known.
        origin: Option<String>,
        reason: &'static str,
    },

    /// Decryption or authentication failed: wrong master key, wrong secret
    /// id/version, or tampered/corrupted data. Deliberately carries no detail.
    #[error("decryption failed: wrong master key, or the sealed data was modified or corrupted")]
    Decrypt,

    /// An encryption primitive failed (should not happen with valid inputs).
    #[error("encryption failed")]
    Encrypt,

    /// The CA files on disk are unusable.
    #[error("local CA {path}: {reason}; to start over, remove ca.pem and ca-key.pem (agents must then trust the new ca.pem)")]
    InvalidCa { path: PathBuf, reason: String },

    /// The host a leaf certificate was requested for is not a DNS name or IP literal.
    #[error("cannot issue a certificate for host {host:?}: {reason}")]
    InvalidHost { host: String, reason: &'static str },

    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Certificate(String),
}

fn origin_suffix(origin: &Option<String>) -> String {
    match origin {
        Some(o) => format!(" from {o}"),
        None => String::new(),
    }
}

impl VaultError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        VaultError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// True if this is an I/O error of kind `NotFound`.
    pub fn is_not_found(&self) -> bool {
        matches!(self, VaultError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

impl From<rcgen::Error> for VaultError {
    fn from(e: rcgen::Error) -> Self {
        VaultError::Certificate(e.to_string())
    }
}
