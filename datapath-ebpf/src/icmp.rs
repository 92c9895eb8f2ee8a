//! ICMP errors the programs send in the kernel's place: time exceeded for a
//! packet whose TTL runs out on us (traceroute), fragmentation needed for a
//! DF packet too big for the pod (path MTU discovery), port unreachable for
//! a new Service connection nobody can take. Each turns the offending packet
//! itself into the reply (RFC 792: quoting its IPv4 header and first 8
//! payload bytes); sending it (rate-limited per CPU, as the kernel's are) is
//! `crate::verdict`'s.

use core::mem::MaybeUninit;

use datapath_common::{ETH_P_IP, IP_OFFSET_MASK, IPPROTO_ICMP};

use crate::{
    checksum::checksum_of,
    headers::{ETH_HLEN, EthHdr, IPV4_MIN_HLEN, IPV4_NO_OPTIONS, IcmpHdr, Ipv4Hdr},
};

/// ICMP types (RFC 792) and codes.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_SOURCE_QUENCH: u8 = 4;
pub const ICMP_REDIRECT: u8 = 5;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Codes of [`ICMP_DEST_UNREACH`] and [`ICMP_TIME_EXCEEDED`].
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_EXC_TTL: u8 = 0;
/// Communication administratively prohibited (RFC 1812): what a filter
/// answers (Linux's `REJECT --reject-with icmp-admin-prohibited`).
pub const ICMP_PKT_FILTERED: u8 = 13;

/// The reply's IPv4 TOS: precedence "internetwork control", as Linux's
/// `icmp_send` sets it.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
/// The reply's TTL.
const REPLY_TTL: u8 = 64;
/// What an error quotes of the packet it is about beyond its IPv4 header.
const QUOTED_PAYLOAD: usize = 8;

/// What an error is about: the start of the offending frame, as much as
/// the reply quotes (an option-less IPv4 header and 8 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Original {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub payload: [u8; QUOTED_PAYLOAD],
}

/// A whole reply frame: Ethernet, IPv4, the ICMP header, the quote.
#[repr(C)]
pub struct IcmpReply(pub [u8; REPLY_LEN]);

/// Where an answer is made: per CPU, in a map. On the stack, these 112
/// bytes would sit beside everything else the programs keep there, and the
/// debug build's (whose log call adds its own frame) would pass the
/// verifier's 512-byte limit.
#[repr(C)]
pub struct AnswerScratch {
    pub original: Original,
    pub reply: IcmpReply,
}

pub const ORIGINAL_LEN: usize = ETH_HLEN + IPV4_MIN_HLEN + QUOTED_PAYLOAD;
const ICMP_ERROR_LEN: usize = size_of::<IcmpHdr>() + IPV4_MIN_HLEN + QUOTED_PAYLOAD;
pub const REPLY_LEN: usize = ETH_HLEN + IPV4_MIN_HLEN + ICMP_ERROR_LEN;
// A wire layout: byte arrays only, no padding.
const _: () = assert!(size_of::<Original>() == ORIGINAL_LEN);

/// Where the reply's fields sit in its frame, from the header layouts.
mod at {
    use core::mem::{offset_of, size_of};

    use crate::headers::{ETH_HLEN, EthHdr, IPV4_MIN_HLEN, IcmpHdr, Ipv4Hdr};

    pub(super) const ETH_DST: usize = offset_of!(EthHdr, dst);
    pub(super) const ETH_SRC: usize = offset_of!(EthHdr, src);
    pub(super) const ETH_PROTO: usize = offset_of!(EthHdr, proto);
    pub(super) const IP: usize = ETH_HLEN;
    pub(super) const IP_VERSION_IHL: usize = IP + offset_of!(Ipv4Hdr, version_ihl);
    pub(super) const IP_TOS: usize = IP + offset_of!(Ipv4Hdr, tos);
    pub(super) const IP_TOT_LEN: usize = IP + offset_of!(Ipv4Hdr, tot_len);
    pub(super) const IP_TTL: usize = IP + offset_of!(Ipv4Hdr, ttl);
    pub(super) const IP_PROTOCOL: usize = IP + offset_of!(Ipv4Hdr, protocol);
    pub(super) const IP_CHECK: usize = IP + offset_of!(Ipv4Hdr, check);
    pub(super) const IP_SADDR: usize = IP + offset_of!(Ipv4Hdr, saddr);
    pub(super) const IP_DADDR: usize = IP + offset_of!(Ipv4Hdr, daddr);
    pub(super) const ICMP: usize = IP + IPV4_MIN_HLEN;
    pub(super) const ICMP_TYPE: usize = ICMP + offset_of!(IcmpHdr, icmp_type);
    pub(super) const ICMP_CODE: usize = ICMP + offset_of!(IcmpHdr, code);
    pub(super) const ICMP_CHECK: usize = ICMP + offset_of!(IcmpHdr, check);
    pub(super) const ICMP_REST: usize = ICMP + offset_of!(IcmpHdr, rest);
    /// The quote: the original's IPv4 header, then its first 8 bytes.
    pub(super) const QUOTED_IP: usize = ICMP + size_of::<IcmpHdr>();
    pub(super) const QUOTED_PAYLOAD: usize = QUOTED_IP + IPV4_MIN_HLEN;
}

/// Which error to send: its type and code, and the next-hop MTU of a
/// fragmentation needed (RFC 1191), 0 otherwise. A plain struct, every
/// field always set: an enum with data leaves its other variants' bytes
/// undefined, which LLVM may read into a register the verifier then
/// refuses as uninitialised.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IcmpError {
    icmp_type: u8,
    code: u8,
    mtu: u16,
}

impl IcmpError {
    /// TTL exceeded in transit.
    pub const TIME_EXCEEDED: IcmpError =
        IcmpError { icmp_type: ICMP_TIME_EXCEEDED, code: ICMP_EXC_TTL, mtu: 0 };
    /// Destination port unreachable.
    pub const PORT_UNREACHABLE: IcmpError =
        IcmpError { icmp_type: ICMP_DEST_UNREACH, code: ICMP_PORT_UNREACH, mtu: 0 };
    /// Communication administratively prohibited (NetworkPolicy).
    pub const ADMIN_PROHIBITED: IcmpError =
        IcmpError { icmp_type: ICMP_DEST_UNREACH, code: ICMP_PKT_FILTERED, mtu: 0 };

    /// Fragmentation needed and DF set, with the next hop's MTU.
    #[inline(always)]
    pub const fn fragmentation_needed(mtu: u16) -> IcmpError {
        IcmpError { icmp_type: ICMP_DEST_UNREACH, code: ICMP_FRAG_NEEDED, mtu }
    }

    #[inline(always)]
    const fn type_code(self) -> (u8, u8) {
        (self.icmp_type, self.code)
    }

    /// The second word of the ICMP header: the next-hop MTU, or unused.
    #[inline(always)]
    const fn rest_of_header(self) -> [u8; 4] {
        let mtu = self.mtu.to_be_bytes();
        [0, 0, mtu[0], mtu[1]]
    }
}

/// May an error be sent about this packet? Not where the kernel sends none
/// (RFC 1122 3.2.2): about a later fragment or about another ICMP error;
/// and only option-less headers are quoted (the forwarding checks refuse
/// packets with options before any error is due).
#[inline(always)]
pub fn may_answer(original: &Original) -> bool {
    let ip = &original.ip;
    if ip.version_ihl != IPV4_NO_OPTIONS {
        return false;
    }
    let later_fragment = ip.frag_off() & IP_OFFSET_MASK != 0;
    // Echo, timestamp, ...: queries; these are errors.
    let icmp_type = original.payload[0];
    let about_an_error = ip.protocol == IPPROTO_ICMP
        && matches!(
            icmp_type,
            ICMP_DEST_UNREACH
                | ICMP_SOURCE_QUENCH
                | ICMP_REDIRECT
                | ICMP_TIME_EXCEEDED
                | ICMP_PARAMETER_PROBLEM
        );
    !later_fragment && !about_an_error
}

impl IcmpReply {
    /// Make in `space` the error `error` from `source` to the sender of
    /// `original`, quoting it, with the MACs swapped so that it leaves the
    /// way the original came in. Written into the frame in place, field by
    /// field, and its checksums summed from there: made as a struct of the
    /// header layouts instead, the debug build's programs needed more than
    /// the verifier's million instructions.
    #[inline(always)]
    pub fn make<'a>(
        space: &'a mut MaybeUninit<IcmpReply>,
        original: &Original,
        error: IcmpError,
        source: [u8; 4],
    ) -> &'a IcmpReply {
        let (icmp_type, code) = error.type_code();
        let reply = &mut space.write(IcmpReply([0; REPLY_LEN])).0;
        put(reply, at::ETH_DST, &original.eth.src);
        put(reply, at::ETH_SRC, &original.eth.dst);
        put(reply, at::ETH_PROTO, &ETH_P_IP.to_be_bytes());
        reply[at::IP_VERSION_IHL] = IPV4_NO_OPTIONS;
        reply[at::IP_TOS] = TOS_INTERNETWORK_CONTROL;
        put(reply, at::IP_TOT_LEN, &((REPLY_LEN - ETH_HLEN) as u16).to_be_bytes());
        reply[at::IP_TTL] = REPLY_TTL;
        reply[at::IP_PROTOCOL] = IPPROTO_ICMP;
        put(reply, at::IP_SADDR, &source);
        put(reply, at::IP_DADDR, &original.ip.saddr);
        let check = checksum_of(reply, at::IP, IPV4_MIN_HLEN);
        put(reply, at::IP_CHECK, &check.to_be_bytes());
        reply[at::ICMP_TYPE] = icmp_type;
        reply[at::ICMP_CODE] = code;
        put(reply, at::ICMP_REST, &error.rest_of_header());
        put(reply, at::QUOTED_IP, bytes_of::<_, IPV4_MIN_HLEN>(&original.ip));
        put(reply, at::QUOTED_PAYLOAD, &original.payload);
        let check = checksum_of(reply, at::ICMP, ICMP_ERROR_LEN);
        put(reply, at::ICMP_CHECK, &check.to_be_bytes());
        // SAFETY: written just above.
        unsafe { space.assume_init_ref() }
    }
}

/// Write `bytes` into `frame` at `offset`.
#[inline(always)]
fn put<const N: usize>(frame: &mut [u8; REPLY_LEN], offset: usize, bytes: &[u8; N]) {
    frame[offset..offset + N].copy_from_slice(bytes);
}

/// The bytes of a wire layout (`N` is its size).
#[inline(always)]
fn bytes_of<T: Copy, const N: usize>(value: &T) -> &[u8; N] {
    const { assert!(size_of::<T>() == N) };
    // SAFETY: used on the repr(C) layouts above, made of byte arrays only
    // (alignment 1, no padding), of exactly N bytes.
    unsafe { &*(value as *const T).cast::<[u8; N]>() }
}

#[cfg(test)]
mod tests {
    use datapath_common::{IP_MF, IPPROTO_UDP};

    use super::*;
    use crate::{checksum::checksum, headers::tests::udp_header};

    fn original(ip: Ipv4Hdr, payload: [u8; 8]) -> Original {
        Original {
            eth: EthHdr {
                dst: [2, 0xee, 0, 0, 0, 1],
                src: [2, 0xaa, 0, 0, 0, 1],
                proto: ETH_P_IP.to_be_bytes(),
            },
            ip,
            payload,
        }
    }

    /// UDP 40000 -> 53, as the first 8 bytes after the header.
    const UDP: [u8; 8] = [0x9c, 0x40, 0, 53, 0, 16, 0, 0];

    #[test]
    fn the_reply_quotes_the_original_and_its_checksums_verify() {
        let sent = original(udp_header(36), UDP);
        let node = [192, 0, 2, 1];
        let mut space = MaybeUninit::uninit();
        let reply = IcmpReply::make(&mut space, &sent, IcmpError::fragmentation_needed(1400), node);
        let bytes = &reply.0;
        // Ethernet back where it came from.
        assert_eq!(&bytes[0..6], &sent.eth.src);
        assert_eq!(&bytes[6..12], &sent.eth.dst);
        assert_eq!(&bytes[12..14], &[0x08, 0x00]);
        // IPv4 from the node to the sender, ICMP, 56 bytes, TTL 64.
        assert_eq!(bytes[14], 0x45);
        assert_eq!(bytes[15], 0xc0);
        assert_eq!(u16::from_be_bytes([bytes[16], bytes[17]]), 56);
        assert_eq!(bytes[22], 64);
        assert_eq!(bytes[23], 1);
        assert_eq!(&bytes[26..30], &node);
        assert_eq!(&bytes[30..34], &sent.ip.saddr);
        assert_eq!(checksum::<20>(bytes[14..34].try_into().unwrap()), 0, "IPv4 checksum verifies");
        // ICMP 3/4 with the MTU, then the quote.
        assert_eq!(&bytes[34..36], &[3, 4]);
        assert_eq!(&bytes[38..42], &[0, 0, 0x05, 0x78]);
        assert_eq!(&bytes[42..62], bytes_of::<_, 20>(&sent.ip));
        assert_eq!(&bytes[62..70], &UDP);
        assert_eq!(checksum::<36>(bytes[34..70].try_into().unwrap()), 0, "ICMP checksum verifies");
    }

    #[test]
    fn type_and_code_of_each_error() {
        let sent = original(udp_header(36), UDP);
        for (error, type_code) in [(IcmpError::TIME_EXCEEDED, [11, 0]), (IcmpError::PORT_UNREACHABLE, [3, 3])]
        {
            let mut space = MaybeUninit::uninit();
            let reply = IcmpReply::make(&mut space, &sent, error, [192, 0, 2, 1]);
            assert_eq!(reply.0[34..36], type_code);
            assert_eq!(reply.0[38..42], [0; 4], "unused");
            assert_eq!(checksum::<36>(reply.0[34..70].try_into().unwrap()), 0, "ICMP checksum verifies");
        }
    }

    #[test]
    fn no_error_about_later_fragments_errors_or_options() {
        assert!(may_answer(&original(udp_header(36), UDP)));
        let first_fragment = Ipv4Hdr { frag_off: IP_MF.to_be_bytes(), ..udp_header(36) };
        assert!(may_answer(&original(first_fragment, UDP)));
        let later_fragment = Ipv4Hdr { frag_off: 0x00b9u16.to_be_bytes(), ..udp_header(36) };
        assert!(!may_answer(&original(later_fragment, UDP)));
        let with_options = Ipv4Hdr { version_ihl: 0x46, ..udp_header(36) };
        assert!(!may_answer(&original(with_options, UDP)));
        let icmp = Ipv4Hdr { protocol: IPPROTO_ICMP, ..udp_header(36) };
        for query in [ICMP_ECHO, ICMP_ECHO_REPLY, 13, 14] {
            assert!(may_answer(&original(icmp, [query, 0, 0, 0, 0, 0, 0, 0])), "type {query}");
        }
        for error in [3, 4, 5, 11, 12] {
            assert!(!may_answer(&original(icmp, [error, 0, 0, 0, 0, 0, 0, 0])), "type {error}");
        }
        // The first byte of a UDP payload is no ICMP type.
        let udp = Ipv4Hdr { protocol: IPPROTO_UDP, ..udp_header(36) };
        assert!(may_answer(&original(udp, [3, 0, 0, 0, 0, 0, 0, 0])));
    }
}
