//! Types shared by the eBPF programs (`datapath-ebpf`) and the agent.
//!
//! Everything that crosses the kernel/user boundary lives here, once: map
//! key/value layouts (`#[repr(C)]`, explicit padding, addresses as
//! network-order byte arrays) and the numbering of verdict counters.
#![no_std]

#[macro_use]
mod wire_enum;

/// Names of the maps, as the loader and `bpftool` see them. The pin files under
/// the bpffs directory carry the same names.
pub mod map_names {
    /// Pod IPv4 -> [`super::Endpoint`]: where to deliver a packet for a local pod.
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// Host veth ifindex -> [`super::PodInterface`]: who is sending on this veth.
    pub const POD_INTERFACES: &str = "POD_INTERFACES";
    /// Per-CPU [`super::PacketCount`]s indexed by [`super::drop_slot`]
    /// (direction and [`super::DropReason`]).
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    /// Per-CPU [`super::PacketCount`]s indexed by [`super::forward_slot`]
    /// (direction and [`super::ForwardPath`]).
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
    /// [`super::EndpointKey`] (a local pod) -> [`super::PolicyEndpoint`]:
    /// which directions of that pod NetworkPolicy isolates.
    pub const POLICY_ENDPOINTS: &str = "POLICY_ENDPOINTS";
    /// LPM trie: peer address prefix -> [`super::PolicyPeer`], the peer's
    /// identity (the set of policy peer terms it matches).
    pub const POLICY_PEERS: &str = "POLICY_PEERS";
    /// LPM trie: [`super::PolicyRuleKey`] (endpoint, peer identity,
    /// direction, protocol, port prefix) -> [`super::PolicyAllow`].
    pub const POLICY_RULES: &str = "POLICY_RULES";
    /// Per-CPU counters of new connections judged by policy, indexed by
    /// [`super::policy_verdict_slot`].
    pub const POLICY_VERDICTS: &str = "POLICY_VERDICTS";
    /// [`super::ConntrackClientKey`] (a client address) ->
    /// [`super::ConntrackClient`]: its tracked connections, for
    /// `conntrack_max_per_client` (the agent recounts at each sweep).
    pub const CONNTRACK_CLIENTS: &str = "CONNTRACK_CLIENTS";
    /// Per-CPU room where the programs make an ICMP answer (the frame and
    /// the packet it quotes: too big for their stack).
    pub const ANSWER_SCRATCH: &str = "ANSWER_SCRATCH";
    /// LRU [`super::SockRevNatKey`] (a socket, the backend it was sent
    /// to) -> [`super::SockRevNat`] (the Service address it asked for):
    /// what the node's own UDP sockets see replies come from.
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// Array of [`super::MAX_OUTSIDE_OPENING`] [`super::ConntrackKey`]s: the
    /// forward keys of the TCP connections clients outside opened lately,
    /// each in a slot drawn at random: where a full outside share finds an
    /// unanswered one to give up (early drop).
    pub const CONNTRACK_OUTSIDE_OPENING: &str = "CONNTRACK_OUTSIDE_OPENING";
    /// Per-CPU room for the two keys early drop works with (the programs'
    /// main frame leaves no room for them on the stack).
    pub const EARLY_DROP_SCRATCH: &str = "EARLY_DROP_SCRATCH";
    pub const ALL: [&str; 29] = [
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
        POLICY_ENDPOINTS,
        POLICY_PEERS,
        POLICY_RULES,
        POLICY_VERDICTS,
        CONNTRACK_CLIENTS,
        ANSWER_SCRATCH,
        SOCK_REVNAT,
        CONNTRACK_OUTSIDE_OPENING,
        EARLY_DROP_SCRATCH,
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
    /// TC egress of each pod's host-side veth: what the node's own stack
    /// routes into the pod (our redirects into pods bypass it).
    pub const TO_POD: &str = "to_pod";
    /// Every TC program of the object.
    pub const ALL: [&str; 4] = [FROM_POD, FROM_UPLINK, FROM_OVERLAY, TO_POD];
    /// Socket-level load balancing for the node's own sockets (cgroup
    /// sock_addr hooks on the root cgroup): a connect() or sendmsg() to a
    /// Service goes straight to a backend; recvmsg() and getpeername()
    /// show the Service again.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// The same for dual-stack (AF_INET6) sockets to IPv4-mapped addresses.
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
    pub const SOCKET_ALL: [&str; 8] = [
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        SOCK_CONNECT6,
        SOCK_SENDMSG6,
        SOCK_RECVMSG6,
        SOCK_GETPEERNAME6,
    ];
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
/// Client addresses whose tracked connections are counted at once (pods,
/// and outside clients of NodePorts): past it, new clients go uncounted.
pub const MAX_CONNTRACK_CLIENTS: u32 = 65_536;
/// Slots of the ring of outside TCP connections opened lately that early
/// drop looks in (four times TCP's share of the default
/// `conntrack_max_outside`: a full share of the newest connections fills a
/// quarter of it).
pub const MAX_OUTSIDE_OPENING: u32 = 32_768;
/// Capacity of the sessionAffinity map (LRU: the oldest affinity goes first).
pub const MAX_AFFINITY_ENTRIES: u32 = 65_536;
/// Fragmented Service datagrams in flight at once (LRU: the oldest goes).
pub const MAX_FRAGMENTED_DATAGRAMS: u32 = 8_192;
/// Source address a pod's connection to itself through a Service is
/// translated to: a packet from its own address would be a martian to it.
pub const HAIRPIN_IPV4: [u8; 4] = [169, 254, 42, 1];

/// IPv4 protocol numbers, as in the header, [`ServiceKey::protocol`] and
/// [`MonitorEvent::protocol`].
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
/// Ethertypes, as in the Ethernet header and [`MonitorEvent::ethertype`]
/// (both big-endian).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
/// The IPv4 flags and fragment offset field (read big-endian): don't
/// fragment, more fragments, and the offset (non-zero: a later fragment,
/// which carries no ports).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;
/// The programs write a connection's [`ConntrackEntry::last_seen_ns`] at
/// most this often (one cache line write per connection per interval, not
/// per packet), so it may lag by this much: the agent's idle timeouts allow
/// for it.
pub const CONNTRACK_LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

wire_enum! {
    /// Which program saw the packet: where it came from.
    pub enum Direction {
        FromPod = 0, "from_pod", "sent by a local pod (TC ingress of its host veth)";
        FromUplink = 1, "from_uplink", "arrived on the node's uplink (either routing mode)";
        FromOverlay = 2, "from_overlay", "arrived through the VXLAN device (overlay)";
        ToPod = 3, "to_pod",
            "routed into a local pod by the node's own stack (TC egress of its host veth)";
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
    /// [`ENDPOINT_FLAG_HOST_DOWN`], and the directions NetworkPolicy
    /// isolates the pod in ([`Endpoint::isolation`]); the rest reserved.
    pub flags: u32,
    /// Index of this pod's [`EndpointTraffic`] counters, or [`NO_TRAFFIC_SLOT`].
    pub traffic_slot: u32,
}

/// The pod's host veth is administratively down: the kernel would not
/// forward to the pod (its /32 route is gone), so neither do we.
pub const ENDPOINT_FLAG_HOST_DOWN: u32 = 1;
/// Where [`Endpoint::flags`] holds the pod's isolation ([`POLICY_INGRESS`] |
/// [`POLICY_EGRESS`], shifted): a copy of its `POLICY_ENDPOINTS` entry, so
/// that judging a packet needs no lookup beyond the endpoint's own.
pub const ENDPOINT_ISOLATION_SHIFT: u32 = 1;
const ISOLATION_BITS: u32 = POLICY_INGRESS | POLICY_EGRESS;

impl Endpoint {
    /// The directions NetworkPolicy isolates this pod in.
    #[inline(always)]
    pub const fn isolation(&self) -> u32 {
        (self.flags >> ENDPOINT_ISOLATION_SHIFT) & ISOLATION_BITS
    }

    /// This entry with `isolation` in its flags, the other flags kept.
    pub const fn with_isolation(self, isolation: u32) -> Endpoint {
        let flags = (self.flags & !(ISOLATION_BITS << ENDPOINT_ISOLATION_SHIFT))
            | ((isolation & ISOLATION_BITS) << ENDPOINT_ISOLATION_SHIFT);
        Endpoint { flags, ..self }
    }
}

/// What the "from pod" program knows about the veth a packet entered on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// The only IPv4 source address this pod may use (network byte order).
    pub pod_ipv4: [u8; 4],
    /// MAC of the host-side veth: the answer to the pod's ARP requests.
    pub host_mac: [u8; 6],
    /// The directions NetworkPolicy isolates the pod in ([`POLICY_INGRESS`]
    /// | [`POLICY_EGRESS`]): a copy of its `POLICY_ENDPOINTS` entry, as in
    /// [`Endpoint::flags`]. Zero in entries of builds before it: they were
    /// padding (the agent writes it before any program reads it).
    pub isolation: u8,
    pub _pad: u8,
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

/// Packets and bytes (per CPU) of one drop reason or forward path in one
/// direction. Bytes are the frame as the program saw it (Ethernet header
/// included); a connection given up by early drop counts one packet of 0
/// bytes (no packet of its own was dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketCount {
    pub packets: u64,
    pub bytes: u64,
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

wire_enum! {
    /// What became of a monitor event: the slot in `MONITOR_COUNTERS`.
    pub enum MonitorOutcome {
        Emitted = 0, "emitted", "written to the ring buffer";
        RateLimited = 1, "rate_limited",
            "over the per-CPU budget: not emitted (a flood cannot starve the datapath)";
        RingFull = 2, "ring_full", "the ring buffer was full (nobody reading, or reading too slowly)";
    }
}

impl MonitorOutcome {
    /// Slots of `MONITOR_COUNTERS`: room for one more outcome.
    pub const SLOTS: u32 = 4;
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

wire_enum! {
    /// How this node reaches other nodes' pods ([`NodeConfig::mode`]).
    pub enum RoutingMode {
        Unset = 0, "unset", "no cross-node forwarding configured: remote traffic goes to the host stack";
        Native = 1, "native", "straight out of the uplink to the peer node (L2-adjacent nodes)";
        Vxlan = 2, "vxlan", "encapsulated in VXLAN towards the peer node";
    }
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
    /// Unanswered connections one client address may have tracked at once
    /// (`conntrack_max_per_client`; 0: no limit).
    pub conntrack_max_per_client: u32,
    /// The network namespace of the node's own sockets (its cookie): the
    /// socket programs translate Service addresses for sockets in it only
    /// (they are attached to a cgroup, which spans namespaces). 0: none.
    pub host_netns_cookie: u64,
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
/// Some local pod is isolated by NetworkPolicy: packets of local pods are
/// looked up in `POLICY_ENDPOINTS`. Unset, policy costs nothing.
pub const NODE_FLAG_POLICY: u32 = 2;

/// A Service port: cluster IP, port and protocol, as they sit in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    /// Whose connections this entry serves: [`SERVICE_SCOPE_CLUSTER`] or
    /// [`SERVICE_SCOPE_OUTSIDE`]. (This byte was padding, always 0, before
    /// scopes: an earlier build's entries mean what scope 0 means, and an
    /// earlier build never looks up scope 1. The map's version stays.)
    pub scope: u8,
}

/// Clients in the cluster: pods (the packet path), the node's own sockets
/// (socket LB), and anything at the node's address at a node port.
pub const SERVICE_SCOPE_CLUSTER: u8 = 0;
/// Packets from outside the cluster that arrive at the node's uplink for an
/// external or load balancer address: served as externalTrafficPolicy says
/// (Local: only this node's backends, the client's address kept).
pub const SERVICE_SCOPE_OUTSIDE: u8 = 1;

/// What the datapath needs of a Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Agent-chosen, unique while the Service exists; keys its backends.
    pub id: u32,
    /// Backends in slots 0..backend_count; 0 = reject new connections.
    pub backend_count: u32,
    /// [`SERVICE_AFFINITY_CLIENT_IP`], [`SERVICE_DROP_WITHOUT_BACKEND`].
    pub flags: u32,
    /// sessionAffinity timeout (ClientIP).
    pub affinity_timeout_seconds: u32,
}

/// sessionAffinity: ClientIP.
pub const SERVICE_AFFINITY_CLIENT_IP: u32 = 1;
/// With no backend, drop new connections unanswered instead of refusing
/// them: internalTrafficPolicy Local on a node without a local backend
/// while other nodes have some (kube-proxy drops these too).
pub const SERVICE_DROP_WITHOUT_BACKEND: u32 = 2;

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
    /// TCP: the sequence number just after the last data (or SYN, FIN)
    /// this direction sent, host byte order: one past its initial
    /// sequence number after its SYN, then moved on by its segments (up to
    /// [`TCP_DATA_STEP`] at once). The other direction's
    /// acknowledgements are recorded only up to it, and its handshake ACK
    /// must acknowledge it before the connection counts as answered (a
    /// blind ACK from a faked source cannot). 0: not known (UDP, a
    /// connection picked up without a SYN, an entry converted from layout
    /// v3 or older): not checked.
    pub seq_end: u32,
    /// TCP: the highest acknowledgement number this direction sent, host
    /// byte order. An RST or FIN from the other direction changes the
    /// connection's state only if its sequence number is at or just past
    /// it ([`TCP_RST_WINDOW`], [`TCP_FIN_WINDOW`]), so a blind RST or FIN
    /// spray cannot cut connections short. Recorded from the client's
    /// side only once its handshake ACK was checked, and only up to what
    /// the other direction sent (its `seq_end`, where known): a faked ACK
    /// cannot move it past the real sender's data. 0: none yet, not
    /// checked.
    pub ack: u32,
}

/// How far past the receiver's last acknowledgement an RST's sequence
/// number may be (data in flight when it was sent) for it to close the
/// connection here, and how far past the other direction's SYN the
/// handshake ACK may acknowledge. Outside it, the RST is passed on but
/// changes nothing here: the endpoint applies its own exact check (RFC
/// 5961: an RST not at the exact place gets a challenge ACK, whose answer
/// is an RST at the exact place), as netfilter moves a connection's state
/// only on an RST at the exact place. A blind sender hits 1 in 65,536 per
/// guessed 5-tuple.
pub const TCP_RST_WINDOW: u32 = 1 << 16;
/// The same for a FIN, which moves the connection to half-closed only
/// inside this (bulk senders close with up to a window of data in
/// flight).
pub const TCP_FIN_WINDOW: u32 = 1 << 20;
/// How far past its last acknowledgement a direction's next one may jump
/// and still be recorded: a faked segment moves the place an RST must hit
/// to one of its choosing 1 in 256 blind guesses, not 1 in 2.
pub const TCP_ACK_JUMP: u32 = 1 << 24;

/// Does acknowledgement number `ack` acknowledge no more than the other
/// direction sent (up to its `end`), and at most `window` less (0: not
/// known, anything does)? Wrapping, as sequence numbers do.
#[inline(always)]
pub fn tcp_acknowledges_sent(ack: u32, end: u32, window: u32) -> bool {
    end == 0 || end.wrapping_sub(ack) < window
}

/// How far a direction's data end ([`ConntrackEntry::seq_end`]) may move
/// on at once: past a segment's worth (a BIG TCP one is up to 512 KiB,
/// and one may overtake another), so real data always moves it; short, so
/// a faked data segment lands 1 in 4,096 guesses, and a blind walk that
/// moves a data end and the other side's acknowledgement together, pair of
/// faked segments by pair, needs 4,096 pairs per lap of the sequence
/// space (red team round 33: 275 pairs at 16 MiB steps).
pub const TCP_DATA_STEP: u32 = 1 << 20;

/// Is TCP sequence number `seq` at or up to `window` past `base` (0: not
/// known, anything is)? Wrapping, as sequence numbers do.
#[inline(always)]
pub fn tcp_in_window(seq: u32, base: u32, window: u32) -> bool {
    base == 0 || seq.wrapping_sub(base) < window
}

pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
/// A connection NetworkPolicy allowed (no translation): keyed by its first
/// packet's 5-tuple as it travels between the pods (after any Service
/// translation); its replies match the key reversed. One entry per
/// connection, no pair.
pub const CT_POLICY: u8 = 2;
/// The client is the backend itself (a pod reaching itself through a Service).
pub const CT_HAIRPIN: u8 = 1;
/// An RST was seen (entries of builds before [`CT_STATEFUL`]: or a FIN):
/// the connection is over, and the agent removes it once it is quiet for
/// `conntrack_closing_seconds`.
pub const CT_CLOSING: u8 = 2;
/// TCP: this entry's direction sent a FIN (a policy entry: its first
/// packet's direction). With a FIN both ways the connection is closing;
/// with one, half-closed (`conntrack_half_closed_seconds`).
pub const CT_FIN: u8 = 4;
/// This entry's direction sent more than its first packet: the forward
/// direction an ACK (TCP: the handshake went on), the reply direction
/// anything (any protocol: the connection was answered). Until both directions have, the connection is opening
/// (`conntrack_opening_seconds`, short): a flood of SYNs nobody completes
/// cannot hold the table for the TCP idle time.
pub const CT_SEEN: u8 = 8;
/// [`CT_FIN`] and [`CT_SEEN`] of a policy entry's reply direction (a policy
/// entry stands for both directions).
pub const CT_FIN_REPLY: u8 = 16;
pub const CT_SEEN_REPLY: u8 = 32;
/// Made by a build that records [`CT_SEEN`]: an entry without it is from
/// an older one, and counts as established.
pub const CT_STATEFUL: u8 = 64;
/// A connection from outside the cluster to another node's backend (a node
/// port, or an external or load balancer address, with
/// externalTrafficPolicy Cluster): its packets leave this node from the
/// node's own address and a port of [`SNAT_PORT_RANGES`], so that the replies
/// come back here. Fields change meaning (the entry's size stays, so the
/// pinned map carries over):
/// - forward entry (client -> service address:port): `nat_addr:nat_port`
///   the backend as usual; `client_ipv4` the node's address the packets
///   leave from (the client is the key's source); `service_id` the source
///   port given ([`ConntrackEntry::snat_port`]);
/// - reply entry (backend -> node:source port): `nat_addr:nat_port` the
///   Service address and port the client asked for; `client_ipv4` the
///   client, `service_id` its port ([`ConntrackEntry::snat_client_port`]).
pub const CT_SNAT: u8 = 128;

/// The source ports NodePort connections to other nodes' backends take on
/// the node's address: outside Linux's default ephemeral range
/// (32768-60999), so that they never meet the node's own connections, and
/// outside the node port range (30000-32767) and the privileged ports. A
/// port is held per (node address, backend address and port): each live
/// or closing connection to one backend port through one node takes one,
/// so these 33,512 bound how many such connections a node holds at once
/// (61000-65535 alone, 4536, ran out under a single client's TCP_CRR).
pub const SNAT_PORT_RANGES: [core::ops::RangeInclusive<u16>; 2] = [1_024..=29_999, 61_000..=65_535];
/// How many ports [`SNAT_PORT_RANGES`] hold.
pub const SNAT_PORT_COUNT: u32 = (29_999 - 1_024 + 1) + (65_535 - 61_000 + 1);

/// The `index`-th port of [`SNAT_PORT_RANGES`] (`index` below
/// [`SNAT_PORT_COUNT`]; larger ones wrap).
#[inline(always)]
pub const fn snat_port_at(index: u32) -> u16 {
    const FIRST_LEN: u32 = 29_999 - 1_024 + 1;
    let index = index % SNAT_PORT_COUNT;
    if index < FIRST_LEN { (1_024 + index) as u16 } else { (61_000 + index - FIRST_LEN) as u16 }
}

/// Is `port` one of [`SNAT_PORT_RANGES`]?
pub fn is_snat_port(port: u16) -> bool {
    SNAT_PORT_RANGES.iter().any(|range| range.contains(&port))
}

impl ConntrackEntry {
    /// A [`CT_SNAT`] forward entry's source port (network byte order).
    pub fn snat_port(&self) -> [u8; 2] {
        port_of_id(self.service_id)
    }

    /// A [`CT_SNAT`] reply entry's client port (network byte order).
    pub fn snat_client_port(&self) -> [u8; 2] {
        port_of_id(self.service_id)
    }
}

/// A port (network byte order) kept in a [`CT_SNAT`] entry's `service_id`.
pub fn snat_port_id(port: [u8; 2]) -> u32 {
    u32::from(u16::from_be_bytes(port))
}

fn port_of_id(id: u32) -> [u8; 2] {
    (id as u16).to_be_bytes()
}

/// Is the connection an entry of kind `kind` with `flags` belongs to
/// (`pair_flags`: its other entry's, 0 if none) unanswered: TCP never
/// answered and acknowledged both ways (an RST is no answer; closing
/// since or not), other protocols not answered at all? These are what
/// `conntrack_max_per_client` limits: connections nobody completes.
pub fn unanswered(protocol: u8, kind: u8, flags: u8, pair_flags: u8) -> bool {
    if protocol == IPPROTO_TCP {
        // Closing without ever being established counts too: segments
        // the backend only reset (a flood of stray ACKs) were not answered.
        return TcpState::never_established_of(kind, flags, pair_flags);
    }
    let (own, pair) = if kind == CT_REPLY { (pair_flags, flags) } else { (flags, pair_flags) };
    let answered = if kind == CT_POLICY { own & CT_SEEN_REPLY != 0 } else { pair & CT_SEEN != 0 };
    (own | pair) & CT_STATEFUL != 0 && !answered
}

/// Where a TCP connection stands, from the flags of its entries (both
/// directions), for the collector's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Not yet answered and acknowledged both ways.
    Opening,
    Established,
    /// One direction sent a FIN.
    HalfClosed,
    /// FIN both ways, or an RST.
    Closing,
}

impl TcpState {
    /// The state of a connection whose entry of kind `kind` has `flags`,
    /// and whose other entry (a Service connection's other direction) has
    /// `pair_flags` (0 when there is none).
    pub fn of(kind: u8, flags: u8, pair_flags: u8) -> TcpState {
        // Each direction's own bits, as a policy entry holds them.
        let as_policy = |kind: u8, flags: u8| {
            if kind == CT_REPLY {
                let fin = if flags & CT_FIN != 0 { CT_FIN_REPLY } else { 0 };
                let seen = if flags & CT_SEEN != 0 { CT_SEEN_REPLY } else { 0 };
                (flags & !(CT_FIN | CT_SEEN)) | fin | seen
            } else {
                flags
            }
        };
        let pair_kind = if kind == CT_REPLY { CT_FORWARD } else { CT_REPLY };
        let state = as_policy(kind, flags) | as_policy(pair_kind, pair_flags);
        let fins = state & (CT_FIN | CT_FIN_REPLY);
        if state & CT_CLOSING != 0 || fins == CT_FIN | CT_FIN_REPLY {
            TcpState::Closing
        } else if Self::never_established(state) {
            // (A SYN with a FIN too opens nothing half-closed.)
            TcpState::Opening
        } else if fins != 0 {
            TcpState::HalfClosed
        } else {
            TcpState::Established
        }
    }

    /// Made by a build that records it, and not (yet) answered and
    /// acknowledged both ways (an RST is no answer), from the bits of both
    /// directions as a policy entry holds them.
    fn never_established(state: u8) -> bool {
        state & CT_STATEFUL != 0 && state & (CT_SEEN | CT_SEEN_REPLY) != CT_SEEN | CT_SEEN_REPLY
    }

    /// Was the connection an entry of kind `kind` with `flags` belongs to
    /// (`pair_flags`: its other entry's) never established, however it
    /// stands now (closing included)?
    pub fn never_established_of(kind: u8, flags: u8, pair_flags: u8) -> bool {
        let as_policy = |kind: u8, flags: u8| {
            if kind != CT_REPLY {
                return flags;
            }
            let seen = if flags & CT_SEEN != 0 { CT_SEEN_REPLY } else { 0 };
            seen | (flags & CT_STATEFUL)
        };
        let pair_kind = if kind == CT_REPLY { CT_FORWARD } else { CT_REPLY };
        Self::never_established(as_policy(kind, flags) | as_policy(pair_kind, pair_flags))
    }
}

impl ConntrackKey {
    /// The key of the other direction of the same connection.
    /// A [`CT_POLICY`] entry has no other entry: its own key.
    /// [`Self::pair`] of a forward entry, as the four native-order words
    /// of the key's bytes, padding zero: what the programs write into map
    /// memory where a key made on their stack has no room (and its padding
    /// would cost a call to `memset`).
    #[inline(always)]
    pub fn forward_pair_words(&self, entry: &ConntrackEntry) -> [u32; 4] {
        let (daddr, dport) = if entry.flags & CT_SNAT != 0 {
            (entry.client_ipv4, entry.snat_port())
        } else if entry.flags & CT_HAIRPIN != 0 {
            (HAIRPIN_IPV4, self.sport)
        } else {
            (self.saddr, self.sport)
        };
        [
            u32::from_ne_bytes(entry.nat_addr),
            u32::from_ne_bytes(daddr),
            u32::from_ne_bytes([entry.nat_port[0], entry.nat_port[1], dport[0], dport[1]]),
            u32::from_ne_bytes([self.protocol, 0, 0, 0]),
        ]
    }

    pub fn pair(&self, entry: &ConntrackEntry) -> ConntrackKey {
        if entry.kind == CT_POLICY {
            return *self;
        }
        let hairpin = entry.flags & CT_HAIRPIN != 0;
        if entry.flags & CT_SNAT != 0 {
            // The reply entry is keyed on the node's address at the source
            // port given; the forward one on the Service address.
            return if entry.kind == CT_FORWARD {
                ConntrackKey {
                    saddr: entry.nat_addr,
                    daddr: entry.client_ipv4,
                    sport: entry.nat_port,
                    dport: entry.snat_port(),
                    protocol: self.protocol,
                    _pad: [0; 3],
                }
            } else {
                ConntrackKey {
                    saddr: entry.client_ipv4,
                    daddr: entry.nat_addr,
                    sport: entry.snat_client_port(),
                    dport: entry.nat_port,
                    protocol: self.protocol,
                    _pad: [0; 3],
                }
            };
        }
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

/// A socket of the node's own (its cookie) and the backend address it sent
/// to, as the socket sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub backend_ipv4: [u8; 4],
    /// Network byte order.
    pub backend_port: [u8; 2],
    pub _pad: [u8; 2],
}

/// The Service address and port a socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    pub vip: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Capacity of the socket reverse translation map (LRU: the oldest goes).
pub const MAX_SOCK_REVNAT: u32 = 65_536;

/// A client address, as its connections' first packets carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConntrackClientKey {
    pub ipv4: [u8; 4],
}

/// How many of a client's tracked connections are [`unanswered`] (Service
/// connections it opened, connections policy allowed it): the programs add
/// one for each they start tracking and take it off when it is answered;
/// the agent's collector recounts at each sweep.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackClient {
    pub connections: u32,
    /// Under [`OUTSIDE_TCP_CLIENTS`] and [`OUTSIDE_UDP_CLIENTS`] only: the
    /// most unanswered Service connections of that protocol all clients
    /// outside the cluster may have together (half of
    /// `conntrack_max_outside` each; 0: no limit); under
    /// [`OUTSIDE_TCP_HELD`], the most TCP ones answered or not (all of it). 0 under a client's own key
    /// (its limit is [`NodeConfig::conntrack_max_per_client`]). This was
    /// padding: an entry of an older build reads as "no limit".
    pub limit: u32,
}

/// The key under which [`ConntrackClient`] counts the unanswered TCP (and
/// any other non-UDP) Service connections of every client outside the
/// cluster together (node ports, external and load balancer addresses,
/// reached from the uplink). One host can send from many addresses (any
/// address the node routes back out of the uplink passes the reverse-path
/// check), so a limit per address does not hold it; this one keeps such a
/// flood to its share of the table, and the pods' own connections out of
/// its reach. 0.0.0.0 is never a client's address (a martian source).
pub const OUTSIDE_TCP_CLIENTS: ConntrackClientKey = ConntrackClientKey { ipv4: [0; 4] };

/// As [`OUTSIDE_TCP_CLIENTS`], for UDP flows from outside, which count as
/// long as they are tracked (an answer proves nothing about a UDP source).
/// A share of its own: a burst of faked UDP datagrams, which holds its
/// share for the whole UDP timer, never locks TCP clients out. 0.0.0.1 is
/// never a client's address either (0.0.0.0/8 is martian).
pub const OUTSIDE_UDP_CLIENTS: ConntrackClientKey = ConntrackClientKey { ipv4: [0, 0, 0, 1] };

/// As [`OUTSIDE_TCP_CLIENTS`], for every TCP Service connection from
/// outside the table holds, answered or not, held to all of
/// `conntrack_max_outside`: one outside host that completes its
/// handshakes and keeps its connections open cannot take the pods' part
/// of the table (red team round 29, R29-4). 0.0.0.2, martian as well.
pub const OUTSIDE_TCP_HELD: ConntrackClientKey = ConntrackClientKey { ipv4: [0, 0, 0, 2] };

/// The key counting outside clients' connections of `protocol`.
#[inline(always)]
pub const fn outside_clients(protocol: u8) -> ConntrackClientKey {
    if protocol == IPPROTO_UDP { OUTSIDE_UDP_CLIENTS } else { OUTSIDE_TCP_CLIENTS }
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

/// Which directions of a local pod NetworkPolicy isolates
/// ([`POLICY_INGRESS`], [`POLICY_EGRESS`]); a pod without an entry is
/// isolated in neither.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEndpoint {
    pub flags: u32,
}

/// Isolated for ingress: only what a rule allows reaches the pod.
pub const POLICY_INGRESS: u32 = 1;
/// Isolated for egress: only what a rule allows leaves the pod.
pub const POLICY_EGRESS: u32 = 2;

/// The identity of a peer address: every address of one identity matches
/// exactly the same policy peer terms (selectors and ipBlocks) on this
/// node. Addresses in no entry have [`POLICY_IDENTITY_NONE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyPeer {
    pub identity: u32,
}

/// The identity of addresses that match no peer term.
pub const POLICY_IDENTITY_NONE: u32 = 0;

/// Key of `POLICY_RULES` (the LPM trie's data after its prefix length):
/// fields in the order they are matched, network byte order. A rule for
/// every protocol stops after `direction` (72 bits), one for every port of a
/// protocol after `protocol` (80 bits), a port range is split into aligned
/// blocks (80 + 16 - k bits), a single port is all 96 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRuleKey {
    /// The local pod the rule is for.
    pub endpoint: [u8; 4],
    /// The peer's identity, big-endian.
    pub identity: [u8; 4],
    /// [`POLICY_INGRESS`] or [`POLICY_EGRESS`].
    pub direction: u8,
    /// IP protocol.
    pub protocol: u8,
    /// Destination port, network byte order.
    pub port: [u8; 2],
}

/// Prefix lengths of [`PolicyRuleKey`] entries.
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 72;
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;

/// Value of a `POLICY_RULES` entry: present means allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyAllow {
    /// Reserved; zero.
    pub flags: u32,
}

/// Capacity of `POLICY_PEERS`: every pod of the cluster a policy of this
/// node's pods names, and the ipBlock prefixes.
pub const MAX_POLICY_PEERS: u32 = 262_144;
/// Capacity of `POLICY_RULES`: (local pod, peer identity, port block) entries.
pub const MAX_POLICY_RULES: u32 = 524_288;

/// Counter slots of `POLICY_VERDICTS`.
pub const POLICY_VERDICT_SLOTS: u32 = 4;

/// Slot of (direction, allowed) in `POLICY_VERDICTS`: new connections
/// (packets without a tracked connection) judged for an isolated pod.
#[inline(always)]
pub const fn policy_verdict_slot(direction: u32, allowed: bool) -> u32 {
    (if direction == POLICY_EGRESS { 2 } else { 0 }) + if allowed { 0 } else { 1 }
}

/// Every type that crosses the boundary, with its size in bytes: the
/// programs and the agent must agree on each byte, so a change of layout
/// fails the build here instead of misreading a map. The agent's side also
/// gets `aya::Pod` for each (feature `user`).
macro_rules! shared_types {
    ($($Type:ident = $size:literal,)+) => {
        $(const _: () = assert!(core::mem::size_of::<$Type>() == $size);)+

        #[cfg(feature = "user")]
        mod pod_impls {
            use super::*;
            // SAFETY: all are repr(C), made only of integers and byte arrays,
            // with explicit padding fields (the sizes above leave no room for
            // a hole), so every bit pattern is valid and there are no holes.
            $(unsafe impl aya::Pod for $Type {})+
        }
    };
}

shared_types! {
    EndpointKey = 4,
    Endpoint = 24,
    PodInterface = 16,
    NodeKey = 4,
    RemoteNode = 8,
    NodeConfig = 48,
    EndpointTraffic = 32,
    PacketCount = 16,
    MonitorConfig = 8,
    RateBudget = 16,
    ModeMismatch = 16,
    RpfCacheEntry = 16,
    MonitorEvent = 40,
    ServiceKey = 8,
    Service = 16,
    BackendKey = 8,
    Backend = 8,
    ConntrackKey = 16,
    ConntrackEntry = 32,
    ConntrackClientKey = 4,
    SockRevNatKey = 16,
    SockRevNat = 8,
    ConntrackClient = 8,
    AffinityKey = 8,
    AffinityEntry = 16,
    FragmentKey = 12,
    FragmentTranslation = 8,
    PolicyEndpoint = 4,
    PolicyPeer = 4,
    PolicyRuleKey = 12,
    PolicyAllow = 4,
}

// Any reader finds the version at the same byte in every layout.
const _: () = assert!(core::mem::offset_of!(MonitorEvent, version) == MONITOR_EVENT_VERSION_OFFSET);
// The reverse-path cache is indexed by a masked hash.
const _: () = assert!(RPF_CACHE_SLOTS.is_power_of_two());

wire_enum! {
    /// Why a packet was dropped. The number is the slot in the drop counter
    /// map and is stable: never renumber, only append. docs/why-dropped.md
    /// has a row for each (checked by `tests/tests/e2e/docs.rs`).
    pub enum DropReason {
        SpoofedSource = 1, "spoofed_source",
            "a pod sent IPv4 with a source address that is not its own (anti-spoofing)";
        TtlExceeded = 2, "ttl_exceeded",
            "TTL would reach 0 when forwarded (traceroute, or a routing loop): answered with ICMP time exceeded";
        TruncatedEthernet = 3, "truncated_ethernet", "frame shorter than an Ethernet header";
        /// IHL below 5, or a total length shorter than the header.
        MalformedIpv4 = 4, "malformed_ipv4",
            "IPv4 header truncated, bad version/IHL or total length beyond the frame";
        MalformedArp = 5, "malformed_arp", "ARP that is not Ethernet/IPv4 or is truncated";
        /// Neither the pod's IP nor 0.0.0.0 (a duplicate-address probe) as the sender.
        SpoofedArp = 6, "spoofed_arp", "ARP from a pod claiming an address that is not its own";
        /// 802.1Q or 802.1ad, in the frame or in the skb metadata.
        VlanTagged = 7, "vlan_tagged", "VLAN-tagged frame from a pod (pods have no VLANs)";
        UnknownInterface = 8, "unknown_interface",
            "program attached to a veth the agent has not registered (agent state lost?)";
        UnknownTunnelSource = 9, "unknown_tunnel_source",
            "VXLAN packet from an address that is not a known node (forged or stale peer list)";
        WrongVni = 10, "wrong_vni", "VXLAN packet with a VNI other than this cluster's";
        NoTunnelKey = 11, "no_tunnel_key", "packet on the VXLAN device without tunnel metadata";
        OverlayUnknownDestination = 12, "overlay_unknown_destination",
            "decapsulated packet for an address that is neither a local pod nor this node";
        /// Neither in the sender's pod CIDR nor the sender's node address.
        OverlaySpoofedSource = 13, "overlay_spoofed_source",
            "decapsulated packet whose source is not in the sending node's pod CIDR";
        TunnelEncapFailed = 14, "tunnel_encap_failed", "setting the VXLAN tunnel key failed";
        ServiceNoBackend = 15, "service_no_backend",
            "new connection to a Service with no ready backend (refused with ICMP port unreachable)";
        /// Existing connections go on; the new one is answered with ICMP port unreachable.
        ConntrackFull = 16, "conntrack_full",
            "connection-tracking map full: new Service connection refused (raise conntrack_max_entries)";
        NatRewriteFailed = 17, "nat_rewrite_failed",
            "rewriting a Service connection's addresses, ports or checksums failed (kernel helper error)";
        /// The kernel forwards only `PACKET_HOST` frames.
        WrongDestinationMac = 18, "wrong_destination_mac",
            "frame to forward not addressed to this node's MAC (other host, broadcast or multicast)";
        /// As Linux's route input: see [`is_martian_source`].
        MartianSource = 19, "martian_source",
            "martian source address (0.0.0.0/8, 127.0.0.0/8, multicast or 255.255.255.255)";
        /// A local pod's or this node's own address from outside, or no route back.
        ReversePath = 20, "reverse_path",
            "reverse-path check failed (rp_filter=1): source not reachable back through the ingress interface (spoofed or reflected)";
        BadIpChecksum = 21, "bad_ip_checksum", "IPv4 header checksum does not verify";
        IpOptions = 22, "ip_options",
            "IPv4 packet with options (source route, record route, ...) is not forwarded";
        /// VXLAN to a native node, or plain pod traffic to a VXLAN node.
        PeerModeMismatch = 23, "peer_mode_mismatch",
            "a peer node sends in the other routing mode (native vs vxlan): set the same mode on every node";
        ForwardingDisabled = 24, "forwarding_disabled",
            "forwarding is off on the ingress interface (net.ipv4.conf.<dev>.forwarding=0)";
        /// Without DF the kernel fragments it: such a packet goes to the host stack.
        PacketTooBig = 25, "packet_too_big",
            "larger than the destination pod's MTU with DF set: answered with ICMP fragmentation needed";
        EndpointDown = 26, "endpoint_down", "the destination pod's host veth is administratively down";
        /// A new connection no NetworkPolicy rule of the sending pod allows
        /// (a TCP SYN is answered with ICMP administratively prohibited).
        PolicyDeniedEgress = 27, "policy_denied_egress",
            "NetworkPolicy: the sending pod is isolated for egress and no rule allows this connection";
        /// As egress, for the receiving pod.
        PolicyDeniedIngress = 28, "policy_denied_ingress",
            "NetworkPolicy: the receiving pod is isolated for ingress and no rule allows this connection";
        /// The client already has `conntrack_max_per_client` unanswered
        /// connections tracked: one pod cannot fill the node's table.
        ConntrackClientLimit = 29, "conntrack_client_limit",
            "the client has conntrack_max_per_client unanswered connections tracked: new Service connection refused";
        /// internalTrafficPolicy Local: other nodes have backends, this
        /// one has none; dropped unanswered, as kube-proxy does.
        ServiceNoLocalBackend = 30, "service_no_local_backend",
            "new connection to a Service with a Local traffic policy and no ready backend on this node (dropped)";
        /// Four random tries found no free source port for a NodePort
        /// connection to another node's backend.
        SnatPortsExhausted = 31, "snat_ports_exhausted",
            "new NodePort connection to another node's backend: no free source port (refused with ICMP port unreachable)";
        /// What netfilter's conntrack calls invalid (a TCP data offset
        /// below 5 words or past the segment, a UDP length that does not
        /// fit, an L4 header cut by fragmentation): no connection is
        /// opened for it.
        MalformedL4 = 32, "malformed_l4",
            "new Service connection whose TCP or UDP header is cut short or inconsistent (tiny first fragment, data offset past the segment): dropped, nothing tracked";
        /// All clients outside the cluster together have their protocol's
        /// half of `conntrack_max_outside` unanswered connections tracked.
        ConntrackOutsideLimit = 33, "conntrack_outside_limit",
            "clients outside the cluster have their protocol's half of conntrack_max_outside unanswered connections tracked (a SYN or UDP flood from faked sources?): new connection from outside dropped";
        /// Not the packet counted: TCP's outside share was full, and the
        /// oldest unanswered of the outside connections opened lately was
        /// given up so that this one could be tracked (netfilter's early
        /// drop).
        ConntrackEarlyDrop = 34, "conntrack_early_drop",
            "clients outside the cluster had TCP's half of conntrack_max_outside unanswered connections tracked: the oldest unanswered one was given up for a new one (as netfilter's early drop; a SYN flood from faked sources?)";
    }
}

wire_enum! {
    /// What happened to a packet that was not dropped. The number is the
    /// slot in the forward counter map; stable, append only.
    pub enum ForwardPath {
        LocalDelivery = 0, "local_delivery", "redirected straight into a pod on this node (bpf_redirect_peer)";
        ToHostStack = 1, "to_host_stack",
            "handed to the node's own stack (node addresses, unknown destinations, non-IPv4 protocols)";
        ArpReply = 2, "arp_reply", "ARP request answered by the program with the host veth's MAC";
        ToRemoteNative = 3, "to_remote_native", "sent straight out of the uplink to the peer node (native routing)";
        ToRemoteOverlay = 4, "to_remote_overlay", "encapsulated into VXLAN towards the peer node";
        RoutedIntoPod = 5, "routed_into_pod",
            "routed into a pod by the node's own stack (hostPort DNAT, replies to masqueraded connections, \
             the node's own traffic), after the policy check";
        ToOutside = 6, "to_outside",
            "a NodePort connection's reply sent straight out of the uplink to its client outside the cluster \
             (next hop from the node's routes)";
    }
}

impl DropReason {
    /// The programs that may drop a packet for this reason (the "where" of
    /// docs/why-dropped.md, checked by `tests/tests/e2e/docs.rs`): the
    /// agent exports these (direction, reason) pairs from 0, and any other
    /// only once counted.
    pub const fn directions(self) -> &'static [Direction] {
        use Direction::*;
        match self {
            Self::SpoofedSource
            | Self::MalformedArp
            | Self::SpoofedArp
            | Self::UnknownInterface
            | Self::TunnelEncapFailed
            | Self::PolicyDeniedEgress
            | Self::ConntrackClientLimit => &[FromPod],
            Self::TtlExceeded
            | Self::NatRewriteFailed
            | Self::BadIpChecksum
            | Self::IpOptions
            | Self::PacketTooBig
            | Self::EndpointDown => &[FromPod, FromUplink, FromOverlay],
            Self::TruncatedEthernet | Self::MalformedIpv4 | Self::VlanTagged => &[FromPod, FromOverlay],
            Self::UnknownTunnelSource
            | Self::WrongVni
            | Self::NoTunnelKey
            | Self::OverlayUnknownDestination
            | Self::OverlaySpoofedSource => &[FromOverlay],
            Self::ServiceNoBackend
            | Self::ConntrackFull
            | Self::WrongDestinationMac
            | Self::ServiceNoLocalBackend
            | Self::MalformedL4 => &[FromPod, FromUplink],
            Self::MartianSource
            | Self::PeerModeMismatch
            | Self::ForwardingDisabled
            | Self::SnatPortsExhausted
            | Self::ConntrackOutsideLimit
            | Self::ConntrackEarlyDrop => &[FromUplink],
            Self::ReversePath => &[FromUplink, ToPod],
            Self::PolicyDeniedIngress => &[FromPod, FromUplink, FromOverlay, ToPod],
        }
    }
}

// Every number fits its counter block, and MonitorEvent::code (a u8).
const _: () = {
    let mut i = 0;
    while i < DropReason::ALL.len() {
        let slot = DropReason::ALL[i] as u32;
        assert!(slot < DROP_REASON_SLOTS && slot <= u8::MAX as u32);
        i += 1;
    }
    let mut i = 0;
    while i < ForwardPath::ALL.len() {
        let slot = ForwardPath::ALL[i] as u32;
        assert!(slot < FORWARD_PATH_SLOTS && slot <= u8::MAX as u32);
        i += 1;
    }
    let mut i = 0;
    while i < MonitorOutcome::ALL.len() {
        assert!((MonitorOutcome::ALL[i] as u32) < MonitorOutcome::SLOTS);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_windows_wrap_and_bound_acknowledgements_by_what_was_sent() {
        // At or up to the window past the base, across the wrap.
        assert!(tcp_in_window(0xffff_fff0, 0xffff_fff0, 1 << 16));
        assert!(tcp_in_window(0x0000_0100, 0xffff_fff0, 1 << 16));
        assert!(!tcp_in_window(0xffff_ffef, 0xffff_fff0, 1 << 16), "behind the base");
        assert!(
            !tcp_in_window(0xffff_fff0u32.wrapping_add(1 << 16), 0xffff_fff0, 1 << 16),
            "the window's end is out"
        );
        assert!(tcp_in_window(12345, 0, 1), "base not known: anything");
        // An acknowledgement of no more than was sent, at most the window
        // less; across the wrap.
        let end = 0x0000_0010;
        assert!(tcp_acknowledges_sent(end, end, 1 << 16), "all of it");
        assert!(tcp_acknowledges_sent(0xffff_fff0, end, 1 << 16), "some of it, across the wrap");
        assert!(!tcp_acknowledges_sent(end + 1, end, 1 << 24), "one byte never sent");
        assert!(!tcp_acknowledges_sent(end + (1 << 24), end, 1 << 24), "16 MiB never sent");
        assert!(!tcp_acknowledges_sent(end.wrapping_sub(1 << 16), end, 1 << 16), "too far behind");
        assert!(tcp_acknowledges_sent(end + (1 << 30), 0, 1 << 16), "end not known: anything");
    }

    #[test]
    fn forward_pair_words_are_the_pair_keys_bytes() {
        let key = ConntrackKey {
            saddr: [192, 0, 2, 7],
            daddr: [10, 96, 0, 10],
            sport: 40_000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            protocol: IPPROTO_TCP,
            _pad: [0; 3],
        };
        for flags in [0, CT_HAIRPIN, CT_SNAT, CT_STATEFUL | CT_SEEN] {
            let entry = ConntrackEntry {
                nat_addr: [10, 244, 2, 7],
                nat_port: 8080u16.to_be_bytes(),
                kind: CT_FORWARD,
                flags,
                client_ipv4: [10, 0, 0, 1],
                service_id: snat_port_id(31_000u16.to_be_bytes()),
                ..Default::default()
            };
            let pair = key.pair(&entry);
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip(key.forward_pair_words(&entry)) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            let expected: [u8; 16] =
                [pair.saddr.as_slice(), &pair.daddr, &pair.sport, &pair.dport, &[pair.protocol], &pair._pad]
                    .concat()
                    .try_into()
                    .unwrap();
            assert_eq!(bytes, expected, "flags {flags:#x}");
        }
    }

    /// What the table macro promises, and what a table must keep: names
    /// (what operators and scripts key on) unique and snake_case, an
    /// explanation for each, `from_u32` the inverse of the number.
    macro_rules! check_table {
        ($Enum:ident) => {
            for (i, a) in $Enum::ALL.iter().enumerate() {
                assert_eq!($Enum::from_u32(*a as u32), Some(*a));
                assert!(!a.explanation().is_empty(), "{a:?}");
                let name = a.name();
                assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
                for b in &$Enum::ALL[i + 1..] {
                    assert_ne!(name, b.name(), "{a:?} and {b:?} share a name");
                }
            }
            let unused = (0..=u32::from(u8::MAX)).find(|v| $Enum::ALL.iter().all(|a| *a as u32 != *v));
            assert_eq!($Enum::from_u32(unused.unwrap()), None);
            assert_eq!($Enum::COUNT as usize, $Enum::ALL.len());
        };
    }

    #[test]
    fn snat_ports_are_counted_and_indexed_across_both_ranges() {
        assert_eq!(SNAT_PORT_COUNT, 33_512);
        let at = |i| snat_port_at(i);
        assert_eq!((at(0), at(28_975), at(28_976), at(33_511)), (1_024, 29_999, 61_000, 65_535));
        for i in 0..SNAT_PORT_COUNT {
            assert!(is_snat_port(at(i)), "{i}");
            assert!(i == 0 || at(i - 1) < at(i), "each port once: {i}");
        }
        assert_eq!(at(SNAT_PORT_COUNT), 1_024, "wraps");
        for outside in [0, 1_023, 30_000, 32_767, 32_768, 60_999] {
            assert!(!is_snat_port(outside), "{outside}");
        }
    }

    #[test]
    fn enum_tables_are_consistent() {
        check_table!(DropReason);
        check_table!(ForwardPath);
        check_table!(Direction);
        check_table!(MonitorOutcome);
        check_table!(RoutingMode);
        assert_eq!(DropReason::from_u32(0), None);
        assert_eq!(DropReason::ALL.len(), 34);
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
}
