//! The packet a program runs on, and typed views of its headers.
//!
//! Direct packet access hands out pointers into the linear data, and the
//! helpers that may move or resize that data (pull, store, checksum
//! replace, change tail) invalidate every one of them: the verifier
//! rejects a program that uses one afterwards. Here the compiler does: the
//! views borrow the [`Packet`] and those helpers take it `&mut`, so a view
//! taken before them cannot be used after them; it must be taken again.
//! Everything else (reads, copies out with `bpf_skb_load_bytes`, helpers
//! that leave the data alone) takes `&self`. All of it inlines away: a
//! view is the pointers the code would hold anyway.

use core::marker::PhantomData;

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_CURRENT_NETNS, bpf_fib_lookup, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_tunnel_key,
    },
    helpers::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_get_hash_recalc, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skb_change_tail, bpf_skb_change_type, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
        bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};
use datapath_common::{DropReason, IPPROTO_TCP};

use crate::headers::{ArpEthIpv4, ETH_HLEN, EthHdr, Ipv4Hdr, MAX_HEADER_BYTES};

/// Address family of IPv4, for the helpers that take one.
pub const AF_INET: u8 = 2;
/// `skb->pkt_type` of a frame addressed to this host's MAC.
pub const PACKET_HOST: u32 = 0;

/// The packet (socket buffer) a program runs on.
pub struct Packet {
    ctx: TcContext,
}

impl Packet {
    #[inline(always)]
    pub fn new(ctx: TcContext) -> Packet {
        Packet { ctx }
    }

    #[inline(always)]
    fn skb(&self) -> *mut __sk_buff {
        self.ctx.skb.skb
    }

    /// The packet's flow hash (`skb->hash`, computed from its addresses and
    /// ports with the kernel's secret seed if nothing set it): the same for
    /// every packet of a flow, so a choice made from it is made again for a
    /// later packet of the same flow; not guessable from outside.
    #[inline(always)]
    pub fn flow_hash(&self) -> u32 {
        // SAFETY: a helper taking the context.
        unsafe { bpf_get_hash_recalc(self.skb()) }
    }

    /// Does this namespace's stack hold a socket that a packet `saddr:sport
    /// -> daddr:dport` of `protocol` (TCP or UDP) would reach: a TCP
    /// connection (also in time-wait or half-open) or listener, a bound
    /// UDP socket? The namespace is the packet's device's.
    #[inline(always)]
    pub fn host_socket_for(
        &self,
        protocol: u8,
        saddr: [u8; 4],
        daddr: [u8; 4],
        sport: [u8; 2],
        dport: [u8; 2],
    ) -> bool {
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: u32::from_ne_bytes(saddr),
                    daddr: u32::from_ne_bytes(daddr),
                    sport: u16::from_ne_bytes(sport),
                    dport: u16::from_ne_bytes(dport),
                },
            },
        };
        let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
        // (A negative netns id: the packet's own namespace.)
        let netns = BPF_F_CURRENT_NETNS as i64 as u64;
        // SAFETY: the context pointer the kernel handed us and a tuple on
        // the stack of the size given; a socket found is released at once.
        unsafe {
            let sock = if protocol == IPPROTO_TCP {
                bpf_skc_lookup_tcp(self.skb().cast(), &mut tuple, size, netns, 0)
            } else {
                bpf_sk_lookup_udp(self.skb().cast(), &mut tuple, size, netns, 0)
            };
            if sock.is_null() {
                return false;
            }
            bpf_sk_release(sock.cast());
        }
        true
    }

    /// Length of the whole packet, linear or not.
    #[inline(always)]
    pub fn frame_len(&self) -> u32 {
        self.ctx.len()
    }

    /// The interface the packet arrived on.
    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer the kernel handed us.
        unsafe { (*self.skb()).ifindex }
    }

    /// The interface the packet entered this node on (`skb_iif`): zero
    /// for a packet the node made itself. On TC egress it differs from
    /// [`Packet::ifindex`].
    #[inline(always)]
    pub fn ingress_ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb()).ingress_ifindex }
    }

    /// `PACKET_HOST`, broadcast, multicast, another host's: from the
    /// destination MAC.
    #[inline(always)]
    pub fn pkt_type(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb()).pkt_type }
    }

    /// The VLAN tag the device took out of the frame, if any (present,
    /// tag control information).
    #[inline(always)]
    pub fn vlan(&self) -> (u32, u32) {
        // SAFETY: as above.
        unsafe { ((*self.skb()).vlan_present, (*self.skb()).vlan_tci) }
    }

    /// Copy a `T` out of the packet at `offset` (`bpf_skb_load_bytes`:
    /// any offset, linear or not); `None` past its end.
    #[inline(always)]
    pub fn load<T>(&self, offset: usize) -> Option<T> {
        self.ctx.load::<T>(offset).ok()
    }

    /// Copy the packet's bytes at `offset` into `dst` (any offset, linear
    /// or not), without a copy on the stack; `None` past its end.
    #[inline(always)]
    pub fn load_into<T>(&self, offset: usize, dst: &mut T) -> Option<()> {
        // The exact size, a constant: the verifier refuses a length that
        // may be zero (which aya's `load_bytes` clamps to).
        // SAFETY: `dst` is `size_of::<T>()` writable bytes, written whole or
        // not at all (the callers' `T`s are byte arrays: any bytes valid).
        let rc = unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                self.skb().cast(),
                offset as u32,
                (dst as *mut T).cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        (rc == 0).then_some(())
    }

    /// Copy a `T` out of the linear data at `offset`, bounds-checked
    /// (direct access: cheaper than [`Packet::load`], linear data only).
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: bounds-checked; copied out at once.
        self.ptr_at::<T>(offset).map(|p| unsafe { *p })
    }

    /// A `T` at `offset` in the linear data, to read and write in place
    /// (direct access, bounds-checked; no copy on the stack). A helper
    /// that moves the data ends the view (it borrows the packet).
    #[inline(always)]
    pub fn view_mut<T>(&mut self, offset: usize) -> Option<&mut T> {
        // SAFETY: bounds-checked; the borrow of `self` keeps helpers away.
        self.ptr_at::<T>(offset).map(|p| unsafe { &mut *p })
    }

    /// A pointer to a `T` at `offset` in the linear data (bounds-checked),
    /// for two disjoint places at once; valid until a helper moves the data.
    #[inline(always)]
    pub fn ptr_mut<T>(&mut self, offset: usize) -> Option<*mut T> {
        self.ptr_at::<T>(offset)
    }

    /// The Ethernet type, if the frame has a whole Ethernet header.
    #[inline(always)]
    pub fn ethertype(&self) -> Option<u16> {
        self.read::<EthHdr>(0).map(|eth| eth.ethertype())
    }

    /// Pointer to a `T` at `offset` in the linear data, or `None` if it
    /// would run past `data_end`.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let start = self.ctx.data();
        if start + offset + core::mem::size_of::<T>() > self.ctx.data_end() {
            return None;
        }
        Some((start + offset) as *mut T)
    }

    /// Make the headers linear so that direct packet access sees them.
    /// Headers of veth traffic are normally linear already, so this rarely
    /// pulls. On failure the views below are simply refused: a named drop.
    #[inline(always)]
    pub fn pull_headers(&mut self) {
        let len = self.ctx.len();
        let want = if len < MAX_HEADER_BYTES { len } else { MAX_HEADER_BYTES };
        if self.ctx.data() + want as usize > self.ctx.data_end() {
            let _ = self.ctx.pull_data(want);
        }
    }

    /// The Ethernet and IPv4 headers, bounds-checked and validated (call
    /// after [`Packet::pull_headers`]); `Err` names why they are unusable.
    #[inline(always)]
    pub fn ipv4(&mut self) -> Result<Ipv4Headers<'_>, DropReason> {
        let eth: *mut EthHdr = self.ptr_at(0).ok_or(DropReason::TruncatedEthernet)?;
        let ip: *mut Ipv4Hdr = self.ptr_at(ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
        // SAFETY: bounds-checked just above.
        unsafe { (*ip).check_lengths(self.frame_len())? };
        Ok(Ipv4Headers { eth, ip, packet: self, _borrow: PhantomData })
    }

    /// The Ethernet header and the Ethernet/IPv4 ARP body that follows it.
    #[inline(always)]
    pub fn arp(&mut self) -> Result<ArpHeaders<'_>, DropReason> {
        let eth: *mut EthHdr = self.ptr_at(0).ok_or(DropReason::TruncatedEthernet)?;
        let arp: *mut ArpEthIpv4 = self.ptr_at(ETH_HLEN).ok_or(DropReason::MalformedArp)?;
        Ok(ArpHeaders { eth, arp, _borrow: PhantomData })
    }

    /// Write `value` at `offset`. Moves the data: views must be taken again.
    #[inline(always)]
    pub fn store<T>(&mut self, offset: usize, value: &T) -> Result<(), DropReason> {
        self.ctx.store(offset, value, 0).map_err(|_| DropReason::NatRewriteFailed)
    }

    /// Fix the IPv4 header checksum at `offset` for a change of `from` to
    /// `to` (`size` bytes; values as they sit in the packet). Moves the data.
    #[inline(always)]
    pub fn l3_csum_replace(
        &mut self,
        offset: usize,
        from: u64,
        to: u64,
        size: u64,
    ) -> Result<(), DropReason> {
        self.ctx.l3_csum_replace(offset, from, to, size).map_err(|_| DropReason::NatRewriteFailed)
    }

    /// Fix the TCP/UDP checksum at `offset` (`flags`: the size and how,
    /// see `bpf_l4_csum_replace`). Moves the data.
    #[inline(always)]
    pub fn l4_csum_replace(
        &mut self,
        offset: usize,
        from: u64,
        to: u64,
        flags: u64,
    ) -> Result<(), DropReason> {
        self.ctx.l4_csum_replace(offset, from, to, flags).map_err(|_| DropReason::NatRewriteFailed)
    }

    /// Replace the whole packet with `frame`. Moves the data.
    #[inline(always)]
    pub fn replace_with<T>(&mut self, frame: &T) -> Result<(), DropReason> {
        // SAFETY: plain helper on the context pointer.
        let rc = unsafe { bpf_skb_change_tail(self.skb(), core::mem::size_of::<T>() as u32, 0) };
        if rc != 0 {
            return Err(DropReason::NatRewriteFailed);
        }
        self.store(0, frame)
    }

    /// Mark the frame as addressed to this host (`PACKET_HOST`).
    #[inline(always)]
    pub fn set_pkt_type_host(&self) {
        // SAFETY: plain helper on the context pointer; it cannot fail for
        // PACKET_HOST on a packet that is not a loopback one.
        unsafe { bpf_skb_change_type(self.skb(), PACKET_HOST) };
    }

    /// The tunnel metadata of a packet from the collect_md VXLAN device.
    #[inline(always)]
    pub fn tunnel_key(&self) -> Option<bpf_tunnel_key> {
        // SAFETY: all-zero is a valid bpf_tunnel_key; the helper fills it.
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        // SAFETY: plain helper with a writable key of its size.
        let rc = unsafe {
            bpf_skb_get_tunnel_key(self.skb(), &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0)
        };
        (rc == 0).then_some(key)
    }

    /// Give the packet the tunnel metadata that sends it to `node_ipv4`
    /// with `vni`, once redirected into the collect_md VXLAN device.
    #[inline(always)]
    pub fn set_tunnel_key(&self, node_ipv4: [u8; 4], vni: u32) -> Result<(), DropReason> {
        // SAFETY: all-zero is a valid bpf_tunnel_key.
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        key.tunnel_id = vni;
        // The helper takes the outer destination in host byte order.
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node_ipv4);
        key.tunnel_ttl = 64;
        // SAFETY: plain helper with a valid key of its size.
        let rc = unsafe {
            bpf_skb_set_tunnel_key(self.skb(), &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0)
        };
        if rc != 0 {
            return Err(DropReason::TunnelEncapFailed);
        }
        Ok(())
    }

    /// `bpf_fib_lookup` for this packet; returns the helper's result.
    #[inline(always)]
    pub fn fib_lookup(&self, params: &mut bpf_fib_lookup, flags: u32) -> i64 {
        // SAFETY: plain helper; params is a valid, writable struct of its size.
        unsafe { fib_lookup(self.skb().cast(), params, core::mem::size_of::<bpf_fib_lookup>() as i32, flags) }
    }

    /// `bpf_check_mtu` of this packet against `ifindex`; returns the
    /// helper's result, and the MTU in `mtu`.
    #[inline(always)]
    pub fn check_mtu(&self, ifindex: u32, mtu: &mut u32, flags: u64) -> i64 {
        // SAFETY: plain helper on the context pointer; mtu is writable.
        unsafe { bpf_check_mtu(self.skb().cast(), ifindex, mtu, 0, flags) }
    }
}

// The views hold raw pointers where references would do, for the
// verifier: a reference has a niche (it is never null), which lets a
// `Result<view, DropReason>` keep the reason in a pointer's place, and
// LLVM then spills that pointer as a 32-bit value, which the verifier
// refuses. The references are handed out by the methods instead.

/// The Ethernet and IPv4 headers of a packet, bounds-checked and
/// validated, borrowed from it: while the view lives no helper can move
/// the data under it. [`Ipv4Headers::packet`] reads the rest of the packet
/// meanwhile; [`Ipv4Headers::into_packet`] ends the view to change it.
pub struct Ipv4Headers<'a> {
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    packet: *mut Packet,
    _borrow: PhantomData<&'a mut Packet>,
}

impl<'a> Ipv4Headers<'a> {
    #[inline(always)]
    pub fn ip(&self) -> &Ipv4Hdr {
        // SAFETY: bounds-checked when the view was made; the data cannot
        // have moved since (the view borrows the packet).
        unsafe { &*self.ip }
    }

    #[inline(always)]
    pub fn ip_mut(&mut self) -> &mut Ipv4Hdr {
        // SAFETY: as above; `&mut self` makes it the only reference.
        unsafe { &mut *self.ip }
    }

    #[inline(always)]
    pub fn eth_mut(&mut self) -> &mut EthHdr {
        // SAFETY: as above; the Ethernet header does not overlap the IPv4 one.
        unsafe { &mut *self.eth }
    }

    /// The packet, for reads and for the helpers that leave its data alone
    /// (borrowed from the view: not while a header is borrowed mutably).
    #[inline(always)]
    pub fn packet(&self) -> &Packet {
        // SAFETY: made from the `&'a mut Packet` the view borrows; shared
        // while the view is.
        unsafe { &*self.packet }
    }

    /// End the view and have the packet back, to change it with the
    /// helpers that move its data.
    #[inline(always)]
    pub fn into_packet(self) -> &'a mut Packet {
        // SAFETY: the `&'a mut Packet` the view was made from; the view,
        // and every reference it handed out, ends here.
        unsafe { &mut *self.packet }
    }
}

/// The Ethernet header and the ARP body of a packet, bounds-checked,
/// borrowed from it.
pub struct ArpHeaders<'a> {
    eth: *mut EthHdr,
    arp: *mut ArpEthIpv4,
    _borrow: PhantomData<&'a mut Packet>,
}

impl ArpHeaders<'_> {
    /// Both, to rewrite the request into a reply.
    #[inline(always)]
    pub fn both_mut(&mut self) -> (&mut EthHdr, &mut ArpEthIpv4) {
        // SAFETY: bounds-checked when the view was made, the data cannot
        // have moved since; the two do not overlap.
        unsafe { (&mut *self.eth, &mut *self.arp) }
    }
}
