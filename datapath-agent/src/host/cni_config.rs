//! The CNI config the runtime reads (a conflist naming the plugin and this
//! agent's socket), written when the agent becomes ready.

use std::path::Path;

use anyhow::Context as _;
use ipnet::Ipv4Net;

/// Write the conflist at `path` atomically (temp file + rename).
pub fn write_conflist(path: &Path, api_socket: &Path, pod_cidr: Ipv4Net) -> anyhow::Result<()> {
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "datapath",
        "plugins": [{
            "type": "datapath-cni",
            "agentSocket": api_socket,
            "ipam": { "type": "host-local", "ranges": [[{ "subnet": pod_cidr.to_string() }]] },
        }],
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&conflist)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
    tracing::info!(file = %path.display(), "CNI config written");
    Ok(())
}
