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

/// One TCP socket as the kernel lists it in `/proc/net/tcp{,6}` (Linux).
#[derive(Debug, Clone, Copy)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    /// `st`: 0x01 ESTABLISHED, 0x08 CLOSE_WAIT, ...
    pub state: u8,
    /// `tr`: the pending timer (0 none, 1 retransmit, 2 keepalive, ...).
    pub timer: u8,
    /// `tm->when`: seconds until that timer fires.
    pub timer_left_s: f64,
}

/// Every IPv4 and IPv6 TCP socket on this machine (Linux).
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let hex_port = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    let row = |line: &str| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (timer, when) = f.get(5)?.split_once(':')?;
        Some(TcpSocket {
            local_port: hex_port(f.get(1)?)?,
            remote_port: hex_port(f.get(2)?)?,
            state: u8::from_str_radix(f.get(3)?, 16).ok()?,
            timer: timer.parse().ok()?,
            // In USER_HZ ticks, 1/100 s on Linux.
            timer_left_s: u64::from_str_radix(when, 16).ok()? as f64 / 100.0,
        })
    };
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).filter_map(row).collect::<Vec<_>>())
        .collect()
}
