//! Header layouts and bounds-checked access to the linear packet data.

use aya_ebpf::{bindings::bpf_tunnel_key, helpers::bpf_skb_set_tunnel_key, programs::TcContext};
use datapath_common::DropReason;

/// Address family of IPv4, for the helpers that take one.
pub const AF_INET: u8 = 2;
/// `skb->pkt_type` of a frame addressed to this host's MAC.
pub const PACKET_HOST: u32 = 0;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub proto: [u8; 2],
}

#[repr(C)]
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
pub const IPV4_MIN_HLEN: usize = 20;

/// Ethernet/IPv4 ARP (RFC 826) as it follows the Ethernet header.
#[repr(C)]
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
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// Longest header prefix any program reads: Ethernet + IPv4 with options.
pub const MAX_HEADER_BYTES: u32 = (ETH_HLEN + 60) as u32;

/// Make the headers linear so that direct packet access sees them. Called
/// once, before any packet pointer is taken: a pull invalidates them all.
/// Headers of veth traffic are normally linear already, so this rarely pulls.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    let want = if ctx.len() < MAX_HEADER_BYTES { ctx.len() } else { MAX_HEADER_BYTES };
    if ctx.data() + want as usize > ctx.data_end() {
        // On failure the bounds checks below simply fail: a named drop.
        let _ = ctx.pull_data(want);
    }
}

/// Pointer to a `T` at `offset` in the linear data, or `None` if it would run
/// past `data_end`.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// RFC 1624 incremental update of a ones'-complement checksum for one 16-bit
/// word changing from `old` to `new` (all values as read big-endian).
#[inline(always)]
pub fn csum_replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum: u32 = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Bounds-checked, validated Ethernet + IPv4 headers of the current frame
/// (call after [`pull_headers`]); `Err` names why the header is unusable.
#[inline(always)]
pub fn ipv4_headers(ctx: &TcContext) -> Result<(*mut EthHdr, *mut Ipv4Hdr), DropReason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
    // SAFETY: bounds-checked by ptr_at.
    let version_ihl = unsafe { (*ip).version_ihl };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return Err(DropReason::MalformedIpv4);
    }
    let total_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    let frame_l3_len = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    if total_len < header_len || total_len > frame_l3_len {
        return Err(DropReason::MalformedIpv4);
    }
    Ok((eth, ip))
}

#[inline(always)]
pub fn same_ipv4(a: [u8; 4], b: [u8; 4]) -> bool {
    u32::from_ne_bytes(a) == u32::from_ne_bytes(b)
}

#[inline(always)]
pub fn ethertype(eth: *const EthHdr) -> u16 {
    // SAFETY: callers pass a bounds-checked pointer.
    u16::from_be_bytes(unsafe { (*eth).proto })
}

/// Give the packet the tunnel metadata that sends it to `node_ipv4` with
/// `vni`, once redirected into the collect_md VXLAN device. Leaves the
/// packet data alone.
#[inline(always)]
pub fn set_tunnel_key(ctx: &TcContext, node_ipv4: [u8; 4], vni: u32) -> Result<(), DropReason> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // The helper takes the outer destination in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node_ipv4);
    key.tunnel_ttl = 64;
    // SAFETY: plain helper with a valid key of its size.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc != 0 {
        return Err(DropReason::TunnelEncapFailed);
    }
    Ok(())
}
