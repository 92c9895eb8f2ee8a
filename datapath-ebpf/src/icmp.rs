//! ICMP errors the programs send in the kernel's place: time exceeded for a
//! packet whose TTL runs out on us (traceroute), fragmentation needed for a
//! DF packet too big for the pod (path MTU discovery), port unreachable for
//! a new Service connection nobody can take. Each turns the offending packet
//! itself into the reply (RFC 792: quoting its IPv4 header and first 8
//! payload bytes) and is rate-limited per CPU, as the kernel's are.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use datapath_common::{DropReason, ICMP_ERRORS_PER_SECOND, IP_OFFSET_MASK, IPPROTO_ICMP};

use crate::{headers::ETH_HLEN, maps::ICMP_BUDGET, packet::Packet, rate_limit};

/// IPv4 header length of the packets we quote and of the reply.
const IPV4_HLEN: usize = 20;
/// The reply: Ethernet, IPv4, ICMP header, quoted IPv4 header + 8 bytes.
const REPLY_LEN: usize = ETH_HLEN + IPV4_HLEN + 8 + IPV4_HLEN + 8;
/// What of the original is read: Ethernet + IPv4 header + 8 bytes.
const QUOTED_LEN: usize = ETH_HLEN + IPV4_HLEN + 8;

/// Which error to send.
#[derive(Clone, Copy)]
pub enum IcmpError {
    /// Type 11 code 0: TTL exceeded in transit.
    TimeExceeded,
    /// Type 3 code 3: destination port unreachable.
    PortUnreachable,
    /// Type 3 code 4: fragmentation needed and DF set, with the next hop's
    /// MTU (RFC 1191).
    FragmentationNeeded { mtu: u16 },
}

impl IcmpError {
    #[inline(always)]
    const fn type_code(self) -> (u8, u8) {
        match self {
            IcmpError::TimeExceeded => (11, 0),
            IcmpError::PortUnreachable => (3, 3),
            IcmpError::FragmentationNeeded { .. } => (3, 4),
        }
    }

    /// The second word of the ICMP header: the next-hop MTU, or unused.
    #[inline(always)]
    const fn rest_of_header(self) -> [u8; 4] {
        match self {
            IcmpError::FragmentationNeeded { mtu } => {
                let mtu = mtu.to_be_bytes();
                [0, 0, mtu[0], mtu[1]]
            }
            _ => [0; 4],
        }
    }
}

/// An ICMP error, made from the packet it is about and ready to replace it.
pub struct IcmpReply([u8; REPLY_LEN]);

/// The reply `error` from `source` to the sender of this packet, MACs
/// swapped so that it leaves the way the packet came in. `None`: nothing
/// to send, where the kernel sends nothing either (RFC 1122 3.2.2: not
/// about a later fragment or another ICMP error) or this CPU used its
/// budget for this second. Reads the packet, leaves it alone; the reply
/// is made in `space`.
#[inline(always)]
pub fn make_reply<'a>(
    packet: &Packet,
    error: IcmpError,
    source: [u8; 4],
    space: &'a mut MaybeUninit<IcmpReply>,
) -> Option<&'a IcmpReply> {
    let Some(original) = packet.load::<[u8; QUOTED_LEN]>(0) else {
        // Shorter than a header and 8 bytes: nothing worth quoting.
        return None;
    };
    let ip = ETH_HLEN;
    // Only option-less headers are quoted (the forwarding checks refuse
    // packets with options before any error is due).
    if original[ip] != 0x45 {
        return None;
    }
    let later_fragment = u16::from_be_bytes([original[ip + 6], original[ip + 7]]) & IP_OFFSET_MASK != 0;
    let icmp_type = original[ip + IPV4_HLEN];
    // Echo reply 0, echo 8, timestamp 13/14, ...: queries; the rest are errors.
    let about_an_error = original[ip + 9] == IPPROTO_ICMP && matches!(icmp_type, 3 | 4 | 5 | 11 | 12);
    if later_fragment || about_an_error {
        return None;
    }
    // SAFETY: plain helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !rate_limit::take(ICMP_BUDGET.get_ptr_mut(0), now, ICMP_ERRORS_PER_SECOND) {
        return None;
    }

    let (icmp_type, icmp_code) = error.type_code();
    let reply = &mut space.write(IcmpReply([0u8; REPLY_LEN])).0;
    // Ethernet: back to where it came from.
    reply[0..6].copy_from_slice(&original[6..12]);
    reply[6..12].copy_from_slice(&original[0..6]);
    reply[12] = 0x08;
    // IPv4: internetwork control precedence, as Linux's icmp_send.
    reply[ip] = 0x45;
    reply[ip + 1] = 0xc0;
    reply[ip + 2..ip + 4].copy_from_slice(&((REPLY_LEN - ETH_HLEN) as u16).to_be_bytes());
    reply[ip + 8] = 64;
    reply[ip + 9] = IPPROTO_ICMP;
    reply[ip + 12..ip + 16].copy_from_slice(&source);
    reply[ip + 16..ip + 20].copy_from_slice(&original[ip + 12..ip + 16]);
    let check = checksum(reply, ip, IPV4_HLEN);
    reply[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
    // ICMP: type, code, checksum, 4 unused bytes, then the quote.
    let icmp = ip + IPV4_HLEN;
    reply[icmp] = icmp_type;
    reply[icmp + 1] = icmp_code;
    reply[icmp + 4..icmp + 8].copy_from_slice(&error.rest_of_header());
    reply[icmp + 8..].copy_from_slice(&original[ETH_HLEN..]);
    let check = checksum(reply, icmp, 8 + IPV4_HLEN + 8);
    reply[icmp + 2..icmp + 4].copy_from_slice(&check.to_be_bytes());
    // SAFETY: written just above.
    Some(unsafe { space.assume_init_ref() })
}

/// Replace the packet with `reply`.
#[inline(always)]
pub fn write_reply(packet: &mut Packet, reply: &IcmpReply) -> Result<(), DropReason> {
    packet.replace_with(&reply.0)
}

/// Internet checksum of `len` bytes of `bytes` from `start` (even length).
#[inline(always)]
fn checksum<const N: usize>(bytes: &[u8; N], start: usize, len: usize) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < len {
        let at = start + i;
        if at + 1 < N {
            sum += u16::from_be_bytes([bytes[at], bytes[at + 1]]) as u32;
        }
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
