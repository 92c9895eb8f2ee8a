//! The agent's configuration file (TOML), validated field by field so that a
//! bad value is refused with the field's name and how to fix it.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::Deserialize;

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/datapath";
pub const DEFAULT_API_SOCKET: &str = "/run/datapath/agent.sock";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name (the Kubernetes Node object's name).
    pub node_name: String,
    /// The pod CIDR assigned to this node; every local pod address is in it.
    pub pod_cidr: Ipv4Net,
    /// The node's uplink interface (towards other nodes).
    pub uplink_interface: String,
    /// bpffs directory under which maps and links are pinned.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Unix socket on which the agent serves the CNI plugin.
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
}

fn default_bpffs_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS_DIR)
}
fn default_api_socket() -> PathBuf {
    PathBuf::from(DEFAULT_API_SOCKET)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config field `{field}` is invalid: {problem}; fix: {fix}")]
    Invalid {
        field: &'static str,
        problem: String,
        fix: &'static str,
    },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parse and validate (no access to the system: see [`Self::check_host`]).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() || self.node_name.len() > 253 {
            return Err(ConfigError::Invalid {
                field: "node_name",
                problem: format!(
                    "{:?} is empty or longer than 253 characters",
                    self.node_name
                ),
                fix: "set it to this node's Kubernetes name, e.g. node_name = \"worker-1\"",
            });
        }
        if self.pod_cidr != self.pod_cidr.trunc() {
            return Err(ConfigError::Invalid {
                field: "pod_cidr",
                problem: format!("{} has host bits set", self.pod_cidr),
                fix: "use the network address, e.g. \"10.244.1.0/24\"",
            });
        }
        if self.pod_cidr.prefix_len() > 30 {
            return Err(ConfigError::Invalid {
                field: "pod_cidr",
                problem: format!("{} leaves no room for pods", self.pod_cidr),
                fix: "use a prefix of /30 or shorter, typically /24",
            });
        }
        if self.uplink_interface.is_empty() || self.uplink_interface.len() > 15 {
            return Err(ConfigError::Invalid {
                field: "uplink_interface",
                problem: format!("{:?} is not a valid interface name", self.uplink_interface),
                fix: "name the node's interface towards other nodes, e.g. \"eth0\"",
            });
        }
        if !self.bpffs_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "bpffs_dir",
                problem: format!("{} is not an absolute path", self.bpffs_dir.display()),
                fix: "use a directory on bpffs, e.g. \"/sys/fs/bpf/datapath\"",
            });
        }
        if !self.api_socket.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "api_socket",
                problem: format!("{} is not an absolute path", self.api_socket.display()),
                fix: "use an absolute path, e.g. \"/run/datapath/agent.sock\"",
            });
        }
        Ok(())
    }

    /// Checks that need the host: the uplink exists, bpffs_dir is on bpffs.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        if nix::net::if_::if_nametoindex(self.uplink_interface.as_str()).is_err() {
            return Err(ConfigError::Invalid {
                field: "uplink_interface",
                problem: format!(
                    "no interface named {:?} on this node",
                    self.uplink_interface
                ),
                fix: "name an existing interface (see `ip link`)",
            });
        }
        let bpffs_root = self
            .bpffs_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        match nix::sys::statfs::statfs(bpffs_root) {
            Ok(st) if st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => Ok(()),
            _ => Err(ConfigError::Invalid {
                field: "bpffs_dir",
                problem: format!("{} is not on a bpf filesystem", self.bpffs_dir.display()),
                fix: "mount bpffs (mount -t bpf bpf /sys/fs/bpf) and point bpffs_dir under it",
            }),
        }
    }

    /// True if `ip` is a usable pod address of this node.
    pub fn owns_pod_ip(&self, ip: Ipv4Addr) -> bool {
        self.pod_cidr.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_name = "node-a"
pod_cidr = "10.244.1.0/24"
uplink_interface = "eth0"
"#;

    #[test]
    fn accepts_minimal_config_with_defaults() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.bpffs_dir, PathBuf::from(DEFAULT_BPFFS_DIR));
        assert_eq!(c.api_socket, PathBuf::from(DEFAULT_API_SOCKET));
    }

    fn error_of(text: &str) -> String {
        AgentConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn names_the_bad_field() {
        let e = error_of(&GOOD.replace("10.244.1.0/24", "10.244.1.7/24"));
        assert!(e.contains("`pod_cidr`") && e.contains("host bits"), "{e}");
        let e = error_of(&GOOD.replace("10.244.1.0/24", "banana"));
        assert!(e.contains("pod_cidr"), "{e}");
        let e = error_of(&GOOD.replace("node-a", ""));
        assert!(e.contains("`node_name`"), "{e}");
        let e = error_of(&format!("{GOOD}\nbpffs_dir = \"relative\"\n"));
        assert!(e.contains("`bpffs_dir`"), "{e}");
        let e = error_of(&format!("{GOOD}\npod_cdir = \"10.0.0.0/24\"\n"));
        assert!(e.contains("pod_cdir"), "unknown field must be named: {e}");
        let e = error_of("node_name = \"x\"\n");
        assert!(e.contains("pod_cidr"), "missing field must be named: {e}");
    }
}
