//! What the agent tells about itself: metrics, health, mode mismatches, the monitor lock,
//! and the Services' health check node ports.
pub mod exposition;
pub mod health;
pub mod metrics;
pub mod mode_mismatch;
pub mod monitor_lock;
pub mod service_health;
