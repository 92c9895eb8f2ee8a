//! `datapath-agent cleanup`: remove from this node what the agent made, and
//! nothing else, after the agent has stopped (an uninstall): the CNI config
//! it wrote (only if it names our plugin) and the installed plugin, the
//! pinned programs, maps and links (removing the pins detaches the
//! programs from the pods' veths and the uplink), the node's routes of
//! protocol 217, the masquerade table, the VXLAN device, the state
//! directory and the API socket. Pods' veths stay: they belong to the pods,
//! which need a new network either way. Idempotent: what is gone already
//! is skipped. Refused while an agent holds the node's locks, unless
//! `--force` (which removes the datapath from under a running agent).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{RouteMessageBuilder, packet_route::route::RouteProtocol};

use crate::{
    host::{
        masquerade,
        node_lock::{NetnsLock, NodeLock, NodeLockError},
        node_net::{self, ROUTE_PROTOCOL},
    },
    source::config::{SourceSettings, VxlanConfig},
};

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The agent's configuration file (TOML): where it pinned and wrote.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Where the DaemonSet's init container installed the CNI plugin.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Clean up even while an agent holds this node (it loses its datapath).
    #[arg(long)]
    pub force: bool,
}

/// What the agent makes, from its config file (other keys are ignored, so
/// a file this build cannot fully resolve still names its paths).
#[derive(Debug, serde::Deserialize)]
struct Owned {
    #[serde(flatten)]
    settings: SourceSettings,
    #[serde(default)]
    cni_config_file: Option<PathBuf>,
    #[serde(default)]
    vxlan: VxlanConfig,
}

pub async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the agent's config {}", args.config.display()))?;
    // A file with a syntax error (an edit the agent rejected and ran on
    // without) is read line by line: the uninstall must not stop there.
    let owned: Owned = toml::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(
            config = %args.config.display(),
            error = e.message(),
            "the agent's config does not parse; its paths read line by line"
        );
        super::line_by_line(&text)
    });
    let settings = &owned.settings;
    // (Taking the locks makes these directories if they are gone.)
    let existed = (settings.bpffs_dir.exists(), settings.state_dir.exists());
    // Held for the whole cleanup: no agent starts meanwhile.
    let _locks = match (NetnsLock::acquire(), NodeLock::acquire(&settings.bpffs_dir, &settings.state_dir)) {
        (Ok(netns), Ok(node)) => Some((netns, node)),
        (Err(e @ (NodeLockError::Held { .. } | NodeLockError::NetnsHeld { .. })), _)
        | (_, Err(e @ (NodeLockError::Held { .. } | NodeLockError::NetnsHeld { .. })))
            if !args.force =>
        {
            return Err(anyhow::Error::new(e)
                .context("refusing to clean up under a running agent: stop it first (or --force)"));
        }
        (Err(e), _) | (_, Err(e)) if !args.force => return Err(e.into()),
        (netns, node) => {
            tracing::warn!(
                netns = netns.err().map(|e| e.to_string()),
                node = node.err().map(|e| e.to_string()),
                "--force: cleaning up without the node's locks"
            );
            None
        }
    };
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    let mut step = |what: String, result: anyhow::Result<bool>| match result {
        Ok(true) => removed.push(what),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(what, error = format!("{e:#}"), "cleanup step failed");
            failed.push(what);
        }
    };
    // The runtime's way in first: no new pod is handed to a half-removed datapath.
    if let Some(path) = &owned.cni_config_file {
        step(format!("CNI config {}", path.display()), remove_our_cni_config(path));
    }
    let plugin = args.cni_bin_dir.join("datapath-cni");
    step(format!("CNI plugin {}", plugin.display()), remove_file(&plugin));
    let pins = remove_owned(&settings.bpffs_dir, &crate::bpf::PinLayout::new(&settings.bpffs_dir).owned())
        .map(|gone| gone && existed.0);
    step(format!("pinned datapath {}", settings.bpffs_dir.display()), pins);
    let (connection, netlink, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    step(format!("routes of protocol {ROUTE_PROTOCOL}"), remove_our_routes(&netlink).await.map(|n| n > 0));
    step(format!("nftables table ip {}", masquerade::TABLE), masquerade::remove_if_present());
    step(
        format!("VXLAN device {}", owned.vxlan.device),
        node_net::remove_vxlan_if_present(&netlink, &owned.vxlan.device).await,
    );
    let state_owned = [
        crate::host::state::endpoints_dir(&settings.state_dir),
        crate::reconcile::service_names::names_dir(&settings.state_dir),
        settings.state_dir.join(crate::host::node_lock::STATE_LOCK_FILE),
    ];
    let state = remove_owned(&settings.state_dir, &state_owned).map(|gone| gone && existed.1);
    step(format!("state {}", settings.state_dir.display()), state);
    step(format!("API socket {}", settings.api_socket.display()), remove_file(&settings.api_socket));
    for what in &removed {
        println!("removed {what}");
    }
    if removed.is_empty() {
        println!("nothing of the datapath left on this node");
    }
    anyhow::ensure!(
        failed.is_empty(),
        "cleanup incomplete: {} failed (see above); run it again",
        failed.join(", ")
    );
    Ok(())
}

fn remove_file(path: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

fn remove_dir(path: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// What the agent made under `dir` (`owned`, directories or files), then
/// `dir` itself if that leaves it empty: anything else there (another
/// tool's pins, an operator's file; `bpffs_dir` set to the bpffs root) is
/// left, and said so. `Ok(true)`: something was removed.
fn remove_owned(dir: &Path, owned: &[PathBuf]) -> anyhow::Result<bool> {
    let mut removed = false;
    for path in owned {
        removed |= match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => remove_dir(path)?,
            Ok(_) => remove_file(path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
        };
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(removed),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            let others: Vec<String> = std::fs::read_dir(dir)
                .map(|entries| {
                    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
                })
                .unwrap_or_default();
            tracing::warn!(
                dir = %dir.display(),
                left = ?others,
                "not made by the agent: left in place, and the directory with it"
            );
            Ok(removed)
        }
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// The CNI config at `path`, if it is ours (its plugin is `datapath-cni`):
/// another CNI's file at that path is left alone, and said so.
fn remove_our_cni_config(path: &Path) -> anyhow::Result<bool> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let ours = serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|conf| {
        conf["plugins"].as_array().is_some_and(|plugins| plugins.iter().any(|p| p["type"] == "datapath-cni"))
    });
    if !ours {
        tracing::warn!(file = %path.display(), "not removed: this CNI config does not name datapath-cni");
        return Ok(false);
    }
    remove_file(path)
}

/// Every route of our protocol (217): the routes to peers' pod CIDRs.
/// (The pods' own /32 routes go with their veths.) Returns how many.
async fn remove_our_routes(netlink: &rtnetlink::Handle) -> anyhow::Result<usize> {
    let mut ours = Vec::new();
    let mut routes = netlink.route().get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()).execute();
    while let Some(msg) = routes.try_next().await.context("listing routes")? {
        if msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
            ours.push(msg);
        }
    }
    let count = ours.len();
    for msg in ours {
        netlink.route().del(msg).execute().await.context("removing a route of ours")?;
    }
    Ok(count)
}
