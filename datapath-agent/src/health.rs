//! Liveness and readiness endpoints for the DaemonSet's probes, and the
//! Prometheus metrics (`/metrics`, see `metrics.rs`), on `health_address`.
//! `/healthz`: the agent's event loop answers. `/readyz`: the datapath is
//! loaded and reconciled, the CNI API is served and (Kubernetes source) the
//! first complete Node list has been applied.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::registry::Registry;

#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

pub async fn serve(address: SocketAddr, health: Arc<Health>, metrics: Registry) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &metrics) {
                        Ok(()) => (
                            StatusCode::OK,
                            [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                            body,
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [("content-type", "text/plain")],
                            String::new(),
                        ),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(health): State<Arc<Health>>| async move {
                if health.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready: datapath or node list not in place yet\n")
                }
            }),
        )
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding health address {address}"))?;
    axum::serve(listener, app).await.context("health server")
}
