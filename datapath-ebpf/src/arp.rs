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

#[cfg(test)]
mod tests {
    use super::*;

    const POD: [u8; 4] = [10, 244, 1, 2];
    const POD_MAC: [u8; 6] = [2, 0xaa, 0, 0, 0, 2];
    const HOST_MAC: [u8; 6] = [2, 0xee, 0, 0, 0, 2];
    const GATEWAY: [u8; 4] = [169, 254, 1, 1];

    fn request(sender: [u8; 4], target: [u8; 4]) -> (EthHdr, ArpEthIpv4) {
        let eth = EthHdr { dst: [0xff; 6], src: POD_MAC, proto: datapath_common::ETH_P_ARP.to_be_bytes() };
        let arp = ArpEthIpv4 {
            htype: ARPHRD_ETHER.to_be_bytes(),
            ptype: ETH_P_IP.to_be_bytes(),
            hlen: 6,
            plen: 4,
            oper: ARP_REQUEST.to_be_bytes(),
            sha: POD_MAC,
            spa: sender,
            tha: [0; 6],
            tpa: target,
        };
        (eth, arp)
    }

    #[test]
    fn the_gateway_is_answered_with_the_host_mac() {
        let (mut eth, mut arp) = request(POD, GATEWAY);
        assert_eq!(answer(&mut eth, &mut arp, POD, HOST_MAC), Ok(ArpOutcome::Replied));
        assert_eq!((eth.dst, eth.src), (POD_MAC, HOST_MAC));
        assert_eq!(u16::from_be_bytes(arp.oper), ARP_REPLY);
        assert_eq!((arp.sha, arp.spa), (HOST_MAC, GATEWAY));
        assert_eq!((arp.tha, arp.tpa), (POD_MAC, POD));
    }

    #[test]
    fn what_is_not_ours_is_left_alone() {
        // A request for the pod's own address, a probe, a reply.
        let (mut eth, mut arp) = request(POD, POD);
        let before = (eth, arp);
        assert_eq!(answer(&mut eth, &mut arp, POD, HOST_MAC), Ok(ArpOutcome::NotOurs));
        assert_eq!((eth, arp), before);
        let (mut eth, mut arp) = request([0; 4], GATEWAY);
        assert_eq!(answer(&mut eth, &mut arp, POD, HOST_MAC), Ok(ArpOutcome::NotOurs));
        let (mut eth, mut arp) = request(POD, GATEWAY);
        arp.oper = ARP_REPLY.to_be_bytes();
        assert_eq!(answer(&mut eth, &mut arp, POD, HOST_MAC), Ok(ArpOutcome::NotOurs));
    }

    #[test]
    fn spoofed_and_malformed_arp_is_refused() {
        let (mut eth, mut arp) = request([10, 244, 1, 3], GATEWAY);
        assert_eq!(answer(&mut eth, &mut arp, POD, HOST_MAC), Err(DropReason::SpoofedArp));
        let (mut eth, mut arp) = request(POD, GATEWAY);
        arp.hlen = 8;
        assert_eq!(answer(&mut eth, &mut arp, POD, HOST_MAC), Err(DropReason::MalformedArp));
        let (mut eth, mut arp) = request(POD, GATEWAY);
        arp.ptype = 0x86ddu16.to_be_bytes();
        assert_eq!(answer(&mut eth, &mut arp, POD, HOST_MAC), Err(DropReason::MalformedArp));
    }
}
