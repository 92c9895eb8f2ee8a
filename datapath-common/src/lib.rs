//! Types shared by the eBPF programs (`datapath-ebpf`) and the agent.
//!
//! Everything that crosses the kernel/user boundary lives here, once: map
//! key/value layouts (`#[repr(C)]`, explicit padding, addresses as
//! network-order byte arrays) and the numbering of verdict counters.
#![no_std]

/// Names of the maps, as the loader and `bpftool` see them. The pin files under
/// the bpffs directory carry the same names.
pub mod map_names {
    /// Pod IPv4 -> [`super::Endpoint`]: where to deliver a packet for a local pod.
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// Host veth ifindex -> [`super::PodInterface`]: who is sending on this veth.
    pub const POD_INTERFACES: &str = "POD_INTERFACES";
    /// Per-CPU packet counters indexed by [`super::drop_slot`] (direction and
    /// [`super::DropReason`]).
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    /// Per-CPU packet counters indexed by [`super::forward_slot`] (direction and
    /// [`super::ForwardPath`]).
    pub const FORWARD_COUNTERS: &str = "FORWARD_COUNTERS";
    /// Per-CPU [`super::EndpointTraffic`] indexed by the endpoint's traffic slot.
    pub const ENDPOINT_TRAFFIC: &str = "ENDPOINT_TRAFFIC";
    /// Ring buffer of [`super::MonitorEvent`]s, read by `datapath-agent monitor`.
    pub const MONITOR_EVENTS: &str = "MONITOR_EVENTS";
    /// One [`super::MonitorConfig`] at index 0.
    pub const MONITOR_CONFIG: &str = "MONITOR_CONFIG";
    /// Per-CPU [`super::MonitorBudget`]: the rate limiter's state.
    pub const MONITOR_BUDGET: &str = "MONITOR_BUDGET";
    /// Per-CPU counters of monitor events, indexed by [`super::MonitorOutcome`].
    pub const MONITOR_COUNTERS: &str = "MONITOR_COUNTERS";
    /// LPM trie: remote pod CIDR -> [`super::RemoteNode`].
    pub const REMOTE_NODES: &str = "REMOTE_NODES";
    /// Peer node IPv4 -> [`super::RemoteNode`]: tunnel sources we accept, and
    /// node addresses pods reach directly.
    pub const KNOWN_NODES: &str = "KNOWN_NODES";
    /// One [`super::NodeConfig`] at index 0.
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    /// Every map the agent pins, in a stable order.
    /// [`super::ServiceKey`] (VIP, port, protocol) -> [`super::Service`].
    pub const SERVICES: &str = "SERVICES";
    /// [`super::BackendKey`] (service id, slot) -> [`super::Backend`].
    pub const SERVICE_BACKENDS: &str = "SERVICE_BACKENDS";
    /// [`super::ConntrackKey`] (a connection's 5-tuple as one direction sees
    /// it) -> [`super::ConntrackEntry`]: the Service translation to apply.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// [`super::AffinityKey`] (service id, client) -> [`super::AffinityEntry`]
    /// for sessionAffinity: ClientIP (LRU).
    pub const SERVICE_AFFINITY: &str = "SERVICE_AFFINITY";
    /// [`super::FragmentKey`] (a datagram's addresses, IP id, protocol) ->
    /// [`super::FragmentTranslation`]: what the first fragment of a Service
    /// datagram was rewritten to, for its later fragments (LRU).
    pub const SERVICE_FRAGMENTS: &str = "SERVICE_FRAGMENTS";
    /// Per-CPU [`super::RateBudget`]: ICMP errors the programs sent in the
    /// current second (time exceeded, port unreachable), for their rate limit.
    pub const ICMP_BUDGET: &str = "ICMP_BUDGET";
    /// [`super::NodeKey`] (a peer node) -> [`super::ModeMismatch`]: packets
    /// that peer sent in the other routing mode (the agent logs them).
    pub const PEER_MODE_MISMATCHES: &str = "PEER_MODE_MISMATCHES";
    /// Per-CPU [`super::RpfCacheEntry`] slots: sources whose reverse path
    /// the FIB confirmed lately, so a flow pays the lookup once, not per packet.
    pub const RPF_CACHE: &str = "RPF_CACHE";
    pub const ALL: [&str; 20] = [
        ENDPOINTS,
        POD_INTERFACES,
        DROP_COUNTERS,
        FORWARD_COUNTERS,
        REMOTE_NODES,
        KNOWN_NODES,
        NODE_CONFIG,
        ENDPOINT_TRAFFIC,
        MONITOR_EVENTS,
        MONITOR_CONFIG,
        MONITOR_BUDGET,
        MONITOR_COUNTERS,
        SERVICES,
        SERVICE_BACKENDS,
        CONNTRACK,
        SERVICE_AFFINITY,
        SERVICE_FRAGMENTS,
        ICMP_BUDGET,
        PEER_MODE_MISMATCHES,
        RPF_CACHE,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// TC ingress of each pod's host-side veth.
    pub const FROM_POD: &str = "from_pod";
    /// TC ingress of the uplink (native routing mode).
    pub const FROM_UPLINK: &str = "from_uplink";
    /// TC ingress of the collect_md VXLAN device (overlay mode).
    pub const FROM_OVERLAY: &str = "from_overlay";
}

/// Capacity of the endpoint and pod interface maps (local pods on one node).
/// Kubernetes defaults to 110 pods per node; 64k is Cilium's default too.
pub const MAX_LOCAL_ENDPOINTS: u32 = 65_536;
/// Capacity of the remote pod CIDR trie (not preallocated: costs only what
/// is used).
pub const MAX_REMOTE_NODES: u32 = 131_072;
/// Capacity of the known node map (Kubernetes supports 5,000 nodes).
pub const MAX_KNOWN_NODES: u32 = 16_384;
/// Drop counter slots per direction; [`DropReason`] values must stay below it.
pub const DROP_REASON_SLOTS: u32 = 64;
/// Forward counter slots per direction; [`ForwardPath`] values must stay below it.
pub const FORWARD_PATH_SLOTS: u32 = 16;
/// Slots in the drop counter array: one block of reasons per direction.
pub const DROP_COUNTER_SLOTS: u32 = DROP_REASON_SLOTS * Direction::COUNT;
/// Slots in the forward counter array: one block of paths per direction.
pub const FORWARD_COUNTER_SLOTS: u32 = FORWARD_PATH_SLOTS * Direction::COUNT;
/// Endpoints with their own traffic counters (per CPU, preallocated, so kept
/// far below [`MAX_LOCAL_ENDPOINTS`]; Kubernetes' max-pods defaults to 110).
/// Endpoints beyond it forward normally, uncounted.
pub const MAX_TRAFFIC_SLOTS: u32 = 4_096;
/// Traffic slot of an endpoint that has none (out of range: never counted).
pub const NO_TRAFFIC_SLOT: u32 = u32::MAX;
/// Size of the monitor ring buffer in bytes (a power of two, page aligned).
pub const MONITOR_RING_BYTES: u32 = 1 << 18;
/// ICMP errors (time exceeded, port unreachable) each CPU may send per
/// second, as the kernel's `icmp_msgs_per_sec` default: a flood of expiring
/// or refused packets costs a counter, not a reply each.
pub const ICMP_ERRORS_PER_SECOND: u32 = 1_000;
/// Slots of the per-CPU reverse-path cache (a power of two: indexed by a
/// hash of the source).
pub const RPF_CACHE_SLOTS: u32 = 256;
/// Packets a cached reverse-path verdict serves before the FIB is asked
/// again: a route change reaches a flow within this many of its packets.
pub const RPF_CACHE_USES: u32 = 4_096;
/// Default monitor events per second per CPU (when `MonitorConfig` says 0).
pub const DEFAULT_MONITOR_EVENTS_PER_SECOND: u32 = 1_000;

/// Capacity of the Service map: (VIP, port, protocol) triples.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the backend map: all Services' (service, slot) entries.
pub const MAX_SERVICE_BACKENDS: u32 = 262_144;
/// Default capacity of the connection-tracking map (two entries per
/// connection: one per direction). `conntrack_max_entries` in the config.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 131_072;
/// Capacity of the sessionAffinity map (LRU: the oldest affinity goes first).
pub const MAX_AFFINITY_ENTRIES: u32 = 65_536;
/// Fragmented Service datagrams in flight at once (LRU: the oldest goes).
pub const MAX_FRAGMENTED_DATAGRAMS: u32 = 8_192;
/// Source address a pod's connection to itself through a Service is
/// translated to: a packet from its own address would be a martian to it.
pub const HAIRPIN_IPV4: [u8; 4] = [169, 254, 42, 1];
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Which program saw the packet: where it came from.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by a local pod (TC ingress of its host veth).
    FromPod = 0,
    /// Arrived on the uplink (native routing).
    FromUplink = 1,
    /// Arrived through the VXLAN device (overlay).
    FromOverlay = 2,
}

impl Direction {
    pub const COUNT: u32 = 3;
    pub const ALL: [Direction; 3] = [Direction::FromPod, Direction::FromUplink, Direction::FromOverlay];

    pub const fn name(self) -> &'static str {
        match self {
            Direction::FromPod => "from_pod",
            Direction::FromUplink => "from_uplink",
            Direction::FromOverlay => "from_overlay",
        }
    }

    pub const fn from_u32(value: u32) -> Option<Direction> {
        match value {
            0 => Some(Direction::FromPod),
            1 => Some(Direction::FromUplink),
            2 => Some(Direction::FromOverlay),
            _ => None,
        }
    }
}

/// Slot of (direction, reason) in the drop counter array.
#[inline(always)]
pub const fn drop_slot(direction: Direction, reason: DropReason) -> u32 {
    direction as u32 * DROP_REASON_SLOTS + reason as u32
}

/// Slot of (direction, path) in the forward counter array.
#[inline(always)]
pub const fn forward_slot(direction: Direction, path: ForwardPath) -> u32 {
    direction as u32 * FORWARD_PATH_SLOTS + path as u32
}

/// Key of the endpoint map: a pod's IPv4 address, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ipv4: [u8; 4],
}

/// A local pod, as the datapath needs it to deliver a packet to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Ifindex of the pod's host-side veth; `bpf_redirect_peer` to it lands the
    /// packet in the pod's namespace.
    pub host_ifindex: u32,
    /// MAC of the pod's interface (destination MAC of delivered frames).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (source MAC of delivered frames, the pod's gateway).
    pub host_mac: [u8; 6],
    /// [`ENDPOINT_FLAG_HOST_DOWN`]; the rest reserved (policy, ...).
    pub flags: u32,
    /// Index of this pod's [`EndpointTraffic`] counters, or [`NO_TRAFFIC_SLOT`].
    pub traffic_slot: u32,
}

/// The pod's host veth is administratively down: the kernel would not
/// forward to the pod (its /32 route is gone), so neither do we.
pub const ENDPOINT_FLAG_HOST_DOWN: u32 = 1;

/// What the "from pod" program knows about the veth a packet entered on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// The only IPv4 source address this pod may use (network byte order).
    pub pod_ipv4: [u8; 4],
    /// MAC of the host-side veth: the answer to the pod's ARP requests.
    pub host_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Index of this pod's [`EndpointTraffic`] counters, or [`NO_TRAFFIC_SLOT`].
    pub traffic_slot: u32,
}

/// Packets and bytes of one pod (per CPU). Sent: everything the pod put on
/// its veth (before any verdict). Delivered: what the datapath redirected
/// into it (the host stack's own deliveries, e.g. kubelet probes, are not here).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointTraffic {
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
}

/// What the monitor reports, and how many events each CPU may emit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorConfig {
    /// Non-zero: also report every forwarding decision (drops always are).
    pub trace_forwards: u32,
    /// Events per second per CPU; 0 means [`DEFAULT_MONITOR_EVENTS_PER_SECOND`].
    pub events_per_second: u32,
}

/// Per-CPU rate limiter state: events (or ICMP errors) emitted in the
/// current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateBudget {
    pub window_start_ns: u64,
    pub used: u32,
    pub _pad: u32,
}

/// The monitor's per-CPU rate limiter.
pub type MonitorBudget = RateBudget;

/// A source whose reverse path the FIB confirmed through `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RpfCacheEntry {
    pub saddr: [u8; 4],
    pub ifindex: u32,
    /// Packets served since the FIB was asked; at [`RPF_CACHE_USES`] it is
    /// asked again.
    pub uses: u32,
    pub _pad: u32,
}

/// Packets a peer node sent in the other routing mode: VXLAN to a native
/// node, or plain pod traffic to a VXLAN node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ModeMismatch {
    pub packets: u64,
    /// `bpf_ktime_get_coarse_ns` of the last one (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
}

/// What became of a monitor event: the slot in `MONITOR_COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorOutcome {
    Emitted = 0,
    /// Over the per-CPU budget: not emitted (a flood cannot starve the datapath).
    RateLimited = 1,
    /// The ring buffer was full (nobody reading, or reading too slowly).
    RingFull = 2,
}

impl MonitorOutcome {
    pub const ALL: [MonitorOutcome; 3] =
        [MonitorOutcome::Emitted, MonitorOutcome::RateLimited, MonitorOutcome::RingFull];
    pub const SLOTS: u32 = 4;

    pub const fn name(self) -> &'static str {
        match self {
            MonitorOutcome::Emitted => "emitted",
            MonitorOutcome::RateLimited => "rate_limited",
            MonitorOutcome::RingFull => "ring_full",
        }
    }
}

/// An event kind in [`MonitorEvent::kind`].
pub const EVENT_DROP: u8 = 1;
pub const EVENT_FORWARD: u8 = 2;

/// Layout of [`MonitorEvent`] written by these programs, in its `version`
/// field. Bump it whenever a field is added, moved or changes meaning, so a
/// `monitor` of another build refuses the events instead of misreading them.
/// Events of builds from before versions carry 0 there and the layout of 1.
pub const MONITOR_EVENT_VERSION: u8 = 1;

/// One verdict, as the monitor shows it. Addresses and ports in network
/// order as in the packet; zero where the packet has none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    pub packet_len: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub ethertype: [u8; 2],
    /// A [`Direction`] value.
    pub direction: u8,
    /// [`EVENT_DROP`] or [`EVENT_FORWARD`].
    pub kind: u8,
    /// A [`DropReason`] or [`ForwardPath`] value, by `kind`.
    pub code: u8,
    /// IPv4 protocol number, 0 if not IPv4.
    pub protocol: u8,
    /// [`MONITOR_EVENT_VERSION`]. At byte [`MONITOR_EVENT_VERSION_OFFSET`] in
    /// every version, so any reader can tell which layout the rest has.
    pub version: u8,
    pub _pad: [u8; 5],
}

/// Where [`MonitorEvent::version`] sits, in every version of the event.
pub const MONITOR_EVENT_VERSION_OFFSET: usize = 34;

/// Key of the known node map: a peer node's IPv4, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey {
    pub ipv4: [u8; 4],
}

/// Where a remote pod CIDR (or a peer node address) lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    /// The peer node's address on the physical network (network byte order):
    /// next hop in native mode, outer destination in overlay mode.
    pub node_ipv4: [u8; 4],
    /// Reserved; zero today.
    pub flags: u32,
}

/// How this node reaches other nodes' pods.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    /// No cross-node forwarding configured: remote traffic goes to the host stack.
    Unset = 0,
    /// Straight out of the uplink to the peer node (L2-adjacent nodes).
    Native = 1,
    /// Encapsulated in VXLAN towards the peer node.
    Vxlan = 2,
}

/// Node-wide settings the programs read (index 0 of `NODE_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// This node's address on the physical network (network byte order).
    pub node_ipv4: [u8; 4],
    /// A [`RoutingMode`] value.
    pub mode: u32,
    pub uplink_ifindex: u32,
    /// The collect_md VXLAN device (overlay mode), else 0.
    pub vxlan_ifindex: u32,
    /// VXLAN network identifier.
    pub vni: u32,
    /// [`NODE_FLAG_SERVICES`].
    pub flags: u32,
    /// UDP port of the cluster's VXLAN (network byte order): on a native
    /// node, VXLAN from a peer to it means the peer runs the other mode.
    pub vxlan_port: [u8; 2],
    /// Prefix length of [`NodeConfig::pod_cidr`].
    pub pod_prefix_len: u8,
    pub _pad: u8,
    /// This node's pod CIDR (network address, network byte order): no
    /// packet from outside may claim a source in it.
    pub pod_cidr: [u8; 4],
    /// The pods' MTU (0: unknown): a packet no larger needs no MTU check on
    /// its way into a pod.
    pub pod_mtu: u32,
}

impl NodeConfig {
    /// Is `ipv4` inside this node's pod CIDR?
    #[inline(always)]
    pub fn in_pod_cidr(&self, ipv4: [u8; 4]) -> bool {
        if self.pod_prefix_len == 0 {
            // Unset (no node config yet): claims nothing.
            return false;
        }
        let mask = u32::MAX.checked_shl(32 - self.pod_prefix_len as u32).unwrap_or(0);
        u32::from_be_bytes(ipv4) & mask == u32::from_be_bytes(self.pod_cidr) & mask
    }
}

/// A source address no host may use, as Linux's route input refuses it
/// (`ip_route_input_slow`, RFC 1812 5.3.7): 0.0.0.0/8, 127.0.0.0/8 (no
/// `route_localnet` on the node), multicast 224.0.0.0/4 and the limited
/// broadcast 255.255.255.255. (Linux accepts 240.0.0.0/4 as unicast.)
#[inline(always)]
pub const fn is_martian_source(ipv4: [u8; 4]) -> bool {
    let first = ipv4[0];
    first == 0 || first == 127 || first & 0xf0 == 0xe0 || u32::from_be_bytes(ipv4) == u32::MAX
}

/// Services (or live Service connections) exist: TCP and UDP packets are
/// looked up in the Service and connection-tracking maps. Unset, they cost
/// nothing.
pub const NODE_FLAG_SERVICES: u32 = 1;

/// A Service port: cluster IP, port and protocol, as they sit in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    pub _pad: u8,
}

/// What the datapath needs of a Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Agent-chosen, unique while the Service exists; keys its backends.
    pub id: u32,
    /// Backends in slots 0..backend_count; 0 = reject new connections.
    pub backend_count: u32,
    /// [`SERVICE_AFFINITY_CLIENT_IP`] or 0.
    pub flags: u32,
    /// sessionAffinity timeout (ClientIP).
    pub affinity_timeout_seconds: u32,
}

/// sessionAffinity: ClientIP.
pub const SERVICE_AFFINITY_CLIENT_IP: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// A ready endpoint of a Service: pod address and target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ipv4: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// One direction of a translated connection, as its packets carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConntrackKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network byte order.
    pub sport: [u8; 2],
    /// Network byte order.
    pub dport: [u8; 2],
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Forward entry (client -> VIP): rewrite the destination to `nat_addr`:
/// `nat_port` (the backend). Reply entry (backend -> client): rewrite the
/// source to `nat_addr`:`nat_port` (the VIP). Hairpin: the forward entry
/// also rewrites the source to [`HAIRPIN_IPV4`], the reply entry the
/// destination back to `client_ipv4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEntry {
    pub nat_addr: [u8; 4],
    /// Network byte order.
    pub nat_port: [u8; 2],
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub kind: u8,
    /// [`CT_HAIRPIN`], [`CT_CLOSING`].
    pub flags: u8,
    /// The client's own address (hairpin reply entries).
    pub client_ipv4: [u8; 4],
    pub service_id: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
}

pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
/// The client is the backend itself (a pod reaching itself through a Service).
pub const CT_HAIRPIN: u8 = 1;
/// A FIN or RST was seen: the agent removes the pair once it is quiet.
pub const CT_CLOSING: u8 = 2;

impl ConntrackKey {
    /// The key of the other direction of the same connection.
    pub fn pair(&self, entry: &ConntrackEntry) -> ConntrackKey {
        let hairpin = entry.flags & CT_HAIRPIN != 0;
        if entry.kind == CT_FORWARD {
            ConntrackKey {
                saddr: entry.nat_addr,
                daddr: if hairpin { HAIRPIN_IPV4 } else { self.saddr },
                sport: entry.nat_port,
                dport: self.sport,
                protocol: self.protocol,
                _pad: [0; 3],
            }
        } else {
            ConntrackKey {
                saddr: if hairpin { entry.client_ipv4 } else { self.daddr },
                daddr: entry.nat_addr,
                sport: self.dport,
                dport: entry.nat_port,
                protocol: self.protocol,
                _pad: [0; 3],
            }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client_ipv4: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend: Backend,
    pub last_used_ns: u64,
}

/// One IPv4 datagram, as each of its fragments carries it: only the first
/// has ports, so the later ones are matched by this.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The IPv4 identification field, network order.
    pub id: [u8; 2],
    pub protocol: u8,
    pub _pad: u8,
}

/// The addresses the first fragment of a Service datagram got; its later
/// fragments get the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentTranslation {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all are repr(C), made only of integers and byte arrays, with
    // explicit padding fields, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::PodInterface {}
    unsafe impl aya::Pod for super::NodeKey {}
    unsafe impl aya::Pod for super::RemoteNode {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::EndpointTraffic {}
    unsafe impl aya::Pod for super::MonitorConfig {}
    unsafe impl aya::Pod for super::RateBudget {}
    unsafe impl aya::Pod for super::ModeMismatch {}
    unsafe impl aya::Pod for super::RpfCacheEntry {}
    unsafe impl aya::Pod for super::MonitorEvent {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::ConntrackKey {}
    unsafe impl aya::Pod for super::ConntrackEntry {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentTranslation {}
}

/// Why a packet was dropped. The discriminant is the slot in the drop counter
/// map and is stable: never renumber, only append.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// IPv4 source address is not the sending pod's own address.
    SpoofedSource = 1,
    /// TTL was 0 or 1 on a packet we would have forwarded.
    TtlExceeded = 2,
    /// Frame shorter than an Ethernet header.
    TruncatedEthernet = 3,
    /// IPv4 header truncated, IHL below 5, wrong version, or total length
    /// inconsistent with the frame.
    MalformedIpv4 = 4,
    /// ARP packet that is not Ethernet/IPv4 ARP or is truncated.
    MalformedArp = 5,
    /// ARP whose sender protocol address is neither the pod's IP nor 0.0.0.0.
    SpoofedArp = 6,
    /// 802.1Q/802.1ad-tagged frame from a pod: pods get no VLANs.
    VlanTagged = 7,
    /// The program ran on an interface the agent has not registered.
    UnknownInterface = 8,
    /// VXLAN packet whose outer source is not a known peer node.
    UnknownTunnelSource = 9,
    /// VXLAN packet with a VNI other than the cluster's.
    WrongVni = 10,
    /// Tunnel metadata missing on a packet from the VXLAN device.
    NoTunnelKey = 11,
    /// Decapsulated packet for neither a local pod nor this node.
    OverlayUnknownDestination = 12,
    /// Decapsulated packet whose inner source does not belong to the peer
    /// that sent it (neither its pod CIDR nor its node address).
    OverlaySpoofedSource = 13,
    /// Setting the tunnel key for encapsulation failed.
    TunnelEncapFailed = 14,
    /// New connection to a Service port with no ready backend (answered with
    /// ICMP port unreachable so the client fails at once).
    ServiceNoBackend = 15,
    /// New connection to a Service while the connection-tracking map is full
    /// (answered with ICMP port unreachable; existing connections go on).
    ConntrackFull = 16,
    /// Rewriting a Service connection's addresses or checksums failed.
    NatRewriteFailed = 17,
    /// Frame to be forwarded whose destination MAC is not this node's
    /// (another host's unicast, broadcast or multicast): the kernel forwards
    /// only `PACKET_HOST` frames.
    WrongDestinationMac = 18,
    /// Source address no host may use (0.0.0.0/8, 127.0.0.0/8, multicast,
    /// 255.255.255.255).
    MartianSource = 19,
    /// Strict reverse-path check (as `rp_filter=1`) failed: the source is not
    /// reachable back through the interface the packet came in on (a local
    /// pod's or this node's own address from outside, or no route back).
    ReversePath = 20,
    /// IPv4 header checksum does not verify.
    BadIpChecksum = 21,
    /// IPv4 packet with options (source routing, record route, ...) to be
    /// forwarded: not forwarded by the datapath.
    IpOptions = 22,
    /// A peer node sends in the other routing mode (VXLAN to a native node,
    /// plain pod traffic to a VXLAN node).
    PeerModeMismatch = 23,
    /// Forwarding is disabled on the interface the packet came in on
    /// (`net.ipv4.conf.<dev>.forwarding=0`): the kernel would not forward it.
    ForwardingDisabled = 24,
    /// Larger than the destination pod's MTU with DF set: answered with ICMP
    /// fragmentation needed (without DF the kernel fragments it).
    PacketTooBig = 25,
    /// The destination pod's host veth is administratively down.
    EndpointDown = 26,
}

impl DropReason {
    pub const ALL: [DropReason; 26] = [
        DropReason::SpoofedSource,
        DropReason::TtlExceeded,
        DropReason::TruncatedEthernet,
        DropReason::MalformedIpv4,
        DropReason::MalformedArp,
        DropReason::SpoofedArp,
        DropReason::VlanTagged,
        DropReason::UnknownInterface,
        DropReason::UnknownTunnelSource,
        DropReason::WrongVni,
        DropReason::NoTunnelKey,
        DropReason::OverlayUnknownDestination,
        DropReason::OverlaySpoofedSource,
        DropReason::TunnelEncapFailed,
        DropReason::ServiceNoBackend,
        DropReason::ConntrackFull,
        DropReason::NatRewriteFailed,
        DropReason::WrongDestinationMac,
        DropReason::MartianSource,
        DropReason::ReversePath,
        DropReason::BadIpChecksum,
        DropReason::IpOptions,
        DropReason::PeerModeMismatch,
        DropReason::ForwardingDisabled,
        DropReason::PacketTooBig,
        DropReason::EndpointDown,
    ];

    /// Stable snake_case name, used in CLI output, logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::TruncatedEthernet => "truncated_ethernet",
            DropReason::MalformedIpv4 => "malformed_ipv4",
            DropReason::MalformedArp => "malformed_arp",
            DropReason::SpoofedArp => "spoofed_arp",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::UnknownInterface => "unknown_interface",
            DropReason::UnknownTunnelSource => "unknown_tunnel_source",
            DropReason::WrongVni => "wrong_vni",
            DropReason::NoTunnelKey => "no_tunnel_key",
            DropReason::OverlayUnknownDestination => "overlay_unknown_destination",
            DropReason::OverlaySpoofedSource => "overlay_spoofed_source",
            DropReason::TunnelEncapFailed => "tunnel_encap_failed",
            DropReason::ServiceNoBackend => "service_no_backend",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::NatRewriteFailed => "nat_rewrite_failed",
            DropReason::WrongDestinationMac => "wrong_destination_mac",
            DropReason::MartianSource => "martian_source",
            DropReason::ReversePath => "reverse_path",
            DropReason::BadIpChecksum => "bad_ip_checksum",
            DropReason::IpOptions => "ip_options",
            DropReason::PeerModeMismatch => "peer_mode_mismatch",
            DropReason::ForwardingDisabled => "forwarding_disabled",
            DropReason::PacketTooBig => "packet_too_big",
            DropReason::EndpointDown => "endpoint_down",
        }
    }

    /// One line for an operator: what happened and what to look at.
    pub const fn explanation(self) -> &'static str {
        match self {
            DropReason::SpoofedSource => {
                "a pod sent IPv4 with a source address that is not its own (anti-spoofing)"
            }
            DropReason::TtlExceeded => {
                "TTL would reach 0 when forwarded (traceroute, or a routing loop): answered with ICMP time exceeded"
            }
            DropReason::TruncatedEthernet => "frame shorter than an Ethernet header",
            DropReason::MalformedIpv4 => {
                "IPv4 header truncated, bad version/IHL or total length beyond the frame"
            }
            DropReason::MalformedArp => "ARP that is not Ethernet/IPv4 or is truncated",
            DropReason::SpoofedArp => "ARP from a pod claiming an address that is not its own",
            DropReason::VlanTagged => "VLAN-tagged frame from a pod (pods have no VLANs)",
            DropReason::UnknownInterface => {
                "program attached to a veth the agent has not registered (agent state lost?)"
            }
            DropReason::UnknownTunnelSource => {
                "VXLAN packet from an address that is not a known node (forged or stale peer list)"
            }
            DropReason::WrongVni => "VXLAN packet with a VNI other than this cluster's",
            DropReason::NoTunnelKey => "packet on the VXLAN device without tunnel metadata",
            DropReason::OverlayUnknownDestination => {
                "decapsulated packet for an address that is neither a local pod nor this node"
            }
            DropReason::OverlaySpoofedSource => {
                "decapsulated packet whose source is not in the sending node's pod CIDR"
            }
            DropReason::TunnelEncapFailed => "setting the VXLAN tunnel key failed",
            DropReason::ServiceNoBackend => {
                "new connection to a Service with no ready backend (refused with ICMP port unreachable)"
            }
            DropReason::ConntrackFull => {
                "connection-tracking map full: new Service connection refused (raise conntrack_max_entries)"
            }
            DropReason::NatRewriteFailed => {
                "rewriting a Service connection's addresses, ports or checksums failed (kernel helper error)"
            }
            DropReason::WrongDestinationMac => {
                "frame to forward not addressed to this node's MAC (other host, broadcast or multicast)"
            }
            DropReason::MartianSource => {
                "martian source address (0.0.0.0/8, 127.0.0.0/8, multicast or 255.255.255.255)"
            }
            DropReason::ReversePath => {
                "reverse-path check failed (rp_filter=1): source not reachable back through the ingress interface (spoofed or reflected)"
            }
            DropReason::BadIpChecksum => "IPv4 header checksum does not verify",
            DropReason::IpOptions => {
                "IPv4 packet with options (source route, record route, ...) is not forwarded"
            }
            DropReason::PeerModeMismatch => {
                "a peer node sends in the other routing mode (native vs vxlan): set the same mode on every node"
            }
            DropReason::ForwardingDisabled => {
                "forwarding is off on the ingress interface (net.ipv4.conf.<dev>.forwarding=0)"
            }
            DropReason::PacketTooBig => {
                "larger than the destination pod's MTU with DF set: answered with ICMP fragmentation needed"
            }
            DropReason::EndpointDown => "the destination pod's host veth is administratively down",
        }
    }

    pub const fn from_u32(value: u32) -> Option<DropReason> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u32 == value {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

/// What happened to a packet that was not dropped. The discriminant is the
/// slot in the forward counter map; stable, append only.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardPath {
    /// Redirected straight into a pod on this node (`bpf_redirect_peer`).
    LocalDelivery = 0,
    /// Handed to the node's own stack (node addresses, unknown destinations,
    /// non-IPv4 protocols).
    ToHostStack = 1,
    /// ARP request answered by the program with the host veth's MAC.
    ArpReply = 2,
    /// Sent straight out of the uplink to the peer node (native routing).
    ToRemoteNative = 3,
    /// Encapsulated into VXLAN towards the peer node.
    ToRemoteOverlay = 4,
}

impl ForwardPath {
    pub const ALL: [ForwardPath; 5] = [
        ForwardPath::LocalDelivery,
        ForwardPath::ToHostStack,
        ForwardPath::ArpReply,
        ForwardPath::ToRemoteNative,
        ForwardPath::ToRemoteOverlay,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ForwardPath::LocalDelivery => "local_delivery",
            ForwardPath::ToHostStack => "to_host_stack",
            ForwardPath::ArpReply => "arp_reply",
            ForwardPath::ToRemoteNative => "to_remote_native",
            ForwardPath::ToRemoteOverlay => "to_remote_overlay",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_slots_fit_their_maps() {
        for r in DropReason::ALL {
            assert!((r as u32) < DROP_REASON_SLOTS, "{r:?}");
            assert!((r as u32) < 256, "fits MonitorEvent::code");
            assert_eq!(DropReason::from_u32(r as u32), Some(r));
        }
        for p in ForwardPath::ALL {
            assert!((p as u32) < FORWARD_PATH_SLOTS, "{p:?}");
        }
    }

    #[test]
    fn martian_sources_are_linux_martians() {
        for martian in
            [[0, 0, 0, 0], [0, 1, 2, 3], [127, 0, 0, 1], [224, 0, 0, 5], [239, 255, 1, 1], [255; 4]]
        {
            assert!(is_martian_source(martian), "{martian:?}");
        }
        for fine in [[10, 244, 1, 2], [1, 0, 0, 0], [126, 255, 255, 255], [240, 0, 0, 1], [169, 254, 1, 1]] {
            assert!(!is_martian_source(fine), "{fine:?}");
        }
    }

    #[test]
    fn pod_cidr_membership() {
        let config = NodeConfig { pod_cidr: [10, 244, 1, 0], pod_prefix_len: 24, ..NodeConfig::default() };
        assert!(config.in_pod_cidr([10, 244, 1, 0]));
        assert!(config.in_pod_cidr([10, 244, 1, 255]));
        assert!(!config.in_pod_cidr([10, 244, 2, 1]));
        let host = NodeConfig { pod_cidr: [10, 0, 0, 7], pod_prefix_len: 32, ..NodeConfig::default() };
        assert!(host.in_pod_cidr([10, 0, 0, 7]) && !host.in_pod_cidr([10, 0, 0, 6]));
        // Unset: nothing is inside.
        assert!(!NodeConfig::default().in_pod_cidr([0, 0, 0, 0]));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<EndpointKey>(), 4);
        assert_eq!(core::mem::size_of::<Endpoint>(), 24);
        assert_eq!(core::mem::size_of::<PodInterface>(), 16);
        assert_eq!(core::mem::size_of::<EndpointTraffic>(), 32);
        assert_eq!(core::mem::size_of::<MonitorBudget>(), 16);
        assert_eq!(core::mem::size_of::<MonitorEvent>(), 40);
        assert_eq!(core::mem::offset_of!(MonitorEvent, version), MONITOR_EVENT_VERSION_OFFSET);
        assert_eq!(core::mem::size_of::<RemoteNode>(), 8);
        assert_eq!(core::mem::size_of::<NodeConfig>(), 36);
        assert_eq!(core::mem::size_of::<ModeMismatch>(), 16);
        assert_eq!(core::mem::size_of::<RpfCacheEntry>(), 16);
        assert!(RPF_CACHE_SLOTS.is_power_of_two());
    }
}
