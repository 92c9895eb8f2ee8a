//! `datapath-agent status`: one summary of the node's datapath, from the
//! agent (over its API socket: version, mode, source, readiness and why
//! not, failing watches, the last rejected config edit, the last minute's
//! drops, the last run of each reconciler and its result) and from the
//! pinned maps (fill levels). Exits 1 when the agent does not answer, is
//! not ready, or a reconciler's last run failed, so scripts and probes can
//! use it.

use std::{path::PathBuf, time::Duration};

use datapath_api::{Request, Response};
use datapath_common::{MAX_LOCAL_ENDPOINTS, MAX_REMOTE_NODES, MAX_SERVICES};

use crate::bpf::{PinLayout, PinnedMaps};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's configuration file (TOML): where its socket and pins are
    /// (default: the default paths).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How long the agent may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Print the summary; `Ok(false)` when the agent is not healthy (exit 1).
pub fn status(args: StatusArgs) -> anyhow::Result<bool> {
    let settings = super::agent_settings(args.config.as_deref())?;
    let answer = datapath_api::client::call(&settings.api_socket, &Request::Status, TIMEOUT);
    let maps = PinnedMaps::open(&PinLayout::new(&settings.bpffs_dir)).ok();
    let fill =
        |count: Option<usize>, capacity: u32| serde_json::json!({ "entries": count, "capacity": capacity });
    let map_fill = serde_json::json!({
        "endpoints": fill(maps.as_ref().and_then(|m| m.endpoints().ok()).map(|e| e.len()), MAX_LOCAL_ENDPOINTS),
        "remote_nodes": fill(maps.as_ref().and_then(|m| m.remote_routes().ok()).map(|r| r.len()), MAX_REMOTE_NODES),
        "services": fill(maps.as_ref().and_then(|m| m.service_count().ok()), MAX_SERVICES),
    });
    let (healthy, view) = match answer {
        Ok(Response::Status { node_name, pod_cidr, endpoints, pod_mtu, last_config_error, agent }) => {
            let Some(agent) = agent.map(|a| *a) else {
                anyhow::bail!(
                    "the agent at {} answers without the status details: a build older than this tool's",
                    settings.api_socket.display()
                );
            };
            // A reconciler whose last run failed leaves the datapath short
            // of what it should hold (it is retried): not healthy either.
            let failed: Vec<&str> =
                agent.reconciles.iter().filter(|r| r.error.is_some()).map(|r| r.what.as_str()).collect();
            let healthy = agent.not_ready.is_none() && failed.is_empty();
            let mut map_fill = map_fill;
            if let Some(capacity) = agent.conntrack_capacity {
                // Counted by the collector at its last sweep (walking the
                // map here would cost a syscall per entry).
                map_fill["conntrack"] =
                    serde_json::json!({ "entries": agent.conntrack_entries, "capacity": capacity });
            }
            (
                healthy,
                serde_json::json!({
                    "healthy": healthy,
                    "agent": agent.version,
                    "node": node_name,
                    "node_ip": agent.node_ip,
                    "pod_cidr": pod_cidr,
                    "pod_mtu": pod_mtu,
                    "mode": agent.mode,
                    "source": agent.source,
                    "ready": agent.not_ready.is_none(),
                    "not_ready": agent.not_ready,
                    "failing_watches": agent.failing_watches,
                    "endpoints": endpoints,
                    "peers": agent.peers,
                    "maps": map_fill,
                    "last_rejected_config_edit": last_config_error,
                    "recent_drops": agent.recent_drops,
                    "recent_seconds": agent.recent_seconds,
                    "last_conntrack_sweep_seconds_ago": agent.last_sweep_seconds_ago,
                    "last_conntrack_sweep_error": agent.last_sweep_error,
                    "agent_errors": agent.errors,
                    "reconciles": agent.reconciles,
                    "failed_reconciles": failed,
                }),
            )
        }
        Ok(other) => anyhow::bail!("the agent answered the status request with {other:?}"),
        Err(e) => (
            false,
            serde_json::json!({
                "healthy": false,
                "agent_error": format!("{:#}", anyhow::Error::from(e)),
                // The pinned datapath forwards without the agent.
                "datapath_pinned": maps.is_some(),
                "maps": map_fill,
            }),
        ),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", text(&view));
    }
    Ok(healthy)
}

/// The summary as text, one line per item.
fn text(view: &serde_json::Value) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| out.push_str(&format!("{key:<20} {value}\n"));
    let s = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    if let Some(error) = view.get("agent_error") {
        line("agent", format!("NOT ANSWERING: {}", s(error)));
        let pinned = view["datapath_pinned"].as_bool() == Some(true);
        line("datapath", if pinned { "pinned (forwarding without the agent)" } else { "not pinned" }.into());
    } else {
        line("agent", s(&view["agent"]));
        line(
            "status",
            match view["not_ready"].as_str() {
                None => "ready".into(),
                Some(why) => format!("NOT READY: {why}"),
            },
        );
        line(
            "node",
            format!("{} {} pod CIDR {}", s(&view["node"]), s(&view["node_ip"]), s(&view["pod_cidr"])),
        );
        line("mode", format!("{}, pod MTU {}", s(&view["mode"]), view["pod_mtu"]));
        let watches = view["failing_watches"].as_array().cloned().unwrap_or_default();
        let source = s(&view["source"]);
        if watches.is_empty() {
            line("source", if source == "kubernetes" { "kubernetes, watches ok".into() } else { source });
        } else {
            let failing: Vec<String> = watches.iter().map(s).collect();
            line("source", format!("{source}, FAILING: {}", failing.join("; ")));
        }
        for reconcile in view["reconciles"].as_array().into_iter().flatten() {
            let ago = reconcile["seconds_ago"].as_u64().unwrap_or(0);
            line(
                &format!("reconciled {}", s(&reconcile["what"])),
                match reconcile["error"].as_str() {
                    None => format!("{ago} s ago, ok"),
                    Some(error) => format!("{ago} s ago, FAILED (retried): {error}"),
                },
            );
        }
        line("endpoints", view["endpoints"].to_string());
        line("peers", view["peers"].to_string());
        if let Some(error) = view["last_rejected_config_edit"].as_str() {
            line("config", format!("LAST EDIT REJECTED: {error}"));
        }
        line(
            "conntrack sweep",
            match (
                view["last_conntrack_sweep_seconds_ago"].as_u64(),
                view["last_conntrack_sweep_error"].as_str(),
            ) {
                (None, _) => "none yet".into(),
                (Some(ago), None) => format!("{ago} s ago, ok"),
                (Some(ago), Some(error)) => format!("{ago} s ago, FAILED: {error}"),
            },
        );
        line(
            "agent errors",
            match view["agent_errors"].as_u64() {
                Some(0) => "none since start".into(),
                Some(n) => format!("{n} since start (failed reconciliations, refused requests: see the log)"),
                None => "?".into(),
            },
        );
        let drops = view["recent_drops"].as_object().cloned().unwrap_or_default();
        let listed: Vec<String> = drops.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        line(
            &format!("drops (last {} s)", view["recent_seconds"]),
            if listed.is_empty() { "none".into() } else { listed.join(", ") },
        );
    }
    for (map, fill) in view["maps"].as_object().into_iter().flatten() {
        let entries = fill["entries"].as_u64().map_or("?".into(), |n| n.to_string());
        line(&format!("map {map}"), format!("{entries} / {}", fill["capacity"]));
    }
    out
}
