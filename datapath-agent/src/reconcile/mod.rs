//! Bringing the datapath to the desired state: the Service plan and its
//! sync, the Service names records, and the connection-tracking collector.
pub mod conntrack;
pub mod service_names;
pub mod service_sync;
pub mod services;
