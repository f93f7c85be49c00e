//! Who is asking: the peer of the TCP connection, or, when that peer is one of
//! `[server] trusted_proxies`, the client its `X-Forwarded-For` names; and the
//! `X-Forwarded-For` the relay passes on to targets.
//!
//! Only a trusted proxy's `X-Forwarded-For` is believed. The header is read from the right:
//! each entry a trusted proxy added is stepped over, and the first address that is not a
//! trusted proxy is the client. An untrusted peer's header is ignored, and not passed on.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Whether `ip` is in one of `networks`. An IPv4-mapped IPv6 address counts as its IPv4.
pub fn contains(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    networks.iter().any(|net| net.contains(&ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer, or behind trusted proxies the rightmost address in
/// `X-Forwarded-For` that is not a trusted proxy. `None` when the header names no usable
/// address where one was needed (a trusted proxy that sent junk).
pub fn client(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> Option<IpAddr> {
    let mut client = canonical(peer);
    if !contains(trusted, client) {
        return Some(client);
    }
    // A header the proxy sent that is not text: no client can be named (refused, not taken
    // for the proxy itself).
    if headers
        .get_all("x-forwarded-for")
        .iter()
        .any(|v| v.to_str().is_err())
    {
        return None;
    }
    let mut entries = forwarded_entries(headers).rev();
    while contains(trusted, client) {
        let Some(entry) = entries.next() else {
            // Every hop was a trusted proxy: the last one is as close to the client as it gets.
            return Some(client);
        };
        client = canonical(entry.parse::<IpAddr>().ok()?);
    }
    Some(client)
}

/// The `X-Forwarded-For` for targets: a trusted proxy's header with the peer appended, or the
/// peer alone.
pub fn forwarded_for(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> String {
    let peer_text = peer.to_string();
    if !contains(trusted, peer) {
        return peer_text;
    }
    let existing: Vec<&str> = forwarded_entries(headers).collect();
    if existing.is_empty() {
        return peer_text;
    }
    format!("{}, {peer_text}", existing.join(", "))
}

/// The entries of every `X-Forwarded-For` header, left to right.
fn forwarded_entries(headers: &HeaderMap) -> impl DoubleEndedIterator<Item = &str> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("network")).collect()
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", xff.parse().expect("header"));
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers("101.226.103.0");
        assert_eq!(
            client(&h, ip("198.51.100.7"), &trusted),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            forwarded_for(&h, ip("198.51.100.7"), &trusted),
            "198.51.100.7"
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_entry_is_the_client() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        // A client forged the first entry; proxy 10.0.0.5 added the real client.
        let h = headers("1.2.3.4, 101.226.103.9, 10.0.0.5");
        assert_eq!(
            client(&h, ip("127.0.0.1"), &trusted),
            Some(ip("101.226.103.9"))
        );
        assert_eq!(
            forwarded_for(&h, ip("127.0.0.1"), &trusted),
            "1.2.3.4, 101.226.103.9, 10.0.0.5, 127.0.0.1"
        );
        // No header: the proxy itself.
        assert_eq!(
            client(&HeaderMap::new(), ip("127.0.0.1"), &trusted),
            Some(ip("127.0.0.1"))
        );
        // Junk where the client should be: no client.
        assert_eq!(client(&headers("junk"), ip("127.0.0.1"), &trusted), None);
        let mut binary = HeaderMap::new();
        binary.insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"203.0.113.9\xff").expect("header"),
        );
        assert_eq!(client(&binary, ip("127.0.0.1"), &trusted), None);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let allow = nets(&["101.226.0.0/16"]);
        assert!(contains(&allow, ip("::ffff:101.226.1.2")));
        assert!(!contains(&allow, ip("::ffff:8.8.8.8")));
    }
}
