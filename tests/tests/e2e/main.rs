//! The end-to-end and packet-level tests: one test binary, one module per
//! topic (as aya's integration tests are laid out), so the agent library
//! is linked once. Kernel tests run one at a time (`--test-threads=1`,
//! set by `cargo xtask test`).

mod agent_config;
mod churn;
mod cleanup;
mod cni_concurrency;
mod cni_errors;
mod cni_verbs;
mod cross_node;
mod docs;
mod kernel_oracle;
mod kubernetes;
mod manifests;
mod map_layouts;
mod network_policy;
mod node_ownership;
mod node_ports;
mod observability;
mod packets;
mod policy_packets;
mod redteam_policy;
mod redteam_round29;
mod redteam_round30;
mod redteam_round31;
mod redteam_round32;
mod redteam_round33;
mod redteam_services;
mod redteam_to_pod;
mod restart;
mod runtimes;
mod same_node;
mod service_endpoints;
mod service_sync;
mod service_translation;
mod services;
