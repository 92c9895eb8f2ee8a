//! Network configuration (stdin) and environment of a CNI invocation.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use datapath_api::DEFAULT_API_SOCKET;
use serde::Deserialize;

use crate::{
    error::{CniError, ErrorCode},
    lock::DEFAULT_LOCK_DIR,
};

pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The pod's default gateway: link-local, answered by the datapath's ARP responder.
pub const POD_GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);
pub const DEFAULT_VETH_PREFIX: &str = "dp";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's API socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// MTU of the pod interface and its host veth; by default the agent's
    /// (uplink MTU, less 50 bytes in VXLAN mode).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Prefix of host-side veth names (at most 4 characters).
    #[serde(default)]
    pub host_veth_prefix: Option<String>,
    /// Where the per-container lock files go (see `lock`).
    #[serde(default)]
    pub lock_dir: Option<PathBuf>,
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub plugin_type: String,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        // First just the version, so that even a config we cannot use gets an
        // error in its own cniVersion.
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            let code = if e.is_syntax() || e.is_eof() {
                ErrorCode::DecodeFailure
            } else {
                ErrorCode::InvalidNetworkConfig
            };
            CniError::with_source(code, "network configuration on stdin is not valid", &e)
        })?;
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<(), CniError> {
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "cniVersion {:?} is not supported; use one of {}",
                    self.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if let Some(mtu) = self.mtu
            && !(576..=65535).contains(&mtu)
        {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("\"mtu\": {mtu} is out of range; use 576..65535 (usually the uplink MTU)"),
            ));
        }
        if let Some(prefix) = &self.host_veth_prefix
            && (prefix.is_empty() || prefix.len() > 4 || !prefix.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("\"hostVethPrefix\": {prefix:?} must be 1-4 ASCII letters or digits"),
            ));
        }
        if let Some(dir) = &self.lock_dir
            && !dir.is_absolute()
        {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!(
                    "\"lockDir\": {} must be an absolute path (default {DEFAULT_LOCK_DIR})",
                    dir.display()
                ),
            ));
        }
        Ok(())
    }

    pub fn lock_dir(&self) -> PathBuf {
        self.lock_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK_DIR))
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET))
    }
    pub fn veth_prefix(&self) -> &str {
        self.host_veth_prefix.as_deref().unwrap_or(DEFAULT_VETH_PREFIX)
    }

    /// The pod's IPv4 address in `prevResult` (the ADD result), if there is one.
    pub fn prev_result_ipv4(&self) -> Option<Ipv4Addr> {
        self.prev_result
            .as_ref()?
            .get("ips")?
            .as_array()?
            .iter()
            .filter_map(|ip| ip.get("address")?.as_str()?.parse::<ipnet::Ipv4Net>().ok())
            .map(|net| net.addr())
            .next()
    }
}

/// Is spec version `version` at least `min`? ("1.1.0" >= "1.0.0")
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(version) >= parse(min)
}

/// The CNI_* environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub path: Vec<PathBuf>,
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = get("CNI_COMMAND")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set"))?;
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            path: get("CNI_PATH")
                .unwrap_or_default()
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
            args,
        })
    }

    /// Check that the variables this command needs are present.
    pub fn require(&self, names: &[&str]) -> Result<(), CniError> {
        for name in names {
            let (value, hint) = match *name {
                "CNI_CONTAINERID" => (&self.container_id, "the container ID"),
                "CNI_NETNS" => (&self.netns, "the path of the pod's network namespace"),
                "CNI_IFNAME" => (&self.ifname, "the interface name to create in the pod, e.g. eth0"),
                _ => continue,
            };
            if value.is_empty() {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("{name} is not set: it must name {hint}"),
                ));
            }
        }
        if self.ifname.len() > 15 || self.ifname.contains('/') {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!(
                    "CNI_IFNAME {:?} is not a valid interface name (at most 15 characters, no '/')",
                    self.ifname
                ),
            ));
        }
        Ok(())
    }

    /// ADD and CHECK take only container IDs of the spec's form, as IPAM
    /// plugins do: refused here, before anything is made or locked.
    pub fn require_valid_container_id(&self) -> Result<(), CniError> {
        if container_id_is_valid(&self.container_id) {
            return Ok(());
        }
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_CONTAINERID {:?} is not a container ID: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
                self.container_id
            ),
        ))
    }

    pub fn k8s_pod(&self) -> (Option<String>, Option<String>) {
        (self.args.get("K8S_POD_NAMESPACE").cloned(), self.args.get("K8S_POD_NAME").cloned())
    }
}

/// A container ID as the spec defines it: a letter or digit, then letters,
/// digits, `_`, `.` or `-`.
pub fn container_id_is_valid(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// CNI_ARGS: `KEY=VALUE;KEY=VALUE`.
pub fn parse_cni_args(raw: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("CNI_ARGS element {pair:?} is not KEY=VALUE"),
            )
        })?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_k8s_args() {
        let a = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0").unwrap();
        assert_eq!(a["K8S_POD_NAME"], "web-0");
        assert!(parse_cni_args("garbage").is_err());
    }

    #[test]
    fn container_ids_of_the_spec_form() {
        for id in ["a", "0f3c9e", "pod_1.web-x", "A-"] {
            assert!(container_id_is_valid(id), "{id:?}");
        }
        for id in ["", "a/b", "with space", "../../etc/passwd", "-x", ".x", "_x", "a:b", "é"] {
            assert!(!container_id_is_valid(id), "{id:?}");
        }
    }

    #[test]
    fn versions_compare_by_number() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.10.0", "1.1.0"));
        assert!(!version_at_least("1.0.0", "1.1.0"));
        assert!(!version_at_least("0.4.0", "1.1.0"));
    }

    #[test]
    fn config_errors_have_the_right_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, ErrorCode::DecodeFailure as u32);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"datapath-cni"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::IncompatibleVersion as u32);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","type":"datapath-cni"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidNetworkConfig as u32);
        assert!(e.details.contains("name"), "{e}");
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":10}"#).unwrap_err();
        assert!(e.msg.contains("mtu"), "{e}");
    }
}
