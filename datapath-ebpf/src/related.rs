//! ICMP errors about a Service connection ("related" packets, in
//! netfilter's words). A backend's port unreachable, or a router's
//! fragmentation needed or time exceeded, quotes the packet it is about as
//! that packet travelled between the pods: it names the backend. The
//! client's socket knows only the Service address and would ignore the
//! error (a UDP client waits for its timeout, path-MTU discovery stalls).
//! The programs rewrite the quote back to the Service (and the error's own
//! source, when the backend sent it); this module is the pure part: the
//! quote's fields and every checksum they touch, incrementally.

use crate::checksum::csum_replace16;

/// The ICMP types that quote a packet: destination unreachable, source
/// quench, time exceeded, parameter problem.
pub const QUOTING_TYPES: [u8; 4] = [3, 4, 11, 12];

/// Offsets from the start of the ICMP header: the header is 8 bytes, the
/// quoted IPv4 header (without options: 20) follows, then the quoted TCP or
/// UDP header, whose first 8 bytes (ports, and UDP's checksum) every
/// error that may quote a packet carries (RFC 792; Linux quotes far more).
pub const ICMP_CHECK: usize = 2;
pub const QUOTE: usize = 8;
/// The quoted IPv4 header's checksum, addresses (8 bytes) and ports (4).
pub const Q_CHECK: usize = QUOTE + 10;
pub const Q_ADDRS: usize = QUOTE + 12;
pub const Q_PORTS: usize = QUOTE + 20;
pub const Q_UDP_CHECK: usize = QUOTE + 26;
/// The quoted TCP checksum: present only when the error quotes that much
/// of the TCP header (Linux's do).
pub const Q_TCP_CHECK: usize = QUOTE + 36;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A quoted packet's addresses and ports, as they sit in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl Quote {
    /// The quote of a quoted packet's addresses and ports, as read from it.
    #[inline(always)]
    pub fn of(addrs: [[u8; 4]; 2], ports: [[u8; 2]; 2]) -> Quote {
        Quote { saddr: addrs[0], daddr: addrs[1], sport: ports[0], dport: ports[1] }
    }
}

/// The size of [`QuotingError`]: what the rewrite reads and writes in
/// place, but for the quoted TCP checksum.
pub const BLOCK_LEN: usize = Q_UDP_CHECK + 2;

#[inline(always)]
fn get(bytes: &[u8; BLOCK_LEN], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[inline(always)]
fn put(bytes: &mut [u8; BLOCK_LEN], at: usize, value: u16) {
    let [hi, lo] = value.to_be_bytes();
    bytes[at] = hi;
    bytes[at + 1] = lo;
}

/// Change the 16-bit word at `at` of the error `block` to `new`, and every
/// checksum that covers it, in place: the quoted IPv4 header's (for its
/// addresses: `in_ip_header`), the quoted TCP or UDP checksum (`l4`:
/// addresses through the pseudo-header, and ports) and the ICMP checksum,
/// which covers the other two as well. Read and written in the packet, a
/// word at a time: the programs have too few registers and too little
/// stack to hold the quote and its checksums at once.
#[inline(always)]
fn set_word(block: &mut [u8; BLOCK_LEN], at: usize, new: u16, in_ip_header: bool, l4: &mut L4Check<'_>) {
    let old = get(block, at);
    if old == new {
        return;
    }
    put(block, at, new);
    let mut icmp = csum_replace16(get(block, ICMP_CHECK), old, new);
    if in_ip_header {
        let check = get(block, Q_CHECK);
        let fixed = csum_replace16(check, old, new);
        put(block, Q_CHECK, fixed);
        icmp = csum_replace16(icmp, check, fixed);
    }
    match l4 {
        L4Check::None => {}
        L4Check::Udp => {
            let check = get(block, Q_UDP_CHECK);
            let fixed = csum_replace16(check, old, new);
            put(block, Q_UDP_CHECK, fixed);
            icmp = csum_replace16(icmp, check, fixed);
        }
        L4Check::Tcp(tcp) => {
            let check = u16::from_be_bytes(**tcp);
            let fixed = csum_replace16(check, old, new);
            **tcp = fixed.to_be_bytes();
            icmp = csum_replace16(icmp, check, fixed);
        }
    }
    put(block, ICMP_CHECK, icmp);
}

/// Where the quoted L4 checksum is, if there is one to keep right.
pub enum L4Check<'a> {
    /// None quoted, or a UDP datagram sent without one (it stays so).
    None,
    /// UDP's, in the block.
    Udp,
    /// TCP's, past the block.
    Tcp(&'a mut [u8; 2]),
}

/// Rewrite the quote in the error `block` to `new`, with every checksum,
/// so that the error is exactly what it would have been about the packet
/// as its sender sent it.
#[inline(always)]
pub fn rewrite_quote(block: &mut [u8; BLOCK_LEN], new: &Quote, mut l4: L4Check<'_>) {
    let (s, d) = (u32::from_be_bytes(new.saddr), u32::from_be_bytes(new.daddr));
    set_word(block, Q_ADDRS, (s >> 16) as u16, true, &mut l4);
    set_word(block, Q_ADDRS + 2, s as u16, true, &mut l4);
    set_word(block, Q_ADDRS + 4, (d >> 16) as u16, true, &mut l4);
    set_word(block, Q_ADDRS + 6, d as u16, true, &mut l4);
    set_word(block, Q_PORTS, u16::from_be_bytes(new.sport), false, &mut l4);
    set_word(block, Q_PORTS + 2, u16::from_be_bytes(new.dport), false, &mut l4);
    // A computed zero is sent as all ones (UDP: zero means none).
    if let L4Check::Udp = l4
        && get(block, Q_UDP_CHECK) == 0
    {
        put(block, Q_UDP_CHECK, 0xffff);
        put(block, ICMP_CHECK, csum_replace16(get(block, ICMP_CHECK), 0, 0xffff));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Internet checksum of `bytes`, from scratch.
    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 =
            bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv4 header + UDP datagram (or TCP segment) with every checksum
    /// computed from scratch.
    fn packet(protocol: u8, q: &Quote, payload: &[u8]) -> Vec<u8> {
        let l4_len = if protocol == IPPROTO_TCP { 20 } else { 8 } + payload.len();
        let mut l4 = vec![0u8; l4_len];
        l4[0..2].copy_from_slice(&q.sport);
        l4[2..4].copy_from_slice(&q.dport);
        if protocol == IPPROTO_UDP {
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            l4[8..].copy_from_slice(payload);
        } else {
            l4[12] = 5 << 4;
            l4[13] = 0x02;
            l4[20..].copy_from_slice(payload);
        }
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&q.saddr);
        pseudo.extend_from_slice(&q.daddr);
        pseudo.extend_from_slice(&[0, protocol]);
        pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
        pseudo.extend_from_slice(&l4);
        let mut l4_check = checksum(&pseudo);
        if protocol == IPPROTO_UDP && l4_check == 0 {
            l4_check = 0xffff;
        }
        let at = if protocol == IPPROTO_UDP { 6 } else { 16 };
        l4[at..at + 2].copy_from_slice(&l4_check.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 63, protocol, 0, 0];
        ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        ip.extend_from_slice(&q.saddr);
        ip.extend_from_slice(&q.daddr);
        let ip_check = checksum(&ip);
        ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    /// A port unreachable quoting `quoted`, ICMP checksum from scratch.
    fn error(quoted: &[u8]) -> Vec<u8> {
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quoted);
        let check = checksum(&icmp);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        icmp
    }

    /// What the programs do with an error quoting a packet: the new quote
    /// and checksums written over the old ones, in place.
    fn rewrite(message: &mut [u8], to: &Quote) {
        let protocol = message[QUOTE + 9];
        let (block, rest) = message.split_at_mut(BLOCK_LEN);
        let block: &mut [u8; BLOCK_LEN] = block.try_into().unwrap();
        let tcp_at = Q_TCP_CHECK - BLOCK_LEN;
        let l4 = if protocol == IPPROTO_TCP && rest.len() >= tcp_at + 2 {
            L4Check::Tcp((&mut rest[tcp_at..tcp_at + 2]).try_into().unwrap())
        } else if protocol == IPPROTO_UDP && get(block, Q_UDP_CHECK) != 0 {
            L4Check::Udp
        } else {
            L4Check::None
        };
        rewrite_quote(block, to, l4);
    }

    fn rewritten(protocol: u8, from: &Quote, to: &Quote, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut got = error(&packet(protocol, from, payload));
        rewrite(&mut got, to);
        (got, error(&packet(protocol, to, payload)))
    }

    const CLIENT: [u8; 4] = [10, 244, 1, 10];
    const BACKEND: [u8; 4] = [10, 244, 2, 21];
    const VIP: [u8; 4] = [10, 96, 0, 10];

    #[test]
    fn the_rewritten_error_equals_one_built_from_scratch() {
        let sent =
            Quote { saddr: CLIENT, daddr: VIP, sport: 40000u16.to_be_bytes(), dport: 53u16.to_be_bytes() };
        let seen = Quote { daddr: BACKEND, dport: 5353u16.to_be_bytes(), ..sent };
        for protocol in [IPPROTO_UDP, IPPROTO_TCP] {
            for payload in [&b""[..], b"query", b"a longer payload of odd length"] {
                let (got, want) = rewritten(protocol, &seen, &sent, payload);
                assert_eq!(got, want, "protocol {protocol}, payload {payload:?}");
                assert_eq!(checksum(&got), 0, "the ICMP checksum verifies");
            }
        }
        // Hairpin: the quote's source changes too.
        let hairpin = Quote { saddr: [169, 254, 42, 1], ..seen };
        let (got, want) = rewritten(IPPROTO_UDP, &hairpin, &Quote { saddr: BACKEND, ..sent }, b"x");
        assert_eq!(got, want);
    }

    #[test]
    fn a_datagram_without_checksum_keeps_none() {
        let seen = Quote { saddr: CLIENT, daddr: BACKEND, sport: [0x9c, 0x40], dport: [0x14, 0xe9] };
        let mut message = error(&packet(IPPROTO_UDP, &seen, b"q"));
        message[Q_UDP_CHECK] = 0;
        message[Q_UDP_CHECK + 1] = 0;
        message[2] = 0;
        message[3] = 0;
        let check = checksum(&message);
        message[2..4].copy_from_slice(&check.to_be_bytes());
        rewrite(&mut message, &Quote { daddr: VIP, dport: [0, 53], ..seen });
        assert_eq!(message[Q_UDP_CHECK..Q_UDP_CHECK + 2], [0, 0]);
        assert_eq!(checksum(&message), 0);
    }
}
