//! The eBPF side: the program objects, loading and pinning, links and the maps.
pub mod datapath;
pub mod ebpf;
pub mod map_layout;
pub mod map_pins;
