//! The agent's configuration file (TOML), validated field by field so that a
//! bad value is refused with the field's name and how to fix it.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use datapath_api::DEFAULT_API_SOCKET;
use ipnet::Ipv4Net;
use serde::Deserialize;

pub use crate::model::{
    Mode, PeerConfig, ServiceConfig, ServicePortConfig, ServiceProtocol, SessionAffinity, VXLAN_OVERHEAD,
};

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/datapath";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/datapath";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name (the Kubernetes Node object's name).
    pub node_name: String,
    /// The pod CIDR assigned to this node; every local pod address is in it.
    pub pod_cidr: Ipv4Net,
    /// The node's uplink interface (towards other nodes).
    pub uplink_interface: String,
    /// bpffs directory under which maps and links are pinned.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Unix socket on which the agent serves the CNI plugin.
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// Where the agent keeps its endpoint records (who each pod is).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The whole cluster's pod network; every node's pod CIDR is inside it.
    pub cluster_cidr: Ipv4Net,
    /// This node's address on the uplink (what peers send to).
    pub node_ip: Ipv4Addr,
    /// How pods reach other nodes' pods.
    #[serde(default)]
    pub mode: Mode,
    /// Masquerade pod traffic leaving the cluster to the node's address.
    #[serde(default = "default_true")]
    pub masquerade: bool,
    /// VXLAN settings (overlay mode).
    #[serde(default)]
    pub vxlan: VxlanConfig,
    /// The other nodes (static topology for dev VMs and tests).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Where node facts and peers come from.
    #[serde(default)]
    pub source: Source,
    /// Kubernetes source settings.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Address of the health endpoints (/healthz, /readyz); none if unset.
    /// One that cannot be bound stops the agent at start.
    #[serde(default)]
    pub health_address: Option<std::net::SocketAddr>,
    /// /healthz fails once the agent's event loop has not turned for this
    /// long (a stuck call or lock): the liveness probe then restarts it.
    #[serde(default = "default_event_loop_stall_seconds")]
    pub event_loop_stall_seconds: u32,
    /// CNI network config the agent writes once it is ready (e.g.
    /// /etc/cni/net.d/10-datapath.conflist); none if unset.
    #[serde(default)]
    pub cni_config_file: Option<PathBuf>,
    /// aya-log from the programs: "off" loads the normal build, which has no
    /// logging code; "debug" loads the debug build, which logs every verdict
    /// to the agent's log (target `datapath_ebpf`, level debug). Switching
    /// is a restart, and hitless like any upgrade.
    #[serde(default)]
    pub ebpf_log: EbpfLog,
    /// Monitor events each CPU may emit per second (drops, and every
    /// forwarding decision while `monitor --forwards` runs); the rest are
    /// counted as rate limited.
    #[serde(default = "default_monitor_events_per_second")]
    pub monitor_events_per_second: u32,
    /// Capacity of the connection-tracking map, in entries (two per Service
    /// connection: one per direction). Sizes the map when it is created, so
    /// a change needs the pinned map removed and a restart (docs/services.md).
    #[serde(default = "default_conntrack_max_entries")]
    pub conntrack_max_entries: u32,
    /// A TCP Service connection with no packet for this long is forgotten.
    #[serde(default = "default_conntrack_tcp_idle_seconds")]
    pub conntrack_tcp_idle_seconds: u32,
    /// A UDP Service "connection" (a 5-tuple) with no packet for this long is
    /// forgotten; the next packet picks a backend anew.
    #[serde(default = "default_conntrack_udp_idle_seconds")]
    pub conntrack_udp_idle_seconds: u32,
    /// A TCP connection that saw a FIN or RST is forgotten this long after its
    /// last packet (room for the final ACKs and retransmissions).
    #[serde(default = "default_conntrack_closing_seconds")]
    pub conntrack_closing_seconds: u32,
    /// ClusterIP Services (static source): cluster IP, ports and ready
    /// backends. Applied live when the file changes.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

fn default_conntrack_max_entries() -> u32 {
    datapath_common::DEFAULT_CONNTRACK_ENTRIES
}
fn default_conntrack_tcp_idle_seconds() -> u32 {
    21_600
}
fn default_conntrack_udp_idle_seconds() -> u32 {
    60
}
fn default_conntrack_closing_seconds() -> u32 {
    10
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EbpfLog {
    #[default]
    Off,
    Debug,
}

fn default_monitor_events_per_second() -> u32 {
    datapath_common::DEFAULT_MONITOR_EVENTS_PER_SECOND
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Everything from this file (dev VMs, tests).
    #[default]
    Static,
    /// node_name (or $NODE_NAME), pod_cidr and node_ip from this node's Node
    /// object, peers from all Node objects, watched.
    Kubernetes,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// kubeconfig to use; in-cluster service account config when unset.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// /readyz fails once a watch (Nodes, Services, EndpointSlices) has
    /// kept failing for this long; the agent keeps forwarding with what it
    /// last knew meanwhile.
    #[serde(default = "default_watch_failure_seconds")]
    pub watch_failure_seconds: u32,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self { kubeconfig: None, watch_failure_seconds: default_watch_failure_seconds() }
    }
}

fn default_watch_failure_seconds() -> u32 {
    60
}
fn default_event_loop_stall_seconds() -> u32 {
    30
}

/// What the Node object says about this node (Kubernetes source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
}

/// The part of the file needed before the rest can be resolved: the
/// source, and what the agent owns on the node (locked and served before
/// it waits for the Node object in kubernetes mode).
#[derive(Debug, Clone, Deserialize)]
pub struct SourceSettings {
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    #[serde(default)]
    pub health_address: Option<std::net::SocketAddr>,
}

impl SourceSettings {
    /// The checks of [`AgentConfig::parse`] and [`AgentConfig::check_host`]
    /// on these fields, for use before the rest of the file can be resolved.
    pub fn check(&self) -> Result<(), ConfigError> {
        for (field, path) in
            [("bpffs_dir", &self.bpffs_dir), ("state_dir", &self.state_dir), ("api_socket", &self.api_socket)]
        {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid {
                    field,
                    problem: format!("{} is not an absolute path", path.display()),
                    fix: "use an absolute path (the defaults are in the README's configuration example)",
                });
            }
        }
        check_on_bpffs(&self.bpffs_dir)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VxlanConfig {
    /// Name of the collect_md VXLAN device the agent manages.
    #[serde(default = "default_vxlan_device")]
    pub device: String,
    /// UDP destination port (8472 as flannel and Cilium; 4789 is IANA's).
    #[serde(default = "default_vxlan_port")]
    pub port: u16,
    /// VXLAN network identifier of the cluster.
    #[serde(default = "default_vni")]
    pub vni: u32,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self { device: default_vxlan_device(), port: default_vxlan_port(), vni: default_vni() }
    }
}

/// Bounds of `conntrack_max_entries`: below, a handful of clients fill it;
/// above, the preallocated map costs hundreds of MiB of kernel memory.
pub const MIN_CONNTRACK_ENTRIES: u32 = 1_024;
pub const MAX_CONNTRACK_ENTRIES: u32 = 4_194_304;

fn default_true() -> bool {
    true
}
fn default_vxlan_device() -> String {
    "dp-vxlan".into()
}
fn default_vxlan_port() -> u16 {
    8472
}
fn default_vni() -> u32 {
    1
}

fn default_bpffs_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS_DIR)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_api_socket() -> PathBuf {
    PathBuf::from(DEFAULT_API_SOCKET)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config field `{field}` is invalid: {problem}; fix: {fix}")]
    Invalid { field: &'static str, problem: String, fix: &'static str },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parse and validate (no access to the system: see [`Self::check_host`]).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, None)
    }

    /// Which source the file asks for (and its settings), before resolving.
    pub fn source_settings(text: &str) -> Result<SourceSettings, ConfigError> {
        toml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: PathBuf::new(), source: Box::new(source) })
    }

    /// Parse with the node's facts from its Node object filled in
    /// (Kubernetes source); the file must not set them itself.
    pub fn parse_with(text: &str, identity: Option<&NodeIdentity>) -> Result<Self, ConfigError> {
        let parse_err = |source| ConfigError::Parse { path: PathBuf::new(), source: Box::new(source) };
        let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
        if let Some(id) = identity {
            for field in ["pod_cidr", "node_ip"] {
                if table.contains_key(field) {
                    return Err(ConfigError::Invalid {
                        field: if field == "pod_cidr" { "pod_cidr" } else { "node_ip" },
                        problem: "is set in the file, but the Node object decides it in kubernetes mode"
                            .into(),
                        fix: "remove it from the file (the agent reads spec.podCIDR and the InternalIP)",
                    });
                }
            }
            table.insert("node_name".into(), id.node_name.clone().into());
            table.insert("pod_cidr".into(), id.pod_cidr.to_string().into());
            table.insert("node_ip".into(), id.node_ip.to_string().into());
        }
        let config: AgentConfig = table.try_into().map_err(parse_err)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() || self.node_name.len() > 253 {
            return Err(ConfigError::Invalid {
                field: "node_name",
                problem: format!("{:?} is empty or longer than 253 characters", self.node_name),
                fix: "set it to this node's Kubernetes name, e.g. node_name = \"worker-1\"",
            });
        }
        if self.pod_cidr != self.pod_cidr.trunc() {
            return Err(ConfigError::Invalid {
                field: "pod_cidr",
                problem: format!("{} has host bits set", self.pod_cidr),
                fix: "use the network address, e.g. \"10.244.1.0/24\"",
            });
        }
        if self.pod_cidr.prefix_len() > 30 {
            return Err(ConfigError::Invalid {
                field: "pod_cidr",
                problem: format!("{} leaves no room for pods", self.pod_cidr),
                fix: "use a prefix of /30 or shorter, typically /24",
            });
        }
        if self.uplink_interface.is_empty() || self.uplink_interface.len() > 15 {
            return Err(ConfigError::Invalid {
                field: "uplink_interface",
                problem: format!("{:?} is not a valid interface name", self.uplink_interface),
                fix: "name the node's interface towards other nodes, e.g. \"eth0\"",
            });
        }
        if !self.bpffs_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "bpffs_dir",
                problem: format!("{} is not an absolute path", self.bpffs_dir.display()),
                fix: "use a directory on bpffs, e.g. \"/sys/fs/bpf/datapath\"",
            });
        }
        self.validate_topology()?;
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "state_dir",
                problem: format!("{} is not an absolute path", self.state_dir.display()),
                fix: "use an absolute path, e.g. \"/var/lib/datapath\"",
            });
        }
        if !(1..=1_000_000).contains(&self.monitor_events_per_second) {
            return Err(ConfigError::Invalid {
                field: "monitor_events_per_second",
                problem: format!("{} is outside 1..=1000000", self.monitor_events_per_second),
                fix: "use the default (1000) unless the monitor reports rate-limited events you need",
            });
        }
        if !self.api_socket.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "api_socket",
                problem: format!("{} is not an absolute path", self.api_socket.display()),
                fix: "use an absolute path, e.g. \"/run/datapath/agent.sock\"",
            });
        }
        if !(1..=3_600).contains(&self.event_loop_stall_seconds) {
            return Err(ConfigError::Invalid {
                field: "event_loop_stall_seconds",
                problem: format!("{} is outside 1..=3600", self.event_loop_stall_seconds),
                fix: "use the default (30), longer than the agent's slowest step (a full Service sync)",
            });
        }
        if !(1..=86_400).contains(&self.kubernetes.watch_failure_seconds) {
            return Err(ConfigError::Invalid {
                field: "kubernetes.watch_failure_seconds",
                problem: format!("{} is outside 1..=86400", self.kubernetes.watch_failure_seconds),
                fix: "use the default (60): how long the API server may fail before the node goes unready",
            });
        }
        self.validate_conntrack()?;
        self.validate_services()
    }

    fn validate_conntrack(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String, fix| Err(ConfigError::Invalid { field, problem, fix });
        let entries = self.conntrack_max_entries;
        if !(MIN_CONNTRACK_ENTRIES..=MAX_CONNTRACK_ENTRIES).contains(&entries) {
            return invalid(
                "conntrack_max_entries",
                format!("{entries} is outside {MIN_CONNTRACK_ENTRIES}..={MAX_CONNTRACK_ENTRIES}"),
                "use the default (131072) or size it at two entries per expected concurrent connection",
            );
        }
        // Every connection takes one entry per direction.
        if !entries.is_multiple_of(2) {
            return invalid(
                "conntrack_max_entries",
                format!("{entries} is odd, but each connection takes two entries"),
                "use an even number, e.g. 131072",
            );
        }
        for (field, value, max, fix) in [
            (
                "conntrack_tcp_idle_seconds",
                self.conntrack_tcp_idle_seconds,
                604_800,
                "use 1..=604800; the default 21600 (6 h) suits long-lived idle connections",
            ),
            (
                "conntrack_udp_idle_seconds",
                self.conntrack_udp_idle_seconds,
                86_400,
                "use 1..=86400; the default is 60",
            ),
            (
                "conntrack_closing_seconds",
                self.conntrack_closing_seconds,
                3_600,
                "use 1..=3600; the default is 10",
            ),
        ] {
            if !(1..=max).contains(&value) {
                return invalid(field, format!("{value} is outside 1..={max}"), fix);
            }
        }
        Ok(())
    }

    fn validate_services(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String, fix| Err(ConfigError::Invalid { field, problem, fix });
        if self.source == Source::Kubernetes && !self.services.is_empty() {
            return invalid(
                "services",
                format!(
                    "{} static Services given, but the file's Services are read only with \
                     source = \"static\"",
                    self.services.len()
                ),
                "remove [[services]] or use source = \"static\"",
            );
        }
        let mut names = std::collections::HashSet::new();
        let mut service_ports = std::collections::HashMap::new();
        let mut backend_slots: u64 = 0;
        for (i, service) in self.services.iter().enumerate() {
            let name = &service.name;
            let id = format!("{}/{name}", service.namespace);
            for (field, value) in [("services.name", name), ("services.namespace", &service.namespace)] {
                if value.is_empty() || value.len() > 253 {
                    return invalid(
                        field,
                        format!("Service #{}: {value:?} is empty or longer than 253 characters", i + 1),
                        "use the Kubernetes object's name and namespace, e.g. name = \"web\"",
                    );
                }
            }
            if !names.insert((&service.namespace, name)) {
                return invalid(
                    "services.name",
                    format!("two Services are called {id}"),
                    "give each Service a unique (namespace, name)",
                );
            }
            let ip = service.cluster_ip;
            if self.cluster_cidr.contains(&ip) {
                return invalid(
                    "services.cluster_ip",
                    format!("{id}: {ip} is inside cluster_cidr {}", self.cluster_cidr),
                    "take cluster IPs from the Service range (--service-cluster-ip-range, e.g. 10.96.0.0/12)",
                );
            }
            if ip == self.node_ip || self.peers.iter().any(|p| p.node_ip == ip) {
                return invalid(
                    "services.cluster_ip",
                    format!("{id}: {ip} is a node's address"),
                    "take cluster IPs from the Service range, never a node address",
                );
            }
            // Link-local holds the pods' gateway and the hairpin address.
            if ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.is_broadcast()
                || ip.is_link_local()
            {
                return invalid(
                    "services.cluster_ip",
                    format!("{id}: {ip} is not a unicast address a Service can have"),
                    "take cluster IPs from the Service range, e.g. 10.96.0.10",
                );
            }
            if !(1..=86_400).contains(&service.session_affinity_timeout_seconds) {
                return invalid(
                    "services.session_affinity_timeout_seconds",
                    format!("{id}: {} is outside 1..=86400", service.session_affinity_timeout_seconds),
                    "use 1..=86400 (Kubernetes' limit); the default is 10800",
                );
            }
            if service.ports.is_empty() {
                return invalid(
                    "services.ports",
                    format!("{id} has no port"),
                    "add at least one [[services.ports]] with port = <number>",
                );
            }
            for port in &service.ports {
                if port.port == 0 || port.target_port == Some(0) {
                    return invalid(
                        "services.ports.port",
                        format!("{id}: 0 is not a port"),
                        "use 1..=65535 for port and target_port",
                    );
                }
                if port.protocol == ServiceProtocol::Sctp {
                    return invalid(
                        "services.ports.protocol",
                        format!("{id} port {}: SCTP is not supported by this datapath", port.port),
                        "use \"TCP\" or \"UDP\", or leave this port to kube-proxy",
                    );
                }
                if let Some(other) = service_ports.insert((ip, port.port, port.protocol), id.clone()) {
                    return invalid(
                        "services.ports",
                        format!(
                            "{ip}:{}/{} belongs to both {other} and {id}",
                            port.port,
                            port.protocol.name()
                        ),
                        "give every Service its own cluster IP, and each port/protocol once",
                    );
                }
            }
            let mut seen = std::collections::HashSet::new();
            for backend in &service.backends {
                if !self.cluster_cidr.contains(backend) {
                    return invalid(
                        "services.backends",
                        format!("{id}: backend {backend} is not inside cluster_cidr {}", self.cluster_cidr),
                        "list the ready pods' addresses (EndpointSlice endpoints), all in the pod network",
                    );
                }
                if !seen.insert(backend) {
                    return invalid(
                        "services.backends",
                        format!("{id}: backend {backend} is listed twice"),
                        "list each ready pod once",
                    );
                }
            }
            backend_slots += (service.ports.len() * service.backends.len()) as u64;
        }
        if service_ports.len() as u64 > u64::from(datapath_common::MAX_SERVICES) {
            return invalid(
                "services.ports",
                format!(
                    "{} Service ports, more than the datapath's {}",
                    service_ports.len(),
                    datapath_common::MAX_SERVICES
                ),
                "fewer Service ports per node",
            );
        }
        if backend_slots > u64::from(datapath_common::MAX_SERVICE_BACKENDS) {
            return invalid(
                "services.backends",
                format!(
                    "{backend_slots} backends over all Service ports, more than the datapath's {}",
                    datapath_common::MAX_SERVICE_BACKENDS
                ),
                "fewer backends or Service ports",
            );
        }
        Ok(())
    }

    fn validate_topology(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String, fix| Err(ConfigError::Invalid { field, problem, fix });
        if self.source == Source::Kubernetes && !self.peers.is_empty() {
            return invalid(
                "peers",
                format!(
                    "{} static peers given, but peers come from Node objects in kubernetes mode",
                    self.peers.len()
                ),
                "remove [[peers]] or use source = \"static\"",
            );
        }
        if self.cluster_cidr != self.cluster_cidr.trunc() {
            return invalid(
                "cluster_cidr",
                format!("{} has host bits set", self.cluster_cidr),
                "use the network address, e.g. \"10.244.0.0/16\"",
            );
        }
        if !self.cluster_cidr.contains(&self.pod_cidr) {
            return invalid(
                "pod_cidr",
                format!("{} is not inside cluster_cidr {}", self.pod_cidr, self.cluster_cidr),
                "give this node a pod CIDR from the cluster's range",
            );
        }
        if self.cluster_cidr.contains(&self.node_ip) {
            return invalid(
                "node_ip",
                format!("{} is inside cluster_cidr {}", self.node_ip, self.cluster_cidr),
                "use the node's address on the physical network, outside the pod range",
            );
        }
        let vx = &self.vxlan;
        if vx.vni == 0 || vx.vni >= 1 << 24 {
            return invalid("vxlan.vni", format!("{} is not a 24-bit VNI", vx.vni), "use 1..16777215");
        }
        if vx.port == 0 {
            return invalid("vxlan.port", "0 is not a port".into(), "use 8472 (the default) or 4789");
        }
        if vx.device.is_empty() || vx.device.len() > 15 {
            return invalid(
                "vxlan.device",
                format!("{:?} is not a valid interface name", vx.device),
                "use at most 15 characters, e.g. \"dp-vxlan\"",
            );
        }
        for (i, peer) in self.peers.iter().enumerate() {
            let name = &peer.name;
            if name.is_empty() {
                return invalid(
                    "peers.name",
                    format!("peer #{} has no name", i + 1),
                    "name every peer after its node",
                );
            }
            if peer.pod_cidr != peer.pod_cidr.trunc() {
                return invalid(
                    "peers.pod_cidr",
                    format!("peer {name}: {} has host bits set", peer.pod_cidr),
                    "use the network address",
                );
            }
            if !self.cluster_cidr.contains(&peer.pod_cidr) {
                return invalid(
                    "peers.pod_cidr",
                    format!(
                        "peer {name}: {} is not inside cluster_cidr {}",
                        peer.pod_cidr, self.cluster_cidr
                    ),
                    "peers' pod CIDRs come from the cluster's range",
                );
            }
            if peer.pod_cidr.contains(&self.pod_cidr) || self.pod_cidr.contains(&peer.pod_cidr) {
                return invalid(
                    "peers.pod_cidr",
                    format!("peer {name}: {} overlaps this node's pod_cidr {}", peer.pod_cidr, self.pod_cidr),
                    "every node needs its own pod CIDR; remove this node from its own peer list",
                );
            }
            if peer.node_ip == self.node_ip {
                return invalid(
                    "peers.node_ip",
                    format!("peer {name} has this node's address {}", peer.node_ip),
                    "remove this node from its own peer list",
                );
            }
            if self.cluster_cidr.contains(&peer.node_ip) {
                return invalid(
                    "peers.node_ip",
                    format!("peer {name}: {} is inside cluster_cidr", peer.node_ip),
                    "use the peer's address on the physical network",
                );
            }
            for other in &self.peers[..i] {
                if other.name == peer.name {
                    return invalid(
                        "peers.name",
                        format!("two peers are called {name}"),
                        "give each peer its node's unique name",
                    );
                }
                if other.node_ip == peer.node_ip {
                    return invalid(
                        "peers.node_ip",
                        format!("peers {} and {name} share {}", other.name, peer.node_ip),
                        "each node has its own address",
                    );
                }
                if other.pod_cidr.contains(&peer.pod_cidr) || peer.pod_cidr.contains(&other.pod_cidr) {
                    return invalid(
                        "peers.pod_cidr",
                        format!(
                            "peers {} ({}) and {name} ({}) overlap",
                            other.name, other.pod_cidr, peer.pod_cidr
                        ),
                        "every node needs its own pod CIDR",
                    );
                }
            }
        }
        Ok(())
    }

    /// Fields that only a restart may change (the datapath is built around them).
    /// `peers`, `services` and the conntrack timeouts are applied live.
    pub fn restart_only_fields_differ(&self, other: &AgentConfig) -> Option<&'static str> {
        if self.node_name != other.node_name {
            Some("node_name")
        } else if self.pod_cidr != other.pod_cidr {
            Some("pod_cidr")
        } else if self.uplink_interface != other.uplink_interface {
            Some("uplink_interface")
        } else if self.bpffs_dir != other.bpffs_dir {
            Some("bpffs_dir")
        } else if self.api_socket != other.api_socket {
            Some("api_socket")
        } else if self.state_dir != other.state_dir {
            Some("state_dir")
        } else if self.cluster_cidr != other.cluster_cidr {
            Some("cluster_cidr")
        } else if self.node_ip != other.node_ip {
            Some("node_ip")
        } else if self.mode != other.mode {
            Some("mode")
        } else if self.masquerade != other.masquerade {
            Some("masquerade")
        } else if self.vxlan != other.vxlan {
            Some("vxlan")
        } else if self.source != other.source || self.kubernetes != other.kubernetes {
            Some("source")
        } else if self.health_address != other.health_address {
            Some("health_address")
        } else if self.event_loop_stall_seconds != other.event_loop_stall_seconds {
            Some("event_loop_stall_seconds")
        } else if self.cni_config_file != other.cni_config_file {
            Some("cni_config_file")
        } else if self.ebpf_log != other.ebpf_log {
            Some("ebpf_log")
        } else if self.monitor_events_per_second != other.monitor_events_per_second {
            Some("monitor_events_per_second")
        } else if self.conntrack_max_entries != other.conntrack_max_entries {
            Some("conntrack_max_entries")
        } else {
            None
        }
    }

    /// Checks that need the host: the uplink exists, bpffs_dir is on bpffs.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        if nix::net::if_::if_nametoindex(self.uplink_interface.as_str()).is_err() {
            return Err(ConfigError::Invalid {
                field: "uplink_interface",
                problem: format!("no interface named {:?} on this node", self.uplink_interface),
                fix: "name an existing interface (see `ip link`)",
            });
        }
        let on_uplink = nix::ifaddrs::getifaddrs()
            .map(|addrs| {
                addrs
                    .filter(|a| a.interface_name == self.uplink_interface)
                    .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                    .any(|ip| ip == self.node_ip)
            })
            .unwrap_or(false);
        if !on_uplink {
            return Err(ConfigError::Invalid {
                field: "node_ip",
                problem: format!("{} is not an address of {}", self.node_ip, self.uplink_interface),
                fix: "use the address the uplink has (see `ip -4 addr show <uplink>`)",
            });
        }
        check_on_bpffs(&self.bpffs_dir)
    }

    /// True if `ip` is a usable pod address of this node.
    pub fn owns_pod_ip(&self, ip: Ipv4Addr) -> bool {
        self.pod_cidr.contains(&ip)
    }
}

/// `bpffs_dir` (or its closest existing parent) is on a bpf filesystem.
fn check_on_bpffs(bpffs_dir: &Path) -> Result<(), ConfigError> {
    let bpffs_root = bpffs_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    match nix::sys::statfs::statfs(bpffs_root) {
        Ok(st) if st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => Ok(()),
        _ => Err(ConfigError::Invalid {
            field: "bpffs_dir",
            problem: format!("{} is not on a bpf filesystem", bpffs_dir.display()),
            fix: "mount bpffs (mount -t bpf bpf /sys/fs/bpf) and point bpffs_dir under it",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_name = "node-a"
pod_cidr = "10.244.1.0/24"
uplink_interface = "eth0"
cluster_cidr = "10.244.0.0/16"
node_ip = "192.168.1.10"
"#;

    #[test]
    fn accepts_minimal_config_with_defaults() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.bpffs_dir, PathBuf::from(DEFAULT_BPFFS_DIR));
        assert_eq!(c.api_socket, PathBuf::from(DEFAULT_API_SOCKET));
    }

    fn error_of(text: &str) -> String {
        AgentConfig::parse(text).unwrap_err().to_string()
    }

    fn with_peers(peers: &str) -> String {
        format!("{GOOD}\n{peers}")
    }

    #[test]
    fn accepts_peers_and_vxlan() {
        let c = AgentConfig::parse(&with_peers(
            "mode = \"vxlan\"\n[vxlan]\nport = 4789\n[[peers]]\nname = \"b\"\nnode_ip = \"192.168.1.11\"\npod_cidr = \"10.244.2.0/24\"\n",
        ))
        .unwrap();
        assert_eq!(c.mode, Mode::Vxlan);
        assert_eq!(c.vxlan.port, 4789);
        assert_eq!(c.vxlan.vni, 1);
        assert_eq!(c.peers.len(), 1);
        assert!(c.masquerade);
    }

    #[test]
    fn refuses_inconsistent_topology() {
        let peer = |name: &str, ip: &str, cidr: &str| {
            format!("[[peers]]\nname = \"{name}\"\nnode_ip = \"{ip}\"\npod_cidr = \"{cidr}\"\n")
        };
        for (peers, field, words) in [
            (peer("b", "192.168.1.11", "10.244.1.0/24"), "peers.pod_cidr", "overlaps this node"),
            (peer("b", "192.168.1.11", "10.244.0.0/20"), "peers.pod_cidr", "overlaps this node"),
            (peer("b", "192.168.1.11", "10.99.0.0/24"), "peers.pod_cidr", "not inside cluster_cidr"),
            (peer("b", "192.168.1.10", "10.244.2.0/24"), "peers.node_ip", "this node's address"),
            (
                peer("b", "192.168.1.11", "10.244.2.0/24") + &peer("c", "192.168.1.12", "10.244.2.128/25"),
                "peers.pod_cidr",
                "overlap",
            ),
            (
                peer("b", "192.168.1.11", "10.244.2.0/24") + &peer("b", "192.168.1.12", "10.244.3.0/24"),
                "peers.name",
                "two peers",
            ),
        ] {
            let e = error_of(&with_peers(&peers));
            assert!(e.contains(&format!("`{field}`")) && e.contains(words), "{field}/{words}: {e}");
        }
        let e = error_of(&GOOD.replace("10.244.0.0/16", "10.245.0.0/16"));
        assert!(e.contains("`pod_cidr`") && e.contains("cluster_cidr"), "{e}");
        let e = error_of(&GOOD.replace("192.168.1.10", "10.244.9.9"));
        assert!(e.contains("`node_ip`"), "{e}");
        let e = error_of(&format!("{GOOD}\nmode = \"geneve\"\n"));
        assert!(e.contains("mode"), "{e}");
        let e = error_of(&format!("{GOOD}\n[vxlan]\nvni = 0\n"));
        assert!(e.contains("`vxlan.vni`"), "{e}");
    }

    const WEB: &str = r#"
[[services]]
name = "web"
cluster_ip = "10.96.0.10"
backends = ["10.244.1.5", "10.244.2.7"]
[[services.ports]]
port = 80
target_port = 8080
name = "http"
[[services.ports]]
port = 53
protocol = "UDP"
"#;

    #[test]
    fn accepts_services_with_kubernetes_defaults() {
        let c = AgentConfig::parse(&format!("{GOOD}{WEB}")).unwrap();
        assert_eq!(c.conntrack_max_entries, datapath_common::DEFAULT_CONNTRACK_ENTRIES);
        assert_eq!(
            (c.conntrack_tcp_idle_seconds, c.conntrack_udp_idle_seconds, c.conntrack_closing_seconds),
            (21_600, 60, 10)
        );
        let web = &c.services[0];
        assert_eq!(web.namespace, "default");
        assert_eq!(web.session_affinity, SessionAffinity::None);
        assert_eq!(web.session_affinity_timeout_seconds, 10_800);
        assert_eq!(web.ports[0].target_port(), 8080);
        assert_eq!(web.ports[0].name.as_deref(), Some("http"));
        assert_eq!((web.ports[1].protocol, web.ports[1].target_port()), (ServiceProtocol::Udp, 53));

        let sticky = WEB.replace(
            "cluster_ip = \"10.96.0.10\"",
            "cluster_ip = \"10.96.0.10\"\nsession_affinity = \"ClientIP\"\nsession_affinity_timeout_seconds = 60",
        );
        let c = AgentConfig::parse(&format!("{GOOD}{sticky}")).unwrap();
        assert_eq!(c.services[0].session_affinity, SessionAffinity::ClientIp);
        assert_eq!(c.services[0].session_affinity_timeout_seconds, 60);
        // An empty backend list is valid: the Service refuses connections.
        let empty = WEB.replace("backends = [\"10.244.1.5\", \"10.244.2.7\"]", "backends = []");
        assert!(AgentConfig::parse(&format!("{GOOD}{empty}")).unwrap().services[0].backends.is_empty());
    }

    #[test]
    fn refuses_bad_services_naming_the_field() {
        let other = |ip: &str, port: &str| {
            format!(
                "[[services]]\nname = \"other\"\ncluster_ip = \"{ip}\"\n[[services.ports]]\nport = {port}\n"
            )
        };
        for (services, field, words) in [
            (WEB.replace("10.96.0.10", "10.244.3.3"), "services.cluster_ip", "inside cluster_cidr"),
            (WEB.replace("10.96.0.10", "192.168.1.10"), "services.cluster_ip", "node's address"),
            (WEB.replace("10.96.0.10", "169.254.42.1"), "services.cluster_ip", "not a unicast"),
            (WEB.replace("10.244.2.7", "192.168.7.7"), "services.backends", "not inside cluster_cidr"),
            (WEB.replace("10.244.2.7", "10.244.1.5"), "services.backends", "listed twice"),
            (WEB.replace("port = 53\nprotocol = \"UDP\"", "port = 80"), "services.ports", "belongs to both"),
            (format!("{WEB}{}", other("10.96.0.10", "80")), "services.ports", "10.96.0.10:80/TCP"),
            (WEB.replace("protocol = \"UDP\"", "protocol = \"SCTP\""), "services.ports.protocol", "SCTP"),
            (WEB.replace("\nport = 80", "\nport = 0"), "services.ports.port", "not a port"),
            (WEB.replace("target_port = 8080", "target_port = 0"), "services.ports.port", "not a port"),
            (
                format!("{WEB}{}", other("10.96.0.11", "80").replace("other", "web")),
                "services.name",
                "two Services",
            ),
            (
                "[[services]]\nname = \"bare\"\ncluster_ip = \"10.96.0.12\"\nports = []\n".to_owned(),
                "services.ports",
                "no port",
            ),
            (
                WEB.replace(
                    "cluster_ip = \"10.96.0.10\"",
                    "cluster_ip = \"10.96.0.10\"\nsession_affinity_timeout_seconds = 0",
                ),
                "services.session_affinity_timeout_seconds",
                "outside",
            ),
        ] {
            let e = error_of(&format!("{GOOD}{services}"));
            assert!(e.contains(&format!("`{field}`")) && e.contains(words), "{field}/{words}: {e}");
        }
        // The same port with the other protocol, or on another address, is another Service port.
        AgentConfig::parse(&format!("{GOOD}{WEB}{}", other("10.96.0.10", "53"))).unwrap();
        AgentConfig::parse(&format!("{GOOD}{WEB}{}", other("10.96.0.11", "80"))).unwrap();
        // Kubernetes spelling only.
        let e = error_of(&format!("{GOOD}{}", WEB.replace("protocol = \"UDP\"", "protocol = \"udp\"")));
        assert!(e.contains("protocol"), "{e}");
        let e = error_of(&format!(
            "{GOOD}{}",
            WEB.replace(
                "cluster_ip = \"10.96.0.10\"",
                "cluster_ip = \"10.96.0.10\"\nsession_affinity = \"clientip\""
            )
        ));
        assert!(e.contains("session_affinity"), "{e}");
        let e = error_of(&format!("{GOOD}source = \"kubernetes\"\n{WEB}"));
        assert!(e.contains("`services`"), "{e}");
    }

    #[test]
    fn conntrack_limits_are_checked_and_its_size_needs_a_restart() {
        for (line, field) in [
            ("conntrack_max_entries = 1023", "conntrack_max_entries"),
            ("conntrack_max_entries = 2049", "conntrack_max_entries"),
            ("conntrack_max_entries = 8388608", "conntrack_max_entries"),
            ("conntrack_tcp_idle_seconds = 0", "conntrack_tcp_idle_seconds"),
            ("conntrack_udp_idle_seconds = 0", "conntrack_udp_idle_seconds"),
            ("conntrack_closing_seconds = 0", "conntrack_closing_seconds"),
        ] {
            let e = error_of(&format!("{GOOD}{line}\n"));
            assert!(e.contains(&format!("`{field}`")), "{line}: {e}");
        }
        let base = AgentConfig::parse(GOOD).unwrap();
        let resized = AgentConfig::parse(&format!("{GOOD}conntrack_max_entries = 1024\n")).unwrap();
        assert_eq!(base.restart_only_fields_differ(&resized), Some("conntrack_max_entries"));
        let live = AgentConfig::parse(&format!("{GOOD}conntrack_udp_idle_seconds = 30\n{WEB}")).unwrap();
        assert_eq!(base.restart_only_fields_differ(&live), None, "Services and timeouts apply live");
    }

    #[test]
    fn names_the_bad_field() {
        let e = error_of(&GOOD.replace("10.244.1.0/24", "10.244.1.7/24"));
        assert!(e.contains("`pod_cidr`") && e.contains("host bits"), "{e}");
        let e = error_of(&GOOD.replace("10.244.1.0/24", "banana"));
        assert!(e.contains("pod_cidr"), "{e}");
        let e = error_of(&GOOD.replace("node-a", ""));
        assert!(e.contains("`node_name`"), "{e}");
        let e = error_of(&format!("{GOOD}\nbpffs_dir = \"relative\"\n"));
        assert!(e.contains("`bpffs_dir`"), "{e}");
        let e = error_of(&format!("{GOOD}\npod_cdir = \"10.0.0.0/24\"\n"));
        assert!(e.contains("pod_cdir"), "unknown field must be named: {e}");
        let e = error_of("node_name = \"x\"\n");
        assert!(e.contains("pod_cidr"), "missing field must be named: {e}");
    }
}
