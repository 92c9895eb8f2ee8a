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
    /// Per-CPU packet counters indexed by [`super::DropReason`].
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    /// Per-CPU packet counters indexed by [`super::ForwardPath`].
    pub const FORWARD_COUNTERS: &str = "FORWARD_COUNTERS";
    /// LPM trie: remote pod CIDR -> [`super::RemoteNode`].
    pub const REMOTE_NODES: &str = "REMOTE_NODES";
    /// Peer node IPv4 -> [`super::RemoteNode`]: tunnel sources we accept, and
    /// node addresses pods reach directly.
    pub const KNOWN_NODES: &str = "KNOWN_NODES";
    /// One [`super::NodeConfig`] at index 0.
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 7] =
        [ENDPOINTS, POD_INTERFACES, DROP_COUNTERS, FORWARD_COUNTERS, REMOTE_NODES, KNOWN_NODES, NODE_CONFIG];
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
/// Slots in the drop counter array; [`DropReason`] values must stay below it.
pub const DROP_COUNTER_SLOTS: u32 = 64;
/// Slots in the forward counter array; [`ForwardPath`] values must stay below it.
pub const FORWARD_COUNTER_SLOTS: u32 = 16;

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
    /// Reserved for flags (policy, service backends); zero today.
    pub flags: u32,
}

/// What the "from pod" program knows about the veth a packet entered on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// The only IPv4 source address this pod may use (network byte order).
    pub pod_ipv4: [u8; 4],
    /// MAC of the host-side veth: the answer to the pod's ARP requests.
    pub host_mac: [u8; 6],
    pub _pad: [u8; 2],
}

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
    /// Reserved; zero today.
    pub flags: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all three are repr(C), made only of integers and byte arrays, with
    // explicit padding fields, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::PodInterface {}
    unsafe impl aya::Pod for super::NodeKey {}
    unsafe impl aya::Pod for super::RemoteNode {}
    unsafe impl aya::Pod for super::NodeConfig {}
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
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
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
        }
    }

    /// One line for an operator: what happened and what to look at.
    pub const fn explanation(self) -> &'static str {
        match self {
            DropReason::SpoofedSource => {
                "a pod sent IPv4 with a source address that is not its own (anti-spoofing)"
            }
            DropReason::TtlExceeded => "TTL would reach 0 when forwarded (routing loop?)",
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
            assert!((r as u32) < DROP_COUNTER_SLOTS, "{r:?}");
            assert_eq!(DropReason::from_u32(r as u32), Some(r));
        }
        for p in ForwardPath::ALL {
            assert!((p as u32) < FORWARD_COUNTER_SLOTS, "{p:?}");
        }
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<EndpointKey>(), 4);
        assert_eq!(core::mem::size_of::<Endpoint>(), 20);
        assert_eq!(core::mem::size_of::<PodInterface>(), 12);
        assert_eq!(core::mem::size_of::<RemoteNode>(), 8);
        assert_eq!(core::mem::size_of::<NodeConfig>(), 24);
    }
}
