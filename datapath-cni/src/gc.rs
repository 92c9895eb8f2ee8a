//! GC (spec 1.1.0 and later): DEL what `cni.dev/valid-attachments` omits,
//! in this network only; nothing without the list.

use datapath_api::EndpointSpec;

use crate::{
    agent::recorded_endpoints,
    del::del,
    error::{CniError, ErrorCode},
    host_veth_name, link, lock, lock_container, lock_error,
    types::{Env, NetConf, version_at_least},
};

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
pub(crate) fn gc(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
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
