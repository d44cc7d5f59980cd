//! Test helpers shared by keygate's crates:
//! - [`Upstream`]: an HTTPS (and plain HTTP) echo server with its own CA
//!   that records every request it receives;
//! - [`Keygate`]: the real `keygate serve` process on free ports with a
//!   fresh data dir, plus helpers to run CLI commands against it.
#![forbid(unsafe_code)]

mod agent;
mod handshake;
mod keygate;
mod scripted;
mod streaming;
mod tunnel;
mod upstream;

pub use agent::{
    agent_tls, empty_body, roots_from_pem, AgentBody, AgentConn, AgentProto, RepeatBody,
};
pub use handshake::handshake_in_memory;
pub use keygate::Keygate;
pub use scripted::{Act, RawH1, RawHead, RawResponse, Recorded, Reply, Script, ScriptedUpstream};
// Re-exported so tests build requests with the same versions.
pub use streaming::{Alpn, StreamUpstream};
pub use tunnel::{basic_auth, connect_raw, Answer, ConnectRefused, Tunnel};
pub use upstream::{Seen, Upstream};
pub use {bytes, http, http_body_util, hyper, hyper_util};
