//! STATUS: ready when the agent answers, code 50 otherwise.

use crate::{
    agent::agent_status,
    error::{CniError, ErrorCode},
    types::NetConf,
};

pub(crate) fn status(conf: &NetConf) -> Result<(), CniError> {
    agent_status(conf)
        .map(|_mtu| ())
        .map_err(|e| CniError { code: ErrorCode::PluginNotAvailable as u32, ..e })
}
