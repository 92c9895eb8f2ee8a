//! The local API between the CNI plugin and the agent: one JSON request and one
//! JSON response per line over a unix socket that only root can open.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

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

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent is not reachable at {path} (is datapath-agent running?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent sent an unreadable answer")]
    Decode(#[source] serde_json::Error),
    #[error("agent refused: {0}")]
    Refused(String),
}

/// Send one request and wait for its answer (blocking: the CNI plugin is a
/// short-lived process that does one thing at a time).
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let io_err = |source| ClientError::Io { path: socket.to_owned(), source };
    let mut stream = UnixStream::connect(socket)
        .map_err(|source| ClientError::Unreachable { path: socket.to_owned(), source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_vec(request).map_err(ClientError::Decode)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io_err)?;
    match serde_json::from_str(&answer).map_err(ClientError::Decode)? {
        Response::Error { message } => Err(ClientError::Refused(message)),
        ok => Ok(ok),
    }
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
