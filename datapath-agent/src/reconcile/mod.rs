//! Bringing the datapath to the desired state: the Service plan and its
//! sync, the Service names records, the connection-tracking collector, and
//! NetworkPolicy compiled to map entries and its sync.
pub mod conntrack;
pub mod policy;
pub mod policy_sync;
pub mod service_names;
pub mod service_sync;
pub mod services;
