//! Pure domain types for keygate. No I/O lives here.
//!
//! - [`pattern`]: host patterns (`api.openai.com`, `*.example.com:8443`) and
//!   canonical host names.
//! - [`path`]: path patterns and request-path normalisation.
//! - [`select`]: choosing the most specific credential for a request.
//! - [`snapshot`]: the immutable view of agents and secrets the gateway reads.
//! - [`audit`]: the audit event the gateway emits for every request.
//! - [`error`]: stable error codes shared by the gateway, the API and audit.
#![forbid(unsafe_code)]

pub mod audit;
pub mod error;
pub mod path;
pub mod pattern;
pub mod select;
pub mod snapshot;
pub mod template;

pub use audit::{method_name, AuditEvent, Decision};
pub use error::ErrorCode;
pub use path::{normalize_path, PathError, PathPattern};
pub use pattern::{canonical_host, HostPattern, PatternError};
pub use snapshot::{AgentEntry, SealedSecret, SecretEntry, Snapshot, TokenHash};
pub use template::Template;

/// Milliseconds since the Unix epoch, the time unit stored everywhere.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
