//! Peer nodes: REMOTE_NODES (pod CIDR -> node) and KNOWN_NODES.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key as LpmKey};
use datapath_common::{ModeMismatch, NodeKey, RemoteNode, map_names};

use crate::{
    bpf::{Datapath, DatapathError},
    model::RemoteRoute,
};

/// What a remote-node sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Datapath {
    /// The remote pod CIDRs currently programmed.
    pub fn remote_routes(&self) -> Result<Vec<RemoteRoute>, DatapathError> {
        read_remote_routes(self.map(map_names::REMOTE_NODES)?)
    }

    /// Make REMOTE_NODES and KNOWN_NODES hold exactly `desired`, touching only
    /// entries that differ: no flush, so forwarding to unchanged peers never
    /// sees a gap, and a changed peer is switched with one map update.
    pub fn sync_remote_nodes(&mut self, desired: &[RemoteRoute]) -> Result<SyncReport, DatapathError> {
        use std::collections::{HashMap as StdHashMap, HashSet};
        let mut report = SyncReport::default();
        let trie_name = map_names::REMOTE_NODES;
        let trie_err = DatapathError::map(trie_name);
        // Hash lookups on both sides: a 100k-CIDR cluster must not be O(n^2).
        let current: StdHashMap<ipnet::Ipv4Net, Ipv4Addr> =
            self.remote_routes()?.into_iter().map(|r| (r.pod_cidr, r.node_ip)).collect();
        let wanted: HashSet<ipnet::Ipv4Net> = desired.iter().map(|d| d.pod_cidr).collect();
        let key_of = |net: ipnet::Ipv4Net| LpmKey::new(u32::from(net.prefix_len()), net.network().octets());
        {
            let mut trie: LpmTrie<&mut MapData, [u8; 4], RemoteNode> =
                LpmTrie::try_from(self.map_mut(trie_name)?).map_err(trie_err)?;
            for want in desired {
                match current.get(&want.pod_cidr) {
                    Some(ip) if *ip == want.node_ip => continue,
                    Some(_) => report.updated += 1,
                    None => report.added += 1,
                }
                trie.insert(
                    &key_of(want.pod_cidr),
                    RemoteNode { node_ipv4: want.node_ip.octets(), flags: 0 },
                    0,
                )
                .map_err(trie_err)?;
            }
            for have in current.keys().filter(|c| !wanted.contains(c)) {
                trie.remove(&key_of(*have)).map_err(trie_err)?;
                report.removed += 1;
            }
        }
        let nodes_name = map_names::KNOWN_NODES;
        let nodes_err = DatapathError::map(nodes_name);
        let mut nodes: HashMap<&mut MapData, NodeKey, RemoteNode> =
            HashMap::try_from(self.map_mut(nodes_name)?).map_err(nodes_err)?;
        let have: HashSet<[u8; 4]> =
            nodes.keys().map(|k| k.map(|k| k.ipv4)).collect::<Result<_, _>>().map_err(nodes_err)?;
        let want_ips: HashSet<[u8; 4]> = desired.iter().map(|d| d.node_ip.octets()).collect();
        for ip in want_ips.difference(&have) {
            nodes
                .insert(NodeKey { ipv4: *ip }, RemoteNode { node_ipv4: *ip, flags: 0 }, 0)
                .map_err(nodes_err)?;
        }
        for ip in have.difference(&want_ips) {
            nodes.remove(&NodeKey { ipv4: *ip }).map_err(nodes_err)?;
        }
        Ok(report)
    }
}

pub(super) fn read_remote_routes(map: &Map) -> Result<Vec<RemoteRoute>, DatapathError> {
    let name = map_names::REMOTE_NODES;
    let trie: LpmTrie<&MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(map).map_err(DatapathError::map(name))?;
    let entries: Vec<(LpmKey<[u8; 4]>, RemoteNode)> =
        trie.iter().collect::<Result<_, _>>().map_err(DatapathError::map(name))?;
    // Every key was written from an Ipv4Net, so each makes one back.
    let mut out: Vec<RemoteRoute> = entries
        .into_iter()
        .filter_map(|(key, node)| {
            let prefix = u8::try_from(key.prefix_len()).ok()?;
            Some(RemoteRoute {
                pod_cidr: ipnet::Ipv4Net::new(Ipv4Addr::from(key.data()), prefix).ok()?,
                node_ip: Ipv4Addr::from(node.node_ipv4),
            })
        })
        .collect();
    out.sort_by_key(|r| (r.pod_cidr.network(), r.pod_cidr.prefix_len()));
    Ok(out)
}

/// The programs' notes of peers that sent in the other routing mode
/// (`peer_mode_mismatches`), opened from its pin.
pub struct PinnedModeMismatches {
    notes: HashMap<MapData, NodeKey, ModeMismatch>,
}

impl PinnedModeMismatches {
    pub fn open(pins: &crate::bpf::PinLayout) -> Result<Self, DatapathError> {
        let name = map_names::PEER_MODE_MISMATCHES;
        let notes =
            HashMap::try_from(crate::bpf::open_pinned(pins, name)?).map_err(DatapathError::map(name))?;
        Ok(Self { notes })
    }

    /// Every note: the peer's address and how many packets, since when.
    pub fn notes(&self) -> Result<Vec<(Ipv4Addr, ModeMismatch)>, DatapathError> {
        let name = map_names::PEER_MODE_MISMATCHES;
        self.notes
            .iter()
            .map(|entry| entry.map(|(key, note)| (Ipv4Addr::from(key.ipv4), note)))
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(name))
    }

    /// Forget the note of `peer` (gone already is fine: packets counted
    /// since it was read go with it; the peer's next ones make a new note).
    pub fn forget(&mut self, peer: Ipv4Addr) -> Result<(), DatapathError> {
        let name = map_names::PEER_MODE_MISMATCHES;
        let key = NodeKey { ipv4: peer.octets() };
        super::maps::remove_present(&mut self.notes, &key).map(|_| ()).map_err(DatapathError::map(name))
    }
}
