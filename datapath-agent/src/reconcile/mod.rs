//! Bringing the datapath to the desired state: the Service plan and its sync.
pub mod service_sync;
pub mod services;
