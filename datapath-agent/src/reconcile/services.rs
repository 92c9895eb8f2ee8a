//! ClusterIP Services on the agent side: the desired state from the config,
//! the plan of map writes that brings the Service maps to it, the view of
//! the connection-tracking map as connections, the rule by which its
//! garbage collector expires them, and the names file that lets `inspect
//! services` name Services while the agent is down.
//!
//! Everything here is pure (no maps, no kernel) so that the ordering rules
//! can be tested: `datapath.rs` reads the maps, asks [`plan_sync`] for the
//! writes and carries them out in order.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use datapath_common::{
    Backend, BackendKey, CT_CLOSING, CT_FORWARD, CT_HAIRPIN, ConntrackEntry, ConntrackKey, IPPROTO_TCP,
    IPPROTO_UDP, SERVICE_AFFINITY_CLIENT_IP, Service, ServiceKey,
};

use crate::{
    bpf::datapath::SyncReport,
    source::config::{AgentConfig, ServiceConfig, ServiceProtocol, SessionAffinity},
};

/// Service ids start here: a zeroed entry (id 0) names no Service.
const FIRST_SERVICE_ID: u32 = 1;
/// The programs refresh `last_seen_ns` at most once a second (one write per
/// connection per second, not per packet), so the last packet may be up to
/// this much younger than the entry says. The collector waits that much
/// longer, so that it never removes a connection that is within its limit.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
const NS_PER_SECOND: u64 = 1_000_000_000;

/// The `SERVICES` key of cluster IP, port and protocol.
pub fn service_key(cluster_ip: Ipv4Addr, port: u16, protocol: u8) -> ServiceKey {
    ServiceKey { vip: cluster_ip.octets(), port: port.to_be_bytes(), protocol, _pad: 0 }
}

/// One Service port as the datapath serves it: one `SERVICES` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    pub session_affinity: SessionAffinity,
    pub affinity_timeout_seconds: u32,
    /// Backend pod address and target port, in the order the config lists them.
    pub backends: Vec<SocketAddrV4>,
}

impl ServicePort {
    pub fn key(&self) -> ServiceKey {
        service_key(self.cluster_ip, self.port, self.protocol)
    }

    /// The `Service` value with `id` and `backend_count` backends. Without
    /// ClientIP affinity the timeout means nothing and is stored as 0, so a
    /// change of it alone is no update.
    fn value(&self, id: u32, backend_count: u32) -> Service {
        let (flags, timeout) = match self.session_affinity {
            SessionAffinity::None => (0, 0),
            SessionAffinity::ClientIp => (SERVICE_AFFINITY_CLIENT_IP, self.affinity_timeout_seconds),
        };
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

/// The Service ports `services` ask for, one per (cluster IP, port, protocol).
pub fn desired_services<'a>(services: impl IntoIterator<Item = &'a ServiceConfig>) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for service in services {
        for port in &service.ports {
            let protocol = match port.protocol {
                ServiceProtocol::Tcp => IPPROTO_TCP,
                ServiceProtocol::Udp => IPPROTO_UDP,
                // Refused by the config's validation: never reaches here.
                ServiceProtocol::Sctp => continue,
            };
            out.push(ServicePort {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                port_name: port.name.clone(),
                cluster_ip: service.cluster_ip,
                port: port.port,
                protocol,
                session_affinity: service.session_affinity,
                affinity_timeout_seconds: service.session_affinity_timeout_seconds,
                backends: service
                    .backends
                    .iter()
                    .map(|ip| SocketAddrV4::new(*ip, port.target_port()))
                    .collect(),
            });
        }
    }
    out
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

/// One translated connection, from its forward entry, its reply entry or
/// both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub protocol: u8,
    pub client: SocketAddrV4,
    pub service: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub service_id: u32,
    /// The later of the two directions' last packets (CLOCK_MONOTONIC ns).
    pub last_seen_ns: u64,
    /// A FIN or RST was seen in either direction.
    pub closing: bool,
    /// The client is the backend itself.
    pub hairpin: bool,
}

/// The connections the conntrack entries describe, a forward entry joined
/// with its reply entry. A lone entry (its pair being created, removed, or
/// lost) still makes a row: it still translates packets.
pub fn connections(entries: &[(ConntrackKey, ConntrackEntry)]) -> Vec<Connection> {
    let by_key: HashMap<ConntrackKey, ConntrackEntry> = entries.iter().copied().collect();
    let mut out = Vec::new();
    for (key, entry) in entries {
        let pair_key = key.pair(entry);
        let pair = by_key.get(&pair_key);
        // A reply entry is shown through its forward entry when there is one.
        if entry.kind != CT_FORWARD && pair.is_some_and(|p| p.kind == CT_FORWARD) {
            continue;
        }
        let port = u16::from_be_bytes;
        let hairpin = entry.flags & CT_HAIRPIN != 0;
        let (client, service, backend) = if entry.kind == CT_FORWARD {
            (
                SocketAddrV4::new(Ipv4Addr::from(key.saddr), port(key.sport)),
                SocketAddrV4::new(Ipv4Addr::from(key.daddr), port(key.dport)),
                SocketAddrV4::new(Ipv4Addr::from(entry.nat_addr), port(entry.nat_port)),
            )
        } else {
            let client_ip = if hairpin { entry.client_ipv4 } else { key.daddr };
            (
                SocketAddrV4::new(Ipv4Addr::from(client_ip), port(key.dport)),
                SocketAddrV4::new(Ipv4Addr::from(entry.nat_addr), port(entry.nat_port)),
                SocketAddrV4::new(Ipv4Addr::from(key.saddr), port(key.sport)),
            )
        };
        out.push(Connection {
            protocol: key.protocol,
            client,
            service,
            backend,
            service_id: entry.service_id,
            last_seen_ns: entry.last_seen_ns.max(pair.map_or(0, |p| p.last_seen_ns)),
            closing: (entry.flags | pair.map_or(0, |p| p.flags)) & CT_CLOSING != 0,
            hairpin,
        });
    }
    out.sort_by_key(|c| (c.protocol, *c.client.ip(), c.client.port(), *c.service.ip(), c.service.port()));
    out
}

/// How long a connection may stay quiet before the collector removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackLimits {
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    pub closing_ns: u64,
}

impl ConntrackLimits {
    pub fn from_config(config: &AgentConfig) -> Self {
        let ns = |seconds: u32| u64::from(seconds) * NS_PER_SECOND;
        Self {
            tcp_idle_ns: ns(config.conntrack_tcp_idle_seconds),
            udp_idle_ns: ns(config.conntrack_udp_idle_seconds),
            closing_ns: ns(config.conntrack_closing_seconds),
        }
    }
}

/// Whether the connection `entry` belongs to (with `pair`, its other
/// direction, when it exists) has been quiet longer than its limit at
/// `now_ns`. Both directions count: a one-way UDP stream refreshes only
/// one of them and must live on.
pub fn expired(
    key: &ConntrackKey,
    entry: &ConntrackEntry,
    pair: Option<&ConntrackEntry>,
    now_ns: u64,
    limits: &ConntrackLimits,
) -> bool {
    let last_seen = entry.last_seen_ns.max(pair.map_or(0, |p| p.last_seen_ns));
    let closing = (entry.flags | pair.map_or(0, |p| p.flags)) & CT_CLOSING != 0;
    let limit = if closing {
        limits.closing_ns
    } else if key.protocol == IPPROTO_TCP {
        limits.tcp_idle_ns
    } else {
        limits.udp_idle_ns
    };
    // An entry refreshed after `now_ns` was taken is simply not idle.
    now_ns.saturating_sub(last_seen) > limit + LAST_SEEN_GRANULARITY_NS
}

/// The keys of every expired entry in a snapshot of the map.
pub fn expired_keys(
    snapshot: &HashMap<ConntrackKey, ConntrackEntry>,
    now_ns: u64,
    limits: &ConntrackLimits,
) -> Vec<ConntrackKey> {
    snapshot
        .iter()
        .filter(|(key, entry)| expired(key, entry, snapshot.get(&key.pair(entry)), now_ns, limits))
        .map(|(key, _)| *key)
        .collect()
}

/// CLOCK_MONOTONIC in ns: the clock of the programs' `bpf_ktime_get_coarse_ns`
/// (its coarse variant lags by at most a tick).
pub fn monotonic_now_ns() -> nix::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * NS_PER_SECOND + now.tv_nsec() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceNamesError {
    #[error("Service names file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Service names file {path} is unreadable")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Who a Service id is, for `inspect services` (the maps hold only
/// addresses and ids). The key fields let a reader tell a stale record
/// from the Service the map holds under the id now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceName {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
}

impl ServiceName {
    /// Whether this record is about the Service `key` held under `id`.
    pub fn names(&self, id: u32, key: &ServiceKey) -> bool {
        self.id == id
            && self.cluster_ip == Ipv4Addr::from(key.vip)
            && self.port == u16::from_be_bytes(key.port)
            && self.protocol == protocol_name(key.protocol)
    }
}

impl ServiceName {
    /// The record for `port`, programmed under `id`.
    pub fn of(id: u32, port: &ServicePort) -> Self {
        ServiceName {
            id,
            namespace: port.namespace.clone(),
            name: port.name.clone(),
            port_name: port.port_name.clone(),
            cluster_ip: port.cluster_ip,
            port: port.port,
            protocol: protocol_name(port.protocol).to_owned(),
        }
    }

    /// The Service key this record is about.
    pub fn key(&self) -> Option<ServiceKey> {
        let protocol = match self.protocol.as_str() {
            "TCP" => IPPROTO_TCP,
            "UDP" => IPPROTO_UDP,
            _ => return None,
        };
        Some(service_key(self.cluster_ip, self.port, protocol))
    }
}

/// `<state_dir>/services/`: one `<id>.json` per programmed Service port, so
/// that one Service's change rewrites its own record, not every Service's.
pub fn names_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("services")
}

/// Write the record of `name.id` atomically (temp file + rename): a reader
/// sees the old record or the new one, never half.
pub fn save_name(state_dir: &Path, name: &ServiceName) -> Result<(), ServiceNamesError> {
    let dir = names_dir(state_dir);
    let path = dir.join(format!("{}.json", name.id));
    let tmp = dir.join(format!("{}.json.tmp", name.id));
    let text = serde_json::to_vec(name)
        .map_err(|source| ServiceNamesError::Decode { path: path.clone(), source })?;
    fs::create_dir_all(&dir)
        .and_then(|()| fs::write(&tmp, text))
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|source| ServiceNamesError::Io { path, source })
}

/// Remove the record of `id`; none there is fine.
pub fn remove_name(state_dir: &Path, id: u32) -> Result<(), ServiceNamesError> {
    let path = names_dir(state_dir).join(format!("{id}.json"));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ServiceNamesError::Io { path, source: e }),
        _ => Ok(()),
    }
}

/// Every saved record, by id; none if the agent never wrote any.
pub fn load_names(state_dir: &Path) -> Result<BTreeMap<u32, ServiceName>, ServiceNamesError> {
    let dir = names_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(ServiceNamesError::Io { path: dir, source }),
    };
    let mut names = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|source| ServiceNamesError::Io { path: dir.clone(), source })?.path();
        // Temp files of a write in progress are not records yet.
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = fs::read(&path).map_err(|source| ServiceNamesError::Io { path: path.clone(), source })?;
        let name: ServiceName =
            serde_json::from_slice(&bytes).map_err(|source| ServiceNamesError::Decode { path, source })?;
        names.insert(name.id, name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use datapath_common::{CT_REPLY, HAIRPIN_IPV4};

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn pod(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, n), 8080)
    }

    fn service_port(port: u16, backends: &[u8]) -> ServicePort {
        ServicePort {
            namespace: "default".into(),
            name: "web".into(),
            port_name: None,
            cluster_ip: VIP,
            port,
            protocol: IPPROTO_TCP,
            session_affinity: SessionAffinity::None,
            affinity_timeout_seconds: 10_800,
            backends: backends.iter().map(|n| pod(*n)).collect(),
        }
    }

    /// The maps after carrying out `plan` on `state` (affinity aside).
    fn apply(state: &ProgrammedState, plan: &ServicePlan) -> ProgrammedState {
        let mut state = state.clone();
        for write in &plan.writes {
            state.apply(write);
        }
        state
    }

    /// What a packet would see at every step of `plan`: each Service's
    /// count must only cover filled slots, each holding a backend that the
    /// old or the new state had for that Service.
    fn assert_never_half_written(state: &ProgrammedState, plan: &ServicePlan, desired: &[ServicePort]) {
        let mut allowed: BTreeMap<u32, BTreeSet<Backend>> = BTreeMap::new();
        for (key, service) in &state.services {
            for slot in 0..service.backend_count {
                if let Some(b) = state.backends.get(&BackendKey { service_id: service.id, slot }) {
                    allowed.entry(service.id).or_default().insert(*b);
                }
            }
            if let Some(port) = desired.iter().find(|p| p.key() == *key) {
                allowed.entry(service.id).or_default().extend(port.datapath_backends());
            }
        }
        let mut now = state.clone();
        for (i, write) in plan.writes.iter().enumerate() {
            now = apply(&now, &ServicePlan { writes: vec![write.clone()], ..Default::default() });
            for (key, service) in &now.services {
                let allowed_here = match allowed.get(&service.id) {
                    Some(set) => set.clone(),
                    // A new Service: only its desired backends.
                    None => desired
                        .iter()
                        .find(|p| p.key() == *key)
                        .map(|p| p.datapath_backends().into_iter().collect())
                        .unwrap_or_default(),
                };
                for slot in 0..service.backend_count {
                    let b = now.backends.get(&BackendKey { service_id: service.id, slot });
                    assert!(
                        b.is_some_and(|b| allowed_here.contains(b)),
                        "after write {i} ({write:?}) slot {slot} of id {} holds {b:?}",
                        service.id
                    );
                }
            }
        }
    }

    fn layout(state: &ProgrammedState, key: &ServiceKey) -> Vec<SocketAddrV4> {
        let service = state.services[key];
        (0..service.backend_count)
            .map(|slot| backend_address(&state.backends[&BackendKey { service_id: service.id, slot }]))
            .collect()
    }

    fn sync(state: &ProgrammedState, desired: &[ServicePort]) -> (ServicePlan, ProgrammedState) {
        let plan = plan_sync(state, desired);
        assert_never_half_written(state, &plan, desired);
        let after = apply(state, &plan);
        assert!(plan_sync(&after, desired).writes.is_empty(), "a second sync changes nothing");
        (plan, after)
    }

    #[test]
    fn a_new_service_gets_its_slots_before_its_entry() {
        let desired = [service_port(80, &[1, 2])];
        let (plan, after) = sync(&ProgrammedState::default(), &desired);
        let key = desired[0].key();
        let puts: Vec<usize> = plan
            .writes
            .iter()
            .enumerate()
            .filter(|(_, w)| matches!(w, MapWrite::PutBackend(..)))
            .map(|(i, _)| i)
            .collect();
        let entry = plan.writes.iter().position(|w| matches!(w, MapWrite::PutService(..))).unwrap();
        assert_eq!(puts.len(), 2);
        assert!(puts.iter().all(|i| *i < entry), "{:?}", plan.writes);
        assert_eq!(after.services[&key].id, FIRST_SERVICE_ID);
        assert_eq!(after.services[&key].backend_count, 2);
        assert_eq!(layout(&after, &key), vec![pod(1), pod(2)]);
        assert_eq!(plan.report, SyncReport { added: 1, updated: 0, removed: 0 });
    }

    #[test]
    fn shrinking_lowers_the_count_before_deleting_slots_and_keeps_slots_of_kept_backends() {
        let (_, state) = sync(&ProgrammedState::default(), &[service_port(80, &[1, 2, 3, 4])]);
        let key = service_port(80, &[]).key();
        // Remove 2 and 3: 4 moves down into 2's slot, 1 stays at slot 0.
        let desired = [service_port(80, &[1, 4])];
        let (plan, after) = sync(&state, &desired);
        assert_eq!(layout(&after, &key), vec![pod(1), pod(4)]);
        let id = state.services[&key].id;
        assert_eq!(
            plan.writes,
            vec![
                MapWrite::PutBackend(BackendKey { service_id: id, slot: 1 }, backend(pod(4))),
                MapWrite::PutService(key, Service { backend_count: 2, ..state.services[&key] }),
                MapWrite::DeleteBackend(BackendKey { service_id: id, slot: 2 }),
                MapWrite::DeleteBackend(BackendKey { service_id: id, slot: 3 }),
            ]
        );
        assert_eq!(plan.report, SyncReport { added: 0, updated: 1, removed: 0 });
    }

    #[test]
    fn growing_and_replacing_keep_ids_and_kept_slots() {
        let (_, state) = sync(&ProgrammedState::default(), &[service_port(80, &[1, 2])]);
        let key = service_port(80, &[]).key();
        let (plan, after) = sync(&state, &[service_port(80, &[3, 2, 5, 6])]);
        assert_eq!(after.services[&key].id, state.services[&key].id);
        // 2 stays in slot 1; 3 replaces the removed 1 in slot 0.
        assert_eq!(layout(&after, &key), vec![pod(3), pod(2), pod(5), pod(6)]);
        let entry = plan.writes.iter().position(|w| matches!(w, MapWrite::PutService(..))).unwrap();
        assert_eq!(entry, 3, "three slots written first: {:?}", plan.writes);
        assert_eq!(plan.writes.len(), 4, "no affinity to forget without ClientIP: {:?}", plan.writes);
    }

    #[test]
    fn no_backends_refuses_then_removal_deletes_entry_first() {
        let (_, state) = sync(&ProgrammedState::default(), &[service_port(80, &[1, 2])]);
        let key = service_port(80, &[]).key();
        let (plan, empty) = sync(&state, &[service_port(80, &[])]);
        assert_eq!(empty.services[&key].backend_count, 0, "kept, refusing new connections");
        assert!(matches!(plan.writes[0], MapWrite::PutService(..)), "count lowered first: {:?}", plan.writes);
        assert!(empty.backends.is_empty());

        let (_, state) = sync(&ProgrammedState::default(), &[service_port(80, &[1, 2])]);
        let id = state.services[&key].id;
        let (plan, gone) = sync(&state, &[]);
        assert_eq!(
            plan.writes,
            vec![
                MapWrite::DeleteService(key),
                MapWrite::DeleteBackend(BackendKey { service_id: id, slot: 0 }),
                MapWrite::DeleteBackend(BackendKey { service_id: id, slot: 1 }),
            ]
        );
        assert!(gone.services.is_empty() && gone.backends.is_empty(), "{gone:?}");
        assert_eq!(plan.report, SyncReport { added: 0, updated: 0, removed: 1 });
    }

    #[test]
    fn new_services_take_the_lowest_free_id_but_never_one_freed_in_the_same_sync() {
        let (_, state) = sync(
            &ProgrammedState::default(),
            &[service_port(80, &[1]), service_port(81, &[1]), service_port(82, &[1])],
        );
        let ids = |s: &ProgrammedState| s.services.values().map(|v| v.id).collect::<BTreeSet<_>>();
        assert_eq!(ids(&state), [1, 2, 3].into());
        // Drop 81 (id 2) and add 83 at once: 83 must not reuse 2.
        let (_, after) =
            sync(&state, &[service_port(80, &[1]), service_port(82, &[1]), service_port(83, &[1])]);
        assert_eq!(after.services[&service_port(83, &[]).key()].id, 4);
        // Next time 2 is free again.
        let (_, later) = sync(
            &after,
            &[service_port(80, &[1]), service_port(82, &[1]), service_port(83, &[1]), service_port(84, &[1])],
        );
        assert_eq!(later.services[&service_port(84, &[]).key()].id, 2);
    }

    #[test]
    fn a_change_plans_only_its_own_keys_and_ends_where_a_whole_sync_would() {
        let all: Vec<ServicePort> = (0..40).map(|i| service_port(1000 + i, &[1, 2, 3])).collect();
        let (_, mut state) = sync(&ProgrammedState::default(), &all);
        let shrunk = service_port(1005, &[3]);
        let added = [service_port(2000, &[4]), service_port(2001, &[4, 5])];
        // Shrink one; remove two; add two.
        let steps: Vec<Vec<(ServiceKey, Option<&ServicePort>)>> = vec![
            vec![(shrunk.key(), Some(&shrunk))],
            vec![(all[7].key(), None), (all[9].key(), None)],
            added.iter().map(|p| (p.key(), Some(p))).collect(),
        ];
        let mut desired = all.clone();
        for (i, step) in steps.into_iter().enumerate() {
            let changes: ServiceChanges = step.into_iter().collect();
            for (key, port) in &changes {
                desired.retain(|p| p.key() != *key);
                desired.extend(port.cloned());
            }
            let plan = plan_changes(&state, &changes);
            assert_never_half_written(&state, &plan, &desired);
            let touched: BTreeSet<u32> = plan
                .writes
                .iter()
                .map(|w| match w {
                    MapWrite::PutBackend(k, _) | MapWrite::DeleteBackend(k) => k.service_id,
                    MapWrite::PutService(_, v) => v.id,
                    MapWrite::DeleteService(k) => state.services[k].id,
                    MapWrite::ForgetAffinity { service_id, .. } => *service_id,
                })
                .collect();
            assert_eq!(touched.len(), changes.len(), "step {i}: wrote ids {touched:?} for {changes:?}");
            state = apply(&state, &plan);
            assert!(
                plan_sync(&state, &desired).writes.is_empty(),
                "step {i}: a whole sync finds nothing left"
            );
            // The record of ids matches one rebuilt from the maps.
            let rebuilt = ProgrammedState::new(state.services.clone(), state.backends.clone());
            assert_eq!(state.ids, rebuilt.ids, "step {i}");
            assert!(rebuilt.free_ids.is_subset(&state.free_ids), "step {i}");
        }
        assert_eq!(layout(&state, &shrunk.key()), vec![pod(3)]);
        // The two added took the two freed ids (8 and 10), lowest first.
        assert_eq!(state.services[&added[0].key()].id, 8);
        assert_eq!(state.services[&added[1].key()].id, 10);
    }

    #[test]
    fn leftover_slots_of_an_interrupted_sync_are_cleaned_and_unchanged_services_untouched() {
        let (_, mut state) = sync(&ProgrammedState::default(), &[service_port(80, &[1, 2])]);
        let key = service_port(80, &[]).key();
        let id = state.services[&key].id;
        // A slot beyond the count, and slots of an id no Service has.
        state.backends.insert(BackendKey { service_id: id, slot: 2 }, backend(pod(9)));
        state.backends.insert(BackendKey { service_id: 7, slot: 0 }, backend(pod(9)));
        let (plan, after) = sync(&state, &[service_port(80, &[1, 2])]);
        assert_eq!(after.backends.len(), 2);
        assert!(plan.writes.iter().all(|w| matches!(w, MapWrite::DeleteBackend(_))), "{:?}", plan.writes);
    }

    #[test]
    fn only_clientip_services_walk_the_affinity_map() {
        let sticky = |backends: &[u8]| {
            let mut port = service_port(80, backends);
            port.session_affinity = SessionAffinity::ClientIp;
            port
        };
        let forgets = |plan: &ServicePlan| -> Vec<MapWrite> {
            plan.writes.iter().filter(|w| matches!(w, MapWrite::ForgetAffinity { .. })).cloned().collect()
        };
        // New with affinity: entries left under the id go before the
        // entry that switches the programs' affinity lookups on.
        let (plan, state) = sync(&ProgrammedState::default(), &[sticky(&[1, 2])]);
        let key = sticky(&[]).key();
        assert_eq!(state.services[&key].flags, SERVICE_AFFINITY_CLIENT_IP);
        assert_eq!(state.services[&key].affinity_timeout_seconds, 10_800);
        assert_eq!(plan.writes[0], MapWrite::ForgetAffinity { service_id: 1, backends: None });
        // A backend leaves: its clients' affinities go, after the count.
        let (plan, state) = sync(&state, &[sticky(&[2])]);
        assert_eq!(
            plan.writes.last(),
            Some(&MapWrite::ForgetAffinity { service_id: 1, backends: Some([backend(pod(1))].into()) })
        );
        // Switched off: nothing to forget (the programs stop reading them).
        let (plan, off) = sync(&state, &[service_port(80, &[2])]);
        assert_eq!(off.services[&key].flags, 0);
        assert!(forgets(&plan).is_empty(), "{:?}", plan.writes);
        // A timeout without affinity is no change.
        let mut other_timeout = service_port(80, &[2]);
        other_timeout.affinity_timeout_seconds = 5;
        assert!(plan_sync(&off, &[other_timeout]).writes.is_empty());
        // Switched on again: the old spell's entries go first.
        let (plan, _) = sync(&off, &[sticky(&[2])]);
        assert_eq!(plan.writes[0], MapWrite::ForgetAffinity { service_id: 1, backends: None });
        // Without affinity, neither adding, shrinking nor removing forgets.
        let (plan, plain) = sync(&ProgrammedState::default(), &[service_port(81, &[1, 2])]);
        assert!(forgets(&plan).is_empty());
        let (plan, plain) = sync(&plain, &[service_port(81, &[2])]);
        assert!(forgets(&plan).is_empty());
        assert!(forgets(&sync(&plain, &[]).0).is_empty());
    }

    fn tcp_connection(
        client_port: u16,
        backend: SocketAddrV4,
        hairpin: bool,
    ) -> [(ConntrackKey, ConntrackEntry); 2] {
        let client = if hairpin { *backend.ip() } else { Ipv4Addr::new(10, 244, 1, 50) };
        let key = ConntrackKey {
            saddr: client.octets(),
            daddr: VIP.octets(),
            sport: client_port.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            protocol: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let forward = ConntrackEntry {
            nat_addr: backend.ip().octets(),
            nat_port: backend.port().to_be_bytes(),
            kind: CT_FORWARD,
            flags: if hairpin { CT_HAIRPIN } else { 0 },
            client_ipv4: client.octets(),
            service_id: 1,
            last_seen_ns: 1_000 * NS_PER_SECOND,
        };
        let reply = ConntrackEntry {
            nat_addr: VIP.octets(),
            nat_port: 80u16.to_be_bytes(),
            kind: CT_REPLY,
            ..forward
        };
        [(key, forward), (key.pair(&forward), reply)]
    }

    #[test]
    fn connections_join_both_directions_including_hairpin() {
        let [fwd, mut rep] = tcp_connection(40_000, pod(2), false);
        rep.1.last_seen_ns += 5 * NS_PER_SECOND;
        rep.1.flags |= CT_CLOSING;
        let [hfwd, hrep] = tcp_connection(40_001, pod(3), true);
        assert_eq!(hrep.0.daddr, HAIRPIN_IPV4);
        let rows = connections(&[rep, fwd, hrep, hfwd]);
        assert_eq!(rows.len(), 2, "{rows:#?}");
        let plain = rows.iter().find(|c| !c.hairpin).unwrap();
        assert_eq!(plain.client, SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 50), 40_000));
        assert_eq!(plain.service, SocketAddrV4::new(VIP, 80));
        assert_eq!(plain.backend, pod(2));
        assert_eq!(plain.last_seen_ns, 1_005 * NS_PER_SECOND, "the later direction counts");
        assert!(plain.closing);
        let hairpin = rows.iter().find(|c| c.hairpin).unwrap();
        assert_eq!(hairpin.client, SocketAddrV4::new(*pod(3).ip(), 40_001));
        assert_eq!(hairpin.backend, pod(3));

        // A lone reply entry still shows the same connection.
        let lone = connections(&[hrep]);
        assert_eq!(lone.len(), 1);
        assert_eq!(
            (lone[0].client, lone[0].service, lone[0].backend),
            (hairpin.client, hairpin.service, hairpin.backend)
        );
    }

    #[test]
    fn gc_expires_by_protocol_closing_and_the_later_direction() {
        let limits = ConntrackLimits {
            tcp_idle_ns: 100 * NS_PER_SECOND,
            udp_idle_ns: 30 * NS_PER_SECOND,
            closing_ns: 10 * NS_PER_SECOND,
        };
        let [fwd, rep] = tcp_connection(40_000, pod(2), false);
        let seen = fwd.1.last_seen_ns;
        let snapshot: HashMap<_, _> = [fwd, rep].into_iter().collect();
        let at = |secs: u64| seen + secs * NS_PER_SECOND;
        // Within the limit plus the refresh granularity: kept.
        assert!(expired_keys(&snapshot, at(101), &limits).is_empty());
        assert_eq!(expired_keys(&snapshot, at(102), &limits).len(), 2);
        // Refreshed after `now` was read: not idle.
        assert!(expired_keys(&snapshot, seen - 1, &limits).is_empty());

        // Closing on one side shortens both.
        let mut closing = snapshot.clone();
        closing.get_mut(&rep.0).unwrap().flags |= CT_CLOSING;
        assert!(expired_keys(&closing, at(11), &limits).is_empty());
        assert_eq!(expired_keys(&closing, at(12), &limits).len(), 2);

        // A one-way stream: the reply side is old, the forward side fresh.
        let mut one_way = snapshot.clone();
        one_way.get_mut(&fwd.0).unwrap().last_seen_ns = at(200);
        assert!(expired_keys(&one_way, at(250), &limits).is_empty());

        // UDP uses its own limit.
        let udp: HashMap<_, _> = [fwd, rep]
            .into_iter()
            .map(|(mut k, v)| {
                k.protocol = IPPROTO_UDP;
                (k, v)
            })
            .collect();
        assert!(expired_keys(&udp, at(31), &limits).is_empty());
        assert_eq!(expired_keys(&udp, at(32), &limits).len(), 2);
    }

    #[test]
    fn names_match_only_their_own_service_and_are_saved_one_file_each() {
        let key = service_port(80, &[1]).key();
        let name = ServiceName::of(4, &service_port(80, &[1]));
        assert!(name.names(4, &key));
        assert_eq!(name.key(), Some(key));
        assert!(!name.names(5, &key));
        assert!(!name.names(4, &service_port(81, &[]).key()));
        let dir = std::env::temp_dir().join(format!("dp-names-{}", std::process::id()));
        assert!(load_names(&dir).unwrap().is_empty());
        let other = ServiceName::of(7, &service_port(81, &[1]));
        save_name(&dir, &name).unwrap();
        save_name(&dir, &other).unwrap();
        assert_eq!(load_names(&dir).unwrap(), [(4, name.clone()), (7, other)].into());
        remove_name(&dir, 7).unwrap();
        remove_name(&dir, 7).unwrap();
        assert_eq!(load_names(&dir).unwrap(), [(4, name)].into());
        let _ = fs::remove_dir_all(&dir);
    }
}
