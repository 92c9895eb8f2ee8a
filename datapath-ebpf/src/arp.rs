//! The pod's ARP: every address but its own is answered with the host
//! veth's MAC. The pod has a /32 and a default route via a link-local
//! gateway, so all its traffic comes to us without proxy_arp, a bridge or
//! static neighbours.

use datapath_common::{DropReason, ETH_P_IP};

use crate::headers::{ARP_REPLY, ARP_REQUEST, ARPHRD_ETHER, ArpEthIpv4, EthHdr, same_ipv4};

/// What [`answer`] made of an ARP packet from a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpOutcome {
    /// The frame is now the reply: send it back to the pod.
    Replied,
    /// Not for us to answer (replies to the node's own ARP, which node to
    /// pod traffic needs; probes; gratuitous ARP; a request for the pod's
    /// own address): the host stack's.
    NotOurs,
}

/// Answer the ARP request in `eth` + `arp` from the pod with address
/// `pod_ipv4`, in place, with `host_mac` (the host veth's); refuse ARP that
/// is malformed or claims another address.
#[inline(always)]
pub fn answer(
    eth: &mut EthHdr,
    arp: &mut ArpEthIpv4,
    pod_ipv4: [u8; 4],
    host_mac: [u8; 6],
) -> Result<ArpOutcome, DropReason> {
    let (htype, ptype) = (u16::from_be_bytes(arp.htype), u16::from_be_bytes(arp.ptype));
    if htype != ARPHRD_ETHER || ptype != ETH_P_IP || arp.hlen != 6 || arp.plen != 4 {
        return Err(DropReason::MalformedArp);
    }
    let sender_ip = arp.spa;
    let sender_is_pod = same_ipv4(sender_ip, pod_ipv4);
    // 0.0.0.0 is a duplicate-address probe (RFC 5227): harmless, let it pass.
    if !sender_is_pod && u32::from_ne_bytes(sender_ip) != 0 {
        return Err(DropReason::SpoofedArp);
    }
    let target_ip = arp.tpa;
    if u16::from_be_bytes(arp.oper) != ARP_REQUEST || !sender_is_pod || same_ipv4(target_ip, pod_ipv4) {
        return Ok(ArpOutcome::NotOurs);
    }
    let requester_mac = arp.sha;
    eth.dst = requester_mac;
    eth.src = host_mac;
    arp.oper = ARP_REPLY.to_be_bytes();
    arp.tha = requester_mac;
    arp.tpa = sender_ip;
    arp.sha = host_mac;
    arp.spa = target_ip;
    Ok(ArpOutcome::Replied)
}
