//! The headers the programs read and write, as they sit in the packet
//! (multi-byte fields as big-endian byte arrays), and what can be said of
//! them without the kernel: the checks, the TTL. [`crate::packet`] hands
//! them out, bounds-checked, from a live packet.

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
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
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
#[derive(Clone, Copy)]
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
#[derive(Clone, Copy)]
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
        // SAFETY: the header is 20 bytes of plain data, read as words,
        // which the verifier allows at any packet offset on this
        // architecture (an unaligned read would be split into byte loads).
        unsafe { *words }
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
