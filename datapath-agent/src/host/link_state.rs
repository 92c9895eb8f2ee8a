//! A pod's host veth taken down (an operator quarantining the pod, or a
//! runtime tearing it down) must stop traffic into the pod as the kernel's
//! routing would: the kernel drops the pod's /32 route, but
//! `bpf_redirect_peer` only looks at the pod's end of the pair. This
//! follows link changes (`RTMGRP_LINK`), marks the pod's endpoint down (the
//! programs drop with `endpoint_down`) and, when the veth comes up again,
//! puts back the /32 route the kernel removed (node -> pod, kubelet probes).

use anyhow::Context as _;
use datapath_api::route::add_host_route;
use futures::StreamExt as _;
use rtnetlink::{
    Handle,
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    packet_route::{RouteNetlinkMessage, link::LinkFlags},
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::bpf::Datapath;

/// A link's administrative state, as the kernel announced it.
#[derive(Debug, Clone, Copy)]
pub struct LinkChange {
    pub index: u32,
    pub up: bool,
}

/// Subscribe to the kernel's link announcements in this namespace.
pub fn watch() -> anyhow::Result<UnboundedReceiver<LinkChange>> {
    let (mut connection, _, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink for link changes")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
        .context("subscribing to link changes")?;
    tokio::spawn(connection);
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = message.payload {
                let change =
                    LinkChange { index: link.header.index, up: link.header.flags.contains(LinkFlags::Up) };
                if tx.send(change).is_err() {
                    break;
                }
            }
        }
    });
    Ok(rx)
}

/// Apply one change to the pod behind that veth, if any.
pub async fn apply(datapath: &mut Datapath, netlink: &Handle, change: LinkChange) -> anyhow::Result<()> {
    let Some(pod) =
        datapath.set_host_veth_down(change.index, !change.up).context("marking the pod's endpoint")?
    else {
        return Ok(());
    };
    if !change.up {
        tracing::warn!(pod = %pod, ifindex = change.index, "host veth down: nothing is delivered to the pod until it is up");
        return Ok(());
    }
    restore_route(netlink, pod, change.index).await?;
    tracing::info!(pod = %pod, ifindex = change.index, "host veth up again: delivering to the pod, its route restored");
    Ok(())
}

/// After a start: the state of every pod's veth as it is now (it may have
/// changed while no agent was running), and the route of each one up.
pub async fn sync_all(datapath: &mut Datapath, netlink: &Handle) -> anyhow::Result<()> {
    for (pod, endpoint) in datapath.endpoints().context("reading the endpoints")? {
        let mut links = netlink.link().get().match_index(endpoint.host_ifindex).execute();
        // Gone (an error or nothing): the reconcile deals with it.
        let Some(Ok(link)) = links.next().await else { continue };
        let up = link.header.flags.contains(LinkFlags::Up);
        datapath.set_host_veth_down(endpoint.host_ifindex, !up).context("marking the pod's endpoint")?;
        if up {
            restore_route(netlink, pod, endpoint.host_ifindex).await?;
        } else {
            tracing::warn!(pod = %pod, ifindex = endpoint.host_ifindex, "host veth down: nothing is delivered to the pod until it is up");
        }
    }
    Ok(())
}

/// The pod's /32 route out of its host veth (the kernel removes it when the
/// veth goes down); there already: nothing to do.
async fn restore_route(netlink: &Handle, pod: std::net::Ipv4Addr, ifindex: u32) -> anyhow::Result<()> {
    match add_host_route(netlink, pod, ifindex).await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(e).with_context(|| format!("restoring the route to {pod}")),
    }
}
