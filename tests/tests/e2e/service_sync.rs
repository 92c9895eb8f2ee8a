//! The agent's Service programming against the real maps (loaded into the
//! kernel, not pinned): a change touches only its own Service, the first
//! list after a start clears what an earlier agent left, and a sync that
//! failed is redone whole. The lab tests (services.rs) drive the same code
//! through the running agent.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use datapath_agent::{
    bpf::Datapath,
    model::ServiceRef,
    reconcile::service_sync::ServiceSync,
    reconcile::{
        service_names::load_names,
        services::{ThisNode, backend_address},
    },
    source::config::{ServiceConfig, ServicePortConfig, ServiceProtocol, SessionAffinity, TrafficPolicy},
};
use datapath_tests::require_root;

/// A state directory removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("dpt-svcsync-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        StateDir(path)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The node (the backends are all in its pod CIDR: none is remote).
const THIS_NODE: ThisNode = ThisNode {
    pod_cidr: ipnet::Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 1, 0), 24),
    address: Ipv4Addr::new(192, 168, 1, 10),
    serve_outside: false,
};

fn service(i: u32, backends: &[u8]) -> ServiceConfig {
    ServiceConfig {
        name: format!("svc-{i}"),
        namespace: "test".into(),
        cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout_seconds: 10_800,
        ports: vec![ServicePortConfig {
            port: 80,
            protocol: ServiceProtocol::Tcp,
            target_port: Some(8080),
            name: None,
            node_port: None,
        }],
        backends: backends.iter().map(|n| Ipv4Addr::new(10, 244, 1, *n)).collect(),
        terminating_backends: Vec::new(),
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
    }
}

/// What the maps serve: cluster IP -> (id, backend addresses).
fn served(datapath: &Datapath) -> BTreeMap<Ipv4Addr, (u32, Vec<SocketAddrV4>)> {
    datapath
        .services()
        .unwrap()
        .into_iter()
        .map(|s| {
            (Ipv4Addr::from(s.key.vip), (s.service.id, s.backends.iter().map(backend_address).collect()))
        })
        .collect()
}

fn backends_of(served: &BTreeMap<Ipv4Addr, (u32, Vec<SocketAddrV4>)>, s: &ServiceConfig) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = served[&s.cluster_ip].1.iter().map(|a| *a.ip()).collect();
    ips.sort();
    ips
}

#[test]
fn a_change_touches_only_its_own_service() {
    require_root!();
    let state = StateDir::new("change");
    let mut datapath = Datapath::load_unpinned().expect("load the eBPF object");
    let mut sync = ServiceSync::new(state.0.clone(), THIS_NODE);
    let list: Vec<ServiceConfig> = (0..200).map(|i| service(i, &[1, 2])).collect();
    let report = sync.replace_all(&mut datapath, list.clone()).unwrap();
    assert_eq!(report.added, 200);
    let before = served(&datapath);
    assert_eq!(load_names(&state.0).unwrap().len(), 200, "one names record per Service port");

    // One Service's backends change, one goes, one comes.
    let mut changed = BTreeMap::new();
    changed.insert(ServiceRef::of(&list[7]), Some(service(7, &[2, 3])));
    changed.insert(ServiceRef::of(&list[9]), None);
    changed.insert(ServiceRef::of(&service(500, &[])), Some(service(500, &[4])));
    let report = sync.change(&mut datapath, changed).unwrap();
    assert_eq!((report.added, report.updated, report.removed), (1, 1, 1));
    let after = served(&datapath);
    assert_eq!(after.len(), 200);
    assert_eq!(
        backends_of(&after, &service(7, &[])),
        [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)]
    );
    assert!(!after.contains_key(&list[9].cluster_ip));
    assert_eq!(backends_of(&after, &service(500, &[])), [Ipv4Addr::new(10, 244, 1, 4)]);
    // Every other Service is as it was, id and backends.
    for (ip, was) in &before {
        if *ip != list[7].cluster_ip && *ip != list[9].cluster_ip {
            assert_eq!(after.get(ip), Some(was), "{ip} untouched");
        }
    }
    let names = load_names(&state.0).unwrap();
    assert_eq!(names.len(), 200);
    assert!(names.values().any(|n| n.name == "svc-500") && !names.values().any(|n| n.name == "svc-9"));

    // The same state as a whole list changes nothing; a list without
    // Service 7 removes it alone.
    let mut whole: Vec<ServiceConfig> = sync.services().cloned().collect();
    assert_eq!(sync.replace_all(&mut datapath, whole.clone()).unwrap(), Default::default());
    whole.retain(|s| s.name != "svc-7");
    let report = sync.replace_all(&mut datapath, whole).unwrap();
    assert_eq!((report.added, report.updated, report.removed), (0, 0, 1));
    assert_eq!(served(&datapath).len(), 199);
}

#[test]
fn the_first_list_clears_what_an_earlier_agent_left() {
    require_root!();
    let state = StateDir::new("first");
    let mut datapath = Datapath::load_unpinned().expect("load the eBPF object");
    let mut earlier = ServiceSync::new(state.0.clone(), THIS_NODE);
    earlier.replace_all(&mut datapath, (0..5).map(|i| service(i, &[1])).collect()).unwrap();
    drop(earlier);

    // A new agent on the same maps and state dir: Services 0..3 stay, 3 and
    // 4 are gone from the source. Nothing is removed before its list.
    let mut sync = ServiceSync::new(state.0.clone(), THIS_NODE);
    let mut nothing = BTreeMap::new();
    nothing.insert(ServiceRef::of(&service(0, &[])), None);
    sync.change(&mut datapath, nothing).unwrap();
    assert_eq!(served(&datapath).len(), 5, "no Service removed before the first whole list");
    assert_eq!(sync.retry(&mut datapath).unwrap(), None, "nothing to retry before the first list");

    let report = sync.replace_all(&mut datapath, (0..3).map(|i| service(i, &[1])).collect()).unwrap();
    assert_eq!((report.added, report.updated, report.removed), (0, 0, 2));
    assert_eq!(served(&datapath).len(), 3);
    let names: Vec<String> = load_names(&state.0).unwrap().into_values().map(|n| n.name).collect();
    assert_eq!(names, ["svc-0", "svc-1", "svc-2"], "stale names records removed");
}

#[test]
fn a_failed_sync_is_redone_whole() {
    require_root!();
    let state = StateDir::new("retry");
    let mut datapath = Datapath::load_unpinned().expect("load the eBPF object");
    let mut sync = ServiceSync::new(state.0.clone(), THIS_NODE);
    sync.replace_all(&mut datapath, (0..3).map(|i| service(i, &[1])).collect()).unwrap();
    assert!(sync.in_sync());

    // The names records cannot be written: the maps change, the sync fails.
    let records = state.0.join("services");
    std::fs::rename(&records, state.0.join("services.away")).unwrap();
    std::fs::write(&records, b"not a directory").unwrap();
    let mut changed = BTreeMap::new();
    changed.insert(ServiceRef::of(&service(5, &[])), Some(service(5, &[2])));
    let error = sync.change(&mut datapath, changed).unwrap_err();
    assert!(format!("{:#}", anyhow::Error::from(error)).contains("names"), "the error says what failed");
    assert!(!sync.in_sync());
    // Still failing: the retry says so, and the source's state is kept.
    assert!(sync.retry(&mut datapath).is_err());
    let mut changed = BTreeMap::new();
    changed.insert(ServiceRef::of(&service(1, &[])), None);
    assert!(sync.change(&mut datapath, changed).is_err());

    std::fs::remove_file(&records).unwrap();
    std::fs::rename(state.0.join("services.away"), &records).unwrap();
    sync.retry(&mut datapath).unwrap().expect("a whole sync");
    assert!(sync.in_sync());
    let served = served(&datapath);
    let ips: Vec<Ipv4Addr> = served.keys().copied().collect();
    // Service 1 was removed and Service 5 added while the records failed.
    assert_eq!(ips, [service(0, &[]).cluster_ip, service(2, &[]).cluster_ip, service(5, &[]).cluster_ip]);
    let names: Vec<String> = load_names(&state.0).unwrap().into_values().map(|n| n.name).collect();
    assert_eq!(names.len(), 3);
    assert!(names.contains(&"svc-5".to_owned()));
    assert_eq!(sync.retry(&mut datapath).unwrap(), None, "in sync: nothing to retry");
}
