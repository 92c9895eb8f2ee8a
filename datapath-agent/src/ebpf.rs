//! The compiled eBPF object, embedded at build time.

/// ELF bytes of the datapath programs, aligned for aya's loader.
pub static DATAPATH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath"));
