//! Each client's unanswered connections (TCP not yet answered and
//! acknowledged both ways, others not yet answered), held to
//! `conntrack_max_per_client`: one pod (or one outside address) cannot
//! fill the node's connection table with connections nobody completes,
//! say SYNs whose answers it drops, and so refuse every other pod's new
//! Service connections; a busy client's answered connections do not
//! count. The programs add one for each connection they start tracking and
//! take it off when the connection is answered; the agent's collector
//! recounts from the table at each sweep, so an expired connection needs
//! nothing here and a count lost to a race heals within a sweep.

use aya_ebpf::bindings::BPF_NOEXIST;
use datapath_common::{ConntrackClient, ConntrackClientKey};

use crate::maps::CONNTRACK_CLIENTS;

/// Has `client` as many unanswered connections as it may have (`limit`; 0:
/// no limit)?
#[inline(always)]
pub fn at_limit(client: [u8; 4], limit: u32) -> bool {
    if limit == 0 {
        return false;
    }
    // SAFETY: copied out at once.
    unsafe { CONNTRACK_CLIENTS.get(ConntrackClientKey { ipv4: client }) }
        .is_some_and(|c| c.connections >= limit)
}

/// Count a connection `client` started.
#[inline(always)]
pub fn count(client: [u8; 4], limit: u32) {
    if limit == 0 {
        return;
    }
    let key = ConntrackClientKey { ipv4: client };
    match CONNTRACK_CLIENTS.get_ptr_mut(key) {
        // SAFETY: a live entry. Not atomic (the BPF target's core has no
        // atomics): an add racing another CPU's may be lost, which lets
        // the client past its limit by a few until the next recount.
        Some(entry) => unsafe { (*entry).connections += 1 },
        None => {
            // Another CPU's first count may win: one lost, healed by the recount.
            let first = ConntrackClient { connections: 1, _pad: 0 };
            let _ = CONNTRACK_CLIENTS.insert(key, first, BPF_NOEXIST as u64);
        }
    }
}

/// A connection of `client` was answered: it no longer counts.
#[inline(always)]
pub fn answered(client: [u8; 4], limit: u32) {
    if limit == 0 {
        return;
    }
    if let Some(entry) = CONNTRACK_CLIENTS.get_ptr_mut(ConntrackClientKey { ipv4: client }) {
        // SAFETY: a live entry; not atomic, as in `count`.
        unsafe { (*entry).connections = (*entry).connections.saturating_sub(1) };
    }
}
