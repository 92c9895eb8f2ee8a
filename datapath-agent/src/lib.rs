//! The node agent of the eBPF pod datapath (its CNI plugin: `datapath-cni`).
//!
//! One room per stage of the data flow (docs/architecture.md); dependencies
//! between rooms point one way, which `rooms::rooms_depend_one_way` checks.
pub mod agent;
pub mod bpf;
pub use datapath_api::build_info;
pub mod cmd;
pub mod host;
pub mod model;
pub mod observe;
pub mod reconcile;
#[cfg(test)]
mod rooms;
pub mod source;
