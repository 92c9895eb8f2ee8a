//! DEL: the agent's entry, the veth pair (with the pod's end and the /32
//! route), the IPAM lease. Idempotent; needs no netns.

use datapath_api::{
    EndpointRef, Request,
    client::{self, ClientError},
};

use crate::{
    agent::{AGENT_TIMEOUT, agent_error},
    error::{CniError, ErrorCode},
    host_veth_name, ipam, link,
    types::{self, Env, NetConf},
};

/// Does this IPAM DEL failure show that there is no lease to release? Only
/// when the IPAM plugin refuses the environment (code 4) for a container ID
/// the spec forbids: it refuses that ID in ADD as well, so it never gave it a
/// lease (and our ADD refuses it before IPAM). For a well-formed ID the same
/// answer is an error: a lease may be held.
fn ipam_cannot_hold(env: &Env, e: &CniError) -> bool {
    !types::container_id_is_valid(&env.container_id) && e.code == ErrorCode::InvalidEnvironment as u32
}

pub(crate) fn del(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let host_name = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let lookup_name = host_name.clone();
    let host = link::with_handle(|handle| async move { Ok(link::get(&handle, &lookup_name).await?) })
        .map_err(|e| CniError::from_anyhow(ErrorCode::IoFailure, "cannot look up the host veth", &e))?;

    // 1. Stop delivering to the pod. With the agent down the entry is removed
    //    by its reconciliation on start (the veth will be gone by then).
    let reference = EndpointRef {
        container_id: env.container_id.clone(),
        host_ifname: host_name.clone(),
        host_ifindex: host.as_ref().map(|h| h.index),
        pod_ipv4: conf.prev_result_ipv4(),
    };
    match client::call(&conf.agent_socket(), &Request::DelEndpoint(reference), AGENT_TIMEOUT) {
        Ok(_) | Err(ClientError::Unreachable { .. }) => {}
        Err(e) => return Err(agent_error(e)),
    }
    // 2. The veth pair (and with it the pod end and the /32 route).
    if let Some(host) = host {
        link::with_handle(|handle| async move {
            match link::delete(&handle, host.index).await {
                Ok(()) => Ok(()),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .map_err(|e| {
            CniError::from_anyhow(ErrorCode::IoFailure, format!("cannot delete veth {host_name}"), &e)
        })?;
    }
    // 3. The address lease.
    if let Some(ipam) = &conf.ipam {
        match ipam::del(env, &ipam.plugin_type, stdin) {
            Ok(()) => {}
            Err(e) if ipam_cannot_hold(env, &e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ipam_refusal_of_a_malformed_id_means_no_lease() {
        let env = |id: &'static str| {
            Env::from_vars(move |k| match k {
                "CNI_COMMAND" => Some("DEL".into()),
                "CNI_CONTAINERID" => Some(id.into()),
                _ => None,
            })
            .unwrap()
        };
        let refused = CniError::new(ErrorCode::InvalidEnvironment, "invalid characters in containerID");
        let failed = CniError::new(ErrorCode::IoFailure, "cannot write the lease file");
        assert!(ipam_cannot_hold(&env("a/b"), &refused));
        assert!(!ipam_cannot_hold(&env("a/b"), &failed), "another failure may leave a lease");
        assert!(!ipam_cannot_hold(&env("abc123"), &refused), "a well-formed ID may hold a lease");
    }
}
