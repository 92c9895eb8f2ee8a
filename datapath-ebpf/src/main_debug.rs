//! The debug build: the same programs, logging every verdict with aya-log
//! (the agent loads it with `ebpf_log = "debug"` in its config).
#![no_std]
#![no_main]

datapath_ebpf::programs!(log = true);
