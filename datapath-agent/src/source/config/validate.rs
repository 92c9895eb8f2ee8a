//! Field-by-field validation of a parsed config: each refusal names the
//! field and how to fix it.

use super::*;

/// Kubernetes' default node port range (kube-apiserver
/// `--service-node-port-range`): the static file's node ports and health
/// check node ports must be in it.
const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

impl AgentConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if let Some(per_client) = self.conntrack_max_per_client
            && per_client > entries / 2
        {
            return invalid(
                "conntrack_max_per_client",
                format!("{per_client} is more than the {} connections the table holds", entries / 2),
                "leave it unset (1024), set at most conntrack_max_entries / 2, or 0 for no limit",
            );
        }
        // At most half the table's connections: the pods always keep the
        // other half, whatever a flood from outside does.
        if let Some(outside) = self.conntrack_max_outside
            && outside > entries / 4
        {
            return invalid(
                "conntrack_max_outside",
                format!(
                    "{outside} is more than {} (half the {} connections the table holds; the pods keep the other half)",
                    entries / 4,
                    entries / 2
                ),
                "leave it unset (a quarter of the table), set at most conntrack_max_entries / 4, or 0 for no limit",
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
            (
                "conntrack_half_closed_seconds",
                self.conntrack_half_closed_seconds,
                86_400,
                "use 1..=86400; the default is 120 (netfilter's FIN_WAIT)",
            ),
            (
                "conntrack_opening_seconds",
                self.conntrack_opening_seconds,
                3_600,
                "use 1..=3600; the default is 60 (a SYN nobody completes is gone after it)",
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
            let addresses = std::iter::once(("services.cluster_ip", service.cluster_ip))
                .chain(service.external_ips.iter().map(|ip| ("services.external_ips", *ip)))
                .chain(service.load_balancer_ips.iter().map(|ip| ("services.load_balancer_ips", *ip)));
            let mut own = std::collections::HashSet::new();
            for (field, ip) in addresses.clone() {
                if self.cluster_cidr.contains(&ip) {
                    return invalid(
                        field,
                        format!("{id}: {ip} is inside cluster_cidr {}", self.cluster_cidr),
                        "take cluster IPs from the Service range (--service-cluster-ip-range, e.g. \
                         10.96.0.0/12), external addresses from outside the pod network",
                    );
                }
                if ip == self.node_ip || self.peers.iter().any(|p| p.node_ip == ip) {
                    return invalid(
                        field,
                        format!("{id}: {ip} is a node's address"),
                        "a Service address is never a node address (NodePort serves those)",
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
                        field,
                        format!("{id}: {ip} is not a unicast address a Service can have"),
                        "take cluster IPs from the Service range, e.g. 10.96.0.10",
                    );
                }
                if !own.insert(ip) {
                    return invalid(
                        field,
                        format!("{id}: {ip} is listed twice among its addresses"),
                        "list each address once (cluster_ip, external_ips, load_balancer_ips)",
                    );
                }
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
                if let Some(node_port) = port.node_port
                    && port.protocol == ServiceProtocol::Udp
                    && node_port == self.vxlan.port
                {
                    return invalid(
                        "services.ports.node_port",
                        format!("{id}: node port {node_port}/UDP is the VXLAN port (vxlan.port)"),
                        "give the Service another node port, or the overlay another vxlan.port",
                    );
                }
                if let Some(node_port) = port.node_port
                    && !NODE_PORT_RANGE.contains(&node_port)
                {
                    // Outside it, a node port could take one of the node's
                    // own ports (ssh), the VXLAN port, or a source-NAT port.
                    return invalid(
                        "services.ports.node_port",
                        format!("{id}: node port {node_port} is outside 30000-32767"),
                        "use the Service's spec.ports[].nodePort, from Kubernetes' node port range 30000-32767",
                    );
                }
                let node_port = port.node_port.map(|p| (self.node_ip, p));
                for (ip, number) in addresses.clone().map(|(_, ip)| (ip, port.port)).chain(node_port) {
                    if let Some(other) = service_ports.insert((ip, number, port.protocol), id.clone()) {
                        return invalid(
                            "services.ports",
                            format!(
                                "{ip}:{number}/{} belongs to both {other} and {id}",
                                port.protocol.name()
                            ),
                            "give every Service its own cluster IP, and each address's port/protocol \
                             to one Service",
                        );
                    }
                }
            }
            if let Some(port) = service.health_check_node_port {
                if !NODE_PORT_RANGE.contains(&port) || service.external_traffic_policy != TrafficPolicy::Local
                {
                    return invalid(
                        "services.health_check_node_port",
                        format!(
                            "{id}: health check node port {port} needs a port and external_traffic_policy \"Local\""
                        ),
                        "give spec.healthCheckNodePort of a Service with externalTrafficPolicy Local, or remove it",
                    );
                }
                let taken = self.services.iter().any(|other| {
                    !std::ptr::eq(other, service)
                        && (other.health_check_node_port == Some(port)
                            || other.ports.iter().any(|p| p.node_port == Some(port)))
                }) || service.ports.iter().any(|p| p.node_port == Some(port));
                if taken {
                    return invalid(
                        "services.health_check_node_port",
                        format!("{id}: health check node port {port} is also another node port"),
                        "give every node port and health check node port its own number",
                    );
                }
            }
            let mut seen = std::collections::HashSet::new();
            let listed =
                service.backends.iter().map(|ip| ("services.backends", ip)).chain(
                    service.terminating_backends.iter().map(|ip| ("services.terminating_backends", ip)),
                );
            for (field, backend) in listed {
                if !self.cluster_cidr.contains(backend) {
                    return invalid(
                        field,
                        format!("{id}: backend {backend} is not inside cluster_cidr {}", self.cluster_cidr),
                        "list the pods' addresses (EndpointSlice endpoints), all in the pod network",
                    );
                }
                if !seen.insert(backend) {
                    return invalid(
                        field,
                        format!("{id}: backend {backend} is listed twice"),
                        "list each pod once: ready ones in backends, terminating ones that still \
                         serve in terminating_backends",
                    );
                }
            }
            let backends = service.backends.len().max(service.terminating_backends.len());
            let node_ports = service.ports.iter().filter(|p| p.node_port.is_some()).count();
            backend_slots += ((service.ports.len() * addresses.count() + node_ports) * backends) as u64;
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
}
