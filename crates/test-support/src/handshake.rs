//! A complete TLS handshake between two rustls configs over memory, for
//! tests of certificates and of negotiated parameters.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

/// Runs the handshake between `client` (connecting to `name`) and `server`
/// until both sides are done; the error names the side that failed.
pub fn handshake_in_memory(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: &str,
) -> Result<(ClientConnection, ServerConnection), String> {
    let name = ServerName::try_from(name.to_string()).map_err(|e| format!("{name:?}: {e}"))?;
    let mut c = ClientConnection::new(client, name).map_err(|e| format!("client: {e}"))?;
    let mut s = ServerConnection::new(server).map_err(|e| format!("server: {e}"))?;
    for _ in 0..20 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok((c, s));
        }
        pump(&mut c, &mut s).map_err(|e| format!("server: {e}"))?;
        pump(&mut s, &mut c).map_err(|e| format!("client: {e}"))?;
    }
    Err("the handshake did not finish".into())
}

/// Moves everything `from` has to send into `to` and lets `to` process it.
fn pump<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>) -> Result<(), String> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).map_err(|e| e.to_string())?;
    }
    let mut rd = buf.as_slice();
    while !rd.is_empty() {
        to.read_tls(&mut rd).map_err(|e| e.to_string())?;
        to.process_new_packets().map_err(|e| e.to_string())?;
    }
    Ok(())
}
