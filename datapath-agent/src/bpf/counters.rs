//! The programs' drop and forward counters (packets and bytes) and monitor
//! counters, summed over CPUs.

use aya::maps::{Map, MapData, PerCpuArray};
use datapath_common::{
    Direction, DropReason, ForwardPath, MonitorOutcome, PacketCount, drop_slot, forward_slot, map_names,
};

use crate::bpf::{Datapath, DatapathError};

type CounterMap = std::collections::BTreeMap<&'static str, u64>;

/// Counter totals summed over CPUs: over all directions (`drops`,
/// `forwards`: packets; `drop_bytes`, `forward_bytes`) and per direction
/// (the program that saw the packet).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub drops: CounterMap,
    pub forwards: CounterMap,
    pub drops_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    pub forwards_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    /// Bytes of the frames counted in `drops` (as they came, Ethernet
    /// header included).
    pub drop_bytes: CounterMap,
    pub forward_bytes: CounterMap,
    pub drop_bytes_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    pub forward_bytes_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    /// Monitor events emitted, rate limited and lost to a full ring buffer.
    pub monitor_events: CounterMap,
}

impl Counters {
    pub(super) fn read(drops: &Map, forwards: &Map, monitor: &Map) -> Result<Self, DatapathError> {
        let read_counts = |map: &Map, name: &'static str| -> Result<Vec<PacketCount>, DatapathError> {
            let array: PerCpuArray<&MapData, PacketCount> =
                PerCpuArray::try_from(map).map_err(DatapathError::map(name))?;
            (0..array.len())
                .map(|slot| {
                    let values = array.get(&slot, 0).map_err(DatapathError::map(name))?;
                    Ok(values.iter().fold(PacketCount::default(), |sum, cpu| PacketCount {
                        packets: sum.packets.wrapping_add(cpu.packets),
                        bytes: sum.bytes.wrapping_add(cpu.bytes),
                    }))
                })
                .collect()
        };
        let monitor_slots: Vec<u64> = {
            let name = map_names::MONITOR_COUNTERS;
            let array: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(monitor).map_err(DatapathError::map(name))?;
            (0..array.len())
                .map(|slot| {
                    array.get(&slot, 0).map(|values| values.iter().sum()).map_err(DatapathError::map(name))
                })
                .collect::<Result<_, _>>()?
        };
        let drop_slots = read_counts(drops, map_names::DROP_COUNTERS)?;
        let forward_slots = read_counts(forwards, map_names::FORWARD_COUNTERS)?;
        let at = |slots: &[PacketCount], slot: u32| slots.get(slot as usize).copied().unwrap_or_default();
        let mut counters = Counters::default();
        for direction in Direction::ALL {
            let name = direction.name();
            for reason in DropReason::ALL {
                let count = at(&drop_slots, drop_slot(direction, reason));
                counters.drops_by_direction.entry(name).or_default().insert(reason.name(), count.packets);
                counters.drop_bytes_by_direction.entry(name).or_default().insert(reason.name(), count.bytes);
                *counters.drops.entry(reason.name()).or_default() += count.packets;
                *counters.drop_bytes.entry(reason.name()).or_default() += count.bytes;
            }
            for path in ForwardPath::ALL {
                let count = at(&forward_slots, forward_slot(direction, path));
                counters.forwards_by_direction.entry(name).or_default().insert(path.name(), count.packets);
                counters.forward_bytes_by_direction.entry(name).or_default().insert(path.name(), count.bytes);
                *counters.forwards.entry(path.name()).or_default() += count.packets;
                *counters.forward_bytes.entry(path.name()).or_default() += count.bytes;
            }
        }
        for outcome in MonitorOutcome::ALL {
            counters
                .monitor_events
                .insert(outcome.name(), monitor_slots.get(outcome as usize).copied().unwrap_or(0));
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
