//! Netlink work of the plugin, with `rtnetlink`: the veth pair, the pod's
//! address and routes (the host's /32 route to the pod: `datapath_api::route`).

use std::{net::Ipv4Addr, os::fd::AsRawFd as _};

use datapath_api::mac::MacAddr;
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage},
        route::RouteScope,
    },
};

pub type NlResult<T> = Result<T, rtnetlink::Error>;

/// Run async netlink work on a private current-thread runtime with a
/// connection opened in the calling thread's network namespace.
pub fn with_handle<T, F, Fut>(work: F) -> anyhow::Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        // The socket is bound to the namespace of the thread that creates it.
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        let result = work(handle).await;
        task.abort();
        result
    })
}

#[derive(Debug, Clone)]
pub struct LinkState {
    pub index: u32,
    pub mac: MacAddr,
}

fn state_of(msg: &LinkMessage) -> LinkState {
    let mac = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) => MacAddr::try_from(bytes.as_slice()).ok(),
            _ => None,
        })
        .unwrap_or_default();
    LinkState { index: msg.header.index, mac }
}

/// The link called `name`, if there is one.
pub async fn get(handle: &Handle, name: &str) -> NlResult<Option<LinkState>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(state_of(&msg))),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

/// Create `host_name` here with its peer `pod_name` directly inside the pod's
/// namespace (no temporary name in the host namespace to collide with).
pub async fn create_veth(
    handle: &Handle,
    host_name: &str,
    pod_name: &str,
    pod_netns: &std::fs::File,
    mtu: u32,
) -> NlResult<()> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(pod_name.to_owned())
        .mtu(mtu)
        .setns_by_fd(pod_netns.as_raw_fd())
        .build();
    let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_owned())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle.link().add(message).execute().await
}

pub async fn set_up(handle: &Handle, index: u32) -> NlResult<()> {
    handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await
}

pub async fn delete(handle: &Handle, index: u32) -> NlResult<()> {
    handle.link().del(index).execute().await
}

/// Pod side: `addr/32`, up, a link route to the gateway and the default route
/// through it. The gateway answers ARP from the datapath (no bridge).
pub async fn configure_pod_interface(
    handle: &Handle,
    index: u32,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
) -> NlResult<()> {
    handle.address().add(index, addr.into(), 32).execute().await?;
    set_up(handle, index).await?;
    let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(gateway, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    handle.route().add(to_gateway).execute().await?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(gateway)
        .output_interface(index)
        .build();
    handle.route().add(default).execute().await
}

/// Does an IPv4 route to `dst/prefix` exist, out of `oif`, with `gateway`?
pub async fn has_route(
    handle: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    oif: u32,
    gateway: Option<Ipv4Addr>,
) -> NlResult<bool> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let mut routes = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(msg) = routes.try_next().await? {
        if msg.header.destination_prefix_length != prefix {
            continue;
        }
        let mut found_dst = prefix == 0;
        let (mut found_oif, mut found_gw) = (false, gateway.is_none());
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => found_dst = *ip == dst,
                RouteAttribute::Oif(index) => found_oif = *index == oif,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => found_gw = Some(*ip) == gateway,
                _ => {}
            }
        }
        if found_dst && found_oif && found_gw {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Does link `index` carry `addr/prefix`?
pub async fn has_address(handle: &Handle, index: u32, addr: Ipv4Addr, prefix: u8) -> NlResult<bool> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut addrs = handle.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = addrs.try_next().await? {
        let matches = msg.header.prefix_len == prefix
            && msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(std::net::IpAddr::V4(ip)) if *ip == addr));
        if matches {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Index and name of every veth in this namespace (bridges, VXLAN devices
/// and all other kinds are left out).
pub async fn veths(handle: &Handle) -> NlResult<Vec<(u32, String)>> {
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await? {
        let is_veth = msg.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => {
                infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
            }
            _ => false,
        });
        let name = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        if let (true, Some(name)) = (is_veth, name) {
            out.push((msg.header.index, name));
        }
    }
    Ok(out)
}
