//! The NetworkPolicy maps: which local pods are isolated
//! (POLICY_ENDPOINTS), the identity of each peer prefix (POLICY_PEERS) and
//! the compiled allow rules (POLICY_RULES), read whole and written as the
//! difference between what they hold and what is wanted.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key as LpmKey};
use datapath_common::{
    EndpointKey, NODE_FLAG_POLICY, PodInterface, PolicyAllow, PolicyEndpoint, PolicyPeer, PolicyRuleKey,
    map_names,
};
use ipnet::Ipv4Net;

use crate::bpf::{
    Datapath, DatapathError,
    maps::{get_present, remove_present},
};

/// One POLICY_RULES entry: its key and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRule {
    pub prefix_len: u32,
    pub key: PolicyRuleKey,
}

/// The whole content of the policy maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyMaps {
    /// Local pod -> isolated directions (`POLICY_INGRESS` | `POLICY_EGRESS`).
    pub endpoints: BTreeMap<Ipv4Addr, u32>,
    /// Peer prefix -> identity.
    pub peers: BTreeMap<Ipv4Net, u32>,
    pub rules: BTreeSet<PolicyRule>,
}

/// What a write changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PolicyWriteReport {
    pub written: usize,
    pub removed: usize,
}

impl Datapath {
    /// What the policy maps hold now.
    pub fn policy_maps(&self) -> Result<PolicyMaps, DatapathError> {
        read_policy_maps(
            self.map(map_names::POLICY_ENDPOINTS)?,
            self.map(map_names::POLICY_PEERS)?,
            self.map(map_names::POLICY_RULES)?,
        )
    }

    /// Bring the policy maps from `current` (what they hold) to `desired`.
    /// Allowing comes before refusing: new rules and identities are written
    /// before pods are isolated, and what is no longer wanted goes after,
    /// so no allowed connection is refused while the change is written.
    pub fn write_policy_maps(
        &mut self,
        current: &PolicyMaps,
        desired: &PolicyMaps,
    ) -> Result<PolicyWriteReport, DatapathError> {
        let mut report = PolicyWriteReport::default();
        let (rules_name, peers_name, endpoints_name) =
            (map_names::POLICY_RULES, map_names::POLICY_PEERS, map_names::POLICY_ENDPOINTS);
        {
            let mut rules: LpmTrie<&mut MapData, PolicyRuleKey, PolicyAllow> =
                LpmTrie::try_from(self.map_mut(rules_name)?).map_err(DatapathError::map(rules_name))?;
            for rule in desired.rules.difference(&current.rules) {
                rules
                    .insert(&LpmKey::new(rule.prefix_len, rule.key), PolicyAllow::default(), 0)
                    .map_err(DatapathError::map(rules_name))?;
                report.written += 1;
            }
        }
        {
            let mut peers: LpmTrie<&mut MapData, [u8; 4], PolicyPeer> =
                LpmTrie::try_from(self.map_mut(peers_name)?).map_err(DatapathError::map(peers_name))?;
            for (net, identity) in &desired.peers {
                if current.peers.get(net) == Some(identity) {
                    continue;
                }
                peers
                    .insert(&peer_key(net), PolicyPeer { identity: *identity }, 0)
                    .map_err(DatapathError::map(peers_name))?;
                report.written += 1;
            }
        }
        if !desired.endpoints.is_empty() {
            self.set_policy_flag(true)?;
        }
        {
            let mut endpoints: HashMap<&mut MapData, EndpointKey, PolicyEndpoint> =
                HashMap::try_from(self.map_mut(endpoints_name)?)
                    .map_err(DatapathError::map(endpoints_name))?;
            for (ip, flags) in &desired.endpoints {
                if current.endpoints.get(ip) == Some(flags) {
                    continue;
                }
                endpoints
                    .insert(EndpointKey { ipv4: ip.octets() }, PolicyEndpoint { flags: *flags }, 0)
                    .map_err(DatapathError::map(endpoints_name))?;
                report.written += 1;
            }
            for ip in current.endpoints.keys().filter(|ip| !desired.endpoints.contains_key(ip)) {
                report.removed += usize::from(
                    remove_present(&mut endpoints, &EndpointKey { ipv4: ip.octets() })
                        .map_err(DatapathError::map(endpoints_name))?,
                );
            }
        }
        report.written += self.mirror_isolation(&desired.endpoints)?;
        if desired.endpoints.is_empty() {
            self.set_policy_flag(false)?;
        }
        {
            let mut peers: LpmTrie<&mut MapData, [u8; 4], PolicyPeer> =
                LpmTrie::try_from(self.map_mut(peers_name)?).map_err(DatapathError::map(peers_name))?;
            for net in current.peers.keys().filter(|net| !desired.peers.contains_key(net)) {
                report.removed += usize::from(
                    lpm_remove(&mut peers, &peer_key(net)).map_err(DatapathError::map(peers_name))?,
                );
            }
        }
        {
            let mut rules: LpmTrie<&mut MapData, PolicyRuleKey, PolicyAllow> =
                LpmTrie::try_from(self.map_mut(rules_name)?).map_err(DatapathError::map(rules_name))?;
            for rule in current.rules.difference(&desired.rules) {
                report.removed += usize::from(
                    lpm_remove(&mut rules, &LpmKey::new(rule.prefix_len, rule.key))
                        .map_err(DatapathError::map(rules_name))?,
                );
            }
        }
        Ok(report)
    }

    /// The directions POLICY_ENDPOINTS isolates the local pod at `ip` in.
    pub(super) fn policy_isolation(&self, ip: Ipv4Addr) -> Result<u32, DatapathError> {
        let name = map_names::POLICY_ENDPOINTS;
        let endpoints: HashMap<&MapData, EndpointKey, PolicyEndpoint> =
            HashMap::try_from(self.map(name)?).map_err(DatapathError::map(name))?;
        let entry =
            get_present(&endpoints, &EndpointKey { ipv4: ip.octets() }).map_err(DatapathError::map(name))?;
        Ok(entry.map_or(0, |e| e.flags))
    }

    /// Copy each local pod's isolation (`isolation`, as POLICY_ENDPOINTS
    /// holds it) into its ENDPOINTS and POD_INTERFACES entries, where the
    /// forwarding programs read it with the lookups they make anyway.
    /// Returns the entries changed.
    fn mirror_isolation(&mut self, isolation: &BTreeMap<Ipv4Addr, u32>) -> Result<usize, DatapathError> {
        let of = |ip: [u8; 4]| isolation.get(&Ipv4Addr::from(ip)).copied().unwrap_or(0);
        let mut changed = 0;
        for (ip, endpoint) in self.endpoints()? {
            let want = of(ip.octets());
            if endpoint.isolation() != want {
                let name = map_names::ENDPOINTS;
                self.endpoints_mut()?
                    .insert(EndpointKey { ipv4: ip.octets() }, endpoint.with_isolation(want), 0)
                    .map_err(DatapathError::map(name))?;
                changed += 1;
            }
        }
        let name = map_names::POD_INTERFACES;
        let interfaces: Vec<(u32, PodInterface)> =
            self.pod_interfaces_mut()?.iter().collect::<Result<_, _>>().map_err(DatapathError::map(name))?;
        for (ifindex, interface) in interfaces {
            let want = of(interface.pod_ipv4) as u8;
            if interface.isolation != want {
                self.pod_interfaces_mut()?
                    .insert(ifindex, PodInterface { isolation: want, ..interface }, 0)
                    .map_err(DatapathError::map(name))?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Copy the pinned POLICY_ENDPOINTS into the endpoint entries, before
    /// the pinned links switch to programs that read the copies: entries of
    /// a build without them hold zero (not isolated), and the policy must
    /// not lapse while the new agent reads its objects.
    pub(super) fn mirror_pinned_isolation(&mut self) -> Result<usize, DatapathError> {
        let isolation = self.policy_maps()?.endpoints;
        self.mirror_isolation(&isolation)
    }

    /// Set or clear `NODE_FLAG_POLICY`, the programs' switch for policy
    /// lookups, keeping the rest of the node config.
    fn set_policy_flag(&mut self, on: bool) -> Result<(), DatapathError> {
        let mut config = self.node_config()?;
        let flags = if on { config.flags | NODE_FLAG_POLICY } else { config.flags & !NODE_FLAG_POLICY };
        if flags == config.flags {
            return Ok(());
        }
        config.flags = flags;
        self.set_node_config(config)
    }
}

fn peer_key(net: &Ipv4Net) -> LpmKey<[u8; 4]> {
    LpmKey::new(u32::from(net.prefix_len()), net.network().octets())
}

/// `trie.remove(key)`; false if it was not there.
fn lpm_remove<K: aya::Pod, V: aya::Pod>(
    trie: &mut LpmTrie<&mut MapData, K, V>,
    key: &LpmKey<K>,
) -> Result<bool, aya::maps::MapError> {
    match trie.remove(key) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Read the three policy maps (the agent's own, or pinned ones for `inspect`).
pub fn read_policy_maps(endpoints: &Map, peers: &Map, rules: &Map) -> Result<PolicyMaps, DatapathError> {
    let mut maps = PolicyMaps::default();
    let name = map_names::POLICY_ENDPOINTS;
    let hash: HashMap<&MapData, EndpointKey, PolicyEndpoint> =
        HashMap::try_from(endpoints).map_err(DatapathError::map(name))?;
    for entry in hash.iter() {
        let (key, value) = entry.map_err(DatapathError::map(name))?;
        maps.endpoints.insert(Ipv4Addr::from(key.ipv4), value.flags);
    }
    let name = map_names::POLICY_PEERS;
    let trie: LpmTrie<&MapData, [u8; 4], PolicyPeer> =
        LpmTrie::try_from(peers).map_err(DatapathError::map(name))?;
    for entry in trie.iter() {
        let (key, value) = entry.map_err(DatapathError::map(name))?;
        // Every key was written from an Ipv4Net (prefix length at most 32).
        let prefix_len = u8::try_from(key.prefix_len().min(32)).unwrap_or(32);
        let net = Ipv4Net::new(Ipv4Addr::from(key.data()), prefix_len)
            .unwrap_or_else(|_| Ipv4Net::default())
            .trunc();
        maps.peers.insert(net, value.identity);
    }
    let name = map_names::POLICY_RULES;
    let trie: LpmTrie<&MapData, PolicyRuleKey, PolicyAllow> =
        LpmTrie::try_from(rules).map_err(DatapathError::map(name))?;
    for entry in trie.iter() {
        let (key, _) = entry.map_err(DatapathError::map(name))?;
        maps.rules.insert(PolicyRule { prefix_len: key.prefix_len(), key: key.data() });
    }
    Ok(maps)
}
