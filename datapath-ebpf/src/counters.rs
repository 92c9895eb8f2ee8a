//! The counters every verdict adds to: packets and bytes per direction and
//! drop reason or forward path, per pod (sent and delivered), and what became of monitor
//! events. All per CPU: no other writer, so a plain add is race-free.

use datapath_common::{Direction, DropReason, ForwardPath, MonitorOutcome, drop_slot, forward_slot};

use crate::maps::{DROP_COUNTERS, ENDPOINT_TRAFFIC, FORWARD_COUNTERS, MONITOR_COUNTERS};

/// A packet of `bytes` (the frame as it came) dropped for `reason`.
#[inline(always)]
pub fn count_drop(direction: Direction, reason: DropReason, bytes: u32) {
    if let Some(count) = DROP_COUNTERS.get_ptr_mut(drop_slot(direction, reason)) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe {
            (*count).packets += 1;
            (*count).bytes += bytes as u64;
        }
    }
}

/// A packet of `bytes` (the frame as it came) forwarded on `path`.
#[inline(always)]
pub fn count_forward(direction: Direction, path: ForwardPath, bytes: u32) {
    if let Some(count) = FORWARD_COUNTERS.get_ptr_mut(forward_slot(direction, path)) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe {
            (*count).packets += 1;
            (*count).bytes += bytes as u64;
        }
    }
}

/// A packet the pod put on its veth. Slots beyond the array (the endpoint
/// has none) are simply not counted.
#[inline(always)]
pub fn count_sent(traffic_slot: u32, bytes: u32) {
    if let Some(traffic) = ENDPOINT_TRAFFIC.get_ptr_mut(traffic_slot) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe {
            (*traffic).sent_packets += 1;
            (*traffic).sent_bytes += bytes as u64;
        }
    }
}

/// A packet the datapath redirected into the pod.
#[inline(always)]
pub fn count_delivered(traffic_slot: u32, bytes: u32) {
    if let Some(traffic) = ENDPOINT_TRAFFIC.get_ptr_mut(traffic_slot) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe {
            (*traffic).delivered_packets += 1;
            (*traffic).delivered_bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn count_monitor(outcome: MonitorOutcome) {
    if let Some(slot) = MONITOR_COUNTERS.get_ptr_mut(outcome as u32) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe { *slot += 1 };
    }
}
