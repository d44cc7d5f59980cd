//! Test helpers shared by keygate's crates:
//! - [`Upstream`]: an HTTPS (and plain HTTP) echo server with its own CA
//!   that records every request it receives;
//! - [`Keygate`]: the real `keygate serve` process on free ports with a
//!   fresh data dir, plus helpers to run CLI commands against it.
#![forbid(unsafe_code)]

mod keygate;
mod tunnel;
mod upstream;

pub use keygate::Keygate;
pub use tunnel::{basic_auth, connect_raw, Answer, ConnectRefused, Tunnel};
pub use upstream::{Seen, Upstream};
