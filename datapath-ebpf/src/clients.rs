//! Each client's unanswered connections (TCP not yet answered and
//! acknowledged both ways, others not yet answered), held to
//! `conntrack_max_per_client`: one pod cannot
//! fill the node's connection table with connections nobody completes,
//! say SYNs whose answers it drops, and so refuse every other pod's new
//! Service connections; a busy client's answered connections do not
//! count. The programs add one for each connection they start tracking and
//! take it off when the connection is answered; the agent's collector
//! recounts from the table at each sweep, so an expired connection needs
//! nothing here and a count lost to a race heals within a sweep.
//!
//! Clients outside the cluster are counted per protocol, all together
//! ([`outside_clients`]), not per address: a host outside can send from
//! many addresses, and a per-address limit let a host on the segment
//! forge SYNs from a chosen client's address and lock that client out
//! (netfilter has no per-client limit to abuse).

use aya_ebpf::bindings::BPF_NOEXIST;
use datapath_common::{ConntrackClient, ConntrackClientKey, IPPROTO_TCP, OUTSIDE_TCP_HELD, outside_clients};

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
            let first = ConntrackClient { connections: 1, limit: 0 };
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

/// Have the clients outside the cluster, together, as many connections
/// of `protocol` as `conntrack_max_outside` lets them: unanswered ones
/// their protocol's share, and for TCP, answered or not, all of it
/// ([`OUTSIDE_TCP_HELD`])? (The agent writes the limits next to the
/// counts, [`outside_clients`].)
#[inline(always)]
pub fn outside_at_limit(protocol: u8) -> bool {
    full(outside_clients(protocol)) || (protocol == IPPROTO_TCP && full(OUTSIDE_TCP_HELD))
}

#[inline(always)]
fn full(key: ConntrackClientKey) -> bool {
    // SAFETY: copied out at once.
    unsafe { CONNTRACK_CLIENTS.get(key) }.is_some_and(|c| {
        // (A count taken below zero by a race reads huge: as none.)
        c.limit != 0 && c.connections >= c.limit && c.connections < 1 << 31
    })
}

/// The share of `conntrack_max_outside` the agent wrote for `protocol`
/// (0: no limit, or none written yet).
#[inline(always)]
pub fn outside_limit(protocol: u8) -> u32 {
    // SAFETY: copied out at once.
    unsafe { CONNTRACK_CLIENTS.get(outside_clients(protocol)) }.map_or(0, |c| c.limit)
}

/// Count a connection of `protocol` a client outside the cluster started,
/// or take one off (`answered`): the unanswered ones. Atomic: a flood
/// from outside comes in on every CPU at once, and lost counts would let
/// it past the limit until the recount. Nothing to count before the agent
/// wrote the entry (no limit).
#[inline(always)]
pub fn count_outside(protocol: u8, answered: bool) {
    add_outside(outside_clients(protocol), if answered { u32::MAX } else { 1 });
}

/// A new connection of `protocol` from outside: unanswered, and for TCP
/// one more held in the table.
#[inline(always)]
pub fn count_outside_opened(protocol: u8) {
    count_outside(protocol, false);
    if protocol == IPPROTO_TCP {
        add_outside(OUTSIDE_TCP_HELD, 1);
    }
}

/// An unanswered TCP connection from outside given up (early drop): no
/// longer unanswered, nor held.
#[inline(always)]
pub fn count_outside_given_up() {
    count_outside(IPPROTO_TCP, true);
    add_outside(OUTSIDE_TCP_HELD, u32::MAX);
}

/// A TCP connection from outside is over (an RST, or a FIN each way): no
/// longer held.
#[inline(always)]
pub fn count_outside_closed() {
    add_outside(OUTSIDE_TCP_HELD, u32::MAX);
}

/// A TCP connection from outside that was over starts again on its tuple
/// (a new SYN): held again.
#[inline(always)]
pub fn count_outside_held_again() {
    add_outside(OUTSIDE_TCP_HELD, 1);
}

#[inline(always)]
fn add_outside(key: ConntrackClientKey, n: u32) {
    let Some(entry) = CONNTRACK_CLIENTS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live map value, aligned for a u32; the agent rewrites it
    // whole between sweeps.
    unsafe { add_atomic(&raw mut (*entry).connections, n) };
}

/// `*counter += n` (wrapping) as one atomic instruction. The BPF target
/// has no `AtomicU32` in core, but the instruction set has a 32-bit atomic
/// add; on the host (unit tests) the core type does it.
#[inline(always)]
unsafe fn add_atomic(counter: *mut u32, n: u32) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's pointer.
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(counter, n);
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's pointer.
    unsafe {
        core::sync::atomic::AtomicU32::from_ptr(counter).fetch_add(n, core::sync::atomic::Ordering::Relaxed);
    }
}
