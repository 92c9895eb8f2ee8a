//! The connection-tracking map: read whole, and opened from its pin for the
//! collector (`reconcile::conntrack`).

use aya::maps::{HashMap, Map, MapData};
use datapath_common::{ConntrackEntry, ConntrackKey, map_names};

use crate::bpf::{
    DatapathError, PinLayout,
    maps::{get_present, remove_present},
    open_pinned,
};

/// What a sweep of the connection-tracking map did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Entries removed (two per connection).
    pub removed: usize,
    /// Entries left, as of the sweep's snapshot.
    pub remaining: usize,
}

pub(crate) fn read_conntrack(map: &Map) -> Result<Vec<(ConntrackKey, ConntrackEntry)>, DatapathError> {
    let name = map_names::CONNTRACK;
    let conntrack: HashMap<&MapData, ConntrackKey, ConntrackEntry> =
        HashMap::try_from(map).map_err(DatapathError::map(name))?;
    let mut out: Vec<(ConntrackKey, ConntrackEntry)> =
        conntrack.iter().collect::<Result<_, _>>().map_err(DatapathError::map(name))?;
    out.sort_by_key(|(key, _)| *key);
    Ok(out)
}

/// The connection-tracking map opened from its pin, for the collector: a
/// sweep of a large map takes a while, and this way it does not hold up
/// the agent (CNI requests, Service syncs) meanwhile.
pub struct PinnedConntrack {
    map: HashMap<MapData, ConntrackKey, ConntrackEntry>,
}

impl PinnedConntrack {
    pub fn open(pins: &PinLayout) -> Result<Self, DatapathError> {
        let name = map_names::CONNTRACK;
        let map = HashMap::try_from(open_pinned(pins, name)?).map_err(DatapathError::map(name))?;
        Ok(Self { map })
    }

    /// Every entry, as one snapshot.
    pub fn snapshot(&self) -> Result<std::collections::HashMap<ConntrackKey, ConntrackEntry>, DatapathError> {
        self.map.iter().collect::<Result<_, _>>().map_err(DatapathError::map(map_names::CONNTRACK))
    }

    /// The entry of `key` now, `None` if it is gone.
    pub fn get(&self, key: &ConntrackKey) -> Result<Option<ConntrackEntry>, DatapathError> {
        get_present(&self.map, key).map_err(DatapathError::map(map_names::CONNTRACK))
    }

    /// Remove the entry of `key`; false if it was not there (the programs
    /// removed it first).
    pub fn remove(&mut self, key: &ConntrackKey) -> Result<bool, DatapathError> {
        remove_present(&mut self.map, key).map_err(DatapathError::map(map_names::CONNTRACK))
    }
}
