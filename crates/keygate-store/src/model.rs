use serde::Serialize;
use zeroize::Zeroizing;

/// A secret to create. The value is zeroized when dropped.
pub struct NewSecret {
    pub name: String,
    pub host: String,
    pub path: String,
    pub header: String,
    pub format: String,
    pub value: Zeroizing<Vec<u8>>,
}

/// What listings show about a secret: never its value.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SecretInfo {
    pub id: String,
    pub name: String,
    pub host: String,
    pub path: String,
    pub header: String,
    pub format: String,
    pub version: i64,
    /// Last four characters of the value, or empty for short values.
    pub hint: String,
    pub created_ms: i64,
    pub rotated_ms: Option<i64>,
    /// Agents holding a grant for this secret.
    pub agents: Vec<String>,
}

/// What listings show about an agent: never its token.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
    /// A disabled agent's token is refused (407) until it is enabled again.
    pub disabled: bool,
    /// Names of the secrets granted.
    pub grants: Vec<String>,
}
