//! Per-CPU one-second budgets: the monitor's events and the ICMP errors the
//! programs send. A CPU that used its budget skips the work (and counts
//! that it did), so a flood costs a counter, not a ring buffer write or a
//! reply per packet.

use datapath_common::RateBudget;

use crate::NS_PER_SECOND;

/// Take one unit from `budget` for the second that started at its window;
/// `false` once `limit` are used.
#[inline(always)]
pub fn take(budget: &mut RateBudget, now: u64, limit: u32) -> bool {
    if now.wrapping_sub(budget.window_start_ns) >= NS_PER_SECOND {
        budget.window_start_ns = now;
        budget.used = 0;
    }
    if budget.used >= limit {
        return false;
    }
    budget.used += 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_per_second() {
        let mut budget = RateBudget::default();
        let start = 5 * NS_PER_SECOND;
        assert!((0..3).all(|i| take(&mut budget, start + i, 3)));
        assert!(!take(&mut budget, start + NS_PER_SECOND - 1, 3), "spent for this second");
        assert!(take(&mut budget, start + NS_PER_SECOND, 3), "a new second");
        assert_eq!(budget.used, 1);
        // The clock is monotonic but the window start may be from before a
        // wrap of the arithmetic: still a new window.
        let mut old = RateBudget { window_start_ns: u64::MAX - 10, used: 3, _pad: 0 };
        assert!(take(&mut old, NS_PER_SECOND, 3));
    }
}
