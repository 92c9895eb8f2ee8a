//! `datapath-agent inspect`: read the pinned maps (works while the agent is down).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    config::{DEFAULT_BPFFS_DIR, DEFAULT_STATE_DIR},
    datapath::{PinLayout, PinnedMaps},
    mac::MacAddr,
    state::EndpointStore,
};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    pub what: InspectWhat,
    /// bpffs directory the agent pins under.
    #[arg(long, global = true, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// The agent's state directory (endpoint records: pod names, containers).
    #[arg(long, global = true, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
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
    /// Packets and bytes the pod sent, and that the datapath delivered to it.
    sent_packets: u64,
    sent_bytes: u64,
    delivered_packets: u64,
    delivered_bytes: u64,
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&PinLayout::new(&args.bpffs_dir)).with_context(|| {
        format!("opening pinned maps under {} (has the agent ever run?)", args.bpffs_dir.display())
    })?;
    match args.what {
        InspectWhat::Endpoints => {
            // Records may be missing (another state dir, or the agent never
            // wrote them): the maps are the truth, the records add names.
            let records = EndpointStore::open(&args.state_dir).and_then(|s| s.list()).unwrap_or_default();
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
                    host_ifname: nix::net::if_::if_indextoname(ep.host_ifindex)
                        .ok()
                        .map(|n| n.to_string_lossy().into_owned()),
                    host_mac: MacAddr(ep.host_mac),
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
                        r.host_ifname.as_deref().unwrap_or("(gone)"),
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
            let ifname = |index: u32| {
                (index != 0)
                    .then(|| {
                        nix::net::if_::if_indextoname(index).ok().map(|n| n.to_string_lossy().into_owned())
                    })
                    .flatten()
            };
            let mode = mode_name(c.mode);
            let view = serde_json::json!({
                "node_ip": std::net::Ipv4Addr::from(c.node_ipv4),
                "mode": mode,
                "uplink_ifindex": c.uplink_ifindex,
                "uplink": ifname(c.uplink_ifindex),
                "vxlan_ifindex": c.vxlan_ifindex,
                "vxlan_device": ifname(c.vxlan_ifindex),
                "vni": c.vni,
                "bpffs_dir": args.bpffs_dir,
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
        InspectWhat::Counters => {
            let counters = maps.counters()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&counters)?);
            } else {
                let directions = datapath_common::Direction::ALL.map(|d| d.name());
                println!(
                    "{:<8} {:<28} {:>12} {:>12} {:>12} {:>12}",
                    "KIND", "NAME", "PACKETS", directions[0], directions[1], directions[2]
                );
                let rows = [
                    ("forward", &counters.forwards, &counters.forwards_by_direction),
                    ("drop", &counters.drops, &counters.drops_by_direction),
                ];
                for (kind, totals, by_direction) in rows {
                    for (name, n) in totals {
                        let per = directions.map(|d| by_direction.get(d).and_then(|m| m.get(name)).copied());
                        println!(
                            "{:<8} {:<28} {:>12} {:>12} {:>12} {:>12}",
                            kind,
                            name,
                            n,
                            per[0].unwrap_or(0),
                            per[1].unwrap_or(0),
                            per[2].unwrap_or(0)
                        );
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
    match mode {
        m if m == datapath_common::RoutingMode::Native as u32 => "native",
        m if m == datapath_common::RoutingMode::Vxlan as u32 => "vxlan",
        _ => "unset",
    }
}
