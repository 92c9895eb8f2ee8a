//! Monitor events: one [`MonitorEvent`] per drop (and per forwarding
//! decision while a monitor asks for them) into a ring buffer that
//! `datapath-agent monitor` reads. Each CPU may emit a bounded number of events
//! per second, so a flood of bad packets costs a counter increment, not a
//! ring buffer write per packet.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use datapath_common::{
    DEFAULT_MONITOR_EVENTS_PER_SECOND, Direction, ETH_P_IP, IP_OFFSET_MASK, IPPROTO_TCP, IPPROTO_UDP,
    MONITOR_EVENT_VERSION, MonitorConfig, MonitorEvent, MonitorOutcome,
};

use crate::{
    counters::count_monitor,
    headers::{ETH_HLEN, Ipv4Hdr},
    maps::{MONITOR_BUDGET, MONITOR_CONFIG, MONITOR_EVENTS},
    packet::Packet,
    rate_limit,
};

/// The monitor settings; all zero (drops only, default rate) until set.
#[inline(always)]
pub fn config() -> MonitorConfig {
    match MONITOR_CONFIG.get(0) {
        Some(config) => *config,
        None => MonitorConfig::default(),
    }
}

/// Take one event from this CPU's budget for the current second.
#[inline(always)]
fn within_budget(now: u64, events_per_second: u32) -> bool {
    let limit = if events_per_second == 0 { DEFAULT_MONITOR_EVENTS_PER_SECOND } else { events_per_second };
    match MONITOR_BUDGET.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot: no other writer, no other reference.
        Some(budget) => rate_limit::take(unsafe { &mut *budget }, now, limit),
        None => false,
    }
}

/// Report one verdict. Reads the addresses with `bpf_skb_load_bytes`, which
/// copes with any packet length, so malformed packets are reported too.
#[inline(always)]
pub fn report(packet: &Packet, direction: Direction, kind: u8, code: u8, events_per_second: u32) {
    // The budget's one-second windows only need the coarse clock, which
    // skips the TSC read that dominates a rate-limited drop in a VM; the
    // precise clock is read for events that are actually emitted.
    // SAFETY: plain helper without arguments.
    if !within_budget(unsafe { bpf_ktime_get_coarse_ns() }, events_per_second) {
        count_monitor(MonitorOutcome::RateLimited);
        return;
    }
    let Some(mut entry) = MONITOR_EVENTS.reserve(0) else {
        count_monitor(MonitorOutcome::RingFull);
        return;
    };
    // Written in place in the ring (no copy on the stack: the programs
    // have little of it to spare).
    let event = entry.write(MonitorEvent::default());
    // SAFETY: plain helper without arguments.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    event.ifindex = packet.ifindex();
    event.packet_len = packet.frame_len();
    event.direction = direction as u8;
    event.kind = kind;
    event.code = code;
    event.version = MONITOR_EVENT_VERSION;
    if let Some(ethertype) = packet.load::<[u8; 2]>(12) {
        event.ethertype = ethertype;
        if u16::from_be_bytes(ethertype) == ETH_P_IP {
            describe_ipv4(packet, event);
        }
    }
    entry.submit(0);
    count_monitor(MonitorOutcome::Emitted);
}

#[inline(always)]
fn describe_ipv4(packet: &Packet, event: &mut MonitorEvent) {
    let Some(ip) = packet.load::<Ipv4Hdr>(ETH_HLEN) else {
        return;
    };
    event.protocol = ip.protocol;
    event.saddr = ip.saddr;
    event.daddr = ip.daddr;
    let first_fragment = ip.frag_off() & IP_OFFSET_MASK == 0;
    if first_fragment
        && (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP)
        && let Some(ports) = packet.load::<[u8; 4]>(ETH_HLEN + ip.header_len())
    {
        event.sport = [ports[0], ports[1]];
        event.dport = [ports[2], ports[3]];
    }
}
