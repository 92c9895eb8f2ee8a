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
    Mode, PeerConfig, ServiceConfig, ServicePortConfig, ServiceProtocol, SessionAffinity, TrafficPolicy,
    VXLAN_OVERHEAD,
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
    /// Unanswered connections (TCP not yet answered and acknowledged, UDP
    /// not yet answered) one pod may have tracked at once (clients outside
    /// are held together, by `conntrack_max_outside`): a new Service
    /// connection past it is refused (`conntrack_client_limit`), so SYNs
    /// one pod never completes cannot fill the table. Unset: 1024, or an eighth of the table's
    /// entries if that is less. 0: no limit.
    #[serde(default)]
    pub conntrack_max_per_client: Option<u32>,
    /// Unanswered Service connections all clients outside the cluster may
    /// have tracked together (node ports, external and load balancer
    /// addresses, with `serve_outside_clients`): past it, a new TCP one
    /// takes the place of an unanswered one from outside (early
    /// drop, `conntrack_early_drop`) and a new UDP flow is dropped
    /// (`conntrack_outside_limit`), so a SYN flood from faked source
    /// addresses holds at most this share of the table, never the pods'
    /// own connections, and keeps no real client out. Split evenly
    /// between TCP and UDP, so a UDP burst never locks TCP clients out.
    /// TCP connections from outside answered or not are held to all of it
    /// (an outside host holding its connections open cannot take the
    /// pods' part of the table either). Unset: a quarter of the table's
    /// entries (`conntrack_max_entries / 8` connections). 0: no limit.
    #[serde(default)]
    pub conntrack_max_outside: Option<u32>,
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
    /// A TCP connection one side half-closed (one FIN, say a client's
    /// `shutdown(SHUT_WR)`) is forgotten this long after its last packet:
    /// the other side may still answer at length.
    #[serde(default = "default_conntrack_half_closed_seconds")]
    pub conntrack_half_closed_seconds: u32,
    /// A TCP connection not yet answered and acknowledged (a SYN nobody
    /// completes) is forgotten this long after its last packet.
    #[serde(default = "default_conntrack_opening_seconds")]
    pub conntrack_opening_seconds: u32,
    /// ClusterIP Services (static source): cluster IP, ports and ready
    /// backends. Applied live when the file changes.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// NetworkPolicy objects for the static source: a directory of YAML
    /// files holding NetworkPolicy, Namespace and Pod objects (Pods for
    /// their labels, named ports and, for other nodes' pods, addresses).
    /// Watched while the agent runs; unset, no policy applies.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Socket-level load balancing for the node's own sockets (its
    /// processes, hostNetwork pods): their connect() and sendmsg() to a
    /// Service go straight to a backend (docs/services.md). Off: they
    /// reach no Service (kube-proxy or nothing must serve them).
    #[serde(default = "default_true")]
    pub socket_lb: bool,
    /// Serve node ports and external and load balancer addresses to
    /// clients outside the cluster (packets that arrive at the uplink).
    /// Off by default: no TCP sequence numbers are tracked, so a host
    /// outside can end idle NodePort connections with blind forged resets,
    /// which netfilter's window check refuses (docs/services.md, "Known
    /// gaps"); kube-proxy keeps serving those clients meanwhile. Pods and
    /// the node's own sockets reach node ports and these addresses either
    /// way.
    #[serde(default)]
    pub serve_outside_clients: bool,
    /// The cgroup v2 directory the socket programs are attached to: the
    /// root of the hierarchy, so that every process is under it. Unset:
    /// where cgroup2 is mounted (from /proc/self/mountinfo). In a
    /// DaemonSet, mount the host's cgroup2 root into the agent's pod.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
}

/// What a config reload applies while the agent runs: the peers, the
/// Services and the conntrack timeouts (the collector reads them at each
/// sweep).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConfig {
    pub peers: Vec<PeerConfig>,
    pub services: Vec<ServiceConfig>,
    pub conntrack_tcp_idle_seconds: u32,
    pub conntrack_udp_idle_seconds: u32,
    pub conntrack_closing_seconds: u32,
    pub conntrack_half_closed_seconds: u32,
    pub conntrack_opening_seconds: u32,
}

/// What the datapath is built around at start: a change is reported as
/// needing a restart, and not applied until then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupConfig {
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    pub uplink_interface: String,
    pub bpffs_dir: PathBuf,
    pub api_socket: PathBuf,
    pub state_dir: PathBuf,
    pub cluster_cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
    pub mode: Mode,
    pub masquerade: bool,
    pub vxlan: VxlanConfig,
    pub source: Source,
    pub kubernetes: KubernetesConfig,
    pub health_address: Option<std::net::SocketAddr>,
    pub event_loop_stall_seconds: u32,
    pub cni_config_file: Option<PathBuf>,
    pub ebpf_log: EbpfLog,
    pub monitor_events_per_second: u32,
    pub conntrack_max_entries: u32,
    pub conntrack_max_per_client: Option<u32>,
    pub conntrack_max_outside: Option<u32>,
    pub policy_dir: Option<PathBuf>,
    pub socket_lb: bool,
    pub serve_outside_clients: bool,
    pub cgroup_root: Option<PathBuf>,
}

impl StartupConfig {
    /// The first field, in file order, by which `other` differs, named as in
    /// the file (`kubernetes` settings count as `source`). Every field is
    /// named here (no `..`): a new one does not compile until it is compared.
    pub fn first_difference(&self, other: &StartupConfig) -> Option<&'static str> {
        let StartupConfig {
            node_name,
            pod_cidr,
            uplink_interface,
            bpffs_dir,
            api_socket,
            state_dir,
            cluster_cidr,
            node_ip,
            mode,
            masquerade,
            vxlan,
            source,
            kubernetes,
            health_address,
            event_loop_stall_seconds,
            cni_config_file,
            ebpf_log,
            monitor_events_per_second,
            conntrack_max_entries,
            conntrack_max_per_client,
            conntrack_max_outside,
            policy_dir,
            socket_lb,
            serve_outside_clients,
            cgroup_root,
        } = self;
        [
            ("node_name", *node_name != other.node_name),
            ("pod_cidr", *pod_cidr != other.pod_cidr),
            ("uplink_interface", *uplink_interface != other.uplink_interface),
            ("bpffs_dir", *bpffs_dir != other.bpffs_dir),
            ("api_socket", *api_socket != other.api_socket),
            ("state_dir", *state_dir != other.state_dir),
            ("cluster_cidr", *cluster_cidr != other.cluster_cidr),
            ("node_ip", *node_ip != other.node_ip),
            ("mode", *mode != other.mode),
            ("masquerade", *masquerade != other.masquerade),
            ("vxlan", *vxlan != other.vxlan),
            ("source", *source != other.source || *kubernetes != other.kubernetes),
            ("health_address", *health_address != other.health_address),
            ("event_loop_stall_seconds", *event_loop_stall_seconds != other.event_loop_stall_seconds),
            ("cni_config_file", *cni_config_file != other.cni_config_file),
            ("ebpf_log", *ebpf_log != other.ebpf_log),
            ("monitor_events_per_second", *monitor_events_per_second != other.monitor_events_per_second),
            ("conntrack_max_entries", *conntrack_max_entries != other.conntrack_max_entries),
            ("conntrack_max_per_client", *conntrack_max_per_client != other.conntrack_max_per_client),
            ("conntrack_max_outside", *conntrack_max_outside != other.conntrack_max_outside),
            ("policy_dir", *policy_dir != other.policy_dir),
            ("socket_lb", *socket_lb != other.socket_lb),
            ("serve_outside_clients", *serve_outside_clients != other.serve_outside_clients),
            ("cgroup_root", *cgroup_root != other.cgroup_root),
        ]
        .into_iter()
        .find_map(|(field, differs)| differs.then_some(field))
    }
}

/// Unanswered connections per client unless `conntrack_max_per_client`
/// says otherwise: far more than any client has in flight at once (a
/// connect() retry loop against a dead backend makes a few a second, each
/// gone after `conntrack_opening_seconds`).
const DEFAULT_CONNTRACK_MAX_PER_CLIENT: u32 = 1024;

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
fn default_conntrack_half_closed_seconds() -> u32 {
    120
}
fn default_conntrack_opening_seconds() -> u32 {
    60
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
    // The position and the problem are the source's (shown once, by the chain).
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config field `{field}` is invalid: {problem}; fix: {fix}")]
    Invalid { field: &'static str, problem: String, fix: &'static str },
}

impl AgentConfig {
    /// `conntrack_max_per_client` as the programs get it (0: no limit).
    pub fn conntrack_max_per_client(&self) -> u32 {
        self.conntrack_max_per_client
            .unwrap_or(DEFAULT_CONNTRACK_MAX_PER_CLIENT.min(self.conntrack_max_entries / 8))
    }

    /// `conntrack_max_outside` as the programs get it (0: no limit).
    pub fn conntrack_max_outside(&self) -> u32 {
        self.conntrack_max_outside.unwrap_or(self.conntrack_max_entries / 8)
    }

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

    /// The config sorted into its two parts. Every field is named here (no
    /// `..`, each bound one used): a new field does not compile until it is
    /// put in one of them, so none can be "live but never applied".
    pub fn split(self) -> (StartupConfig, LiveConfig) {
        let AgentConfig {
            node_name,
            pod_cidr,
            uplink_interface,
            bpffs_dir,
            api_socket,
            state_dir,
            cluster_cidr,
            node_ip,
            mode,
            masquerade,
            vxlan,
            peers,
            source,
            kubernetes,
            health_address,
            event_loop_stall_seconds,
            cni_config_file,
            ebpf_log,
            monitor_events_per_second,
            conntrack_max_entries,
            conntrack_max_per_client,
            conntrack_max_outside,
            conntrack_tcp_idle_seconds,
            conntrack_udp_idle_seconds,
            conntrack_closing_seconds,
            conntrack_half_closed_seconds,
            conntrack_opening_seconds,
            services,
            policy_dir,
            socket_lb,
            serve_outside_clients,
            cgroup_root,
        } = self;
        let startup = StartupConfig {
            node_name,
            pod_cidr,
            uplink_interface,
            bpffs_dir,
            api_socket,
            state_dir,
            cluster_cidr,
            node_ip,
            mode,
            masquerade,
            vxlan,
            source,
            kubernetes,
            health_address,
            event_loop_stall_seconds,
            cni_config_file,
            ebpf_log,
            monitor_events_per_second,
            conntrack_max_entries,
            conntrack_max_per_client,
            conntrack_max_outside,
            policy_dir,
            socket_lb,
            serve_outside_clients,
            cgroup_root,
        };
        let live = LiveConfig {
            peers,
            services,
            conntrack_tcp_idle_seconds,
            conntrack_udp_idle_seconds,
            conntrack_closing_seconds,
            conntrack_half_closed_seconds,
            conntrack_opening_seconds,
        };
        (startup, live)
    }

    /// Take the live part of a reloaded config; the startup part stays as
    /// the agent started with it.
    pub fn apply_live(&mut self, live: LiveConfig) {
        let LiveConfig {
            peers,
            services,
            conntrack_tcp_idle_seconds,
            conntrack_udp_idle_seconds,
            conntrack_closing_seconds,
            conntrack_half_closed_seconds,
            conntrack_opening_seconds,
        } = live;
        self.peers = peers;
        self.services = services;
        self.conntrack_tcp_idle_seconds = conntrack_tcp_idle_seconds;
        self.conntrack_udp_idle_seconds = conntrack_udp_idle_seconds;
        self.conntrack_closing_seconds = conntrack_closing_seconds;
        self.conntrack_half_closed_seconds = conntrack_half_closed_seconds;
        self.conntrack_opening_seconds = conntrack_opening_seconds;
    }

    /// The first field only a restart may change (the datapath is built
    /// around them) by which `other` differs: [`StartupConfig::first_difference`].
    pub fn restart_only_fields_differ(&self, other: &AgentConfig) -> Option<&'static str> {
        self.clone().split().0.first_difference(&other.clone().split().0)
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
mod tests;
mod validate;
