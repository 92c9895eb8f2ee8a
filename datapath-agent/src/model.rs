//! The desired state the agent brings the datapath to, whatever its source
//! (the config file or Kubernetes): peer nodes and their routes, Services,
//! the node's routing mode. Nothing here reads a file or an API; the config
//! file deserializes into these types directly (`source::config`).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Straight to the peer over the uplink: nodes must share an L2 segment.
    #[default]
    Native,
    /// VXLAN encapsulation towards the peer: any IP connectivity suffices.
    Vxlan,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
}

/// A peer node's pod CIDR and address, as the maps and the node routes hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRoute {
    pub pod_cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
}

/// Bytes VXLAN over IPv4 adds: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

/// A ClusterIP Service, spelled as in Kubernetes where it can be.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The Service's name (metadata.name); shown by `inspect services`.
    pub name: String,
    /// The Service's namespace (metadata.namespace).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The virtual address pods connect to (spec.clusterIP).
    pub cluster_ip: Ipv4Addr,
    /// "None" (each connection to any backend) or "ClientIP" (each client
    /// keeps its backend while it keeps using the Service).
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// ClientIP affinity lasts this long after the client's last new
    /// connection (sessionAffinityConfig.clientIP.timeoutSeconds).
    #[serde(default = "default_session_affinity_timeout_seconds")]
    pub session_affinity_timeout_seconds: u32,
    /// The Service's ports (spec.ports); at least one.
    pub ports: Vec<ServicePortConfig>,
    /// Addresses of the ready backend pods (ready endpoints); with no
    /// terminating ones either, every new connection is refused at once.
    #[serde(default)]
    pub backends: Vec<Ipv4Addr>,
    /// Backend pods that are shutting down but still serving (EndpointSlice
    /// conditions serving and terminating, not ready): new connections go to
    /// them only while no ready backend exists (kube-proxy's rule).
    /// Connections already open to a backend go on whatever its condition,
    /// until it leaves the lists.
    #[serde(default)]
    pub terminating_backends: Vec<Ipv4Addr>,
    /// Further addresses of the Service (spec.externalIPs): clients in the
    /// cluster (pods, the node itself) reach its ports there too, with the
    /// same backends and affinity as the cluster IP.
    #[serde(default)]
    pub external_ips: Vec<Ipv4Addr>,
    /// The load balancer's addresses (status.loadBalancer.ingress[].ip),
    /// handled as `external_ips`.
    #[serde(default)]
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// spec.internalTrafficPolicy: "Local" sends the cluster IP's
    /// connections only to backends on the client's own node.
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    /// spec.externalTrafficPolicy, for the node ports: "Local" sends their
    /// connections only to backends on the node they arrive at, keeping the
    /// client's address (the only policy served so far).
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    /// spec.healthCheckNodePort (externalTrafficPolicy Local): the agent
    /// answers HTTP there with this node's ready backends, as kube-proxy.
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
}

impl ServiceConfig {
    /// The cluster IP, then the external and load balancer addresses.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        std::iter::once(self.cluster_ip)
            .chain(self.external_ips.iter().copied())
            .chain(self.load_balancer_ips.iter().copied())
    }
}

/// spec.internalTrafficPolicy (and, later, spec.externalTrafficPolicy).
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// Any backend in the cluster.
    #[default]
    Cluster,
    /// Only backends on the node the connection enters.
    Local,
}

impl TrafficPolicy {
    /// The Kubernetes spelling.
    pub const fn name(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// One port of a Service: pods connect to `cluster_ip:port`, backends
/// listen on `target_port`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServicePortConfig {
    /// The port on the cluster IP.
    pub port: u16,
    /// "TCP" (default) or "UDP".
    #[serde(default)]
    pub protocol: ServiceProtocol,
    /// The port the backends listen on; the same as `port` when unset.
    #[serde(default)]
    pub target_port: Option<u16>,
    /// The port's name (spec.ports[].name); shown by `inspect services`.
    #[serde(default)]
    pub name: Option<String>,
    /// spec.ports[].nodePort: clients outside the cluster reach the port
    /// on the node's address there.
    #[serde(default)]
    pub node_port: Option<u16>,
}

impl ServicePortConfig {
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// spec.sessionAffinity.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

impl SessionAffinity {
    /// The Kubernetes spelling.
    pub const fn name(self) -> &'static str {
        match self {
            SessionAffinity::None => "None",
            SessionAffinity::ClientIp => "ClientIP",
        }
    }
}

/// spec.ports[].protocol. SCTP parses so that it can be refused with a fix
/// rather than as an unknown word.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, Default)]
pub enum ServiceProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl ServiceProtocol {
    /// The Kubernetes spelling.
    pub const fn name(self) -> &'static str {
        match self {
            ServiceProtocol::Tcp => "TCP",
            ServiceProtocol::Udp => "UDP",
            ServiceProtocol::Sctp => "SCTP",
        }
    }
}

/// The node the agent programs: its backends are those in its pod CIDR;
/// its node ports are served on its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThisNode {
    pub pod_cidr: Ipv4Net,
    pub address: Ipv4Addr,
    /// `serve_outside_clients`: node ports and external and load balancer
    /// addresses get entries for clients outside the cluster, and the
    /// health check node ports are served.
    pub serve_outside: bool,
}

/// A Service by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    pub fn of(service: &ServiceConfig) -> Self {
        ServiceRef { namespace: service.namespace.clone(), name: service.name.clone() }
    }
}

fn default_namespace() -> String {
    "default".into()
}
fn default_session_affinity_timeout_seconds() -> u32 {
    10_800
}

/// The Kubernetes objects NetworkPolicy is computed from, whatever their
/// source (YAML files in `policy_dir`, or the API server): policies, the
/// namespaces' labels, and the pods' labels, named ports and addresses.
#[derive(Debug, Clone, Default)]
pub struct PolicyObjects {
    pub policies: Vec<k8s_openapi::api::networking::v1::NetworkPolicy>,
    pub namespaces: Vec<k8s_openapi::api::core::v1::Namespace>,
    pub pods: Vec<k8s_openapi::api::core::v1::Pod>,
}

/// A pod on this node, as the CNI plugin recorded it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalPod {
    pub ipv4: Ipv4Addr,
    pub namespace: String,
    pub name: String,
}
