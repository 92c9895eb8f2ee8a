//! Layout versions of the pinned maps, and what each map's entries are.
//!
//! Every map is pinned as `<bpffs_dir>/maps/<name>-v<version>`. The version
//! says what its keys and values mean; bump it whenever a key or value type
//! in `datapath-common` changes its layout or its meaning (a field added,
//! moved, resized, or read differently), and add an [`Upgrade`] if the old
//! entries can be converted. Capacity and flags are not part of the version:
//! a map pinned with another `max_entries` (e.g. `conntrack_max_entries`
//! changed) is migrated into a new map of the same layout, its entries kept.
//!
//! A new map needs one entry in [`LAYOUTS`] (the build fails without it).
//! What the agent does with a pin of another layout is in
//! [`crate::bpf::map_pins`] and docs/upgrade.md.

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use aya_obj::generated::BPF_NOEXIST;
use datapath_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ConntrackEntry, ConntrackKey, Endpoint, EndpointKey,
    FragmentKey, FragmentTranslation, ModeMismatch, MonitorConfig, NodeConfig, NodeKey, PacketCount,
    PodInterface, PolicyAllow, PolicyEndpoint, PolicyPeer, PolicyRuleKey, RemoteNode, Service, ServiceKey,
    SockRevNat, SockRevNatKey, map_names,
};

/// Copies entries from an old map into a new one (for an [`Upgrade`]: from
/// the old version's types into the new one's).
pub type CopyFn = fn(old: &Map, new: &mut Map) -> Result<Copied, MapError>;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Entries written into the new map.
    pub entries: usize,
    /// Non-empty array slots beyond the new map's capacity (not copied).
    pub left_out: usize,
}

/// How a map's entries are carried into a new map during a migration, and
/// when (relative to switching the programs on the pinned links to the new
/// maps with `bpf_link_update`).
#[derive(Clone, Copy)]
pub enum Entries {
    /// Hash, LRU hash or LPM trie entries: copied before the switch, and once
    /// more after it for keys the old programs added meanwhile (a copy never
    /// overwrites what is already in the new map).
    Keyed(CopyFn),
    /// Array slots the agent writes: copied before the switch.
    Slots(CopyFn),
    /// Per-CPU counters: added to the new map after the switch, so what was
    /// counted while the switch ran is kept too.
    Counters(CopyFn),
    /// Nothing worth carrying (the monitor's ring buffer and rate limiter):
    /// the new map starts empty.
    Discarded,
}

/// What the agent does with a pin it cannot convert (another version
/// without an [`Upgrade`], or keys and values of another size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incompatible {
    /// Refuse to start, naming the map and what to do: losing the entries
    /// would break traffic (pods, peers, Services, connections).
    Refuse,
    /// Replace it with an empty map and log a warning: counters restart at
    /// zero, in-flight fragments and monitor events are lost.
    StartEmpty,
}

/// A conversion from an older layout version.
#[derive(Clone, Copy)]
pub struct Upgrade {
    pub from_version: u32,
    pub entries: Entries,
}

/// One pinned map of this build.
#[derive(Clone, Copy)]
pub struct MapLayout {
    /// As in [`map_names`] (the map's name in the eBPF object).
    pub name: &'static str,
    /// The layout version of its keys and values; in the pin name.
    pub version: u32,
    /// What it holds, for the operator (in refusals and warnings).
    pub holds: &'static str,
    pub entries: Entries,
    pub incompatible: Incompatible,
    /// Older versions this build converts (none yet: every map is at v1).
    pub upgrades: &'static [Upgrade],
}

impl MapLayout {
    /// File name of its pin under `maps/`: `endpoints-v1`.
    pub fn pin_name(&self) -> String {
        format!("{}-v{}", self.name.to_ascii_lowercase(), self.version)
    }

    /// File name pins of this map had before layout versions (`endpoints`);
    /// those maps had the layout of version 1.
    pub fn unversioned_pin_name(&self) -> String {
        self.name.to_ascii_lowercase()
    }
}

/// Layout version that pins without a version in their name (from builds
/// before layout versions) have.
pub const UNVERSIONED_PIN_VERSION: u32 = 1;

use Entries::{Counters, Discarded, Keyed, Slots};
use Incompatible::{Refuse, StartEmpty};

/// Every pinned map, with its layout version.
pub const LAYOUTS: &[MapLayout] = &[
    MapLayout {
        name: map_names::ENDPOINTS,
        version: 1,
        holds: "the local pods' delivery entries (pods become unreachable until re-added)",
        entries: Keyed(copy_hash::<EndpointKey, Endpoint>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::POD_INTERFACES,
        version: 1,
        holds: "the local pods' veths (pods' packets are dropped until re-added)",
        entries: Keyed(copy_hash::<u32, PodInterface>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::DROP_COUNTERS,
        // v2: packets and bytes (v1: packets).
        version: 2,
        holds: "drop counters",
        entries: Counters(add_counters::<2>),
        incompatible: StartEmpty,
        upgrades: &[Upgrade { from_version: 1, entries: Counters(packet_counts_from_v1) }],
    },
    MapLayout {
        name: map_names::FORWARD_COUNTERS,
        // v2: packets and bytes (v1: packets).
        version: 2,
        holds: "forward counters",
        entries: Counters(add_counters::<2>),
        incompatible: StartEmpty,
        upgrades: &[Upgrade { from_version: 1, entries: Counters(packet_counts_from_v1) }],
    },
    MapLayout {
        name: map_names::REMOTE_NODES,
        version: 1,
        holds: "the other nodes' pod CIDRs (cross-node traffic stops until the peers are programmed again)",
        entries: Keyed(copy_lpm::<[u8; 4], RemoteNode>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::KNOWN_NODES,
        version: 1,
        holds: "the peer nodes' addresses (tunnel traffic is dropped until the peers are programmed again)",
        entries: Keyed(copy_hash::<NodeKey, RemoteNode>),
        incompatible: Refuse,
        upgrades: &[],
    },
    // v2: the VXLAN port and the node's pod CIDR appended (24 -> 32 bytes).
    MapLayout {
        name: map_names::NODE_CONFIG,
        // v3: conntrack_max_per_client appended.
        version: 3,
        holds: "the node's settings (forwarding mode, uplink, whether Service lookups are on)",
        entries: Slots(copy_slots::<NodeConfig>),
        incompatible: Refuse,
        upgrades: &[
            Upgrade { from_version: 1, entries: Slots(node_config_from_v1) },
            Upgrade { from_version: 2, entries: Slots(node_config_from_v2) },
        ],
    },
    MapLayout {
        name: map_names::ENDPOINT_TRAFFIC,
        version: 1,
        holds: "per-pod packet and byte counters",
        entries: Counters(add_counters::<4>),
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::MONITOR_EVENTS,
        version: 1,
        holds: "monitor events not yet read",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::MONITOR_CONFIG,
        version: 1,
        holds: "the monitor's settings (rewritten at start; a running `monitor --forwards` must be restarted)",
        entries: Slots(copy_slots::<MonitorConfig>),
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::MONITOR_BUDGET,
        version: 1,
        holds: "the monitor's per-CPU rate limiter state",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::MONITOR_COUNTERS,
        version: 1,
        holds: "monitor event counters",
        entries: Counters(add_counters::<1>),
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::SERVICES,
        version: 1,
        holds: "the Service ports (Services stop until synced again)",
        entries: Keyed(copy_hash::<ServiceKey, Service>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::SERVICE_BACKENDS,
        version: 1,
        holds: "the Services' backends (Services stop until synced again)",
        entries: Keyed(copy_hash::<BackendKey, Backend>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::CONNTRACK,
        // v2: entries of kind CT_POLICY (connections NetworkPolicy allowed)
        // may be present; v1 entries are all valid v2 entries.
        // v3: TCP sequence checks, `seq_after_syn` and `ack` appended (24 ->
        // 32 bytes).
        // v4: `seq_after_syn` became `seq_end` (where the direction's data
        // ends, moved on by every segment): a v3 value is stale, so it is
        // dropped (same size).
        version: 4,
        holds: "the live Service connections and the connections NetworkPolicy allowed (every one of them breaks)",
        entries: Keyed(copy_hash::<ConntrackKey, ConntrackEntry>),
        incompatible: Refuse,
        upgrades: &[
            Upgrade { from_version: 1, entries: Keyed(conntrack_from_v2) },
            Upgrade { from_version: 2, entries: Keyed(conntrack_from_v2) },
            Upgrade { from_version: 3, entries: Keyed(conntrack_from_v3) },
        ],
    },
    MapLayout {
        name: map_names::CONNTRACK_CLIENTS,
        version: 1,
        holds: "each client's tracked connections (recounted from the connection table within 5 s)",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::CONNTRACK_OUTSIDE_OPENING,
        version: 1,
        holds: "the outside TCP connections opened lately, for early drop (until new ones come, a full outside share gives up none of the older ones)",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::EARLY_DROP_SCRATCH,
        version: 1,
        holds: "per-CPU room where early drop keeps two keys (nothing kept between packets)",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::SERVICE_AFFINITY,
        version: 1,
        holds: "ClientIP session affinities (clients may get another backend)",
        entries: Keyed(copy_hash::<AffinityKey, AffinityEntry>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::SOCK_REVNAT,
        version: 1,
        holds: "the Service addresses the node's own UDP sockets asked for (their replies would show the backend)",
        entries: Keyed(copy_hash::<SockRevNatKey, SockRevNat>),
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::ANSWER_SCRATCH,
        version: 1,
        holds: "per-CPU room where an ICMP answer is made (nothing kept between packets)",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::ICMP_BUDGET,
        version: 1,
        holds: "the per-CPU rate limiter state of the ICMP errors the programs send",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::PEER_MODE_MISMATCHES,
        version: 1,
        holds: "peers seen sending in the other routing mode (logged again if they go on)",
        entries: Keyed(copy_hash::<NodeKey, ModeMismatch>),
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::RPF_CACHE,
        version: 1,
        holds: "recently confirmed reverse paths (each flow's next packet asks the FIB again)",
        entries: Discarded,
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::POLICY_ENDPOINTS,
        version: 1,
        holds: "which local pods NetworkPolicy isolates (they would be open to everything until re-synced)",
        entries: Keyed(copy_hash::<EndpointKey, PolicyEndpoint>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::POLICY_PEERS,
        version: 1,
        holds: "the identities of policy peers (isolated pods would refuse allowed peers until re-synced)",
        entries: Keyed(copy_lpm::<[u8; 4], PolicyPeer>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::POLICY_RULES,
        version: 1,
        holds: "the compiled NetworkPolicy rules (isolated pods would refuse allowed peers until re-synced)",
        entries: Keyed(copy_lpm::<PolicyRuleKey, PolicyAllow>),
        incompatible: Refuse,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::POLICY_VERDICTS,
        version: 1,
        holds: "NetworkPolicy verdict counters",
        entries: Counters(add_counters::<1>),
        incompatible: StartEmpty,
        upgrades: &[],
    },
    MapLayout {
        name: map_names::SERVICE_FRAGMENTS,
        version: 1,
        holds: "translations of Service datagrams in fragments (datagrams in flight are lost)",
        entries: Keyed(copy_hash::<FragmentKey, FragmentTranslation>),
        incompatible: StartEmpty,
        upgrades: &[],
    },
];

/// The layout of the map called `name` in this build.
pub fn layout(name: &str) -> Option<&'static MapLayout> {
    LAYOUTS.iter().find(|layout| layout.name == name)
}

const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// Every map the agent pins has exactly one layout: checked when building.
const _: () = {
    let mut i = 0;
    while i < map_names::ALL.len() {
        let mut found = 0;
        let mut j = 0;
        while j < LAYOUTS.len() {
            if same_name(map_names::ALL[i], LAYOUTS[j].name) {
                found += 1;
            }
            j += 1;
        }
        assert!(found == 1, "every name in map_names::ALL needs exactly one entry in map_layout::LAYOUTS");
        i += 1;
    }
    assert!(LAYOUTS.len() == map_names::ALL.len(), "map_layout::LAYOUTS lists a map not in map_names::ALL");
};

fn is_errno(error: &MapError, errno: i32) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}

/// Hash and LRU hash maps: every entry the new map lacks.
fn copy_hash<K: Pod, V: Pod>(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: HashMap<&MapData, K, V> = HashMap::try_from(old)?;
    let mut new: HashMap<&mut MapData, K, V> = HashMap::try_from(new)?;
    let mut copied = Copied::default();
    for entry in old.iter() {
        let (key, value) = entry?;
        match new.insert(key, value, u64::from(BPF_NOEXIST)) {
            Ok(()) => copied.entries += 1,
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

/// LPM tries: every prefix the new map lacks.
fn copy_lpm<K: Pod, V: Pod>(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: LpmTrie<&MapData, K, V> = LpmTrie::try_from(old)?;
    let mut new: LpmTrie<&mut MapData, K, V> = LpmTrie::try_from(new)?;
    let mut copied = Copied::default();
    for entry in old.iter() {
        let (key, value) = entry?;
        match new.insert(&key, value, u64::from(BPF_NOEXIST)) {
            Ok(()) => copied.entries += 1,
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

/// Arrays: slot by slot, as far as the new one reaches.
fn copy_slots<V: Pod + PartialEq + Default>(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: Array<&MapData, V> = Array::try_from(old)?;
    let mut new: Array<&mut MapData, V> = Array::try_from(new)?;
    let mut copied = Copied::default();
    for slot in 0..old.len() {
        let value = old.get(&slot, 0)?;
        if slot < new.len() {
            new.set(slot, value, 0)?;
            copied.entries += 1;
        } else if value != V::default() {
            copied.left_out += 1;
        }
    }
    Ok(copied)
}

/// `node_config` as layout v1 had it: today's first 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NodeConfigV1 {
    node_ipv4: [u8; 4],
    mode: u32,
    uplink_ifindex: u32,
    vxlan_ifindex: u32,
    vni: u32,
    flags: u32,
}

// SAFETY: repr(C), integers and byte arrays only, no padding.
unsafe impl Pod for NodeConfigV1 {}

/// v1 -> v2: every field kept (above all the flag that keeps Service lookups
/// on); the VXLAN port and pod CIDR stay zero (no own-CIDR check) until the
/// agent writes the node's settings a moment later.
fn node_config_from_v1(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: Array<&MapData, NodeConfigV1> = Array::try_from(old)?;
    let mut new: Array<&mut MapData, NodeConfig> = Array::try_from(new)?;
    let v1 = old.get(&0, 0)?;
    let config = NodeConfig {
        node_ipv4: v1.node_ipv4,
        mode: v1.mode,
        uplink_ifindex: v1.uplink_ifindex,
        vxlan_ifindex: v1.vxlan_ifindex,
        vni: v1.vni,
        flags: v1.flags,
        ..NodeConfig::default()
    };
    new.set(0, config, 0)?;
    Ok(Copied { entries: 1, left_out: 0 })
}

/// `node_config` as layout v2 had it: today's first 36 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NodeConfigV2 {
    node_ipv4: [u8; 4],
    mode: u32,
    uplink_ifindex: u32,
    vxlan_ifindex: u32,
    vni: u32,
    flags: u32,
    vxlan_port: [u8; 2],
    pod_prefix_len: u8,
    _pad: u8,
    pod_cidr: [u8; 4],
    pod_mtu: u32,
}

// SAFETY: repr(C), integers and byte arrays only, no padding.
unsafe impl Pod for NodeConfigV2 {}

/// v2 -> v3: every field kept; no per-client connection limit until the
/// agent writes the node's settings a moment later.
fn node_config_from_v2(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: Array<&MapData, NodeConfigV2> = Array::try_from(old)?;
    let mut new: Array<&mut MapData, NodeConfig> = Array::try_from(new)?;
    let v2 = old.get(&0, 0)?;
    let config = NodeConfig {
        node_ipv4: v2.node_ipv4,
        mode: v2.mode,
        uplink_ifindex: v2.uplink_ifindex,
        vxlan_ifindex: v2.vxlan_ifindex,
        vni: v2.vni,
        flags: v2.flags,
        vxlan_port: v2.vxlan_port,
        pod_prefix_len: v2.pod_prefix_len,
        _pad: v2._pad,
        pod_cidr: v2.pod_cidr,
        pod_mtu: v2.pod_mtu,
        conntrack_max_per_client: 0,
        host_netns_cookie: 0,
    };
    new.set(0, config, 0)?;
    Ok(Copied { entries: 1, left_out: 0 })
}

/// A connection-tracking entry of layout v1 and v2 (v1's are all valid v2
/// entries).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConntrackEntryV2 {
    pub nat_addr: [u8; 4],
    pub nat_port: [u8; 2],
    pub kind: u8,
    pub flags: u8,
    pub client_ipv4: [u8; 4],
    pub service_id: u32,
    pub last_seen_ns: u64,
}

// SAFETY: repr(C), integers and byte arrays only, no padding.
unsafe impl Pod for ConntrackEntryV2 {}

/// v1/v2 -> v4: every field kept; no sequence numbers known, so the
/// converted connections' RSTs and FINs are not checked (as before) until
/// each direction acknowledges again, and a handshake under way completes
/// unchecked.
fn conntrack_from_v2(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: HashMap<&MapData, ConntrackKey, ConntrackEntryV2> = HashMap::try_from(old)?;
    let mut new: HashMap<&mut MapData, ConntrackKey, ConntrackEntry> = HashMap::try_from(new)?;
    let mut copied = Copied::default();
    for entry in old.iter() {
        let (key, v2) = entry?;
        let entry = ConntrackEntry {
            nat_addr: v2.nat_addr,
            nat_port: v2.nat_port,
            kind: v2.kind,
            flags: v2.flags,
            client_ipv4: v2.client_ipv4,
            service_id: v2.service_id,
            last_seen_ns: v2.last_seen_ns,
            seq_end: 0,
            ack: 0,
        };
        match new.insert(key, entry, u64::from(BPF_NOEXIST)) {
            Ok(()) => copied.entries += 1,
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

/// v3 -> v4: every field kept but `seq_after_syn`, the initial sequence
/// number + 1 of each direction, which v4 reads as where the direction's
/// data ends: so not known (0). The converted connections' acknowledgements
/// are recorded as v3 did (not bounded by the other side's data), their
/// RSTs and FINs checked against them.
fn conntrack_from_v3(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: HashMap<&MapData, ConntrackKey, ConntrackEntry> = HashMap::try_from(old)?;
    let mut new: HashMap<&mut MapData, ConntrackKey, ConntrackEntry> = HashMap::try_from(new)?;
    let mut copied = Copied::default();
    for entry in old.iter() {
        let (key, v3) = entry?;
        match new.insert(key, ConntrackEntry { seq_end: 0, ..v3 }, u64::from(BPF_NOEXIST)) {
            Ok(()) => copied.entries += 1,
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

/// Per-CPU arrays of `N` u64 counters per slot: the old counts are added to
/// what the new map counted since the switch, CPU by CPU. (An increment
/// between the read and the write of a slot on that CPU is lost: the copy of
/// one slot takes microseconds.)
fn add_counters<const N: usize>(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: PerCpuArray<&MapData, [u64; N]> = PerCpuArray::try_from(old)?;
    let mut new: PerCpuArray<&mut MapData, [u64; N]> = PerCpuArray::try_from(new)?;
    let mut copied = Copied::default();
    for slot in 0..old.len() {
        let counts = old.get(&slot, 0)?;
        if counts.iter().all(|c| c.iter().all(|n| *n == 0)) {
            continue;
        }
        if slot >= new.len() {
            copied.left_out += 1;
            continue;
        }
        let sums: Vec<[u64; N]> = counts
            .iter()
            .zip(new.get(&slot, 0)?.iter())
            .map(|(old, new)| std::array::from_fn(|i| old[i].wrapping_add(new[i])))
            .collect();
        new.set(slot, PerCpuValues::try_from(sums).map_err(MapError::IoError)?, 0)?;
        copied.entries += 1;
    }
    Ok(copied)
}

/// Drop and forward counters of layout v1 (packets only, one `u64` per
/// CPU) added into v2's [`datapath_common::PacketCount`]s: the packets
/// carried over, bytes counted from the switch on.
fn packet_counts_from_v1(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(old)?;
    let mut new: PerCpuArray<&mut MapData, PacketCount> = PerCpuArray::try_from(new)?;
    let mut copied = Copied::default();
    for slot in 0..old.len() {
        let packets = old.get(&slot, 0)?;
        if packets.iter().all(|n| *n == 0) {
            continue;
        }
        if slot >= new.len() {
            copied.left_out += 1;
            continue;
        }
        let sums: Vec<PacketCount> = packets
            .iter()
            .zip(new.get(&slot, 0)?.iter())
            .map(|(old, new)| PacketCount { packets: old.wrapping_add(new.packets), bytes: new.bytes })
            .collect();
        new.set(slot, PerCpuValues::try_from(sums).map_err(MapError::IoError)?, 0)?;
        copied.entries += 1;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_carry_the_version() {
        let endpoints = layout(map_names::ENDPOINTS).unwrap();
        assert_eq!(endpoints.pin_name(), "endpoints-v1");
        assert_eq!(endpoints.unversioned_pin_name(), "endpoints");
        assert!(layout("NO_SUCH_MAP").is_none());
    }

    #[test]
    fn node_config_v1_is_the_head_of_v2() {
        assert_eq!(std::mem::size_of::<NodeConfigV1>(), 24);
        assert_eq!(std::mem::offset_of!(NodeConfig, flags), std::mem::offset_of!(NodeConfigV1, flags));
        assert_eq!(std::mem::offset_of!(NodeConfig, vxlan_port), 24, "v2 appends after v1's fields");
    }

    #[test]
    fn node_config_v2_is_the_head_of_v3() {
        assert_eq!(std::mem::size_of::<NodeConfigV2>(), 36);
        assert_eq!(std::mem::offset_of!(NodeConfig, pod_mtu), std::mem::offset_of!(NodeConfigV2, pod_mtu));
        assert_eq!(std::mem::offset_of!(NodeConfig, conntrack_max_per_client), 36, "v3 appends");
        assert_eq!(std::mem::size_of::<NodeConfig>(), 48);
    }

    #[test]
    fn conntrack_v2_is_the_head_of_v3() {
        assert_eq!(std::mem::size_of::<ConntrackEntryV2>(), 24);
        assert_eq!(
            std::mem::offset_of!(ConntrackEntry, last_seen_ns),
            std::mem::offset_of!(ConntrackEntryV2, last_seen_ns)
        );
        assert_eq!(std::mem::offset_of!(ConntrackEntry, seq_end), 24, "v3 appends; v4 renames");
        assert_eq!(std::mem::size_of::<ConntrackEntry>(), 32);
    }

    #[test]
    fn upgrades_come_from_older_versions() {
        for layout in LAYOUTS {
            for upgrade in layout.upgrades {
                assert!(upgrade.from_version < layout.version, "{}", layout.name);
            }
        }
    }
}
