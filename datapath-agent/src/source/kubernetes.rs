//! The Kubernetes source: this node's facts from its Node object, and the
//! peer list from all Node objects, watched with `kube`'s watcher and
//! reflector. A relist, a reconnect or an API error never reaches the maps as
//! a change: the peer list is recomputed from the reflector's store, which
//! keeps the last known state, and applied by diff.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::watch;

use crate::{
    model::RemoteRoute,
    observe::health::Health,
    source::config::{KubernetesConfig, NodeIdentity, PeerConfig},
};

/// What a Node object says, as far as the datapath cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    /// The IPv4 one of spec.podCIDRs (or spec.podCIDR); dual-stack nodes
    /// also have an IPv6 one, which this datapath does not route yet.
    pub pod_cidr: Option<Ipv4Net>,
    /// The first IPv4 InternalIP in status.addresses.
    pub internal_ip: Option<Ipv4Addr>,
}

pub fn facts(node: &Node) -> NodeFacts {
    let spec = node.spec.as_ref();
    let cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .filter(|c| !c.is_empty())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default();
    let pod_cidr = cidrs.iter().find_map(|c| c.parse::<Ipv4Net>().ok()).map(|c| c.trunc());
    let internal_ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
    NodeFacts { name: node.metadata.name.clone().unwrap_or_default(), pod_cidr, internal_ip }
}

/// The peers to program: every other node with an IPv4 pod CIDR inside the
/// cluster CIDR and an IPv4 InternalIP. A node without them yet (podCIDR not
/// allocated, addresses not reported) is skipped until an update brings them.
/// Of nodes whose CIDRs overlap (or who share an address), the one already
/// routed (named in `routed`) keeps its place and the newcomer is refused,
/// loudly: a new Node object must not break traffic to a working node.
/// Between newcomers alone, the name decides.
pub fn peers_from<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    self_name: &str,
    own_pod_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
    routed: &BTreeSet<String>,
) -> Vec<PeerConfig> {
    let mut all: Vec<NodeFacts> = nodes.into_iter().map(facts).collect();
    all.sort_by(|a, b| (!routed.contains(&a.name), &a.name).cmp(&(!routed.contains(&b.name), &b.name)));
    let mut peers: Vec<PeerConfig> = Vec::new();
    for node in all.into_iter().filter(|n| n.name != self_name) {
        let (Some(pod_cidr), Some(node_ip)) = (node.pod_cidr, node.internal_ip) else {
            tracing::debug!(node = node.name, "node has no IPv4 pod CIDR or InternalIP yet");
            continue;
        };
        let overlaps = |other: Ipv4Net| other.contains(&pod_cidr) || pod_cidr.contains(&other);
        if !cluster_cidr.contains(&pod_cidr) {
            tracing::warn!(node = node.name, %pod_cidr, %cluster_cidr, "pod CIDR outside the cluster CIDR; not routed");
        } else if overlaps(own_pod_cidr) {
            tracing::warn!(node = node.name, %pod_cidr, "pod CIDR overlaps this node's own; not routed");
        } else if let Some(holder) = peers.iter().find(|p| overlaps(p.pod_cidr) || p.node_ip == node_ip) {
            tracing::warn!(
                node = node.name,
                %pod_cidr,
                %node_ip,
                routed_node = holder.name,
                routed_pod_cidr = %holder.pod_cidr,
                routed_node_ip = %holder.node_ip,
                "pod CIDR or address clashes with a node already routed; this one is not routed"
            );
        } else {
            peers.push(PeerConfig { name: node.name, node_ip, pod_cidr });
        }
    }
    peers
}

pub async fn client(config: &KubernetesConfig) -> anyhow::Result<Client> {
    let config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no in-cluster config and no kubeconfig")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// This node's facts, waiting (and saying so) until the Node object has a pod
/// CIDR and an InternalIP: a new node gets its CIDR from the controller
/// manager shortly after it registers.
pub async fn own_identity(client: &Client, node_name: &str) -> anyhow::Result<NodeIdentity> {
    let api: Api<Node> = Api::all(client.clone());
    let mut delay = Duration::from_millis(200);
    loop {
        match api.get(node_name).await {
            Ok(node) => {
                let f = facts(&node);
                if let (Some(pod_cidr), Some(node_ip)) = (f.pod_cidr, f.internal_ip) {
                    return Ok(NodeIdentity { node_name: node_name.to_owned(), pod_cidr, node_ip });
                }
                tracing::info!(node = node_name, "waiting for the Node's IPv4 pod CIDR and InternalIP");
            }
            Err(e) => tracing::warn!(node = node_name, error = %e, "cannot read this node's Node object yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Watch all Nodes; send the peer list each time it may have changed, from
/// the first complete list on (`None` until then: what is pinned stays
/// programmed meanwhile). The receiver applies changes by diff, so an
/// unchanged list costs nothing. `programmed` is what the maps route now
/// (left by the previous agent): of clashing nodes, those keep their place.
pub fn watch_peers(
    client: Client,
    self_name: String,
    own_pod_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
    programmed: Vec<RemoteRoute>,
    health: Arc<Health>,
) -> watch::Receiver<Option<Vec<PeerConfig>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let api: Api<Node> = Api::all(client);
        let (store, writer) = reflector::store();
        let mut events = reflector(writer, watcher(api, watcher::Config::default()))
            .backoff(WatchBackoff::new("Node", Arc::clone(&health)))
            .boxed();
        let mut synced = false;
        // Names of the nodes routed now; known by route only until the
        // first list names them.
        let mut routed: Option<BTreeSet<String>> = None;
        while let Some(event) = events.next().await {
            match &event {
                Ok(_) => health.watch_ok("Node"),
                Err(e) => health.watch_failed("Node", e),
            }
            match event {
                Ok(watcher::Event::InitDone) => synced = true,
                // Mid-relist states are partial: wait for InitDone.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {}
                Err(e) => {
                    // The store keeps the last known nodes; the backoff retries.
                    tracing::warn!(error = %e, "Node watch failed; keeping the current peers and retrying");
                    continue;
                }
            }
            if synced {
                let nodes = store.state();
                let routed = routed.get_or_insert_with(|| {
                    nodes
                        .iter()
                        .map(|n| facts(n))
                        .filter(|f| {
                            programmed
                                .iter()
                                .any(|r| Some(r.pod_cidr) == f.pod_cidr && Some(r.node_ip) == f.internal_ip)
                        })
                        .map(|f| f.name)
                        .collect()
                });
                let peers = peers_from(
                    nodes.iter().map(|n| n.as_ref()),
                    &self_name,
                    own_pod_cidr,
                    cluster_cidr,
                    routed,
                );
                *routed = peers.iter().map(|p| p.name.clone()).collect();
                tx.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&peers);
                    *current = Some(peers);
                    changed
                });
            }
        }
    });
    rx
}

/// The condition this node's Node gets once the datapath is ready:
/// `NetworkUnavailable` False, as flannel and Cilium set it. A cloud's
/// route controller (or a node registered with it) sets it True until a
/// CNI says otherwise; the scheduler keeps pods off such a node.
pub fn network_available_condition(now: k8s_openapi::jiff::Timestamp) -> serde_json::Value {
    use k8s_openapi::{api::core::v1::NodeCondition, apimachinery::pkg::apis::meta::v1::Time};
    let condition = NodeCondition {
        type_: "NetworkUnavailable".to_owned(),
        status: "False".to_owned(),
        reason: Some("DatapathIsUp".to_owned()),
        message: Some("the eBPF datapath agent programs this node's pod network".to_owned()),
        last_transition_time: Some(Time(now)),
        last_heartbeat_time: Some(Time(now)),
    };
    serde_json::json!({ "status": { "conditions": [condition] } })
}

/// Clear this node's `NetworkUnavailable` condition
/// ([`network_available_condition`]), in the background, retrying with a
/// backoff until the API server takes it (a strategic merge patch of
/// nodes/status: the other conditions, the kubelet's, stay as they are).
/// RBAC: `patch` on `nodes/status`.
pub fn spawn_clear_network_unavailable(client: Client, node_name: String) {
    tokio::spawn(async move {
        let api: Api<Node> = Api::all(client);
        let mut delay = Duration::from_millis(500);
        loop {
            let patch = network_available_condition(k8s_openapi::jiff::Timestamp::now());
            match api
                .patch_status(
                    &node_name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Strategic(patch),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(node = node_name, "Node condition NetworkUnavailable set to False");
                    return;
                }
                Err(e) => {
                    let forbidden = matches!(&e, kube::Error::Api(status) if status.code == 403);
                    tracing::warn!(
                        node = node_name,
                        error = %e,
                        retry_in = ?delay,
                        hint = if forbidden { "the agent's ClusterRole needs patch on nodes/status" } else { "" },
                        "cannot set the Node condition NetworkUnavailable to False yet"
                    );
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    });
}

/// kube's default watch backoff, telling `health` each retry's delay (the
/// readiness check needs it to know when a failing watch has recovered).
pub struct WatchBackoff {
    inner: watcher::DefaultBackoff,
    watch: &'static str,
    health: Arc<Health>,
}

impl WatchBackoff {
    pub fn new(watch: &'static str, health: Arc<Health>) -> Self {
        Self { inner: watcher::DefaultBackoff::default(), watch, health }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.inner.next();
        if let Some(delay) = delay {
            self.health.watch_retry_scheduled(self.watch, delay);
        }
        delay
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    /// A Node as the API server serves it (trimmed of fields we ignore).
    fn served(name: &str, cidrs: &[&str], addresses: &[(&str, &str)]) -> Node {
        node(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "uid": format!("uid-{name}"), "resourceVersion": "100" },
            "spec": { "podCIDR": cidrs.first(), "podCIDRs": cidrs },
            "status": { "addresses": addresses.iter().map(|(t, a)| serde_json::json!({"type": t, "address": a})).collect::<Vec<_>>() },
        }))
    }

    #[test]
    fn the_network_available_condition_is_a_strategic_patch_of_one_condition() {
        let now: k8s_openapi::jiff::Timestamp = "2026-12-07T09:00:00Z".parse().unwrap();
        let patch = network_available_condition(now);
        assert_eq!(
            patch,
            serde_json::json!({ "status": { "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "DatapathIsUp",
                "message": "the eBPF datapath agent programs this node's pod network",
                "lastTransitionTime": "2026-12-07T09:00:00Z",
                "lastHeartbeatTime": "2026-12-07T09:00:00Z",
            }] } })
        );
    }

    #[test]
    fn reads_pod_cidr_and_internal_ip() {
        let n = served("a", &["10.244.1.0/24"], &[("Hostname", "a"), ("InternalIP", "192.168.1.10")]);
        assert_eq!(
            facts(&n),
            NodeFacts {
                name: "a".into(),
                pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
                internal_ip: Some("192.168.1.10".parse().unwrap())
            }
        );
    }

    #[test]
    fn dual_stack_takes_the_ipv4_ones() {
        let n = served(
            "a",
            &["fd00:10:244:1::/64", "10.244.1.0/24"],
            &[("InternalIP", "fd00::10"), ("InternalIP", "192.168.1.10"), ("ExternalIP", "203.0.113.5")],
        );
        let f = facts(&n);
        assert_eq!(f.pod_cidr, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(f.internal_ip, Some("192.168.1.10".parse().unwrap()));
    }

    #[test]
    fn only_the_old_single_pod_cidr_field() {
        let n = node(serde_json::json!({
            "metadata": { "name": "old" },
            "spec": { "podCIDR": "10.244.9.0/24" },
            "status": { "addresses": [{ "type": "InternalIP", "address": "192.168.1.19" }] },
        }));
        assert_eq!(facts(&n).pod_cidr, Some("10.244.9.0/24".parse().unwrap()));
    }

    #[test]
    fn peers_skip_self_incomplete_outside_and_clashing_nodes() {
        let nodes = [
            served("self", &["10.244.1.0/24"], &[("InternalIP", "192.168.1.10")]),
            served("b", &["10.244.2.0/24"], &[("InternalIP", "192.168.1.11")]),
            served("no-cidr", &[], &[("InternalIP", "192.168.1.12")]),
            served("no-ip", &["10.244.4.0/24"], &[("Hostname", "no-ip"), ("ExternalIP", "203.0.113.9")]),
            served("outside", &["10.99.0.0/24"], &[("InternalIP", "192.168.1.14")]),
            served("clash", &["10.244.2.0/25"], &[("InternalIP", "192.168.1.15")]),
            served("mine", &["10.244.1.0/24"], &[("InternalIP", "192.168.1.16")]),
            served("c", &["10.244.3.0/24"], &[("InternalIP", "192.168.1.13")]),
        ];
        let peers = peers_from(
            &nodes,
            "self",
            "10.244.1.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
            &BTreeSet::new(),
        );
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["b", "c"]);
        assert_eq!(peers[0].node_ip, "192.168.1.11".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn of_clashing_nodes_the_routed_one_stays() {
        let nodes = [
            served("b", &["10.244.2.0/24"], &[("InternalIP", "192.168.1.11")]),
            // Sorts before b, same CIDR: a newcomer, refused.
            served("a-new", &["10.244.2.0/24"], &[("InternalIP", "192.168.1.21")]),
            // Another newcomer with b's address.
            served("a-same-ip", &["10.244.5.0/24"], &[("InternalIP", "192.168.1.11")]),
        ];
        let (own, cluster) = ("10.244.1.0/24".parse().unwrap(), "10.244.0.0/16".parse().unwrap());
        let routed: BTreeSet<String> = ["b".to_owned()].into();
        let peers = peers_from(&nodes, "self", own, cluster, &routed);
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["b"]);
        // Between newcomers alone, the name decides: b clashes with both.
        let peers = peers_from(&nodes, "self", own, cluster, &BTreeSet::new());
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["a-new", "a-same-ip"]);
    }
}
