//! CHECK: the endpoint is as ADD left it, or an error listing what is not.

use std::{net::Ipv4Addr, path::Path};

use datapath_api::{EndpointRef, Request, Response, client, netns};

use crate::{
    agent::{AGENT_TIMEOUT, agent_error, unexpected},
    error::{CniError, ErrorCode},
    host_veth_name, link, pod_netns,
    types::{Env, NetConf, POD_GATEWAY},
};

/// Everything that differs from what ADD leaves: host veth and route, the
/// pod's interface, address and default route, and the agent's view (map
/// entry, link, record).
pub(crate) fn endpoint_problems(
    env: &Env,
    conf: &NetConf,
    pod_ip: Ipv4Addr,
) -> Result<Vec<String>, CniError> {
    let mut problems = Vec::new();
    let host_name = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let lookup = host_name.clone();
    let host = link::with_handle(|handle| async move {
        let Some(host) = link::get(&handle, &lookup).await? else { return Ok(None) };
        let route = link::has_route(&handle, pod_ip, 32, host.index, None).await?;
        Ok(Some((host, route)))
    })
    .map_err(|e| CniError::from_anyhow(ErrorCode::IoFailure, "cannot inspect the host side", &e))?;
    match &host {
        None => problems.push(format!("host veth {host_name} is missing")),
        Some((_, false)) => problems.push(format!("the node has no route to {pod_ip} via {host_name}")),
        Some(_) => {}
    }
    let ifname = env.ifname.clone();
    let pod = netns::run_in(Path::new(&env.netns), move || {
        link::with_handle(|handle| async move {
            let Some(pod) = link::get(&handle, &ifname).await? else {
                return Ok(vec![format!("{ifname} is missing in the pod")]);
            };
            let mut found = Vec::new();
            if !link::has_address(&handle, pod.index, pod_ip, 32).await? {
                found.push(format!("{ifname} lacks {pod_ip}/32"));
            }
            if !link::has_route(&handle, Ipv4Addr::UNSPECIFIED, 0, pod.index, Some(POD_GATEWAY)).await? {
                found.push(format!("the pod has no default route via {POD_GATEWAY}"));
            }
            Ok(found)
        })
    })
    .map_err(|e| {
        CniError::with_source(ErrorCode::UnknownContainer, format!("cannot enter {}", env.netns), &e)
    })?
    .map_err(|e| CniError::from_anyhow(ErrorCode::IoFailure, "cannot inspect the pod", &e))?;
    problems.extend(pod);
    let reference = EndpointRef {
        container_id: env.container_id.clone(),
        host_ifname: host_name,
        host_ifindex: host.map(|(h, _)| h.index),
        pod_ipv4: Some(pod_ip),
    };
    match client::call(&conf.agent_socket(), &Request::CheckEndpoint(reference), AGENT_TIMEOUT)
        .map_err(agent_error)?
    {
        Response::Check { problems: agent } => problems.extend(agent),
        other => return Err(unexpected(other)),
    }
    Ok(problems)
}

/// CHECK: the endpoint is as ADD left it, or an error listing what is not.
pub(crate) fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let pod_ip = conf.prev_result_ipv4().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidNetworkConfig,
            "CHECK needs \"prevResult\" with the pod's IPv4 address (the ADD result)",
        )
    })?;
    pod_netns::open(env)?;
    let problems = endpoint_problems(env, conf, pod_ip)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::EndpointDamaged,
            format!("endpoint is not as ADD left it: {}", problems.join("; ")),
        ))
    }
}
