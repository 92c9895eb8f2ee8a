//! The node's own networking and files: routes, VXLAN device, masquerade,
//! link state, endpoint records, the node lock, the CNI config file.
pub mod cni_config;
pub mod link_state;
pub mod masquerade;
pub mod node_lock;
pub mod node_net;
pub mod state;
