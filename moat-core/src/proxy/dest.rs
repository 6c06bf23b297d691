//! Which addresses the proxy refuses to connect to on a client's behalf.
//!
//! Pure: no I/O. The proxy parses a host the way C resolvers do (so
//! `2130706433`, `0177.0.0.1`, `0x7f.1` and `[::ffff:127.0.0.1]` are all
//! loopback), resolves names itself, checks every address here, and connects
//! only to an address it checked, so DNS cannot swap it afterwards.
//! Addresses the operator configured (`MOAT_RESOLVE`) are exempt.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Parses `host` as an IP address in any spelling a resolver accepts:
/// dotted IPv4 with 1–4 parts, each decimal, octal (`0` prefix) or hex
/// (`0x`); IPv6 with or without brackets; a trailing dot is ignored.
/// `None` for a DNS name.
pub fn parse_ip(host: &str) -> Option<IpAddr> {
    let host = host.trim_end_matches('.');
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(v6) = unbracketed.parse::<Ipv6Addr>() {
        return Some(IpAddr::V6(v6));
    }
    parse_ipv4_loose(host).map(IpAddr::V4)
}

fn parse_part(part: &str) -> Option<u64> {
    if part.is_empty() {
        return None;
    }
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() {
        // "0x" alone is 0 for inet_aton.
        return (radix == 16).then_some(0);
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// inet_aton semantics: `a`, `a.b`, `a.b.c`, `a.b.c.d`, the last part filling
/// the remaining bytes.
fn parse_ipv4_loose(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts.iter().map(|p| parse_part(p)).collect::<Option<_>>()?;
    let (last, init) = nums.split_last()?;
    let mut value: u64 = 0;
    for (i, n) in init.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        value |= n << (24 - 8 * i);
    }
    let rest_bits = 32 - 8 * init.len() as u32;
    if *last >= (1u64 << rest_bits) {
        return None;
    }
    value |= last;
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

/// Why an address may not be reached on a client's behalf, or `None` when it
/// may.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        return Some("a cloud metadata address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_unspecified() || o[0] == 0 {
        return Some("an unspecified address");
    }
    if ip.is_private() {
        return Some("a private address");
    }
    if ip.is_link_local() {
        return Some("a link-local address");
    }
    if o[0] == 100 && (o[1] & 0xc0) == 64 {
        return Some("a shared (carrier-grade nat) address");
    }
    if ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        return Some("a broadcast, multicast or reserved address");
    }
    if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        return Some("an ietf protocol address");
    }
    if o[0] == 198 && (o[1] & 0xfe) == 18 {
        return Some("a benchmarking address");
    }
    None
}

fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new(
        (s[6] >> 8) as u8,
        (s[6] & 0xff) as u8,
        (s[7] >> 8) as u8,
        (s[7] & 0xff) as u8,
    );
    // ::ffff:a.b.c.d (mapped), ::a.b.c.d (compatible), 64:ff9b::a.b.c.d (nat64)
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        return Some(tail);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail);
    }
    // 2002:AABB:CCDD::/48 (6to4)
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            (s[1] & 0xff) as u8,
            (s[2] >> 8) as u8,
            (s[2] & 0xff) as u8,
        ));
    }
    None
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254) {
        return Some("a cloud metadata address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if let Some(v4) = embedded_v4(ip) {
        if let Some(reason) = forbidden_v4(v4) {
            return Some(reason);
        }
    }
    if (s[0] & 0xfe00) == 0xfc00 {
        return Some("a unique-local address");
    }
    if (s[0] & 0xffc0) == 0xfe80 || (s[0] & 0xffc0) == 0xfec0 {
        return Some("a link-local address");
    }
    if (s[0] & 0xff00) == 0xff00 {
        return Some("a multicast address");
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Some("a documentation address");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(host: &str) -> bool {
        parse_ip(host).and_then(forbidden_reason).is_some()
    }

    #[test]
    fn loopback_in_every_spelling() {
        for host in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "0177.0.0.1",
            "0177.0000.0000.0001",
            "127.0.0.1.",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
            "[::ffff:7f00:1]",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "2002:7f00:1::",
            "0.0.0.0",
            "0",
            "[::]",
        ] {
            assert!(refused(host), "{host} must be refused");
        }
    }

    #[test]
    fn metadata_and_private_ranges() {
        for host in [
            "169.254.169.254",
            "2852039166",
            "0xa9fea9fe",
            "0251.0376.0251.0376",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "10.0.0.1",
            "10.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:10.0.0.1",
        ] {
            assert!(refused(host), "{host} must be refused");
        }
    }

    #[test]
    fn public_addresses_and_names() {
        for host in ["140.82.112.3", "172.32.0.1", "2606:4700::1111"] {
            assert!(parse_ip(host).is_some(), "{host}");
            assert!(!refused(host), "{host} must be allowed");
        }
        for name in [
            "api.github.com",
            "localhost",
            "127.0.0.1.nip.io",
            "1.2.3.4.5",
            "08.1.1.1",
        ] {
            assert!(!refused(name), "{name} is not an ip literal refused here");
        }
        assert_eq!(parse_ip("api.github.com"), None);
        assert_eq!(parse_ip("256.1.1.1"), None);
    }
}
