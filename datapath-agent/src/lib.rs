//! The node agent and CNI plugin of the eBPF pod datapath.
pub mod api;
pub mod cmd;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod ebpf;
pub mod health;
pub mod kubernetes;
pub mod kubernetes_services;
pub mod mac;
pub mod masquerade;
pub mod metrics;
pub mod netns;
pub mod node_net;
pub mod service_sync;
pub mod services;
pub mod state;
