//! Services from the Kubernetes API (Kubernetes source): Service objects
//! for cluster IPs and ports, EndpointSlices for the ready backends, both
//! watched with `kube`'s reflectors. Like the peer list, the Service list is
//! recomputed from the stores (which keep the last known state through
//! relists and API errors) and applied by diff.

use std::{collections::BTreeMap, net::Ipv4Addr};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::watch;

use crate::config::{ServiceConfig, ServicePortConfig, ServiceProtocol, SessionAffinity};

/// The label EndpointSlices carry with the name of their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// The Services to program: every Service with an IPv4 cluster IP (not
/// headless, not ExternalName), its TCP and UDP ports, and the ready IPv4
/// endpoints of its EndpointSlices. A port's target port is the one the
/// slices give for that port's name (the resolved number, also for named
/// target ports).
pub fn services_from<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<ServiceConfig> {
    // (namespace, service name) -> its slices.
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let labels = slice.metadata.labels.as_ref();
        let Some(name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else { continue };
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        by_service.entry((namespace, name.clone())).or_default().push(slice);
    }
    let mut out = Vec::new();
    for service in services {
        let Some(spec) = service.spec.as_ref() else { continue };
        let Some(cluster_ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) else {
            // Headless ("None"), ExternalName, or IPv6-only: nothing to balance here.
            continue;
        };
        let name = service.metadata.name.clone().unwrap_or_default();
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let slices = by_service.get(&(namespace.clone(), name.clone())).map(Vec::as_slice).unwrap_or(&[]);
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
                .iter()
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
            ports.push(ServicePortConfig { port: number, protocol, target_port, name: port.name.clone() });
        }
        if ports.is_empty() {
            continue;
        }
        let mut backends: Vec<Ipv4Addr> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            // A nil ready condition means ready (the API's own rule).
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse::<Ipv4Addr>().ok())
            .collect();
        backends.sort();
        backends.dedup();
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
        out.push(ServiceConfig {
            name,
            namespace,
            cluster_ip,
            session_affinity,
            session_affinity_timeout_seconds,
            ports,
            backends,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// Only Services whose backends are all pods: a reply from the host network
/// of the client's own node (e.g. `default/kubernetes`, backed by API server
/// addresses) reaches the pod without passing any of our programs, so it
/// could not be translated back. Those stay with kube-proxy, untouched.
pub fn pod_backed(services: Vec<ServiceConfig>, cluster_cidr: ipnet::Ipv4Net) -> Vec<ServiceConfig> {
    services
        .into_iter()
        .filter(|s| {
            let pods_only = s.backends.iter().all(|b| cluster_cidr.contains(b));
            if !pods_only {
                tracing::debug!(
                    namespace = s.namespace,
                    name = s.name,
                    "backends outside the pod network; left to kube-proxy"
                );
            }
            pods_only
        })
        .collect()
}

/// Watch Services and EndpointSlices; send the Service list each time it
/// may have changed, from the moment both lists are complete (`None` until
/// then).
pub fn watch_services(client: Client) -> watch::Receiver<Option<Vec<ServiceConfig>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let (service_store, service_writer) = reflector::store();
        let (slice_store, slice_writer) = reflector::store();
        let services =
            reflector(service_writer, watcher(Api::<Service>::all(client.clone()), Default::default()))
                .default_backoff()
                .map(|e| e.map(|e| Kind::Service(is_init_done(&e))));
        let slices = reflector(slice_writer, watcher(Api::<EndpointSlice>::all(client), Default::default()))
            .default_backoff()
            .map(|e| e.map(|e| Kind::Slice(is_init_done(&e))));
        let mut events = futures::stream::select(services.boxed(), slices.boxed());
        let (mut services_synced, mut slices_synced) = (false, false);
        while let Some(event) = events.next().await {
            match event {
                Ok(Kind::Service(Some(done))) => services_synced |= done,
                Ok(Kind::Slice(Some(done))) => slices_synced |= done,
                // Mid-relist states are partial: wait for InitDone.
                Ok(Kind::Service(None) | Kind::Slice(None)) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "Service/EndpointSlice watch failed; keeping the current Services and retrying");
                    continue;
                }
            }
            if services_synced && slices_synced {
                let services = service_store.state();
                let slices = slice_store.state();
                let list =
                    services_from(services.iter().map(|s| s.as_ref()), slices.iter().map(|s| s.as_ref()));
                tx.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&list);
                    *current = Some(list);
                    changed
                });
            }
        }
    });
    rx
}

enum Kind {
    Service(Option<bool>),
    Slice(Option<bool>),
}

/// `Some(true)` for InitDone, `Some(false)` for a change, `None` mid-relist.
fn is_init_done<K>(event: &watcher::Event<K>) -> Option<bool> {
    match event {
        watcher::Event::InitDone => Some(true),
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Some(false),
    }
}

#[cfg(test)]
mod tests {
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
    fn services_backed_by_node_addresses_are_left_alone() {
        let service = |name: &str, backends: &[&str]| ServiceConfig {
            name: name.into(),
            namespace: "default".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            session_affinity: SessionAffinity::None,
            session_affinity_timeout_seconds: DEFAULT_AFFINITY_TIMEOUT_SECONDS,
            ports: vec![],
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
        };
        let list = vec![
            service("kubernetes", &["192.168.1.10"]),
            service("web", &["10.244.1.5"]),
            service("mixed", &["10.244.1.6", "192.168.1.11"]),
            service("empty", &[]),
        ];
        let kept: Vec<String> =
            pod_backed(list, "10.244.0.0/16".parse().unwrap()).into_iter().map(|s| s.name).collect();
        assert_eq!(kept, vec!["web", "empty"]);
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
