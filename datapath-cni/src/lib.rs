//! `datapath-cni`: the CNI plugin (spec 1.0/1.1) that container runtimes call.
//!
//! One module per verb (`add`, `del`, `check`, `gc`, `status`, `version`);
//! `dispatch` routes a call to it. ADD, DEL and CHECK of one container run
//! one at a time (`lock`). The plugin's own helpers: the network config and
//! environment (`types`), CNI errors (`error`), the IPAM delegate (`ipam`),
//! netlink work (`link`), CNI_NETNS checks (`pod_netns`), calls to the agent
//! (`agent`, over `datapath_api`).

mod add;
mod agent;
mod check;
mod del;
pub mod error;
mod gc;
pub mod ipam;
pub mod link;
pub mod lock;
mod pod_netns;
mod status;
pub mod types;
mod version;

use error::{CniError, ErrorCode};
use sha2::{Digest as _, Sha256};
use types::{Env, NetConf, SUPPORTED_VERSIONS};

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
    // VERSION reads nothing else of the environment: a runtime probing the
    // plugin gets its answer whatever else it passed (CNI_ARGS, say).
    if get_env("CNI_COMMAND").as_deref() == Some("VERSION") {
        return Ok(version::version());
    }
    let env = Env::from_vars(get_env)?;
    match env.command.as_str() {
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
            add::add(&env, &conf, stdin)
        }
        "DEL" => {
            let conf = NetConf::parse(stdin)?;
            env.require(&["CNI_CONTAINERID", "CNI_IFNAME"])?;
            let _container = lock_container(&conf, &env.container_id)?;
            del::del(&env, &conf, stdin).map(|()| serde_json::Value::Null)
        }
        "CHECK" => {
            let conf = NetConf::parse(stdin)?;
            env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
            env.require_valid_container_id()?;
            let _container = lock_container(&conf, &env.container_id)?;
            check::check(&env, &conf).map(|()| serde_json::Value::Null)
        }
        "GC" => {
            let conf = NetConf::parse(stdin)?;
            gc::gc(&env, &conf, stdin).map(|()| serde_json::Value::Null)
        }
        "STATUS" => {
            let conf = NetConf::parse(stdin)?;
            status::status(&conf).map(|()| serde_json::Value::Null)
        }
        other => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_COMMAND {other:?} is not a CNI verb; use ADD, DEL, CHECK, STATUS, GC or VERSION"),
        )),
    }
}

pub(crate) fn lock_error(e: lock::LockError, busy: &str) -> CniError {
    match e {
        lock::LockError::Busy { .. } => {
            CniError::with_source(ErrorCode::TryAgainLater, format!("{busy}; try again later"), &e)
        }
        other => CniError::with_source(ErrorCode::IoFailure, "cannot take the CNI lock", &other),
    }
}

/// Hold this container's lock (waiting for a call on it under way).
pub(crate) fn lock_container(conf: &NetConf, container_id: &str) -> Result<lock::ContainerLock, CniError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
