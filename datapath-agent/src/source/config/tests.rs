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
    // The whole chain, as the agent prints it (a parse error's position is its source).
    format!("{:#}", anyhow::Error::from(AgentConfig::parse(text).unwrap_err()))
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
    // Graceful termination, external addresses and the internal policy.
    let full = WEB.replace(
        "backends = [\"10.244.1.5\", \"10.244.2.7\"]",
        "backends = [\"10.244.1.5\"]\nterminating_backends = [\"10.244.2.7\"]\n\
         external_ips = [\"203.0.113.7\"]\nload_balancer_ips = [\"198.51.100.9\"]\n\
         internal_traffic_policy = \"Local\"",
    );
    let web = &AgentConfig::parse(&format!("{GOOD}{full}")).unwrap().services[0];
    assert_eq!(web.terminating_backends, vec![std::net::Ipv4Addr::new(10, 244, 2, 7)]);
    assert_eq!(web.external_ips, vec![std::net::Ipv4Addr::new(203, 0, 113, 7)]);
    assert_eq!(web.load_balancer_ips, vec![std::net::Ipv4Addr::new(198, 51, 100, 9)]);
    assert_eq!(web.internal_traffic_policy, crate::model::TrafficPolicy::Local);
}

#[test]
fn refuses_bad_services_naming_the_field() {
    let other = |ip: &str, port: &str| {
        format!("[[services]]\nname = \"other\"\ncluster_ip = \"{ip}\"\n[[services.ports]]\nport = {port}\n")
    };
    for (services, field, words) in [
        (WEB.replace("10.96.0.10", "10.244.3.3"), "services.cluster_ip", "inside cluster_cidr"),
        (WEB.replace("10.96.0.10", "192.168.1.10"), "services.cluster_ip", "node's address"),
        (WEB.replace("10.96.0.10", "169.254.42.1"), "services.cluster_ip", "not a unicast"),
        (WEB.replace("10.244.2.7", "192.168.7.7"), "services.backends", "not inside cluster_cidr"),
        (WEB.replace("10.244.2.7", "10.244.1.5"), "services.backends", "listed twice"),
        (
            WEB.replace("backends = [", "terminating_backends = [\"10.244.1.5\"]\nbackends = ["),
            "services.terminating_backends",
            "listed twice",
        ),
        (
            WEB.replace("backends = [", "terminating_backends = [\"192.168.7.7\"]\nbackends = ["),
            "services.terminating_backends",
            "not inside cluster_cidr",
        ),
        (
            WEB.replace("backends = [", "external_ips = [\"192.168.1.10\"]\nbackends = ["),
            "services.external_ips",
            "node's address",
        ),
        (
            WEB.replace("backends = [", "load_balancer_ips = [\"10.244.9.9\"]\nbackends = ["),
            "services.load_balancer_ips",
            "inside cluster_cidr",
        ),
        (
            WEB.replace("backends = [", "external_ips = [\"10.96.0.10\"]\nbackends = ["),
            "services.external_ips",
            "listed twice",
        ),
        (
            format!(
                "{WEB}{}",
                other("10.96.0.11", "80").replace(
                    "cluster_ip = \"10.96.0.11\"",
                    "cluster_ip = \"10.96.0.11\"\nexternal_ips = [\"10.96.0.10\"]"
                )
            ),
            "services.ports",
            "10.96.0.10:80/TCP",
        ),
        (
            WEB.replace("backends = [", "external_traffic_policy = \"Local\"\nbackends = [")
                .replace("target_port = 8080", "target_port = 8080\nnode_port = 0"),
            "services.ports.node_port",
            "node port 0 is outside 30000-32767",
        ),
        (
            // The node's own ssh port, the VXLAN port, a source-NAT port.
            WEB.replace("target_port = 8080", "target_port = 8080\nnode_port = 22"),
            "services.ports.node_port",
            "node port 22 is outside 30000-32767",
        ),
        (
            WEB.replace("target_port = 8080", "target_port = 8080\nnode_port = 8472"),
            "services.ports.node_port",
            "node port 8472 is outside",
        ),
        (
            format!(
                "[vxlan]\nport = 30472\n{}",
                WEB.replace(
                    "target_port = 8080",
                    "target_port = 8080\nprotocol = \"UDP\"\nnode_port = 30472"
                )
            ),
            "services.ports.node_port",
            "is the VXLAN port",
        ),
        (
            WEB.replace("target_port = 8080", "target_port = 8080\nnode_port = 62000"),
            "services.ports.node_port",
            "node port 62000 is outside",
        ),
        (
            format!(
                "{}{}",
                WEB.replace("backends = [", "external_traffic_policy = \"Local\"\nbackends = [")
                    .replace("target_port = 8080", "target_port = 8080\nnode_port = 30080"),
                other("10.96.0.11", "80\nnode_port = 30080").replace(
                    "cluster_ip = \"10.96.0.11\"",
                    "cluster_ip = \"10.96.0.11\"\nexternal_traffic_policy = \"Local\""
                )
            ),
            "services.ports",
            ":30080/TCP belongs to both",
        ),
        (
            WEB.replace("backends = [", "internal_traffic_policy = \"Nearby\"\nbackends = ["),
            "services.internal_traffic_policy",
            "",
        ),
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
        ("conntrack_half_closed_seconds = 0", "conntrack_half_closed_seconds"),
        ("conntrack_opening_seconds = 3601", "conntrack_opening_seconds"),
        ("conntrack_max_per_client = 65537", "conntrack_max_per_client"),
        ("conntrack_max_outside = 65537", "conntrack_max_outside"),
        // More than half the table's connections: the pods keep the other half.
        ("conntrack_max_outside = 32769", "conntrack_max_outside"),
    ] {
        let e = error_of(&format!("{GOOD}{line}\n"));
        assert!(e.contains(&format!("`{field}`")), "{line}: {e}");
    }
    assert!(AgentConfig::parse(&format!("{GOOD}conntrack_max_outside = 32768\n")).is_ok());
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

/// A field's name and a change of it.
type FieldChange = (&'static str, fn(&mut AgentConfig));

#[test]
fn each_startup_field_needs_a_restart_and_each_live_field_is_applied() {
    let base = AgentConfig::parse(GOOD).unwrap();
    let startup: [FieldChange; 24] = [
        ("node_name", |c| c.node_name.push('x')),
        ("pod_cidr", |c| c.pod_cidr = "10.244.2.0/24".parse().unwrap()),
        ("uplink_interface", |c| c.uplink_interface.push('x')),
        ("bpffs_dir", |c| c.bpffs_dir.push("x")),
        ("api_socket", |c| c.api_socket.push("x")),
        ("state_dir", |c| c.state_dir.push("x")),
        ("cluster_cidr", |c| c.cluster_cidr = "10.0.0.0/8".parse().unwrap()),
        ("node_ip", |c| c.node_ip = Ipv4Addr::new(192, 168, 1, 11)),
        ("mode", |c| c.mode = Mode::Vxlan),
        ("masquerade", |c| c.masquerade = !c.masquerade),
        ("vxlan", |c| c.vxlan.vni += 1),
        ("source", |c| c.source = Source::Kubernetes),
        ("source", |c| c.kubernetes.watch_failure_seconds += 1),
        ("health_address", |c| c.health_address = Some("127.0.0.1:9000".parse().unwrap())),
        ("event_loop_stall_seconds", |c| c.event_loop_stall_seconds += 1),
        ("cni_config_file", |c| c.cni_config_file = Some("/etc/cni/net.d/x.conflist".into())),
        ("ebpf_log", |c| c.ebpf_log = EbpfLog::Debug),
        ("monitor_events_per_second", |c| c.monitor_events_per_second += 1),
        ("conntrack_max_entries", |c| c.conntrack_max_entries *= 2),
        ("conntrack_max_per_client", |c| c.conntrack_max_per_client = Some(7)),
        ("policy_dir", |c| c.policy_dir = Some("/etc/datapath/policy".into())),
        ("socket_lb", |c| c.socket_lb = !c.socket_lb),
        ("serve_outside_clients", |c| c.serve_outside_clients = !c.serve_outside_clients),
        ("cgroup_root", |c| c.cgroup_root = Some("/sys/fs/cgroup".into())),
    ];
    for (field, change) in startup {
        let mut changed = base.clone();
        change(&mut changed);
        assert_ne!(changed, base, "{field}: the test changes nothing");
        assert_eq!(base.restart_only_fields_differ(&changed), Some(field));
        let mut running = base.clone();
        running.apply_live(changed.split().1);
        assert_eq!(running, base, "{field} is not applied live");
    }
    let live: [FieldChange; 7] = [
        ("peers", |c| {
            c.peers.push(PeerConfig {
                name: "node-c".into(),
                node_ip: Ipv4Addr::new(192, 168, 1, 30),
                pod_cidr: "10.244.3.0/24".parse().unwrap(),
            })
        }),
        ("services", |c| c.services = AgentConfig::parse(&format!("{GOOD}{WEB}")).unwrap().services),
        ("conntrack_tcp_idle_seconds", |c| c.conntrack_tcp_idle_seconds += 1),
        ("conntrack_udp_idle_seconds", |c| c.conntrack_udp_idle_seconds += 1),
        ("conntrack_closing_seconds", |c| c.conntrack_closing_seconds += 1),
        ("conntrack_half_closed_seconds", |c| c.conntrack_half_closed_seconds += 1),
        ("conntrack_opening_seconds", |c| c.conntrack_opening_seconds += 1),
    ];
    for (field, change) in live {
        let mut changed = base.clone();
        change(&mut changed);
        assert_ne!(changed, base, "{field}: the test changes nothing");
        assert_eq!(base.restart_only_fields_differ(&changed), None, "{field} needs no restart");
        let mut running = base.clone();
        running.apply_live(changed.clone().split().1);
        assert_eq!(running, changed, "{field} is applied live");
    }
}
