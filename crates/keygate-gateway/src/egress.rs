//! The egress guard: resolve a destination, refuse every address that is not
//! globally routable (or is one of keygate's own listeners), and hand back
//! only checked addresses to dial.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use keygate_core::ErrorCode;

use crate::GatewayError;

/// Decides which addresses keygate may dial.
#[derive(Debug, Clone, Default)]
pub struct EgressGuard {
    /// CIDRs exempt from the private-address rule (`--allow-net`).
    allow: Vec<IpNet>,
    /// keygate's own listeners: never dialled, whatever `allow` says.
    own: Vec<SocketAddr>,
    /// `--resolve HOST:PORT=ADDR:PORT` overrides, keyed by canonical host
    /// and port.
    overrides: HashMap<(String, u16), Vec<SocketAddr>>,
}

impl EgressGuard {
    pub fn new(
        allow: Vec<IpNet>,
        own: Vec<SocketAddr>,
        overrides: HashMap<(String, u16), Vec<SocketAddr>>,
    ) -> EgressGuard {
        EgressGuard {
            allow,
            own,
            overrides,
        }
    }

    /// Adds one of keygate's own listening addresses.
    pub fn add_own(&mut self, addr: SocketAddr) {
        self.own.push(addr);
    }

    /// Resolves `host:port` (honouring `--resolve`) and returns the addresses
    /// that pass the guard, in resolver order. Errors when none does.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GatewayError> {
        let candidates: Vec<SocketAddr> = if let Some(addrs) =
            self.overrides.get(&(host.to_string(), port))
        {
            addrs.clone()
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else {
            tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| {
                    GatewayError::new(ErrorCode::DnsFailed, format!("cannot resolve {host}: {e}"))
                })?
                .collect()
        };
        let mut allowed = Vec::with_capacity(candidates.len());
        let mut refused = None;
        for addr in candidates {
            match self.check(addr) {
                Ok(()) => allowed.push(addr),
                Err(why) => refused = Some((addr, why)),
            }
        }
        if allowed.is_empty() {
            let message = match refused {
                Some((addr, why)) => format!("{host}:{port} resolves to {addr}, {why}"),
                None => format!("{host} has no address"),
            };
            let code = if refused.is_some() {
                ErrorCode::DestinationBlocked
            } else {
                ErrorCode::DnsFailed
            };
            return Err(GatewayError::new(code, message));
        }
        Ok(allowed)
    }

    /// Checks one address; the error says why it is refused.
    pub fn check(&self, addr: SocketAddr) -> Result<(), &'static str> {
        let ip = canonical_ip(addr.ip());
        for own in &self.own {
            let own_ip = canonical_ip(own.ip());
            if own.port() == addr.port()
                && (own_ip == ip
                    || own_ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_unspecified())
            {
                return Err("which is keygate itself");
            }
        }
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match forbidden_reason(ip) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// An IPv4-mapped IPv6 address becomes its IPv4 form.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why an address is not globally routable, or `None` when it is.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RULES: &[([u8; 4], u32, &str)] = &[
        ([169, 254, 169, 254], 32, "a cloud metadata address"),
        ([0, 0, 0, 0], 8, "an unspecified/\"this network\" address"),
        ([10, 0, 0, 0], 8, "a private (RFC 1918) address"),
        ([100, 64, 0, 0], 10, "a carrier-grade NAT address"),
        ([127, 0, 0, 0], 8, "a loopback address"),
        ([169, 254, 0, 0], 16, "a link-local address"),
        ([172, 16, 0, 0], 12, "a private (RFC 1918) address"),
        ([192, 0, 0, 0], 24, "an IETF protocol assignment address"),
        ([192, 0, 2, 0], 24, "a documentation address"),
        ([192, 88, 99, 0], 24, "a 6to4 relay anycast address"),
        ([192, 168, 0, 0], 16, "a private (RFC 1918) address"),
        ([198, 18, 0, 0], 15, "a benchmarking address"),
        ([198, 51, 100, 0], 24, "a documentation address"),
        ([203, 0, 113, 0], 24, "a documentation address"),
        ([224, 0, 0, 0], 4, "a multicast address"),
        ([240, 0, 0, 0], 4, "a reserved address"),
    ];
    RULES
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let seg = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        return forbidden_v4(embedded_v4(seg[6], seg[7]))
            .map(|_| "a NAT64 form of a non-public IPv4 address");
    }
    // Local-use NAT64 64:ff9b:1::/48.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
        return Some("a local-use NAT64 address");
    }
    // IPv4-compatible ::a.b.c.d (deprecated).
    if seg[..6] == [0, 0, 0, 0, 0, 0] {
        return Some("an IPv4-compatible IPv6 address");
    }
    // 6to4 2002::/16 embeds an IPv4 address in bits 16..48.
    if seg[0] == 0x2002 {
        return forbidden_v4(embedded_v4(seg[1], seg[2]))
            .map(|_| "a 6to4 form of a non-public IPv4 address");
    }
    if seg[0] & 0xfe00 == 0xfc00 {
        return Some("a unique-local address (includes fd00:ec2::254 metadata)");
    }
    if seg[0] & 0xffc0 == 0xfe80 || seg[0] & 0xffc0 == 0xfec0 {
        return Some("a link-local address");
    }
    if seg[0] & 0xff00 == 0xff00 {
        return Some("a multicast address");
    }
    if seg[0] == 0x2001 && seg[1] == 0x0db8 {
        return Some("a documentation address");
    }
    if seg[0] == 0x2001 && seg[1] < 0x0200 {
        // 2001::/23 IETF protocol assignments (Teredo, benchmarking, ORCHID…)
        return Some("an IETF protocol assignment address");
    }
    if seg[0] == 0x0100 && seg[1..4] == [0, 0, 0] {
        return Some("a discard-only address");
    }
    if seg[0] & 0xe000 != 0x2000 {
        return Some("a reserved address (outside 2000::/3)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(s: &str) -> bool {
        forbidden_reason(s.parse().unwrap()).is_some()
    }

    #[test]
    fn non_public_v4_is_refused() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "169.254.1.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(blocked(a), "{a} must be blocked");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "93.184.216.34",
        ] {
            assert!(!blocked(a), "{a} must be allowed");
        }
    }

    #[test]
    fn non_public_v6_and_embedded_v4_are_refused() {
        for a in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "::127.0.0.1",
            "2002:7f00:1::",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(blocked(a), "{a} must be blocked");
        }
        for a in [
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!blocked(a), "{a} must be allowed");
        }
    }

    #[test]
    fn allow_net_exempts_but_own_listeners_stay_blocked() {
        let own: SocketAddr = "127.0.0.1:10254".parse().unwrap();
        let g = EgressGuard::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec![own],
            HashMap::new(),
        );
        assert!(g.check("127.0.0.1:8443".parse().unwrap()).is_ok());
        assert!(g.check(own).is_err());
        assert!(g
            .check("[::ffff:127.0.0.1]:10254".parse().unwrap())
            .is_err());
        assert!(g.check("127.0.0.2:10254".parse().unwrap()).is_err());
        assert!(g.check("169.254.169.254:80".parse().unwrap()).is_err());
    }

    #[tokio::test]
    async fn resolve_uses_overrides_and_checks_them() {
        let mut o = HashMap::new();
        o.insert(
            ("api.test".to_string(), 443),
            vec!["127.0.0.1:9999".parse().unwrap()],
        );
        let strict = EgressGuard::new(vec![], vec![], o.clone());
        let e = strict.resolve("api.test", 443).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DestinationBlocked);
        let open = EgressGuard::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], o);
        assert_eq!(
            open.resolve("api.test", 443).await.unwrap(),
            vec!["127.0.0.1:9999".parse::<SocketAddr>().unwrap()]
        );
        let e = open.resolve("169.254.169.254", 80).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DestinationBlocked);
    }
}
