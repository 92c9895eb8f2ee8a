//! The node's own networking that the agent manages, through `rtnetlink`:
//! the uplink's facts, the collect_md VXLAN device, and the routes the node
//! itself uses to reach other nodes' pods (pods' traffic never needs them:
//! the programs redirect it).
//!
//! Routes carry our own route protocol number, so the agent finds exactly its
//! own routes again after a restart and changes only what differs.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        neighbour::NeighbourState,
        route::{RouteAttribute, RouteIpTunnel, RouteLwTunnelEncap, RouteMessage, RouteProtocol},
    },
};

use crate::model::{Mode, RemoteRoute, VXLAN_OVERHEAD};

/// Route protocol of the routes this agent installs (`ip route show proto 217`).
pub const ROUTE_PROTOCOL: u8 = 217;
/// Next hop of overlay routes: link-local, resolved by a permanent neighbour
/// entry on the VXLAN device (ARP cannot work there: it has no tunnel key).
pub const OVERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const OVERLAY_GATEWAY_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

#[derive(Debug, Clone, Copy)]
pub struct LinkFacts {
    pub index: u32,
    pub mtu: u32,
}

fn facts(msg: &LinkMessage) -> LinkFacts {
    let mtu = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500);
    LinkFacts { index: msg.header.index, mtu }
}

fn is_vxlan(msg: &LinkMessage) -> bool {
    msg.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))))
    })
}

async fn link_by_name(handle: &Handle, name: &str) -> anyhow::Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(found) => Ok(found),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up {name}")),
    }
}

pub async fn uplink(handle: &Handle, name: &str) -> anyhow::Result<LinkFacts> {
    let msg = link_by_name(handle, name).await?.with_context(|| format!("uplink {name} not found"))?;
    Ok(facts(&msg))
}

/// MTU pods get: the uplink's, less the encapsulation in overlay mode.
pub fn pod_mtu(mode: Mode, uplink_mtu: u32) -> u32 {
    match mode {
        Mode::Native => uplink_mtu,
        Mode::Vxlan => uplink_mtu - VXLAN_OVERHEAD,
    }
}

/// Create the collect_md VXLAN device if it is missing; keep an existing one
/// (recreating it would cut every tunnel). MTU and state are brought in line.
pub async fn ensure_vxlan(
    handle: &Handle,
    name: &str,
    port: u16,
    uplink_mtu: u32,
) -> anyhow::Result<LinkFacts> {
    let mtu = uplink_mtu - VXLAN_OVERHEAD;
    let existing = link_by_name(handle, name).await?;
    let index = match existing {
        Some(msg) if is_vxlan(&msg) => msg.header.index,
        Some(_) => anyhow::bail!("{name} exists and is not a VXLAN device; rename it or set vxlan.device"),
        None => {
            let message = LinkMessageBuilder::<LinkVxlan>::new(name)
                .port(port)
                .collect_metadata(true)
                .learning(false)
                .mtu(mtu)
                .build();
            handle
                .link()
                .add(message)
                .execute()
                .await
                .with_context(|| format!("creating VXLAN device {name}"))?;
            tracing::info!(device = name, port, mtu, "created VXLAN device");
            link_by_name(handle, name).await?.context("VXLAN device vanished")?.header.index
        }
    };
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .with_context(|| format!("bringing {name} up"))?;
    handle
        .neighbours()
        .add(index, OVERLAY_GATEWAY.into())
        .link_layer_address(&OVERLAY_GATEWAY_MAC)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .context("adding the overlay gateway neighbour")?;
    Ok(LinkFacts { index, mtu })
}

/// Remove the VXLAN device (when the mode is no longer vxlan, or at
/// cleanup); whether there was one. A device of that name that is not a
/// VXLAN device is not ours: left alone.
pub async fn remove_vxlan_if_present(handle: &Handle, name: &str) -> anyhow::Result<bool> {
    if let Some(msg) = link_by_name(handle, name).await?
        && is_vxlan(&msg)
    {
        handle.link().del(msg.header.index).execute().await?;
        return Ok(true);
    }
    Ok(false)
}

/// Where the node's own traffic to remote pods goes.
#[derive(Debug, Clone, Copy)]
pub enum RouteVia {
    Native { uplink_index: u32 },
    Overlay { vxlan_index: u32, vni: u32 },
}

fn route_message(route: &RemoteRoute, via: RouteVia, node_ip: Ipv4Addr) -> RouteMessage {
    let base = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.pod_cidr.network(), route.pod_cidr.prefix_len())
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .pref_source(node_ip);
    match via {
        RouteVia::Native { uplink_index } => {
            base.gateway(route.node_ip).output_interface(uplink_index).build()
        }
        RouteVia::Overlay { vxlan_index, vni } => base
            .gateway(OVERLAY_GATEWAY)
            .output_interface(vxlan_index)
            .onlink()
            .encap_ip(vec![
                RouteIpTunnel::Id(u64::from(vni)),
                RouteIpTunnel::Destination(route.node_ip),
                RouteIpTunnel::Ttl(64),
            ])
            .build(),
    }
}

fn destination_of(msg: &RouteMessage) -> Option<(Ipv4Addr, u8)> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(ip)) => {
            Some((*ip, msg.header.destination_prefix_length))
        }
        _ => None,
    })
}

/// Make our routes equal `desired`: replace each desired route (a no-op for
/// an identical one), delete ours that are no longer desired. Never flushes.
pub async fn sync_routes(
    handle: &Handle,
    desired: &[RemoteRoute],
    via: RouteVia,
    node_ip: Ipv4Addr,
) -> anyhow::Result<usize> {
    let mut ours = Vec::new();
    let mut routes = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(msg) = routes.try_next().await.context("listing routes")? {
        if msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
            ours.push(msg);
        }
    }
    for route in desired {
        handle
            .route()
            .add(route_message(route, via, node_ip))
            .replace()
            .execute()
            .await
            .with_context(|| format!("route to {} via {}", route.pod_cidr, route.node_ip))?;
    }
    let mut removed = 0;
    for msg in ours {
        let Some((dst, len)) = destination_of(&msg) else { continue };
        if !desired.iter().any(|r| r.pod_cidr.network() == dst && r.pod_cidr.prefix_len() == len) {
            handle
                .route()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("removing route to {dst}/{len}"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What [`restore_missing_routes`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteCheck {
    /// Desired routes of ours that were missing (or changed), put back.
    pub restored: Vec<RemoteRoute>,
    /// Desired routes whose place (destination, table, metric) holds a
    /// route that is not ours: left alone.
    pub taken: Vec<RemoteRoute>,
}

/// Put back each of our `desired` routes that someone else deleted or
/// changed, and nothing else: a route of another protocol is never removed
/// or replaced (one in the place of ours is reported in `taken`), and ours
/// that are not desired are left to [`sync_routes`].
pub async fn restore_missing_routes(
    handle: &Handle,
    desired: &[RemoteRoute],
    via: RouteVia,
    node_ip: Ipv4Addr,
) -> anyhow::Result<RouteCheck> {
    let mut ours = Vec::new();
    let mut routes = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(msg) = routes.try_next().await.context("listing routes")? {
        if msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
            ours.push(msg);
        }
    }
    let mut check = RouteCheck::default();
    for route in desired {
        let key = (route.pod_cidr.network(), route.pod_cidr.prefix_len());
        let mine: Vec<&RouteMessage> = ours.iter().filter(|msg| destination_of(msg) == Some(key)).collect();
        if mine.iter().any(|msg| routes_as_wanted(msg, route, via)) {
            continue;
        }
        let message = route_message(route, via, node_ip);
        // Ours, but changed: ours to replace. Missing: added only if its
        // place is free (no NLM_F_REPLACE), so a route of someone else's
        // that took it stays.
        let request =
            if mine.is_empty() { handle.route().add(message) } else { handle.route().add(message).replace() };
        match request.execute().await {
            Ok(()) => check.restored.push(*route),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
                check.taken.push(*route)
            }
            Err(e) => {
                return Err(e).with_context(|| format!("route to {} via {}", route.pod_cidr, route.node_ip));
            }
        }
    }
    Ok(check)
}

/// Whether `msg` sends the node's traffic for `route` where we would.
fn routes_as_wanted(msg: &RouteMessage, route: &RemoteRoute, via: RouteVia) -> bool {
    let gateway = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    });
    let oif = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    });
    match via {
        RouteVia::Native { uplink_index } => gateway == Some(route.node_ip) && oif == Some(uplink_index),
        RouteVia::Overlay { vxlan_index, .. } => {
            let tunnel_to = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Encap(encap) => encap.iter().find_map(|e| match e {
                    RouteLwTunnelEncap::Ip(RouteIpTunnel::Destination(ip)) => Some(*ip),
                    _ => None,
                }),
                _ => None,
            });
            gateway == Some(OVERLAY_GATEWAY) && oif == Some(vxlan_index) && tunnel_to == Some(route.node_ip)
        }
    }
}

/// `net.ipv4.ip_forward=1` in this network namespace: pods' traffic to the
/// outside and its replies are forwarded by the node's stack.
pub fn enable_ip_forwarding() -> anyhow::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    // Kubernetes nodes normally have it on already (kubeadm checks): then a
    // container with a read-only /proc/sys needs no privilege for this.
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1")
        .context("enabling net.ipv4.ip_forward (set it on the node: sysctl -w net.ipv4.ip_forward=1)")
}

/// Warn when the node's own ephemeral ports (net.ipv4.ip_local_port_range)
/// reach into the source ports NodePort connections to other nodes'
/// backends take (datapath_common::SNAT_PORT_RANGES, 1024-29999 and
/// 61000-65535): a connection of the node's own could then meet one of
/// them on the same backend, and lose its replies to it. Linux's default
/// (32768-60999) stays clear.
pub fn check_ephemeral_ports() {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let Ok(text) = std::fs::read_to_string(PATH) else { return };
    let bounds: Vec<u16> = text.split_whitespace().filter_map(|b| b.parse().ok()).collect();
    if let [low, high] = bounds[..]
        && (low..=high).any(datapath_common::is_snat_port)
    {
        tracing::warn!(
            ip_local_port_range = text.trim(),
            "the node's ephemeral ports reach into the NodePort source ports 1024-29999 and 61000-65535: \
             keep net.ipv4.ip_local_port_range within 30000-60999 (Linux's default is 32768 60999)"
        );
    }
}

/// The cookie of the network namespace this process is in (the kernel's
/// unique, never reused id of a namespace): the socket programs act only
/// for sockets in it.
pub fn netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
