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

/// CPU time (user + system) so far of the process or thread whose
/// `/proc/.../stat` file this is (Linux): `/proc/PID/stat`,
/// `/proc/thread-self/stat`.
pub fn cpu_time(stat_file: impl AsRef<std::path::Path>) -> std::time::Duration {
    let path = stat_file.as_ref();
    let stat = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    // The fields after the command name, which is in parentheses and may
    // hold spaces; utime and stime are fields 14 and 15 of proc(5).
    let after = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // In USER_HZ ticks, which are 1/100 s on Linux.
    std::time::Duration::from_millis(ticks * 10)
}
