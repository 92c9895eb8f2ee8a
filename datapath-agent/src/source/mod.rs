//! Where the desired state comes from: the config file and the Kubernetes watchers.
pub mod config;
pub mod config_file;
pub mod kubernetes;
pub mod kubernetes_policy;
pub mod kubernetes_services;
pub mod policy_dir;
