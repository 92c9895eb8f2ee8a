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
        address: VIP,
        port,
        protocol: IPPROTO_TCP,
        session_affinity: SessionAffinity::None,
        affinity_timeout_seconds: 10_800,
        backends: backends.iter().map(|n| pod(*n)).collect(),
        drop_without_backend: false,
        scope: datapath_common::SERVICE_SCOPE_CLUSTER,
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
    let (_, after) = sync(&state, &[service_port(80, &[1]), service_port(82, &[1]), service_port(83, &[1])]);
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
        assert!(plan_sync(&state, &desired).writes.is_empty(), "step {i}: a whole sync finds nothing left");
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

fn config(backends: &[u8], terminating: &[u8]) -> ServiceConfig {
    let ip = |n: &u8| Ipv4Addr::new(10, 244, n / 100, n % 100);
    ServiceConfig {
        name: "web".into(),
        namespace: "default".into(),
        cluster_ip: VIP,
        session_affinity: SessionAffinity::None,
        session_affinity_timeout_seconds: 10_800,
        ports: vec![crate::model::ServicePortConfig {
            port: 80,
            protocol: ServiceProtocol::Tcp,
            target_port: Some(8080),
            name: None,
            node_port: None,
        }],
        backends: backends.iter().map(ip).collect(),
        terminating_backends: terminating.iter().map(ip).collect(),
        external_ips: vec![],
        load_balancer_ips: vec![],
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
    }
}

/// Node 1: pods 10.244.1.0/24 (backends written 1xx); node 2's are 2xx.
fn node1() -> ThisNode {
    ThisNode { pod_cidr: "10.244.1.0/24".parse().unwrap(), address: NODE1, serve_outside: true }
}

const NODE1: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

/// (address, backend hosts as 1xx/2xx, drop flag) of each port.
fn served(services: &[ServiceConfig]) -> Vec<(Ipv4Addr, Vec<u16>, bool)> {
    desired_services(services, node1(), &[])
        .into_iter()
        .map(|p| {
            let hosts = p
                .backends
                .iter()
                .map(|b| {
                    let o = b.ip().octets();
                    u16::from(o[2]) * 100 + u16::from(o[3])
                })
                .collect();
            (p.address, hosts, p.drop_without_backend)
        })
        .collect()
}

#[test]
fn terminating_backends_take_new_connections_only_while_none_is_ready() {
    // kube-proxy's rule: ready first; serving-terminating only without any.
    assert_eq!(served(&[config(&[101, 201], &[102])]), vec![(VIP, vec![101, 201], false)]);
    assert_eq!(served(&[config(&[], &[102, 202])]), vec![(VIP, vec![102, 202], false)]);
    assert_eq!(served(&[config(&[], &[])]), vec![(VIP, vec![], false)]);
}

#[test]
fn internal_traffic_policy_local_keeps_the_nodes_own_backends() {
    let local = |backends: &[u8], terminating: &[u8]| {
        let mut service = config(backends, terminating);
        service.internal_traffic_policy = TrafficPolicy::Local;
        served(&[service])
    };
    assert_eq!(local(&[101, 201, 202], &[]), vec![(VIP, vec![101], false)]);
    // None here but some elsewhere: dropped, as kube-proxy does.
    assert_eq!(local(&[201], &[]), vec![(VIP, vec![], true)]);
    // None anywhere: refused, as for any Service.
    assert_eq!(local(&[], &[]), vec![(VIP, vec![], false)]);
    // The local fallback is separate from the cluster-wide one: a ready
    // backend elsewhere does not hide a terminating one here.
    assert_eq!(local(&[201], &[102]), vec![(VIP, vec![102], false)]);
    assert_eq!(local(&[101], &[102]), vec![(VIP, vec![101], false)]);
}

#[test]
fn external_addresses_serve_every_backend_whatever_the_internal_policy() {
    let mut service = config(&[101, 201], &[]);
    service.internal_traffic_policy = TrafficPolicy::Local;
    service.external_ips = vec![Ipv4Addr::new(203, 0, 113, 7)];
    service.load_balancer_ips = vec![Ipv4Addr::new(198, 51, 100, 9)];
    assert_eq!(
        served(&[service]),
        vec![
            (VIP, vec![101], false),
            (Ipv4Addr::new(203, 0, 113, 7), vec![101, 201], false),
            (Ipv4Addr::new(198, 51, 100, 9), vec![101, 201], false),
            // Their second entries, for clients outside (Cluster policy).
            (Ipv4Addr::new(203, 0, 113, 7), vec![101, 201], false),
            (Ipv4Addr::new(198, 51, 100, 9), vec![101, 201], false),
        ]
    );
    // Each address its own Service entry, with the drop flag only where set.
    let ports = desired_services(&[config(&[201], &[])], node1(), &[]);
    let (plan, state) = sync(&ProgrammedState::default(), &ports);
    assert_eq!(plan.report.added, 1);
    assert_eq!(state.services[&ports[0].key()].flags & SERVICE_DROP_WITHOUT_BACKEND, 0);
    let mut dropping = ports[0].clone();
    dropping.backends.clear();
    dropping.drop_without_backend = true;
    let (_, state) = sync(&state, &[dropping.clone()]);
    assert_eq!(state.services[&dropping.key()].flags, SERVICE_DROP_WITHOUT_BACKEND);
    assert_eq!(state.services[&dropping.key()].backend_count, 0);
}

#[test]
fn udp_flows_are_stale_only_once_their_backend_serves_no_more() {
    let mut udp = config(&[101, 201], &[]);
    udp.ports[0].protocol = ServiceProtocol::Udp;
    udp.external_ips = vec![Ipv4Addr::new(203, 0, 113, 7)];
    let at = |address: Ipv4Addr| service_key(address, 80, IPPROTO_UDP);
    let b = |host: u8| backend(SocketAddrV4::new(Ipv4Addr::new(10, 244, host / 100, host % 100), 8080));
    let with = |ready: &[u8], terminating: &[u8]| {
        let mut next = udp.clone();
        let lists = config(ready, terminating);
        next.backends = lists.backends;
        next.terminating_backends = lists.terminating_backends;
        next
    };
    // Terminating but serving: nothing stale.
    assert!(stale_backends([(Some(&udp), Some(&with(&[201], &[101])))], node1(), &[]).is_empty());
    // Gone: stale on every address of the Service.
    let gone = stale_backends([(Some(&udp), Some(&with(&[201], &[])))], node1(), &[]);
    assert_eq!(
        gone,
        [(at(VIP), [b(101)].into()), (at(Ipv4Addr::new(203, 0, 113, 7)), [b(101)].into())].into()
    );
    // The Service removed: all of its flows.
    assert_eq!(stale_backends([(Some(&udp), None)], node1(), &[])[&at(VIP)], [b(101), b(201)].into());
    // A new Service: nothing.
    assert!(stale_backends([(None, Some(&udp))], node1(), &[]).is_empty());
    // TCP ports too (the sync forgets only their closed connections).
    let tcp = config(&[101], &[]);
    assert_eq!(
        stale_backends([(Some(&tcp), Some(&config(&[], &[])))], node1(), &[]),
        [(service_key(VIP, 80, IPPROTO_TCP), [b(101)].into())].into()
    );
}

#[test]
fn the_serving_index_answers_for_every_address_and_keeps_node_ports_once() {
    let b = |host: u8| backend(SocketAddrV4::new(Ipv4Addr::new(10, 244, host / 100, host % 100), 8080));
    let mut web = config(&[101, 201], &[]);
    web.ports[0].node_port = Some(30080);
    web.external_ips = vec![Ipv4Addr::new(203, 0, 113, 7)];
    let mut draining = config(&[], &[102]);
    draining.cluster_ip = Ipv4Addr::new(10, 96, 0, 11);
    let peers: Vec<Ipv4Addr> = (1..=200).map(|n| Ipv4Addr::new(10, 250, 1, n)).collect();
    let index = ServingIndex::of([&web, &draining], node1(), &peers);
    let tcp = IPPROTO_TCP;
    for address in [VIP, Ipv4Addr::new(203, 0, 113, 7)] {
        assert!(
            index.serves(address, 80, tcp, &b(101)) && index.serves(address, 80, tcp, &b(201)),
            "{address}"
        );
        assert!(!index.serves(address, 80, tcp, &b(102)), "{address}: another Service's backend");
        assert!(!index.serves(address, 80, IPPROTO_UDP, &b(101)), "{address}: TCP's backends are not UDP's");
    }
    // Node ports on this node's address and every peer's, nowhere else.
    for address in [NODE1, peers[0], peers[199]] {
        assert!(index.serves(address, 30080, tcp, &b(201)), "{address}");
    }
    assert!(!index.serves(Ipv4Addr::new(198, 51, 100, 1), 30080, tcp, &b(201)), "not a node's address");
    assert!(!index.serves(VIP, 30080, tcp, &b(201)), "a node port is not the cluster IP's port");
    // Terminating but serving: serves.
    assert!(index.serves(Ipv4Addr::new(10, 96, 0, 11), 80, tcp, &b(102)));
    // One node port entry whatever the number of nodes.
    assert_eq!((index.by_address.len(), index.by_node_port.len()), (3, 1));
}

#[test]
fn node_ports_serve_as_external_traffic_policy_says() {
    let mut service = config(&[101, 201], &[]);
    service.ports[0].node_port = Some(30080);
    // Cluster (the default): every backend, on the node's address too
    // (its entry for outside clients, then its entry for the cluster's).
    assert_eq!(
        served(&[service.clone()]),
        vec![(VIP, vec![101, 201], false), (NODE1, vec![101, 201], false), (NODE1, vec![101, 201], false)]
    );
    service.external_traffic_policy = TrafficPolicy::Local;
    let ports = desired_services(&[service.clone()], node1(), &[]);
    assert_eq!((ports[1].address, ports[1].port), (NODE1, 30080));
    assert_eq!(
        served(&[service.clone()]),
        vec![(VIP, vec![101, 201], false), (NODE1, vec![101], false), (NODE1, vec![101, 201], false)]
    );
    // None here: dropped; none anywhere: refused.
    let elsewhere = Ipv4Addr::new(10, 244, 2, 1);
    service.backends = vec![elsewhere];
    assert_eq!(served(&[service.clone()])[1], (NODE1, vec![], true));
    service.backends = vec![];
    service.terminating_backends = vec![Ipv4Addr::new(10, 244, 1, 2)];
    assert_eq!(served(&[service.clone()])[1], (NODE1, vec![102], false), "terminating fallback, locally");
    service.terminating_backends = vec![];
    assert_eq!(served(&[service])[1], (NODE1, vec![], false));
}

#[test]
fn outside_clients_of_external_addresses_follow_the_external_policy() {
    let external = Ipv4Addr::new(203, 0, 113, 7);
    let with = |backends: &[u8], policy: TrafficPolicy| {
        let mut service = config(backends, &[]);
        service.external_ips = vec![external];
        service.external_traffic_policy = policy;
        desired_services(&[service], node1(), &[])
    };
    let scoped = |ports: Vec<ServicePort>| -> Vec<(u8, usize, bool)> {
        ports
            .iter()
            .filter(|p| p.address == external)
            .map(|p| (p.key().scope, p.backends.len(), p.drop_without_backend))
            .collect()
    };
    use datapath_common::{SERVICE_SCOPE_CLUSTER as CLUSTER, SERVICE_SCOPE_OUTSIDE as OUTSIDE};
    // Clients in the cluster reach every backend; outside ones this node's.
    assert_eq!(
        scoped(with(&[101, 201], TrafficPolicy::Local)),
        vec![(CLUSTER, 2, false), (OUTSIDE, 1, false)]
    );
    // None here: outside clients are dropped, as kube-proxy does.
    assert_eq!(scoped(with(&[201], TrafficPolicy::Local)), vec![(CLUSTER, 1, false), (OUTSIDE, 0, true)]);
    assert_eq!(scoped(with(&[201], TrafficPolicy::Cluster)), vec![(CLUSTER, 1, false), (OUTSIDE, 1, false)]);
    // The two entries have two keys, and the names file tells them apart.
    let ports = with(&[101], TrafficPolicy::Local);
    let keys: Vec<_> = ports.iter().filter(|p| p.address == external).map(|p| p.key()).collect();
    assert_ne!(keys[0], keys[1]);
    for (i, port) in ports.iter().enumerate() {
        let name = crate::reconcile::service_names::ServiceName::of(i as u32 + 1, port);
        assert_eq!(name.key(), Some(port.key()));
        assert!(name.names(i as u32 + 1, &port.key()));
    }
}

#[test]
fn node_ports_follow_the_external_policy_from_outside_and_serve_every_node_address_inside() {
    use datapath_common::{SERVICE_SCOPE_CLUSTER as CLUSTER, SERVICE_SCOPE_OUTSIDE as OUTSIDE};
    let peer = Ipv4Addr::new(192, 168, 1, 11);
    let mut service = config(&[101, 201], &[]);
    service.ports[0].node_port = Some(30080);
    service.external_traffic_policy = TrafficPolicy::Local;
    let ports = desired_services(&[service.clone()], node1(), &[peer]);
    let node_port: Vec<(Ipv4Addr, u8, usize)> = ports
        .iter()
        .filter(|p| p.port == 30080)
        .map(|p| (p.address, p.key().scope, p.backends.len()))
        .collect();
    // From outside (the uplink), this node's backend only; from pods and
    // the node's sockets, every backend, on this node's address and the
    // peer's.
    assert_eq!(node_port, vec![(NODE1, OUTSIDE, 1), (NODE1, CLUSTER, 2), (peer, CLUSTER, 2)]);
    // UDP flows through any node's node port are flushed like the others.
    service.ports[0].protocol = ServiceProtocol::Udp;
    let serving = serving_backends(&service, node1(), &[peer]);
    assert!(serving.contains_key(&service_key(peer, 30080, IPPROTO_UDP)));
    assert!(serving.contains_key(&service_key(NODE1, 30080, IPPROTO_UDP)));
}

#[test]
fn a_node_that_does_not_serve_outside_clients_has_no_entries_for_them() {
    let mut service = config(&[101, 201], &[]);
    service.ports[0].node_port = Some(30080);
    service.external_ips = vec![Ipv4Addr::new(203, 0, 113, 7)];
    service.external_traffic_policy = TrafficPolicy::Local;
    service.health_check_node_port = Some(32100);
    let node = ThisNode { serve_outside: false, ..node1() };
    let ports = desired_services(&[service.clone()], node, &[]);
    assert!(ports.iter().all(|p| p.key().scope == datapath_common::SERVICE_SCOPE_CLUSTER), "{ports:?}");
    // Pods and the node's sockets keep every entry of theirs.
    assert_eq!(ports.len(), 3, "cluster IP, external address, node port: {ports:?}");
    assert!(crate::observe::service_health::health_checks([&service], node).is_empty());
    assert_eq!(crate::observe::service_health::health_checks([&service], node1()).len(), 1);
}
