//! "From uplink": TC ingress of the node's uplink in native routing mode.
//! Packets for a pod on this node go straight into it (`bpf_redirect_peer`);
//! everything else (the node's own traffic, ARP, VLANs, replies to
//! masqueraded connections) is the host stack's business, untouched.

use aya_ebpf::programs::TcContext;
use datapath_common::{Direction, DropReason, NODE_FLAG_SERVICES};

use crate::{
    forward::{Verdict, apply, to_local_pod},
    maps::node_config,
    packet::{ETH_P_IP, EthHdr, ethertype, ipv4_headers, ptr_at, pull_headers},
    services::{Translation, translate},
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
    let (mut eth, mut ip) = match ipv4_headers(ctx) {
        Ok(headers) => headers,
        Err(_) => return Ok(Verdict::HostStack),
    };
    // Replies of Service connections opened by pods on this node.
    if node_config().flags & NODE_FLAG_SERVICES != 0 {
        if let Translation::Rewritten = translate(ctx, ip, false)? {
            (eth, ip) = ipv4_headers(ctx)?;
        }
    }
    // SAFETY: bounds-checked by ipv4_headers.
    let daddr = unsafe { (*ip).daddr };
    match to_local_pod(eth, ip, daddr) {
        Some(verdict) => verdict,
        None => Ok(Verdict::HostStack),
    }
}
