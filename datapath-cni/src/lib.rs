//! `datapath-cni`: the CNI plugin (spec 1.0/1.1) that container runtimes call.
//!
//! ADD: ask the agent it is up; allocate an address (IPAM delegate); create
//! the veth pair with the peer directly in the pod's netns; address, MTU and
//! routes in the pod; a /32 route to the pod on the node; register the
//! endpoint with the agent (which attaches the program). Any failure undoes
//! exactly what this invocation created, in reverse order.
//! DEL: undo all of that; idempotent, works without the netns.
//! GC (1.1.0): DEL what `cni.dev/valid-attachments` omits; nothing without it.
//! Calls on one container run one at a time (`lock`).

pub mod error;
pub mod ipam;
pub mod link;
pub mod lock;
pub mod types;

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use datapath_api::{
    EndpointRef, EndpointSpec, Request,
    client::{self, ClientError},
    netns,
    route::add_host_route,
};
use error::{CniError, ErrorCode};
use types::{Env, NetConf, POD_GATEWAY, SUPPORTED_VERSIONS, version_at_least};

const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a CNI invocation prints on stdout, and whether it succeeded.
pub struct Outcome {
    pub stdout: serde_json::Value,
    pub success: bool,
}

/// Run one invocation: environment from `get_env`, network config from `stdin`.
pub fn invoke(get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // Errors are reported in the config's version when we can read it.
    let version_hint = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|v| v.as_str()).map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_owned());
    match dispatch(get_env, stdin) {
        Ok(stdout) => Outcome { stdout, success: true },
        Err(e) => Outcome { stdout: e.to_json(&version_hint), success: false },
    }
}

fn dispatch(get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<serde_json::Value, CniError> {
    let env = Env::from_vars(get_env)?;
    match env.command.as_str() {
        // VERSION needs no config beyond (optionally) its version.
        "VERSION" => Ok(json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS })),
        // ADD, DEL and CHECK of one container run one at a time (the lock is
        // released when the call returns): a runtime may send DEL while its
        // ADD still runs, and neither may then see the other half-done.
        "ADD" => {
            let conf = NetConf::parse(stdin)?;
            env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
            env.require_valid_container_id()?;
            let _container = lock_container(&conf, &env.container_id)?;
            // Until the agent records it, our veth has no owner GC could see.
            let _no_sweep = lock::DirLock::shared(&conf.lock_dir(), lock::LOCK_WAIT)
                .map_err(|e| lock_error(e, "GC is removing veths without an owner"))?;
            add(&env, &conf, stdin)
        }
        "DEL" => {
            let conf = NetConf::parse(stdin)?;
            env.require(&["CNI_CONTAINERID", "CNI_IFNAME"])?;
            let _container = lock_container(&conf, &env.container_id)?;
            del(&env, &conf, stdin).map(|()| serde_json::Value::Null)
        }
        "CHECK" => {
            let conf = NetConf::parse(stdin)?;
            env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
            env.require_valid_container_id()?;
            let _container = lock_container(&conf, &env.container_id)?;
            check(&env, &conf).map(|()| serde_json::Value::Null)
        }
        "GC" => {
            let conf = NetConf::parse(stdin)?;
            gc(&env, &conf, stdin).map(|()| serde_json::Value::Null)
        }
        "STATUS" => {
            let conf = NetConf::parse(stdin)?;
            agent_status(&conf)
                .map(|_mtu| serde_json::Value::Null)
                .map_err(|e| CniError { code: ErrorCode::PluginNotAvailable as u32, ..e })
        }
        other => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_COMMAND {other:?} is not a CNI verb; use ADD, DEL, CHECK, STATUS, GC or VERSION"),
        )),
    }
}

fn lock_error(e: lock::LockError, busy: &str) -> CniError {
    match e {
        lock::LockError::Busy { .. } => {
            CniError::with_source(ErrorCode::TryAgainLater, format!("{busy}; try again later"), &e)
        }
        other => CniError::with_source(ErrorCode::IoFailure, "cannot take the CNI lock", &other),
    }
}

/// Hold this container's lock (waiting for a call on it under way).
fn lock_container(conf: &NetConf, container_id: &str) -> Result<lock::ContainerLock, CniError> {
    lock::ContainerLock::acquire(&conf.lock_dir(), container_id, lock::LOCK_WAIT)
        .map_err(|e| lock_error(e, "another CNI call for this container is still running"))
}

/// Host-side veth name: prefix + hash of (container ID, ifname), so DEL finds
/// it again without state, and two pods never collide.
pub fn host_veth_name(prefix: &str, container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let keep = 15 - prefix.len();
    format!("{prefix}{}", &hex[..keep])
}

/// The CNI error for a failed call to the agent. An agent that is down,
/// overloaded (backlog full, no answer in time) or restarting is transient:
/// code 11, so the runtime tries again. Only a refusal or a garbled answer is
/// an error of this call (code 5).
fn agent_error(e: ClientError) -> CniError {
    match e {
        ClientError::Unreachable { .. } => CniError::with_source(
            ErrorCode::TryAgainLater,
            "the datapath agent is not running on this node; try again when it is ready",
            &e,
        ),
        ClientError::Busy { .. } => CniError::with_source(
            ErrorCode::TryAgainLater,
            "the datapath agent is overloaded and did not answer in time; try again later",
            &e,
        ),
        ClientError::Closed { .. } => CniError::with_source(
            ErrorCode::TryAgainLater,
            "the datapath agent closed the connection without answering (restarting?); try again later",
            &e,
        ),
        other => {
            CniError::with_source(ErrorCode::IoFailure, "the datapath agent refused the request", &other)
        }
    }
}

/// The agent's answer to STATUS: up, and the MTU pods on this node get.
fn agent_status(conf: &NetConf) -> Result<u32, CniError> {
    match client::call(&conf.agent_socket(), &Request::Status, AGENT_TIMEOUT).map_err(agent_error)? {
        datapath_api::Response::Status { pod_mtu, .. } => Ok(pod_mtu),
        other => {
            Err(CniError::new(ErrorCode::IoFailure, format!("unexpected answer from the agent: {other:?}")))
        }
    }
}

/// The pod's network namespace, CNI_NETNS: code 3 if it is not there (the
/// container is gone), code 4 if it is something else than a network
/// namespace (a file, a directory, a device, another kind of namespace) or
/// the plugin's own, the node's (the pod's default route would replace the
/// node's).
fn open_pod_netns(env: &Env) -> Result<std::fs::File, CniError> {
    let file = netns::open(Path::new(&env.netns)).map_err(|e| match &e {
        netns::NetnsError::NotNetwork { found, .. } => CniError::with_source(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_NETNS {} is not a network namespace but {found}; it must name one, e.g. /proc/<pid>/ns/net or a bind mount of it",
                env.netns
            ),
            &e,
        ),
        _ => CniError::with_source(
            ErrorCode::UnknownContainer,
            format!("network namespace {} cannot be opened", env.netns),
            &e,
        ),
    })?;
    let own = netns::is_current(&file).map_err(|e| {
        CniError::with_source(ErrorCode::IoFailure, "cannot compare CNI_NETNS with the node's namespace", &e)
    })?;
    if own {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_NETNS {} is the node's own network namespace (the plugin's), not a pod's; it must name the pod's network namespace",
                env.netns
            ),
        ));
    }
    Ok(file)
}

/// What this ADD created so far: exactly what a failure must undo.
#[derive(Default)]
struct Undo {
    ipam: bool,
    host_veth: Option<u32>,
    endpoint: Option<EndpointRef>,
}

fn add(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<serde_json::Value, CniError> {
    let ipam_type = conf
        .ipam
        .as_ref()
        .map(|i| i.plugin_type.clone())
        .ok_or_else(|| CniError::new(ErrorCode::InvalidNetworkConfig, "\"ipam\" is missing; add e.g. {\"type\": \"host-local\", \"ranges\": [[{\"subnet\": \"<node pod CIDR>\"}]]}"))?;
    let netns_file = open_pod_netns(env)?;
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

    let host_index = host.index;
    link::with_handle(|handle| async move {
        link::set_up(&handle, host_index).await.context("bringing the host veth up")?;
        add_host_route(&handle, pod_ip, host_index).await.context("adding the node's route to the pod")?;
        Ok(())
    })
    .map_err(|e| CniError::from_anyhow(ErrorCode::IoFailure, "cannot configure the host side", &e))?;

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

fn unexpected(other: datapath_api::Response) -> CniError {
    CniError::new(ErrorCode::IoFailure, format!("unexpected answer from the agent: {other:?}"))
}

/// Every endpoint the agent has a record of.
fn recorded_endpoints(conf: &NetConf) -> Result<Vec<EndpointSpec>, CniError> {
    match client::call(&conf.agent_socket(), &Request::ListEndpoints, AGENT_TIMEOUT).map_err(agent_error)? {
        datapath_api::Response::Endpoints { endpoints } => Ok(endpoints),
        other => Err(unexpected(other)),
    }
}

/// The agent's record for this host veth, if it has one.
fn recorded_endpoint(conf: &NetConf, host_name: &str) -> Result<Option<EndpointSpec>, CniError> {
    Ok(recorded_endpoints(conf)?.into_iter().find(|e| e.host_ifname == host_name))
}

/// Everything that differs from what ADD leaves: host veth and route, the
/// pod's interface, address and default route, and the agent's view (map
/// entry, link, record).
fn endpoint_problems(env: &Env, conf: &NetConf, pod_ip: Ipv4Addr) -> Result<Vec<String>, CniError> {
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
        datapath_api::Response::Check { problems: agent } => problems.extend(agent),
        other => return Err(unexpected(other)),
    }
    Ok(problems)
}

/// CHECK: the endpoint is as ADD left it, or an error listing what is not.
fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let pod_ip = prev_result_ipv4(conf).ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidNetworkConfig,
            "CHECK needs \"prevResult\" with the pod's IPv4 address (the ADD result)",
        )
    })?;
    open_pod_netns(env)?;
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

/// The key of GC's input that lists the attachments to keep (spec 1.1).
const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";

#[derive(serde::Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The attachments GC must keep. Only an explicit list (`[]` included) lets
/// GC remove anything: a config without it (or with null) says nothing about
/// what the runtime still uses, and removing on that would take every pod.
fn valid_attachments(stdin: &[u8]) -> Result<Vec<Attachment>, CniError> {
    let conf: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::with_source(ErrorCode::DecodeFailure, "network configuration is not JSON", &e)
    })?;
    match conf.get(VALID_ATTACHMENTS) {
        None | Some(serde_json::Value::Null) => Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "GC needs \"{VALID_ATTACHMENTS}\", the list of attachments still in use ([] if none); without it nothing is removed"
            ),
        )),
        Some(list) => serde_json::from_value(list.clone()).map_err(|e| {
            CniError::with_source(
                ErrorCode::InvalidNetworkConfig,
                format!("\"{VALID_ATTACHMENTS}\" is not a list of {{\"containerID\", \"ifname\"}}; nothing is removed"),
                &e,
            )
        }),
    }
}

/// GC (spec 1.1.0 and later only): remove every endpoint of this network
/// (the config's `name`) whose (container ID, interface) is not in
/// `cni.dev/valid-attachments`, exactly as DEL would, and orphan host veths
/// with our name pattern that no record and no valid attachment owns. The
/// list is per network: endpoints of other networks (another conflist,
/// multus) are never touched, nor are records without a network (made before
/// it was recorded: which network they belong to is unknown). One attachment
/// that cannot be removed does not stop the others; the errors are reported
/// together at the end.
fn gc(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    if !version_at_least(&conf.cni_version, "1.1.0") {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "GC needs cniVersion 1.1.0 or later (the config has {}): earlier versions define neither GC nor \"{VALID_ATTACHMENTS}\"; nothing is removed",
                conf.cni_version
            ),
        ));
    }
    let valid: Vec<String> = valid_attachments(stdin)?
        .iter()
        .map(|a| host_veth_name(conf.veth_prefix(), &a.container_id, &a.ifname))
        .collect();
    let records = recorded_endpoints(conf)?;
    let mut failed = Vec::new();
    let ours = |r: &&EndpointSpec| match &r.network {
        Some(network) => *network == conf.name,
        None => {
            // Nothing else would tell why it stays.
            eprintln!(
                "datapath-cni: GC of network {:?} keeps endpoint {} (container {}, {}): its record does not say which network it belongs to; DEL removes it",
                conf.name, r.host_ifname, r.container_id, r.cni_ifname
            );
            false
        }
    };
    for record in records.iter().filter(|r| !valid.contains(&r.host_ifname)).filter(ours) {
        let stale = Env {
            container_id: record.container_id.clone(),
            ifname: record.cni_ifname.clone(),
            netns: String::new(),
            ..env.clone()
        };
        // As DEL does: never beside another call on the same container.
        let removed = lock_container(conf, &record.container_id).and_then(|_held| del(&stale, conf, stdin));
        if let Err(e) = removed {
            failed.push((record.container_id.clone(), record.cni_ifname.clone(), e));
        }
    }
    let swept = sweep_orphan_veths(conf, valid);
    let Some((_, _, first)) = failed.first() else { return swept };
    let mut details: Vec<String> =
        failed.iter().map(|(container, ifname, e)| format!("{container} ({ifname}): {e}")).collect();
    if let Err(e) = swept {
        details.push(e.to_string());
    }
    Err(CniError {
        code: first.code,
        msg: format!("GC could not remove {} stale attachment(s); it removed the others", failed.len()),
        details: details.join("; "),
    })
}

/// Remove veths that look like ours (a veth, named prefix + hex) but have
/// neither a record (of any network) nor a valid owner: an ADD killed
/// half-way. No ADD runs meanwhile, and the records are read once none does:
/// a veth an ADD has just made is never taken for one. Devices of any other
/// kind (a bridge with such a name) are not ours, whatever their name.
fn sweep_orphan_veths(conf: &NetConf, valid: Vec<String>) -> Result<(), CniError> {
    let _no_add = lock::DirLock::exclusive(&conf.lock_dir(), lock::LOCK_WAIT)
        .map_err(|e| lock_error(e, "ADDs are still under way"))?;
    let prefix = conf.veth_prefix().to_owned();
    let known: Vec<String> =
        recorded_endpoints(conf)?.into_iter().map(|r| r.host_ifname).chain(valid).collect();
    link::with_handle(|handle| async move {
        for (index, name) in link::veths(&handle).await? {
            let ours = name.len() == 15
                && name.starts_with(&prefix)
                && name[prefix.len()..].chars().all(|c| c.is_ascii_hexdigit());
            if ours && !known.contains(&name) {
                match link::delete(&handle, index).await {
                    // Gone meanwhile (a DEL of its pod): what we wanted.
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
                    other => other?,
                }
            }
        }
        Ok(())
    })
    .map_err(|e| CniError::from_anyhow(ErrorCode::IoFailure, "cannot remove orphan veths", &e))
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

fn prev_result_ipv4(conf: &NetConf) -> Option<Ipv4Addr> {
    conf.prev_result
        .as_ref()?
        .get("ips")?
        .as_array()?
        .iter()
        .filter_map(|ip| ip.get("address")?.as_str()?.parse::<ipnet::Ipv4Net>().ok())
        .map(|net| net.addr())
        .next()
}

/// Does this IPAM DEL failure show that there is no lease to release? Only
/// when the IPAM plugin refuses the environment (code 4) for a container ID
/// the spec forbids: it refuses that ID in ADD as well, so it never gave it a
/// lease (and our ADD refuses it before IPAM). For a well-formed ID the same
/// answer is an error: a lease may be held.
fn ipam_cannot_hold(env: &Env, e: &CniError) -> bool {
    !types::container_id_is_valid(&env.container_id) && e.code == ErrorCode::InvalidEnvironment as u32
}

fn del(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
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
        pod_ipv4: prev_result_ipv4(conf),
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

    #[test]
    fn veth_names_are_stable_unique_and_short() {
        let a = host_veth_name("dp", "abc", "eth0");
        assert_eq!(a, host_veth_name("dp", "abc", "eth0"));
        assert_ne!(a, host_veth_name("dp", "abd", "eth0"));
        assert_ne!(a, host_veth_name("dp", "abc", "eth1"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("dp"));
    }
}
