//! What the datapath agent and its CNI plugin share.
//!
//! - The local API between them: one JSON request and one JSON response per
//!   line over a unix socket that only root can open (the messages here, the
//!   plugin's blocking client in `client`).
//! - The facts about a pod's endpoint that both sides handle the same way:
//!   MAC addresses as text (`mac`), entering the pod's network namespace
//!   (`netns`), the node's /32 route to a pod (`route`: ADD makes it, the
//!   agent puts it back after the kernel removed it).
//!
//! - What was built (`build_info`), which both binaries report.
//!
//! Kept small: the plugin links this crate, not the agent's (kube, axum, aya).

pub mod build_info;
pub mod client;
pub mod mac;
pub mod netns;
pub mod route;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

/// Where the agent serves the API unless configured otherwise (the agent's
/// `api_socket`, the plugin's `agentSocket`).
pub const DEFAULT_API_SOCKET: &str = "/run/datapath/agent.sock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent up with the datapath loaded?
    Status,
    /// Register a pod whose veth the plugin has set up, and attach the program.
    AddEndpoint(EndpointSpec),
    /// Forget a pod. Idempotent.
    DelEndpoint(EndpointRef),
    /// Is this endpoint programmed as ADD left it? (CNI CHECK)
    CheckEndpoint(EndpointRef),
    /// Every endpoint the agent has a record of (CNI GC, idempotent ADD).
    ListEndpoints,
}

/// The agent's own view of itself, for `datapath-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStatus {
    /// `build_info::LONG_VERSION` of the agent answering.
    pub version: String,
    /// "native" or "vxlan".
    pub mode: String,
    /// "static" (the config file) or "kubernetes".
    pub source: String,
    pub node_ip: String,
    /// Why the agent is not ready (as `/readyz` says); `None`: ready.
    pub not_ready: Option<String>,
    /// Watches failing now, with their last error.
    pub failing_watches: Vec<String>,
    /// Peers' pod CIDRs programmed.
    pub peers: usize,
    /// Packets dropped in the last `recent_seconds`, by reason (those with any).
    pub recent_drops: std::collections::BTreeMap<String, u64>,
    pub recent_seconds: u64,
    /// Connection-tracking entries at the collector's last sweep, and the
    /// map's capacity (`None` before the first sweep, or from an older agent).
    #[serde(default)]
    pub conntrack_entries: Option<u64>,
    #[serde(default)]
    pub conntrack_capacity: Option<u64>,
    /// Seconds since the collector's last sweep, and whether it failed.
    #[serde(default)]
    pub last_sweep_seconds_ago: Option<u64>,
    #[serde(default)]
    pub last_sweep_error: Option<String>,
    /// Failed reconciliations and refused requests since the agent started.
    #[serde(default)]
    pub errors: u64,
    /// The last run of each reconciler that has run (empty from an older agent).
    #[serde(default)]
    pub reconciles: Vec<ReconcileStatus>,
}

/// The last run of one reconciler: the desired state of one kind written
/// into the datapath (maps, routes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReconcileStatus {
    /// What it programs: "peers" (other nodes' pod CIDRs and routes),
    /// "services", "policy".
    pub what: String,
    pub seconds_ago: u64,
    /// Why it failed; `None`: it succeeded. A failed one is retried.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointSpec {
    pub container_id: String,
    pub cni_ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
    pub pod_ipv4: Ipv4Addr,
    pub pod_mac: MacAddr,
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    /// The CNI network (the config's `name`) this attachment belongs to, so
    /// that GC of one network never removes another's. None in records made
    /// before it was recorded: GC leaves those alone (DEL still removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRef {
    pub container_id: String,
    pub host_ifname: String,
    /// Known while the veth still exists.
    #[serde(default)]
    pub host_ifindex: Option<u32>,
    #[serde(default)]
    pub pod_ipv4: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        node_name: String,
        pod_cidr: String,
        endpoints: usize,
        /// MTU for pod interfaces (uplink MTU, less VXLAN overhead in overlay mode).
        pod_mtu: u32,
        /// Why the last edit of the config file was not applied, if it was not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_config_error: Option<String>,
        /// What `datapath-agent status` shows (absent from an older agent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<Box<AgentStatus>>,
    },
    Done,
    /// What CHECK found wrong; empty when all is well.
    Check {
        problems: Vec<String>,
    },
    Endpoints {
        endpoints: Vec<EndpointSpec>,
    },
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_tagged_json() {
        let r = Request::DelEndpoint(EndpointRef {
            container_id: "c1".into(),
            host_ifname: "dp123".into(),
            host_ifindex: Some(7),
            pod_ipv4: None,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"op":"del_endpoint""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let s = serde_json::to_string(&Response::Done).unwrap();
        assert_eq!(s, r#"{"result":"done"}"#);
    }
}
