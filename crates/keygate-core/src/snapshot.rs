//! The immutable view of agents and secrets that the request path reads.
//! The store builds a new one on every change and swaps it in atomically.

use std::collections::HashMap;
use std::sync::Arc;

use crate::{HostPattern, PathPattern, Template};

/// Keyed hash (HMAC-SHA256) of an agent token. The store keeps only this.
pub type TokenHash = [u8; 32];

/// A secret value sealed by the vault: the data key wrapped by the master
/// key, and the value encrypted under the data key. Both bind the secret id
/// and version as AAD.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    /// Identifier of the master key that wrapped `wrapped_key`.
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A secret as the gateway needs it: compiled patterns and the sealed value.
#[derive(Debug, Clone)]
pub struct SecretEntry {
    pub id: String,
    pub name: String,
    pub host: HostPattern,
    pub path: PathPattern,
    /// Header to inject into, lower-case.
    pub header: String,
    pub format: Template,
    pub version: i64,
    pub sealed: SealedSecret,
}

/// An agent with its granted secrets resolved.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    pub id: String,
    pub name: String,
    pub grants: Vec<Arc<SecretEntry>>,
}

/// Everything the hot path reads. Immutable once built.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Agents by the keyed hash of their token.
    pub agents: HashMap<TokenHash, Arc<AgentEntry>>,
    /// Monotonic build counter, for diagnostics.
    pub generation: u64,
}

impl Snapshot {
    pub fn agent(&self, hash: &TokenHash) -> Option<&Arc<AgentEntry>> {
        self.agents.get(hash)
    }
}
