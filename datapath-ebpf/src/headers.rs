//! The headers the programs read and write, as they sit in the packet
//! (multi-byte fields as big-endian byte arrays), and what can be said of
//! them without the kernel: the checks, the TTL. `crate::packet` (BPF
//! only) hands them out, bounds-checked, from a live packet.

use core::mem::size_of;

use datapath_common::DropReason;

use crate::checksum::{csum_replace16, ipv4_header_verifies};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPV4_MIN_HLEN: usize = 20;
/// Version 4, a five-word header: no options.
pub const IPV4_NO_OPTIONS: u8 = 0x45;
/// ARP hardware type Ethernet.
pub const ARPHRD_ETHER: u16 = 1;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
/// Longest header prefix any program reads: Ethernet + IPv4 with options.
pub const MAX_HEADER_BYTES: u32 = (ETH_HLEN + 60) as u32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// Ethernet/IPv4 ARP (RFC 826) as it follows the Ethernet header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpEthIpv4 {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

/// The ICMP header (RFC 792): type, code, checksum, then four bytes whose
/// meaning depends on the type (unused, or the next-hop MTU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

// Layouts as on the wire: byte arrays only (alignment 1), no padding.
const _: () = assert!(size_of::<EthHdr>() == ETH_HLEN);
const _: () = assert!(size_of::<Ipv4Hdr>() == IPV4_MIN_HLEN);
const _: () = assert!(size_of::<ArpEthIpv4>() == 28);
const _: () = assert!(size_of::<IcmpHdr>() == 8);

impl EthHdr {
    #[inline(always)]
    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes(self.proto)
    }
}

impl Ipv4Hdr {
    /// The header's length in bytes, from its IHL.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }

    /// The header of an IPv4 packet whose frame is `frame_len` bytes long:
    /// version 4, at least five words, a total length that covers the
    /// header and fits the frame.
    #[inline(always)]
    pub fn check_lengths(&self, frame_len: u32) -> Result<(), DropReason> {
        let header_len = self.header_len();
        if self.version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
            return Err(DropReason::MalformedIpv4);
        }
        let total_len = u16::from_be_bytes(self.tot_len) as usize;
        let frame_l3_len = (frame_len as usize).saturating_sub(ETH_HLEN);
        if total_len < header_len || total_len > frame_l3_len {
            return Err(DropReason::MalformedIpv4);
        }
        Ok(())
    }

    /// What `ip_rcv_core` and `ip_forward` check of the header itself: no
    /// options (not forwarded by us), a checksum that verifies.
    #[inline(always)]
    pub fn check_forwardable(&self) -> Result<(), DropReason> {
        if self.version_ihl != IPV4_NO_OPTIONS {
            return Err(DropReason::IpOptions);
        }
        if !ipv4_header_verifies(self.words()) {
            return Err(DropReason::BadIpChecksum);
        }
        Ok(())
    }

    /// The header as five 32-bit words in native order.
    #[inline(always)]
    fn words(&self) -> [u32; 5] {
        let words = (self as *const Self).cast::<[u32; 5]>();
        // SAFETY: the header is 20 bytes of plain data. The BPF build reads
        // it as words, which the verifier allows at any packet offset on
        // this architecture (an unaligned read would be split into byte
        // loads); elsewhere (tests) it makes no assumption about alignment.
        #[cfg(target_arch = "bpf")]
        let words = unsafe { *words };
        #[cfg(not(target_arch = "bpf"))]
        // SAFETY: `self` is a valid 20-byte header; the read makes no
        // alignment assumption.
        let words = unsafe { words.read_unaligned() };
        words
    }

    /// Does the TTL run out here (it would reach 0 when forwarded)?
    #[inline(always)]
    pub fn ttl_expires(&self) -> bool {
        self.ttl <= 1
    }

    /// We route, so we own the TTL: nothing downstream decrements it for
    /// us. The checksum follows incrementally.
    #[inline(always)]
    pub fn decrement_ttl(&mut self) -> Result<(), DropReason> {
        let ttl = self.ttl;
        if ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        let old_word = u16::from_be_bytes([ttl, self.protocol]);
        let new_word = u16::from_be_bytes([ttl - 1, self.protocol]);
        self.ttl = ttl - 1;
        self.check = csum_replace16(u16::from_be_bytes(self.check), old_word, new_word).to_be_bytes();
        Ok(())
    }

    /// The flags and fragment offset, as read big-endian.
    #[inline(always)]
    pub fn frag_off(&self) -> u16 {
        u16::from_be_bytes(self.frag_off)
    }
}

/// Are two IPv4 addresses the same? (One comparison, not four.)
#[inline(always)]
pub fn same_ipv4(a: [u8; 4], b: [u8; 4]) -> bool {
    u32::from_ne_bytes(a) == u32::from_ne_bytes(b)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checksum::checksum;

    /// A valid option-less header: UDP 10.244.1.2 -> 10.244.2.3, TTL 64.
    pub(crate) fn udp_header(total_len: u16) -> Ipv4Hdr {
        let mut ip = Ipv4Hdr {
            version_ihl: IPV4_NO_OPTIONS,
            tos: 0,
            tot_len: total_len.to_be_bytes(),
            id: [0x12, 0x34],
            frag_off: [0x40, 0],
            ttl: 64,
            protocol: datapath_common::IPPROTO_UDP,
            check: [0; 2],
            saddr: [10, 244, 1, 2],
            daddr: [10, 244, 2, 3],
        };
        ip.check = checksum(&to_bytes(ip)).to_be_bytes();
        ip
    }

    fn from_bytes(bytes: [u8; 20]) -> Ipv4Hdr {
        // SAFETY: plain data of this size, any bits valid.
        unsafe { core::mem::transmute(bytes) }
    }

    fn to_bytes(ip: Ipv4Hdr) -> [u8; 20] {
        // SAFETY: as above.
        unsafe { core::mem::transmute(ip) }
    }

    /// What `ip_rcv_core` accepts as to lengths, case by case: (version and
    /// IHL, total length, frame length including Ethernet, accepted).
    #[test]
    fn header_and_total_lengths_accepted_as_the_kernel_does() {
        let cases: [(u8, u16, u32, bool); 15] = [
            (0x45, 20, 34, true),     // a bare header, nothing after it
            (0x45, 1500, 1514, true), // a full frame
            (0x45, 28, 60, true),     // Ethernet padding after the datagram
            (0x4f, 60, 74, true),     // the longest header
            (0x4f, 60, 73, false),    // ... one byte short of its frame
            (0x46, 24, 100, true),    // options
            (0x46, 23, 100, false),   // total length inside the header
            (0x45, 19, 100, false),   // total length shorter than any header
            (0x45, 0, 100, false),    // a zero total length
            (0x45, 86, 100, true),    // exactly the frame
            (0x45, 87, 100, false),   // one byte longer than the frame
            (0x44, 20, 100, false),   // IHL 4: shorter than the fixed part
            (0x40, 20, 100, false),   // IHL 0
            (0x65, 20, 100, false),   // IPv6's version
            (0x05, 20, 100, false),   // no version
        ];
        for (version_ihl, total_len, frame_len, accepted) in cases {
            let ip = Ipv4Hdr { version_ihl, tot_len: total_len.to_be_bytes(), ..udp_header(20) };
            let expected = if accepted { Ok(()) } else { Err(DropReason::MalformedIpv4) };
            assert_eq!(ip.check_lengths(frame_len), expected, "{version_ihl:#x} {total_len} {frame_len}");
        }
        // Shorter than Ethernet: no room for any datagram.
        assert_eq!(udp_header(20).check_lengths(10), Err(DropReason::MalformedIpv4));
    }

    /// On random headers, the TTL decremented in place leaves a header
    /// whose checksum is what a full sum gives.
    #[test]
    fn ttl_decrement_matches_a_full_sum_on_random_headers() {
        let mut random = crate::checksum::tests::Random::new(0x77_1e);
        for _ in 0..100_000 {
            let mut ip = from_bytes(random.ipv4_header());
            ip.ttl = 2 + random.below(254) as u8;
            ip.check = [0; 2];
            ip.check = checksum(&to_bytes(ip)).to_be_bytes();
            let ttl = ip.ttl;
            ip.decrement_ttl().unwrap();
            assert_eq!(ip.ttl, ttl - 1);
            let mut recomputed = ip;
            recomputed.check = [0; 2];
            assert_eq!(ip.check, checksum(&to_bytes(recomputed)).to_be_bytes(), "{ip:02x?}");
            assert_eq!(ip.check_forwardable(), Ok(()));
        }
    }

    #[test]
    fn lengths_are_checked_against_the_frame() {
        let ip = udp_header(28);
        assert_eq!(ip.check_lengths((ETH_HLEN + 28) as u32), Ok(()));
        // Ethernet padding after the datagram is fine.
        assert_eq!(ip.check_lengths(60), Ok(()));
        assert_eq!(ip.check_lengths((ETH_HLEN + 27) as u32), Err(DropReason::MalformedIpv4));
        let short = udp_header(19);
        assert_eq!(short.check_lengths(100), Err(DropReason::MalformedIpv4));
        for version_ihl in [0x44, 0x65, 0x40] {
            let ip = Ipv4Hdr { version_ihl, ..udp_header(28) };
            assert_eq!(ip.check_lengths(100), Err(DropReason::MalformedIpv4), "{version_ihl:#x}");
        }
        // Options are a length, not an error, here.
        let with_options = Ipv4Hdr { version_ihl: 0x46, ..udp_header(28) };
        assert_eq!(with_options.check_lengths(100), Ok(()));
        assert_eq!(with_options.header_len(), 24);
    }

    #[test]
    fn forwardable_headers_have_no_options_and_a_good_checksum() {
        let ip = udp_header(28);
        assert_eq!(ip.check_forwardable(), Ok(()));
        let with_options = Ipv4Hdr { version_ihl: 0x46, ..ip };
        assert_eq!(with_options.check_forwardable(), Err(DropReason::IpOptions));
        let corrupted = Ipv4Hdr { daddr: [10, 244, 2, 4], ..ip };
        assert_eq!(corrupted.check_forwardable(), Err(DropReason::BadIpChecksum));
    }

    #[test]
    fn ttl_is_decremented_with_its_checksum() {
        let mut ip = udp_header(28);
        assert!(!ip.ttl_expires());
        ip.decrement_ttl().unwrap();
        assert_eq!(ip.ttl, 63);
        assert_eq!(ip.check_forwardable(), Ok(()), "checksum still verifies");
        for ttl in [0, 1] {
            let mut expiring = udp_header(28);
            expiring.ttl = ttl;
            assert!(expiring.ttl_expires());
            assert_eq!(expiring.decrement_ttl(), Err(DropReason::TtlExceeded));
            assert_eq!(expiring.ttl, ttl, "left alone");
        }
    }

    #[test]
    fn addresses_compare_as_a_whole() {
        assert!(same_ipv4([10, 0, 0, 1], [10, 0, 0, 1]));
        assert!(!same_ipv4([10, 0, 0, 1], [1, 0, 0, 10]));
    }
}
