//! The programs' drop, forward and monitor counters, summed over CPUs.

use aya::maps::{Map, MapData, PerCpuArray};
use datapath_common::{
    Direction, DropReason, ForwardPath, MonitorOutcome, drop_slot, forward_slot, map_names,
};

use crate::bpf::{Datapath, DatapathError};

type CounterMap = std::collections::BTreeMap<&'static str, u64>;

/// Counter totals summed over CPUs: over all directions (`drops`,
/// `forwards`) and per direction (the program that saw the packet).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub drops: CounterMap,
    pub forwards: CounterMap,
    pub drops_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    pub forwards_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    /// Monitor events emitted, rate limited and lost to a full ring buffer.
    pub monitor_events: CounterMap,
}

impl Counters {
    pub(super) fn read(drops: &Map, forwards: &Map, monitor: &Map) -> Result<Self, DatapathError> {
        let read_all = |map: &Map, name: &'static str| -> Result<Vec<u64>, DatapathError> {
            let array: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(map).map_err(DatapathError::map(name))?;
            (0..array.len())
                .map(|slot| {
                    array.get(&slot, 0).map(|values| values.iter().sum()).map_err(DatapathError::map(name))
                })
                .collect()
        };
        let drop_slots = read_all(drops, map_names::DROP_COUNTERS)?;
        let forward_slots = read_all(forwards, map_names::FORWARD_COUNTERS)?;
        let monitor_slots = read_all(monitor, map_names::MONITOR_COUNTERS)?;
        let at = |slots: &[u64], slot: u32| slots.get(slot as usize).copied().unwrap_or(0);
        let mut counters = Counters::default();
        for direction in Direction::ALL {
            let drops = counters.drops_by_direction.entry(direction.name()).or_default();
            for reason in DropReason::ALL {
                drops.insert(reason.name(), at(&drop_slots, drop_slot(direction, reason)));
            }
            let forwards = counters.forwards_by_direction.entry(direction.name()).or_default();
            for path in ForwardPath::ALL {
                forwards.insert(path.name(), at(&forward_slots, forward_slot(direction, path)));
            }
        }
        for reason in DropReason::ALL {
            let total = Direction::ALL.iter().map(|d| at(&drop_slots, drop_slot(*d, reason))).sum();
            counters.drops.insert(reason.name(), total);
        }
        for path in ForwardPath::ALL {
            let total = Direction::ALL.iter().map(|d| at(&forward_slots, forward_slot(*d, path))).sum();
            counters.forwards.insert(path.name(), total);
        }
        for outcome in MonitorOutcome::ALL {
            counters.monitor_events.insert(outcome.name(), at(&monitor_slots, outcome as u32));
        }
        Ok(counters)
    }

    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.name()).copied().unwrap_or(0)
    }
    pub fn forward_count(&self, path: ForwardPath) -> u64 {
        self.forwards.get(path.name()).copied().unwrap_or(0)
    }
}

impl Datapath {
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        Counters::read(
            self.map(map_names::DROP_COUNTERS)?,
            self.map(map_names::FORWARD_COUNTERS)?,
            self.map(map_names::MONITOR_COUNTERS)?,
        )
    }
}
