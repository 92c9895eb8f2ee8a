//! ADD: ask the agent it is up; allocate an address (IPAM delegate); create
//! the veth pair with the peer directly in the pod's netns; address, MTU and
//! routes in the pod; register the endpoint with the agent (which writes its
//! policy and attaches the programs); then the host veth up and a /32 route
//! to the pod on the node, so nothing reaches the pod before the programs
//! judge it. Any failure undoes
//! exactly what this invocation created, in reverse order. A repeated ADD
//! of an attachment that is whole returns the same result, making nothing.

use std::path::Path;

use anyhow::Context as _;
use datapath_api::{EndpointRef, EndpointSpec, Request, client, netns, route::add_host_route};
use serde_json::json;

use crate::{
    agent::{AGENT_TIMEOUT, agent_error, agent_status, recorded_endpoint},
    check::endpoint_problems,
    error::{CniError, ErrorCode},
    host_veth_name, ipam, link, pod_netns,
    types::{Env, NetConf, POD_GATEWAY},
};

/// What this ADD created so far: exactly what a failure must undo.
#[derive(Default)]
struct Undo {
    ipam: bool,
    host_veth: Option<u32>,
    endpoint: Option<EndpointRef>,
}

pub(crate) fn add(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<serde_json::Value, CniError> {
    let ipam_type = conf
        .ipam
        .as_ref()
        .map(|i| i.plugin_type.clone())
        .ok_or_else(|| CniError::new(ErrorCode::InvalidNetworkConfig, "\"ipam\" is missing; add e.g. {\"type\": \"host-local\", \"ranges\": [[{\"subnet\": \"<node pod CIDR>\"}]]}"))?;
    let netns_file = pod_netns::open(env)?;
    // Before any side effect: without the agent nothing would forward.
    let agent_mtu = agent_status(conf)?;
    if let Some(mtu) = conf.mtu
        && mtu > agent_mtu
    {
        // Larger packets than the uplink (less the tunnel's overhead) carries
        // would be dropped on the way out, silently.
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "\"mtu\": {mtu} is larger than this node's pod MTU {agent_mtu} (the uplink's, less VXLAN overhead in vxlan mode); use at most {agent_mtu}, or leave \"mtu\" out to get {agent_mtu}"
            ),
        ));
    }
    let mtu = conf.mtu.unwrap_or(agent_mtu);

    // ADD for a container that is already added: the same answer, nothing made.
    let host_name = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    if let Some(record) = recorded_endpoint(conf, &host_name)? {
        let other_network = record.network.as_deref().is_some_and(|n| n != conf.name);
        if record.container_id != env.container_id || record.cni_ifname != env.ifname || other_network {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!(
                    "host veth {host_name} belongs to container {} ({}) of network {}",
                    record.container_id,
                    record.cni_ifname,
                    record.network.as_deref().unwrap_or("(not recorded)")
                ),
            ));
        }
        let problems = endpoint_problems(env, conf, record.pod_ipv4)?;
        if !problems.is_empty() {
            return Err(CniError::new(
                ErrorCode::EndpointDamaged,
                format!(
                    "container already added but its endpoint is damaged: {}; DEL it and ADD again",
                    problems.join("; ")
                ),
            ));
        }
        return Ok(add_result(conf, env, &record, serde_json::Value::Null));
    }

    let mut undo = Undo::default();
    let result = add_steps(env, conf, stdin, &ipam_type, &netns_file, mtu, &mut undo);
    if result.is_err() {
        rollback(env, conf, stdin, &ipam_type, undo);
    }
    result
}

fn add_steps(
    env: &Env,
    conf: &NetConf,
    stdin: &[u8],
    ipam_type: &str,
    netns_file: &std::fs::File,
    mtu: u32,
    undo: &mut Undo,
) -> Result<serde_json::Value, CniError> {
    let allocation = ipam::add(env, ipam_type, stdin)?;
    undo.ipam = true;
    let pod_ip = allocation.address;

    let host_name = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let host = link::with_handle(|handle| async move {
        if link::get(&handle, &host_name).await?.is_some() {
            anyhow::bail!("host veth {host_name} already exists (container already added?)");
        }
        link::create_veth(&handle, &host_name, &env.ifname, netns_file, mtu)
            .await
            .context("creating the veth pair")?;
        let host = link::get(&handle, &host_name).await?.context("veth vanished after creation")?;
        Ok((host_name, host))
    });
    let (host_name, host) = match host {
        Ok(v) => v,
        Err(e) => {
            return Err(CniError::from_anyhow(ErrorCode::IoFailure, "cannot create the pod's veth pair", &e));
        }
    };
    undo.host_veth = Some(host.index);

    let ifname = env.ifname.clone();
    let pod = netns::run_in(Path::new(&env.netns), move || {
        link::with_handle(|handle| async move {
            let pod = link::get(&handle, &ifname)
                .await?
                .with_context(|| format!("{ifname} not found in the pod"))?;
            link::configure_pod_interface(&handle, pod.index, pod_ip, POD_GATEWAY)
                .await
                .context("configuring the pod interface")?;
            Ok(pod)
        })
    })
    .map_err(|e| CniError::with_source(ErrorCode::IoFailure, "cannot enter the pod's network namespace", &e))?
    .map_err(|e| CniError::from_anyhow(ErrorCode::IoFailure, "cannot configure the pod interface", &e))?;

    let (pod_namespace, pod_name) = env.k8s_pod();
    let spec_for_result = EndpointSpec {
        container_id: env.container_id.clone(),
        cni_ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        host_ifname: host_name.clone(),
        host_ifindex: host.index,
        host_mac: host.mac,
        pod_ipv4: pod_ip,
        pod_mac: pod.mac,
        pod_namespace,
        pod_name,
        network: Some(conf.name.clone()),
    };
    undo.endpoint = Some(EndpointRef {
        container_id: env.container_id.clone(),
        host_ifname: host_name.clone(),
        host_ifindex: Some(host.index),
        pod_ipv4: Some(pod_ip),
    });
    client::call(&conf.agent_socket(), &Request::AddEndpoint(spec_for_result.clone()), AGENT_TIMEOUT)
        .map_err(agent_error)?;

    // Only now may the node's stack route to the pod: the agent has
    // attached the programs (to_pod judges what the stack routes in) and
    // written the pod's policy. Until the host veth is up the pod's end
    // has no carrier, so nothing passes unjudged either way.
    let host_index = host.index;
    link::with_handle(|handle| async move {
        link::set_up(&handle, host_index).await.context("bringing the host veth up")?;
        match add_host_route(&handle, pod_ip, host_index).await {
            Ok(()) => {}
            // The agent got there first: it puts a pod's route back when the
            // pod's veth comes up, as it just did.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::EEXIST
                    && link::has_route(&handle, pod_ip, 32, host_index, None).await? => {}
            Err(e) => return Err(e).context("adding the node's route to the pod"),
        }
        Ok(())
    })
    .map_err(|e| CniError::from_anyhow(ErrorCode::IoFailure, "cannot configure the host side", &e))?;

    Ok(add_result(conf, env, &spec_for_result, allocation.dns))
}

/// The ADD result for an endpoint (also the answer to a repeated ADD).
fn add_result(conf: &NetConf, env: &Env, ep: &EndpointSpec, dns: serde_json::Value) -> serde_json::Value {
    let mut ip = json!({ "address": format!("{}/32", ep.pod_ipv4), "gateway": POD_GATEWAY.to_string(), "interface": 1 });
    if conf.cni_version == "0.4.0" {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": conf.cni_version,
        "interfaces": [
            { "name": ep.host_ifname, "mac": ep.host_mac.to_string() },
            { "name": env.ifname, "mac": ep.pod_mac.to_string(), "sandbox": env.netns },
        ],
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": POD_GATEWAY.to_string() }],
        "dns": if dns.is_null() { json!({}) } else { dns },
    })
}

fn rollback(env: &Env, conf: &NetConf, stdin: &[u8], ipam_type: &str, undo: Undo) {
    if let Some(reference) = undo.endpoint {
        let _ = client::call(&conf.agent_socket(), &Request::DelEndpoint(reference), AGENT_TIMEOUT);
    }
    if let Some(index) = undo.host_veth {
        // Deleting the host end deletes the pod end and the /32 route with it.
        let _ = link::with_handle(|handle| async move { Ok(link::delete(&handle, index).await?) });
    }
    if undo.ipam {
        let _ = ipam::del(env, ipam_type, stdin);
    }
}
