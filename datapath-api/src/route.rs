//! The node's route to a pod: `<pod>/32` out of its host veth, scope link
//! (the node reaches its pods, kubelet probes). The plugin's ADD makes it;
//! the agent puts it back when the kernel removed it (the veth went down and
//! up again). One definition, so both make the same route.

use std::net::Ipv4Addr;

use rtnetlink::{Handle, RouteMessageBuilder, packet_route::route::RouteScope};

/// Host side: the node reaches the pod (kubelet probes) through its veth.
pub async fn add_host_route(
    handle: &Handle,
    pod_ip: Ipv4Addr,
    host_index: u32,
) -> Result<(), rtnetlink::Error> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(pod_ip, 32)
        .output_interface(host_index)
        .scope(RouteScope::Link)
        .build();
    handle.route().add(route).execute().await
}
