//! The connection-tracking map: read whole, and opened from its pin for the
//! collector (`reconcile::conntrack`).

use aya::maps::{HashMap, Map, MapData};
use datapath_common::{
    ConntrackClient, ConntrackClientKey, ConntrackEntry, ConntrackKey, OUTSIDE_TCP_CLIENTS,
    OUTSIDE_UDP_CLIENTS, map_names,
};

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
    clients: HashMap<MapData, ConntrackClientKey, ConntrackClient>,
}

impl PinnedConntrack {
    pub fn open(pins: &PinLayout) -> Result<Self, DatapathError> {
        let name = map_names::CONNTRACK;
        let map = HashMap::try_from(open_pinned(pins, name)?).map_err(DatapathError::map(name))?;
        let name = map_names::CONNTRACK_CLIENTS;
        let clients = HashMap::try_from(open_pinned(pins, name)?).map_err(DatapathError::map(name))?;
        Ok(Self { map, clients })
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

impl PinnedConntrack {
    /// Set each client's count of tracked connections to `counts` (clients
    /// not in it have none). The programs add to these between sweeps; an
    /// add between the snapshot the counts come from and this write is
    /// lost, and found again at the next sweep.
    /// The counts under [`OUTSIDE_TCP_CLIENTS`] and [`OUTSIDE_UDP_CLIENTS`]
    /// get half of `outside_limit` each with them (`conntrack_max_outside`
    /// is split evenly between the protocols).
    pub fn set_client_counts(
        &mut self,
        counts: &std::collections::HashMap<[u8; 4], u32>,
        outside_limit: u32,
    ) -> Result<(), DatapathError> {
        let name = map_names::CONNTRACK_CLIENTS;
        let present: Vec<ConntrackClientKey> =
            self.clients.keys().collect::<Result<_, _>>().map_err(DatapathError::map(name))?;
        for key in present {
            if !counts.contains_key(&key.ipv4) {
                remove_present(&mut self.clients, &key).map_err(DatapathError::map(name))?;
            }
        }
        for (ipv4, connections) in counts {
            let outside = *ipv4 == OUTSIDE_TCP_CLIENTS.ipv4 || *ipv4 == OUTSIDE_UDP_CLIENTS.ipv4;
            let limit = if outside { outside_share(outside_limit) } else { 0 };
            let value = ConntrackClient { connections: *connections, limit };
            self.clients
                .insert(ConntrackClientKey { ipv4: *ipv4 }, value, 0)
                .map_err(DatapathError::map(name))?;
        }
        Ok(())
    }

    /// The outside clients' count and limit for TCP and for UDP, as the
    /// programs see them now (all zero before the collector's first sweep).
    pub fn outside_clients(&self) -> Result<[ConntrackClient; 2], DatapathError> {
        let get = |key| match self.clients.get(key, 0) {
            Ok(value) => Ok(value),
            Err(aya::maps::MapError::KeyNotFound) => Ok(ConntrackClient::default()),
            Err(e) => Err(DatapathError::map(map_names::CONNTRACK_CLIENTS)(e)),
        };
        Ok([get(&OUTSIDE_TCP_CLIENTS)?, get(&OUTSIDE_UDP_CLIENTS)?])
    }

    /// Each client's count as the programs see it now.
    pub fn client_counts(&self) -> Result<std::collections::HashMap<[u8; 4], u32>, DatapathError> {
        self.clients
            .iter()
            .map(|entry| entry.map(|(key, value)| (key.ipv4, value.connections)))
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(map_names::CONNTRACK_CLIENTS))
    }
}

/// Each protocol's share of `conntrack_max_outside` (0: no limit; an odd
/// limit rounds up, so no share of a limit is 0).
pub fn outside_share(outside_limit: u32) -> u32 {
    outside_limit.div_ceil(2)
}
