//! The connection-tracking map: read whole, and opened from its pin for the
//! collector (`reconcile::conntrack`).

use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use datapath_common::{
    CT_FORWARD, CT_POLICY, ConntrackClient, ConntrackClientKey, ConntrackEntry, ConntrackKey,
    OUTSIDE_TCP_CLIENTS, OUTSIDE_TCP_HELD, OUTSIDE_UDP_CLIENTS, map_names,
};

use crate::bpf::{
    Datapath, DatapathError, PinLayout,
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

/// The entries an address that changes hands leaves behind, both
/// directions of each connection: those NetworkPolicy allowed to or from
/// it (`CT_POLICY`), and, with `as_client`, the Service connections it
/// opened (forward entries from it, with their pairs).
pub fn connections_of_address(
    entries: &[(ConntrackKey, ConntrackEntry)],
    ip: Ipv4Addr,
    as_client: bool,
) -> Vec<ConntrackKey> {
    let ip = ip.octets();
    let mut keys = Vec::new();
    for (key, entry) in entries {
        if entry.kind == CT_POLICY && (key.saddr == ip || key.daddr == ip) {
            keys.push(*key);
        } else if as_client && entry.kind == CT_FORWARD && key.saddr == ip {
            keys.push(*key);
            keys.push(key.pair(entry));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

impl Datapath {
    /// Forget what the pod at `ip` leaves behind ([`connections_of_address`]),
    /// so that the next pod given the address inherits nothing of it: no
    /// connection policy allowed, and, with `as_client`, none of its
    /// Service connections and no count of them against
    /// `conntrack_max_per_client`. `as_client` only once no pod has the
    /// address: a late DEL must not cut the connections of the pod that
    /// has it now. Returns how many entries were forgotten.
    pub fn forget_address_connections(
        &mut self,
        ip: Ipv4Addr,
        as_client: bool,
    ) -> Result<usize, DatapathError> {
        let name = map_names::CONNTRACK;
        let mut conntrack: HashMap<&mut MapData, ConntrackKey, ConntrackEntry> =
            HashMap::try_from(self.map_mut(name)?).map_err(DatapathError::map(name))?;
        let entries: Vec<(ConntrackKey, ConntrackEntry)> =
            conntrack.iter().collect::<Result<_, _>>().map_err(DatapathError::map(name))?;
        let mut forgotten = 0;
        for key in connections_of_address(&entries, ip, as_client) {
            forgotten += usize::from(remove_present(&mut conntrack, &key).map_err(DatapathError::map(name))?);
        }
        if as_client {
            // The collector recounts within seconds anyway; this way the
            // next pod is served from its first connection.
            let name = map_names::CONNTRACK_CLIENTS;
            let mut clients: HashMap<&mut MapData, ConntrackClientKey, ConntrackClient> =
                HashMap::try_from(self.map_mut(name)?).map_err(DatapathError::map(name))?;
            remove_present(&mut clients, &ConntrackClientKey { ipv4: ip.octets() })
                .map_err(DatapathError::map(name))?;
        }
        Ok(forgotten)
    }
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
    /// is split evenly between the protocols' unanswered ones), the count
    /// under [`OUTSIDE_TCP_HELD`] all of it.
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
            let limit = if *ipv4 == OUTSIDE_TCP_CLIENTS.ipv4 || *ipv4 == OUTSIDE_UDP_CLIENTS.ipv4 {
                outside_share(outside_limit)
            } else if *ipv4 == OUTSIDE_TCP_HELD.ipv4 {
                outside_limit
            } else {
                0
            };
            let value = ConntrackClient { connections: *connections, limit };
            self.clients
                .insert(ConntrackClientKey { ipv4: *ipv4 }, value, 0)
                .map_err(DatapathError::map(name))?;
        }
        Ok(())
    }

    /// The outside clients' count and limit for TCP and for UDP (unanswered
    /// ones), and for TCP held (answered or not), as the programs see them
    /// now (all zero before the collector's first sweep).
    pub fn outside_clients(&self) -> Result<[ConntrackClient; 3], DatapathError> {
        let get = |key| match self.clients.get(key, 0) {
            Ok(value) => Ok(value),
            Err(aya::maps::MapError::KeyNotFound) => Ok(ConntrackClient::default()),
            Err(e) => Err(DatapathError::map(map_names::CONNTRACK_CLIENTS)(e)),
        };
        Ok([get(&OUTSIDE_TCP_CLIENTS)?, get(&OUTSIDE_UDP_CLIENTS)?, get(&OUTSIDE_TCP_HELD)?])
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

#[cfg(test)]
mod tests {
    use datapath_common::{CT_REPLY, CT_SNAT, IPPROTO_TCP};

    use super::*;

    fn key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16) -> ConntrackKey {
        ConntrackKey {
            saddr,
            daddr,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            protocol: IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// One Service connection from `client` to 10.96.0.10:80 served by
    /// 10.244.2.7:8080, both entries.
    fn service_connection(client: [u8; 4], port: u16, flags: u8) -> [(ConntrackKey, ConntrackEntry); 2] {
        let forward_key = key(client, [10, 96, 0, 10], port, 80);
        let forward = ConntrackEntry {
            nat_addr: [10, 244, 2, 7],
            nat_port: 8080u16.to_be_bytes(),
            kind: CT_FORWARD,
            flags,
            client_ipv4: client,
            ..Default::default()
        };
        let reply = ConntrackEntry {
            nat_addr: [10, 96, 0, 10],
            nat_port: 80u16.to_be_bytes(),
            kind: CT_REPLY,
            ..forward
        };
        [(forward_key, forward), (forward_key.pair(&forward), reply)]
    }

    #[test]
    fn an_address_leaves_its_policy_connections_and_as_client_its_service_connections() {
        let pod = [10, 244, 1, 5];
        let other = [10, 244, 1, 6];
        let [own_fwd, own_rep] = service_connection(pod, 40_000, 0);
        let [other_fwd, other_rep] = service_connection(other, 40_000, 0);
        // A connection to the pod as a backend is not its to forget.
        let to_it_key = key(other, [10, 96, 0, 11], 40_001, 80);
        let to_it =
            ConntrackEntry { nat_addr: pod, kind: CT_FORWARD, client_ipv4: other, ..Default::default() };
        let policy_from =
            (key(pod, other, 40_002, 443), ConntrackEntry { kind: CT_POLICY, ..Default::default() });
        let policy_to =
            (key(other, pod, 40_003, 443), ConntrackEntry { kind: CT_POLICY, ..Default::default() });
        let entries = [own_fwd, own_rep, other_fwd, other_rep, (to_it_key, to_it), policy_from, policy_to];

        let mut policy_only = vec![policy_from.0, policy_to.0];
        policy_only.sort_unstable();
        assert_eq!(connections_of_address(&entries, pod.into(), false), policy_only);

        let mut all = vec![own_fwd.0, own_rep.0, policy_from.0, policy_to.0];
        all.sort_unstable();
        assert_eq!(connections_of_address(&entries, pod.into(), true), all);
        // The reply key is the pair's: the backend's answer to the pod.
        assert_eq!(own_rep.0.saddr, [10, 244, 2, 7]);
        assert_eq!(own_rep.0.daddr, pod);
    }

    #[test]
    fn an_snat_connections_reply_entry_is_found_through_the_forward_one() {
        let pod = [10, 244, 1, 5];
        let [fwd, rep] = service_connection(pod, 40_000, CT_SNAT);
        let keys = connections_of_address(&[fwd, rep], pod.into(), true);
        assert!(keys.contains(&fwd.0) && keys.contains(&fwd.0.pair(&fwd.1)), "{keys:?}");
    }
}
