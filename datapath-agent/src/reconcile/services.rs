//! The Service planner: the desired Service ports from the config, and the
//! plan of map writes that brings the Service maps to them.
//!
//! Everything here is pure (no maps, no kernel) so that the ordering rules
//! can be tested: [`crate::reconcile::service_sync`] reads the maps, asks
//! [`plan_sync`] for the writes and carries them out in order.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use datapath_common::{
    Backend, BackendKey, IPPROTO_TCP, IPPROTO_UDP, SERVICE_AFFINITY_CLIENT_IP, Service, ServiceKey,
};

use crate::{
    bpf::SyncReport,
    model::{ServiceConfig, ServiceProtocol, SessionAffinity},
};

/// Service ids start here: a zeroed entry (id 0) names no Service.
const FIRST_SERVICE_ID: u32 = 1;

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

#[cfg(test)]
mod tests {
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
}
