//! The plugin's calls to the agent: the answers it expects, and the CNI
//! error for each way a call can fail.

use std::time::Duration;

use datapath_api::{
    EndpointSpec, Request, Response,
    client::{self, ClientError},
};

use crate::{
    error::{CniError, ErrorCode},
    types::NetConf,
};

pub(crate) const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The CNI error for a failed call to the agent. An agent that is down,
/// overloaded (backlog full, no answer in time) or restarting is transient:
/// code 11, so the runtime tries again. Only a refusal or a garbled answer is
/// an error of this call (code 5).
pub(crate) fn agent_error(e: ClientError) -> CniError {
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
pub(crate) fn agent_status(conf: &NetConf) -> Result<u32, CniError> {
    match client::call(&conf.agent_socket(), &Request::Status, AGENT_TIMEOUT).map_err(agent_error)? {
        Response::Status { pod_mtu, .. } => Ok(pod_mtu),
        other => {
            Err(CniError::new(ErrorCode::IoFailure, format!("unexpected answer from the agent: {other:?}")))
        }
    }
}

pub(crate) fn unexpected(other: Response) -> CniError {
    CniError::new(ErrorCode::IoFailure, format!("unexpected answer from the agent: {other:?}"))
}

/// Every endpoint the agent has a record of.
pub(crate) fn recorded_endpoints(conf: &NetConf) -> Result<Vec<EndpointSpec>, CniError> {
    match client::call(&conf.agent_socket(), &Request::ListEndpoints, AGENT_TIMEOUT).map_err(agent_error)? {
        Response::Endpoints { endpoints } => Ok(endpoints),
        other => Err(unexpected(other)),
    }
}

/// The agent's record for this host veth, if it has one.
pub(crate) fn recorded_endpoint(conf: &NetConf, host_name: &str) -> Result<Option<EndpointSpec>, CniError> {
    Ok(recorded_endpoints(conf)?.into_iter().find(|e| e.host_ifname == host_name))
}
