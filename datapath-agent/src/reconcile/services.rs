//! The Service planner: the desired Service ports from the config, and the
//! plan of map writes that brings the Service maps to them.
//!
//! Everything here is pure (no maps, no kernel) so that the ordering rules
//! can be tested: [`crate::reconcile::service_sync`] reads the maps, asks
//! [`plan_sync`] for the writes and carries them out in order.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use datapath_common::{
    Backend, BackendKey, IPPROTO_TCP, IPPROTO_UDP, SERVICE_AFFINITY_CLIENT_IP, SERVICE_DROP_WITHOUT_BACKEND,
    SERVICE_SCOPE_CLUSTER, SERVICE_SCOPE_OUTSIDE, Service, ServiceKey,
};

use crate::{
    bpf::SyncReport,
    model::{ServiceConfig, ServiceProtocol, SessionAffinity, TrafficPolicy},
};

/// Service ids start here: a zeroed entry (id 0) names no Service.
const FIRST_SERVICE_ID: u32 = 1;

/// The `SERVICES` key of cluster IP, port and protocol.
pub fn service_key(cluster_ip: Ipv4Addr, port: u16, protocol: u8) -> ServiceKey {
    ServiceKey { vip: cluster_ip.octets(), port: port.to_be_bytes(), protocol, scope: SERVICE_SCOPE_CLUSTER }
}

/// One Service port as the datapath serves it: one `SERVICES` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    /// Where clients connect: the cluster IP, or an external or load
    /// balancer address of the Service.
    pub address: Ipv4Addr,
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    pub session_affinity: SessionAffinity,
    pub affinity_timeout_seconds: u32,
    /// Backend pod address and target port, in the order the config lists them.
    pub backends: Vec<SocketAddrV4>,
    /// With no backend, drop new connections unanswered rather than refuse
    /// them (a Local traffic policy, backends only on other nodes).
    pub drop_without_backend: bool,
    /// Whose connections the entry serves: [`SERVICE_SCOPE_CLUSTER`], or
    /// [`SERVICE_SCOPE_OUTSIDE`] (an external or load balancer address
    /// reached from outside the cluster).
    pub scope: u8,
}

impl ServicePort {
    pub fn key(&self) -> ServiceKey {
        ServiceKey { scope: self.scope, ..service_key(self.address, self.port, self.protocol) }
    }

    /// The `Service` value with `id` and `backend_count` backends. Without
    /// ClientIP affinity the timeout means nothing and is stored as 0, so a
    /// change of it alone is no update.
    fn value(&self, id: u32, backend_count: u32) -> Service {
        let (mut flags, timeout) = match self.session_affinity {
            SessionAffinity::None => (0, 0),
            SessionAffinity::ClientIp => (SERVICE_AFFINITY_CLIENT_IP, self.affinity_timeout_seconds),
        };
        if self.drop_without_backend {
            flags |= SERVICE_DROP_WITHOUT_BACKEND;
        }
        Service { id, backend_count, flags, affinity_timeout_seconds: timeout }
    }

    /// Distinct backends in config order.
    fn datapath_backends(&self) -> Vec<Backend> {
        let mut seen = BTreeSet::new();
        self.backends.iter().map(|b| backend(*b)).filter(|b| seen.insert(*b)).collect()
    }
}

pub fn backend(address: SocketAddrV4) -> Backend {
    Backend { ipv4: address.ip().octets(), port: address.port().to_be_bytes(), _pad: [0; 2] }
}

pub fn backend_address(backend: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(backend.ipv4), u16::from_be_bytes(backend.port))
}

/// "TCP", "UDP" (Kubernetes spelling), or "other" for a protocol the
/// programs never track.
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "other",
    }
}

/// Which backends new connections of a Service go to, from this node:
/// the ready ones, or, while none is ready, the terminating ones that still
/// serve (kube-proxy's rule, applied separately to the cluster-wide and to
/// the node-local set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// For traffic that may go to any node's backend.
    pub cluster: Vec<Ipv4Addr>,
    /// Only backends on this node (those in `local_pods`).
    pub local: Vec<Ipv4Addr>,
}

impl BackendChoice {
    pub fn of(service: &ServiceConfig, local_pods: ipnet::Ipv4Net) -> Self {
        let usable = |only_local: bool| {
            let pick = |list: &[Ipv4Addr]| -> Vec<Ipv4Addr> {
                list.iter().copied().filter(|ip| !only_local || local_pods.contains(ip)).collect()
            };
            let ready = pick(&service.backends);
            if ready.is_empty() { pick(&service.terminating_backends) } else { ready }
        };
        BackendChoice { cluster: usable(false), local: usable(true) }
    }
}

pub use crate::model::ThisNode;

/// The Service ports `services` ask for, one per (address, port,
/// protocol, scope): on the cluster IP, its backends as
/// internalTrafficPolicy says; on an external or load balancer address,
/// for clients in the cluster any backend (kube-proxy short-circuits them
/// the same way whatever externalTrafficPolicy says), and for clients
/// outside ([`SERVICE_SCOPE_OUTSIDE`]) as externalTrafficPolicy says; at a
/// node port, on this node's address for clients outside (packets that
/// arrive at the uplink) as externalTrafficPolicy says, and on every
/// node's address (this one's and each of `peers`) for clients in the
/// cluster, pods and the node's own sockets, any backend (kube-proxy
/// short-circuits pod traffic to a node port to the cluster-wide set too).
/// Local: this node's backends (none here but some elsewhere: dropped, as
/// kube-proxy does); Cluster: any backend. Entries for clients outside
/// only if the node serves them (`serve_outside_clients`).
pub fn desired_services<'a>(
    services: impl IntoIterator<Item = &'a ServiceConfig>,
    node: ThisNode,
    peers: &[Ipv4Addr],
) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for service in services {
        let choice = BackendChoice::of(service, node.pod_cidr);
        // Backends elsewhere but none here: dropped, not refused.
        let local = |with_target: &dyn Fn(&[Ipv4Addr]) -> Vec<SocketAddrV4>| {
            (with_target(&choice.local), choice.local.is_empty() && !choice.cluster.is_empty())
        };
        for port in &service.ports {
            let protocol = match port.protocol {
                ServiceProtocol::Tcp => IPPROTO_TCP,
                ServiceProtocol::Udp => IPPROTO_UDP,
                // Refused by the config's validation: never reaches here.
                ServiceProtocol::Sctp => continue,
            };
            let with_target = |ips: &[Ipv4Addr]| -> Vec<SocketAddrV4> {
                ips.iter().map(|ip| SocketAddrV4::new(*ip, port.target_port())).collect()
            };
            let node_ports = port.node_port.into_iter().flat_map(|node_port| {
                std::iter::once((node.address, node_port, SERVICE_SCOPE_OUTSIDE)).chain(
                    std::iter::once(&node.address)
                        .chain(peers)
                        .map(move |address| (*address, node_port, SERVICE_SCOPE_CLUSTER)),
                )
            });
            let in_cluster = service.addresses().map(|address| (address, port.port, SERVICE_SCOPE_CLUSTER));
            let from_outside = service
                .external_ips
                .iter()
                .chain(&service.load_balancer_ips)
                .map(|address| (*address, port.port, SERVICE_SCOPE_OUTSIDE));
            let served = in_cluster.chain(node_ports).chain(from_outside);
            for (address, number, scope) in
                served.filter(|(_, _, scope)| node.serve_outside || *scope != SERVICE_SCOPE_OUTSIDE)
            {
                // An outside client with externalTrafficPolicy Local, or
                // the cluster IP with internalTrafficPolicy Local: this
                // node's backends. (With Cluster: any backend; the
                // programs reach another node's from the node's address.)
                let policy = if scope == SERVICE_SCOPE_OUTSIDE {
                    service.external_traffic_policy
                } else if address == service.cluster_ip {
                    service.internal_traffic_policy
                } else {
                    TrafficPolicy::Cluster
                };
                let only_local = policy == TrafficPolicy::Local;
                let (backends, drop_without_backend) =
                    if only_local { local(&with_target) } else { (with_target(&choice.cluster), false) };
                out.push(ServicePort {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    port_name: port.name.clone(),
                    address,
                    port: number,
                    protocol,
                    session_affinity: service.session_affinity,
                    affinity_timeout_seconds: service.session_affinity_timeout_seconds,
                    backends,
                    drop_without_backend,
                    scope,
                });
            }
        }
    }
    out
}

/// The backends each of `service`'s addresses and ports serves from
/// (ready or terminating but serving, on any node): a connection to any
/// other is stale once the agent knows it.
pub fn serving_backends(
    service: &ServiceConfig,
    node: ThisNode,
    peers: &[Ipv4Addr],
) -> BTreeMap<ServiceKey, BTreeSet<Backend>> {
    let mut out = BTreeMap::new();
    for port in served_ports(service) {
        for address in service.addresses() {
            out.insert(service_key(address, port.port, port.protocol), port.backends.clone());
        }
        if let Some(node_port) = port.node_port {
            for address in std::iter::once(&node.address).chain(peers) {
                out.insert(service_key(*address, node_port, port.protocol), port.backends.clone());
            }
        }
    }
    out
}

/// One port of a Service as the datapath serves it.
struct ServedPort {
    protocol: u8,
    port: u16,
    node_port: Option<u16>,
    /// Ready or terminating but serving, on any node.
    backends: BTreeSet<Backend>,
}

fn served_ports(service: &ServiceConfig) -> impl Iterator<Item = ServedPort> + '_ {
    service.ports.iter().filter_map(|port| {
        let protocol = match port.protocol {
            ServiceProtocol::Tcp => IPPROTO_TCP,
            ServiceProtocol::Udp => IPPROTO_UDP,
            // Refused by the config's validation: never programmed.
            ServiceProtocol::Sctp => return None,
        };
        let backends = service
            .backends
            .iter()
            .chain(&service.terminating_backends)
            .map(|ip| backend(SocketAddrV4::new(*ip, port.target_port())))
            .collect();
        Some(ServedPort { protocol, port: port.port, node_port: port.node_port, backends })
    })
}

/// Which backends serve each Service address and port, for every Service
/// at once (the connection collector's question: does a connection's
/// backend still serve what it asked for?). Node ports are kept once, not
/// once per node address as [`serving_backends`] lists them: its size
/// follows the Services, not the Services times the nodes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServingIndex {
    /// Cluster, external and load balancer addresses, by [`service_key`].
    pub by_address: HashMap<ServiceKey, BTreeSet<Backend>>,
    /// Node ports (port, protocol), served on every node's address.
    pub by_node_port: HashMap<(u16, u8), BTreeSet<Backend>>,
    /// This node's and the peers' addresses.
    pub nodes: HashSet<Ipv4Addr>,
}

impl ServingIndex {
    pub fn of<'a>(
        services: impl IntoIterator<Item = &'a ServiceConfig>,
        node: ThisNode,
        peers: &[Ipv4Addr],
    ) -> Self {
        let mut index = ServingIndex {
            nodes: std::iter::once(node.address).chain(peers.iter().copied()).collect(),
            ..Default::default()
        };
        for service in services {
            for port in served_ports(service) {
                // Two Services on one address and port (a config error the
                // source reports) serve from both: never judged stale wrongly.
                for address in service.addresses() {
                    let key = service_key(address, port.port, port.protocol);
                    index.by_address.entry(key).or_default().extend(port.backends.iter().copied());
                }
                if let Some(node_port) = port.node_port {
                    let backends = index.by_node_port.entry((node_port, port.protocol)).or_default();
                    backends.extend(port.backends.iter().copied());
                }
            }
        }
        index
    }

    /// Does `backend` serve `address:port` (`protocol`)?
    pub fn serves(&self, address: Ipv4Addr, port: u16, protocol: u8, backend: &Backend) -> bool {
        let at_address = self.by_address.get(&service_key(address, port, protocol));
        let at_node_port =
            self.nodes.contains(&address).then(|| self.by_node_port.get(&(port, protocol))).flatten();
        at_address.into_iter().chain(at_node_port).any(|backends| backends.contains(backend))
    }
}

/// Which connections a change of Services leaves stale: those of an old
/// Service port to a backend the new state no longer serves it from (the
/// backend left, or the port or Service is gone). Of these, the agent
/// forgets every UDP one: UDP has no end, so without this a client that
/// keeps sending keeps its dead backend forever (kube-proxy clears these
/// too). Of TCP ones only those that are over (reset, or a FIN each way):
/// a client reusing its port for a new connection gets a backend that
/// serves (netfilter makes a new choice on such a SYN; here the closed
/// connection's entry would keep the old backend: red team round 29,
/// R29-5). A live TCP connection is never cut: it ends by itself, and a
/// terminating backend still finishes it; once over, the collector's next
/// sweep forgets it ([`crate::reconcile::conntrack::departed`]).
pub fn stale_backends<'a>(
    changes: impl IntoIterator<Item = (Option<&'a ServiceConfig>, Option<&'a ServiceConfig>)>,
    node: ThisNode,
    peers: &[Ipv4Addr],
) -> BTreeMap<ServiceKey, BTreeSet<Backend>> {
    let mut old = BTreeMap::new();
    let mut new = BTreeMap::new();
    for (before, after) in changes {
        old.extend(before.map(|s| serving_backends(s, node, peers)).unwrap_or_default());
        new.extend(after.map(|s| serving_backends(s, node, peers)).unwrap_or_default());
    }
    let mut stale = BTreeMap::new();
    for (key, backends) in old {
        let kept = new.get(&key);
        let gone: BTreeSet<Backend> =
            backends.into_iter().filter(|b| !kept.is_some_and(|k| k.contains(b))).collect();
        if !gone.is_empty() {
            stale.insert(key, gone);
        }
    }
    stale
}

/// What the Service maps hold now, kept by the agent between syncs so that
/// a change costs its own writes, not a read of every map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProgrammedState {
    pub services: BTreeMap<ServiceKey, Service>,
    /// Every slot in `SERVICE_BACKENDS`, including any no Service reaches.
    pub backends: BTreeMap<BackendKey, Backend>,
    /// The ids `services` hold, and ids below the highest that none holds
    /// (a superset: it may also hold ids above): a new Service takes the
    /// lowest free id without a walk over every Service.
    ids: BTreeSet<u32>,
    free_ids: BTreeSet<u32>,
}

impl ProgrammedState {
    pub fn new(services: BTreeMap<ServiceKey, Service>, backends: BTreeMap<BackendKey, Backend>) -> Self {
        let ids: BTreeSet<u32> = services.values().map(|s| s.id).collect();
        let highest = ids.last().copied().unwrap_or(0);
        let free_ids = (FIRST_SERVICE_ID..highest).filter(|id| !ids.contains(id)).collect();
        ProgrammedState { services, backends, ids, free_ids }
    }

    /// The maps after one write of a plan (affinities aside).
    pub fn apply(&mut self, write: &MapWrite) {
        match write {
            MapWrite::PutBackend(k, v) => {
                self.backends.insert(*k, *v);
            }
            MapWrite::PutService(k, v) => {
                if let Some(old) = self.services.insert(*k, *v)
                    && old.id != v.id
                {
                    self.forget_id(old.id);
                }
                self.ids.insert(v.id);
                self.free_ids.remove(&v.id);
            }
            MapWrite::DeleteService(k) => {
                if let Some(old) = self.services.remove(k) {
                    self.forget_id(old.id);
                }
            }
            MapWrite::DeleteBackend(k) => {
                self.backends.remove(k);
            }
            MapWrite::ForgetAffinity { .. } => {}
        }
    }

    fn forget_id(&mut self, id: u32) {
        self.ids.remove(&id);
        self.free_ids.insert(id);
    }

    /// The slots `SERVICE_BACKENDS` holds for `id`, by slot.
    fn slots(&self, id: u32) -> BTreeMap<u32, Backend> {
        let range = BackendKey { service_id: id, slot: 0 }..=BackendKey { service_id: id, slot: u32::MAX };
        self.backends.range(range).map(|(k, v)| (k.slot, *v)).collect()
    }
}

/// One step of a Service sync, in the order it must happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapWrite {
    PutBackend(BackendKey, Backend),
    PutService(ServiceKey, Service),
    DeleteService(ServiceKey),
    DeleteBackend(BackendKey),
    /// Forget the ClientIP affinities of `service_id` that point at one of
    /// `backends`, or all of them when `None`.
    ForgetAffinity {
        service_id: u32,
        backends: Option<BTreeSet<Backend>>,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub writes: Vec<MapWrite>,
    pub report: SyncReport,
}

/// What a sync should make of some Service keys: `Some` the port to
/// serve, `None` nothing (removed).
pub type ServiceChanges<'a> = BTreeMap<ServiceKey, Option<&'a ServicePort>>;

/// The map writes that turn `current` into `desired` (the whole list),
/// ordered as [`plan_changes`] orders them; slots an interrupted sync left
/// under an id no Service holds are deleted too.
pub fn plan_sync(current: &ProgrammedState, desired: &[ServicePort]) -> ServicePlan {
    let mut changes: ServiceChanges = BTreeMap::new();
    for port in desired {
        changes.entry(port.key()).or_insert(Some(port));
    }
    for key in current.services.keys() {
        changes.entry(*key).or_insert(None);
    }
    let (mut plan, allocated) = plan_changes_allocating(current, &changes);
    // Slots of no Service (an agent stopped in the middle of a sync): no
    // packet can reach them.
    for key in current.backends.keys() {
        if !current.ids.contains(&key.service_id) && !allocated.contains(&key.service_id) {
            plan.writes.push(MapWrite::DeleteBackend(*key));
        }
    }
    plan
}

/// The map writes that make the Service keys in `changes` what they say,
/// leaving every other key alone: the cost is that of the change, not of
/// the number of Services. Ordered so that a packet looking up a Service
/// at any moment in between finds a count whose slots all hold a backend
/// that was or is wanted:
/// - a new or grown Service: slots first, then the Service entry;
/// - a shrunk one: slots that stay are rewritten first, then the count is
///   lowered, then the slots beyond it are deleted;
/// - a removed one: its Service entry first, then its slots;
/// - ClientIP affinities: forgotten for a Service that turns affinity on
///   (or is new with it) before its entry, and for backends a sticky
///   Service loses after its count; no other change walks the affinity map.
///
/// Kept backends keep their slots; a removed backend's slot goes to a new
/// backend or to one moved down from beyond the new count. Ids are stable:
/// a Service keeps its id, a new one gets the lowest id no current Service
/// holds (never one freed in the same sync: its slots may still be there).
pub fn plan_changes(current: &ProgrammedState, changes: &ServiceChanges) -> ServicePlan {
    plan_changes_allocating(current, changes).0
}

fn plan_changes_allocating(
    current: &ProgrammedState,
    changes: &ServiceChanges,
) -> (ServicePlan, BTreeSet<u32>) {
    let mut plan = ServicePlan::default();
    let mut allocated = BTreeSet::new();
    // Lowest first: ids no Service holds, then ones above all ever used.
    let mut free = current.free_ids.iter().copied();
    let mut fresh = current.ids.last().max(current.free_ids.last()).map_or(FIRST_SERVICE_ID, |id| id + 1);
    let mut allocate = || {
        free.next().unwrap_or_else(|| {
            fresh += 1;
            fresh - 1
        })
    };
    for (key, want) in changes.iter().filter_map(|(k, w)| w.map(|w| (k, w))) {
        let present = current.services.get(key);
        let id = match present {
            Some(service) => service.id,
            None => {
                let id = allocate();
                allocated.insert(id);
                id
            }
        };
        let before = plan.writes.len();
        plan_service(&mut plan.writes, *key, id, present, &current.slots(id), want);
        match present {
            None => plan.report.added += 1,
            Some(_) if plan.writes.len() > before => plan.report.updated += 1,
            Some(_) => {}
        }
    }
    for key in changes.iter().filter(|(_, w)| w.is_none()).map(|(k, _)| k) {
        let Some(service) = current.services.get(key) else { continue };
        plan.writes.push(MapWrite::DeleteService(*key));
        for slot in current.slots(service.id).into_keys() {
            plan.writes.push(MapWrite::DeleteBackend(BackendKey { service_id: service.id, slot }));
        }
        // Its affinities stay until the LRU drops them: harmless, as a
        // Service that takes the id with affinity forgets them first.
        plan.report.removed += 1;
    }
    (plan, allocated)
}

fn plan_service(
    writes: &mut Vec<MapWrite>,
    key: ServiceKey,
    id: u32,
    present: Option<&Service>,
    slots: &BTreeMap<u32, Backend>,
    want: &ServicePort,
) {
    let desired = want.datapath_backends();
    let wanted: BTreeSet<Backend> = desired.iter().copied().collect();
    let count = desired.len() as u32;
    let old_count = present.map_or(0, |s| s.backend_count);
    let old: Vec<Backend> = (0..old_count).filter_map(|slot| slots.get(&slot).copied()).collect();

    // Target layout: kept backends stay where they are (below the new
    // count); the others fill the holes in config order.
    let mut layout: Vec<Option<Backend>> = vec![None; desired.len()];
    let mut placed = BTreeSet::new();
    for slot in 0..old_count.min(count) {
        if let Some(b) = slots.get(&slot)
            && wanted.contains(b)
            && placed.insert(*b)
        {
            layout[slot as usize] = Some(*b);
        }
    }
    let mut rest = desired.iter().filter(|b| !placed.contains(*b));
    for hole in layout.iter_mut().filter(|s| s.is_none()) {
        *hole = rest.next().copied();
    }

    let value = want.value(id, count);
    let sticky = |s: &Service| s.flags & SERVICE_AFFINITY_CLIENT_IP != 0;
    // The programs read affinities only while the flag is on, so only a
    // Service that turns it on (or a new one with it) may meet entries
    // left under its id (a removed Service's, or its own from an earlier
    // spell): forget them before the flag is written. Everything else
    // needs no walk over the affinity map.
    if sticky(&value) && !present.is_some_and(sticky) {
        writes.push(MapWrite::ForgetAffinity { service_id: id, backends: None });
    }
    for (slot, backend) in layout.iter().enumerate() {
        let slot = slot as u32;
        if let Some(backend) = backend
            && slots.get(&slot) != Some(backend)
        {
            writes.push(MapWrite::PutBackend(BackendKey { service_id: id, slot }, *backend));
        }
    }
    if present != Some(&value) {
        writes.push(MapWrite::PutService(key, value));
    }
    for slot in slots.keys().filter(|slot| **slot >= count) {
        writes.push(MapWrite::DeleteBackend(BackendKey { service_id: id, slot: *slot }));
    }
    // A sticky Service's clients of a backend that left start afresh.
    if present.is_some_and(sticky) && sticky(&value) {
        let gone: BTreeSet<Backend> = old.iter().filter(|b| !wanted.contains(*b)).copied().collect();
        if !gone.is_empty() {
            writes.push(MapWrite::ForgetAffinity { service_id: id, backends: Some(gone) });
        }
    }
}

#[cfg(test)]
mod tests;
