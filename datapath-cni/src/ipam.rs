//! Address allocation by delegation to the IPAM plugin named in the config
//! (`host-local` as flannel does): it persists leases under its data dir and
//! locks them, so two concurrent ADDs never get the same address.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::{
    error::{CniError, ErrorCode},
    types::Env,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub address: Ipv4Addr,
    pub prefix: Ipv4Net,
    pub dns: serde_json::Value,
}

fn find_plugin(env: &Env, plugin: &str) -> Result<PathBuf, CniError> {
    if plugin.is_empty() || plugin.contains('/') {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!("\"ipam\".\"type\" {plugin:?} is not a plugin name; use e.g. \"host-local\""),
        ));
    }
    env.path.iter().map(|dir| dir.join(plugin)).find(|p| p.is_file()).ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "IPAM plugin {plugin:?} not found in CNI_PATH ({}); install it (Debian: containernetworking-plugins) or fix CNI_PATH",
                env.path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
            ),
        )
    })
}

/// Run the IPAM plugin with `command` for the attachment `env` names (not
/// necessarily our own invocation's: GC releases other containers' leases).
fn exec(env: &Env, plugin: &Path, command: &str, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    let cni_path = env.path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
    let cni_args = env.args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", &env.netns)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", cni_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::with_source(
                ErrorCode::IoFailure,
                format!("cannot run IPAM plugin {}", plugin.display()),
                &e,
            )
        })?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin may answer without reading its stdin (VERSION does):
        // a broken pipe here is not an error, its exit status will tell.
        match input.write_all(stdin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                return Err(CniError::with_source(ErrorCode::IoFailure, "cannot feed the IPAM plugin", &e));
            }
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| CniError::with_source(ErrorCode::IoFailure, "IPAM plugin did not finish", &e))?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    #[derive(Deserialize)]
    struct DelegateError {
        code: u32,
        msg: String,
        #[serde(default)]
        details: String,
    }
    Err(match serde_json::from_slice::<DelegateError>(&output.stdout) {
        Ok(e) => {
            CniError { code: e.code, msg: format!("IPAM {command} failed: {}", e.msg), details: e.details }
        }
        Err(_) => CniError {
            code: ErrorCode::IoFailure as u32,
            msg: format!("IPAM plugin {} failed ({})", plugin.display(), output.status),
            details: String::from_utf8_lossy(&output.stderr).into_owned(),
        },
    })
}

/// The config as the IPAM plugin can take it: same content, with a
/// cniVersion it supports (Debian's host-local 1.1.1 stops at 1.0.0; the
/// ADD/DEL formats we use are the same in 1.0.0 and 1.1.0).
fn for_plugin(env: &Env, plugin: &Path, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    let mut conf: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::with_source(ErrorCode::DecodeFailure, "network configuration is not JSON", &e)
    })?;
    let wanted = conf.get("cniVersion").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    #[derive(Deserialize)]
    struct Versions {
        #[serde(rename = "supportedVersions")]
        supported: Vec<String>,
    }
    let versions: Versions = serde_json::from_slice(&exec(
        env,
        plugin,
        "VERSION",
        br#"{"cniVersion":"0.4.0"}"#,
    )?)
    .map_err(|e| {
        CniError::with_source(ErrorCode::DecodeFailure, "IPAM plugin VERSION answer is unreadable", &e)
    })?;
    if versions.supported.contains(&wanted) {
        return Ok(stdin.to_vec());
    }
    let parse = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    let best = versions
        .supported
        .iter()
        .filter(|v| parse(v) <= parse(&wanted) && parse(v) >= parse("0.4.0"))
        .max_by_key(|v| parse(v))
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "IPAM plugin {} supports none of cniVersion {wanted} or older down to 0.4.0 (it has {})",
                    plugin.display(),
                    versions.supported.join(", ")
                ),
            )
        })?;
    conf["cniVersion"] = serde_json::Value::String(best.clone());
    Ok(conf.to_string().into_bytes())
}

pub fn add(env: &Env, ipam_type: &str, stdin: &[u8]) -> Result<Allocation, CniError> {
    let plugin = find_plugin(env, ipam_type)?;
    let conf = for_plugin(env, &plugin, stdin)?;
    let out = exec(env, &plugin, "ADD", &conf)?;
    #[derive(Deserialize)]
    struct IpamResult {
        #[serde(default)]
        ips: Vec<IpConfig>,
        #[serde(default)]
        dns: serde_json::Value,
    }
    #[derive(Deserialize)]
    struct IpConfig {
        address: String,
    }
    let result: IpamResult = serde_json::from_slice(&out).map_err(|e| {
        CniError::with_source(ErrorCode::DecodeFailure, "IPAM plugin returned an unreadable result", &e)
    })?;
    let prefix = result.ips.iter().find_map(|ip| ip.address.parse::<Ipv4Net>().ok()).ok_or_else(|| {
        CniError::new(ErrorCode::InvalidNetworkConfig, "IPAM returned no IPv4 address; give it an IPv4 range")
    })?;
    Ok(Allocation { address: prefix.addr(), prefix, dns: result.dns })
}

pub fn del(env: &Env, ipam_type: &str, stdin: &[u8]) -> Result<(), CniError> {
    let plugin = find_plugin(env, ipam_type)?;
    let conf = for_plugin(env, &plugin, stdin)?;
    exec(env, &plugin, "DEL", &conf).map(|_| ())
}
