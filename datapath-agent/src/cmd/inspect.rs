//! `datapath-agent inspect`: read the pinned maps (works while the agent is down).

mod policy;

use std::path::PathBuf;

use anyhow::Context as _;
use datapath_api::mac::MacAddr;
use datapath_common::TcpState;

use crate::{
    bpf::{PinLayout, PinnedMaps},
    host::state::EndpointStore,
    reconcile::{conntrack, service_names, services},
};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    pub what: InspectWhat,
    /// The agent's configuration file: its `bpffs_dir` and `state_dir`
    /// are read from it (the flags below win).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// bpffs directory the agent pins under [default: from --config, else /sys/fs/bpf/datapath].
    #[arg(long, global = true)]
    pub bpffs_dir: Option<PathBuf>,
    /// The agent's state directory (endpoint records: pod names,
    /// containers) [default: from --config, else /var/lib/datapath].
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum InspectWhat {
    /// Local pod endpoints (pod IP -> host veth, MACs).
    Endpoints,
    /// Drop and forward counters, summed over CPUs.
    Counters,
    /// Remote pod CIDRs and the node each one lives on.
    Nodes,
    /// What the programs run with: node address, mode, interfaces, VNI.
    Config,
    /// Service ports (cluster IP, port, protocol) and their backends.
    Services,
    /// Tracked Service connections: client, Service, backend, idle time.
    Conntrack,
    /// NetworkPolicy per local pod: what it isolates, the allow rules as
    /// compiled (peer identity and its prefixes, protocol, ports).
    Policy {
        /// Only this pod.
        #[arg(long)]
        endpoint: Option<std::net::Ipv4Addr>,
    },
}

/// One Service port, as `inspect services --json` prints it.
#[derive(serde::Serialize)]
struct ServiceRow {
    /// From the agent's names file; null if it has no record of this id.
    namespace: Option<String>,
    name: Option<String>,
    port_name: Option<String>,
    cluster_ip: std::net::Ipv4Addr,
    port: u16,
    protocol: &'static str,
    id: u32,
    /// "None" or "ClientIP".
    session_affinity: &'static str,
    /// With ClientIP, how long a client keeps its backend; else null.
    session_affinity_timeout_seconds: Option<u32>,
    /// Whose connections: "cluster" (pods, the node, node ports) or
    /// "outside" (an external or load balancer address reached from
    /// outside the cluster, as externalTrafficPolicy says).
    clients: &'static str,
    /// What a new connection meets while `backends` is empty: "refuse"
    /// (ICMP port unreachable) or "drop" (internalTrafficPolicy Local,
    /// backends only on other nodes).
    without_backends: &'static str,
    backends: Vec<BackendRow>,
}

#[derive(serde::Serialize)]
struct BackendRow {
    ip: std::net::Ipv4Addr,
    port: u16,
}

/// One tracked connection, as `inspect conntrack --json` prints it.
#[derive(serde::Serialize)]
struct ConnectionRow {
    protocol: &'static str,
    client_ip: std::net::Ipv4Addr,
    client_port: u16,
    service_ip: std::net::Ipv4Addr,
    service_port: u16,
    backend_ip: std::net::Ipv4Addr,
    backend_port: u16,
    /// Seconds since the later of its two directions' last packets (the
    /// programs refresh it about once a second).
    idle_seconds: u64,
    /// FIN both ways or an RST: it goes after `conntrack_closing_seconds`
    /// idle.
    closing: bool,
    /// TCP: `opening` (not yet answered and acknowledged), `established`,
    /// `half_closed` (one FIN) or `closing`; UDP: `open`.
    state: &'static str,
    /// A pod connected to itself through the Service.
    hairpin: bool,
}

#[derive(serde::Serialize)]
struct EndpointRow {
    pod: Option<String>,
    container_id: Option<String>,
    pod_ip: std::net::Ipv4Addr,
    pod_mac: MacAddr,
    host_ifindex: u32,
    host_ifname: Option<String>,
    host_mac: MacAddr,
    /// The host veth is administratively down: nothing is delivered to the pod.
    host_veth_down: bool,
    /// Packets and bytes the pod sent, and that the datapath delivered to it.
    sent_packets: u64,
    sent_bytes: u64,
    delivered_packets: u64,
    delivered_bytes: u64,
}

/// Whether interface indexes name the same interfaces here as in the
/// agent's network namespace (the node config holds its cookie; unknown,
/// as with socket load balancing off: assumed so). From another namespace
/// (the host, against a node namespace's pins) `if_indextoname` would name
/// other interfaces.
fn in_agents_netns(maps: &PinnedMaps) -> bool {
    let agents = maps.node_config().map_or(0, |c| c.host_netns_cookie);
    agents == 0 || crate::host::node_net::netns_cookie().is_ok_and(|mine| mine == agents)
}

/// The note printed when interface names cannot be resolved here.
const OTHER_NETNS: &str = "note: not in the agent's network namespace: interface names come from \
                           the agent's records or are not shown (run inspect with `nsenter --net=` into \
                           it for live names)";

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let settings = super::agent_settings(args.config.as_deref())?;
    let bpffs_dir = args.bpffs_dir.clone().unwrap_or(settings.bpffs_dir);
    let state_dir = args.state_dir.clone().unwrap_or(settings.state_dir);
    let maps = PinnedMaps::open(&PinLayout::new(&bpffs_dir)).with_context(|| {
        format!("opening pinned maps under {} (has the agent ever run?)", bpffs_dir.display())
    })?;
    let names_here = in_agents_netns(&maps);
    if !names_here {
        eprintln!("{OTHER_NETNS}");
    }
    let ifname = |index: u32| {
        (index != 0 && names_here)
            .then(|| nix::net::if_::if_indextoname(index).ok().map(|n| n.to_string_lossy().into_owned()))
            .flatten()
    };
    match args.what {
        InspectWhat::Endpoints => {
            // Records may be missing (another state dir, or the agent never
            // wrote them): the maps are the truth, the records add names.
            let records = EndpointStore::open(&state_dir).and_then(|s| s.list()).unwrap_or_default();
            let mut rows = Vec::new();
            for (ip, ep) in maps.endpoints()? {
                let record = records.iter().find(|r| r.pod_ipv4 == ip);
                let traffic = maps.endpoint_traffic(ep.traffic_slot)?;
                rows.push(EndpointRow {
                    pod: record.and_then(|r| match (&r.pod_namespace, &r.pod_name) {
                        (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
                        (None, Some(name)) => Some(name.clone()),
                        _ => None,
                    }),
                    container_id: record.map(|r| r.container_id.clone()),
                    pod_ip: ip,
                    pod_mac: MacAddr(ep.pod_mac),
                    host_ifindex: ep.host_ifindex,
                    // The record's name holds in any namespace.
                    host_ifname: record
                        .filter(|r| r.host_ifindex == ep.host_ifindex)
                        .map(|r| r.host_ifname.clone())
                        .or_else(|| ifname(ep.host_ifindex)),
                    host_mac: MacAddr(ep.host_mac),
                    host_veth_down: ep.flags & datapath_common::ENDPOINT_FLAG_HOST_DOWN != 0,
                    sent_packets: traffic.sent_packets,
                    sent_bytes: traffic.sent_bytes,
                    delivered_packets: traffic.delivered_packets,
                    delivered_bytes: traffic.delivered_bytes,
                });
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<32} {:<16} {:<18} {:<16} {:<8} {:<18} {:>21} {:>21}",
                    "POD",
                    "POD IP",
                    "POD MAC",
                    "HOST VETH",
                    "IFINDEX",
                    "HOST MAC",
                    "SENT PKTS/BYTES",
                    "DELIVERED PKTS/BYTES"
                );
                for r in rows {
                    println!(
                        "{:<32} {:<16} {:<18} {:<16} {:<8} {:<18} {:>21} {:>21}",
                        r.pod.as_deref().unwrap_or("-"),
                        r.pod_ip.to_string(),
                        r.pod_mac.to_string(),
                        match (r.host_ifname.as_deref(), r.host_veth_down) {
                            (None, _) => "(gone)".to_owned(),
                            (Some(name), true) => format!("{name} (down)"),
                            (Some(name), false) => name.to_owned(),
                        },
                        r.host_ifindex,
                        r.host_mac.to_string(),
                        format!("{}/{}", r.sent_packets, r.sent_bytes),
                        format!("{}/{}", r.delivered_packets, r.delivered_bytes),
                    );
                }
            }
        }
        InspectWhat::Config => {
            let c = maps.node_config()?;
            // The outside clients' unanswered connections and their limit
            // per protocol (0: none), as the collector last wrote them.
            let [outside_tcp, outside_udp, outside_tcp_held] =
                crate::bpf::conntrack::PinnedConntrack::open(&PinLayout::new(&bpffs_dir))
                    .context("opening the pinned connection-tracking maps")?
                    .outside_clients()?;
            let mode = mode_name(c.mode);
            let view = serde_json::json!({
                "node_ip": std::net::Ipv4Addr::from(c.node_ipv4),
                "mode": mode,
                "uplink_ifindex": c.uplink_ifindex,
                "uplink": ifname(c.uplink_ifindex),
                "vxlan_ifindex": c.vxlan_ifindex,
                "vxlan_device": ifname(c.vxlan_ifindex),
                "vni": c.vni,
                "vxlan_port": u16::from_be_bytes(c.vxlan_port),
                // No source from outside may claim an address in it.
                "pod_cidr": format!("{}/{}", std::net::Ipv4Addr::from(c.pod_cidr), c.pod_prefix_len),
                // Whether TCP and UDP are looked up in the Service maps.
                "services": c.flags & datapath_common::NODE_FLAG_SERVICES != 0,
                // Unanswered connections per client (0: no limit).
                "conntrack_max_per_client": c.conntrack_max_per_client,
                // All clients outside the cluster together (0: no limit),
                // half of it for each protocol.
                "conntrack_max_outside": outside_tcp_held.limit,
                "conntrack_outside_tcp": format!("{}/{}", outside_tcp.connections, outside_tcp.limit),
                // TCP from outside answered or not: all of the limit.
                "conntrack_outside_tcp_held": format!("{}/{}", outside_tcp_held.connections, outside_tcp_held.limit),
                "conntrack_outside_udp": format!("{}/{}", outside_udp.connections, outside_udp.limit),
                "bpffs_dir": bpffs_dir,
            });
            if args.json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                for (key, value) in view.as_object().into_iter().flatten() {
                    println!(
                        "{key:<16} {}",
                        value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string())
                    );
                }
            }
        }
        InspectWhat::Nodes => {
            #[derive(serde::Serialize)]
            struct NodeRow {
                pod_cidr: String,
                node_ip: std::net::Ipv4Addr,
                /// How this node reaches it: one mode per node today.
                mode: &'static str,
            }
            let mode = mode_name(maps.node_config()?.mode);
            let rows: Vec<NodeRow> = maps
                .remote_routes()?
                .into_iter()
                .map(|r| NodeRow { pod_cidr: r.pod_cidr.to_string(), node_ip: r.node_ip, mode })
                .collect();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<20} {:<16} {:<8}", "POD CIDR", "NODE IP", "MODE");
                for r in rows {
                    println!("{:<20} {:<16} {:<8}", r.pod_cidr, r.node_ip.to_string(), r.mode);
                }
            }
        }
        InspectWhat::Services => {
            // The names file may be missing (another state dir): the maps are
            // the truth, the file adds names.
            let names = service_names::load_names(&state_dir).unwrap_or_default();
            let rows: Vec<ServiceRow> = maps
                .services()?
                .into_iter()
                .map(|s| {
                    let record = names.get(&s.service.id).filter(|n| n.names(s.service.id, &s.key));
                    let client_ip = s.service.flags & datapath_common::SERVICE_AFFINITY_CLIENT_IP != 0;
                    let affinity = if client_ip {
                        crate::model::SessionAffinity::ClientIp
                    } else {
                        crate::model::SessionAffinity::None
                    };
                    ServiceRow {
                        namespace: record.map(|r| r.namespace.clone()),
                        name: record.map(|r| r.name.clone()),
                        port_name: record.and_then(|r| r.port_name.clone()),
                        cluster_ip: s.key.vip.into(),
                        port: u16::from_be_bytes(s.key.port),
                        protocol: services::protocol_name(s.key.protocol),
                        id: s.service.id,
                        clients: if s.key.scope == datapath_common::SERVICE_SCOPE_OUTSIDE {
                            "outside"
                        } else {
                            "cluster"
                        },
                        session_affinity: affinity.name(),
                        session_affinity_timeout_seconds: client_ip
                            .then_some(s.service.affinity_timeout_seconds),
                        without_backends: if s.service.flags & datapath_common::SERVICE_DROP_WITHOUT_BACKEND
                            != 0
                        {
                            "drop"
                        } else {
                            "refuse"
                        },
                        backends: s
                            .backends
                            .iter()
                            .map(|b| {
                                let address = services::backend_address(b);
                                BackendRow { ip: *address.ip(), port: address.port() }
                            })
                            .collect(),
                    }
                })
                .collect();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<40} {:<26} {:>6} {:<16} BACKENDS",
                    "NAMESPACE/NAME", "ADDRESS:PORT/PROTO", "ID", "AFFINITY"
                );
                for r in rows {
                    let name = match (&r.namespace, &r.name, &r.port_name) {
                        (Some(ns), Some(name), Some(port)) => format!("{ns}/{name}:{port}"),
                        (Some(ns), Some(name), None) => format!("{ns}/{name}"),
                        _ => "-".to_owned(),
                    };
                    let affinity = match r.session_affinity_timeout_seconds {
                        Some(timeout) => format!("{}/{timeout}s", r.session_affinity),
                        None => r.session_affinity.to_owned(),
                    };
                    let backends: Vec<String> =
                        r.backends.iter().map(|b| format!("{}:{}", b.ip, b.port)).collect();
                    println!(
                        "{:<40} {:<26} {:>6} {:<16} {}",
                        name,
                        format!("{}:{}/{}", r.cluster_ip, r.port, r.protocol),
                        r.id,
                        affinity,
                        match (backends.is_empty(), r.without_backends) {
                            (false, _) => backends.join(","),
                            (true, "drop") => "(none here: dropped, traffic policy Local)".to_owned(),
                            (true, _) => "(none: refused)".to_owned(),
                        }
                    );
                }
            }
        }
        InspectWhat::Conntrack => {
            let now = crate::bpf::ebpf::monotonic_now_ns().context("reading CLOCK_MONOTONIC")?;
            let rows: Vec<ConnectionRow> = conntrack::connections(&maps.conntrack()?)
                .into_iter()
                .map(|c| ConnectionRow {
                    protocol: services::protocol_name(c.protocol),
                    client_ip: *c.client.ip(),
                    client_port: c.client.port(),
                    service_ip: *c.service.ip(),
                    service_port: c.service.port(),
                    backend_ip: *c.backend.ip(),
                    backend_port: c.backend.port(),
                    idle_seconds: now.saturating_sub(c.last_seen_ns) / 1_000_000_000,
                    closing: c.state == Some(TcpState::Closing),
                    state: match c.state {
                        None => "open",
                        Some(TcpState::Opening) => "opening",
                        Some(TcpState::Established) => "established",
                        Some(TcpState::HalfClosed) => "half_closed",
                        Some(TcpState::Closing) => "closing",
                    },
                    hairpin: c.hairpin,
                })
                .collect();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<6} {:<22} {:<22} {:<22} {:>8} {:<11} {:<7}",
                    "PROTO", "CLIENT", "SERVICE", "BACKEND", "IDLE", "STATE", "HAIRPIN"
                );
                for r in rows {
                    println!(
                        "{:<6} {:<22} {:<22} {:<22} {:>8} {:<11} {:<7}",
                        r.protocol,
                        format!("{}:{}", r.client_ip, r.client_port),
                        format!("{}:{}", r.service_ip, r.service_port),
                        format!("{}:{}", r.backend_ip, r.backend_port),
                        format!("{}s", r.idle_seconds),
                        r.state,
                        if r.hairpin { "yes" } else { "no" },
                    );
                }
            }
        }
        InspectWhat::Policy { endpoint } => {
            let records = EndpointStore::open(&state_dir).and_then(|s| s.list()).unwrap_or_default();
            let names = records
                .iter()
                .map(|r| {
                    let name = match (&r.pod_namespace, &r.pod_name) {
                        (Some(ns), Some(name)) => format!("{ns}/{name}"),
                        _ => r.container_id.clone(),
                    };
                    (r.pod_ipv4, name)
                })
                .collect();
            let rows = policy::rows(&maps.policy()?, &names, endpoint);
            let verdicts = maps.policy_verdicts()?;
            if args.json {
                let verdicts: Vec<serde_json::Value> = verdicts
                    .iter()
                    .map(|(d, v, n)| serde_json::json!({"direction": d, "verdict": v, "connections": n}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"endpoints": rows, "verdicts": verdicts})
                    )?
                );
            } else {
                policy::print(&rows, &verdicts);
            }
        }
        InspectWhat::Counters => {
            let counters = maps.counters()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&counters)?);
            } else {
                let directions = datapath_common::Direction::ALL.map(|d| d.name());
                print!("{:<8} {:<28} {:>12} {:>14}", "KIND", "NAME", "PACKETS", "BYTES");
                for direction in directions {
                    print!(" {direction:>12}");
                }
                println!();
                let rows = [
                    ("forward", &counters.forwards, &counters.forward_bytes, &counters.forwards_by_direction),
                    ("drop", &counters.drops, &counters.drop_bytes, &counters.drops_by_direction),
                ];
                for (kind, totals, bytes, by_direction) in rows {
                    for (name, n) in totals {
                        print!("{kind:<8} {name:<28} {n:>12} {:>14}", bytes.get(name).copied().unwrap_or(0));
                        // Packets per direction (the program that saw them).
                        for direction in directions {
                            let n =
                                by_direction.get(direction).and_then(|m| m.get(name)).copied().unwrap_or(0);
                            print!(" {n:>12}");
                        }
                        println!();
                    }
                }
                for (outcome, n) in &counters.monitor_events {
                    println!("{:<8} {:<28} {:>12}", "monitor", outcome, n);
                }
            }
        }
    }
    Ok(())
}

fn mode_name(mode: u32) -> &'static str {
    datapath_common::RoutingMode::from_u32(mode).map_or("unset", datapath_common::RoutingMode::name)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn keys(value: impl serde::Serialize) -> Vec<String> {
        let mut keys: Vec<String> =
            serde_json::to_value(value).unwrap().as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Scripts and the end-to-end tests read these keys: renaming one breaks them.
    #[test]
    fn json_keys_are_the_documented_ones() {
        let service = ServiceRow {
            namespace: Some("default".into()),
            name: Some("web".into()),
            port_name: None,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: "TCP",
            id: 1,
            clients: "cluster",
            session_affinity: "None",
            session_affinity_timeout_seconds: None,
            without_backends: "refuse",
            backends: vec![BackendRow { ip: Ipv4Addr::new(10, 244, 1, 5), port: 8080 }],
        };
        assert_eq!(
            keys(&service),
            [
                "backends",
                "clients",
                "cluster_ip",
                "id",
                "name",
                "namespace",
                "port",
                "port_name",
                "protocol",
                "session_affinity",
                "session_affinity_timeout_seconds",
                "without_backends"
            ]
        );
        assert_eq!(keys(&service.backends[0]), ["ip", "port"]);
        let json = serde_json::to_value(&service).unwrap();
        assert_eq!(json["cluster_ip"], "10.96.0.10");
        assert_eq!(json["backends"][0]["port"], 8080);

        let connection = ConnectionRow {
            protocol: "UDP",
            client_ip: Ipv4Addr::new(10, 244, 1, 2),
            client_port: 40_000,
            service_ip: Ipv4Addr::new(10, 96, 0, 10),
            service_port: 53,
            backend_ip: Ipv4Addr::new(10, 244, 1, 5),
            backend_port: 5353,
            idle_seconds: 3,
            closing: false,
            state: "open",
            hairpin: false,
        };
        assert_eq!(
            keys(&connection),
            [
                "backend_ip",
                "backend_port",
                "client_ip",
                "client_port",
                "closing",
                "hairpin",
                "idle_seconds",
                "protocol",
                "service_ip",
                "service_port",
                "state"
            ]
        );
    }
}
