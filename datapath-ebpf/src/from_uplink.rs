//! "From uplink": TC ingress of the node's uplink in native routing mode.
//! Packets for a pod on this node go straight into it (`bpf_redirect_peer`);
//! everything else (the node's own traffic, ARP, VLANs, replies to
//! masqueraded connections) is the host stack's business, untouched.

use aya_ebpf::programs::TcContext;
use datapath_common::{Direction, DropReason};

use crate::{
    forward::{Verdict, apply, to_local_pod},
    packet::{ETH_P_IP, EthHdr, ethertype, ipv4_headers, ptr_at, pull_headers},
};

/// The program; `LOG` selects the debug build (see [`crate::programs!`]).
#[inline(always)]
pub fn run<const LOG: bool>(ctx: TcContext) -> i32 {
    let verdict = classify(&ctx);
    apply::<LOG>(&ctx, Direction::FromUplink, verdict)
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Result<Verdict, DropReason> {
    pull_headers(ctx);
    let eth: *mut EthHdr = match ptr_at(ctx, 0) {
        Some(eth) => eth,
        None => return Ok(Verdict::HostStack),
    };
    if ethertype(eth) != ETH_P_IP {
        return Ok(Verdict::HostStack);
    }
    // A header we cannot read is not for a pod of ours: the stack decides.
    let (eth, ip) = match ipv4_headers(ctx) {
        Ok(headers) => headers,
        Err(_) => return Ok(Verdict::HostStack),
    };
    // SAFETY: bounds-checked by ipv4_headers.
    let daddr = unsafe { (*ip).daddr };
    match to_local_pod(eth, ip, daddr) {
        Some(verdict) => verdict,
        None => Ok(Verdict::HostStack),
    }
}
