//! CNI_NETNS, checked before anything is made in it.

use std::path::Path;

use datapath_api::netns;

use crate::{
    error::{CniError, ErrorCode},
    types::Env,
};

/// The pod's network namespace, CNI_NETNS: code 3 if it is not there (the
/// container is gone), code 4 if it is something else than a network
/// namespace (a file, a directory, a device, another kind of namespace) or
/// the plugin's own, the node's (the pod's default route would replace the
/// node's).
pub(crate) fn open(env: &Env) -> Result<std::fs::File, CniError> {
    let file = netns::open(Path::new(&env.netns)).map_err(|e| match &e {
        netns::NetnsError::NotNetwork { found, .. } => CniError::with_source(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_NETNS {} is not a network namespace but {found}; it must name one, e.g. /proc/<pid>/ns/net or a bind mount of it",
                env.netns
            ),
            &e,
        ),
        _ => CniError::with_source(
            ErrorCode::UnknownContainer,
            format!("network namespace {} cannot be opened", env.netns),
            &e,
        ),
    })?;
    let own = netns::is_current(&file).map_err(|e| {
        CniError::with_source(ErrorCode::IoFailure, "cannot compare CNI_NETNS with the node's namespace", &e)
    })?;
    if own {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_NETNS {} is the node's own network namespace (the plugin's), not a pod's; it must name the pod's network namespace",
                env.netns
            ),
        ));
    }
    Ok(file)
}
