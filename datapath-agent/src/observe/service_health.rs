//! The health check node ports of externalTrafficPolicy Local Services
//! (spec.healthCheckNodePort), served as kube-proxy serves them: an HTTP
//! server on the port, on every node address, answering any path with the
//! number of the Service's ready backends on this node, 200 if there is
//! one, 503 if not. A load balancer probes it to send the Service's
//! traffic only to nodes that can take it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, http::StatusCode, response::IntoResponse};

use crate::model::{ServiceConfig, ServiceRef, ThisNode, TrafficPolicy};

/// What a health check node port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceRef,
    /// Ready backends on this node (terminating ones do not count: a load
    /// balancer should stop sending new traffic to a node that only has
    /// those).
    pub local_endpoints: usize,
}

/// The health check node ports `services` ask for (externalTrafficPolicy
/// Local with a healthCheckNodePort), by port.
pub fn health_checks<'a>(
    services: impl IntoIterator<Item = &'a ServiceConfig>,
    node: ThisNode,
) -> BTreeMap<u16, HealthCheck> {
    // (Only for a node that serves outside clients: a load balancer asks
    // it about the node ports it serves them.)
    services
        .into_iter()
        .filter(|_| node.serve_outside)
        .filter(|s| s.external_traffic_policy == TrafficPolicy::Local)
        .filter_map(|s| {
            let port = s.health_check_node_port?;
            let local_endpoints = s.backends.iter().filter(|ip| node.pod_cidr.contains(*ip)).count();
            Some((port, HealthCheck { service: ServiceRef::of(s), local_endpoints }))
        })
        .collect()
}

/// The servers running, by port.
#[derive(Default)]
pub struct ServiceHealthServers {
    servers: BTreeMap<u16, Server>,
}

struct Server {
    service: ServiceRef,
    local_endpoints: Arc<AtomicUsize>,
    task: tokio::task::AbortHandle,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServiceHealthServers {
    /// Serve exactly `wanted`: servers of ports no longer wanted (or for
    /// another Service) stop, counts change in place, new ports start. A
    /// port that cannot be bound (another program has it) is logged and
    /// tried again at the next sync. Must run inside the tokio runtime.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, server| wanted.get(port).is_some_and(|w| w.service == server.service));
        for (port, check) in wanted {
            if let Some(server) = self.servers.get(port) {
                server.local_endpoints.store(check.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match start(*port, check) {
                Ok(server) => {
                    self.servers.insert(*port, server);
                }
                Err(e) => tracing::warn!(
                    port,
                    namespace = check.service.namespace,
                    name = check.service.name,
                    error = %e,
                    "cannot serve the Service's health check node port; tried again at the next Service change"
                ),
            }
        }
    }
}

fn start(port: u16, check: &HealthCheck) -> std::io::Result<Server> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local_endpoints = Arc::new(AtomicUsize::new(check.local_endpoints));
    let app = router(check.service.clone(), Arc::clone(&local_endpoints));
    let task = tokio::spawn(async move {
        if let Err(e) = super::health::serve_router(listener, app).await {
            tracing::error!(port, error = format!("{e:#}"), "health check node port failed");
        }
    });
    Ok(Server { service: check.service.clone(), local_endpoints, task: task.abort_handle() })
}

/// Any path: kube-proxy's answer (JSON), 200 with a local endpoint, else 503.
fn router(service: ServiceRef, local_endpoints: Arc<AtomicUsize>) -> Router {
    Router::new().fallback(move || {
        let count = local_endpoints.load(Ordering::Relaxed);
        let body = serde_json::json!({
            "service": { "namespace": service.namespace, "name": service.name },
            "localEndpoints": count,
            "serviceProxyHealthy": true,
        });
        let status = if count > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        async move { (status, [("content-type", "application/json")], body.to_string()).into_response() }
    })
}
