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

/// The part of an ICMP error the rewrite reads and writes, from the start
/// of the ICMP header: the header (8 bytes), the quoted IPv4 header
/// without options (20) and the first 8 bytes of the quoted TCP or UDP
/// header (ports, and UDP's checksum). Every error that may quote a
/// packet carries at least this much (RFC 792; Linux quotes far more).
pub const BLOCK_LEN: usize = 36;
/// Offsets in the block.
pub const ICMP_TYPE: usize = 0;
const ICMP_CHECK: usize = 2;
pub const QUOTE: usize = 8;
pub const Q_VERSION_IHL: usize = QUOTE;
pub const Q_FRAG: usize = QUOTE + 6;
pub const Q_PROTOCOL: usize = QUOTE + 9;
const Q_CHECK: usize = QUOTE + 10;
pub const Q_SADDR: usize = QUOTE + 12;
pub const Q_DADDR: usize = QUOTE + 16;
pub const Q_SPORT: usize = QUOTE + 20;
pub const Q_DPORT: usize = QUOTE + 22;
const Q_UDP_CHECK: usize = QUOTE + 26;
/// The quoted TCP checksum, past the block: present only when the error
/// quotes that much of the TCP header (Linux's do).
pub const Q_TCP_CHECK: usize = QUOTE + 20 + 16;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// What a quoted packet becomes: its addresses and ports (network order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl Quote {
    /// The quote as it sits in `block`.
    #[inline(always)]
    pub fn of(block: &[u8; BLOCK_LEN]) -> Quote {
        Quote {
            saddr: [block[Q_SADDR], block[Q_SADDR + 1], block[Q_SADDR + 2], block[Q_SADDR + 3]],
            daddr: [block[Q_DADDR], block[Q_DADDR + 1], block[Q_DADDR + 2], block[Q_DADDR + 3]],
            sport: [block[Q_SPORT], block[Q_SPORT + 1]],
            dport: [block[Q_DPORT], block[Q_DPORT + 1]],
        }
    }
}

#[inline(always)]
fn word<const N: usize>(bytes: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[inline(always)]
fn put_word<const N: usize>(bytes: &mut [u8; N], at: usize, value: u16) {
    let [hi, lo] = value.to_be_bytes();
    bytes[at] = hi;
    bytes[at + 1] = lo;
}

/// Write the word at `at` of the quote, with the changes it makes to the
/// checksums that cover it: the quoted IPv4 header's (`ip`, for its
/// addresses), the quoted TCP or UDP checksum (`l4`: addresses through
/// the pseudo-header, and ports) and the ICMP checksum.
#[inline(always)]
fn set_word(block: &mut [u8; BLOCK_LEN], at: usize, new: u16, in_ip_header: bool, sums: &mut Sums) {
    let old = word(block, at);
    if old == new {
        return;
    }
    put_word(block, at, new);
    sums.icmp = csum_replace16(sums.icmp, old, new);
    if in_ip_header {
        sums.ip = csum_replace16(sums.ip, old, new);
    }
    sums.l4 = csum_replace16(sums.l4, old, new);
}

/// The checksums a rewrite of the quote keeps right.
struct Sums {
    icmp: u16,
    ip: u16,
    l4: u16,
}

/// Rewrite the quote in `block` to `new`, with the quoted IPv4 header's
/// checksum, the quoted UDP checksum (unless the datagram had none), the
/// quoted TCP checksum `tcp_check` (when the error quotes it; its new
/// value is returned) and the ICMP checksum, so that the error is exactly
/// what it would have been about the packet as its sender sent it. Works
/// on scalars only: the programs have little stack to spare.
#[inline(always)]
pub fn rewrite_quote(block: &mut [u8; BLOCK_LEN], new: &Quote, tcp_check: Option<u16>) -> Option<u16> {
    let protocol = block[Q_PROTOCOL];
    let (old_ip, old_udp) = (word(block, Q_CHECK), word(block, Q_UDP_CHECK));
    let old_l4 = match tcp_check {
        Some(check) if protocol == IPPROTO_TCP => Some(check),
        _ if protocol == IPPROTO_UDP && old_udp != 0 => Some(old_udp),
        // Sent without a checksum (UDP): it stays so.
        _ => None,
    };
    let mut sums = Sums { icmp: word(block, ICMP_CHECK), ip: old_ip, l4: old_l4.unwrap_or(0) };
    let half = |a: [u8; 4], i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    set_word(block, Q_SADDR, half(new.saddr, 0), true, &mut sums);
    set_word(block, Q_SADDR + 2, half(new.saddr, 2), true, &mut sums);
    set_word(block, Q_DADDR, half(new.daddr, 0), true, &mut sums);
    set_word(block, Q_DADDR + 2, half(new.daddr, 2), true, &mut sums);
    set_word(block, Q_SPORT, u16::from_be_bytes(new.sport), false, &mut sums);
    set_word(block, Q_DPORT, u16::from_be_bytes(new.dport), false, &mut sums);
    // The checksum fields are in the quote too: the ICMP checksum covers them.
    put_word(block, Q_CHECK, sums.ip);
    sums.icmp = csum_replace16(sums.icmp, old_ip, sums.ip);
    let new_l4 = match old_l4 {
        Some(old) => {
            // A computed zero is sent as all ones (UDP).
            let new = if sums.l4 == 0 && protocol == IPPROTO_UDP { 0xffff } else { sums.l4 };
            sums.icmp = csum_replace16(sums.icmp, old, new);
            Some(new)
        }
        None => None,
    };
    if protocol == IPPROTO_UDP
        && let Some(new) = new_l4
    {
        put_word(block, Q_UDP_CHECK, new);
    }
    put_word(block, ICMP_CHECK, sums.icmp);
    if protocol == IPPROTO_TCP { new_l4 } else { None }
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

    fn rewritten(protocol: u8, from: &Quote, to: &Quote, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut got = error(&packet(protocol, from, payload));
        let mut block: [u8; BLOCK_LEN] = got[..BLOCK_LEN].try_into().unwrap();
        let tcp_check = (protocol == IPPROTO_TCP).then(|| word(&block_of(&got), 0));
        let new_tcp = rewrite_quote(&mut block, to, tcp_check);
        got[..BLOCK_LEN].copy_from_slice(&block);
        if let Some(new) = new_tcp {
            got[Q_TCP_CHECK..Q_TCP_CHECK + 2].copy_from_slice(&new.to_be_bytes());
        }
        (got, error(&packet(protocol, to, payload)))
    }

    /// The two bytes of the quoted TCP checksum, as a one-word array.
    fn block_of(message: &[u8]) -> [u8; 2] {
        [message[Q_TCP_CHECK], message[Q_TCP_CHECK + 1]]
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
        message[QUOTE + 26] = 0;
        message[QUOTE + 27] = 0;
        message[2] = 0;
        message[3] = 0;
        let check = checksum(&message);
        message[2..4].copy_from_slice(&check.to_be_bytes());
        let mut block: [u8; BLOCK_LEN] = message[..BLOCK_LEN].try_into().unwrap();
        rewrite_quote(&mut block, &Quote { daddr: VIP, dport: [0, 53], ..seen }, None);
        assert_eq!(block[Q_UDP_CHECK..Q_UDP_CHECK + 2], [0, 0]);
        message[..BLOCK_LEN].copy_from_slice(&block);
        assert_eq!(checksum(&message), 0);
    }
}
