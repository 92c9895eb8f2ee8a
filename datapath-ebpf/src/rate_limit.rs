//! Per-CPU one-second budgets: the monitor's events and the ICMP errors the
//! programs send. A CPU that used its budget skips the work (and counts
//! that it did), so a flood costs a counter, not a ring buffer write or a
//! reply per packet.

use datapath_common::RateBudget;

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Take one unit from `budget` for the second that started at its window;
/// `false` once `limit` are used.
#[inline(always)]
pub fn take(budget: Option<*mut RateBudget>, now: u64, limit: u32) -> bool {
    let Some(budget) = budget else {
        return false;
    };
    // SAFETY: a per-CPU slot: no other writer.
    unsafe {
        if now.wrapping_sub((*budget).window_start_ns) >= NS_PER_SECOND {
            (*budget).window_start_ns = now;
            (*budget).used = 0;
        }
        if (*budget).used >= limit {
            return false;
        }
        (*budget).used += 1;
    }
    true
}
