//! Services from the Kubernetes API (Kubernetes source): Service objects
//! for cluster IPs and ports, EndpointSlices for the ready backends, both
//! watched with `kube`'s reflectors (whose stores keep the last known state
//! through relists and API errors). The whole list is sent after each
//! (re)list; after that only the Service an event touches is worked out
//! again and sent, so a change costs the same whatever the number of
//! Services.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::mpsc;

use crate::{
    model::ServiceRef,
    observe::health::Health,
    source::config::{ServiceConfig, ServicePortConfig, ServiceProtocol, SessionAffinity, TrafficPolicy},
    source::kubernetes::WatchBackoff,
};

/// The label EndpointSlices carry with the name of their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label belongs to the Service proxy it names.
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A Service with this label gets no virtual IP handling.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// The Services to program: every Service with an IPv4 cluster IP (not
/// headless, not ExternalName), its TCP and UDP ports, and the ready IPv4
/// endpoints of its EndpointSlices (see [`service_config`]).
pub fn services_from<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<ServiceConfig> {
    let mut by_service: HashMap<ServiceRef, Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        if let Some(service) = slice_service(slice) {
            by_service.entry(service).or_default().push(slice);
        }
    }
    let mut out: Vec<ServiceConfig> = services
        .into_iter()
        .filter_map(|service| {
            let slices = by_service.get(&service_ref(service)).map(Vec::as_slice).unwrap_or(&[]);
            service_config(service, slices.iter().copied())
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

fn service_ref(service: &Service) -> ServiceRef {
    ServiceRef {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name: service.metadata.name.clone().unwrap_or_default(),
    }
}

/// The Service an IPv4 EndpointSlice belongs to (by its label).
fn slice_service(slice: &EndpointSlice) -> Option<ServiceRef> {
    if slice.address_type != "IPv4" {
        return None;
    }
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceRef { namespace: slice.metadata.namespace.clone().unwrap_or_default(), name: name.clone() })
}

/// One Service to program, from its object and its EndpointSlices: its
/// IPv4 cluster IP, TCP and UDP ports and ready IPv4 endpoints; `None` when
/// there is nothing to balance. A port's target port is the one the slices
/// give for that port's name (the resolved number, also for named target
/// ports).
pub fn service_config<'a>(
    service: &Service,
    slices: impl Iterator<Item = &'a EndpointSlice> + Clone,
) -> Option<ServiceConfig> {
    let spec = service.spec.as_ref()?;
    // Another Service proxy's (service.kubernetes.io/service-proxy-name),
    // or marked headless: left alone, as kube-proxy leaves them.
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL)) {
        return None;
    }
    // Headless ("None"), ExternalName, or IPv6-only: nothing to balance here.
    let cluster_ip = spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok())?;
    let ServiceRef { namespace, name } = service_ref(service);
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => ServiceProtocol::Tcp,
            "UDP" => ServiceProtocol::Udp,
            other => {
                tracing::debug!(service = name, protocol = other, "protocol not load-balanced");
                continue;
            }
        };
        let Ok(number) = u16::try_from(port.port) else { continue };
        let target_port = slices
            .clone()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol.name()
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .or_else(|| match &port.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    u16::try_from(*n).ok()
                }
                _ => None,
            });
        // Node ports only where the type gives them (a ClusterIP Service
        // keeps none; a stale one would be an API bug).
        let node_port = port
            .node_port
            .filter(|_| matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")))
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        ports.push(ServicePortConfig {
            port: number,
            protocol,
            target_port,
            name: port.name.clone(),
            node_port,
        });
    }
    if ports.is_empty() {
        return None;
    }
    let mut backends = Vec::new();
    let mut terminating_backends = Vec::new();
    for endpoint in slices.flat_map(|s| s.endpoints.iter()) {
        let list = match EndpointState::of(endpoint) {
            EndpointState::Ready => &mut backends,
            EndpointState::ServingTerminating => &mut terminating_backends,
            EndpointState::Unusable => continue,
        };
        list.extend(endpoint.addresses.iter().filter_map(|a| a.parse::<Ipv4Addr>().ok()));
    }
    for list in [&mut backends, &mut terminating_backends] {
        list.sort();
        list.dedup();
    }
    // An address listed both ways (two slices in transition): ready wins.
    terminating_backends.retain(|ip| backends.binary_search(ip).is_err());
    let external_ips = ipv4_list(spec.external_ips.iter().flatten().map(String::as_str));
    let load_balancer_ips = ipv4_list(
        service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ingress| ingress.ip.as_deref()),
    );
    let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let external_traffic_policy = match spec.external_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIp,
        _ => SessionAffinity::None,
    };
    let session_affinity_timeout_seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
    Some(ServiceConfig {
        name,
        namespace,
        cluster_ip,
        session_affinity,
        session_affinity_timeout_seconds,
        ports,
        backends,
        terminating_backends,
        external_ips,
        load_balancer_ips,
        internal_traffic_policy,
        external_traffic_policy,
        health_check_node_port: spec
            .health_check_node_port
            .filter(|_| external_traffic_policy == TrafficPolicy::Local)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
    })
}

/// The IPv4 addresses among `addresses`, sorted, once each (IPv6 ones
/// belong to another family's Service).
fn ipv4_list<'a>(addresses: impl Iterator<Item = &'a str>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = addresses.filter_map(|a| a.parse().ok()).collect();
    out.sort();
    out.dedup();
    out
}

/// What an EndpointSlice endpoint's conditions make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndpointState {
    /// Takes new connections.
    Ready,
    /// Shutting down but still serving: new connections only while the
    /// Service has no ready endpoint.
    ServingTerminating,
    Unusable,
}

impl EndpointState {
    /// The API's own rules: a nil `ready` means ready; a nil `serving`
    /// means the same as `ready`; a nil `terminating` means not terminating.
    fn of(endpoint: &k8s_openapi::api::discovery::v1::Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        if ready {
            EndpointState::Ready
        } else if serving && terminating {
            EndpointState::ServingTerminating
        } else {
            EndpointState::Unusable
        }
    }
}

/// Whether all of a Service's backends are pods: a reply from the host
/// network of the client's own node (e.g. `default/kubernetes`, backed by
/// API server addresses) reaches the pod without passing any of our
/// programs, so it could not be translated back. Those stay with
/// kube-proxy, untouched.
pub fn is_pod_backed(service: &ServiceConfig, cluster_cidr: ipnet::Ipv4Net) -> bool {
    let pods_only =
        service.backends.iter().chain(&service.terminating_backends).all(|b| cluster_cidr.contains(b));
    if !pods_only {
        tracing::debug!(
            namespace = service.namespace,
            name = service.name,
            "backends outside the pod network; left to kube-proxy"
        );
    }
    pods_only
}

/// `service` without the node ports (and health check node port) this
/// node cannot serve: a port of `reserved` (the VXLAN port), which a node
/// port would take from the datapath itself. Only possible with an API
/// server whose node port range covers it; each one left out is logged.
/// (A node port may be one of the source-NAT ports: a connection to it is
/// keyed by its client's address and port, a source-NAT connection's
/// replies by the backend's, so the two never meet.)
pub fn without_reserved_node_ports(mut service: ServiceConfig, reserved: &[u16]) -> ServiceConfig {
    let taken = |port: u16| reserved.contains(&port);
    for port in &mut service.ports {
        if let Some(node_port) = port.node_port.filter(|p| taken(*p)) {
            tracing::warn!(
                namespace = service.namespace,
                name = service.name,
                node_port,
                "node port left out: the datapath uses this port itself (VXLAN)"
            );
            port.node_port = None;
        }
    }
    if service.health_check_node_port.is_some_and(taken) {
        service.health_check_node_port = None;
    }
    service
}

/// What the Service watch sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceUpdate {
    /// Every Service: once both lists are complete, and after each relist.
    All(Vec<ServiceConfig>),
    /// One Service's new state; `None`: gone, or nothing to balance.
    One(ServiceRef, Option<Box<ServiceConfig>>),
}

/// Watch Services and EndpointSlices. Once both lists are complete, send
/// them whole; after that, for each object that changes, only its
/// Service's new state, worked out from that Service and its own slices
/// (kept in an index by Service), so that one change costs the same at 10
/// Services as at 10,000.
pub fn watch_services(client: Client, health: Arc<Health>) -> mpsc::UnboundedReceiver<ServiceUpdate> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (service_store, service_writer) = reflector::store();
        let (slice_store, slice_writer) = reflector::store();
        let services =
            reflector(service_writer, watcher(Api::<Service>::all(client.clone()), Default::default()))
                .backoff(WatchBackoff::new("Service", Arc::clone(&health)))
                .map(|e| e.map(|e| Change::from_event(&e, |s: &Service| vec![service_ref(s)])));
        let slices = reflector(slice_writer, watcher(Api::<EndpointSlice>::all(client), Default::default()))
            .backoff(WatchBackoff::new("EndpointSlice", Arc::clone(&health)))
            .map(|e| e.map(|e| Change::from_event(&e, |s: &EndpointSlice| vec![slice_key(s)])));
        let mut events = futures::stream::select(
            services.map(|c| (Kind::Service, c)).boxed(),
            slices.map(|c| (Kind::Slice, c)).boxed(),
        );
        let (mut services_synced, mut slices_synced) = (false, false);
        let mut index = SliceIndex::default();
        let mut sent: HashMap<ServiceRef, ServiceConfig> = HashMap::new();
        while let Some((kind, event)) = events.next().await {
            let watch = match kind {
                Kind::Service => "Service",
                Kind::Slice => "EndpointSlice",
            };
            let change = match event {
                Ok(change) => {
                    health.watch_ok(watch);
                    change
                }
                Err(e) => {
                    health.watch_failed(watch, &e);
                    tracing::warn!(error = %e, "Service/EndpointSlice watch failed; keeping the current Services and retrying");
                    continue;
                }
            };
            // `None`: a list is (re)complete, send everything.
            let touched: Option<Vec<ServiceRef>> = match (kind, change) {
                // Mid-relist states are partial: wait for InitDone.
                (_, Change::Relisting) => continue,
                (Kind::Service, Change::Synced) => {
                    services_synced = true;
                    None
                }
                (Kind::Slice, Change::Synced) => {
                    slices_synced = true;
                    index = SliceIndex::from_slices(slice_store.state().iter().map(|s| s.as_ref()));
                    None
                }
                (Kind::Service, Change::Objects(refs)) => Some(refs),
                // A slice of no Service of ours (IPv6, unlabelled) touches none.
                (Kind::Slice, Change::Objects(slices)) => Some(
                    slices
                        .into_iter()
                        .flat_map(|slice| {
                            let now = slice_store
                                .get(&reflector::ObjectRef::new(&slice.name).within(&slice.namespace));
                            index.update(slice, now.as_deref().and_then(slice_service))
                        })
                        .collect(),
                ),
            };
            if !(services_synced && slices_synced) {
                continue;
            }
            let Some(touched) = touched else {
                // Both lists (re)complete: everything, once.
                let services = service_store.state();
                let slices = slice_store.state();
                let list =
                    services_from(services.iter().map(|s| s.as_ref()), slices.iter().map(|s| s.as_ref()));
                sent = list.iter().map(|s| (ServiceRef::of(s), s.clone())).collect();
                if tx.send(ServiceUpdate::All(list)).is_err() {
                    return;
                }
                continue;
            };
            for service in touched {
                let object =
                    service_store.get(&reflector::ObjectRef::new(&service.name).within(&service.namespace));
                let slices: Vec<_> = index
                    .slices_of(&service)
                    .filter_map(|name| {
                        slice_store.get(&reflector::ObjectRef::new(name).within(&service.namespace))
                    })
                    .collect();
                let config = object.and_then(|o| service_config(&o, slices.iter().map(|s| s.as_ref())));
                if sent.get(&service) == config.as_ref() {
                    continue;
                }
                match &config {
                    Some(config) => sent.insert(service.clone(), config.clone()),
                    None => sent.remove(&service),
                };
                if tx.send(ServiceUpdate::One(service, config.map(Box::new))).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// An EndpointSlice by namespace and name (as a [`ServiceRef`]-shaped key).
fn slice_key(slice: &EndpointSlice) -> ServiceRef {
    ServiceRef {
        namespace: slice.metadata.namespace.clone().unwrap_or_default(),
        name: slice.metadata.name.clone().unwrap_or_default(),
    }
}

/// Which IPv4 EndpointSlices belong to which Service, kept up to date from
/// the slice events (a slice's label may even move it to another Service).
#[derive(Default)]
struct SliceIndex {
    service_of: HashMap<ServiceRef, ServiceRef>,
    slices_of: HashMap<ServiceRef, BTreeSet<String>>,
}

impl SliceIndex {
    fn from_slices<'a>(slices: impl Iterator<Item = &'a EndpointSlice>) -> Self {
        let mut index = SliceIndex::default();
        for slice in slices {
            index.update(slice_key(slice), slice_service(slice));
        }
        index
    }

    /// Record that `slice` now belongs to `service` (`None`: gone or not
    /// ours); the Services whose slices changed.
    fn update(&mut self, slice: ServiceRef, service: Option<ServiceRef>) -> Vec<ServiceRef> {
        let before = self.service_of.remove(&slice);
        if let Some(old) = &before
            && let Some(names) = self.slices_of.get_mut(old)
        {
            names.remove(&slice.name);
            if names.is_empty() {
                self.slices_of.remove(old);
            }
        }
        if let Some(new) = &service {
            self.slices_of.entry(new.clone()).or_default().insert(slice.name.clone());
            self.service_of.insert(slice, new.clone());
        }
        let mut touched: Vec<ServiceRef> = before.into_iter().chain(service).collect();
        touched.dedup();
        touched
    }

    fn slices_of(&self, service: &ServiceRef) -> impl Iterator<Item = &String> {
        self.slices_of.get(service).into_iter().flatten()
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Service,
    Slice,
}

/// A watch event as the Service watch needs it.
enum Change {
    /// A list is complete (InitDone).
    Synced,
    /// Mid-relist: the store has not switched yet.
    Relisting,
    /// These objects were created, changed or deleted.
    Objects(Vec<ServiceRef>),
}

impl Change {
    fn from_event<K>(event: &watcher::Event<K>, key: impl Fn(&K) -> Vec<ServiceRef>) -> Self {
        match event {
            watcher::Event::InitDone => Change::Synced,
            watcher::Event::Init | watcher::Event::InitApply(_) => Change::Relisting,
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => Change::Objects(key(o)),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn node_ports_the_datapath_uses_itself_are_left_out() {
        let port = |node_port: u16| ServicePortConfig {
            port: 80,
            protocol: ServiceProtocol::Udp,
            target_port: None,
            name: None,
            node_port: Some(node_port),
        };
        let service = ServiceConfig {
            name: "dns".into(),
            namespace: "default".into(),
            cluster_ip: std::net::Ipv4Addr::new(10, 96, 0, 10),
            session_affinity: SessionAffinity::None,
            session_affinity_timeout_seconds: 0,
            ports: vec![port(30053), port(8472), port(61000), port(65535)],
            backends: vec![],
            terminating_backends: vec![],
            external_ips: vec![],
            load_balancer_ips: vec![],
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_traffic_policy: TrafficPolicy::Local,
            health_check_node_port: Some(62000),
        };
        let kept = without_reserved_node_ports(service.clone(), &[8472]);
        let node_ports: Vec<Option<u16>> = kept.ports.iter().map(|p| p.node_port).collect();
        // (Source-NAT ports may be node ports: their connections never meet.)
        assert_eq!(node_ports, [Some(30053), None, Some(61000), Some(65535)]);
        assert_eq!(kept.health_check_node_port, Some(62000));
        let on_vxlan = ServiceConfig { health_check_node_port: Some(8472), ..service };
        assert_eq!(without_reserved_node_ports(on_vxlan, &[8472]).health_check_node_port, None);
    }
    use super::*;

    fn service(json: serde_json::Value) -> Service {
        serde_json::from_value(json).unwrap()
    }

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn ready_ipv4_endpoints_with_resolved_target_ports() {
        let services = [
            service(serde_json::json!({
                "metadata": { "name": "web", "namespace": "shop" },
                "spec": {
                    "clusterIP": "10.96.0.10",
                    "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 60 } },
                    "ports": [
                        { "name": "http", "port": 80, "targetPort": "http-named" },
                        { "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353 },
                        { "name": "sctp", "port": 9, "protocol": "SCTP" }
                    ]
                }
            })),
            service(serde_json::json!({
                "metadata": { "name": "headless", "namespace": "shop" },
                "spec": { "clusterIP": "None", "ports": [{ "port": 80 }] }
            })),
        ];
        let slices = [
            slice(serde_json::json!({
                "metadata": { "name": "web-1", "namespace": "shop", "labels": { "kubernetes.io/service-name": "web" } },
                "addressType": "IPv4",
                "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }, { "name": "dns", "port": 5353, "protocol": "UDP" }],
                "endpoints": [
                    { "addresses": ["10.244.1.5"], "conditions": { "ready": true } },
                    { "addresses": ["10.244.2.7"] },
                    { "addresses": ["10.244.2.8"], "conditions": { "ready": false } }
                ]
            })),
            slice(serde_json::json!({
                "metadata": { "name": "web-v6", "namespace": "shop", "labels": { "kubernetes.io/service-name": "web" } },
                "addressType": "IPv6",
                "endpoints": [{ "addresses": ["fd00::5"] }]
            })),
            slice(serde_json::json!({
                "metadata": { "name": "other", "namespace": "elsewhere", "labels": { "kubernetes.io/service-name": "web" } },
                "addressType": "IPv4",
                "endpoints": [{ "addresses": ["10.244.3.3"] }]
            })),
        ];
        let list = services_from(&services, &slices);
        assert_eq!(list.len(), 1, "headless skipped: {list:?}");
        let web = &list[0];
        assert_eq!(web.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(web.session_affinity, SessionAffinity::ClientIp);
        assert_eq!(web.session_affinity_timeout_seconds, 60);
        assert_eq!(web.backends, vec![Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 2, 7)]);
        let ports: Vec<(u16, ServiceProtocol, u16)> =
            web.ports.iter().map(|p| (p.port, p.protocol, p.target_port())).collect();
        assert_eq!(ports, vec![(80, ServiceProtocol::Tcp, 8080), (53, ServiceProtocol::Udp, 5353)]);
    }

    #[test]
    fn conditions_external_addresses_and_internal_traffic_policy() {
        let services = [service(serde_json::json!({
            "metadata": { "name": "web", "namespace": "shop" },
            "spec": {
                "clusterIP": "10.96.0.10",
                "externalIPs": ["203.0.113.7", "2001:db8::7", "203.0.113.7"],
                "internalTrafficPolicy": "Local",
                "ports": [{ "port": 80, "targetPort": 8080 }]
            },
            "status": { "loadBalancer": { "ingress": [{ "ip": "198.51.100.9" }, { "hostname": "lb.example" }] } }
        }))];
        let slices = [slice(serde_json::json!({
            "metadata": { "name": "web-1", "namespace": "shop", "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "endpoints": [
                { "addresses": ["10.244.1.5"], "conditions": { "ready": true, "serving": true, "terminating": false } },
                { "addresses": ["10.244.1.6"], "conditions": { "ready": false, "serving": true, "terminating": true } },
                // Terminating and no longer serving: nothing new goes there.
                { "addresses": ["10.244.1.7"], "conditions": { "ready": false, "serving": false, "terminating": true } },
                // Not ready, not terminating (starting up): unused.
                { "addresses": ["10.244.1.8"], "conditions": { "ready": false } },
                // serving unset means as ready: terminating but not serving.
                { "addresses": ["10.244.1.9"], "conditions": { "ready": false, "terminating": true } }
            ]
        }))];
        let web = &services_from(&services, &slices)[0];
        assert_eq!(web.ports[0].node_port, None, "a ClusterIP Service has no node port");
        assert_eq!(web.backends, vec![Ipv4Addr::new(10, 244, 1, 5)]);
        assert_eq!(web.terminating_backends, vec![Ipv4Addr::new(10, 244, 1, 6)]);
        assert_eq!(web.external_ips, vec![Ipv4Addr::new(203, 0, 113, 7)]);
        assert_eq!(web.load_balancer_ips, vec![Ipv4Addr::new(198, 51, 100, 9)]);
        assert_eq!(web.internal_traffic_policy, TrafficPolicy::Local);
        let plain = &services_from(
            &[service(serde_json::json!({
                "metadata": { "name": "plain", "namespace": "shop" },
                "spec": { "clusterIP": "10.96.0.11", "internalTrafficPolicy": "Cluster", "ports": [{ "port": 80 }] }
            }))],
            &[],
        )[0];
        assert_eq!(plain.internal_traffic_policy, TrafficPolicy::Cluster);
        // Another proxy's Service, or one labelled headless: not ours.
        for label in ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"] {
            let other = service(serde_json::json!({
                "metadata": { "name": "other", "namespace": "shop", "labels": { label: "x" } },
                "spec": { "clusterIP": "10.96.0.13", "ports": [{ "port": 80 }] }
            }));
            assert!(services_from(&[other], &[]).is_empty(), "{label}");
        }
        let balanced = &services_from(
            &[service(serde_json::json!({
                "metadata": { "name": "lb", "namespace": "shop" },
                "spec": {
                    "type": "LoadBalancer", "clusterIP": "10.96.0.12",
                    "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                    "ports": [{ "port": 80, "nodePort": 30080 }, { "port": 81, "protocol": "UDP", "nodePort": 30081 }]
                }
            }))],
            &[],
        )[0];
        assert_eq!(balanced.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(balanced.health_check_node_port, Some(32000));
        let node_ports: Vec<Option<u16>> = balanced.ports.iter().map(|p| p.node_port).collect();
        assert_eq!(node_ports, vec![Some(30080), Some(30081)]);
        assert!(plain.external_ips.is_empty() && plain.load_balancer_ips.is_empty());
    }

    #[test]
    fn services_backed_by_node_addresses_are_left_alone() {
        let service = |name: &str, backends: &[&str]| ServiceConfig {
            name: name.into(),
            namespace: "default".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            session_affinity: SessionAffinity::None,
            session_affinity_timeout_seconds: DEFAULT_AFFINITY_TIMEOUT_SECONDS,
            ports: vec![],
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            terminating_backends: vec![],
            external_ips: vec![],
            load_balancer_ips: vec![],
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        };
        let list = vec![
            service("kubernetes", &["192.168.1.10"]),
            service("web", &["10.244.1.5"]),
            service("mixed", &["10.244.1.6", "192.168.1.11"]),
            service("empty", &[]),
        ];
        let cidr = "10.244.0.0/16".parse().unwrap();
        let kept: Vec<String> = list.into_iter().filter(|s| is_pod_backed(s, cidr)).map(|s| s.name).collect();
        assert_eq!(kept, vec!["web", "empty"]);
    }

    #[test]
    fn the_slice_index_follows_slices_between_services() {
        let r = |ns: &str, name: &str| ServiceRef { namespace: ns.into(), name: name.into() };
        let mut index = SliceIndex::default();
        assert_eq!(index.update(r("a", "web-1"), Some(r("a", "web"))), vec![r("a", "web")]);
        assert_eq!(index.update(r("a", "web-2"), Some(r("a", "web"))), vec![r("a", "web")]);
        assert_eq!(index.slices_of(&r("a", "web")).collect::<Vec<_>>(), ["web-1", "web-2"]);
        // Relabelled to another Service: both are touched.
        assert_eq!(index.update(r("a", "web-2"), Some(r("a", "api"))), vec![r("a", "web"), r("a", "api")]);
        assert_eq!(index.slices_of(&r("a", "web")).collect::<Vec<_>>(), ["web-1"]);
        // Same name in another namespace is another slice.
        index.update(r("b", "web-1"), Some(r("b", "web")));
        assert_eq!(index.update(r("a", "web-1"), None), vec![r("a", "web")]);
        assert_eq!(index.slices_of(&r("a", "web")).count(), 0);
        assert_eq!(index.slices_of(&r("b", "web")).collect::<Vec<_>>(), ["web-1"]);
        assert!(index.update(r("a", "never"), None).is_empty());
    }

    #[test]
    fn a_service_without_slices_has_no_backends() {
        let services = [service(serde_json::json!({
            "metadata": { "name": "empty", "namespace": "default" },
            "spec": { "clusterIP": "10.96.0.99", "ports": [{ "port": 80, "targetPort": 8080 }] }
        }))];
        let list = services_from(&services, &[]);
        assert_eq!(list[0].backends, Vec::<Ipv4Addr>::new());
        assert_eq!(list[0].ports[0].target_port(), 8080);
    }
}
