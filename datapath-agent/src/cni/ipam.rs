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

use super::{
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

/// Run the IPAM plugin with `command` (ADD or DEL) and the same config.
fn exec(env: &Env, plugin: &Path, command: &str, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
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
        input
            .write_all(stdin)
            .map_err(|e| CniError::with_source(ErrorCode::IoFailure, "cannot feed the IPAM plugin", &e))?;
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
    let _ = env;
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

pub fn add(env: &Env, ipam_type: &str, stdin: &[u8]) -> Result<Allocation, CniError> {
    let plugin = find_plugin(env, ipam_type)?;
    let out = exec(env, &plugin, "ADD", stdin)?;
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
    exec(env, &plugin, "DEL", stdin).map(|_| ())
}
