//! Who a connection is, for the per-address limits (SPEC §3): the TCP peer,
//! or, for a connection from a trusted proxy (`[staps] trusted_proxies`),
//! the client that proxy names in `X-Forwarded-For`, `Forwarded: for=` or
//! `X-Real-IP`. These headers from anyone else are ignored, so nobody can
//! claim another's address; a header that cannot be read falls back to the
//! peer, never to an error. An IPv4 address is one client, an IPv6 one its
//! /64 (what one host is usually given).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// An address range: an address and the leading bits that count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    bits: u8,
}

impl Net {
    /// Whether `ip` is in the range; an IPv4 address also as its
    /// IPv4-mapped IPv6 form (`::ffff:10.0.0.0/104`).
    fn contains(&self, ip: IpAddr) -> bool {
        let v6 = |net: Ipv6Addr, ip: Ipv6Addr| {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(self.bits))
                .unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        };
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => v6(net, ip),
            (IpAddr::V6(net), IpAddr::V4(ip)) => v6(net, ip.to_ipv6_mapped()),
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.bits == full {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.bits)
        }
    }
}

/// The peers whose forwarding headers are believed: `unix` (any peer on a
/// unix socket, the usual nginx or Apache in front) and addresses or CIDR
/// ranges of TCP proxies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trusted {
    unix: bool,
    nets: Vec<Net>,
}

impl Default for Trusted {
    /// Unix-socket peers only.
    fn default() -> Self {
        Trusted {
            unix: true,
            nets: Vec::new(),
        }
    }
}

impl Trusted {
    /// Parse a list of `unix`, addresses and CIDR ranges, separated by
    /// spaces or commas; empty trusts nobody.
    pub fn parse<'a>(items: impl Iterator<Item = &'a str>) -> Result<Trusted, String> {
        let mut trusted = Trusted {
            unix: false,
            nets: Vec::new(),
        };
        for item in items {
            if item.eq_ignore_ascii_case("unix") {
                trusted.unix = true;
                continue;
            }
            let bad = || {
                format!(
                    "'{item}' is not unix, an IP address or a CIDR range (10.0.0.0/8, fd00::/8)"
                )
            };
            let (addr, bits) = match item.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (item, None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let full = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                Some(bits) => bits
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= full)
                    .ok_or_else(bad)?,
                None => full,
            };
            trusted.nets.push(Net { addr, bits });
        }
        Ok(trusted)
    }

    /// Whether a connection from `peer` (`None`: a unix socket) is a
    /// trusted proxy.
    pub fn trusts(&self, peer: Option<IpAddr>) -> bool {
        match peer {
            None => self.unix,
            Some(ip) => self.nets.iter().any(|net| net.contains(ip)),
        }
    }
}

impl fmt::Display for Trusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = self.nets.iter().map(Net::to_string).collect();
        if self.unix {
            items.insert(0, "unix".into());
        }
        f.write_str(&items.join(" "))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The part of an address that counts as one client: an IPv6 host has a /64.
pub(crate) fn host_of(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !0xffff_ffff_ffff_ffff)),
        v4 => v4,
    }
}

/// The values of every header of a request called `name`, in order.
pub(crate) type Headers<'a> = &'a dyn Fn(&str) -> Vec<&'a str>;

/// The client address of a request from `peer` (`None`: a unix socket).
/// `None` when it cannot be known (a unix-socket peer that names nobody):
/// per-address limits do not apply then.
pub(crate) fn client_address(
    peer: Option<IpAddr>,
    trusted: &Trusted,
    headers: Headers,
) -> Option<IpAddr> {
    let named = if trusted.trusts(peer) {
        forwarded_for(trusted, headers)
    } else {
        None
    };
    named.or(peer).map(host_of)
}

/// The client a trusted proxy names: the right-most address of the
/// forwarding chain that is not a trusted proxy itself (what is left of it
/// came from the client, who may write anything there).
fn forwarded_for(trusted: &Trusted, headers: Headers) -> Option<IpAddr> {
    let xff: Vec<&str> = headers("X-Forwarded-For")
        .into_iter()
        .flat_map(|v| v.split(','))
        .collect();
    if !xff.is_empty() {
        return rightmost_untrusted(trusted, &xff);
    }
    let forwarded: Vec<&str> = headers("Forwarded")
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim().eq_ignore_ascii_case("for").then_some(value)
            })
        })
        .collect();
    if !forwarded.is_empty() {
        return rightmost_untrusted(trusted, &forwarded);
    }
    match headers("X-Real-IP").as_slice() {
        [one] => parse_node(one),
        _ => None,
    }
}

fn rightmost_untrusted(trusted: &Trusted, chain: &[&str]) -> Option<IpAddr> {
    let mut leftmost = None;
    for node in chain.iter().rev() {
        // Past a node that cannot be read, nothing can be told.
        let ip = parse_node(node)?;
        if !trusted.trusts(Some(ip)) {
            return Some(ip);
        }
        leftmost = Some(ip);
    }
    // Proxies all the way: the first of them is the nearest to the client.
    leftmost
}

/// One node of a forwarding header: an address, maybe quoted, bracketed
/// (IPv6) or with a port.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim().trim_matches('"');
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    node.strip_prefix('[')?
        .strip_suffix(']')?
        .parse::<IpAddr>()
        .ok()
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(peer: Option<&str>, trusted: &str, headers: &[(&str, &str)]) -> Option<IpAddr> {
        let trusted = Trusted::parse(trusted.split_whitespace()).unwrap();
        let values = |name: &str| {
            headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
                .collect()
        };
        client_address(peer.map(ip), &trusted, &values)
    }

    #[test]
    fn only_trusted_peers_name_the_client() {
        let xff = [("X-Forwarded-For", "203.0.113.9, 198.51.100.7")];
        // A unix peer is trusted by default: the right-most address.
        assert_eq!(client(None, "unix", &xff), Some(ip("198.51.100.7")));
        // A TCP peer that is not trusted: its headers mean nothing.
        assert_eq!(
            client(Some("192.0.2.1"), "unix", &xff),
            Some(ip("192.0.2.1"))
        );
        // Trusted proxies are skipped from the right.
        assert_eq!(
            client(Some("10.0.0.2"), "10.0.0.0/8 198.51.100.0/24", &xff),
            Some(ip("203.0.113.9"))
        );
        // Nobody trusted: a unix peer is no address at all.
        assert_eq!(client(None, "", &xff), None);
        assert_eq!(client(None, "unix", &[]), None);
    }

    #[test]
    fn forwarded_and_x_real_ip_and_what_cannot_be_read() {
        let fwd = [(
            "Forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8:cafe::17]:4711\"",
        )];
        assert_eq!(client(None, "unix", &fwd), Some(ip("2001:db8:cafe::")));
        let real = [("X-Real-IP", "192.0.2.44")];
        assert_eq!(client(None, "unix", &real), Some(ip("192.0.2.44")));
        // Unreadable where it counts: the peer (here none), never an error.
        for bad in ["203.0.113.9, nonsense", "unknown", ""] {
            let xff = [("X-Forwarded-For", bad)];
            assert_eq!(client(None, "unix", &xff), None, "{bad}");
            assert_eq!(
                client(Some("10.0.0.2"), "10.0.0.2", &xff),
                Some(ip("10.0.0.2"))
            );
        }
        // Unreadable only left of the client: it is never looked at.
        let xff = [("X-Forwarded-For", "nonsense, 198.51.100.7")];
        assert_eq!(client(None, "unix", &xff), Some(ip("198.51.100.7")));
        // Two headers are one list.
        let two = [
            ("X-Forwarded-For", "198.51.100.7"),
            ("X-Forwarded-For", "10.1.1.1"),
        ];
        assert_eq!(
            client(None, "unix 10.0.0.0/8", &two),
            Some(ip("198.51.100.7"))
        );
    }

    #[test]
    fn ipv6_clients_are_their_64_and_mapped_ones_ipv4() {
        assert_eq!(host_of(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(host_of(ip("::ffff:192.0.2.3")), ip("192.0.2.3"));
        let t = Trusted::parse(["::ffff:10.0.0.0/104", "fd00::/8"].into_iter()).unwrap();
        assert!(t.trusts(Some(ip("fd12::1"))));
        assert!(t.trusts(Some(ip("10.9.8.7"))));
        assert!(t.trusts(Some(ip("::ffff:10.9.8.7"))));
        assert!(!t.trusts(Some(ip("11.0.0.1"))));
        assert!(!t.trusts(None));
        assert!(Trusted::parse(["10.0.0.0/33"].into_iter()).is_err());
        assert!(Trusted::parse(["localhost"].into_iter()).is_err());
        assert_eq!(
            Trusted::parse("unix 10.0.0.0/8 ::1".split(' '))
                .unwrap()
                .to_string(),
            "unix 10.0.0.0/8 ::1"
        );
    }
}
