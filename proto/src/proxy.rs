//! The client's address behind a load balancer: the PROXY protocol (v1 text, v2 binary, as
//! HAProxy specifies them), `X-Forwarded-For`, and address ranges (CIDR) for the list of
//! trusted proxies. Sans-IO: the engine feeds bytes and addresses in.
//!
//! Trust is the whole point: a PROXY header or an `X-Forwarded-For` value is believed only
//! when the TCP peer is a configured proxy; from anyone else it would let a client pick the
//! address it is rate-limited and audited under.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?
        };
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is inside the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`: dual-stack sockets report IPv4 peers that way.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client behind trusted proxies: walks `X-Forwarded-For` from the right (the entry the
/// nearest proxy added) past trusted proxies and returns the first untrusted address. The
/// peer itself must be trusted, else the header is ignored. Unparsable entries stop the walk
/// at the last trusted hop (a client cannot inject past a proxy that appends).
pub fn forwarded_client(
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    let peer = canonical(peer);
    let Some(list) = forwarded_for.filter(|_| trusted(peer)) else {
        return peer;
    };
    let mut client = peer;
    for entry in list.rsplit(',') {
        let Some(ip) = parse_forwarded_entry(entry.trim()) else {
            break;
        };
        client = canonical(ip);
        if !trusted(client) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly `[v6]:port` or `v4:port`.
fn parse_forwarded_entry(e: &str) -> Option<IpAddr> {
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Ok(sa) = e.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    e.strip_prefix('[')
        .and_then(|r| r.split(']').next())
        .and_then(|v6| v6.parse().ok())
}

/// What the start of a connection from a trusted proxy holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A PROXY header of `len` bytes; `source` is the client (None: `UNKNOWN` / `LOCAL`, a
    /// health check by the proxy itself: use the peer).
    Header {
        /// The client's address.
        source: Option<IpAddr>,
        /// Bytes the header takes (the request starts after them).
        len: usize,
    },
}

/// A malformed PROXY header (the connection is refused with 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad PROXY protocol header: {0}")]
pub struct ProxyError(pub &'static str);

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Parses a PROXY protocol v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 12
        && (V2_SIG.starts_with(buf) || b"PROXY ".starts_with(&buf[..buf.len().min(6)]))
    {
        return Ok(Parsed::NeedMore);
    }
    if buf.starts_with(V2_SIG) {
        return parse_v2(buf);
    }
    if buf.starts_with(b"PROXY ") {
        return parse_v1(buf);
    }
    Err(ProxyError(
        "expected a PROXY v1 or v2 header from this proxy",
    ))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // At most 107 bytes, CRLF-terminated.
    let Some(end) = buf.windows(2).take(106).position(|w| w == b"\r\n") else {
        return if buf.len() >= 107 {
            Err(ProxyError("v1 line longer than 107 bytes"))
        } else {
            Ok(Parsed::NeedMore)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError("v1 line not ASCII"))?;
    let mut f = line.split(' ');
    f.next(); // PROXY
    let source = match f.next() {
        Some("UNKNOWN") => None,
        Some(fam @ ("TCP4" | "TCP6")) => {
            let src: IpAddr = f
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(ProxyError("v1 source address"))?;
            let dst: IpAddr = f
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(ProxyError("v1 destination address"))?;
            let ports_ok = f.next().and_then(|p| p.parse::<u16>().ok()).is_some()
                && f.next().and_then(|p| p.parse::<u16>().ok()).is_some();
            if !ports_ok || f.next().is_some() {
                return Err(ProxyError("v1 ports"));
            }
            if (fam == "TCP4") != (src.is_ipv4() && dst.is_ipv4()) {
                return Err(ProxyError("v1 address family"));
            }
            Some(src)
        }
        _ => return Err(ProxyError("v1 protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Parsed::Header {
        source,
        len: end + 2,
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parsed::NeedMore);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError("v2 version"));
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < len {
        return Ok(Parsed::NeedMore);
    }
    let body = &buf[16..len];
    let source = match (ver_cmd & 0x0F, fam >> 4) {
        (0, _) => None, // LOCAL: the proxy's own connection
        (1, 1) if body.len() >= 12 => Some(IpAddr::V4(Ipv4Addr::new(
            body[0], body[1], body[2], body[3],
        ))),
        (1, 2) if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        (1, 0 | 3) => None, // UNSPEC or UNIX: no IP to use
        (1, _) => return Err(ProxyError("v2 address block too short")),
        _ => return Err(ProxyError("v2 command")),
    };
    Ok(Parsed::Header { source, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_ranges() {
        assert!(net("10.0.0.0/8").contains("10.1.2.3".parse().unwrap()));
        assert!(!net("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(net("127.0.0.1").contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(net("::1/128").contains("::1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(!net("fd00::/8").contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("proxy".parse::<IpNet>().is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted = |ip: IpAddr| net("10.0.0.0/8").contains(ip);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Untrusted peer: the header is ignored.
        assert_eq!(
            forwarded_client(ip("203.0.113.5"), Some("1.2.3.4"), trusted),
            ip("203.0.113.5")
        );
        // Trusted peer: the rightmost untrusted entry.
        assert_eq!(
            forwarded_client(
                ip("10.0.0.2"),
                Some("6.6.6.6, 198.51.100.7, 10.0.0.9"),
                trusted
            ),
            ip("198.51.100.7")
        );
        // Ports and brackets; garbage stops the walk at the last trusted hop.
        assert_eq!(
            forwarded_client(ip("10.0.0.2"), Some("[2001:db8::1]:443"), trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.2"), Some("198.51.100.7:5000"), trusted),
            ip("198.51.100.7")
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.2"), Some("1.2.3.4, junk"), trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.2"), None, trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn proxy_v1() {
        let h = b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 80\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Header {
                source: Some("198.51.100.22".parse().unwrap()),
                len: 47
            })
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert!(matches!(
            parse(h6),
            Ok(Parsed::Header {
                source: Some(IpAddr::V6(_)),
                ..
            })
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Header {
                source: None,
                len: 15
            })
        );
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(Parsed::NeedMore));
        assert_eq!(parse(b"PRO"), Ok(Parsed::NeedMore));
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
    }

    #[test]
    fn proxy_v2() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12]); // PROXY, TCP over IPv4, 12 bytes
        h.extend_from_slice(&[198, 51, 100, 22, 203, 0, 113, 7, 0x8b, 0x3e, 0, 80]);
        h.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                source: Some("198.51.100.22".parse().unwrap()),
                len: 28
            })
        );
        assert_eq!(parse(&h[..20]), Ok(Parsed::NeedMore));
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&local),
            Ok(Parsed::Header {
                source: None,
                len: 16
            })
        );
        let mut bad = V2_SIG.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0, 0]);
        assert!(parse(&bad).is_err());
        let mut short = V2_SIG.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse(&short).is_err());
    }
}
