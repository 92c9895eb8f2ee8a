//! Keeping the datapath in line with what the agent knows: endpoint
//! records restored, links retried, routes checked, gone interfaces swept,
//! peers and Services applied.

use std::collections::BTreeMap;

use anyhow::Context as _;
use datapath_api::EndpointSpec;

use crate::{
    agent::{Agent, PendingLink},
    bpf::{LinkFailure, LinkRetry, LocalEndpoint, SweepReport},
    host::node_net,
    model::{LocalPod, RemoteRoute, ServiceRef},
    source::{
        config::ServiceConfig,
        kubernetes_services::{self, ServiceUpdate},
    },
};

impl Agent {
    /// Records whose veth is gone (DEL happened while we were down) go too;
    /// the endpoints of the others get back what they lost with the pins
    /// ([`Self::check_live_endpoints`]).
    pub(super) fn reconcile_records(&mut self) -> anyhow::Result<RecordsReport> {
        let mut report = RecordsReport::default();
        for record in self.store.list()? {
            if !veth_alive(&record) {
                self.store.remove(&record.host_ifname)?;
                report.stale += 1;
            }
        }
        report.restored = self.check_live_endpoints();
        Ok(report)
    }

    /// Give each live endpoint (a record whose veth exists) back what ADD
    /// made and it lost (its map entries, its program link: pins removed
    /// or never shared into this container), with a log line each. One that
    /// cannot get them is logged, counted, keeps the node not ready and is
    /// tried again at the next check. Returns how many were restored.
    pub(super) fn check_live_endpoints(&mut self) -> usize {
        let records = match self.store.list() {
            Ok(records) => records,
            Err(e) => {
                self.errors.inc();
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(e)),
                    "reading the endpoint records failed"
                );
                return 0;
            }
        };
        let mut restored = 0;
        let mut unprogrammed = Vec::new();
        for record in records.iter().filter(|record| veth_alive(record)) {
            let pod = format!(
                "{}/{}",
                record.pod_namespace.as_deref().unwrap_or("-"),
                record.pod_name.as_deref().unwrap_or("-")
            );
            let endpoint = LocalEndpoint {
                pod_ipv4: record.pod_ipv4,
                pod_mac: record.pod_mac,
                host_ifname: record.host_ifname.clone(),
                host_ifindex: record.host_ifindex,
                host_mac: record.host_mac,
            };
            match self.datapath.restore_endpoint(&endpoint) {
                Ok(done) => {
                    if done.anything() {
                        restored += 1;
                        tracing::warn!(
                            pod,
                            ip = %record.pod_ipv4,
                            veth = record.host_ifname,
                            map_entries = done.entries,
                            program_link = done.link,
                            "endpoint restored from its record: its program link was missing (pin removed or \
                             bpffs lost?) or its map entries were"
                        );
                    }
                    if done.to_pod_link && !done.link {
                        // Expected once after an upgrade from a build without it.
                        tracing::info!(
                            pod,
                            veth = record.host_ifname,
                            "to_pod attached to this pod's veth (the pod was made by a build without it, or its \
                             link pin was removed)"
                        );
                    }
                    if let Some(other) = done.address_taken_by {
                        tracing::warn!(
                            pod,
                            ip = %record.pod_ipv4,
                            veth = record.host_ifname,
                            other_ifindex = other,
                            "this endpoint's address is delivered to another interface; leaving that one's entry"
                        );
                    }
                }
                Err(e) => {
                    self.errors.inc();
                    let pins = self.datapath.pins();
                    let attached = pins.link(&record.host_ifname).exists()
                        && pins.to_pod_link(&record.host_ifname).exists();
                    let what = if attached { "map entries missing" } else { "no program attached" };
                    let error = format!("{:#}", anyhow::Error::from(e));
                    tracing::error!(
                        pod,
                        ip = %record.pod_ipv4,
                        veth = record.host_ifname,
                        error,
                        "this live pod has {what} and restoring it failed: it cannot send or receive \
                         through the datapath; retrying"
                    );
                    unprogrammed.push(format!("pod {pod} (veth {}): {what}: {error}", record.host_ifname));
                }
            }
        }
        self.health.set_unprogrammed_pods(unprogrammed);
        restored
    }

    /// Put back the node routes of ours that someone else deleted (the
    /// peers are those the maps hold); never touch a route that is not ours.
    pub(super) async fn check_node_routes(&mut self, netlink: &rtnetlink::Handle) {
        let desired = match self.datapath.remote_routes() {
            Ok(desired) => desired,
            Err(e) => {
                self.errors.inc();
                tracing::error!(error = format!("{:#}", anyhow::Error::from(e)), "reading the peers failed");
                return;
            }
        };
        let check =
            match node_net::restore_missing_routes(netlink, &desired, self.route_via, self.config.node_ip)
                .await
            {
                Ok(check) => check,
                Err(e) => {
                    self.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "checking the node routes failed");
                    return;
                }
            };
        for route in &check.restored {
            tracing::warn!(
                pod_cidr = %route.pod_cidr,
                peer = %route.node_ip,
                "node route was missing or changed (by someone else?): put back"
            );
        }
        let taken: Vec<ipnet::Ipv4Net> = check.taken.iter().map(|route| route.pod_cidr).collect();
        for route in check.taken.iter().filter(|route| !self.routes_taken.contains(&route.pod_cidr)) {
            tracing::warn!(
                pod_cidr = %route.pod_cidr,
                peer = %route.node_ip,
                "a route to this peer's pods that is not ours holds the place of ours: leaving it (this \
                 node's own traffic to those pods follows it); remove it to get ours back"
            );
        }
        self.routes_taken = taken;
    }

    /// A live link whose switch to the loaded program failed: say why, count
    /// it, keep it (it forwards with the program it has) and retry later.
    pub(super) fn keep_failed_link(&mut self, failure: LinkFailure) {
        self.errors.inc();
        tracing::error!(
            ifname = failure.ifname,
            pin = %failure.pin.display(),
            error = format!("{:#}", anyhow::Error::from(failure.error)),
            "cannot switch this link to the loaded program; keeping it (it forwards with the program it \
             has) and retrying"
        );
        self.pending_links.push(PendingLink {
            program: failure.program,
            ifname: failure.ifname,
            pin: failure.pin,
        });
    }

    pub(super) fn retry_pending_links(&mut self) {
        for link in std::mem::take(&mut self.pending_links) {
            match self.datapath.retry_link(link.program, &link.ifname, &link.pin) {
                Ok(LinkRetry::Updated) => {
                    tracing::info!(ifname = link.ifname, "link switched to the loaded program on retry")
                }
                Ok(LinkRetry::StaleRemoved) => {
                    tracing::info!(ifname = link.ifname, "removing the link pin of a gone interface")
                }
                Ok(LinkRetry::Gone) => {}
                Err(error) => {
                    self.errors.inc();
                    tracing::warn!(
                        ifname = link.ifname,
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "switching this link to the loaded program failed again; keeping it"
                    );
                    self.pending_links.push(link);
                }
            }
        }
    }

    /// [`Datapath::sweep_gone_interfaces`], logged; a failure is counted and
    /// left for the next sweep (the entries only waste space meanwhile).
    pub(super) fn sweep_gone_interfaces(&mut self) {
        match self.datapath.sweep_gone_interfaces() {
            Ok(report) if report != SweepReport::default() => tracing::info!(
                interfaces = report.interfaces,
                endpoints = report.endpoints,
                "map entries of interfaces that no longer exist removed"
            ),
            Ok(_) => {}
            Err(e) => {
                self.errors.inc();
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(e)),
                    "sweeping entries of interfaces that no longer exist failed"
                );
            }
        }
    }

    /// Program maps and routes from the peer list: only what differs changes.
    pub(super) async fn apply_peers(&mut self, netlink: &rtnetlink::Handle) -> anyhow::Result<()> {
        let result = self.program_peers(netlink).await;
        self.reconciles.record("peers", &result);
        result
    }

    async fn program_peers(&mut self, netlink: &rtnetlink::Handle) -> anyhow::Result<()> {
        let desired: Vec<RemoteRoute> = self
            .config
            .peers
            .iter()
            .map(|p| RemoteRoute { pod_cidr: p.pod_cidr, node_ip: p.node_ip })
            .collect();
        let maps = self.datapath.sync_remote_nodes(&desired)?;
        let routes_removed =
            node_net::sync_routes(netlink, &desired, self.route_via, self.config.node_ip).await?;
        // Node ports on the peers' addresses, for pods and the node's sockets.
        // A failure is the Service sync's own (retried whole, logged there):
        // the peers are programmed either way.
        let peers = desired.iter().map(|r| r.node_ip).collect();
        if let Err(e) = self.services.set_peers(&mut self.datapath, peers) {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "node ports on the peers' addresses not programmed yet; retried with the next Service sync"
            );
        }
        tracing::info!(
            peers = desired.len(),
            added = maps.added,
            updated = maps.updated,
            removed = maps.removed,
            routes_removed,
            "peer nodes programmed"
        );
        Ok(())
    }

    /// Serve the health check node ports of the Services the agent holds
    /// (also after a failed map sync: they report the Services as given).
    fn sync_service_health(&mut self) {
        let node = crate::reconcile::services::ThisNode {
            pod_cidr: self.config.pod_cidr,
            address: self.config.node_ip,
            serve_outside: self.config.serve_outside_clients,
        };
        let wanted = crate::observe::service_health::health_checks(self.services.services(), node);
        self.service_health.sync(&wanted);
    }

    /// Serve exactly the Services in `list` (only what differs is written).
    pub(super) fn apply_services(&mut self, list: Vec<ServiceConfig>) -> anyhow::Result<()> {
        let count = list.len();
        let report = self.services.replace_all(&mut self.datapath, list).map_err(anyhow::Error::from);
        self.sync_service_health();
        self.reconciles.record("services", &report);
        let report = report?;
        tracing::info!(
            services = count,
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            "Services programmed"
        );
        Ok(())
    }

    /// Apply what the Kubernetes watch sent, in order, as one sync: a whole
    /// list (a first sync or a relist) replaces everything, single changes
    /// touch only their own Service. Services not backed by pods only are
    /// left to kube-proxy ([`kubernetes_services::is_pod_backed`]).
    pub(super) fn apply_service_updates(&mut self, updates: Vec<ServiceUpdate>) -> anyhow::Result<()> {
        let cluster_cidr = self.config.cluster_cidr;
        let reserved = [self.config.vxlan.port];
        let ours = |c: Option<ServiceConfig>| {
            c.filter(|c| kubernetes_services::is_pod_backed(c, cluster_cidr))
                .map(|c| kubernetes_services::without_reserved_node_ports(c, &reserved))
        };
        let mut all: Option<BTreeMap<ServiceRef, ServiceConfig>> = None;
        let mut changed = BTreeMap::new();
        for update in updates {
            match update {
                ServiceUpdate::All(list) => {
                    all = Some(list.into_iter().map(|s| (ServiceRef::of(&s), s)).collect());
                    changed.clear();
                }
                ServiceUpdate::One(service, config) => {
                    changed.insert(service, ours(config.map(|c| *c)));
                }
            }
        }
        let Some(mut all) = all else {
            let report = self.services.change(&mut self.datapath, changed).map_err(anyhow::Error::from);
            self.sync_service_health();
            self.reconciles.record("services", &report);
            let report = report?;
            tracing::debug!(
                added = report.added,
                updated = report.updated,
                removed = report.removed,
                "Service change programmed"
            );
            return Ok(());
        };
        for (service, config) in changed {
            match config {
                Some(config) => all.insert(service, config),
                None => all.remove(&service),
            };
        }
        self.apply_services(all.into_values().filter_map(|c| ours(Some(c))).collect())
    }
}

/// What [`Agent::reconcile_records`] did.
#[derive(Debug, Default)]
pub(super) struct RecordsReport {
    /// Records whose veth is gone, removed.
    pub(super) stale: usize,
    /// Live endpoints that got back map entries or a link.
    pub(super) restored: usize,
}

/// The record's veth exists, with the recorded index.
pub(super) fn veth_alive(record: &EndpointSpec) -> bool {
    nix::net::if_::if_nametoindex(record.host_ifname.as_str()).ok() == Some(record.host_ifindex)
}

impl Agent {
    /// This node's pods as policy knows them (from the CNI records).
    fn local_pods(&self) -> anyhow::Result<Vec<LocalPod>> {
        Ok(self
            .store
            .list()
            .context("reading the endpoint records")?
            .into_iter()
            .map(|spec| LocalPod {
                ipv4: spec.pod_ipv4,
                namespace: spec.pod_namespace.unwrap_or_else(|| "default".into()),
                name: spec.pod_name.unwrap_or(spec.container_id),
            })
            .collect())
    }

    /// Bring the policy maps to the current objects and pods. A failure
    /// is logged and counted, and retried at the next link check.
    pub(super) fn sync_policy(&mut self) {
        self.sync_policy_with(None);
    }

    /// [`Self::sync_policy`], counting `adding` among this node's pods (a
    /// pod being added: isolated before it can be reached).
    pub(super) fn sync_policy_with(&mut self, adding: Option<LocalPod>) {
        let result = self.local_pods().and_then(|mut local| {
            if let Some(pod) = adding {
                local.retain(|p| p.ipv4 != pod.ipv4);
                local.push(pod);
            }
            Ok(self.policy.sync(&mut self.datapath, &local)?)
        });
        if !matches!(result, Ok(None)) {
            self.reconciles.record("policy", &result);
        }
        match result {
            Ok(Some(report)) => {
                self.policy_failed = false;
                if report.written + report.removed > 0 {
                    tracing::info!(
                        written = report.written,
                        removed = report.removed,
                        "NetworkPolicy programmed"
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.policy_failed = true;
                self.errors.inc();
                tracing::error!(
                    error = format!("{e:#}"),
                    "programming NetworkPolicy failed; retried in a moment"
                );
            }
        }
    }
}
